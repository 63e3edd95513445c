//! PaliGemma over HTTP, where users' other tools already are: `paligemma serve` speaks
//! the OpenAI chat-completions API with images ([`openai`]), the node's result JSON
//! (`POST /v1/analyze`) and Prometheus metrics ([`metrics`], also used by the node's
//! metrics port).
//!
//! - [`server`]: loading and routes; `options`: what is served and its limits; `app`: what the handlers share; `answers`:
//!   the answering endpoints; `request`: a request in progress; `streamed`: streamed replies.
//! - `admission`: how many requests run and wait (429 beyond).
//! - [`image_url`]: inline `data:` images, bounded before decoding.
//! - `error`: errors as OpenAI's API writes them.
//! - `tls`: HTTPS with rustls.
mod admission;
mod answers;
mod app;
mod error;
pub mod image_url;
pub mod metrics;
pub mod openai;
mod options;
mod request;
pub mod server;
mod streamed;
mod tls;

pub use error::ApiError;
pub use options::{ServeOptions, TlsFiles};
pub use server::serve;
