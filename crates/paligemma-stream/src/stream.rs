//! A stream's handle on a shared [`Engine`]: a camera of the node or a `paligemma`
//! element hands frames over (the newest wins), sets its standing prompts, asks
//! ad-hoc questions and receives every result message through its sink. The engine's
//! lanes do the work (see `scheduler.rs`); engine errors become error results, never
//! a dead stream.
use crate::engine::Engine;
use crate::frame_sampler::{Frame, FrameSampler};
use crate::message::ResultMessage;
use crate::prompts::{PromptSet, Schedule, StandingPrompt};
use crate::shared::{
    AskOptions, MAX_PENDING_REQUESTS, Request, Sink, StreamConfig, StreamShared, StreamState,
    StreamStats,
};
use crate::tracker::Predicted;
use crate::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Sets an ask's cancel flag when the asker stops waiting (answered or not: an
/// answered ask has nothing left to cancel).
struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Handle to a stream of a shared engine; dropping it stops the stream.
pub struct Stream {
    engine: Arc<Engine>,
    stream: Arc<StreamShared>,
}

impl Stream {
    /// Attaches a stream to `engine` (see [`Engine::shared`]).
    pub fn attach(
        engine: Arc<Engine>,
        prompts: PromptSet,
        config: StreamConfig,
        sink: Sink,
    ) -> Stream {
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
                stats: StreamStats::default(),
                trackers: HashMap::new(),
                closed: false,
            }),
            delivered: Condvar::new(),
            epoch: AtomicU64::new(0),
            config,
            sink: Mutex::new(sink),
        });
        engine.attach(stream.clone());
        Stream { engine, stream }
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
    pub fn ask(
        &self,
        frame: Frame,
        prompt: StandingPrompt,
        timeout: Duration,
    ) -> Result<ResultMessage> {
        self.ask_with(frame, prompt, AskOptions::default(), timeout)
    }

    /// [`Stream::ask`] with sampling, the text as it comes and cancellation; on a
    /// timeout the work is cancelled too.
    pub fn ask_with(
        &self,
        frame: Frame,
        prompt: StandingPrompt,
        opts: AskOptions,
        timeout: Duration,
    ) -> Result<ResultMessage> {
        prompt.validate()?;
        opts.sampling.validate()?;
        let cancel = opts.cancel.clone();
        let (tx, rx) = sync_channel(1);
        self.request(Request::Ask(frame, prompt, opts, tx))?;
        let _cancel_unless_answered = CancelOnDrop(cancel);
        rx.recv_timeout(timeout).map_err(|e| match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => {
                Error::Timeout(timeout.as_millis() as u64)
            }
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
        state
            .trackers
            .iter()
            .map(|(id, t)| (id.clone(), t.predict(time)))
            .collect()
    }

    /// Drops the waiting frame and abandons the work in progress (seeks, flushes).
    pub fn flush(&self) {
        let mut state = self.lock();
        state.sampler.flush();
        self.stream.epoch.fetch_add(1, Ordering::SeqCst);
        drop(state);
        self.wake_engine();
    }

    pub fn stats(&self) -> StreamStats {
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
            state = self
                .stream
                .delivered
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops the stream, abandoning its work in progress, and waits until the engine
    /// no longer calls its sink. Waiting callers of [`Stream::analyse`] and
    /// [`Stream::ask`] get [`Error::Stopped`].
    pub fn stop(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.requests.clear();
        self.stream.epoch.fetch_add(1, Ordering::SeqCst);
        drop(state);
        self.wake_engine();
        let mut state = self.lock();
        while state.in_flight > 0 {
            state = self
                .stream
                .delivered
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        drop(state);
        self.engine.detach(&self.stream);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop();
    }
}
