//! The KV cache and the batches that fill it.
//!
//! The cache holds, per decoder layer, a K and a V tensor of `n_ctx * max_sequences`
//! rows: sequence `s` owns the rows `s * n_ctx .. (s + 1) * n_ctx`. A [`Batch`] is a
//! set of tokens to run through the decoder in one graph (the whole prefixes of one or
//! more sequences, or one new token for each of several sequences), with the cache row
//! each one writes and the attention masks that keep every sequence to its own region.
use crate::config::TextConfig;
use crate::embedding::ImageEmbedding;
use crate::{Error, Result};
use ggml::{Backend, Buffer, Context, Tensor, TensorRef, TensorStore, Type};

/// Most prompts one batch may decode together (each has a KV cache region).
pub const MAX_SEQUENCES: usize = 256;

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvType {
    /// 16-bit floats (the default).
    F16,
    /// 32-bit floats.
    F32,
    /// ggml's 8-bit blocks: about half the memory of f16; needs a head size divisible by 32.
    Q8_0,
}

impl KvType {
    fn ggml(self) -> Type {
        match self {
            KvType::F16 => Type::F16,
            KvType::F32 => Type::F32,
            KvType::Q8_0 => Type::Q8_0,
        }
    }
}

impl std::str::FromStr for KvType {
    type Err = Error;
    fn from_str(s: &str) -> Result<KvType> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(KvType::F16),
            "f32" => Ok(KvType::F32),
            "q8_0" => Ok(KvType::Q8_0),
            _ => Err(Error::Invalid(format!(
                "unknown KV cache type {s:?} (expected f16, f32 or q8_0)"
            ))),
        }
    }
}

/// K and V of every layer, in one backend buffer.
pub(crate) struct KvCache {
    store: TensorStore,
    /// (K, V) per layer, each [head_dim * kv_heads, n_ctx * max_sequences].
    layers: Vec<(TensorRef, TensorRef)>,
    buffer: Buffer,
    /// Rows per sequence.
    pub n_ctx: usize,
    pub max_sequences: usize,
    pub ty: KvType,
}

impl KvCache {
    /// A cache of `n_ctx` rows for each of `max_sequences` sequences (0: one).
    pub fn new(
        backend: &Backend,
        t: &TextConfig,
        ty: KvType,
        n_ctx: usize,
        max_sequences: usize,
    ) -> Result<KvCache> {
        if ty == KvType::Q8_0 && !t.head_dim.is_multiple_of(Type::Q8_0.block_size()) {
            return Err(Error::Invalid(format!(
                "a q8_0 KV cache needs head_dim divisible by 32, this model has {}",
                t.head_dim
            )));
        }
        if n_ctx == 0 || n_ctx > t.context_length {
            return Err(Error::Invalid(format!(
                "a context of {n_ctx} tokens: this model takes 1 to {}",
                t.context_length
            )));
        }
        if max_sequences > MAX_SEQUENCES {
            return Err(Error::Invalid(format!(
                "{max_sequences} sequences: at most {MAX_SEQUENCES} are supported"
            )));
        }
        let max_sequences = max_sequences.max(1);
        let ctx = Context::new(2 * t.depth, 0)?;
        for i in 0..t.depth {
            for kind in ["k", "v"] {
                ctx.new_named(
                    &format!("cache_{kind}.{i}"),
                    ty.ggml(),
                    &[t.head_dim * t.kv_heads, n_ctx * max_sequences],
                )?;
            }
        }
        let buffer = backend.alloc_tensors(&ctx)?;
        let mut store = TensorStore::new();
        let refs = store.insert(ctx);
        let layers = refs.chunks(2).map(|kv| (kv[0], kv[1])).collect();
        Ok(KvCache {
            store,
            layers,
            buffer,
            n_ctx,
            max_sequences,
            ty,
        })
    }

    /// The K and V tensors of layer `i`.
    pub fn layer(&self, i: usize) -> (Tensor<'_>, Tensor<'_>) {
        let (k, v) = self.layers[i];
        (self.store.get(k), self.store.get(v))
    }

    pub fn bytes(&self) -> usize {
        self.buffer.size()
    }

    /// First row of sequence `s`.
    pub fn base(&self, s: usize) -> usize {
        s * self.n_ctx
    }

    /// Checks that a prefix and its answer fit one sequence's region.
    pub fn check_fits(&self, prefix: usize, max_tokens: usize) -> Result<()> {
        if prefix
            .checked_add(max_tokens)
            .is_none_or(|n| n > self.n_ctx)
        {
            return Err(Error::Prompt(format!(
                "prefix of {prefix} tokens plus {max_tokens} new tokens exceeds the context of {} tokens (image tokens included); load the model with a larger context",
                self.n_ctx
            )));
        }
        Ok(())
    }
}

/// Tokens to run through the decoder in one graph.
pub(crate) struct Batch<'a> {
    /// Image features for the image tokens that start a prefix: the batch row of the
    /// first one, and the encoding.
    pub images: Vec<(usize, &'a ImageEmbedding)>,
    pub ids: Vec<u32>,
    /// RoPE positions, numbered from 1 as in the reference.
    pub positions: Vec<i32>,
    /// KV cache row of each token.
    pub slots: Vec<usize>,
    /// First row of each token's sequence.
    pub seq_base: Vec<usize>,
    /// Whole prefixes (one per sequence): a prefix's tokens see each other both ways.
    pub prefix: bool,
    /// Batch rows whose logits are wanted, in the order they are returned.
    pub outputs: Vec<usize>,
}

/// A prefix to prefill: its image, its ids, the first KV cache row of its sequence.
pub(crate) type Prefix<'a> = (&'a ImageEmbedding, &'a [u32], usize);

impl<'a> Batch<'a> {
    /// The whole prefixes of several sequences, one after another, with the logits of
    /// each prefix's last token (or of every token, with `all_logits`).
    pub fn prefixes(prefixes: &[Prefix<'a>], all_logits: bool) -> Batch<'a> {
        let mut batch = Batch {
            images: Vec::new(),
            ids: Vec::new(),
            positions: Vec::new(),
            slots: Vec::new(),
            seq_base: Vec::new(),
            prefix: true,
            outputs: Vec::new(),
        };
        for &(image, ids, base) in prefixes {
            let first = batch.ids.len();
            batch.images.push((first, image));
            batch.ids.extend_from_slice(ids);
            batch.positions.extend(1..=ids.len() as i32);
            batch.slots.extend(base..base + ids.len());
            batch.seq_base.extend(std::iter::repeat_n(base, ids.len()));
            let end = batch.ids.len();
            if all_logits {
                batch.outputs.extend(first..end);
            } else if end > first {
                batch.outputs.push(end - 1);
            }
        }
        batch
    }

    /// Splits the batch into runs of consecutive tokens of one sequence. Each run attends
    /// only to its own sequence's cache region (not to the slots of the others), with masks
    /// [len][kv] only where some key in that region is hidden from some query of the run:
    /// the full mask lets the prefix see itself both ways and generated tokens see keys up
    /// to their own; the sliding mask further keeps a generated token at position q to keys
    /// q - W < k <= q (the window never cuts the prefix).
    pub fn runs(&self, window: Option<usize>) -> Vec<Run<Vec<f32>>> {
        let mut runs: Vec<Run<Vec<f32>>> = Vec::new();
        for i in 0..self.ids.len() {
            match runs.last_mut() {
                Some(run) if run.base == self.seq_base[i] => run.len += 1,
                _ => runs.push(Run {
                    base: self.seq_base[i],
                    first: i,
                    len: 1,
                    kv: 0,
                    full: None,
                    sliding: None,
                }),
            }
        }
        for run in &mut runs {
            let queries = run.first..run.first + run.len;
            run.kv = queries
                .clone()
                .map(|i| self.slots[i] - run.base + 1)
                .max()
                .unwrap_or(0);
            // A prefix sees itself both ways; a generated token sees the slots up to its own.
            let visible_end = |i: usize| {
                if self.prefix {
                    run.len
                } else {
                    self.slots[i] - run.base + 1
                }
            };
            let mut full = vec![0f32; run.kv * run.len];
            let mut sliding = vec![0f32; run.kv * run.len];
            let (mut full_needed, mut sliding_needed) = (false, false);
            for (q, i) in queries.enumerate() {
                for j in 0..run.kv {
                    if j >= visible_end(i) {
                        full[q * run.kv + j] = f32::NEG_INFINITY;
                        sliding[q * run.kv + j] = f32::NEG_INFINITY;
                        full_needed = true;
                    } else if let (false, Some(w)) = (self.prefix, window)
                        && (j + 1 + w) as i64 <= self.positions[i] as i64
                    {
                        sliding[q * run.kv + j] = f32::NEG_INFINITY;
                        sliding_needed = true;
                    }
                }
            }
            run.full = full_needed.then_some(full);
            run.sliding = (sliding_needed || full_needed).then_some(sliding);
        }
        runs
    }
}

/// Consecutive tokens of one sequence in a batch: they attend to the cache rows
/// `base..base + kv`, through masks [len, kv] where needed. The masks are values
/// (`Vec<f32>`) when the batch is planned, f16 tensors in the graph.
pub(crate) struct Run<M> {
    pub base: usize,
    /// Position of the run's first token in the batch.
    pub first: usize,
    pub len: usize,
    pub kv: usize,
    pub full: Option<M>,
    pub sliding: Option<M>,
}
