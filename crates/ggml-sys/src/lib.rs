//! Raw C API of ggml and gguf: bindgen output for `ggml.h`, `ggml-backend.h`,
//! `ggml-alloc.h`, `ggml-cpu.h` and `gguf.h`, nothing else.
//!
//! This is the one crate that knows where ggml comes from. By default the ggml
//! sources are the ones vendored by the maintained `llama-cpp-sys-2` crate, which
//! builds them with CMake; our build script runs bindgen over the headers it
//! installed, keeping only `ggml_*`/`gguf_*` items so that no crate above this one
//! can reach llama.cpp's own API.
//!
//! Backends: the Cargo features `cuda`, `vulkan` and `openmp` are passed through to
//! the ggml build. To link a ggml that is already installed (for example a Jetson
//! build with CUDA), enable `system-ggml`, put its CMake package on
//! `CMAKE_PREFIX_PATH` and set `GGML_INCLUDE_DIR` to the directory holding `ggml.h`.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    clippy::all
)]

// Only for its link directives (libggml, libggml-base, libggml-cpu, backends).
use llama_cpp_sys_2 as _;

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
