use std::path::PathBuf;

/// Errors of the engine, the converter and the input stages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ggml(#[from] ggml::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Config { path: PathBuf, detail: String },
    #[error("{path}: tensor {name:?}: {detail}")]
    Tensor { path: PathBuf, name: String, detail: String },
    #[error("{path}: {detail}")]
    Checkpoint { path: PathBuf, detail: String },
    #[error("model file {path}: {detail}")]
    Model { path: PathBuf, detail: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("image: {0}")]
    Image(String),
    #[error("prompt: {0}")]
    Prompt(String),
    #[error("{0}")]
    Invalid(String),
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
