//! The result message (`paligemma.result/1`): one per prompt per analysed frame,
//! shared by the element's bus messages and the node's Zenoh payloads.
//!
//! Optional fields added within version 1 (readers of earlier messages ignore them):
//! `mean_logprob` (the answer's mean token log-probability), each detection's
//! `score` (0..1, see [`paligemma::output::Detection::score`]) and the frame's
//! `frame_id`.
use paligemma::{TaskKind, TaskResult};

pub const SCHEMA: &str = "paligemma.result/1";
/// Schema of [`StatusMessage`].
pub const STATUS_SCHEMA: &str = "paligemma.status/1";

/// Who produced a message.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Source {
    pub node: String,
    pub camera: String,
}

/// Identity and timestamps of the analysed frame.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FrameInfo {
    pub seq: u64,
    pub pts_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_time_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_time_ns: Option<u64>,
    pub capture_unix_ns: Option<u64>,
    /// The coordinate frame the image was taken in, when its source says (a ROS 2
    /// image's `header.frame_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_id: Option<String>,
    pub width: usize,
    pub height: usize,
}

impl FrameInfo {
    /// The frame's time in seconds, on the clock its source gives: the presentation
    /// timestamp, else the capture time, else 0 (trackers then match by overlap alone).
    pub fn time_s(&self) -> f64 {
        self.pts_ns
            .or(self.capture_unix_ns)
            .map_or(0.0, |ns| ns as f64 / 1e9)
    }
}

/// Which prompt a message answers.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptInfo {
    pub id: String,
    /// The prompt text as the model saw it.
    pub text: String,
    /// The task's kind (`caption`, `detect`...).
    pub task: TaskKind,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub device: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenCounts {
    pub prompt: usize,
    pub generated: usize,
}

/// Milliseconds per stage; `queue` is from the frame's arrival to the start of work.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Latency {
    pub queue: f64,
    pub preprocess: f64,
    pub vision: f64,
    pub prefill: f64,
    pub decode: f64,
    pub total: f64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResultMessage {
    pub schema: String,
    pub source: Source,
    pub frame: FrameInfo,
    pub prompt: PromptInfo,
    pub model: ModelInfo,
    pub result: TaskResult,
    pub raw: String,
    pub tokens: TokenCounts,
    /// Mean natural-log probability of the generated tokens: the confidence of a
    /// caption, answer or OCR text (none for errors and empty answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_logprob: Option<f32>,
    pub latency_ms: Latency,
    pub frames_dropped: u64,
}

impl ResultMessage {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("result messages serialise")
    }

    pub fn is_error(&self) -> bool {
        matches!(self.result, TaskResult::Error { .. })
    }
}

/// Nanoseconds since the Unix epoch now (none on a clock set before 1970): the
/// `capture_unix_ns` of a frame that carries no capture time of its own.
pub fn unix_time_ns() -> Option<u64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_nanos() as u64)
}

/// Where a camera's frame source stands (a node's cameras; see `source.rs` there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceState {
    /// Started, no frame yet.
    Starting,
    Streaming,
    /// No frame for the camera's `stall_after_ms`.
    Stalled,
    /// Ended (EOS) or failed; waiting out the back-off before starting it again.
    Restarting,
    /// Could not be started; tried again after the back-off.
    Failed,
}

impl SourceState {
    /// The state as status and events write it.
    pub fn name(self) -> &'static str {
        match self {
            SourceState::Starting => "starting",
            SourceState::Streaming => "streaming",
            SourceState::Stalled => "stalled",
            SourceState::Restarting => "restarting",
            SourceState::Failed => "failed",
        }
    }
}

/// A camera's frame source in status: its state since when, how often it was
/// restarted, and the last error it had.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SourceStatus {
    pub state: SourceState,
    /// When it entered that state, nanoseconds since the Unix epoch.
    pub since_unix_ns: Option<u64>,
    pub restarts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A stream's periodic status (`paligemma.status/1`): its counters as the engine
/// keeps them. Within version 1, `requests_refused` was added, then `refusals` and
/// `source_state`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StatusMessage {
    pub schema: &'static str,
    pub source: Source,
    /// The model file.
    pub model: String,
    pub device: String,
    #[serde(flatten)]
    pub stats: crate::StreamStats,
    /// Input refused on the way in (by a node: bad frames, prompt updates, asks), by
    /// kind, every one counted; left out when nothing was refused.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub refusals: std::collections::BTreeMap<&'static str, u64>,
    /// The camera's frame source (a node's cameras).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_state: Option<SourceStatus>,
}
