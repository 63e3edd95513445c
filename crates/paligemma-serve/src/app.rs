//! What every handler shares: the models served and the server's limits and counters.
use crate::admission::Admission;
use crate::error::ApiError;
use crate::image_url;
use crate::metrics::Metrics;
use crate::options::ServeOptions;
use paligemma_stream::Stream;
use paligemma_stream::message::unix_time_ns;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// A model being served.
pub(crate) struct Served {
    pub(crate) id: String,
    /// When it was loaded (Unix seconds; OpenAI's `created`).
    pub(crate) created: u64,
    pub(crate) load_seconds: f64,
    pub(crate) stream: Arc<Stream>,
    pub(crate) kv_cache_bytes: usize,
}

pub(crate) struct App {
    pub(crate) models: Vec<Served>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) opts: ServeOptions,
    /// Frames (requests) so far, for their sequence numbers and ids.
    pub(crate) requests: AtomicU64,
}

impl App {
    pub(crate) fn fetching(&self) -> image_url::Fetching {
        image_url::Fetching {
            allowed: self.opts.allow_image_urls,
            max_bytes: self.opts.max_body_bytes,
            timeout: Duration::from_secs(10).min(self.opts.timeout),
        }
    }

    pub(crate) fn model(&self, id: Option<&str>) -> Result<&Served, ApiError> {
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

pub(crate) fn unix_seconds() -> u64 {
    unix_time_ns().unwrap_or(0) / 1_000_000_000
}
