//! Streaming around the engine, shared by the GStreamer element and the Zenoh node:
//!
//! - [`prompts`]: standing prompts (what to ask, how often) and their TOML file.
//! - [`frame_sampler`]: newest-frame-wins hand-over with a minimum interval and an
//!   optional skip of frames that barely changed.
//! - [`worker`]: the thread that owns the engine, encodes each sampled frame once
//!   and answers every due prompt on it.
//! - [`message`]: the result message (`paligemma.result/1`).
//! - [`payload`]: frames and prompts from network bytes, bounded and checked.

pub mod frame_sampler;
pub mod message;
pub mod payload;
pub mod prompts;
pub mod worker;

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
    #[error("timed out after {0} ms")]
    Timeout(u64),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
