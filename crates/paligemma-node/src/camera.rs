//! One camera of the node: a stream on the shared engine, and one small task per
//! Zenoh key, each its own loop as in zenoh's examples: frames in (a `zenoh_key`
//! camera), asks, prompt updates, the prompt list, status. Results and errors go out
//! through the [`Publisher`].
use crate::config::{CameraConfig, Config, Encoding};
use crate::refusals::{RefusalKind, Refusals, Report};
use crate::ros2::Ros2;
use crate::source::{self, Backoff, Health, Transition};
use crate::state::PromptState;
use crate::{frames, limiter::RateLimiter};
use anyhow::{Context, Result};
use paligemma_ros2::images::{self, ImageKind};
use paligemma_ros2::msgs::Header;
use paligemma_serve::metrics::Metrics;
use paligemma_stream::message::{FrameInfo, STATUS_SCHEMA, Source, StatusMessage};
use paligemma_stream::{
    Engine, Frame, FrameSamplerConfig, ResultMessage, Stream, StreamConfig, StreamStats, payload,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use zenoh::Wait;

/// One attempt of a supervised task.
type Attempt = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

fn encode<T: serde::Serialize>(encoding: Encoding, value: &T) -> (Vec<u8>, zenoh::bytes::Encoding) {
    match encoding {
        Encoding::Json => (
            serde_json::to_vec(value).unwrap_or_default(),
            zenoh::bytes::Encoding::APPLICATION_JSON,
        ),
        Encoding::Cbor => {
            let mut out = Vec::new();
            let _ = ciborium::into_writer(value, &mut out);
            (out, zenoh::bytes::Encoding::APPLICATION_CBOR)
        }
    }
}

/// An error report on `<prefix>/<camera>/errors`. Reports of refused input carry their
/// kind and how many refusals they account for (a window's summary: all it suppressed);
/// reports of a frame source's change carry kind `source`, its new state and restarts.
#[derive(Default, serde::Serialize)]
struct ErrorDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusals: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    suppressed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<paligemma_stream::message::SourceState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restarts: Option<u64>,
}

#[derive(serde::Serialize)]
struct ErrorMessage<'a> {
    schema: &'static str,
    source: &'a Source,
    message: String,
    #[serde(flatten)]
    details: ErrorDetails,
}

/// Everything a camera needs to publish.
#[derive(Clone)]
pub struct Publisher {
    session: zenoh::Session,
    /// `<prefix>/<camera>`.
    base: String,
    source: Source,
    encoding: Encoding,
    /// Errors reported outside the engine (restarted tasks, a failing frame source,
    /// results that could not go to ROS 2), counted in status beside the stream's own.
    errors: Arc<AtomicU64>,
    /// Refused input, reported under the refusal policy and counted by kind.
    refusals: Arc<Refusals>,
}

impl Publisher {
    fn put<T: serde::Serialize>(&self, key: &str, value: &T) {
        let (bytes, enc) = encode(self.encoding, value);
        if let Err(e) = self.session.put(key, bytes).encoding(enc).wait() {
            tracing::warn!("put {key}: {e}");
        }
    }

    fn result(&self, msg: &ResultMessage) {
        let key = self.key(if msg.is_error() {
            "errors"
        } else {
            &msg.prompt.id
        });
        self.put(&key, msg);
    }

    fn error(&self, message: String) {
        tracing::warn!("{}: {message}", self.base);
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.put_error(message, ErrorDetails::default());
    }

    /// Publishes on `<camera>/errors` (the caller logs).
    fn put_error(&self, message: String, details: ErrorDetails) {
        self.put(
            &self.key("errors"),
            &ErrorMessage {
                schema: "paligemma.error/1",
                source: &self.source,
                message,
                details,
            },
        );
    }

    /// Logs and publishes a change of the frame source's state.
    fn source_event(&self, t: &Transition) {
        let message = t.message();
        if t.to == paligemma_stream::message::SourceState::Streaming {
            tracing::info!("{}: {message}", self.base);
        } else {
            tracing::warn!("{}: {message}", self.base);
        }
        self.put_error(
            message,
            ErrorDetails {
                kind: Some("source"),
                state: Some(t.to),
                restarts: Some(t.restarts),
                ..Default::default()
            },
        );
    }

    /// Counts refused input from `source` and reports it if the refusal policy says so.
    fn refuse(&self, kind: RefusalKind, source: &str, message: String) {
        if let Some(report) = self.refusals.refuse(kind, source, Instant::now(), message) {
            self.report(report);
        }
    }

    /// Logs and publishes a report of refused input.
    fn report(&self, report: Report) {
        tracing::warn!("{}: {}", self.base, report.message);
        let details = ErrorDetails {
            kind: Some(report.kind.name()),
            refusals: Some(report.refusals),
            suppressed: Some(report.suppressed),
            ..Default::default()
        };
        self.put_error(report.message, details);
    }

    fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.base)
    }
}

/// A running camera: its stream, its frame source and its tasks.
pub struct Camera {
    pub name: String,
    pub worker: Arc<Stream>,
    /// Its tasks, the frame source's supervisor among them.
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    pub health: CameraHealth,
    _token: zenoh::liveliness::LivelinessToken,
    /// The ROS 2 subscription's token, for a camera that reads a ROS 2 topic.
    _ros2_subscription: Option<zenoh::liveliness::LivelinessToken>,
}

/// A camera as the node's diagnostics read it: its counters and its source's state.
#[derive(Clone)]
pub struct CameraHealth {
    pub name: String,
    ctx: Ctx,
}

impl CameraHealth {
    /// The counters status shows (the stream's and the node's own).
    pub fn counters(&self) -> StreamStats {
        self.ctx.counters().0
    }

    pub fn source(&self) -> paligemma_stream::message::SourceStatus {
        self.ctx.health.status()
    }

    /// The KV caches of the engine the camera runs on.
    pub fn kv_cache_bytes(&self) -> usize {
        self.ctx.worker.engine().kv_cache_bytes()
    }
}

impl Camera {
    /// Stops the camera: its tasks (the frame source with them), then its stream,
    /// finishing the work in flight (at most 30 s) or cancelling it; its liveliness
    /// tokens go with it.
    pub async fn stop(self, finish: bool) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        let worker = self.worker.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if finish {
                worker.drain(Duration::from_secs(30));
            }
            worker.stop();
        })
        .await;
        tracing::info!("camera {} stopped", self.name);
    }
}

/// What every task of a camera shares.
#[derive(Clone)]
struct Ctx {
    worker: Arc<Stream>,
    publisher: Publisher,
    /// Sequence numbers of the camera's frames.
    seq: Arc<AtomicU64>,
    /// The frame source's state.
    health: Arc<Health>,
}

/// The node's persisted prompts, when it takes prompt updates, and why its state file
/// was ignored, if it was (reported on every camera's errors key).
pub struct Persisted {
    pub state: Arc<PromptState>,
    pub error: Option<String>,
}

impl Ctx {
    /// Hands a frame to the stream (the newest wins; asks read it too), stamped with
    /// its capture time when the source gives one, else with now.
    fn deliver(
        &self,
        image: paligemma::preprocess::RgbImage,
        pts_ns: Option<u64>,
        source: Option<Header>,
    ) {
        self.health.frame();
        let capture = source
            .as_ref()
            .and_then(|h| h.stamp.to_unix_ns())
            .filter(|&ns| ns > 0);
        let info = FrameInfo {
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            pts_ns,
            capture_unix_ns: capture.or_else(paligemma_stream::message::unix_time_ns),
            frame_id: source.map(|h| h.frame_id).filter(|f| !f.is_empty()),
            width: image.width,
            height: image.height,
            ..Default::default()
        };
        self.worker.submit(Frame::new(info, image));
    }
}

/// Runs one of a camera's tasks and keeps it running: a task that fails or panics is
/// reported on `<camera>/errors`, counted in status and started again (a subscriber
/// dropped with it is declared anew), so that one hostile message cannot silence a
/// camera. It ends when the task returns `Ok` (the session closed) or is aborted.
fn supervise<F, Fut>(
    publisher: Publisher,
    what: &'static str,
    task: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    /// Aborts the running attempt when the supervisor itself is aborted.
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    tokio::spawn(async move {
        loop {
            let attempt = tokio::spawn(task());
            let _guard = AbortOnDrop(attempt.abort_handle());
            match attempt.await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => publisher.error(format!("{what} failed, restarting it: {e:#}")),
                Err(e) if e.is_panic() => {
                    let payload = e.into_panic();
                    let why = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    publisher.error(format!("{what} panicked, restarting it: {why}"));
                }
                Err(_) => return,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Frames published on a `zenoh_key`: decoded (bounded by `max_pixels`) and handed on;
/// a bad one is reported and the next one is read.
async fn frames_in(ctx: Ctx, key: String, max_pixels: usize) -> Result<()> {
    let session = &ctx.publisher.session;
    let sub = session
        .declare_subscriber(key.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("subscribe {key}: {e}"))?;
    while let Ok(sample) = sub.recv_async().await {
        let payload = sample.payload().to_bytes();
        let attachment = sample.attachment().map(|a| a.to_bytes());
        match payload::decode_frame(&payload, attachment.as_deref(), max_pixels) {
            Ok(img) => ctx.deliver(img, None, None),
            Err(e) => ctx.publisher.refuse(
                RefusalKind::Frame,
                sample.key_expr().as_str(),
                format!("frame refused: {e:#}"),
            ),
        }
    }
    Ok(())
}

/// Images on a ROS 2 topic (`key` is its `rmw_zenoh` key): decoded, bounded by
/// `max_pixels`, stamped with their header; a bad one is reported and the next read.
async fn frames_from_ros2(ctx: Ctx, key: String, kind: ImageKind, max_pixels: usize) -> Result<()> {
    let sub = ctx
        .publisher
        .session
        .declare_subscriber(key.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("subscribe {key}: {e}"))?;
    while let Ok(sample) = sub.recv_async().await {
        match images::decode(kind, &sample.payload().to_bytes(), max_pixels) {
            Ok((img, header)) => ctx.deliver(img, None, Some(header)),
            Err(e) => ctx.publisher.refuse(
                RefusalKind::Ros2Image,
                sample.key_expr().as_str(),
                format!("ROS 2 image refused: {e:#}"),
            ),
        }
    }
    Ok(())
}

/// Limits of the `ask` queryable.
#[derive(Clone)]
struct AskLimits {
    rate: Arc<RateLimiter>,
    timeout: Duration,
    max_bytes: usize,
}

/// `<camera>/ask`: a prompt answered on the newest frame, each in a task of its own,
/// within the node's ask rate.
async fn asks(ctx: Ctx, limits: AskLimits) -> Result<()> {
    let key = ctx.publisher.key("ask");
    let queryable = ctx
        .publisher
        .session
        .declare_queryable(key.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("queryable {key}: {e}"))?;
    while let Ok(query) = queryable.recv_async().await {
        const BUSY: &str =
            "busy: this node answers at most ask_rate asks per second; try again later";
        if !limits.rate.try_take() {
            ctx.publisher
                .refuse(RefusalKind::AskRate, &key, format!("ask refused, {BUSY}"));
            let _ = query.reply_err(BUSY).await;
            continue;
        }
        let prompt = match payload::parse_ask(
            &query.payload().map(|p| p.to_bytes()).unwrap_or_default(),
            limits.max_bytes,
        ) {
            Ok(prompt) => prompt,
            Err(e) => {
                ctx.publisher
                    .refuse(RefusalKind::Ask, &key, format!("ask refused: {e:#}"));
                let _ = query.reply_err(format!("{e:#}")).await;
                continue;
            }
        };
        let (ctx, limits) = (ctx.clone(), limits.clone());
        tokio::spawn(async move {
            let outcome = async {
                let frame = ctx.worker.newest().context("no frame has arrived yet")?;
                let worker = ctx.worker.clone();
                // A panic in the engine comes back as an error here and is the reply.
                let msg =
                    tokio::task::spawn_blocking(move || worker.ask(frame, prompt, limits.timeout))
                        .await??;
                Ok::<_, anyhow::Error>(msg)
            }
            .await;
            let sent = match outcome {
                Ok(msg) => {
                    let (bytes, e) = encode(ctx.publisher.encoding, &msg);
                    query
                        .reply(query.key_expr().clone(), bytes)
                        .encoding(e)
                        .await
                }
                Err(e) => query.reply_err(format!("{e:#}")).await,
            };
            if let Err(e) = sent {
                tracing::warn!("ask reply: {e}");
            }
        });
    }
    Ok(())
}

/// Puts on `<camera>/prompts`: a new list of standing prompts, taken only when the
/// node allows updates (and then saved in its state file, if it has one); anything else
/// is reported and the current prompts stay.
async fn prompt_updates(
    ctx: Ctx,
    allowed: bool,
    camera: String,
    state: Option<Arc<PromptState>>,
) -> Result<()> {
    let key = ctx.publisher.key("prompts");
    let sub = ctx
        .publisher
        .session
        .declare_subscriber(key.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("subscribe {key}: {e}"))?;
    while let Ok(sample) = sub.recv_async().await {
        if sample.kind() != zenoh::sample::SampleKind::Put {
            continue;
        }
        if !allowed {
            let why = "prompts update refused: this node does not take prompt updates (allow_prompt_updates = false)";
            ctx.publisher
                .refuse(RefusalKind::PromptUpdate, &key, why.into());
            continue;
        }
        match payload::parse_prompts(&sample.payload().to_bytes()) {
            Ok(set) => {
                tracing::info!(
                    "{key}: new standing prompts {:?}",
                    set.prompts.iter().map(|p| &p.id).collect::<Vec<_>>()
                );
                ctx.worker.set_prompts(set.clone());
                let Some(state) = state.clone() else { continue };
                let camera = camera.clone();
                match tokio::task::spawn_blocking(move || state.save(&camera, &set)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => ctx
                        .publisher
                        .error(format!("the new prompts are in force but not saved: {e:#}")),
                    Err(e) => ctx
                        .publisher
                        .error(format!("the new prompts are in force but not saved: {e}")),
                }
            }
            Err(e) => ctx.publisher.refuse(
                RefusalKind::PromptUpdate,
                &key,
                format!("prompts update refused, keeping the current ones: {e:#}"),
            ),
        }
    }
    Ok(())
}

/// Gets on `<camera>/prompts`: the standing prompts in force.
async fn prompt_list(ctx: Ctx) -> Result<()> {
    let key = ctx.publisher.key("prompts");
    let queryable = ctx
        .publisher
        .session
        .declare_queryable(key.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("queryable {key}: {e}"))?;
    while let Ok(query) = queryable.recv_async().await {
        let body = serde_json::to_vec(&ctx.worker.prompts()).unwrap_or_default();
        let _ = query
            .reply(query.key_expr().clone(), body)
            .encoding(zenoh::bytes::Encoding::APPLICATION_JSON)
            .await;
    }
    Ok(())
}

impl Ctx {
    /// The stream's counters with the node's own: its errors and refused input count
    /// as errors too, refused asks as refused requests; the refusals by kind beside.
    fn counters(&self) -> (StreamStats, std::collections::BTreeMap<&'static str, u64>) {
        let mut stats = self.worker.stats();
        let refusals = self.publisher.refusals.counts();
        let count = |kinds: &[RefusalKind]| {
            kinds
                .iter()
                .map(|k| refusals.get(k.name()).copied().unwrap_or(0))
                .sum::<u64>()
        };
        stats.errors += self.publisher.errors.load(Ordering::Relaxed)
            + count(&[
                RefusalKind::Frame,
                RefusalKind::Ros2Image,
                RefusalKind::PromptUpdate,
            ]);
        stats.requests_refused += count(&[RefusalKind::AskRate, RefusalKind::Ask]);
        (stats, refusals)
    }
}

/// `<camera>/status` every `period`: the stream's counters with the node's own.
async fn status(ctx: Ctx, period: Duration, model: String, device: String) -> Result<()> {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let (stats, refusals) = ctx.counters();
        let p = &ctx.publisher;
        p.put(
            &p.key("status"),
            &StatusMessage {
                schema: STATUS_SCHEMA,
                source: p.source.clone(),
                model: model.clone(),
                device: device.clone(),
                stats,
                refusals,
                source_state: Some(ctx.health.status()),
            },
        );
    }
}

/// Reports of refused input that are due (see [`Refusals::due`]), a few times a second.
async fn refusal_summaries(publisher: Publisher) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        for report in publisher.refusals.due(Instant::now()) {
            publisher.report(report);
        }
    }
}

/// The cameras running now, as the diagnostics and metrics read them.
pub type Running = Arc<std::sync::Mutex<Vec<CameraHealth>>>;

/// What every camera of the node shares; starts and stops them.
#[derive(Clone)]
pub struct Node {
    pub cfg: Arc<Config>,
    pub session: zenoh::Session,
    /// One budget of asks for the whole node, whatever camera they are for.
    pub asks: Arc<RateLimiter>,
    pub ros2: Option<Arc<Ros2>>,
    pub persisted: Option<Arc<Persisted>>,
    pub metrics: Option<Arc<Metrics>>,
    pub running: Running,
    /// The model, loaded once for the node's life: a pool member that serves no camera
    /// for a while keeps it, so that taking one over does not load it again.
    pub engine: Arc<Engine>,
}

impl Node {
    fn running(&self) -> std::sync::MutexGuard<'_, Vec<CameraHealth>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn start_camera(&self, cam: &CameraConfig) -> Result<Camera> {
        let camera = start(self, cam).await?;
        self.running().push(camera.health.clone());
        Ok(camera)
    }

    /// Stops a camera (see [`Camera::stop`]).
    pub async fn stop_camera(&self, camera: Camera, finish: bool) {
        self.running().retain(|c| c.name != camera.name);
        camera.stop(finish).await;
    }
}

/// Starts a camera: attaches a stream to the shared engine, starts its frame source
/// and one task per key, and declares its liveliness token.
async fn start(node: &Node, cam: &CameraConfig) -> Result<Camera> {
    let (cfg, session, ask_rate, ros2, metrics) = (
        &*node.cfg,
        &node.session,
        node.asks.clone(),
        node.ros2.clone(),
        node.metrics.clone(),
    );
    let persisted = node.persisted.as_deref();
    // In a pool, the pool's cameras are under the pool's prefix whoever serves them; a
    // node's own (local pipeline) cameras under its name, or the nodes' would collide.
    let base = match &cfg.pool {
        Some(_) if !crate::pool::is_shared(cam) => {
            format!("{}/{}/{}", cfg.prefix(), cfg.node, cam.name)
        }
        _ => format!("{}/{}", cfg.prefix(), cam.name),
    };
    let source = Source {
        node: cfg.node.clone(),
        camera: cam.name.clone(),
    };
    let publisher = Publisher {
        session: session.clone(),
        base: base.clone(),
        source: source.clone(),
        encoding: cfg.encoding,
        errors: Arc::default(),
        refusals: Arc::new(Refusals::new(
            Duration::from_secs_f64(cfg.refusal_window_s),
            cfg.errors_per_s,
        )),
    };
    let engine = node.engine.clone();
    tracing::info!(
        "camera {}: model {} on {} (an engine shared by {} stream(s))",
        cam.name,
        cfg.model.path.display(),
        engine.info().device,
        engine.streams() + 1
    );
    let config = StreamConfig {
        source,
        sampler: FrameSamplerConfig {
            min_interval: Duration::from_millis(cam.interval_ms),
            skip_unchanged_below: cam.skip_unchanged_below,
        },
        tracking: cam.tracking.clone(),
        ..Default::default()
    };
    let results_to_ros2 = ros2.clone();
    let sink = publisher.clone();
    let (camera, frame_id) = (
        cam.name.clone(),
        cam.frame_id.clone().unwrap_or_else(|| cam.name.clone()),
    );
    let deliver = move |m: &ResultMessage| {
        sink.result(m);
        if let Some(metrics) = &metrics {
            let endpoint = if m.prompt.id == paligemma_stream::prompts::ASK_ID {
                "ask"
            } else {
                "standing"
            };
            let status = if m.is_error() { "error" } else { "ok" };
            metrics.request(endpoint, &m.prompt.task.to_string(), status);
            metrics.answer(m);
        }
        // ROS 2 topics are per standing prompt; an ask's answer goes back to its asker.
        let standing = m.prompt.id != paligemma_stream::prompts::ASK_ID;
        if let Some(Err(e)) = results_to_ros2
            .as_ref()
            .filter(|_| standing)
            .map(|r| r.publish(&camera, &frame_id, m))
        {
            sink.error(format!("{e:#}"));
        }
    };
    if let Some(why) = persisted.and_then(|p| p.error.as_ref()) {
        publisher.error(why.clone());
    }
    let prompts = match persisted
        .and_then(|p| p.state.restored(&cam.name).map(|set| (set, p.state.path())))
    {
        Some((set, path)) => {
            let ids: Vec<_> = set.prompts.iter().map(|p| &p.id).collect();
            tracing::info!(
                "camera {}: standing prompts {ids:?} restored from {}",
                cam.name,
                path.display()
            );
            set
        }
        None => cam.prompt_set()?,
    };
    let worker = Arc::new(Stream::attach(engine, prompts, config, Box::new(deliver)));
    let events = publisher.clone();
    let health = Arc::new(Health::new(move |t: &Transition| events.source_event(t)));
    let ctx = Ctx {
        worker: worker.clone(),
        publisher: publisher.clone(),
        seq: Arc::default(),
        health: health.clone(),
    };

    let mut tasks = Vec::new();
    let mut spawn = |what: &'static str, task: Box<dyn Fn() -> Attempt + Send>| {
        tasks.push(supervise(publisher.clone(), what, task))
    };
    let ros2_source = match (&cam.ros2_image, &cam.ros2_compressed_image) {
        (Some(topic), _) => Some((topic, ImageKind::Raw)),
        (None, Some(topic)) => Some((topic, ImageKind::Compressed)),
        (None, None) => None,
    };
    let mut ros2_token = None;
    match (&cam.zenoh_key, ros2_source) {
        (Some(key), _) => {
            let (c, key, max_pixels) = (ctx.clone(), key.clone(), cfg.max_pixels);
            spawn(
                "the frame subscriber",
                Box::new(move || Box::pin(frames_in(c.clone(), key.clone(), max_pixels))),
            );
        }
        (None, Some((topic, kind))) => {
            let ros2 = ros2
                .as_ref()
                .context("a ROS 2 image topic needs [ros2] enabled")?;
            let (key, token) = ros2.subscription(topic, kind.ros_type())?;
            ros2_token = Some(token);
            let (c, max_pixels) = (ctx.clone(), cfg.max_pixels);
            spawn(
                "the ROS 2 image subscriber",
                Box::new(move || {
                    Box::pin(frames_from_ros2(c.clone(), key.clone(), kind, max_pixels))
                }),
            );
        }
        (None, None) => {
            frames::check(cam.pipeline.as_deref(), cam.uri.as_deref())
                .with_context(|| format!("camera {}", cam.name))?;
            let c = ctx.clone();
            let sink: frames::FrameSink = Arc::new(move |img, pts| c.deliver(img, pts, None));
            let (pipeline, uri, health) = (cam.pipeline.clone(), cam.uri.clone(), health.clone());
            let (first, most) = (
                Duration::from_millis(cam.restart_backoff_ms),
                Duration::from_millis(cam.restart_backoff_max_ms),
            );
            spawn(
                "the frame source",
                Box::new(move || {
                    Box::pin(source::run_gst(
                        pipeline.clone(),
                        uri.clone(),
                        health.clone(),
                        sink.clone(),
                        Backoff::new(first, most),
                    ))
                }),
            );
        }
    }
    let (h, stall_after) = (health.clone(), Duration::from_millis(cam.stall_after_ms));
    spawn(
        "the stall watch",
        Box::new(move || Box::pin(source::watch_stalls(h.clone(), stall_after))),
    );
    let limits = AskLimits {
        rate: ask_rate,
        timeout: Duration::from_millis(cfg.ask_timeout_ms),
        max_bytes: cfg.max_prompt_bytes,
    };
    let c = ctx.clone();
    spawn(
        "the ask queryable",
        Box::new(move || Box::pin(asks(c.clone(), limits.clone()))),
    );
    let (c, allowed, name, state) = (
        ctx.clone(),
        cfg.allow_prompt_updates,
        cam.name.clone(),
        persisted.map(|p| p.state.clone()),
    );
    spawn(
        "the prompts subscriber",
        Box::new(move || {
            Box::pin(prompt_updates(
                c.clone(),
                allowed,
                name.clone(),
                state.clone(),
            ))
        }),
    );
    let p = publisher.clone();
    spawn(
        "the refusal reporter",
        Box::new(move || Box::pin(refusal_summaries(p.clone()))),
    );
    let c = ctx.clone();
    spawn(
        "the prompts queryable",
        Box::new(move || Box::pin(prompt_list(c.clone()))),
    );
    if cfg.status_interval_s > 0.0 {
        let (c, period) = (ctx.clone(), Duration::from_secs_f64(cfg.status_interval_s));
        let (model, device) = (
            cfg.model.path.display().to_string(),
            cfg.model.device.clone(),
        );
        spawn(
            "the status publisher",
            Box::new(move || Box::pin(status(c.clone(), period, model.clone(), device.clone()))),
        );
    }
    let token = match session.liveliness().declare_token(base.as_str()).await {
        Ok(token) => token,
        Err(e) => {
            // Nothing of a camera that did not start may go on running.
            for t in &tasks {
                t.abort();
            }
            worker.stop();
            anyhow::bail!("camera {}: liveliness: {e}", cam.name);
        }
    };
    Ok(Camera {
        name: cam.name.clone(),
        health: CameraHealth {
            name: cam.name.clone(),
            ctx,
        },
        worker,
        tasks,
        _token: token,
        _ros2_subscription: ros2_token,
    })
}
