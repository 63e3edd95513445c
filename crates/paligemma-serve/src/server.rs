//! The HTTP server: its options, the models it loads, and the routes.
//!
//! Each model is one shared engine with one stream of asks, so concurrent requests are
//! batched by the engine's scheduler as a node's cameras are. [`Admission`] bounds the
//! requests in the engine (`parallel`) and those waiting (`max_queue`); work for a
//! client that goes away (or times out) is cancelled at the next token.
use crate::admission::Admission;
use crate::error::ApiError;
use crate::metrics::{self, Kind, Metrics, Sampled, SampledFamily};
use crate::openai::{self, ChatRequest};
use crate::{image_url, tls};
use anyhow::{Context, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use paligemma::Task;
use paligemma_stream::message::{Source, unix_time_ns};
use paligemma_stream::{
    AskOptions, Engine, EngineOptions, Frame, FrameInfo, PromptSet, ResultMessage, StandingPrompt,
    Stream, StreamConfig,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Certificate chain and private key (PEM) for HTTPS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What `paligemma serve` serves, and its limits.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Model files; each is served under its file name without `.gguf`.
    pub models: Vec<PathBuf>,
    pub engine: EngineOptions,
    pub listen: SocketAddr,
    /// Largest request body (an image inline in base64 is 4/3 of its file).
    pub max_body_bytes: usize,
    /// Largest image, width x height, checked before decoding.
    pub max_pixels: usize,
    /// Requests answered at once (each one sequence of the engine's batch).
    pub parallel: usize,
    /// Requests that may wait for a place; more get 429.
    pub max_queue: usize,
    /// Longest a request may take, waiting included.
    pub timeout: Duration,
    /// New tokens when a request does not say.
    pub default_max_tokens: usize,
    /// A bearer token every request but `/health` must carry.
    pub api_key: Option<String>,
    /// Fetch `http(s)` image URLs (off: only inline `data:` URLs).
    pub allow_image_urls: bool,
    pub tls: Option<TlsFiles>,
}

/// A model being served.
struct Served {
    id: String,
    /// When it was loaded (Unix seconds; OpenAI's `created`).
    created: u64,
    load_seconds: f64,
    stream: Arc<Stream>,
    kv_cache_bytes: usize,
}

struct App {
    models: Vec<Served>,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    opts: ServeOptions,
    /// Frames (requests) so far, for their sequence numbers and ids.
    requests: AtomicU64,
}

impl App {
    fn fetching(&self) -> image_url::Fetching {
        image_url::Fetching {
            allowed: self.opts.allow_image_urls,
            max_bytes: self.opts.max_body_bytes,
            timeout: Duration::from_secs(10).min(self.opts.timeout),
        }
    }

    fn model(&self, id: Option<&str>) -> Result<&Served, ApiError> {
        match id {
            Some(id) => self.models.iter().find(|m| m.id == id).ok_or_else(|| {
                ApiError::unknown_model(
                    id,
                    &self.models.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
                )
            }),
            None => Ok(&self.models[0]),
        }
    }
}

fn unix_seconds() -> u64 {
    unix_time_ns().unwrap_or(0) / 1_000_000_000
}

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

/// A body past the limit is still read, up to this many times the limit, before the
/// 413 goes out: a client still sending when the server hangs up gets a broken pipe
/// instead of the error that says why.
const DRAIN_FACTOR: usize = 16;

/// The body of at most `limit` bytes, or 413 past it.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut body = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid("body", format!("reading the body: {e}")))?;
        seen = seen.saturating_add(chunk.len());
        if seen > limit.saturating_mul(DRAIN_FACTOR) {
            break;
        }
        if seen <= limit {
            bytes.extend_from_slice(&chunk);
        }
    }
    if seen > limit {
        return Err(ApiError::too_large(limit));
    }
    Ok(bytes.into())
}

/// A request ready for the engine.
struct Prepared<'a> {
    model: &'a Served,
    frame: Frame,
    prompt: StandingPrompt,
    ask: AskOptions,
}

/// The prompt of `text` with its limits; a task that does not parse is the client's
/// error.
fn prompt_of(
    text: &str,
    max_tokens: usize,
    min_score: Option<f32>,
    duplicate_iou: Option<f32>,
) -> Result<StandingPrompt, ApiError> {
    let task = Task::parse(text).map_err(|e| {
        ApiError::invalid_code(
            "messages[0].content",
            "invalid_task",
            format!("the task {text:?}: {e}"),
        )
    })?;
    let prompt = StandingPrompt {
        max_tokens,
        min_score,
        duplicate_iou,
        ..StandingPrompt::new(paligemma_stream::prompts::ASK_ID, task)
    };
    prompt.validate()?;
    Ok(prompt)
}

fn frame_of(app: &App, image: paligemma::preprocess::RgbImage) -> Frame {
    let info = FrameInfo {
        seq: app.requests.fetch_add(1, Ordering::Relaxed),
        capture_unix_ns: unix_time_ns(),
        width: image.width,
        height: image.height,
        ..Default::default()
    };
    Frame::new(info, image)
}

/// The request ready for the engine; `task` is named as soon as it is known, for the
/// metrics of a request refused after that.
async fn prepare_chat<'a>(
    app: &'a App,
    req: &ChatRequest,
    task: &mut String,
) -> Result<Prepared<'a>, ApiError> {
    let model = app.model(Some(&req.model))?;
    let asked = req.asked()?;
    let prompt = prompt_of(
        &asked.prompt,
        req.token_limit().unwrap_or(app.opts.default_max_tokens),
        None,
        None,
    )?;
    *task = prompt.task.kind().to_string();
    let image = image_url::load(asked.image_url, app.opts.max_pixels, app.fetching()).await?;
    let sampling = paligemma::Sampling {
        temperature: req.temperature.unwrap_or(0.0),
        top_p: req.top_p.unwrap_or(1.0),
        seed: req.seed.unwrap_or(0),
        ..Default::default()
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid("temperature", e.to_string()))?;
    Ok(Prepared {
        model,
        frame: frame_of(app, image),
        prompt,
        ask: AskOptions {
            sampling,
            ..Default::default()
        },
    })
}

/// A request in the engine's hands. Dropped before it was answered (the handler's
/// future, or a streamed reply, is dropped when its client goes away), it cancels the
/// work and counts the request with status 499, as nginx counts a client that closed
/// the connection.
struct InFlight {
    cancel: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    endpoint: &'static str,
    task: String,
    answered: bool,
}

impl InFlight {
    fn new(app: &App, endpoint: &'static str, p: &Prepared<'_>) -> InFlight {
        InFlight {
            cancel: p.ask.cancel.clone(),
            metrics: app.metrics.clone(),
            endpoint,
            task: p.prompt.task.kind().to_string(),
            answered: false,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.answered {
            self.cancel.store(true, Ordering::Relaxed);
            self.metrics.request(self.endpoint, &self.task, "499");
        }
    }
}

/// Answers a prepared request on the engine, after waiting for a place.
async fn answer(
    app: &Arc<App>,
    endpoint: &'static str,
    p: Prepared<'_>,
) -> Result<ResultMessage, ApiError> {
    let ticket = app.admission.enter().await.ok_or_else(|| {
        let (parallel, queue) = app.admission.limits();
        ApiError::busy(format!(
            "{parallel} requests are being answered and {queue} are waiting; try again shortly"
        ))
    })?;
    let mut in_flight = InFlight::new(app, endpoint, &p);
    let (stream, timeout) = (p.model.stream.clone(), app.opts.timeout);
    let msg = tokio::task::spawn_blocking(move || {
        let _ticket = ticket;
        stream.ask_with(p.frame, p.prompt, p.ask, timeout)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()));
    in_flight.answered = true;
    let msg = msg??;
    app.metrics.answer(&msg);
    match &msg.result {
        paligemma::TaskResult::Error { message } => Err(ApiError::internal(message.clone())),
        _ => Ok(msg),
    }
}

async fn chat(State(app): State<Arc<App>>, body: Body) -> Response {
    let mut task = String::new();
    // A streamed reply counts itself when it ends (or its client goes).
    let mut streamed = false;
    let result = async {
        let body = read_body(body, app.opts.max_body_bytes).await?;
        let req: ChatRequest = serde_json::from_slice(&body).map_err(|e| {
            ApiError::invalid("body", format!("not a chat completion request: {e}"))
        })?;
        let prepared = prepare_chat(&app, &req, &mut task).await?;
        let reply = if req.stream {
            let reply = stream_reply(&app, &req, prepared).await?;
            streamed = true;
            reply
        } else {
            let max_tokens = prepared.prompt.max_tokens;
            let msg = answer(&app, "chat", prepared).await?;
            axum::Json(openai::ChatCompletion {
                id: format!("chatcmpl-{}", msg.frame.seq),
                object: "chat.completion",
                created: unix_seconds(),
                model: &req.model,
                choices: vec![openai::Choice {
                    index: 0,
                    message: openai::AssistantMessage {
                        role: "assistant",
                        content: msg.raw.clone(),
                    },
                    finish_reason: openai::finish_reason(&msg, max_tokens),
                }],
                usage: openai::Usage::of(&msg),
                paligemma: &msg,
            })
            .into_response()
        };
        Ok::<_, ApiError>(reply)
    }
    .await;
    match result {
        Ok(reply) if streamed => reply,
        result => respond(&app, "chat", &task, result),
    }
}

/// Counts the request by task (empty when the request did not get as far as naming
/// one) and status, and turns an error into its response.
fn respond(app: &App, endpoint: &str, task: &str, result: Result<Response, ApiError>) -> Response {
    match result {
        Ok(response) => {
            app.metrics
                .request(endpoint, task, response.status().as_str());
            response
        }
        Err(e) => {
            app.metrics.request(endpoint, task, e.status.as_str());
            if e.status.is_server_error() {
                tracing::warn!("{endpoint}: {}", e.message);
            }
            e.into_response()
        }
    }
}

/// What the engine's side of a streamed reply sends to the response's side.
enum Streamed {
    Text(String),
    Done(Box<Result<ResultMessage, ApiError>>),
}

/// A streamed reply: server-sent events in OpenAI's chunk format, the role first, a
/// chunk per token's text, the finishing chunk (with the typed result), the usage if
/// asked for, then `[DONE]`. Waits for a place before the response starts, so that a
/// full queue is still a 429.
async fn stream_reply(
    app: &Arc<App>,
    req: &ChatRequest,
    mut p: Prepared<'_>,
) -> Result<Response, ApiError> {
    let ticket = app.admission.enter().await.ok_or_else(|| {
        ApiError::busy("every place and the whole queue are taken; try again shortly")
    })?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let text = tx.clone();
    p.ask.on_text = Some(Arc::new(move |t: &str| {
        if !t.is_empty() {
            let _ = text.send(Streamed::Text(t.to_string()));
        }
    }));
    let in_flight = InFlight::new(app, "chat", &p);
    let (stream, timeout, metrics) = (
        p.model.stream.clone(),
        app.opts.timeout,
        app.metrics.clone(),
    );
    let (frame, prompt, ask) = (p.frame, p.prompt, p.ask);
    let (max_tokens, id) = (prompt.max_tokens, format!("chatcmpl-{}", frame.info.seq));
    tokio::task::spawn_blocking(move || {
        let _ticket = ticket;
        let result = stream
            .ask_with(frame, prompt, ask, timeout)
            .map_err(ApiError::from)
            .and_then(|msg| {
                metrics.answer(&msg);
                match &msg.result {
                    paligemma::TaskResult::Error { message } => {
                        Err(ApiError::internal(message.clone()))
                    }
                    _ => Ok(msg),
                }
            });
        let _ = tx.send(Streamed::Done(Box::new(result)));
    });
    let chunks = Chunks {
        id,
        model: req.model.clone(),
        created: unix_seconds(),
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        max_tokens,
        pending: VecDeque::new(),
        rx,
        started: false,
        ended: false,
        in_flight,
    };
    let events = futures_util::stream::unfold(chunks, |mut c| async move {
        c.next_event()
            .await
            .map(|e| (Ok::<_, std::convert::Infallible>(e), c))
    });
    Ok(Sse::new(events).into_response())
}

/// The state of a streamed reply.
struct Chunks {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    max_tokens: usize,
    pending: VecDeque<Event>,
    rx: tokio::sync::mpsc::UnboundedReceiver<Streamed>,
    started: bool,
    ended: bool,
    /// Cancels the engine's work when the reply is dropped before its end (the client
    /// went away).
    in_flight: InFlight,
}

impl Chunks {
    fn chunk(
        &self,
        delta: openai::Delta,
        finish: Option<&'static str>,
        result: Option<&ResultMessage>,
    ) -> Event {
        let chunk = openai::Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: vec![openai::ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish,
            }],
            usage: None,
            paligemma: result,
        };
        Event::default().data(serde_json::to_string(&chunk).expect("chunks serialise"))
    }

    async fn next_event(&mut self) -> Option<Event> {
        if let Some(e) = self.pending.pop_front() {
            return Some(e);
        }
        if self.ended {
            return None;
        }
        if !self.started {
            self.started = true;
            return Some(self.chunk(
                openai::Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                None,
                None,
            ));
        }
        match self.rx.recv().await {
            Some(Streamed::Text(text)) => Some(self.chunk(
                openai::Delta {
                    content: Some(text),
                    ..Default::default()
                },
                None,
                None,
            )),
            Some(Streamed::Done(done)) => self.finish(*done),
            None => None,
        }
    }

    /// The chunks that end a reply: the finish (with the typed result), the usage if
    /// asked for, `[DONE]`; or the error and `[DONE]`.
    fn finish(&mut self, done: Result<ResultMessage, ApiError>) -> Option<Event> {
        self.ended = true;
        // A streamed reply is counted when it ends, with how it ended.
        self.in_flight.answered = true;
        let status = done
            .as_ref()
            .map_or_else(|e| e.status.as_str().to_string(), |_| "200".into());
        let in_flight = &self.in_flight;
        in_flight
            .metrics
            .request(in_flight.endpoint, &in_flight.task, &status);
        match done {
            Ok(msg) => {
                let finish = openai::finish_reason(&msg, self.max_tokens);
                let last = self.chunk(openai::Delta::default(), Some(finish), Some(&msg));
                if self.include_usage {
                    let usage = openai::Chunk {
                        id: &self.id,
                        object: "chat.completion.chunk",
                        created: self.created,
                        model: &self.model,
                        choices: Vec::new(),
                        usage: Some(openai::Usage::of(&msg)),
                        paligemma: None,
                    };
                    self.pending.push_back(
                        Event::default().data(serde_json::to_string(&usage).expect("serialises")),
                    );
                }
                self.pending.push_back(Event::default().data("[DONE]"));
                Some(last)
            }
            Err(e) => {
                tracing::warn!("a streamed reply failed: {}", e.message);
                self.pending.push_back(Event::default().data("[DONE]"));
                Some(Event::default().data(e.body().to_string()))
            }
        }
    }
}

/// `POST /v1/analyze`: the node's `paligemma.result/1` message for one image and one
/// task, as JSON `{"prompt", "image", "model"?, "max_tokens"?, "min_score"?,
/// "duplicate_iou"?}` with the image as base64 or a `data:` URL.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AnalyzeRequest {
    prompt: String,
    image: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    min_score: Option<f32>,
    #[serde(default)]
    duplicate_iou: Option<f32>,
}

async fn analyze(State(app): State<Arc<App>>, body: Body) -> Response {
    let mut task = String::new();
    let result = async {
        let body = read_body(body, app.opts.max_body_bytes).await?;
        let req: AnalyzeRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid("body", format!("not an analyze request: {e}")))?;
        let model = app.model(req.model.as_deref())?;
        let url = if ["data:", "http://", "https://"]
            .iter()
            .any(|s| req.image.starts_with(s))
        {
            req.image.clone()
        } else {
            format!("data:;base64,{}", req.image)
        };
        let image = image_url::load(&url, app.opts.max_pixels, app.fetching()).await?;
        let prompt = prompt_of(
            &req.prompt,
            req.max_tokens.unwrap_or(app.opts.default_max_tokens),
            req.min_score,
            req.duplicate_iou,
        )?;
        task = prompt.task.kind().to_string();
        let msg = answer(
            &app,
            "analyze",
            Prepared {
                model,
                frame: frame_of(&app, image),
                prompt,
                ask: AskOptions::default(),
            },
        )
        .await?;
        Ok::<_, ApiError>(
            ([(header::CONTENT_TYPE, "application/json")], msg.to_json()).into_response(),
        )
    }
    .await;
    respond(&app, "analyze", &task, result)
}
