//! A context of a model: an executor of its shared [`Weights`] with a KV cache, its
//! answers in progress and the scheduler (and CPU threads) that runs the graphs. As in
//! llama.cpp, the weights are loaded once and any number of contexts run on them
//! ([`Model::new`]), each on its own thread. The graphs it runs: images in `encode.rs`,
//! the decoder in `forward.rs`; generation in [`crate::generate`], tasks and parsed
//! results in `answer.rs` ([`Model::answer`]).
use crate::Result;
use crate::config::Config;
use crate::kv_cache::{KvCache, KvType};
use crate::options::{ContextOptions, WeightOptions};
use crate::sequence::Sequence;
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use ggml::{Backend, Scheduler};
use std::path::Path;
use std::sync::Arc;

/// Nodes a graph may have; PaliGemma 2 28B's decoder needs about 2,500.
pub(crate) const GRAPH_SIZE: usize = 16 * 1024;

/// A context of a model: its weights (shared), a KV cache, the answers in progress and
/// the scheduler with its CPU threads.
pub struct Model {
    pub(crate) weights: Arc<Weights>,
    pub(crate) kv: KvCache,
    /// The answers in progress, by KV cache region (see [`crate::generate`]).
    pub(crate) sequences: Vec<Option<Sequence>>,
    pub(crate) sched: Scheduler,
    threads: usize,
}

impl Model {
    /// Loads a GGUF written by `paligemma convert` onto the CPU (repacked for its
    /// kernels) and makes one context of it: the one-line way in. For another device
    /// or layout, or several contexts on the same weights, load [`Weights`] and call
    /// [`Model::new`].
    pub fn load(path: impl AsRef<Path>, opts: &ContextOptions) -> Result<Model> {
        Model::new(Weights::load(path, &WeightOptions::default())?, opts)
    }

    /// A context of `weights`: a KV cache of `opts.max_sequences` regions of
    /// `opts.context` tokens and a pool of `opts.threads` CPU threads. Contexts of the
    /// same weights run graphs at the same time from different threads, for independent
    /// batches (see `paligemma_stream::Engine`).
    pub fn new(weights: Arc<Weights>, opts: &ContextOptions) -> Result<Model> {
        let backend = Backend::on(weights.device())?;
        let config = weights.config();
        let n_ctx = match opts.context {
            0 => (config.tokens.image_token_count + 512).min(config.text.context_length),
            n => n,
        };
        let kv = KvCache::new(
            &backend,
            &config.text,
            opts.kv_type,
            n_ctx,
            opts.max_sequences,
        )?;
        let threads = opts.threads_or_default();
        let sched = Scheduler::new(backend, threads, GRAPH_SIZE)?;
        let sequences = (0..kv.max_sequences).map(|_| None).collect();
        Ok(Model {
            weights,
            kv,
            sequences,
            sched,
            threads,
        })
    }

    /// The weights this context runs (shared with every other context of them).
    pub fn weights(&self) -> &Arc<Weights> {
        &self.weights
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        self.weights.config()
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.weights.tokenizer()
    }

    /// CPU threads of the context's pool (what its graphs run on unless
    /// [`Model::use_threads`] says fewer).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs the next graphs on `threads` of the pool's threads (at least one, at most
    /// [`Model::threads`]): for contexts that share the cores, each taking as many as
    /// are free for its next step.
    pub fn use_threads(&mut self, threads: usize) {
        self.sched.use_threads(threads);
    }

    /// Tokens the KV cache holds per sequence.
    pub fn context_size(&self) -> usize {
        self.kv.n_ctx
    }

    /// Prompts answered together at most.
    pub fn max_sequences(&self) -> usize {
        self.kv.max_sequences
    }

    /// Bytes of the KV cache (every sequence region).
    pub fn kv_cache_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// Element type of the KV cache.
    pub fn kv_type(&self) -> KvType {
        self.kv.ty
    }

    /// Bytes of compute buffers the scheduler holds (the largest graph run so far).
    pub fn compute_buffer_bytes(&self) -> usize {
        self.sched.buffer_sizes().iter().map(|(_, n)| n).sum()
    }
}
