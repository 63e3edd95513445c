//! The worker thread: the only code that touches the engine. It takes the newest
//! sampled frame, encodes it once, answers every standing prompt that is due, and
//! hands each result message to a sink. Synchronous analyses (the element's `sync`
//! mode) and ad-hoc questions (the node's `ask`) go before standing work. Engine
//! errors become error results; the worker never dies of them.
use crate::frame_sampler::{Frame, FrameSampler, FrameSamplerConfig};
use crate::message::{Latency, ModelInfo, PromptInfo, ResultMessage, SCHEMA, Source, TokenCounts};
use crate::prompts::{PromptSet, Schedule, StandingPrompt};
use crate::{Error, Result};
use paligemma::output::DEFAULT_LOC_DIVISOR;
use paligemma::{AnswerOptions, Model, Task, TaskResult};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Receives every result message (standing prompts, sync analyses, asks).
pub type Sink = Box<dyn Fn(&ResultMessage) + Send>;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub source: Source,
    pub sampler: FrameSamplerConfig,
    pub loc_divisor: f32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig { source: Source::default(), sampler: FrameSamplerConfig::default(), loc_divisor: DEFAULT_LOC_DIVISOR }
    }
}

/// Counters for status reports.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct WorkerStats {
    pub frames_seen: u64,
    pub frames_analysed: u64,
    pub frames_dropped: u64,
    pub results: u64,
    pub errors: u64,
    /// Latency of the last result.
    pub last_latency_ms: Latency,
    pub busy: bool,
}

enum Request {
    /// Analyse this frame with every standing prompt now; reply with the results.
    Analyse(Frame, SyncSender<Vec<ResultMessage>>),
    /// Answer one prompt on this frame.
    Ask(Frame, StandingPrompt, SyncSender<ResultMessage>),
}

struct State {
    sampler: FrameSampler,
    requests: VecDeque<Request>,
    prompts: PromptSet,
    prompts_changed: bool,
    stop: bool,
    stats: WorkerStats,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Bumped by flush and stop: work started under an older epoch is abandoned.
    epoch: AtomicU64,
}

/// Handle to the worker thread; dropping it stops the thread.
pub struct Worker {
    shared: Arc<Shared>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    /// Starts the worker with a loaded model.
    pub fn spawn(model: Model, prompts: PromptSet, config: WorkerConfig, sink: Sink) -> Worker {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                sampler: FrameSampler::new(config.sampler.clone()),
                requests: VecDeque::new(),
                prompts,
                prompts_changed: false,
                stop: false,
                stats: WorkerStats::default(),
            }),
            wake: Condvar::new(),
            epoch: AtomicU64::new(0),
        });
        let thread_shared = shared.clone();
        let handle =
            std::thread::Builder::new().name("paligemma-worker".into()).spawn(move || run(model, thread_shared, config, sink)).expect("spawning a thread");
        Worker { shared, handle: Mutex::new(Some(handle)) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands a frame over without waiting; a frame still waiting is replaced.
    pub fn submit(&self, frame: Frame) {
        self.lock().sampler.offer(frame);
        self.shared.wake.notify_all();
    }

    /// Whether a frame arriving now should be analysed synchronously (interval,
    /// change detection); counts it as seen or dropped.
    pub fn sample_now(&self, frame: &Frame) -> bool {
        self.lock().sampler.sample_now(frame, Instant::now())
    }

    /// Analyses a frame with every standing prompt and waits for the results. Returns
    /// early (with what is done) when flushed or stopped meanwhile.
    pub fn analyse(&self, frame: Frame) -> Result<Vec<ResultMessage>> {
        let (tx, rx) = sync_channel(1);
        {
            let mut state = self.lock();
            if state.stop {
                return Err(Error::Stopped);
            }
            state.requests.push_back(Request::Analyse(frame, tx));
        }
        self.shared.wake.notify_all();
        rx.recv().map_err(|_| Error::Stopped)
    }

    /// Answers one prompt on a frame, waiting at most `timeout`.
    pub fn ask(&self, frame: Frame, prompt: StandingPrompt, timeout: Duration) -> Result<ResultMessage> {
        prompt.validate()?;
        let (tx, rx) = sync_channel(1);
        {
            let mut state = self.lock();
            if state.stop {
                return Err(Error::Stopped);
            }
            state.requests.push_back(Request::Ask(frame, prompt, tx));
        }
        self.shared.wake.notify_all();
        rx.recv_timeout(timeout).map_err(|e| match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => Error::Timeout(timeout.as_millis() as u64),
            std::sync::mpsc::RecvTimeoutError::Disconnected => Error::Stopped,
        })
    }

    /// Replaces the standing prompts (validated by the caller's `PromptSet`).
    pub fn set_prompts(&self, prompts: PromptSet) {
        let mut state = self.lock();
        state.prompts = prompts;
        state.prompts_changed = true;
    }

    pub fn prompts(&self) -> PromptSet {
        self.lock().prompts.clone()
    }

    /// Drops the waiting frame and abandons the work in progress (seeks, flushes).
    pub fn flush(&self) {
        let mut state = self.lock();
        state.sampler.flush();
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        drop(state);
        self.shared.wake.notify_all();
    }

    pub fn stats(&self) -> WorkerStats {
        let state = self.lock();
        let mut stats = state.stats.clone();
        stats.frames_seen = state.sampler.seen;
        stats.frames_dropped = state.sampler.dropped_total;
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
            if !state.sampler.has_pending() && state.requests.is_empty() && !state.stats.busy {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self.shared.wake.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Stops the thread, abandoning work in progress, and waits for it. Waiting
    /// callers of [`Worker::analyse`] and [`Worker::ask`] get [`Error::Stopped`].
    pub fn stop(&self) {
        {
            let mut state = self.lock();
            state.stop = true;
            state.requests.clear();
        }
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        self.shared.wake.notify_all();
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the worker does next.
enum Job {
    Request(Request),
    Standing(Frame, Vec<StandingPrompt>),
}

fn run(mut model: Model, shared: Arc<Shared>, config: WorkerConfig, sink: Sink) {
    let info = ModelInfo { name: model.config().name.clone(), ty: model.weight_type().to_string(), device: model.device().to_string() };
    let mut schedule = Schedule::default();
    let mut analysed = 0u64;
    loop {
        let (job, epoch) = {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if state.stop {
                    return;
                }
                if state.prompts_changed {
                    schedule.reset();
                    state.prompts_changed = false;
                }
                if let Some(req) = state.requests.pop_front() {
                    state.stats.busy = true;
                    break (Job::Request(req), shared.epoch.load(Ordering::SeqCst));
                }
                let now = Instant::now();
                match state.sampler.wait_time(now) {
                    Some(wait) if wait.is_zero() => {
                        if let Some(frame) = state.sampler.take(now) {
                            analysed += 1;
                            let due: Vec<StandingPrompt> = schedule.due(&state.prompts, analysed, now).into_iter().cloned().collect();
                            if due.is_empty() {
                                continue;
                            }
                            state.stats.busy = true;
                            break (Job::Standing(frame, due), shared.epoch.load(Ordering::SeqCst));
                        }
                    }
                    Some(wait) => state = shared.wake.wait_timeout(state, wait).unwrap_or_else(|e| e.into_inner()).0,
                    None => {
                        shared.wake.notify_all();
                        state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
        };
        let ctx = JobContext { shared: &shared, config: &config, info: &info, epoch };
        match job {
            Job::Standing(frame, due) => {
                for msg in ctx.analyse_contained(&mut model, &frame, &due) {
                    sink(&msg);
                }
            }
            Job::Request(Request::Analyse(frame, reply)) => {
                let prompts = shared.state.lock().unwrap_or_else(|e| e.into_inner()).prompts.prompts.clone();
                let results = ctx.analyse_contained(&mut model, &frame, &prompts);
                for msg in &results {
                    sink(msg);
                }
                let _ = reply.send(results);
            }
            Job::Request(Request::Ask(frame, prompt, reply)) => {
                if let Some(msg) = ctx.analyse_contained(&mut model, &frame, std::slice::from_ref(&prompt)).pop() {
                    sink(&msg);
                    let _ = reply.send(msg);
                }
            }
        }
        let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.stats.busy = false;
        drop(state);
        shared.wake.notify_all();
    }
}

struct JobContext<'a> {
    shared: &'a Shared,
    config: &'a WorkerConfig,
    info: &'a ModelInfo,
    epoch: u64,
}

impl JobContext<'_> {
    fn cancelled(&self) -> bool {
        self.shared.epoch.load(Ordering::SeqCst) != self.epoch
    }

    /// [`JobContext::analyse`], with a panic anywhere below it turned into an error
    /// result per prompt: the worker thread, and the camera or element it serves, go on.
    fn analyse_contained(&self, model: &mut Model, frame: &Frame, prompts: &[StandingPrompt]) -> Vec<ResultMessage> {
        let panic = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.analyse(model, frame, prompts))) {
            Ok(out) => return out,
            Err(panic) => panic,
        };
        let why = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
        tracing::error!("the engine panicked on frame {}: {why}", frame.info.seq);
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.stats.results += prompts.len() as u64;
        state.stats.errors += prompts.len() as u64;
        drop(state);
        prompts
            .iter()
            .map(|p| ResultMessage { result: TaskResult::Error { message: format!("internal error in the engine: {why}") }, ..self.message(frame, p, 0.0) })
            .collect()
    }

    /// Encodes the frame once and answers its prompts, decoding them together, each up
    /// to its own token limit; stops early when cancelled. A prompt that fails gets an
    /// error result of its own.
    fn analyse(&self, model: &mut Model, frame: &Frame, prompts: &[StandingPrompt]) -> Vec<ResultMessage> {
        let queue_ms = frame.received.elapsed().as_secs_f64() * 1e3;
        let started = Instant::now();
        // Engine errors become the text of error results, here and nowhere else.
        let outcomes: Vec<Result<paligemma::Answer, String>> = match model.encode_image(&frame.image) {
            Err(e) => prompts.iter().map(|_| Err(e.to_string())).collect(),
            Ok(emb) => {
                let tasks: Vec<Task> = prompts.iter().map(|p| p.task.clone()).collect();
                let opts = AnswerOptions {
                    max_tokens: prompts.iter().map(|p| p.max_tokens).max().unwrap_or(0),
                    loc_divisor: self.config.loc_divisor,
                    ..Default::default()
                };
                let mut within_limit = |t: &paligemma::Token<'_>| t.index + 1 < prompts[t.prompt].max_tokens && !self.cancelled();
                match model.answer_batch(&emb, &tasks, &opts, &mut within_limit) {
                    Ok(answers) => answers.into_iter().map(Ok).collect(),
                    // One prompt spoiled the batch: answer them one by one to say which.
                    Err(_) => prompts
                        .iter()
                        .map(|p| {
                            let opts = AnswerOptions { max_tokens: p.max_tokens, ..opts.clone() };
                            model
                                .answer_batch(&emb, std::slice::from_ref(&p.task), &opts, &mut |_| !self.cancelled())
                                .map(|mut a| a.remove(0))
                                .map_err(|e| e.to_string())
                        })
                        .collect(),
                }
            }
        };
        if self.cancelled() {
            return Vec::new();
        }
        let total_ms = started.elapsed().as_secs_f64() * 1e3 + queue_ms;
        let mut out = Vec::new();
        for (prompt, outcome) in prompts.iter().zip(outcomes) {
            let mut msg = self.message(frame, prompt, queue_ms);
            match outcome {
                Ok(answer) => {
                    let g = &answer.generation;
                    let t = &g.timings;
                    msg.raw = g.text.clone();
                    msg.tokens = TokenCounts { prompt: g.prompt_tokens, generated: g.tokens.len() };
                    msg.mean_logprob = g.mean_logprob();
                    // Preprocessing and vision are shared by the frame's prompts, and so
                    // is the batched decode.
                    msg.latency_ms =
                        Latency { queue: queue_ms, preprocess: t.preprocess, vision: t.vision, prefill: t.prefill, decode: t.decode, total: total_ms };
                    msg.result = answer.result;
                }
                Err(message) => {
                    msg.result = TaskResult::Error { message };
                    msg.latency_ms.total = total_ms;
                }
            }
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            msg.frames_dropped = std::mem::take(&mut state.sampler.dropped);
            state.stats.results += 1;
            if msg.is_error() {
                state.stats.errors += 1;
            }
            state.stats.last_latency_ms = msg.latency_ms;
            if out.is_empty() {
                state.stats.frames_analysed += 1;
            }
            drop(state);
            out.push(msg);
        }
        out
    }

    fn message(&self, frame: &Frame, prompt: &StandingPrompt, queue_ms: f64) -> ResultMessage {
        ResultMessage {
            schema: SCHEMA.into(),
            source: self.config.source.clone(),
            frame: frame.info.clone(),
            prompt: PromptInfo { id: prompt.id.clone(), text: prompt.task.prompt(), task: prompt.task.kind() },
            model: self.info.clone(),
            result: TaskResult::Text { text: String::new() },
            raw: String::new(),
            tokens: TokenCounts::default(),
            mean_logprob: None,
            latency_ms: Latency { queue: queue_ms, ..Default::default() },
            frames_dropped: 0,
        }
    }
}
