//! The Gemma / Gemma 2 decoder as a graph: token embeddings (or image features) in,
//! each token's K/V written to its cache row, attention of every sequence over its
//! own cache region, logits of the last tokens out. Gemma 2 adds post-norms after
//! attention and MLP, logit softcaps and sliding-window layers.
use crate::Result;
use crate::config::{TextArch, TextConfig};
use crate::format::names::*;
use crate::kv_cache::{KvCache, Run};
use crate::nn::{CpuOps, Linear, RmsNorm};
use crate::tensor_store::{LM_HEAD, WeightNames};
use ggml::{Context, Graph, SharedStore, Tensor, TensorRef};

/// One decoder layer.
#[derive(Debug)]
struct DecoderLayer {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    /// Gemma 2 only.
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Gemma 2 only.
    post_ffn_norm: Option<RmsNorm>,
    /// Whether this layer attends within the sliding window (Gemma 2: every other layer, from the first).
    sliding: bool,
}

/// The decoder's weights.
#[derive(Debug)]
pub(crate) struct DecoderWeights {
    /// Token embedding, gathered by row.
    pub token_embd: TensorRef,
    /// The LM head: the (tied) token embedding, or its repacked or packed copy.
    lm_head: Linear,
    layers: Vec<DecoderLayer>,
    output_norm: RmsNorm,
    ops: CpuOps,
}

impl DecoderWeights {
    pub fn load(w: &WeightNames<'_>, t: &TextConfig) -> Result<DecoderWeights> {
        let eps = t.rms_eps;
        let gemma2 = t.arch == TextArch::Gemma2;
        let layers = (0..t.depth)
            .map(|i| {
                let p = |part: &str| text_layer(i, part);
                let linear = |s: &str| w.linear(&p(s), false);
                Ok(DecoderLayer {
                    attn_norm: w.rms_norm(&p(T_ATTN_NORM), eps)?,
                    q: linear(T_ATTN_Q)?,
                    k: linear(T_ATTN_K)?,
                    v: linear(T_ATTN_V)?,
                    out: linear(T_ATTN_OUT)?,
                    post_attn_norm: if gemma2 {
                        Some(w.rms_norm(&p(T_POST_ATTN_NORM), eps)?)
                    } else {
                        None
                    },
                    ffn_norm: w.rms_norm(&p(T_FFN_NORM), eps)?,
                    gate: linear(T_FFN_GATE)?,
                    up: linear(T_FFN_UP)?,
                    down: linear(T_FFN_DOWN)?,
                    post_ffn_norm: if gemma2 {
                        Some(w.rms_norm(&p(T_POST_FFN_NORM), eps)?)
                    } else {
                        None
                    },
                    sliding: t.sliding_layers[i],
                })
            })
            .collect::<Result<_>>()?;
        let token_embd = w.tensor(TOKEN_EMBD)?;
        Ok(DecoderWeights {
            token_embd,
            lm_head: if w.has(LM_HEAD) {
                w.matrix(LM_HEAD)?
            } else {
                Linear {
                    w: token_embd,
                    packed: false,
                    b: None,
                }
            },
            layers,
            output_norm: w.rms_norm(OUTPUT_NORM, eps)?,
            ops: w.cpu_ops(&text_layer(0, T_ATTN_Q))?,
        })
    }
}

/// Graph inputs of the decoder.
pub(crate) struct DecoderInputs<'a> {
    /// Embeddings [width, n].
    pub x: Tensor<'a>,
    /// RoPE positions (I32 [n]).
    pub pos: Tensor<'a>,
    /// Cache row of each token (I32 [n]).
    pub slots: Tensor<'a>,
    /// The sequences of the batch, each attending to its own cache region.
    pub runs: Vec<Run<Tensor<'a>>>,
    /// Rows whose logits are wanted (I32 [k]); none: every row.
    pub outputs: Option<Tensor<'a>>,
}

/// Adds the decoder to `graph`: writes each token's K/V into its cache row, attends
/// over each sequence's region with the masks, and returns the logits of the output
/// rows [vocab, outputs], before the final softcap (see
/// [`crate::sampling::softcap`]).
pub(crate) fn build<'c>(
    ctx: &'c Context,
    store: &SharedStore,
    w: &DecoderWeights,
    t: &TextConfig,
    graph: &mut Graph<'_>,
    cache: &KvCache,
    inputs: DecoderInputs<'c>,
) -> Result<Tensor<'c>> {
    let DecoderInputs {
        mut x,
        pos,
        slots,
        runs,
        outputs,
    } = inputs;
    let n = x.ne()[1];
    let (hd, heads, kv_heads) = (t.head_dim, t.heads, t.kv_heads);
    let scale = t.query_pre_attn_scalar.powf(-0.5);
    let softcap = t.attn_softcap.unwrap_or(0.0);
    for (i, layer) in w.layers.iter().enumerate() {
        let h = layer.attn_norm.forward(ctx, store, x)?;
        let q = ctx.reshape(layer.q.forward(ctx, store, h)?, &[hd, heads, n])?;
        let k = ctx.reshape(layer.k.forward(ctx, store, h)?, &[hd, kv_heads, n])?;
        let v = layer.v.forward(ctx, store, h)?; // [hd * kv_heads, n]
        let q = ctx.rope_neox(q, pos, hd, t.rope_theta)?;
        let k = ctx.rope_neox(k, pos, hd, t.rope_theta)?;

        // Store this batch's K/V in their rows (expanded first, so they run before
        // the attention reads the cache), then each sequence attends to its own region.
        let (ck, cv) = cache.layer(i);
        graph.expand(ctx.set_rows(ck, ctx.reshape(k, &[hd * kv_heads, n])?, slots)?)?;
        graph.expand(ctx.set_rows(cv, v, slots)?)?;
        let row = ck.ty().row_size(hd * kv_heads)?;
        let head_row = ck.ty().row_size(hd)?;
        let q = ctx.permute(q, [0, 2, 1, 3])?; // [hd, n, heads]
        let mut parts = Vec::with_capacity(runs.len());
        for run in &runs {
            let q = if run.len == n {
                q
            } else {
                ctx.view(
                    q,
                    &[hd, run.len, heads],
                    &[q.nb()[1], q.nb()[2]],
                    run.first * q.nb()[1],
                )?
            };
            let keys = ctx.view(
                ck,
                &[hd, run.kv, kv_heads],
                &[row, head_row],
                run.base * row,
            )?;
            let values = ctx.view(
                cv,
                &[hd, run.kv, kv_heads],
                &[row, head_row],
                run.base * row,
            )?;
            let mask = if layer.sliding { run.sliding } else { run.full };
            parts.push(
                w.ops
                    .attention(ctx, q, keys, values, mask, scale, softcap)?,
            ); // [hd, heads, len]
        }
        let mut attn = ctx.reshape(w.ops.join(ctx, &parts)?, &[hd * heads, n])?;
        // After the last layer's attention (every row's K/V is in the cache by then)
        // only the output rows matter: its projection and MLP run on them alone, as in
        // llama.cpp (1/26 of a 3B prefill's matrix work).
        if let (true, Some(rows)) = (i + 1 == w.layers.len(), outputs) {
            attn = ctx.get_rows(attn, rows)?;
            x = ctx.get_rows(x, rows)?;
        }
        let mut o = layer.out.forward(ctx, store, attn)?;
        if let Some(norm) = &layer.post_attn_norm {
            o = norm.forward(ctx, store, o)?;
        }
        x = ctx.add(x, o)?;

        let h = layer.ffn_norm.forward(ctx, store, x)?;
        let gate = layer.gate.forward(ctx, store, h)?;
        let up = layer.up.forward(ctx, store, h)?;
        let mut down = layer
            .down
            .forward(ctx, store, w.ops.gelu(ctx, gate, Some(up))?)?;
        if let Some(norm) = &layer.post_ffn_norm {
            down = norm.forward(ctx, store, down)?;
        }
        x = ctx.add(x, down)?;
    }
    let h = w.output_norm.forward(ctx, store, x)?;
    w.lm_head.forward(ctx, store, h)
}
