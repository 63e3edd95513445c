//! GELU (the tanh approximation), optionally times a second tensor, as one pass on the
//! CPU.
//!
//! Why this exists: [`Context::gelu_precise`] is five of ggml's element-wise ops, each a
//! pass over the MLP's widest activation, and Gemma's gated MLP adds a sixth for the
//! product with the up projection. At 896 px SigLIP's 4096 patches x 4304 features make
//! that 70 MB per pass in each of 27 layers: memory traffic, not arithmetic. One op
//! reads its inputs and writes its result once, with the same formula in f32:
//! `x sigmoid(2u)` with `u = sqrt(2/pi) (x + 0.044715 x^3)`, which is
//! `0.5 x (1 + tanh(u))`.
use crate::packed::{self, Kernels};
use crate::{Context, Result, Tensor, Type};

impl Context {
    /// `gelu_precise(x, times)` as one op on the CPUs our AVX-512 kernels run on (see
    /// [`packed::kernels`]); elsewhere, or for tensors that are not contiguous f32,
    /// ggml's ops. Only for graphs that run on the CPU.
    pub fn gelu_cpu<'s>(&'s self, x: Tensor<'_>, times: Option<Tensor<'_>>) -> Result<Tensor<'s>> {
        let fits = |t: Tensor<'_>| t.ty() == Type::F32 && t.is_contiguous() && t.ne() == x.ne();
        if packed::kernels() >= Some(Kernels::Avx512Vnni) && fits(x) && times.is_none_or(fits) {
            let mut args = vec![x];
            args.extend(times);
            return self.custom(Type::F32, x.ne(), &args, kernel::gelu, 0);
        }
        self.gelu_precise(x, times)
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use crate::simd::{exp, lanes};
    use crate::sys;
    use std::arch::x86_64::*;

    /// The custom op: thread `ith` of `nth` computes its share of whole vectors.
    pub unsafe extern "C" fn gelu(
        dst: *mut sys::ggml_tensor,
        ith: i32,
        nth: i32,
        _: *mut std::ffi::c_void,
    ) {
        // SAFETY: ggml hands us the node `gelu_cpu` made: contiguous f32 sources of the
        // result's shape; each thread writes a disjoint range.
        unsafe {
            let d = &*dst;
            let n = sys::ggml_nelements(dst) as usize;
            let vectors = n.div_ceil(16);
            let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
            let lo = (vectors * ith / nth * 16).min(n);
            let hi = (vectors * (ith + 1) / nth * 16).min(n);
            let times = d.src[1].as_ref().map(|t| t.data as *const f32);
            range(
                (*d.src[0]).data as *const f32,
                times,
                d.data as *mut f32,
                lo,
                hi,
            );
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn range(x: *const f32, times: Option<*const f32>, out: *mut f32, lo: usize, hi: usize) {
        const TWO_SQRT_2_OVER_PI: f32 = 2.0 * 0.797_884_6;
        // SAFETY: `lo..hi` is inside every tensor; masked lanes are neither read nor written.
        unsafe {
            let (one, c1, c3) = (
                _mm512_set1_ps(1.0),
                _mm512_set1_ps(TWO_SQRT_2_OVER_PI),
                _mm512_set1_ps(TWO_SQRT_2_OVER_PI * 0.044715),
            );
            for at in (lo..hi).step_by(16) {
                let m = lanes(hi - at);
                let v = _mm512_maskz_loadu_ps(m, x.add(at));
                // 2u = x (c1 + c3 x^2); x sigmoid(2u) = x / (1 + exp(-2u)).
                let two_u = _mm512_mul_ps(v, _mm512_fmadd_ps(_mm512_mul_ps(v, v), c3, c1));
                let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), two_u));
                let mut g = _mm512_div_ps(v, _mm512_add_ps(one, e));
                if let Some(y) = times {
                    g = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, y.add(at)));
                }
                _mm512_mask_storeu_ps(out.add(at), m, g);
            }
        }
    }
}

/// Never called: [`packed::kernels`] is none off x86-64, so no graph holds this op.
#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use crate::sys;
    pub unsafe extern "C" fn gelu(
        _: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
    }
}
