//! Streamed replies (`stream: true`): server-sent events in OpenAI's chunk format, fed
//! token by token from the engine's thread through a channel.
use crate::app::{App, unix_seconds};
use crate::error::ApiError;
use crate::openai::{self, ChatRequest};
use crate::request::{InFlight, Prepared, delivered};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use paligemma_stream::ResultMessage;
use std::collections::VecDeque;
use std::sync::Arc;

/// What the engine's side of a streamed reply sends to the response's side.
enum Streamed {
    Text(String),
    Done(Box<Result<ResultMessage, ApiError>>),
}

/// A streamed reply: server-sent events in OpenAI's chunk format, the role first, a
/// chunk per token's text, the finishing chunk (with the typed result), the usage if
/// asked for, then `[DONE]`. Waits for a place before the response starts, so that a
/// full queue is still a 429.
pub(crate) async fn stream_reply(
    app: &Arc<App>,
    req: &ChatRequest,
    p: Prepared<'_>,
) -> Result<Response, ApiError> {
    let mut a = p.admit(app).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let text = tx.clone();
    a.ask.on_text = Some(Arc::new(move |t: &str| {
        if !t.is_empty() {
            let _ = text.send(Streamed::Text(t.to_string()));
        }
    }));
    let in_flight = InFlight::new(app, "chat", &a);
    let metrics = app.metrics.clone();
    let (max_tokens, id) = (
        a.prompt.max_tokens,
        format!("chatcmpl-{}", a.frame.info.seq),
    );
    tokio::task::spawn_blocking(move || {
        let _ticket = a.ticket;
        let result = a
            .stream
            .ask_with(a.frame, a.prompt, a.ask, a.remaining)
            .map_err(ApiError::from)
            .and_then(|msg| delivered(&metrics, msg));
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
