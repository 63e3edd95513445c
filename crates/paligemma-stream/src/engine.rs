//! One loaded model per process and model file, shared by every stream (a camera of
//! the node, a `paligemma` element) that asks for it, with the thread that runs it
//! (one per lane, see `ModelOptions::lanes`): weights and repacked buffers exist once,
//! the KV cache and the CPU threads once per lane, and streams never compete for cores
//! with each other. How those threads share the model between streams is `scheduler.rs`.
use crate::lanes::ThreadShare;
use crate::message::ModelInfo;
use crate::worker::StreamShared;
use crate::{Error, Result};
use paligemma::{KvType, Model, ModelOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;

/// What makes two loads the same model: the file and every load option.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct EngineKey {
    path: PathBuf,
    device: String,
    threads: usize,
    kv_type: KvType,
    context: usize,
    max_sequences: usize,
    repack: bool,
    lanes: usize,
}

/// Where the engine of one key lives while a stream holds it. Locked while that engine
/// loads, so that two streams starting together load it once.
type Slot = Arc<Mutex<Weak<Engine>>>;

/// The engines of this process, by key. Locked only to find a slot, so that loading
/// one model never holds up the streams of another.
fn registry() -> MutexGuard<'static, HashMap<EngineKey, Slot>> {
    static ENGINES: OnceLock<Mutex<HashMap<EngineKey, Slot>>> = OnceLock::new();
    ENGINES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

/// A model and the threads (one per lane) that serve its streams.
pub struct Engine {
    shared: Arc<EngineShared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What the serving thread and the streams' handles share.
pub(crate) struct EngineShared {
    pub state: Mutex<EngineState>,
    /// Signalled when a stream has new work (a frame, a request, new prompts) or goes.
    pub wake: Condvar,
    pub info: ModelInfo,
    /// Jobs handed out so far, by every lane: a stream's `last_served` is this count
    /// when it last got one.
    pub jobs_started: AtomicU64,
    /// With several lanes: the CPU threads they take turn by turn.
    pub threads: Option<ThreadShare>,
}

pub(crate) struct EngineState {
    /// Every stream attached, in the order they came (the round-robin order).
    pub streams: Vec<Arc<StreamShared>>,
    /// Wake-ups so far ([`EngineShared::wake`]). Each lane notes the count when it looks
    /// for work and sleeps only while it is unchanged: a wake-up between its look and its
    /// wait is not lost, whichever lane looked meanwhile.
    pub wakes: u64,
    pub stop: bool,
}

impl EngineShared {
    pub fn lock(&self) -> MutexGuard<'_, EngineState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells every lane to look for work again.
    pub fn wake(&self) {
        self.lock().wakes += 1;
        self.wake.notify_all();
    }
}

impl Engine {
    /// The engine of this model file and options, loaded on first use: a second
    /// camera or element asking for the same returns the same engine.
    pub fn shared(path: impl AsRef<Path>, opts: &ModelOptions) -> Result<Arc<Engine>> {
        let path = path.as_ref();
        let canonical = std::fs::canonicalize(path).map_err(|e| Error::Engine(paligemma::Error::Io { path: path.into(), source: e }))?;
        let key = EngineKey {
            path: canonical,
            device: opts.device.clone(),
            threads: opts.threads,
            kv_type: opts.kv_type,
            context: opts.context,
            max_sequences: opts.max_sequences,
            repack: opts.repack,
            lanes: opts.lanes,
        };
        let slot = {
            let mut engines = registry();
            // Forget the slots of engines gone (not those loading: their lock is held).
            engines.retain(|_, slot| Arc::strong_count(slot) > 1 || slot.try_lock().map_or(true, |e| e.strong_count() > 0));
            engines.entry(key).or_default().clone()
        };
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(engine) = slot.upgrade() {
            return Ok(engine);
        }
        let engine = Engine::with_lanes(Model::load(path, opts)?, opts.lanes)?;
        *slot = Arc::downgrade(&engine);
        Ok(engine)
    }

    /// An engine of its own around a loaded model (not shared through [`Engine::shared`]),
    /// one batch at a time.
    pub fn new(model: Model) -> Arc<Engine> {
        Engine::start(vec![model], None)
    }

    /// An engine of its own serving `lanes` batches at once (see `ModelOptions::lanes`):
    /// `lanes` forks of the model sharing its weights and splitting its sequences, each
    /// with a pool of the model's threads, of which it uses those free for each turn
    /// (all of them when it is the only lane with work; see `lanes.rs`); the model's
    /// own KV cache and thread pool go.
    pub fn with_lanes(model: Model, lanes: usize) -> Result<Arc<Engine>> {
        if lanes > 1 && model.device() != "cpu" {
            tracing::warn!("{} runs on {}: lanes are for the CPU, using one", model.path().display(), model.device());
        }
        let lanes = paligemma::usable_lanes(model.device(), model.threads(), lanes);
        if lanes == 1 {
            return Ok(Engine::new(model));
        }
        let (threads, sequences) = (model.threads(), model.max_sequences().div_ceil(lanes));
        let forks = (0..lanes).map(|_| model.fork(threads, sequences)).collect::<paligemma::Result<_>>()?;
        Ok(Engine::start(forks, Some(ThreadShare::new(threads))))
    }

    /// Spawns a serving thread per model (a lane each), sharing `threads` when several.
    fn start(models: Vec<Model>, threads: Option<ThreadShare>) -> Arc<Engine> {
        let model = &models[0];
        let info = ModelInfo { name: model.config().name.clone(), ty: model.weight_type().to_string(), device: model.device().to_string() };
        let state = EngineState { streams: Vec::new(), wakes: 0, stop: false };
        let shared = Arc::new(EngineShared { state: Mutex::new(state), wake: Condvar::new(), info, jobs_started: AtomicU64::new(0), threads });
        let threads = models
            .into_iter()
            .enumerate()
            .map(|(lane, model)| {
                let thread_shared = shared.clone();
                std::thread::Builder::new()
                    .name(if lane == 0 { "paligemma-engine".into() } else { format!("paligemma-lane{lane}") })
                    .spawn(move || crate::scheduler::serve(model, &thread_shared))
                    .expect("spawning a thread")
            })
            .collect();
        Arc::new(Engine { shared, threads: Mutex::new(threads) })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// Streams attached now.
    pub fn streams(&self) -> usize {
        self.shared.lock().streams.len()
    }

    pub(crate) fn attach(&self, stream: Arc<StreamShared>) {
        self.shared.lock().streams.push(stream);
        self.wake();
    }

    /// Lets a stream go (its handle stopped and nothing of it is in flight).
    pub(crate) fn detach(&self, stream: &Arc<StreamShared>) {
        self.shared.lock().streams.retain(|s| !Arc::ptr_eq(s, stream));
    }

    /// Tells the serving thread that a stream has new work.
    pub(crate) fn wake(&self) {
        self.shared.wake();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        for thread in std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner())) {
            let _ = thread.join();
        }
    }
}
