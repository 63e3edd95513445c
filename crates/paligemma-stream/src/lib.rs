//! Streaming around the engine, shared by the GStreamer element and the Zenoh node:
//!
//! - [`prompts`]: standing prompts (what to ask, how often) and their TOML file.
//! - [`frame_sampler`]: newest-frame-wins hand-over with a minimum interval and an
//!   optional skip of frames that barely changed.
//! - [`engine`]: one loaded model per process and model file, shared by every
//!   stream, served by one thread that batches across streams (`scheduler`).
//! - [`stream`]: a stream's handle on an engine ([`Stream::attach`]): frames in,
//!   standing prompts, asks, result messages out through its sink. What the handles
//!   and the engine's lanes share is `shared.rs`, below both.
//! - [`message`]: the result message (`paligemma.result/1`).
//! - [`payload`]: frames and prompts from network bytes, bounded and checked.
//! - [`tracker`]: identities of detected objects over frames.
//!
//! ROS 2's wire format is the `paligemma-ros2` crate, used by the node alone.

pub mod engine;
pub mod frame_sampler;
mod lanes;
pub mod message;
pub mod payload;
pub mod prompts;
mod scheduler;
mod shared;
pub mod stream;
pub mod tracker;

pub use engine::{Engine, EngineOptions};
pub use frame_sampler::{Frame, FrameSampler, FrameSamplerConfig};
pub use lanes::usable_lanes;
pub use message::{FrameInfo, ResultMessage};
pub use prompts::{PromptSet, StandingPrompt};
pub use shared::{AskOptions, MAX_PENDING_REQUESTS, OnText, Sink, StreamConfig, StreamStats};
pub use stream::Stream;

/// Errors of configuration and streaming.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("prompts: {0}")]
    Prompts(String),
    #[error("frame: {0}")]
    Frame(String),
    #[error(transparent)]
    Engine(#[from] paligemma::Error),
    #[error("the stream has stopped")]
    Stopped,
    #[error("no frame has arrived yet")]
    NoFrame,
    #[error("busy: {0} requests are waiting already")]
    Busy(usize),
    #[error("timed out after {0} ms")]
    Timeout(u64),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
