//! `paligemma-node`: turns cameras into a stream of PaliGemma answers on Zenoh.
//!
//! Keys under the prefix (default `paligemma/<node>`):
//! - `<prefix>/<camera>/<prompt-id>`: one result message per standing prompt per analysed frame
//! - `<prefix>/<camera>/errors`: engine errors and refused input (bad frames, prompt
//!   updates, asks), the latter at most `errors_per_s` a second (see `refusals.rs`)
//! - `<prefix>/<camera>/status`: periodic counters and latencies
//! - `<prefix>/<camera>/ask`: queryable; payload a prompt (text, or JSON `{"prompt", "max_tokens"}`)
//! - `<prefix>/<camera>/prompts`: put a list (TOML or JSON) to replace the standing prompts; get to read it
//! - liveliness tokens `<prefix>` (the node) and `<prefix>/<camera>`
//!
//! With `[ros2]`, the results also go to a ROS 2 graph on `rmw_zenoh` (see `ros2.rs`),
//! and the node's health to `/diagnostics` (see `diagnostics.rs`).
use anyhow::{Context, Result};
use clap::Parser;
use config::{Config, Encoding, OnShutdown};
use paligemma_stream::PromptSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

mod camera;
mod config;
mod diagnostics;
mod frames;
mod limiter;
mod links;
mod metrics;
mod pool;
mod refusals;
mod ros2;
mod source;
mod state;

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
    /// Join this pool of nodes sharing the network cameras (docs/pool.md).
    #[arg(long)]
    pool: Option<String>,
    /// This node's share of the pool's cameras relative to the others.
    #[arg(long)]
    capacity: Option<f64>,
    /// Message encoding.
    #[arg(long, value_enum)]
    encoding: Option<Encoding>,
    /// Zenoh JSON5 configuration file.
    #[arg(long)]
    zenoh_config: Option<PathBuf>,
    /// Zenoh mode: peer or client.
    #[arg(long)]
    mode: Option<String>,
    /// Zenoh endpoints to listen on (repeatable), e.g. tcp/0.0.0.0:7448 (7447 is rmw_zenohd's).
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
            let model = cli
                .model
                .clone()
                .context("give --config FILE or at least --model and --camera")?;
            toml::from_str::<Config>(&format!(
                "[model]\npath = {:?}\n",
                model.display().to_string()
            ))?
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
    if cli.pool.is_some() {
        cfg.pool = cli.pool.clone();
    }
    if let Some(c) = cli.capacity {
        cfg.capacity = c;
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
        let (name, pipeline) = cam
            .split_once('=')
            .context("--camera takes NAME=PIPELINE")?;
        let prompts = PromptSet::from_short(
            &cli.prompts.join("|"),
            0,
            paligemma_stream::prompts::DEFAULT_MAX_TOKENS,
        )?;
        cfg.cameras.push(config::CameraConfig {
            name: name.into(),
            pipeline: Some(pipeline.into()),
            uri: None,
            zenoh_key: None,
            ros2_image: None,
            ros2_compressed_image: None,
            interval_ms: cli.interval_ms,
            skip_unchanged_below: None,
            prompts: prompts.prompts,
            frame_id: None,
            stall_after_ms: config::default_stall_after(),
            restart_backoff_ms: config::default_backoff(),
            restart_backoff_max_ms: config::default_backoff_max(),
            tracking: Default::default(),
        });
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Encodes a message in the configured encoding.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Whether the node is told to keep links to routers or peers (client mode, or
/// `connect` endpoints), whose loss it must then report.
fn expects_links(config: &zenoh::Config) -> bool {
    let json = |key| {
        config
            .get_json(key)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
    };
    let client = json("mode").is_some_and(|m| m == "client");
    let connects = json("connect/endpoints").is_some_and(|e| match e {
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => o
            .values()
            .any(|v| v.as_array().is_some_and(|a| !a.is_empty())),
        _ => false,
    });
    client || connects
}

async fn run(cfg: Config) -> Result<()> {
    gst::init().context("initialising GStreamer")?;
    let zenoh_config = cfg.zenoh_config()?;
    let links = expects_links(&zenoh_config).then(|| Arc::new(links::Links::default()));
    let session = zenoh::open(zenoh_config)
        .await
        .map_err(|e| anyhow::anyhow!("opening the zenoh session: {e}"))?;
    let mut node_tasks = Vec::new();
    if let Some(links) = &links {
        node_tasks.push(tokio::spawn(links::watch(session.clone(), links.clone())));
    }
    let prefix = cfg.prefix();
    let node_token = session
        .liveliness()
        .declare_token(prefix.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("liveliness: {e}"))?;
    let asks = Arc::new(limiter::RateLimiter::new(cfg.ask_rate, cfg.ask_burst));
    let ros2 = if cfg.ros2.enabled {
        Some(Arc::new(ros2::Ros2::start(&session, &cfg.ros2)?))
    } else {
        None
    };
    let persisted = match (&cfg.state_file, cfg.allow_prompt_updates) {
        (Some(path), true) => {
            let (state, error) = state::PromptState::open(path.clone());
            Some(Arc::new(camera::Persisted {
                state: Arc::new(state),
                error: error.map(|e| format!("{e:#}")),
            }))
        }
        _ => None,
    };
    // The metrics port is bound before any camera starts, so that a port in use is an
    // error at start rather than a node that silently has no metrics.
    let running = camera::Running::default();
    let metrics = match cfg.metrics.enabled {
        true => {
            let listen = cfg.metrics.listen;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("[metrics] listening on {listen}"))?;
            if !listen.ip().is_loopback() {
                tracing::warn!("[metrics] on {listen}: reachable from other machines");
            }
            let metrics = Arc::new(metrics::node_metrics(
                running.clone(),
                links.clone(),
                cfg.model.path.display().to_string(),
            ));
            let served = metrics.clone();
            node_tasks.push(tokio::spawn(async move {
                if let Err(e) = paligemma_serve::metrics::serve(listener, served).await {
                    tracing::error!("[metrics] stopped: {e}");
                }
            }));
            tracing::info!("Prometheus metrics on http://{listen}/metrics");
            Some(metrics)
        }
        false => None,
    };
    let engine_options = cfg.engine_options()?;
    let model_path = cfg.model.path.clone();
    let engine = tokio::task::spawn_blocking(move || {
        paligemma_stream::Engine::shared(&model_path, &engine_options)
    })
    .await?
    .with_context(|| format!("loading {}", cfg.model.path.display()))?;
    let node = camera::Node {
        engine,
        cfg: Arc::new(cfg.clone()),
        session: session.clone(),
        asks,
        ros2: ros2.clone(),
        persisted,
        metrics,
        running: running.clone(),
    };
    // In a pool, the network cameras are the pool's to share; the rest stay here.
    let (pooled, local): (Vec<_>, Vec<_>) = cfg
        .cameras
        .iter()
        .partition(|c| cfg.pool.is_some() && pool::is_shared(c));
    let mut cameras = Vec::new();
    for cam in local {
        cameras.push(node.start_camera(cam).await?);
    }
    let pool = match &cfg.pool {
        Some(name) => {
            Some(pool::Pool::join(node.clone(), name, pooled.into_iter().cloned().collect()).await?)
        }
        None => None,
    };
    if let Some(ros2) = ros2
        .as_ref()
        .filter(|_| cfg.ros2.diagnostics_period_s > 0.0)
    {
        node_tasks.push(tokio::spawn(diagnostics::publish(
            ros2.clone(),
            cfg.ros2.node_name.clone(),
            running.clone(),
            links.clone(),
            Duration::from_secs_f64(cfg.ros2.diagnostics_period_s),
        )));
    }
    let shared = match &cfg.pool {
        Some(pool) => format!(" and sharing the network cameras with pool {pool}"),
        None => String::new(),
    };
    tracing::info!("serving {} camera(s) under {prefix}{shared}", cameras.len());
    println!(
        "paligemma-node: serving {} camera(s) under {prefix}{shared}",
        cameras.len()
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    for t in node_tasks {
        t.abort();
    }
    let finish = cfg.on_shutdown == OnShutdown::Finish;
    if let Some(pool) = pool {
        pool.stop(finish).await;
    }
    for cam in cameras {
        cam.stop(finish).await;
    }
    // The ROS 2 node and publisher tokens go before the session closes.
    drop(ros2);
    node_token
        .undeclare()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    session
        .close()
        .await
        .map_err(|e| anyhow::anyhow!("closing the session: {e}"))?;
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,zenoh=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    paligemma_ggml_quiet();
    let cli = Cli::parse();
    let result = build_config(&cli).and_then(|cfg| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
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
