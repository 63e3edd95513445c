//! One loaded model per process, model file and options, shared by every stream (a
//! camera of the node, a `paligemma` element) that asks for it, with the threads that
//! run it (one per lane, see [`EngineOptions::lanes`]): weights and repacked buffers
//! exist once, a context (KV cache and CPU threads) once per lane, and streams never
//! compete for cores with each other. How those threads share the model between
//! streams is `scheduler.rs`.
use crate::lanes::{ThreadShare, usable_lanes};
use crate::message::ModelInfo;
use crate::shared::{EngineShared, EngineState, StreamShared};
use crate::{Error, Result};
use paligemma::{ContextOptions, Model, WeightOptions, Weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;

/// How an engine loads its model and how many lanes serve it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EngineOptions {
    /// Where and how the weights are loaded.
    pub weights: WeightOptions,
    /// What each lane's context holds; `max_sequences` is for all lanes together.
    pub context: ContextOptions,
    /// Batches run at once on the CPU, each by a context of its own with
    /// `max_sequences / lanes` of the sequences (rounded up), the lanes taking the
    /// `threads` turn by turn: all of them for a lane working alone, a share each for
    /// lanes working together (`lanes.rs`). A small model's graphs leave threads waiting
    /// on each other, so with several cameras two lanes of one thread answer more than
    /// one batch on two threads. 1: one batch at a time on every thread; at most one
    /// lane per thread, CPU only.
    pub lanes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            weights: WeightOptions::default(),
            context: ContextOptions::default(),
            lanes: 1,
        }
    }
}

/// What makes two loads the same engine: the file and the options themselves, so that
/// an option added later keeps engines apart without anyone remembering to.
type EngineKey = (PathBuf, EngineOptions);

/// Where the engine of one key lives while a stream holds it. Locked while that engine
/// loads, so that two streams starting together load it once.
type Slot = Arc<Mutex<Weak<Engine>>>;

/// The engines of this process, by key. Locked only to find a slot, so that loading
/// one model never holds up the streams of another.
fn registry() -> MutexGuard<'static, HashMap<EngineKey, Slot>> {
    static ENGINES: OnceLock<Mutex<HashMap<EngineKey, Slot>>> = OnceLock::new();
    ENGINES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// A model and the threads (one per lane) that serve its streams.
pub struct Engine {
    shared: Arc<EngineShared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Engine {
    /// The engine of this model file and options, loaded on first use: a second
    /// camera or element asking for the same returns the same engine.
    pub fn shared(path: impl AsRef<Path>, opts: &EngineOptions) -> Result<Arc<Engine>> {
        let path = path.as_ref();
        let canonical = std::fs::canonicalize(path).map_err(|e| {
            Error::Engine(paligemma::Error::Io {
                path: path.into(),
                source: e,
            })
        })?;
        let key = (canonical, *opts);
        let slot = {
            let mut engines = registry();
            // Forget the slots of engines gone (not those loading: their lock is held).
            engines.retain(|_, slot| {
                Arc::strong_count(slot) > 1
                    || slot.try_lock().map_or(true, |e| e.strong_count() > 0)
            });
            engines.entry(key).or_default().clone()
        };
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(engine) = slot.upgrade() {
            return Ok(engine);
        }
        let engine = Engine::with_lanes(
            Weights::load(path, &opts.weights)?,
            &opts.context,
            opts.lanes,
        )?;
        *slot = Arc::downgrade(&engine);
        Ok(engine)
    }

    /// An engine of its own around a context (not shared through [`Engine::shared`]),
    /// one batch at a time.
    pub fn new(model: Model) -> Arc<Engine> {
        Engine::start(vec![model], None)
    }

    /// An engine of its own serving `lanes` batches at once (see [`EngineOptions::lanes`]):
    /// `lanes` contexts of `weights` splitting `context.max_sequences`, each with a pool
    /// of `context.threads`, of which it uses those free for each turn (all of them when
    /// it is the only lane with work; see `lanes.rs`).
    pub fn with_lanes(
        weights: Arc<Weights>,
        context: &ContextOptions,
        lanes: usize,
    ) -> Result<Arc<Engine>> {
        let device = weights.device();
        if lanes > 1 && !device.is_cpu() {
            tracing::warn!(
                "{} runs on {}: lanes are for the CPU, using one",
                weights.path().display(),
                device.spec()
            );
        }
        let threads = context.threads_or_default();
        let lanes = usable_lanes(device, threads, lanes);
        if lanes == 1 {
            return Ok(Engine::new(Model::new(weights, context)?));
        }
        let lane = ContextOptions {
            threads,
            max_sequences: context.max_sequences.div_ceil(lanes),
            ..*context
        };
        let contexts = (0..lanes)
            .map(|_| Model::new(weights.clone(), &lane))
            .collect::<paligemma::Result<_>>()?;
        Ok(Engine::start(contexts, Some(ThreadShare::new(threads))))
    }

    /// Spawns a serving thread per model (a lane each), sharing `threads` when several.
    fn start(models: Vec<Model>, threads: Option<ThreadShare>) -> Arc<Engine> {
        let model = &models[0];
        let weights = model.weights();
        let info = ModelInfo {
            name: model.config().name.clone(),
            ty: weights.weight_type().to_string(),
            device: weights.device().spec(),
        };
        let state = EngineState {
            streams: Vec::new(),
            wakes: 0,
            stop: false,
        };
        let shared = Arc::new(EngineShared {
            state: Mutex::new(state),
            wake: Condvar::new(),
            info,
            jobs_started: AtomicU64::new(0),
            threads,
            kv_cache_bytes: models.iter().map(Model::kv_cache_bytes).sum(),
        });
        let threads = models
            .into_iter()
            .enumerate()
            .map(|(lane, model)| {
                let thread_shared = shared.clone();
                std::thread::Builder::new()
                    .name(if lane == 0 {
                        "paligemma-engine".into()
                    } else {
                        format!("paligemma-lane{lane}")
                    })
                    .spawn(move || crate::scheduler::serve(model, &thread_shared))
                    .expect("spawning a thread")
            })
            .collect();
        Arc::new(Engine {
            shared,
            threads: Mutex::new(threads),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// Bytes of the KV caches of every lane (allocated at load, whatever is in use).
    pub fn kv_cache_bytes(&self) -> usize {
        self.shared.kv_cache_bytes
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
        self.shared
            .lock()
            .streams
            .retain(|s| !Arc::ptr_eq(s, stream));
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
