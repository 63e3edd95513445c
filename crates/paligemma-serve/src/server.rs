//! The HTTP server: the models it loads and the routes (options in `options.rs`, the
//! handlers of the answering endpoints in `answers.rs`, streamed replies `streamed.rs`).
//!
//! Each model is one shared engine with one stream of asks, so concurrent requests are
//! batched by the engine's scheduler as a node's cameras are. [`Admission`] bounds the
//! requests in the engine (`parallel`) and those waiting (`max_queue`); work for a
//! client that goes away (or times out) is cancelled at the next token.
use crate::admission::Admission;
use crate::answers::{analyze, chat, read_body};
use crate::app::{App, Served, unix_seconds};
use crate::error::ApiError;
use crate::metrics::{self, Kind, Metrics, Sampled, SampledFamily};
use crate::options::ServeOptions;
use crate::{openai, tls};
use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use paligemma_stream::message::Source;
use paligemma_stream::{Engine, PromptSet, Stream, StreamConfig};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// Loads every model, then serves until `shutdown` completes.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    anyhow::ensure!(!opts.models.is_empty(), "give at least one model (-m FILE)");
    anyhow::ensure!(
        (1..=paligemma_stream::MAX_PENDING_REQUESTS).contains(&opts.parallel),
        "--parallel must be 1 to {}",
        paligemma_stream::MAX_PENDING_REQUESTS
    );
    let mut models: Vec<Served> = Vec::new();
    for path in &opts.models {
        let id = path
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
            .unwrap_or_default();
        anyhow::ensure!(
            !models.iter().any(|m| m.id == id),
            "two models named {id:?}"
        );
        let started = Instant::now();
        let (path2, engine_opts) = (path.clone(), opts.engine);
        let engine = tokio::task::spawn_blocking(move || Engine::shared(&path2, &engine_opts))
            .await?
            .with_context(|| format!("loading {}", path.display()))?;
        let load_seconds = started.elapsed().as_secs_f64();
        let config = StreamConfig {
            source: Source {
                node: "serve".into(),
                camera: id.clone(),
            },
            ..Default::default()
        };
        tracing::info!(
            "model {id} ({}, {}) on {} loaded in {load_seconds:.2} s",
            engine.info().name,
            engine.info().ty,
            engine.info().device
        );
        models.push(Served {
            id,
            created: unix_seconds(),
            load_seconds,
            kv_cache_bytes: engine.kv_cache_bytes(),
            stream: Arc::new(Stream::attach(
                engine,
                PromptSet::default(),
                config,
                Box::new(|_| {}),
            )),
        });
    }
    let admission = Arc::new(Admission::new(opts.parallel, opts.max_queue));
    let mut metrics = Metrics::new();
    metrics.add(metrics::process_memory());
    metrics.add(server_gauges(&models, admission.clone()));
    let app = Arc::new(App {
        models,
        admission,
        metrics: Arc::new(metrics),
        opts: opts.clone(),
        requests: AtomicU64::new(0),
    });
    let router = router(app.clone());
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("listening on {}", opts.listen))?;
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    tracing::info!("serving on {scheme}://{}", opts.listen);
    println!(
        "paligemma serve: {} model(s) on {scheme}://{}",
        app.models.len(),
        listener.local_addr()?
    );
    match &opts.tls {
        Some(files) => tls::serve(listener, tls::config(files)?, router, shutdown).await,
        None => Ok(axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await?),
    }
}

/// What the metrics read of the server when scraped: its queue, its models' load time
/// and KV caches.
fn server_gauges(models: &[Served], admission: Arc<Admission>) -> Sampled {
    let per_model: Vec<(String, f64, f64)> = models
        .iter()
        .map(|m| (m.id.clone(), m.load_seconds, m.kv_cache_bytes as f64))
        .collect();
    Sampled::new(move || {
        let model = |f: fn(&(String, f64, f64)) -> f64, family: SampledFamily| {
            per_model.iter().fold(family, |fam, m| {
                fam.with(vec![("model", m.0.clone())], f(m))
            })
        };
        vec![
            SampledFamily::new(
                "paligemma_requests_running",
                "Requests being answered now",
                Kind::Gauge,
            )
            .with(vec![], admission.running() as f64),
            SampledFamily::new(
                "paligemma_requests_waiting",
                "Requests waiting for a place",
                Kind::Gauge,
            )
            .with(vec![], admission.waiting() as f64),
            model(
                |m| m.1,
                SampledFamily::new(
                    "paligemma_model_load_seconds",
                    "Time the model took to load",
                    Kind::Gauge,
                ),
            ),
            model(
                |m| m.2,
                SampledFamily::new(
                    "paligemma_kv_cache_bytes",
                    "Bytes of the model's KV caches (allocated at load)",
                    Kind::Gauge,
                ),
            ),
        ]
    })
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/analyze", post(analyze))
        .route("/metrics", get(metrics_text))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .layer(axum::middleware::from_fn_with_state(app.clone(), authorize))
        .with_state(app)
}

/// Refuses requests without the bearer token, when one is set (`/health` is open, for
/// load balancers and orchestrators).
async fn authorize(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let Some(key) = &app.opts.api_key else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if request.uri().path() == "/health" || given.is_some_and(|g| constant_time_eq(g, key)) {
        next.run(request).await
    } else {
        // Read the body first (bounded as always), so that the client gets the 401
        // rather than a connection closed while it is still sending.
        let _ = read_body(request.into_body(), app.opts.max_body_bytes).await;
        ApiError::unauthorized().into_response()
    }
}

/// Compares without stopping at the first difference, so that timing does not tell
/// how much of a guessed key was right.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn health(State(app): State<Arc<App>>) -> Response {
    axum::Json(serde_json::json!({
        "status": "ok",
        "models": app.models.iter().map(|m| &m.id).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn models(State(app): State<Arc<App>>) -> Response {
    axum::Json(openai::ModelList {
        object: "list",
        data: app
            .models
            .iter()
            .map(|m| openai::ModelEntry {
                id: m.id.clone(),
                object: "model",
                created: m.created,
                owned_by: "paligemma",
            })
            .collect(),
    })
    .into_response()
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        app.metrics.encode(),
    )
        .into_response()
}
