//! PaliGemma 1 and 2 on ggml.
//!
//! - [`convert`]: Hugging Face checkpoint folder -> one self-contained GGUF.
//! - [`config`]: hyper-parameters (HF `config.json` and GGUF metadata).
//! - [`preprocess`]: images and raw frames -> pixel values, exactly as the reference.
//! - [`model`]: loading, the vision tower, the decoder, generation.
//! - [`task`] / [`output`]: typed prompts and structured results (detections in
//!   pixels, masks through the [`segment`] decoder).
//! - [`tokenizer`]: the prompt layout of the reference and decoding.

pub mod config;
pub mod model;
pub mod output;
pub mod segment;
pub mod task;
mod answer;
pub mod convert;
mod error;
pub mod preprocess;
pub mod tokenizer;

pub use config::Config;
pub use model::{GenerateOptions, Generation, ImageEmbedding, KvType, Model, ModelOptions, Timings};
pub use answer::Answer;
pub use error::{Error, Result};
pub use output::TaskResult;
pub use task::Task;

/// Silences ggml's own log output (warnings and errors still reach stderr unless `quiet`).
pub use ggml::set_log_quiet as set_backend_log_quiet;
