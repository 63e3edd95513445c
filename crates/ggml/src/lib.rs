//! A safe wrapper over ggml, the tensor library of llama.cpp.
//!
//! - [`Context`] / [`Tensor`] / [`Graph`]: build computation graphs; operations check
//!   the shapes ggml would assert on and return [`Error::Shape`] instead of aborting.
//! - [`Device`] / [`Backend`] / [`Scheduler`]: pick `cpu`, `cuda:0`, `vulkan:0` through
//!   ggml's device registry; the scheduler falls back to the CPU for missing ops.
//! - [`Buffer`]: tensor data on a backend, or CPU tensors used in place from a
//!   memory-mapped file.
//! - [`TensorStore`] / [`TensorRef`]: long-lived tensors (weights, caches) kept by
//!   handle in typed structs; [`SharedStore`]: one made read-only, for threads to share.
//! - [`gguf`]: read (every metadata type, tensor infos, in-place data) and write.
//! - [`quantize`] / [`to_f32`]: f32 rows to any ggml type and back.
//! - [`packed`]: f16, bf16, q4_0, q8_0 and q4_K matrix products with AVX-512 VNNI or
//!   AVX2, chosen when the program starts, on weights packed for them; [`Context::attention_cpu`]: attention over many queries
//!   with AVX-512; [`Context::gelu_cpu`]: GELU (times a gate) in one pass;
//!   [`Context::join_cpu`]: concatenation as one copy.
//! - [`cpu_features`]: the CPU features ggml's own kernels use here.
//!
//! This crate and `ggml-sys` are the only ones in the workspace with `unsafe`.

mod attention;
mod backend;
mod context;
mod cpu;
mod error;
mod gelu;
pub mod gguf;
mod join;
pub mod packed;
mod quant;
mod simd;
mod store;
mod types;

pub use backend::{
    Backend, Buffer, BufferType, Device, DeviceKind, HostMemory, Scheduler, set_log_quiet,
};
pub use context::{Context, Graph, Tensor};
pub use cpu::cpu_features;
pub use error::{Error, Result};
pub use ggml_sys as sys;
pub use quant::{quantize, to_f32};
pub use store::{SharedStore, TensorRef, TensorStore};
pub use types::Type;

/// Maps a file read-only. Tensor data is then used in place (see [`Buffer::from_host`]).
/// Like every mmap user, this assumes the file is not truncated while mapped.
pub fn map_readonly(file: &std::fs::File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: read-only map; see the contract above.
    unsafe { memmap2::Mmap::map(file) }
}
