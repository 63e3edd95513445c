//! The building blocks shared by the vision tower and the decoder: typed weights
//! with a `forward` that adds their ops to a graph (as candle's `Linear` and
//! `LayerNorm`). Weights are handles into the model's [`TensorStore`].
use crate::Result;
use ggml::{Context, Tensor, TensorRef, TensorStore};

/// `w x + b`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Linear {
    pub w: TensorRef,
    /// `w` is in `ggml::packed`'s layout.
    pub packed: bool,
    pub b: Option<TensorRef>,
}

impl Linear {
    /// A weight whose rows were padded with zero columns (see the converter) gets its
    /// input padded with zeros to match, unless the input already comes padded (the
    /// outputs of a matrix padded to feed it, format version 3).
    pub fn forward<'c>(&self, ctx: &'c Context, store: &TensorStore, x: Tensor<'_>) -> Result<Tensor<'c>> {
        let w = store.get(self.w);
        let (k, have) = (w.ne()[0], x.ne()[0]);
        let x = if k > have { ctx.pad(x, [k - have, 0, 0, 0])? } else { x };
        let y = if self.packed { ctx.mul_mat_packed(w, x)? } else { ctx.mul_mat(w, x)? };
        Ok(match self.b {
            Some(b) => ctx.add(y, store.get(b))?,
            None => y,
        })
    }
}

/// `layer_norm(x) * w + b` over the innermost dimension (SigLIP).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerNorm {
    pub w: TensorRef,
    pub b: TensorRef,
    pub eps: f32,
}

impl LayerNorm {
    pub fn forward<'c>(&self, ctx: &'c Context, store: &TensorStore, x: Tensor<'_>) -> Result<Tensor<'c>> {
        Ok(ctx.add(ctx.mul(ctx.norm(x, self.eps)?, store.get(self.w))?, store.get(self.b))?)
    }
}

/// `rms_norm(x) * w` (Gemma's `1 + w` is stored in the file).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RmsNorm {
    pub w: TensorRef,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward<'c>(&self, ctx: &'c Context, store: &TensorStore, x: Tensor<'_>) -> Result<Tensor<'c>> {
        Ok(ctx.mul(ctx.rms_norm(x, self.eps)?, store.get(self.w))?)
    }
}
