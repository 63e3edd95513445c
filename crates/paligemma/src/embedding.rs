//! What an encoded image and an answer carry besides their numbers: the image's
//! features with its frame size, and the time each stage took. A leaf of the crate:
//! the KV cache, the model and generation all read these.
use std::time::Instant;

/// Time spent per stage, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Resizing and normalising the image (0 when pixel values were given).
    pub preprocess: f64,
    /// Vision tower and projector.
    pub vision: f64,
    /// Running the prefix (image tokens and prompt) through the decoder.
    pub prefill: f64,
    /// Decode steps, each a batch shared with the other answers in progress.
    pub decode: f64,
    /// Tokens in the prefix (a count, not milliseconds).
    pub prefix_tokens: usize,
    /// Tokens generated (a count, not milliseconds).
    pub generated_tokens: usize,
}

/// An image run through the vision tower and projector, ready for any number of prompts.
#[derive(Clone, Debug)]
pub struct ImageEmbedding {
    /// [n_image_tokens, text width], row-major.
    pub features: Vec<f32>,
    /// Size of the original frame: detections are reported in its pixels.
    pub width: usize,
    /// Height of the original frame in pixels.
    pub height: usize,
    /// Time spent preprocessing and encoding the image (carried into each answer's timings).
    pub timings: Timings,
}

/// Outputs of the vision stages, for parity checks.
pub struct VisionStages {
    /// Vision tower output after the post layer norm: [n_patches, vision width].
    pub vision: Vec<f32>,
    /// Projector output: [n_patches, text width].
    pub projector: Vec<f32>,
}

/// Milliseconds since `start`.
pub(crate) fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}
