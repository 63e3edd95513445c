//! What the engine's lanes and the streams' handles share, below both: the state of
//! each stream (its frames, requests, prompts, trackers and counters) and of the
//! engine (its streams and wake-ups). `engine.rs` starts the lanes, `scheduler.rs` is
//! what they run, `stream.rs` is the handle a camera or element holds; each reads
//! these and none of them the others' internals.
use crate::frame_sampler::{Frame, FrameSampler, FrameSamplerConfig};
use crate::lanes::ThreadShare;
use crate::message::{Latency, ModelInfo, ResultMessage, Source};
use crate::prompts::{PromptSet, Schedule, StandingPrompt};
use crate::tracker::{Tracker, TrackerConfig};
use paligemma::output::DEFAULT_LOC_DIVISOR;
use paligemma::{DetectionFilter, Dropped};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Receives every result message of a stream (standing prompts, sync analyses, asks),
/// on the engine's thread.
pub type Sink = Box<dyn Fn(&ResultMessage) + Send>;

/// Requests (asks, sync analyses) a stream may have waiting; more are refused as busy.
pub const MAX_PENDING_REQUESTS: usize = 16;

#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub source: Source,
    pub sampler: FrameSamplerConfig,
    pub loc_divisor: f32,
    /// The detection filter of prompts that set none of their own.
    pub filter: DetectionFilter,
    /// How detections of standing prompts get track ids.
    pub tracking: TrackerConfig,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            source: Source::default(),
            sampler: FrameSamplerConfig::default(),
            loc_divisor: DEFAULT_LOC_DIVISOR,
            filter: DetectionFilter::default(),
            tracking: TrackerConfig::default(),
        }
    }
}

/// Counters of one stream, for status reports.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StreamStats {
    pub frames_seen: u64,
    /// Frames answered with the standing prompts (asks not counted).
    pub frames_analysed: u64,
    /// Frames replaced by a newer one or skipped as unchanged before analysis.
    pub frames_dropped: u64,
    pub results: u64,
    pub errors: u64,
    /// Detections delivered in results.
    pub detections: u64,
    /// Detections the prompts' filters dropped (below `min_score`, duplicates).
    pub detections_dropped: Dropped,
    /// Asks and sync analyses refused because [`MAX_PENDING_REQUESTS`] were waiting.
    pub requests_refused: u64,
    /// Latency of the last result.
    #[serde(rename = "latency_ms")]
    pub last_latency_ms: Latency,
    /// Whether the engine is working on this stream's frames now.
    pub busy: bool,
}

pub(crate) enum Request {
    /// Analyse this frame with every standing prompt now; reply with the results.
    Analyse(Frame, SyncSender<Vec<ResultMessage>>),
    /// Answer one prompt on this frame.
    Ask(Frame, StandingPrompt, AskOptions, SyncSender<ResultMessage>),
}

/// Called with each decoded token's text of an ask.
pub type OnText = Arc<dyn Fn(&str) + Send + Sync>;

/// How an ask is answered beyond its prompt: sampling, the answer's text as it is
/// decoded, and a way for the asker to give up.
#[derive(Clone, Default)]
pub struct AskOptions {
    /// Greedy by default, as standing prompts always are.
    pub sampling: paligemma::Sampling,
    /// Called with each decoded token's text (a server streaming the answer); the
    /// message still comes whole at the end.
    pub on_text: Option<OnText>,
    /// Set by the asker to stop the work (a client that went away): the answer ends at
    /// the next token, or is not started.
    pub cancel: Arc<std::sync::atomic::AtomicBool>,
}

impl AskOptions {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(std::sync::atomic::Ordering::Relaxed)
    }
}

pub(crate) struct StreamState {
    pub sampler: FrameSampler,
    pub requests: VecDeque<Request>,
    pub prompts: PromptSet,
    pub schedule: Schedule,
    /// Frames taken for standing prompts so far (the schedule's frame count).
    pub taken: u64,
    /// The last frame submitted, for asks about "now".
    pub newest: Option<Frame>,
    /// Jobs of this stream the engine has started and not yet delivered.
    pub in_flight: usize,
    /// Whether one of them is standing work (at most one is, over every lane).
    pub standing: bool,
    /// The engine's job count when this stream last got a job: the stream served
    /// longest ago goes first (round-robin, over every lane).
    pub last_served: u64,
    pub stats: StreamStats,
    /// One tracker per standing prompt id that has answered with detections.
    pub trackers: HashMap<String, Tracker>,
    /// The handle has stopped: the engine starts nothing more for it.
    pub closed: bool,
}

/// One stream as the engine's thread sees it.
pub(crate) struct StreamShared {
    pub state: Mutex<StreamState>,
    /// Signalled by the engine when a job of this stream is delivered.
    pub delivered: Condvar,
    /// Bumped by flush and stop: work started under an older epoch is abandoned.
    pub epoch: AtomicU64,
    pub config: StreamConfig,
    pub sink: Mutex<Sink>,
}

impl StreamShared {
    pub fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Hands a message to the stream's owner. A sink that panics loses that message
    /// only: the engine's lane, and every stream it serves, goes on.
    pub fn deliver(&self, msg: &ResultMessage) {
        let sink = std::panic::AssertUnwindSafe(|| {
            (self.sink.lock().unwrap_or_else(|e| e.into_inner()))(msg)
        });
        if std::panic::catch_unwind(sink).is_err() {
            tracing::error!(
                "{}: the result sink panicked; the message is lost",
                self.config.source.camera
            );
        }
    }
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
    /// The KV caches of every lane, allocated once at start.
    pub kv_cache_bytes: usize,
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
