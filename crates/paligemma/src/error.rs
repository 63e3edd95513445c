use std::path::PathBuf;

/// Errors of the engine, the converter and the input stages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A ggml or GGUF operation failed: no device matching the spec, a backend or buffer
    /// that could not be created, a GGUF file that cannot be read, a tensor that cannot be
    /// quantized, a graph that could not be allocated or computed.
    #[error(transparent)]
    Ggml(#[from] ggml::Error),
    /// A file or folder could not be read: a checkpoint file, a model's weights, an input
    /// image.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder being read.
        path: PathBuf,
        /// What the operating system reported.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint's `config.json`, `preprocessor_config.json` or
    /// `model.safetensors.index.json` is not valid JSON or has a missing, mistyped or
    /// inconsistent field.
    #[error("{path}: {detail}")]
    Config {
        /// The JSON file at fault.
        path: PathBuf,
        /// What is wrong, naming the field.
        detail: String,
    },
    /// A tensor is missing from a checkpoint or model file, or a checkpoint's tensor has
    /// the wrong shape or an unsupported dtype.
    #[error("{path}: tensor {name:?}: {detail}")]
    Tensor {
        /// The file (or checkpoint folder) that should hold the tensor.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A checkpoint cannot be used: not a folder, no `config.json` or weight files, an
    /// invalid `tokenizer.json` or safetensors file, two keys for one tensor, or a
    /// `vae-oid.npz` that is unreadable or has the wrong arrays.
    #[error("{path}: {detail}")]
    Checkpoint {
        /// The folder or file at fault.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A model file cannot be run: another architecture or format version, a missing or
    /// invalid hyper-parameter, a tensor missing or of the wrong shape or type, no
    /// tokenizer.
    #[error("model file {path}: {detail}")]
    Model {
        /// The model file.
        path: PathBuf,
        /// What is wrong, naming the metadata key or tensor.
        detail: String,
    },
    /// The tokenizer is unusable or failed: an invalid `tokenizer.json`, a special token
    /// (`<bos>`, `<eos>`, `<pad>`, `<image>`) it lacks, or an encoding or decoding error.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An image cannot be used: undecodable, empty, over the pixel limit, a raw frame
    /// whose buffer or stride is too small for its size, or pixel values of the wrong size.
    #[error("image: {0}")]
    Image(String),
    /// A prompt cannot be run: empty, more than one line, a bad language code, `detect` or
    /// `segment` without an object name, too long (in bytes, or for the context with its
    /// answer), or a prefix with ids outside the vocabulary or misplaced image tokens.
    #[error("prompt: {0}")]
    Prompt(String),
    /// An invalid argument or setting: an unknown weight type, KV cache type, model shape
    /// or result kind, bad sampling settings, a context or number of sequences the model
    /// cannot take, mask codes the model cannot decode, an input file that is not a
    /// regular file or is over its size limit, a model file the converter refuses to write
    /// because it would not load.
    #[error("{0}")]
    Invalid(String),
    /// A conversion was stopped through [`ConvertOptions::cancel`](crate::convert::ConvertOptions::cancel).
    #[error("interrupted")]
    Interrupted,
}

/// The crate's result type, with [`Error`] as its error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
