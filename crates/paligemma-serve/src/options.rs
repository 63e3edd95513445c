//! What `paligemma serve` serves, and its limits.
use paligemma_stream::EngineOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Certificate chain and private key (PEM) for HTTPS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What `paligemma serve` serves, and its limits.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Model files; each is served under its file name without `.gguf`.
    pub models: Vec<PathBuf>,
    pub engine: EngineOptions,
    pub listen: SocketAddr,
    /// Largest request body (an image inline in base64 is 4/3 of its file).
    pub max_body_bytes: usize,
    /// Largest image, width x height, checked before decoding.
    pub max_pixels: usize,
    /// Requests answered at once (each one sequence of the engine's batch).
    pub parallel: usize,
    /// Requests that may wait for a place; more get 429.
    pub max_queue: usize,
    /// Longest a request may take, waiting included.
    pub timeout: Duration,
    /// New tokens when a request does not say.
    pub default_max_tokens: usize,
    /// A bearer token every request but `/health` must carry.
    pub api_key: Option<String>,
    /// Fetch `http(s)` image URLs (off: only inline `data:` URLs).
    pub allow_image_urls: bool,
    pub tls: Option<TlsFiles>,
}
