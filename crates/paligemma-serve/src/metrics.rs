//! Prometheus metrics, in the text exposition format (0.0.4) at `/metrics`: for
//! `paligemma serve` and, on an opt-in loopback port, for `paligemma-node`. Names follow
//! Prometheus' conventions: a `paligemma_` prefix, base units (`_seconds`, `_bytes`),
//! counters ending in `_total`.
//!
//! What is counted as it happens (requests, tokens, per-stage latencies) lives in
//! [`Metrics`]; what is read when scraped (queue depth, KV cache, memory, a camera's
//! frame counters) comes from [`Sampled`] families registered beside them.
use paligemma_stream::ResultMessage;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    task: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
    task: String,
}

/// The kind of a [`Family`] read at scrape time.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One metric read at scrape time: its name (without `_total` for a counter, which
/// the encoder adds), help, kind, and a value per label set.
#[derive(Debug)]
pub struct SampledFamily {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub values: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl SampledFamily {
    pub fn new(name: &'static str, help: &'static str, kind: Kind) -> SampledFamily {
        SampledFamily {
            name,
            help,
            kind,
            values: Vec::new(),
        }
    }

    pub fn with(mut self, labels: Vec<(&'static str, String)>, value: f64) -> SampledFamily {
        self.values.push((labels, value));
        self
    }
}

/// Families computed when scraped.
pub struct Sampled(Box<dyn Fn() -> Vec<SampledFamily> + Send + Sync>);

impl Sampled {
    pub fn new(read: impl Fn() -> Vec<SampledFamily> + Send + Sync + 'static) -> Sampled {
        Sampled(Box::new(read))
    }
}

impl std::fmt::Debug for Sampled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sampled")
    }
}

impl prometheus_client::collector::Collector for Sampled {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for family in (self.0)() {
            let ty = match family.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut metric = encoder.encode_descriptor(family.name, family.help, None, ty)?;
            for (labels, value) in &family.values {
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let encoder = metric.encode_family(&labels)?;
                match family.kind {
                    Kind::Counter => ConstCounter::new(*value).encode(encoder)?,
                    Kind::Gauge => ConstGauge::new(*value).encode(encoder)?,
                }
            }
        }
        Ok(())
    }
}

/// The resident memory of this process (`process_resident_memory_bytes`, the name
/// Prometheus' own client libraries give it), from `/proc/self/status`.
pub fn process_memory() -> Sampled {
    Sampled::new(|| {
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            });
        rss.map(|kb| {
            SampledFamily::new(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                Kind::Gauge,
            )
            .with(vec![], kb * 1024.0)
        })
        .into_iter()
        .collect()
    })
}

/// Counters and histograms updated as answers are made, and the sampled families.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    prompt_tokens: Family<TaskLabels, Counter>,
    generated_tokens: Family<TaskLabels, Counter>,
    stage_seconds: Family<StageLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "paligemma_requests",
            "Requests answered, by endpoint, task and HTTP status (or ok/error for the node's asks and standing prompts)",
            requests.clone(),
        );
        let prompt_tokens = Family::<TaskLabels, Counter>::default();
        registry.register(
            "paligemma_prompt_tokens",
            "Prompt tokens (image and text) prefilled, by task",
            prompt_tokens.clone(),
        );
        let generated_tokens = Family::<TaskLabels, Counter>::default();
        registry.register(
            "paligemma_generated_tokens",
            "Tokens generated, by task",
            generated_tokens.clone(),
        );
        // 1 ms to about 33 s.
        let stage_seconds = Family::<StageLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 16))) as fn() -> Histogram,
        );
        registry.register(
            "paligemma_stage_seconds",
            "Time per answer in each stage: queue (arrival to start of work), preprocess, vision, prefill, decode, total",
            stage_seconds.clone(),
        );
        Metrics {
            registry,
            requests,
            prompt_tokens,
            generated_tokens,
            stage_seconds,
        }
    }

    /// Registers families read at each scrape.
    pub fn add(&mut self, sampled: Sampled) {
        self.registry.register_collector(Box::new(sampled));
    }

    /// Counts a request with its outcome.
    pub fn request(&self, endpoint: &str, task: &str, status: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.into(),
                task: task.into(),
                status: status.into(),
            })
            .inc();
    }

    /// Counts an answer's tokens and its time per stage.
    pub fn answer(&self, msg: &ResultMessage) {
        let task = msg.prompt.task.to_string();
        let labels = TaskLabels { task: task.clone() };
        self.prompt_tokens
            .get_or_create(&labels)
            .inc_by(msg.tokens.prompt as u64);
        self.generated_tokens
            .get_or_create(&labels)
            .inc_by(msg.tokens.generated as u64);
        let l = &msg.latency_ms;
        for (stage, ms) in [
            ("queue", l.queue),
            ("preprocess", l.preprocess),
            ("vision", l.vision),
            ("prefill", l.prefill),
            ("decode", l.decode),
            ("total", l.total),
        ] {
            self.stage_seconds
                .get_or_create(&StageLabels {
                    stage,
                    task: task.clone(),
                })
                .observe(ms / 1000.0);
        }
    }

    /// Everything, in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }
}

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A router with `GET /metrics` alone, for a process whose only HTTP is its metrics.
pub fn router(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                    metrics.encode(),
                )
            }
        }),
    )
}

/// Serves [`router`] on `listener` (bound by the caller, so that a port in use is its
/// error at start) until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics)).await
}
