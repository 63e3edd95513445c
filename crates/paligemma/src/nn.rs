//! The building blocks shared by the vision tower and the decoder: typed weights
//! with a `forward` that adds their ops to a graph (as candle's `Linear` and
//! `LayerNorm`). Weights are handles into the model's [`SharedStore`].
use crate::Result;
use ggml::{Context, SharedStore, Tensor, TensorRef};

/// Which ops compute attention, joins and GELU: ggml's (`flash_attn_ext`, `concat`,
/// `gelu_precise`'s element-wise ops), or on a CPU with AVX-512 our own
/// (`Context::attention_cpu`, `join_cpu`, `gelu_cpu`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuOps {
    pub own: bool,
    /// Our attention may multiply in bf16 (on CPUs with AVX-512 BF16): the tower's
    /// matrices are not f32, so they already round more than that (see
    /// `ggml::Context::attention_cpu`). An f32 model keeps f32 throughout.
    pub bf16_attention: bool,
}

impl CpuOps {
    /// Attention of q [d, n_q, H, B] over k/v [d, n_kv, H_kv, B]; result [d, H, n_q, B].
    #[allow(clippy::too_many_arguments)]
    pub fn attention<'c>(
        &self,
        ctx: &'c Context,
        q: Tensor<'_>,
        k: Tensor<'_>,
        v: Tensor<'_>,
        mask: Option<Tensor<'_>>,
        scale: f32,
        softcap: f32,
    ) -> Result<Tensor<'c>> {
        Ok(if self.own {
            ctx.attention_cpu(q, k, v, mask, scale, softcap, self.bf16_attention)?
        } else {
            ctx.flash_attn_ext(q, k, v, mask, scale, softcap)?
        })
    }

    /// The results of several sequences' attention [d, H, n_i] as one [d, H, sum n_i].
    pub fn join<'c>(&self, ctx: &'c Context, parts: &[Tensor<'c>]) -> Result<Tensor<'c>> {
        if self.own {
            return Ok(ctx.join_cpu(parts, 2)?);
        }
        let (&first, rest) = parts
            .split_first()
            .ok_or_else(|| crate::Error::Invalid("an empty batch".into()))?;
        rest.iter()
            .try_fold(first, |joined, &part| Ok(ctx.concat(joined, part, 2)?))
    }

    /// GELU (tanh approximation, in f32) of `x`, times `times` if given.
    pub fn gelu<'c>(
        &self,
        ctx: &'c Context,
        x: Tensor<'_>,
        times: Option<Tensor<'_>>,
    ) -> Result<Tensor<'c>> {
        Ok(if self.own {
            ctx.gelu_cpu(x, times)?
        } else {
            ctx.gelu_precise(x, times)?
        })
    }
}

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
    pub fn forward<'c>(
        &self,
        ctx: &'c Context,
        store: &SharedStore,
        x: Tensor<'_>,
    ) -> Result<Tensor<'c>> {
        let w = store.get(self.w);
        let (k, have) = (w.ne()[0], x.ne()[0]);
        let x = if k > have {
            ctx.pad(x, [k - have, 0, 0, 0])?
        } else {
            x
        };
        let y = if self.packed {
            ctx.mul_mat_packed(w, x)?
        } else {
            ctx.mul_mat(w, x)?
        };
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
    pub fn forward<'c>(
        &self,
        ctx: &'c Context,
        store: &SharedStore,
        x: Tensor<'_>,
    ) -> Result<Tensor<'c>> {
        Ok(ctx.add(
            ctx.mul(ctx.norm(x, self.eps)?, store.get(self.w))?,
            store.get(self.b),
        )?)
    }
}

/// `rms_norm(x) * w` (Gemma's `1 + w` is stored in the file).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RmsNorm {
    pub w: TensorRef,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward<'c>(
        &self,
        ctx: &'c Context,
        store: &SharedStore,
        x: Tensor<'_>,
    ) -> Result<Tensor<'c>> {
        Ok(ctx.mul(ctx.rms_norm(x, self.eps)?, store.get(self.w))?)
    }
}
