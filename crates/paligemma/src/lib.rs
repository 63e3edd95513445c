//! PaliGemma 1 and 2 on ggml.
//!
//! ```no_run
//! use paligemma::preprocess::RgbImage;
//! use paligemma::{GenerateOptions, Model, ModelOptions, Task, TaskResult};
//!
//! # fn main() -> paligemma::Result<()> {
//! // Load a GGUF written by `paligemma convert` (device "cpu", "cuda:0", "vulkan:0"...).
//! let mut model = Model::load("pg2-3b-224-q4_k.gguf", &ModelOptions { threads: 4, ..Default::default() })?;
//! // Encode the image once...
//! let image = model.encode_image(&RgbImage::open("street.jpg".as_ref())?)?;
//! // ...and ask it anything, streaming tokens as they come.
//! let task = Task::parse("detect person ; car")?;
//! let answer = model.answer(&image, &task, &GenerateOptions::default(), 1023.0, &mut |_id, piece| {
//!     print!("{piece}");
//!     true
//! })?;
//! if let TaskResult::Detections { detections, .. } = &answer.result {
//!     for d in detections {
//!         println!("{} at {:?}", d.label, d.bbox); // pixels of the original image
//!     }
//! }
//! println!("vision {:.0} ms, prefill {:.0} ms", answer.generation.timings.vision, answer.generation.timings.prefill);
//! # Ok(())
//! # }
//! ```
//!
//! - [`convert`]: Hugging Face checkpoint folder -> one self-contained GGUF.
//! - [`config`]: hyper-parameters (HF `config.json` and GGUF metadata).
//! - [`preprocess`]: images and raw frames -> pixel values, exactly as the reference.
//! - [`model`]: loading, the vision tower, the decoder, generation.
//! - [`task`] / [`output`]: typed prompts and structured results (detections in
//!   pixels, masks through the [`segment`] decoder).
//! - [`tokenizer`]: the prompt layout of the reference and decoding.
//! - [`validate`]: what a model file must satisfy before any graph is built from it.

mod answer;
pub mod config;
pub mod convert;
mod error;
mod input_file;
pub mod model;
pub mod output;
pub mod preprocess;
pub mod segment;
pub mod task;
pub mod tokenizer;
pub mod validate;

pub use answer::Answer;
pub use config::Config;
pub use error::{Error, Result};
pub use input_file::read_input_file;
pub use model::{GenerateOptions, Generation, ImageEmbedding, KvType, Model, ModelOptions, Timings};
pub use output::TaskResult;
pub use task::Task;

/// Silences ggml's own log output (warnings and errors still reach stderr unless `quiet`).
pub use ggml::set_log_quiet as set_backend_log_quiet;
