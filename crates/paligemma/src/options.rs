//! How a model is loaded, apart from how it is run, as llama.cpp separates model and
//! context parameters: [`WeightOptions`] say where the weights live and in which layout
//! (decided once per file, see [`crate::Weights::load`]); [`ContextOptions`] what one
//! executor of those weights holds (its KV cache, its sequences, its CPU threads; see
//! [`crate::Model::new`]). Many contexts can share one set of weights. Both are plain
//! values that compare and hash, so that whoever shares loaded models (the stream
//! crate's engines) keys them by the options themselves.
use crate::kv_cache::KvType;
use ggml::Device;

/// Where and how a model file's weights are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightOptions {
    /// The device that holds the weights and runs the graphs (the CPU by default;
    /// `ggml::Device::find` parses `cpu`, `cuda:N`, `vulkan:N` and `gpu`).
    pub device: Device,
    /// On the CPU, store f16, bf16, q4_0, q8_0 and q4_k matrices in `ggml::packed`'s
    /// layout where the CPU has AVX-512 VNNI, and otherwise the matrices whose type the
    /// CPU's extra buffer types take (q4_0, q4_k, iq4_nl on x86 with AVX2) in their
    /// interleaved layouts, as llama.cpp does by default: faster prompt processing and
    /// batched decoding, at the cost of a copy of those weights in memory instead of
    /// using the mapped file in place. With the packed layout the graphs also use our own
    /// CPU attention (`ggml::Context::attention_cpu`); off, ggml's kernels do everything.
    pub repack: bool,
}

impl Default for WeightOptions {
    fn default() -> Self {
        WeightOptions {
            device: Device::cpu(),
            repack: true,
        }
    }
}

/// What one context (executor) of a model's weights holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContextOptions {
    /// CPU threads (0: [`default_threads`]).
    pub threads: usize,
    /// Element type of the KV cache.
    pub kv_type: KvType,
    /// Tokens the KV cache holds per sequence (0: image tokens + 512, at most the
    /// model's context).
    pub context: usize,
    /// Prompts decoded together at most (each gets its own KV cache region of
    /// `context` tokens).
    pub max_sequences: usize,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions {
            threads: 0,
            kv_type: KvType::F16,
            context: 0,
            max_sequences: 4,
        }
    }
}

impl ContextOptions {
    /// The CPU threads a context with these options runs on: `threads`, or
    /// [`default_threads`] for 0.
    pub fn threads_or_default(&self) -> usize {
        if self.threads == 0 {
            default_threads()
        } else {
            self.threads
        }
    }
}

/// CPU threads when none are asked for: half the cores this process may use, at
/// least one. ggml's workers meet at every node of a graph and wait for each other by
/// spinning, so one worker that shares a core with another busy program holds all the
/// others up (two cameras with all cores each, or one with a busy process beside it,
/// answered 40x slower than with one thread). A robot always runs other programs;
/// leaving them half the cores keeps the model out of that. Ask for more on a machine
/// that does nothing else.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .div_ceil(2)
}
