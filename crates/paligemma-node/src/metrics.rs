//! The node's Prometheus metrics (`[metrics]`, off by default, on loopback when on):
//! what each camera's stream counted and where its source stands, read when scraped,
//! beside the answers' tokens and per-stage latencies counted as they are delivered
//! (`paligemma_serve::metrics`, the same names as `paligemma serve`).
use crate::camera::Running;
use crate::links::Links;
use paligemma_serve::metrics::{Kind, Metrics, Sampled, SampledFamily, process_memory};
use paligemma_stream::message::SourceState;
use std::sync::Arc;

const STATES: [SourceState; 5] = [
    SourceState::Starting,
    SourceState::Streaming,
    SourceState::Stalled,
    SourceState::Restarting,
    SourceState::Failed,
];

/// The families read of the cameras and links at each scrape.
fn sampled(cameras: Running, links: Option<Arc<Links>>, model: String) -> Sampled {
    Sampled::new(move || {
        let cameras = cameras.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let counter = |name, help| SampledFamily::new(name, help, Kind::Counter);
        let gauge = |name, help| SampledFamily::new(name, help, Kind::Gauge);
        let mut seen = counter("paligemma_frames_seen", "Frames a camera delivered");
        let mut analysed = counter(
            "paligemma_frames_analysed",
            "Frames answered by standing prompts",
        );
        let mut dropped = counter(
            "paligemma_frames_dropped",
            "Frames skipped: a newer one came first, or the interval or change filter",
        );
        let mut results = counter("paligemma_results", "Result messages published");
        let mut errors = counter(
            "paligemma_errors",
            "Error results, refused input and the node's own errors",
        );
        let mut detections = counter("paligemma_detections", "Detections published");
        let mut detections_dropped = counter(
            "paligemma_detections_dropped",
            "Detections the filters dropped, by reason",
        );
        let mut refused = counter(
            "paligemma_requests_refused",
            "Asks refused (rate, queue, malformed)",
        );
        let mut busy = gauge(
            "paligemma_camera_busy",
            "1 while the engine works on the camera's frames",
        );
        let mut state = gauge(
            "paligemma_camera_source_state",
            "1 for the state the camera's frame source is in",
        );
        let mut restarts = counter(
            "paligemma_camera_source_restarts",
            "Times the camera's frame source was started again",
        );
        for cam in &cameras {
            let stats = cam.counters();
            let source = cam.source();
            let label = || vec![("camera", cam.name.clone())];
            seen = seen.with(label(), stats.frames_seen as f64);
            analysed = analysed.with(label(), stats.frames_analysed as f64);
            dropped = dropped.with(label(), stats.frames_dropped as f64);
            results = results.with(label(), stats.results as f64);
            errors = errors.with(label(), stats.errors as f64);
            detections = detections.with(label(), stats.detections as f64);
            for (reason, n) in [
                ("below_min_score", stats.detections_dropped.below_min_score),
                ("duplicate", stats.detections_dropped.duplicates),
            ] {
                detections_dropped = detections_dropped.with(
                    vec![("camera", cam.name.clone()), ("reason", reason.into())],
                    n as f64,
                );
            }
            refused = refused.with(label(), stats.requests_refused as f64);
            busy = busy.with(label(), f64::from(u8::from(stats.busy)));
            for s in STATES {
                state = state.with(
                    vec![("camera", cam.name.clone()), ("state", s.name().into())],
                    f64::from(u8::from(source.state == s)),
                );
            }
            restarts = restarts.with(label(), source.restarts as f64);
        }
        let mut families = vec![
            seen,
            analysed,
            dropped,
            results,
            errors,
            detections,
            detections_dropped,
            refused,
            busy,
            state,
            restarts,
        ];
        if let Some(kv) = cameras.first().map(|c| c.kv_cache_bytes()) {
            families.push(
                gauge(
                    "paligemma_kv_cache_bytes",
                    "Bytes of the model's KV caches (allocated at load)",
                )
                .with(vec![("model", model.clone())], kv as f64),
            );
        }
        if let Some(links) = links.as_ref().map(|l| l.snapshot()) {
            families.push(
                gauge("paligemma_zenoh_links", "Zenoh routers and peers connected")
                    .with(vec![], links.connected as f64),
            );
            families.push(
                counter(
                    "paligemma_zenoh_link_losses",
                    "Times the node lost every router and peer",
                )
                .with(vec![], links.losses as f64),
            );
        }
        families
    })
}

/// The node's metrics over its running cameras and its links.
pub fn node_metrics(cameras: Running, links: Option<Arc<Links>>, model: String) -> Metrics {
    let mut metrics = Metrics::new();
    metrics.add(process_memory());
    metrics.add(sampled(cameras, links, model));
    metrics
}
