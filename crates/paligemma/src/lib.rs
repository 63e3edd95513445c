#![warn(missing_docs)]

//! PaliGemma 1 and 2 on ggml.
//!
//! ```no_run
//! use paligemma::preprocess::RgbImage;
//! use paligemma::{AnswerOptions, Model, ModelOptions, Task, TaskResult};
//!
//! # fn main() -> paligemma::Result<()> {
//! // Load a GGUF written by `paligemma convert` (device "cpu", "cuda:0", "vulkan:0"...).
//! let mut model = Model::load("pg2-3b-224-q4_k.gguf", &ModelOptions { threads: 4, ..Default::default() })?;
//! // Encode the image once...
//! let image = model.encode_image(&RgbImage::open("street.jpg".as_ref())?)?;
//! // ...and ask it anything.
//! let task = Task::parse("detect person ; car")?;
//! let answer = model.answer(&image, &task, &AnswerOptions::default())?;
//! if let TaskResult::Detections { detections, .. } = &answer.result {
//!     for d in detections {
//!         // Pixels of the original image, and how sure the model was (0..1).
//!         println!("{} at {:?}, score {:?}", d.label, d.bbox, d.score);
//!     }
//! }
//! // Several tasks at once, streaming tokens as they come.
//! let tasks = [Task::parse("caption en")?, Task::parse("ocr")?];
//! let answers = model.answer_batch(&image, &tasks, &AnswerOptions::default(), &mut |token| {
//!     print!("[{}] {}", token.prompt, token.text);
//!     true
//! })?;
//! println!("{:?}, confidence {:?}", answers[0].result.text(), answers[0].generation.mean_logprob());
//! # Ok(())
//! # }
//! ```
//!
//! The parts, in the order an image goes through them:
//! - [`preprocess`]: images and raw frames -> pixel values, exactly as the reference.
//! - [`model`]: loading ([`Model::load`]) and running graphs; the weights are resolved
//!   once into typed structs (`weights`, `nn`), the graphs are built by `vision` (SigLIP
//!   and the projector) and `decoder` (Gemma / Gemma 2) over a `kv_cache`.
//! - [`generate`]: the token-level loop (prefill, batched decode); [`sampling`]: the
//!   next token and its probability.
//! - [`task`] / [`output`]: typed prompts and structured results (detections in
//!   pixels, masks through the [`segment`] decoder), joined by [`Model::answer`].
//! - [`tokenizer`]: the prompt layout of the reference and decoding.
//! - [`convert`]: Hugging Face checkpoint folder -> one self-contained GGUF;
//!   [`config`]: hyper-parameters; [`validate`]: what a model file must satisfy
//!   before any graph is built from it.

mod answer;
pub mod confidence;
pub mod config;
pub mod convert;
mod decoder;
mod error;
pub mod filter;
pub mod generate;
mod input_file;
mod kv_cache;
pub mod model;
mod nn;
pub mod output;
pub mod preprocess;
pub mod sampling;
pub mod segment;
pub mod task;
pub mod tokenizer;
pub mod validate;
mod vision;
mod weights;

pub use answer::{Answer, AnswerOptions};
pub use config::Config;
pub use error::{Error, Result};
pub use filter::{DetectionFilter, Dropped};
pub use generate::{GenerateOptions, Generation, LocDistribution, OnToken, PREFILL_BATCH_TOKENS, SequenceId, Start, Token};
pub use input_file::read_input_file;
pub use kv_cache::{KvType, MAX_SEQUENCES};
pub use model::{ImageEmbedding, Model, ModelOptions, Timings, VISION_BATCH_PATCHES, default_threads, usable_lanes};
pub use output::{ResultKind, TaskResult};
pub use sampling::Sampling;
pub use task::{Task, TaskKind};

/// Silences ggml's own log output (warnings and errors still reach stderr unless `quiet`).
pub use ggml::set_log_quiet as set_backend_log_quiet;
