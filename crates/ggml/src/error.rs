use std::path::PathBuf;

/// Every way a ggml call made through this crate can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ggml: could not create a context of {0} bytes")]
    ContextAlloc(usize),
    #[error("ggml: context is full: no room for another tensor (capacity {0} tensors)")]
    ContextFull(usize),
    #[error("ggml: invalid shape for {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("ggml: unknown or unsupported tensor type {0}")]
    UnknownType(u32),
    #[error("ggml: unknown type name {0:?} (expected one of {1})")]
    UnknownTypeName(String, String),
    #[error("ggml: tensor {name:?} has {got} bytes of data, expected {expected}")]
    DataSize {
        name: String,
        got: usize,
        expected: usize,
    },
    #[error("ggml: tensor {0:?} has no backend buffer (was the graph allocated?)")]
    NotAllocated(String),
    #[error("ggml: no device matches {spec:?}; available: {available}")]
    NoSuchDevice { spec: String, available: String },
    #[error("ggml: could not initialise backend {0}")]
    BackendInit(String),
    #[error("ggml: could not allocate a buffer of {bytes} bytes on {backend}")]
    BufferAlloc { backend: String, bytes: usize },
    #[error("ggml: {0}")]
    Setting(String),
    #[error("ggml: graph allocation failed")]
    GraphAlloc,
    #[error("ggml: graph compute failed with status {0}")]
    Compute(i32),
    #[error("ggml: graph has no room for more nodes (capacity {0})")]
    GraphFull(usize),
    #[error("ggml: tensor {0:?} belongs to a shared store and cannot be written")]
    ReadOnly(String),
    #[error("ggml: cannot quantize to {ty}: {detail}")]
    Quantize { ty: &'static str, detail: String },
    #[error("gguf: {path}: {detail}")]
    Gguf { path: PathBuf, detail: String },
    #[error("gguf: {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Error {
    Error::Shape {
        op,
        detail: detail.into(),
    }
}
