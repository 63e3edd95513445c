//! A stream's handle on a shared [`Engine`]: a camera of the node or a `paligemma`
//! element hands frames over (the newest wins), sets its standing prompts, asks
//! ad-hoc questions and receives every result message through its sink. The engine's
//! thread does the work (see `scheduler.rs`); engine errors become error
//! results, never a dead stream.
use crate::engine::Engine;
use crate::frame_sampler::{Frame, FrameSampler, FrameSamplerConfig};
use crate::message::{Latency, ResultMessage, Source};
use crate::prompts::{PromptSet, Schedule, StandingPrompt};
use crate::tracker::{Predicted, Tracker, TrackerConfig};
use std::collections::HashMap;
use crate::{Error, Result};
use paligemma::output::DEFAULT_LOC_DIVISOR;
use paligemma::{DetectionFilter, Dropped};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Receives every result message of a stream (standing prompts, sync analyses, asks),
/// on the engine's thread.
pub type Sink = Box<dyn Fn(&ResultMessage) + Send>;

/// Requests (asks, sync analyses) a stream may have waiting; more are refused as busy.
pub const MAX_PENDING_REQUESTS: usize = 16;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub source: Source,
    pub sampler: FrameSamplerConfig,
    pub loc_divisor: f32,
    /// The detection filter of prompts that set none of their own.
    pub filter: DetectionFilter,
    /// How detections of standing prompts get track ids.
    pub tracking: TrackerConfig,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig { source: Source::default(), sampler: FrameSamplerConfig::default(), loc_divisor: DEFAULT_LOC_DIVISOR, filter: DetectionFilter::default(), tracking: TrackerConfig::default() }
    }
}

/// Counters of one stream, for status reports.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct WorkerStats {
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
    Ask(Frame, StandingPrompt, SyncSender<ResultMessage>),
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
    pub stats: WorkerStats,
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
    pub config: WorkerConfig,
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
        let sink = std::panic::AssertUnwindSafe(|| (self.sink.lock().unwrap_or_else(|e| e.into_inner()))(msg));
        if std::panic::catch_unwind(sink).is_err() {
            tracing::error!("{}: the result sink panicked; the message is lost", self.config.source.camera);
        }
    }
}

/// Handle to a stream of a shared engine; dropping it stops the stream.
pub struct Worker {
    engine: Arc<Engine>,
    stream: Arc<StreamShared>,
}

impl Worker {
    /// Attaches a stream to `engine` (see [`Engine::shared`]).
    pub fn spawn(engine: Arc<Engine>, prompts: PromptSet, config: WorkerConfig, sink: Sink) -> Worker {
        let stream = Arc::new(StreamShared {
            state: Mutex::new(StreamState {
                sampler: FrameSampler::new(config.sampler.clone()),
                requests: VecDeque::new(),
                prompts,
                schedule: Schedule::default(),
                taken: 0,
                newest: None,
                in_flight: 0,
                standing: false,
                last_served: 0,
                stats: WorkerStats::default(),
                trackers: HashMap::new(),
                closed: false,
            }),
            delivered: Condvar::new(),
            epoch: AtomicU64::new(0),
            config,
            sink: Mutex::new(sink),
        });
        engine.attach(stream.clone());
        Worker { engine, stream }
    }

    /// The engine this stream runs on.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.stream.lock()
    }

    fn wake_engine(&self) {
        self.engine.wake();
    }

    /// Hands a frame over without waiting; a frame still waiting is replaced.
    pub fn submit(&self, frame: Frame) {
        let mut state = self.lock();
        state.newest = Some(frame.clone());
        state.sampler.offer(frame);
        drop(state);
        self.wake_engine();
    }

    /// The last frame submitted (what an ask about "now" is answered on).
    pub fn newest(&self) -> Option<Frame> {
        self.lock().newest.clone()
    }

    /// Whether a frame arriving now should be analysed synchronously (interval,
    /// change detection); counts it as seen or dropped.
    pub fn sample_now(&self, frame: &Frame) -> bool {
        self.lock().sampler.sample_now(frame, Instant::now())
    }

    fn request(&self, request: Request) -> Result<()> {
        let mut state = self.lock();
        if state.closed {
            return Err(Error::Stopped);
        }
        if state.requests.len() >= MAX_PENDING_REQUESTS {
            state.stats.requests_refused += 1;
            return Err(Error::Busy(MAX_PENDING_REQUESTS));
        }
        state.requests.push_back(request);
        drop(state);
        self.wake_engine();
        Ok(())
    }

    /// Analyses a frame with every standing prompt and waits for the results. Returns
    /// early (with nothing) when flushed or stopped meanwhile.
    pub fn analyse(&self, frame: Frame) -> Result<Vec<ResultMessage>> {
        let (tx, rx) = sync_channel(1);
        self.request(Request::Analyse(frame, tx))?;
        rx.recv().map_err(|_| Error::Stopped)
    }

    /// Answers one prompt on a frame (before any standing prompt of any stream),
    /// waiting at most `timeout`.
    pub fn ask(&self, frame: Frame, prompt: StandingPrompt, timeout: Duration) -> Result<ResultMessage> {
        prompt.validate()?;
        let (tx, rx) = sync_channel(1);
        self.request(Request::Ask(frame, prompt, tx))?;
        rx.recv_timeout(timeout).map_err(|e| match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => Error::Timeout(timeout.as_millis() as u64),
            std::sync::mpsc::RecvTimeoutError::Disconnected => Error::Stopped,
        })
    }

    /// Replaces the standing prompts (validated by the caller's `PromptSet`).
    pub fn set_prompts(&self, prompts: PromptSet) {
        let mut state = self.lock();
        state.prompts = prompts;
        state.schedule.reset();
        drop(state);
        self.wake_engine();
    }

    pub fn prompts(&self) -> PromptSet {
        self.lock().prompts.clone()
    }

    /// Where each standing prompt's tracked objects are at `time` (seconds on the clock
    /// of [`FrameInfo::time_s`](crate::FrameInfo::time_s)), for frames between two
    /// answers: per prompt id, the confirmed tracks seen in its last answer.
    pub fn predict(&self, time: f64) -> Vec<(String, Vec<Predicted>)> {
        let state = self.lock();
        state.trackers.iter().map(|(id, t)| (id.clone(), t.predict(time))).collect()
    }

    /// Drops the waiting frame and abandons the work in progress (seeks, flushes).
    pub fn flush(&self) {
        let mut state = self.lock();
        state.sampler.flush();
        self.stream.epoch.fetch_add(1, Ordering::SeqCst);
        drop(state);
        self.wake_engine();
    }

    pub fn stats(&self) -> WorkerStats {
        let state = self.lock();
        let mut stats = state.stats.clone();
        stats.frames_seen = state.sampler.seen;
        stats.frames_dropped = state.sampler.dropped_total;
        stats.busy = state.in_flight > 0;
        stats
    }

    /// Whether a frame is waiting or a request is queued.
    pub fn has_pending(&self) -> bool {
        let state = self.lock();
        state.sampler.has_pending() || !state.requests.is_empty()
    }

    /// Waits until no frame is waiting and nothing is in progress (or `timeout`).
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if !state.sampler.has_pending() && state.requests.is_empty() && state.in_flight == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self.stream.delivered.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Stops the stream, abandoning its work in progress, and waits until the engine
    /// no longer calls its sink. Waiting callers of [`Worker::analyse`] and
    /// [`Worker::ask`] get [`Error::Stopped`].
    pub fn stop(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.requests.clear();
        self.stream.epoch.fetch_add(1, Ordering::SeqCst);
        drop(state);
        self.wake_engine();
        let mut state = self.lock();
        while state.in_flight > 0 {
            state = self.stream.delivered.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        drop(state);
        self.engine.detach(&self.stream);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}
