//! A request on its way through the engine: read ([`Prepared`]), given a place and its
//! image ([`Admitted`]), and in the engine's hands ([`InFlight`]), which cancels and
//! counts it if its client goes away.
use crate::admission::Ticket;
use crate::app::{App, Served};
use crate::error::ApiError;
use crate::image_url;
use crate::metrics::Metrics;
use paligemma_stream::message::unix_time_ns;
use paligemma_stream::{AskOptions, Frame, FrameInfo, ResultMessage, StandingPrompt, Stream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A request read and checked, its image not decoded yet.
pub(crate) struct Prepared<'a> {
    pub(crate) model: &'a Served,
    /// A `data:` URL, or an `http(s)` one where the server fetches them.
    pub(crate) image_url: String,
    pub(crate) prompt: StandingPrompt,
    pub(crate) ask: AskOptions,
    pub(crate) arrived: Instant,
}

/// A request with its place in the engine and its frame, and the time it has left.
pub(crate) struct Admitted {
    pub(crate) ticket: Ticket,
    pub(crate) stream: Arc<Stream>,
    pub(crate) frame: Frame,
    pub(crate) prompt: StandingPrompt,
    pub(crate) ask: AskOptions,
    pub(crate) remaining: Duration,
}

impl Prepared<'_> {
    /// Waits for a place (429 when the queue is full, 504 past the request's time),
    /// then decodes the image off the async threads: an image is decoded only for a
    /// request about to be answered, so that the queue holds no pixels.
    pub(crate) async fn admit(self, app: &App) -> Result<Admitted, ApiError> {
        let deadline = self.arrived + app.opts.timeout;
        let timeout_ms = app.opts.timeout.as_millis() as u64;
        let entered = tokio::time::timeout_at(deadline.into(), app.admission.enter()).await;
        let ticket = match entered {
            Err(_) => return Err(ApiError::timeout(timeout_ms)),
            Ok(None) => {
                let (parallel, queue) = app.admission.limits();
                return Err(ApiError::busy(format!(
                    "{parallel} requests are being answered and {queue} are waiting; try again shortly"
                )));
            }
            Ok(Some(ticket)) => ticket,
        };
        let image = image_url::load(&self.image_url, app.opts.max_pixels, app.fetching()).await?;
        let info = FrameInfo {
            seq: app.requests.fetch_add(1, Ordering::Relaxed),
            capture_unix_ns: unix_time_ns(),
            width: image.width,
            height: image.height,
            ..Default::default()
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ApiError::timeout(timeout_ms));
        }
        Ok(Admitted {
            ticket,
            stream: self.model.stream.clone(),
            frame: Frame::new(info, image),
            prompt: self.prompt,
            ask: self.ask,
            remaining,
        })
    }
}

/// A request in the engine's hands. Dropped before it was answered (the handler's
/// future, or a streamed reply, is dropped when its client goes away), it cancels the
/// work and counts the request with status 499, as nginx counts a client that closed
/// the connection.
pub(crate) struct InFlight {
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) endpoint: &'static str,
    pub(crate) task: String,
    pub(crate) answered: bool,
}

impl InFlight {
    pub(crate) fn new(app: &App, endpoint: &'static str, p: &Admitted) -> InFlight {
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

/// An engine's answer as the client gets it: counted in the metrics, and an error
/// result (the engine failed on this request) as a 500.
pub(crate) fn delivered(metrics: &Metrics, msg: ResultMessage) -> Result<ResultMessage, ApiError> {
    metrics.answer(&msg);
    match &msg.result {
        paligemma::TaskResult::Error { message } => Err(ApiError::internal(message.clone())),
        _ => Ok(msg),
    }
}
