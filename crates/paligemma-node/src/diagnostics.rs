//! The node's health as a ROS 2 driver reports it: a `diagnostic_msgs/msg/
//! DiagnosticArray` on `/diagnostics` about once a second, one status per camera (OK
//! while its frames come, WARN while they do not, ERROR when its source cannot be
//! started) and one for the node (its Zenoh links and totals), so that
//! `rqt_robot_monitor` and the `diagnostic_aggregator` show "no camera" apart from
//! "nothing seen".
use crate::camera::{CameraHealth, Running};
use crate::links::Links;
use crate::ros2::Ros2;
use paligemma_ros2::msgs::{DiagnosticArray, DiagnosticStatus, Header, KeyValue, Time};
use paligemma_stream::message::{SourceState, unix_time_ns};
use std::sync::Arc;
use std::time::Duration;

fn kv(key: &str, value: impl ToString) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.to_string(),
    }
}

/// Seconds since `since_ns` (Unix nanoseconds) at `now_ns`.
fn seconds_since(since_ns: Option<u64>, now_ns: u64) -> f64 {
    since_ns.map_or(0.0, |s| now_ns.saturating_sub(s) as f64 / 1e9)
}

/// One camera's status, named `<node>: camera <name>` with the camera as hardware id.
fn camera_status(node: &str, camera: &CameraHealth, now_ns: u64) -> DiagnosticStatus {
    let source = camera.source();
    let stats = camera.counters();
    let level = match source.state {
        SourceState::Starting | SourceState::Streaming => DiagnosticStatus::OK,
        SourceState::Stalled | SourceState::Restarting => DiagnosticStatus::WARN,
        SourceState::Failed => DiagnosticStatus::ERROR,
    };
    let since = seconds_since(source.since_unix_ns, now_ns);
    let mut message = format!("{} for {since:.0} s", source.state.name());
    if let (false, Some(error)) = (source.state == SourceState::Streaming, &source.last_error) {
        message += &format!("; last error: {error}");
    }
    DiagnosticStatus {
        level,
        name: format!("{node}: camera {}", camera.name),
        message,
        hardware_id: camera.name.clone(),
        values: vec![
            kv("state", source.state.name()),
            kv("state for (s)", format!("{since:.1}")),
            kv("restarts", source.restarts),
            kv("last error", source.last_error.unwrap_or_default()),
            kv("frames seen", stats.frames_seen),
            kv("frames analysed", stats.frames_analysed),
            kv("frames dropped", stats.frames_dropped),
            kv("results", stats.results),
            kv("detections", stats.detections),
            kv("errors", stats.errors),
            kv("requests refused", stats.requests_refused),
            kv("busy", stats.busy),
        ],
    }
}

/// The node's own status: its Zenoh links (WARN while it has lost every router and
/// peer it connects to; it can only say so once they are back) and its cameras.
fn node_status(node: &str, cameras: &[CameraHealth], links: Option<&Links>) -> DiagnosticStatus {
    let streaming = cameras
        .iter()
        .filter(|c| c.source().state == SourceState::Streaming)
        .count();
    let mut status = DiagnosticStatus {
        level: DiagnosticStatus::OK,
        name: format!("{node}: node"),
        message: format!("{streaming} of {} camera(s) streaming", cameras.len()),
        hardware_id: node.into(),
        values: vec![
            kv("cameras", cameras.len()),
            kv("cameras streaming", streaming),
        ],
    };
    if let Some(links) = links.map(Links::snapshot) {
        status.values.push(kv("zenoh links", links.connected));
        status.values.push(kv("zenoh links lost", links.losses));
        if let Some(lost) = links.lost_for {
            status.level = DiagnosticStatus::WARN;
            status.message = format!(
                "no Zenoh router or peer for {:.1} s; {}",
                lost.as_secs_f64(),
                status.message
            );
        }
    }
    status
}

/// The array for this moment.
pub fn array(node: &str, cameras: &[CameraHealth], links: Option<&Links>) -> DiagnosticArray {
    let now_ns = unix_time_ns().unwrap_or(0);
    let mut status: Vec<_> = cameras
        .iter()
        .map(|c| camera_status(node, c, now_ns))
        .collect();
    status.push(node_status(node, cameras, links));
    DiagnosticArray {
        header: Header {
            stamp: Time::from_unix_ns(now_ns),
            frame_id: String::new(),
        },
        status,
    }
}

/// Publishes [`array`] every `period` until the node stops.
pub async fn publish(
    ros2: Arc<Ros2>,
    node: String,
    cameras: Running,
    links: Option<Arc<Links>>,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    let mut failing = false;
    loop {
        tick.tick().await;
        let running = cameras.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let result = ros2.diagnostics(&array(&node, &running, links.as_deref()));
        match (result, failing) {
            (Err(e), false) => {
                tracing::warn!("ROS 2 diagnostics: {e:#}");
                failing = true;
            }
            (Ok(()), true) => failing = false,
            _ => {}
        }
    }
}
