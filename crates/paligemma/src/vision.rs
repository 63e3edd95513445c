//! The SigLIP vision tower and the linear projector into the decoder's width, as
//! one graph: patch embedding (a convolution with kernel = stride = patch size),
//! learned positions, pre-norm encoder layers, a final layer norm, the projector.
use crate::Result;
use crate::config::VisionConfig;
use crate::format::names::*;
use crate::nn::{CpuOps, LayerNorm, Linear};
use crate::tensor_store::WeightNames;
use ggml::{Context, SharedStore, Tensor, TensorRef};

/// One encoder layer: attention then a GELU MLP, each behind a layer norm.
#[derive(Debug)]
struct EncoderLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    up: Linear,
    down: Linear,
}

/// The vision tower's and projector's weights.
#[derive(Debug)]
pub(crate) struct VisionWeights {
    patch_kernel: TensorRef,
    patch_bias: TensorRef,
    positions: TensorRef,
    layers: Vec<EncoderLayer>,
    post_ln: LayerNorm,
    projector: Linear,
    ops: CpuOps,
}

impl VisionWeights {
    pub fn load(w: &WeightNames<'_>, cfg: &VisionConfig) -> Result<VisionWeights> {
        let eps = cfg.ln_eps;
        let layers = (0..cfg.depth)
            .map(|i| {
                let p = |part: &str| vision_layer(i, part);
                Ok(EncoderLayer {
                    ln1: w.layer_norm(&p(V_LN1), eps)?,
                    q: w.linear(&p(V_ATTN_Q), true)?,
                    k: w.linear(&p(V_ATTN_K), true)?,
                    v: w.linear(&p(V_ATTN_V), true)?,
                    out: w.linear(&p(V_ATTN_OUT), true)?,
                    ln2: w.layer_norm(&p(V_LN2), eps)?,
                    up: w.linear(&p(V_FFN_UP), true)?,
                    down: w.linear(&p(V_FFN_DOWN), true)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(VisionWeights {
            patch_kernel: w.tensor(&format!("{PATCH_EMBD}.weight"))?,
            patch_bias: w.tensor(&format!("{PATCH_EMBD}.bias"))?,
            positions: w.tensor(POSITION_EMBD)?,
            layers,
            post_ln: w.layer_norm(VISION_POST_LN, eps)?,
            projector: w.linear(PROJECTOR, true)?,
            ops: w.cpu_ops(&vision_layer(0, V_ATTN_Q))?,
        })
    }
}

/// Builds the tower on `pixels` ([size, size, 3, images]): every image is encoded on
/// its own, the matrices taking all their patches as one batch. Returns (vision output
/// [width, n_patches * images], projector output [text width, n_patches * images]).
pub(crate) fn build<'c>(
    ctx: &'c Context,
    store: &SharedStore,
    w: &VisionWeights,
    cfg: &VisionConfig,
    pixels: Tensor<'_>,
) -> Result<(Tensor<'c>, Tensor<'c>)> {
    let (d, n, heads, images) = (cfg.width, cfg.n_patches(), cfg.heads, pixels.ne()[3]);
    let hd = d / heads;
    // Patch embedding: a conv with kernel = stride = patch; patches in row-major order.
    let patches = ctx.conv_2d(store.get(w.patch_kernel), pixels, cfg.patch_size, 0)?; // [px, py, d, images]
    let patches = ctx.reshape(patches, &[n, d, images])?;
    let mut x = ctx.reshape(ctx.cont(ctx.transpose(patches)?)?, &[d, n * images])?;
    x = ctx.add(x, store.get(w.patch_bias))?;
    // [d, n] repeated for every image.
    x = ctx.add(x, store.get(w.positions))?;
    let scale = (hd as f32).powf(-0.5);
    // [d, n * images] -> [hd, n, heads, images]
    let heads_of = |t: Tensor<'c>| -> Result<Tensor<'c>> {
        Ok(ctx.permute(ctx.reshape(t, &[hd, heads, n, images])?, [0, 2, 1, 3])?)
    };
    for layer in &w.layers {
        let h = layer.ln1.forward(ctx, store, x)?;
        let q = heads_of(layer.q.forward(ctx, store, h)?)?;
        let k = heads_of(layer.k.forward(ctx, store, h)?)?;
        let v = heads_of(layer.v.forward(ctx, store, h)?)?;
        let attn = w.ops.attention(ctx, q, k, v, None, scale, 0.0)?; // [hd, heads, n, images]
        let attn = ctx.reshape(attn, &[d, n * images])?;
        x = ctx.add(x, layer.out.forward(ctx, store, attn)?)?;
        let h = layer.ln2.forward(ctx, store, x)?;
        let h = w.ops.gelu(ctx, layer.up.forward(ctx, store, h)?, None)?;
        x = ctx.add(x, layer.down.forward(ctx, store, h)?)?;
    }
    let vision = w.post_ln.forward(ctx, store, x)?;
    let projected = w.projector.forward(ctx, store, vision)?;
    Ok((vision, projected))
}
