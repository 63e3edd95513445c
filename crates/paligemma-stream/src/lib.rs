//! Streaming around the engine, shared by the GStreamer element and the Zenoh node:
//!
//! - [`prompts`]: standing prompts (what to ask, how often) and their TOML file.
//! - [`frame_sampler`]: newest-frame-wins hand-over with a minimum interval and an
//!   optional skip of frames that barely changed.
//! - [`engine`]: one loaded model per process and model file, shared by every
//!   stream, served by one thread that batches across streams (`scheduler`).
//! - [`worker`]: a stream's handle on an engine: frames in, standing prompts, asks,
//!   result messages out through its sink.
//! - [`message`]: the result message (`paligemma.result/1`).
//! - [`payload`]: frames and prompts from network bytes, bounded and checked.
//! - [`ros2`]: ROS 2 messages in CDR and their type hashes, for `rmw_zenoh`.

pub mod engine;
pub mod frame_sampler;
mod lanes;
pub mod message;
pub mod payload;
pub mod prompts;
pub mod ros2;
mod scheduler;
pub mod tracker;
pub mod worker;

pub use engine::Engine;
pub use frame_sampler::{Frame, FrameSampler, FrameSamplerConfig};
pub use message::{FrameInfo, ResultMessage};
pub use prompts::{PromptSet, StandingPrompt};
pub use worker::{Worker, WorkerConfig, WorkerStats};

/// Errors of configuration and streaming.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("prompts: {0}")]
    Prompts(String),
    #[error("frame: {0}")]
    Frame(String),
    #[error(transparent)]
    Engine(#[from] paligemma::Error),
    #[error("the worker has stopped")]
    Stopped,
    #[error("no frame has arrived yet")]
    NoFrame,
    #[error("busy: {0} requests are waiting already")]
    Busy(usize),
    #[error("timed out after {0} ms")]
    Timeout(u64),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
