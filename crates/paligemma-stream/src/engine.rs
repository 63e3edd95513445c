//! One loaded model per process and model file, shared by every stream (a camera of
//! the node, a `paligemma` element) that asks for it, with the one thread that runs
//! it: weights, repacked buffers, the KV cache and the CPU thread pool exist once,
//! and streams never compete for cores with each other. How that thread shares the
//! model between streams is `scheduler.rs`.
use crate::message::ModelInfo;
use crate::worker::StreamShared;
use crate::{Error, Result};
use paligemma::{KvType, Model, ModelOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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

/// A model and the thread that serves its streams.
pub struct Engine {
    shared: Arc<EngineShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the serving thread and the streams' handles share.
pub(crate) struct EngineShared {
    pub state: Mutex<EngineState>,
    /// Signalled when a stream has new work (a frame, a request, new prompts) or goes.
    pub wake: Condvar,
    pub info: ModelInfo,
}

pub(crate) struct EngineState {
    /// Every stream attached, in the order they came (the round-robin order).
    pub streams: Vec<Arc<StreamShared>>,
    /// Set by [`Engine::wake`], cleared by the serving thread when it looks for work:
    /// a wake-up between its look and its wait is not lost.
    pub woken: bool,
    pub stop: bool,
}

impl EngineShared {
    pub fn lock(&self) -> MutexGuard<'_, EngineState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
        let engine = Engine::new(Model::load(path, opts)?);
        *slot = Arc::downgrade(&engine);
        Ok(engine)
    }

    /// An engine of its own around a loaded model (not shared through [`Engine::shared`]).
    pub fn new(model: Model) -> Arc<Engine> {
        let info = ModelInfo { name: model.config().name.clone(), ty: model.weight_type().to_string(), device: model.device().to_string() };
        let shared = Arc::new(EngineShared { state: Mutex::new(EngineState { streams: Vec::new(), woken: false, stop: false }), wake: Condvar::new(), info });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("paligemma-engine".into())
            .spawn(move || crate::scheduler::serve(model, &thread_shared))
            .expect("spawning a thread");
        Arc::new(Engine { shared, thread: Mutex::new(Some(thread)) })
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
        self.shared.lock().woken = true;
        self.shared.wake.notify_all();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }
}
