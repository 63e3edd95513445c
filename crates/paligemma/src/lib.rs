#![warn(missing_docs)]

//! PaliGemma 1 and 2 on ggml.
//!
//! ```no_run
//! use paligemma::preprocess::RgbImage;
//! use paligemma::{AnswerOptions, ContextOptions, Model, Task, TaskResult};
//!
//! # fn main() -> paligemma::Result<()> {
//! // Load a GGUF written by `paligemma convert` onto the CPU (`Weights::load` and
//! // `Model::new` for "cuda:0", "vulkan:0"..., or several contexts of one file).
//! let mut model = Model::load("pg2-3b-224-q4_k.gguf", &ContextOptions { threads: 4, ..Default::default() })?;
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
//! - [`preprocess`]: images to pixel values, exactly as the reference; the images come
//!   from files, encoded bytes, raw and YUV frames (`rgb_image`).
//! - [`Weights`] ([`weights`]): a model file loaded once on a device
//!   ([`WeightOptions`]), resolved into typed structs (`tensor_store`, `nn`);
//!   [`Model`] ([`model`]): a context of those weights ([`ContextOptions`]: KV cache,
//!   sequences, threads) that runs the graphs built by `vision` (SigLIP and the
//!   projector, run in `encode`) and `decoder` (Gemma / Gemma 2 over a `kv_cache`, run
//!   in `forward`); [`options`]: both kinds of options.
//! - [`generate`]: the token-level loop (prefill, batched decode) over answers in
//!   progress (`sequence`); [`sampling`]: the next token and its probability;
//!   [`confidence`] and [`filter`]: detection scores, thresholds and duplicates.
//! - [`task`] / [`output`]: typed prompts and structured results (detections in
//!   pixels, masks through the [`segment`] decoder), [`parse`]d from the model's text
//!   and joined by [`Model::answer`].
//! - [`tokenizer`]: the prompt layout of the reference and decoding.
//! - [`convert`]: Hugging Face checkpoint folder (`checkpoint`) -> one self-contained
//!   GGUF laid out as [`format`] says; [`config`]: hyper-parameters (from `config.json`
//!   in `hf_config`, as GGUF metadata in `metadata`); [`validate`]: what a model file
//!   must satisfy before any graph is built from it, within `limits`.

mod answer;
mod checkpoint;
pub mod confidence;
pub mod config;
pub mod convert;
mod decoder;
mod embedding;
mod encode;
mod error;
pub mod filter;
pub mod format;
mod forward;
pub mod generate;
mod hf_config;
mod input_file;
mod kv_cache;
mod limits;
mod metadata;
pub mod model;
mod nn;
pub mod options;
pub mod output;
pub mod parse;
pub mod preprocess;
mod rgb_image;
pub mod sampling;
pub mod segment;
mod sequence;
pub mod task;
mod tensor_store;
pub mod tokenizer;
pub mod validate;
mod vision;
pub mod weights;

pub use answer::{Answer, AnswerOptions};
pub use config::Config;
pub use embedding::{ImageEmbedding, Timings, VisionStages};
pub use encode::VISION_BATCH_PATCHES;
pub use error::{Error, Result};
pub use filter::DetectionFilter;
pub use generate::{
    GenerateOptions, Generation, OnToken, PREFILL_BATCH_TOKENS, SequenceId, Start, Token,
};
/// A compute device (`cpu`, `cuda:N`, `vulkan:N`), as [`WeightOptions::device`] takes it.
pub use ggml::Device;
pub use input_file::read_input_file;
pub use kv_cache::{KvType, MAX_SEQUENCES};
pub use model::Model;
pub use options::{ContextOptions, WeightOptions, default_threads};
pub use output::Dropped;
pub use output::{ResultKind, TaskResult};
pub use sampling::Sampling;
pub use sequence::{LOC_BINS, LocDistribution};
pub use task::{Task, TaskKind};
pub use weights::Weights;

/// Silences ggml's own log output (warnings and errors still reach stderr unless `quiet`).
pub use ggml::set_log_quiet as set_backend_log_quiet;
