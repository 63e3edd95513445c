//! The answering endpoints: `POST /v1/chat/completions` and `POST /v1/analyze`, from
//! the body (bounded) to the engine's answer, each request counted by task and status.
use crate::app::{App, unix_seconds};
use crate::error::ApiError;
use crate::openai::{self, ChatRequest};
use crate::request::{InFlight, Prepared, delivered};
use crate::streamed::stream_reply;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use paligemma::Task;
use paligemma_stream::message::unix_time_ns;
use paligemma_stream::{AskOptions, ResultMessage, StandingPrompt};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A body past the limit is still read, up to this many times the limit, before the
/// 413 goes out: a client still sending when the server hangs up gets a broken pipe
/// instead of the error that says why.
const DRAIN_FACTOR: usize = 16;

/// The body of at most `limit` bytes, or 413 past it.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
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

/// The request ready for the engine; `task` is named as soon as it is known, for the
/// metrics of a request refused after that.
fn prepare_chat<'a>(
    app: &'a App,
    req: &ChatRequest,
    task: &mut String,
    arrived: Instant,
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
    let temperature = req.temperature.unwrap_or(0.0);
    let sampling = paligemma::Sampling {
        temperature,
        top_p: req.top_p.unwrap_or(1.0),
        // Sampled without a seed: a different one each time, as OpenAI's API does.
        seed: req
            .seed
            .unwrap_or_else(|| unix_time_ns().unwrap_or(0) ^ app.requests.load(Ordering::Relaxed)),
        ..Default::default()
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid("temperature", e.to_string()))?;
    Ok(Prepared {
        model,
        image_url: asked.image_url.to_string(),
        prompt,
        ask: AskOptions {
            sampling,
            ..Default::default()
        },
        arrived,
    })
}

/// Answers a prepared request on the engine, after waiting for a place.
async fn answer(
    app: &Arc<App>,
    endpoint: &'static str,
    p: Prepared<'_>,
) -> Result<ResultMessage, ApiError> {
    let a = p.admit(app).await?;
    let mut in_flight = InFlight::new(app, endpoint, &a);
    let msg = tokio::task::spawn_blocking(move || {
        let _ticket = a.ticket;
        a.stream.ask_with(a.frame, a.prompt, a.ask, a.remaining)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()));
    in_flight.answered = true;
    delivered(&app.metrics, msg??)
}

pub(crate) async fn chat(State(app): State<Arc<App>>, body: Body) -> Response {
    let arrived = Instant::now();
    let mut task = String::new();
    // A streamed reply counts itself when it ends (or its client goes).
    let mut streamed = false;
    let result = async {
        let body = read_body(body, app.opts.max_body_bytes).await?;
        let req: ChatRequest = serde_json::from_slice(&body).map_err(|e| {
            ApiError::invalid("body", format!("not a chat completion request: {e}"))
        })?;
        let prepared = prepare_chat(&app, &req, &mut task, arrived)?;
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

pub(crate) async fn analyze(State(app): State<Arc<App>>, body: Body) -> Response {
    let arrived = Instant::now();
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
                image_url: url,
                prompt,
                ask: AskOptions::default(),
                arrived,
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
