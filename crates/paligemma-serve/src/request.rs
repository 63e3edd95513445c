//! A request on its way through the engine: ready ([`Prepared`]) and in the engine's
//! hands ([`InFlight`]), which cancels and counts it if its client goes away.
use crate::app::{App, Served};
use crate::metrics::Metrics;
use paligemma_stream::{AskOptions, Frame, StandingPrompt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A request ready for the engine.
pub(crate) struct Prepared<'a> {
    pub(crate) model: &'a Served,
    pub(crate) frame: Frame,
    pub(crate) prompt: StandingPrompt,
    pub(crate) ask: AskOptions,
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
    pub(crate) fn new(app: &App, endpoint: &'static str, p: &Prepared<'_>) -> InFlight {
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
