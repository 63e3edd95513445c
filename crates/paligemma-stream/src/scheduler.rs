//! The engine's thread: serves every stream of a shared model from one loop.
//!
//! - **Jobs.** A job is one frame of one stream with the prompts to answer on it: an
//!   ask, a sync analysis, or the stream's due standing prompts on its newest frame.
//!   Asks and analyses of every stream go before standing work.
//! - **Fairness.** Work is taken round-robin: from the stream served longest ago that
//!   has some, and a stream has at most one standing frame in flight, so a busy camera
//!   cannot starve another.
//!   Per stream the newest frame wins and each prompt keeps its own rate
//!   ([`crate::prompts::Schedule`]).
//! - **Continuous batching.** Each prompt of a job becomes a sequence in a KV cache
//!   region of the model; every step decodes one token of every sequence in progress,
//!   whatever stream and prompt it belongs to, and sequences join (after their frame's
//!   vision pass and their prefill) and leave (at eos, their token limit or a flush) as
//!   they start and finish. Jobs admitted together share one vision graph for their
//!   frames and one prefill graph for their prompts.
//! - **Lanes.** With `EngineOptions::lanes` above 1, a thread per lane runs this loop
//!   on its own fork of the model (the same weights), taking jobs from the same streams
//!   in the same round-robin; each fork has its share of the sequences, so that the
//!   cameras spread over the lanes and their batches run at the same time. Each turn
//!   runs on the threads the lane takes for it (`crate::lanes`).
//! - **Containment.** A panic below the loop fails the work in progress with error
//!   results; the thread, and every stream it serves, goes on.
use crate::frame_sampler::Frame;
use crate::lanes::{Taken, ThreadShare};
use crate::message::{Latency, ModelInfo, PromptInfo, ResultMessage, SCHEMA, TokenCounts};
use crate::prompts::StandingPrompt;
use crate::shared::EngineShared;
use crate::shared::{AskOptions, Request, StreamShared, StreamState};
use crate::tracker::{Tracker, TrackerConfig};
use paligemma::{GenerateOptions, ImageEmbedding, Model, SequenceId, Start, TaskResult};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

/// Whom a job's results go to besides the stream's sink.
enum Reply {
    Standing,
    Analyse(SyncSender<Vec<ResultMessage>>),
    Ask(SyncSender<ResultMessage>, AskOptions),
}

/// One frame of one stream being answered.
struct Job {
    stream: Arc<StreamShared>,
    epoch: u64,
    reply: Reply,
    frame: Frame,
    prompts: Vec<StandingPrompt>,
    /// The engine's model, named in every message.
    model: ModelInfo,
    /// Frames of the stream dropped before this one (on every message of the frame).
    frames_dropped: u64,
    embedding: Option<ImageEmbedding>,
    /// Prompts not started yet (waiting for a free sequence).
    pending: VecDeque<usize>,
    /// Prompts being decoded.
    running: Vec<(usize, SequenceId)>,
    /// One message per prompt once answered (or failed).
    messages: Vec<Option<ResultMessage>>,
    started: Instant,
    queue_ms: f64,
}

impl Job {
    fn cancelled(&self) -> bool {
        self.stream.epoch() != self.epoch || self.ask().is_some_and(AskOptions::cancelled)
    }

    /// An ask's options (none for standing work).
    fn ask(&self) -> Option<&AskOptions> {
        match &self.reply {
            Reply::Ask(_, opts) => Some(opts),
            _ => None,
        }
    }

    fn done(&self) -> bool {
        self.pending.is_empty() && self.running.is_empty()
    }
}

/// One serving thread's part in the engine's CPU threads: none when it is the only
/// lane; else it takes threads turn by turn while it has jobs open.
struct Lane<'a> {
    share: Option<&'a ThreadShare>,
    busy: bool,
}

impl Drop for Lane<'_> {
    /// A serving thread that ends (or unwinds) has no jobs open any more.
    fn drop(&mut self) {
        self.set_busy(false);
    }
}

impl Lane<'_> {
    /// One of several lanes: new jobs are admitted only when none is open, so that the
    /// cameras spread over the lanes.
    fn whole_batches(&self) -> bool {
        self.share.is_some()
    }

    /// Tells the share whether this lane has jobs open.
    fn set_busy(&mut self, busy: bool) {
        if let Some(share) = self.share
            && busy != self.busy
        {
            share.set_busy(busy);
            self.busy = busy;
        }
    }

    /// Threads for this turn's graphs, set on the model (given back when dropped).
    fn take_threads(&self, model: &mut Model) -> Option<Taken<'_>> {
        let taken = self.share?.take();
        model.use_threads(taken.threads);
        Some(taken)
    }
}

/// Serves the engine's streams until the engine is dropped, as one of its lanes.
pub(crate) fn serve(mut model: Model, engine: &EngineShared) {
    let mut jobs: Vec<Job> = Vec::new();
    let mut seen_wakes = 0;
    let mut lane = Lane {
        share: engine.threads.as_ref(),
        busy: false,
    };
    loop {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            turn(&mut model, &mut lane, engine, &mut jobs, &mut seen_wakes)
        }));
        match outcome {
            Ok(true) => {}
            Ok(false) => break,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!("the engine panicked: {why}");
                for job in &mut jobs {
                    let error = format!("internal error in the engine: {why}");
                    fail_rest(job, &error);
                }
                for i in 0..model.max_sequences() {
                    model.finish(SequenceId(i));
                }
            }
        }
        if jobs.iter().all(|j| j.done() || j.cancelled()) {
            lane.set_busy(false);
        }
        // A stream whose standing frame is done here may have been passed over by the
        // other lanes meanwhile: they look at it again.
        if deliver_done(&mut model, &mut jobs) {
            engine.wake();
        }
    }
    // Stopping: nothing more is delivered, but waiting callers are released.
    for job in jobs {
        finish_job(job, false);
    }
}

/// One turn of the loop: admit work while sequences are free, then one decode step.
/// False when the engine stops. `seen_wakes`: the engine's wake count when this lane
/// last looked for work.
fn turn(
    model: &mut Model,
    lane: &mut Lane<'_>,
    engine: &EngineShared,
    jobs: &mut Vec<Job>,
    seen_wakes: &mut u64,
) -> bool {
    // Admission: new jobs while their prompts (after those of the jobs already open)
    // find free sequences; their frames go through the vision tower together, then every
    // prompt that has a sequence is prefilled together. Cameras that sent frames at
    // the same time are thus served by one vision pass and one prefill, not one each.
    let first_new = jobs.len();
    loop {
        let waiting: usize = jobs.iter().map(|j| j.pending.len()).sum();
        let room = model.free_sequences().saturating_sub(waiting);
        if room == 0 || (lane.whole_batches() && first_new > 0) {
            break;
        }
        match next_job(engine, room, model.max_sequences(), seen_wakes) {
            // In the list before any engine call: whatever happens to it (even a
            // panic) it is delivered, and its stream's `in_flight` goes back down.
            Next::Job(job) => jobs.push(*job),
            Next::Stop => return false,
            Next::Wait(timeout) => {
                if jobs
                    .iter()
                    .any(|j| !j.running.is_empty() || !j.pending.is_empty() || j.done())
                {
                    break;
                }
                let state = engine.lock();
                if state.stop {
                    return false;
                }
                if state.wakes != *seen_wakes {
                    return true;
                }
                // Woken by a new frame, request or prompt change of any stream.
                let _unused = match timeout {
                    Some(t) => {
                        engine
                            .wake
                            .wait_timeout(state, t)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                    None => engine.wake.wait(state).unwrap_or_else(|e| e.into_inner()),
                };
                return true;
            }
        }
    }
    if jobs.is_empty() {
        return true;
    }
    lane.set_busy(true);
    let _threads = lane.take_threads(model);
    prepare(model, &mut jobs[first_new..]);
    start_pending(model, jobs);
    if jobs.iter().all(|j| j.running.is_empty()) {
        return true;
    }
    // One decode step for every sequence in progress. Each stops at its prompt's limit
    // or when its stream is flushed or stopped.
    let step = model.step(&mut |seq, token| {
        jobs.iter()
            .find_map(|j| j.running.iter().find(|r| r.1 == seq).map(|&(p, _)| (j, p)))
            .is_some_and(|(job, p)| {
                if let Some(on_text) = job.ask().and_then(|o| o.on_text.as_ref()) {
                    on_text(token.text);
                }
                token.index + 1 < job.prompts[p].max_tokens && !job.cancelled()
            })
    });
    let failed = step.err().map(|e| e.to_string());
    if let Some(e) = &failed {
        tracing::warn!("a decode step failed: {e}");
    }
    for job in jobs.iter_mut() {
        collect_finished(model, job, failed.as_deref());
    }
    true
}

enum Next {
    Job(Box<Job>),
    /// Nothing to do now; look again after this long (none: when woken).
    Wait(Option<Duration>),
    Stop,
}

/// The next job, from the streams in the order they were last served (longest ago
/// first): the oldest request of any, else the due standing prompts on the newest
/// frame of the first that has one and nothing standing in flight. That stream waits,
/// and no other goes before it, until its prompts fit in the `room` sequences free (or
/// the model's whole `sequences` are free): a frame is not taken to wait half-started,
/// and a stream of many prompts is not overtaken for ever by streams of few.
fn next_job(engine: &EngineShared, room: usize, sequences: usize, seen_wakes: &mut u64) -> Next {
    let state = engine.lock();
    if state.stop {
        return Next::Stop;
    }
    *seen_wakes = state.wakes;
    if state.streams.is_empty() {
        return Next::Wait(None);
    }
    let streams = state.streams.clone();
    drop(state);
    let mut order: Vec<(u64, Arc<StreamShared>)> = streams
        .into_iter()
        .map(|s| (s.lock().last_served, s.clone()))
        .collect();
    order.sort_by_key(|(served, _)| *served);
    let order: Vec<Arc<StreamShared>> = order.into_iter().map(|(_, s)| s).collect();
    let served = || engine.jobs_started.fetch_add(1, Ordering::Relaxed) + 1;
    for stream in &order {
        let mut st = stream.lock();
        if st.closed {
            continue;
        }
        if let Some(request) = st.requests.pop_front() {
            st.in_flight += 1;
            st.last_served = served();
            let epoch = stream.epoch();
            drop(st);
            let (frame, prompts, reply) = match request {
                Request::Analyse(frame, tx) => {
                    let prompts = stream.lock().prompts.prompts.clone();
                    (frame, prompts, Reply::Analyse(tx))
                }
                Request::Ask(frame, prompt, opts, tx) => {
                    (frame, vec![prompt], Reply::Ask(tx, opts))
                }
            };
            return Next::Job(Box::new(Job::new(
                stream.clone(),
                epoch,
                reply,
                frame,
                prompts,
                0,
                engine.info.clone(),
            )));
        }
    }
    let now = Instant::now();
    let mut wait: Option<Duration> = None;
    for stream in &order {
        let mut st = stream.lock();
        if st.closed || st.standing {
            continue;
        }
        match st.sampler.wait_time(now) {
            Some(w) if w.is_zero() && st.prompts.prompts.len() > room && room < sequences => {
                return Next::Wait(None);
            }
            Some(w) if w.is_zero() => {
                let frame = st.sampler.take(now);
                let due: Vec<StandingPrompt> = match &frame {
                    Some(_) => {
                        st.taken += 1;
                        let (taken, st) = (st.taken, &mut *st);
                        st.schedule
                            .due(&st.prompts, taken, now)
                            .into_iter()
                            .cloned()
                            .collect()
                    }
                    None => Vec::new(),
                };
                let (Some(frame), false) = (frame, due.is_empty()) else {
                    // Skipped (unchanged, or nothing due): a drain may be waiting for it.
                    drop(st);
                    stream.delivered.notify_all();
                    continue;
                };
                let dropped = std::mem::take(&mut st.sampler.dropped);
                st.in_flight += 1;
                st.standing = true;
                st.last_served = served();
                let epoch = stream.epoch();
                drop(st);
                return Next::Job(Box::new(Job::new(
                    stream.clone(),
                    epoch,
                    Reply::Standing,
                    frame,
                    due,
                    dropped,
                    engine.info.clone(),
                )));
            }
            Some(w) => wait = Some(wait.map_or(w, |v: Duration| v.min(w))),
            None => {}
        }
    }
    Next::Wait(wait)
}

impl Job {
    fn new(
        stream: Arc<StreamShared>,
        epoch: u64,
        reply: Reply,
        frame: Frame,
        prompts: Vec<StandingPrompt>,
        frames_dropped: u64,
        model: ModelInfo,
    ) -> Job {
        let queue_ms = frame.received.elapsed().as_secs_f64() * 1e3;
        let n = prompts.len();
        Job {
            stream,
            epoch,
            reply,
            frame,
            prompts,
            frames_dropped,
            model,
            embedding: None,
            pending: (0..n).collect(),
            running: Vec::new(),
            messages: vec![None; n],
            started: Instant::now(),
            queue_ms,
        }
    }

    /// The message for prompt `p`, before its result is known.
    fn message(&self, p: usize) -> ResultMessage {
        let prompt = &self.prompts[p];
        ResultMessage {
            schema: SCHEMA.into(),
            source: self.stream.config.source.clone(),
            frame: self.frame.info.clone(),
            prompt: PromptInfo {
                id: prompt.id.clone(),
                text: prompt.task.prompt(),
                task: prompt.task.kind(),
            },
            model: self.model.clone(),
            result: TaskResult::Text {
                text: String::new(),
            },
            raw: String::new(),
            tokens: TokenCounts::default(),
            mean_logprob: None,
            latency_ms: Latency {
                queue: self.queue_ms,
                ..Default::default()
            },
            frames_dropped: self.frames_dropped,
        }
    }

    /// Fails prompt `p` with `message`.
    fn fail(&mut self, p: usize, error: &str) {
        let mut msg = self.message(p);
        msg.result = TaskResult::Error {
            message: error.to_string(),
        };
        self.messages[p] = Some(msg);
    }
}

/// Runs the new jobs' frames through the vision tower (once for all the prompts of
/// each), together. A frame that cannot be encoded fails its own job only.
fn prepare(model: &mut Model, jobs: &mut [Job]) {
    let mut todo: Vec<&mut Job> = Vec::new();
    for job in jobs {
        if job.cancelled() {
            job.pending.clear();
        } else if job.embedding.is_none() && !job.pending.is_empty() {
            todo.push(job);
        }
    }
    let encoded = match todo.as_slice() {
        [] => return,
        [_, _, ..] => model
            .encode_images(&todo.iter().map(|j| &*j.frame.image).collect::<Vec<_>>())
            .ok(),
        [_] => None,
    };
    match encoded {
        Some(embeddings) => todo
            .into_iter()
            .zip(embeddings)
            .for_each(|(job, e)| job.embedding = Some(e)),
        None => {
            for job in todo {
                match model.encode_image(&job.frame.image) {
                    Ok(embedding) => job.embedding = Some(embedding),
                    Err(e) => fail_rest(job, &e.to_string()),
                }
            }
        }
    }
}

/// A prompt to start: its job, its index in the job, its prefix ids and options.
type Picked = (usize, usize, Vec<u32>, GenerateOptions);

/// Starts the pending prompts of the jobs, oldest job first, in the free sequences,
/// prefilled together. A prompt that cannot start fails on its own.
fn start_pending(model: &mut Model, jobs: &mut [Job]) {
    let mut free = model.free_sequences();
    let mut picked: Vec<Picked> = Vec::new();
    for (j, job) in jobs.iter_mut().enumerate() {
        if job.cancelled() || job.embedding.is_none() {
            job.pending.clear();
            continue;
        }
        while free > 0
            && let Some(p) = job.pending.pop_front()
        {
            let prompt = &job.prompts[p];
            match model.tokenizer().prefix_ids(&prompt.task.prompt()) {
                Ok(ids) => {
                    picked.push((
                        j,
                        p,
                        ids,
                        GenerateOptions {
                            max_tokens: prompt.max_tokens,
                            sampling: job.ask().map(|o| o.sampling.clone()).unwrap_or_default(),
                            ..Default::default()
                        },
                    ));
                    free -= 1;
                }
                Err(e) => job.fail(p, &e.to_string()),
            }
        }
    }
    let start = |model: &mut Model, jobs: &[Job], picked: &[Picked]| {
        let starts: Vec<Start<'_>> = picked
            .iter()
            .map(|(j, _, ids, opts)| Start {
                image: jobs[*j].embedding.as_ref().expect("encoded above"),
                prefix: ids,
                opts,
            })
            .collect();
        model.start_batch(&starts)
    };
    let started = match picked.len() {
        0 => return,
        1 => None,
        _ => start(model, jobs, &picked).ok(),
    };
    match started {
        Some(seqs) => picked
            .iter()
            .zip(seqs)
            .for_each(|((j, p, ..), seq)| jobs[*j].running.push((*p, seq))),
        // Alone, each with its own error.
        None => {
            for one in picked.chunks(1) {
                let (j, p) = (one[0].0, one[0].1);
                match start(model, jobs, one) {
                    Ok(seq) => jobs[j].running.push((p, seq[0])),
                    Err(e) => jobs[j].fail(p, &e.to_string()),
                }
            }
        }
    }
}

/// Fails every prompt of the job not answered yet.
fn fail_rest(job: &mut Job, error: &str) {
    let rest: Vec<usize> = job
        .pending
        .drain(..)
        .chain(job.running.drain(..).map(|(p, _)| p))
        .collect();
    for p in rest {
        job.fail(p, error);
    }
}

/// Turns the job's finished sequences into messages (all of them, with `failed`).
fn collect_finished(model: &mut Model, job: &mut Job, failed: Option<&str>) {
    let running = std::mem::take(&mut job.running);
    for (p, seq) in running {
        if !model.is_finished(seq) && failed.is_none() {
            job.running.push((p, seq));
            continue;
        }
        let Some(generation) = model.finish(seq) else {
            continue;
        };
        if let Some(error) = failed {
            job.fail(p, error);
            continue;
        }
        let embedding = job
            .embedding
            .as_ref()
            .expect("a running prompt has its frame encoded");
        let prompt = &job.prompts[p];
        let filter = prompt.filter(&job.stream.config.filter);
        match model.task_result(
            embedding,
            &prompt.task,
            &generation,
            job.stream.config.loc_divisor,
            &filter,
        ) {
            Ok(result) => {
                let t = &generation.timings;
                let mut msg = job.message(p);
                msg.raw = generation.text.clone();
                msg.tokens = TokenCounts {
                    prompt: generation.prompt_tokens,
                    generated: generation.tokens.len(),
                };
                msg.mean_logprob = generation.mean_logprob();
                let total = job.started.elapsed().as_secs_f64() * 1e3 + job.queue_ms;
                msg.latency_ms = Latency {
                    queue: job.queue_ms,
                    preprocess: t.preprocess,
                    vision: t.vision,
                    prefill: t.prefill,
                    decode: t.decode,
                    total,
                };
                msg.result = result;
                job.messages[p] = Some(msg);
            }
            Err(e) => job.fail(p, &e.to_string()),
        }
    }
}

/// Delivers every finished job: to the stream's sink and any waiting caller. True when
/// one was standing work (its stream can have its next frame taken now).
fn deliver_done(model: &mut Model, jobs: &mut Vec<Job>) -> bool {
    let mut standing = false;
    let mut i = 0;
    while i < jobs.len() {
        let job = &mut jobs[i];
        if job.cancelled() {
            // Abandoned: its sequences end now and nothing is delivered.
            for (_, seq) in job.running.drain(..) {
                model.finish(seq);
            }
            job.pending.clear();
        }
        if jobs[i].done() {
            let mut job = jobs.swap_remove(i);
            let cancelled = job.cancelled();
            // Failed prompts have no latency of their own yet: the job's, to now.
            for msg in job.messages.iter_mut().flatten() {
                if msg.latency_ms.total == 0.0 {
                    msg.latency_ms.total = job.started.elapsed().as_secs_f64() * 1e3 + job.queue_ms;
                }
            }
            standing |= finish_job(job, !cancelled);
        } else {
            i += 1;
        }
    }
    standing
}

/// Gives the detections of standing answers their track ids, one tracker per prompt id
/// (asks are one-off questions and are not tracked); trackers of prompts that are no
/// longer standing are dropped.
fn track(st: &mut StreamState, config: &TrackerConfig, messages: &mut [ResultMessage]) {
    let StreamState {
        trackers, prompts, ..
    } = st;
    trackers.retain(|id, _| prompts.prompts.iter().any(|p| &p.id == id));
    for msg in messages {
        let time = msg.frame.time_s();
        if let TaskResult::Detections { detections, .. }
        | TaskResult::Segmentation { detections, .. } = &mut msg.result
        {
            trackers
                .entry(msg.prompt.id.clone())
                .or_insert_with(|| Tracker::new(config.clone()))
                .update(detections, time);
        }
    }
}

/// Ends a job: counts and delivers its messages (unless abandoned) and releases the
/// stream's waiters. True for standing work.
fn finish_job(job: Job, deliver: bool) -> bool {
    let Job {
        stream,
        reply,
        messages,
        ..
    } = job;
    let standing = matches!(reply, Reply::Standing);
    let mut messages: Vec<ResultMessage> = if deliver {
        messages.into_iter().flatten().collect()
    } else {
        Vec::new()
    };
    {
        let mut st = stream.lock();
        if !matches!(reply, Reply::Ask(..)) && stream.config.tracking.enabled {
            track(&mut st, &stream.config.tracking, &mut messages);
        }
        for msg in &messages {
            st.stats.results += 1;
            if msg.is_error() {
                st.stats.errors += 1;
            }
            st.stats.detections += msg.result.detections().len() as u64;
            let dropped = msg.result.dropped();
            st.stats.detections_dropped.below_min_score += dropped.below_min_score;
            st.stats.detections_dropped.duplicates += dropped.duplicates;
            st.stats.last_latency_ms = msg.latency_ms;
        }
        if !matches!(reply, Reply::Ask(..)) && !messages.is_empty() {
            st.stats.frames_analysed += 1;
        }
    }
    for msg in &messages {
        stream.deliver(msg);
    }
    match reply {
        Reply::Standing => {}
        Reply::Analyse(tx) => {
            let _ = tx.send(messages);
        }
        Reply::Ask(tx, _) => {
            if let Some(msg) = messages.into_iter().next() {
                let _ = tx.send(msg);
            }
        }
    }
    {
        let mut st = stream.lock();
        st.in_flight -= 1;
        st.standing &= !standing;
    }
    stream.delivered.notify_all();
    standing
}
