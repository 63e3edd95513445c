//! `paligemma serve`: the models over HTTP (see the `paligemma-serve` crate): an
//! OpenAI-compatible chat-completions API, the node's result JSON and Prometheus
//! metrics.
use anyhow::{Context, Result};
use paligemma::{ContextOptions, Device, KvType, WeightOptions};
use paligemma_serve::{ServeOptions, TlsFiles};
use paligemma_stream::EngineOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model file (repeatable); each is served under its file name without `.gguf`.
    #[arg(short = 'm', long = "model", required = true)]
    models: Vec<PathBuf>,
    /// Address to listen on: loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The host of --listen, as llama-server takes it.
    #[arg(long)]
    host: Option<std::net::IpAddr>,
    /// The port of --listen, as llama-server takes it.
    #[arg(long)]
    port: Option<u16>,
    /// cpu, cuda:N, vulkan:N or gpu.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads (0: half the cores, see paligemma::default_threads).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// KV cache type: f16, f32, q8_0.
    #[arg(long, default_value = "f16")]
    kv_type: String,
    /// Batches run at once on the CPU, taking the threads turn by turn (see
    /// paligemma_stream::EngineOptions::lanes), at most one per thread; one lane alone
    /// gets every thread. With 2 threads, two lanes answered 32 clients of the demo
    /// model 1.6-1.9x as fast as one client, one lane 1.1-1.2x (docs/serve.md).
    #[arg(long, default_value_t = 2)]
    lanes: usize,
    /// Requests answered at once, batched together (llama-server's --parallel).
    #[arg(short = 'n', long, default_value_t = 8)]
    parallel: usize,
    /// Requests that may wait for a place; more are refused with 429 and Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Seconds a request may take, waiting included (504 beyond).
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 20 << 20)]
    max_body_bytes: usize,
    /// Largest image, width x height, checked before decoding.
    #[arg(long, default_value_t = paligemma::preprocess::DEFAULT_MAX_PIXELS)]
    max_pixels: usize,
    /// New tokens for a request that does not say.
    #[arg(long, default_value_t = paligemma_stream::prompts::DEFAULT_MAX_TOKENS)]
    max_tokens: usize,
    /// A bearer token every request but /health must carry (or PALIGEMMA_API_KEY).
    #[arg(long, env = "PALIGEMMA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Fetch http(s) image URLs (at most --max-body-bytes, 10 s): the server then reaches
    /// whatever host a request names, so keep it off where clients are not trusted.
    #[arg(long)]
    allow_image_urls: bool,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let mut listen = args.listen;
    if let Some(host) = args.host {
        listen.set_ip(host);
    }
    if let Some(port) = args.port {
        listen.set_port(port);
    }
    anyhow::ensure!(
        args.timeout_s.is_finite() && args.timeout_s > 0.0,
        "--timeout-s must be a positive number of seconds"
    );
    if !listen.ip().is_loopback() && args.api_key.is_none() {
        tracing::warn!(
            "listening on {listen} without --api-key: anyone who reaches this address can use the models"
        );
    }
    let opts = ServeOptions {
        models: args.models,
        engine: EngineOptions {
            weights: WeightOptions {
                device: Device::find(&args.device)?,
                ..Default::default()
            },
            context: ContextOptions {
                threads: args.threads,
                kv_type: args.kv_type.parse::<KvType>()?,
                max_sequences: args.parallel,
                ..Default::default()
            },
            lanes: args.lanes,
        },
        listen,
        max_body_bytes: args.max_body_bytes,
        max_pixels: args.max_pixels,
        parallel: args.parallel,
        max_queue: args.max_queue,
        timeout: Duration::from_secs_f64(args.timeout_s),
        default_max_tokens: args.max_tokens,
        api_key: args.api_key,
        allow_image_urls: args.allow_image_urls,
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| TlsFiles { cert, key }),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(paligemma_serve::serve(opts, shutdown_signal()))
}

/// Ctrl-C or SIGTERM: stop taking connections and finish those open.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
