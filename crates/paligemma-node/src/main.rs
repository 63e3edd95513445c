//! `paligemma-node`: turns cameras into a stream of PaliGemma answers on Zenoh.
//!
//! Keys under the prefix (default `paligemma/<node>`):
//! - `<prefix>/<camera>/<prompt-id>`: one result message per standing prompt per analysed frame
//! - `<prefix>/<camera>/errors`: engine errors and bad frames
//! - `<prefix>/<camera>/status`: periodic counters and latencies
//! - `<prefix>/<camera>/ask`: queryable; payload a prompt (text, or JSON `{"prompt", "max_tokens"}`)
//! - `<prefix>/<camera>/prompts`: put a list (TOML or JSON) to replace the standing prompts; get to read it
//! - liveliness tokens `<prefix>` (the node) and `<prefix>/<camera>`
use anyhow::{Context, Result};
use clap::Parser;
use config::{Config, Encoding, OnShutdown};
use paligemma_stream::message::{FrameInfo, Source};
use paligemma_stream::message::{STATUS_SCHEMA, StatusMessage};
use paligemma_stream::{Engine, Frame, FrameSamplerConfig, PromptSet, ResultMessage, Worker, WorkerConfig, payload};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zenoh::Wait;

mod config;
mod frames;
mod limiter;

#[derive(Parser, Debug)]
#[command(name = "paligemma-node", version, about = "PaliGemma on cameras, answers on Zenoh", long_about = None)]
struct Cli {
    /// Configuration file (TOML; see configs/node.toml). Flags below override it.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Model file (GGUF written by `paligemma convert`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute device: cpu, cuda:N, vulkan:N, gpu.
    #[arg(long)]
    device: Option<String>,
    /// CPU threads (0: half the cores, see paligemma::default_threads).
    #[arg(long)]
    threads: Option<usize>,
    /// Node name (default prefix paligemma/<node>).
    #[arg(long)]
    node: Option<String>,
    /// Key prefix.
    #[arg(long)]
    prefix: Option<String>,
    /// Message encoding.
    #[arg(long, value_enum)]
    encoding: Option<Encoding>,
    /// Zenoh JSON5 configuration file.
    #[arg(long)]
    zenoh_config: Option<PathBuf>,
    /// Zenoh mode: peer or client.
    #[arg(long)]
    mode: Option<String>,
    /// Zenoh endpoints to listen on (repeatable), e.g. tcp/0.0.0.0:7447.
    #[arg(long)]
    listen: Vec<String>,
    /// Zenoh endpoints to connect to (repeatable).
    #[arg(long)]
    connect: Vec<String>,
    /// Disable multicast scouting.
    #[arg(long)]
    no_multicast_scouting: bool,
    /// Add a camera: NAME=GSTREAMER-PIPELINE (repeatable; prompts from --prompt).
    #[arg(long = "camera")]
    cameras: Vec<String>,
    /// Standing prompt for cameras added with --camera (repeatable), e.g. "detect person".
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    /// Minimum milliseconds between analysed frames for cameras added with --camera.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Largest frame (width x height) accepted on a camera's Zenoh key.
    #[arg(long)]
    max_pixels: Option<usize>,
}

fn build_config(cli: &Cli) -> Result<Config> {
    let mut cfg = match &cli.config {
        Some(path) => Config::load(path)?,
        None => {
            let model = cli.model.clone().context("give --config FILE or at least --model and --camera")?;
            toml::from_str::<Config>(&format!("[model]\npath = {:?}\n", model.display().to_string()))?
        }
    };
    if let Some(m) = &cli.model {
        cfg.model.path = m.clone();
    }
    if let Some(d) = &cli.device {
        cfg.model.device = d.clone();
    }
    if let Some(t) = cli.threads {
        cfg.model.threads = t;
    }
    if let Some(n) = &cli.node {
        cfg.node = n.clone();
    }
    if cli.prefix.is_some() {
        cfg.prefix = cli.prefix.clone();
    }
    if let Some(e) = cli.encoding {
        cfg.encoding = e;
    }
    if cli.zenoh_config.is_some() {
        cfg.zenoh.config = cli.zenoh_config.clone();
    }
    if cli.mode.is_some() {
        cfg.zenoh.mode = cli.mode.clone();
    }
    if !cli.listen.is_empty() {
        cfg.zenoh.listen = cli.listen.clone();
    }
    if !cli.connect.is_empty() {
        cfg.zenoh.connect = cli.connect.clone();
    }
    if let Some(n) = cli.max_pixels {
        cfg.max_pixels = n;
    }
    if cli.no_multicast_scouting {
        cfg.zenoh.multicast_scouting = Some(false);
    }
    for cam in &cli.cameras {
        let (name, pipeline) = cam.split_once('=').context("--camera takes NAME=PIPELINE")?;
        let prompts = PromptSet::from_short(&cli.prompts.join("|"), 0, paligemma_stream::prompts::DEFAULT_MAX_TOKENS)?;
        cfg.cameras.push(config::CameraConfig {
            name: name.into(),
            pipeline: Some(pipeline.into()),
            uri: None,
            zenoh_key: None,
            interval_ms: cli.interval_ms,
            skip_unchanged_below: None,
            prompts: prompts.prompts,
        });
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Encodes a message in the configured encoding.
fn encode<T: serde::Serialize>(encoding: Encoding, value: &T) -> (Vec<u8>, zenoh::bytes::Encoding) {
    match encoding {
        Encoding::Json => (serde_json::to_vec(value).unwrap_or_default(), zenoh::bytes::Encoding::APPLICATION_JSON),
        Encoding::Cbor => {
            let mut out = Vec::new();
            let _ = ciborium::into_writer(value, &mut out);
            (out, zenoh::bytes::Encoding::APPLICATION_CBOR)
        }
    }
}

/// An error report on `<prefix>/<camera>/errors`.
#[derive(serde::Serialize)]
struct ErrorMessage<'a> {
    schema: &'static str,
    source: &'a Source,
    message: String,
}

/// Everything a camera needs to publish.
#[derive(Clone)]
struct Publisher {
    session: zenoh::Session,
    base: String,
    source: Source,
    encoding: Encoding,
    /// Errors reported outside the worker (bad frames, refused updates, restarted
    /// tasks), counted in status beside the worker's own.
    errors: Arc<AtomicU64>,
    /// Asks refused by the node's rate, counted in status beside the worker's own.
    refused: Arc<AtomicU64>,
}

impl Publisher {
    fn put<T: serde::Serialize>(&self, key: &str, value: &T) {
        let (bytes, enc) = encode(self.encoding, value);
        if let Err(e) = self.session.put(key, bytes).encoding(enc).wait() {
            tracing::warn!("put {key}: {e}");
        }
    }

    fn result(&self, msg: &ResultMessage) {
        let key = if msg.is_error() { format!("{}/errors", self.base) } else { format!("{}/{}", self.base, msg.prompt.id) };
        self.put(&key, msg);
    }

    fn error(&self, message: String) {
        tracing::warn!("{}: {message}", self.base);
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.put(&format!("{}/errors", self.base), &ErrorMessage { schema: "paligemma.error/1", source: &self.source, message });
    }
}

/// A running camera: its worker, its newest frame and its frame source.
struct Camera {
    name: String,
    worker: Arc<Worker>,
    newest: Arc<Mutex<Option<Frame>>>,
    publisher: Publisher,
    gst: Option<frames::GstSource>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _token: zenoh::liveliness::LivelinessToken,
}

/// Runs one of a camera's tasks and keeps it running: a task that fails or panics is
/// reported on `<camera>/errors`, counted in status and started again (a subscriber
/// dropped with it is declared anew), so that one hostile message cannot silence a
/// camera. It ends when the task returns `Ok` (the session closed) or is aborted.
fn supervise<F, Fut>(publisher: Publisher, what: &'static str, task: F) -> tokio::task::JoinHandle<()>
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
                    let why = payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_default();
                    publisher.error(format!("{what} panicked, restarting it: {why}"));
                }
                Err(_) => return,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Hands a frame to the worker and keeps it as the newest for `ask`.
fn deliver(worker: &Worker, newest: &Mutex<Option<Frame>>, seq: &AtomicU64, image: paligemma::preprocess::RgbImage, pts_ns: Option<u64>) {
    let info = FrameInfo {
        seq: seq.fetch_add(1, Ordering::Relaxed),
        pts_ns,
        capture_unix_ns: paligemma_stream::message::unix_time_ns(),
        width: image.width,
        height: image.height,
        ..Default::default()
    };
    let frame = Frame::new(info, image);
    *newest.lock().unwrap_or_else(|e| e.into_inner()) = Some(frame.clone());
    worker.submit(frame);
}

async fn start_camera(cfg: &Config, cam: &config::CameraConfig, session: &zenoh::Session, asks: Arc<limiter::RateLimiter>) -> Result<Camera> {
    let prefix = cfg.prefix();
    let base = format!("{prefix}/{}", cam.name);
    let source = Source { node: cfg.node.clone(), camera: cam.name.clone() };
    let publisher = Publisher {
        session: session.clone(),
        base: base.clone(),
        source: source.clone(),
        encoding: cfg.encoding,
        errors: Arc::default(),
        refused: Arc::default(),
    };
    let engine = Engine::shared(&cfg.model.path, &cfg.model_options()?).with_context(|| format!("camera {}", cam.name))?;
    tracing::info!(
        "camera {}: model {} on {} (an engine shared by {} stream(s))",
        cam.name,
        cfg.model.path.display(),
        engine.info().device,
        engine.streams() + 1
    );
    let worker_config = WorkerConfig {
        source,
        sampler: FrameSamplerConfig { min_interval: Duration::from_millis(cam.interval_ms), skip_unchanged_below: cam.skip_unchanged_below },
        ..Default::default()
    };
    let sink_pub = publisher.clone();
    let worker = Arc::new(Worker::spawn(engine, cam.prompt_set()?, worker_config, Box::new(move |m: &ResultMessage| sink_pub.result(m))));
    let newest: Arc<Mutex<Option<Frame>>> = Arc::new(Mutex::new(None));
    let seq = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();

    let gst = if let Some(key) = &cam.zenoh_key {
        let (w, n, s, p) = (worker.clone(), newest.clone(), seq.clone(), publisher.clone());
        let (session, key, max_pixels) = (session.clone(), key.clone(), cfg.max_pixels);
        tasks.push(supervise(publisher.clone(), "the frame subscriber", move || {
            let (w, n, s, p, session, key) = (w.clone(), n.clone(), s.clone(), p.clone(), session.clone(), key.clone());
            async move {
                let sub = session.declare_subscriber(key.as_str()).await.map_err(|e| anyhow::anyhow!("subscribe {key}: {e}"))?;
                while let Ok(sample) = sub.recv_async().await {
                    let payload = sample.payload().to_bytes();
                    let attachment = sample.attachment().map(|a| a.to_bytes().into_owned());
                    match payload::decode_frame(&payload, attachment.as_deref(), max_pixels) {
                        Ok(img) => deliver(&w, &n, &s, img, None),
                        Err(e) => p.error(format!("frame on {} refused: {e:#}", sample.key_expr())),
                    }
                }
                Ok(())
            }
        }));
        None
    } else {
        let (w, n, s) = (worker.clone(), newest.clone(), seq.clone());
        let p = publisher.clone();
        Some(frames::GstSource::start(cam.pipeline.as_deref(), cam.uri.as_deref(), move |img, pts| deliver(&w, &n, &s, img, pts), move |e| p.error(e))?)
    };

    // Ad-hoc questions on the newest frame, each answered in a task of its own.
    let (w, n, enc, session2, key) = (worker.clone(), newest.clone(), cfg.encoding, session.clone(), format!("{base}/ask"));
    let (timeout, max_bytes) = (Duration::from_millis(cfg.ask_timeout_ms), cfg.max_prompt_bytes);
    let refused = publisher.refused.clone();
    tasks.push(supervise(publisher.clone(), "the ask queryable", move || {
        let (w, n, session, key, asks, refused) = (w.clone(), n.clone(), session2.clone(), key.clone(), asks.clone(), refused.clone());
        async move {
            let ask = session.declare_queryable(key.as_str()).await.map_err(|e| anyhow::anyhow!("queryable {key}: {e}"))?;
            while let Ok(query) = ask.recv_async().await {
                if !asks.try_take() {
                    refused.fetch_add(1, Ordering::Relaxed);
                    let _ = query.reply_err("busy: this node answers at most ask_rate asks per second; try again later").await;
                    continue;
                }
                let payload = query.payload().map(|p| p.to_bytes().into_owned()).unwrap_or_default();
                let (w, n) = (w.clone(), n.clone());
                tokio::spawn(async move {
                    let outcome = async {
                        let prompt = payload::parse_ask(&payload, max_bytes)?;
                        let frame = n.lock().unwrap_or_else(|e| e.into_inner()).clone().context("no frame has arrived yet")?;
                        // A panic in the engine comes back as an error here and is the reply.
                        let msg = tokio::task::spawn_blocking(move || w.ask(frame, prompt, timeout)).await??;
                        Ok::<_, anyhow::Error>(msg)
                    }
                    .await;
                    let sent = match outcome {
                        Ok(msg) => {
                            let (bytes, e) = encode(enc, &msg);
                            query.reply(query.key_expr().clone(), bytes).encoding(e).await
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
    }));

    // Standing prompts at run time.
    let prompts_key = format!("{base}/prompts");
    let (w, p, session2, key) = (worker.clone(), publisher.clone(), session.clone(), prompts_key.clone());
    let allow_updates = cfg.allow_prompt_updates;
    tasks.push(supervise(publisher.clone(), "the prompts subscriber", move || {
        let (w, p, session, key) = (w.clone(), p.clone(), session2.clone(), key.clone());
        async move {
            let sub = session.declare_subscriber(key.as_str()).await.map_err(|e| anyhow::anyhow!("subscribe {key}: {e}"))?;
            while let Ok(sample) = sub.recv_async().await {
                if sample.kind() != zenoh::sample::SampleKind::Put {
                    continue;
                }
                if !allow_updates {
                    p.error("prompts update refused: this node does not take prompt updates (allow_prompt_updates = false)".into());
                    continue;
                }
                match payload::parse_prompts(&sample.payload().to_bytes()) {
                    Ok(set) => {
                        tracing::info!("new standing prompts: {:?}", set.prompts.iter().map(|p| &p.id).collect::<Vec<_>>());
                        w.set_prompts(set);
                    }
                    Err(e) => p.error(format!("prompts update refused, keeping the current ones: {e:#}")),
                }
            }
            Ok(())
        }
    }));
    let q = session.declare_queryable(prompts_key.as_str()).await.map_err(|e| anyhow::anyhow!("queryable: {e}"))?;
    let w = worker.clone();
    tasks.push(tokio::spawn(async move {
        while let Ok(query) = q.recv_async().await {
            let body = serde_json::to_vec(&w.prompts()).unwrap_or_default();
            let _ = query.reply(query.key_expr().clone(), body).encoding(zenoh::bytes::Encoding::APPLICATION_JSON).await;
        }
    }));

    // Periodic status.
    if cfg.status_interval_s > 0.0 {
        let (w, p) = (worker.clone(), publisher.clone());
        let period = Duration::from_secs_f64(cfg.status_interval_s);
        let model = cfg.model.path.display().to_string();
        let device = cfg.model.device.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let mut stats = w.stats();
                // Results that could not be published count as errors too, asks refused by
                // the node's rate as refused requests.
                stats.errors += p.errors.load(Ordering::Relaxed);
                stats.requests_refused += p.refused.load(Ordering::Relaxed);
                let status = StatusMessage { schema: STATUS_SCHEMA, source: p.source.clone(), model: model.clone(), device: device.clone(), stats };
                p.put(&format!("{}/status", p.base), &status);
            }
        }));
    }
    let token = session.liveliness().declare_token(base.as_str()).await.map_err(|e| anyhow::anyhow!("liveliness: {e}"))?;
    Ok(Camera { name: cam.name.clone(), worker, newest, publisher, gst, tasks, _token: token })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(cfg: Config) -> Result<()> {
    gst::init().context("initialising GStreamer")?;
    let session = zenoh::open(cfg.zenoh_config()?).await.map_err(|e| anyhow::anyhow!("opening the zenoh session: {e}"))?;
    let prefix = cfg.prefix();
    let node_token = session.liveliness().declare_token(prefix.as_str()).await.map_err(|e| anyhow::anyhow!("liveliness: {e}"))?;
    // One budget of asks for the whole node, whatever camera they are for.
    let asks = Arc::new(limiter::RateLimiter::new(cfg.ask_rate, cfg.ask_burst));
    let mut cameras = Vec::new();
    for cam in &cfg.cameras {
        cameras.push(start_camera(&cfg, cam, &session, asks.clone()).await?);
    }
    tracing::info!("serving {} camera(s) under {prefix}", cameras.len());
    println!("paligemma-node: serving {} camera(s) under {prefix}", cameras.len());
    shutdown_signal().await;
    tracing::info!("shutting down");
    for cam in &cameras {
        if let Some(g) = &cam.gst {
            g.stop();
        }
    }
    for cam in cameras {
        for t in &cam.tasks {
            t.abort();
        }
        let worker = cam.worker.clone();
        let finish = cfg.on_shutdown == OnShutdown::Finish;
        tokio::task::spawn_blocking(move || {
            if finish {
                worker.drain(Duration::from_secs(30));
            }
            worker.stop();
        })
        .await?;
        drop(cam.newest);
        drop(cam.publisher);
        tracing::info!("camera {} stopped", cam.name);
    }
    node_token.undeclare().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    session.close().await.map_err(|e| anyhow::anyhow!("closing the session: {e}"))?;
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,zenoh=warn".into()))
        .with_writer(std::io::stderr)
        .init();
    paligemma_ggml_quiet();
    let cli = Cli::parse();
    let result = build_config(&cli).and_then(|cfg| {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        rt.block_on(run(cfg))
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// ggml's own logging is noise for a service.
fn paligemma_ggml_quiet() {
    paligemma::set_backend_log_quiet(std::env::var_os("PALIGEMMA_GGML_LOG").is_none());
}
