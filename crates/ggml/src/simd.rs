//! Lane-wise math on AVX-512 vectors that our CPU ops share (attention's softmax, GELU).
#![cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The lanes of the first `count` (at most 16) elements.
pub(crate) fn lanes(count: usize) -> u16 {
    if count >= 16 {
        u16::MAX
    } else {
        (1u16 << count) - 1
    }
}

/// `exp(x)` lane-wise to about 1 ulp: `2^n exp(r)` with `|r| <= ln 2 / 2` and a degree-7
/// Taylor polynomial. Lanes at or below -103 give exactly 0 (masked attention scores);
/// at or above 88.7, `exp(88.7)` (finite).
#[inline(always)]
pub(crate) unsafe fn exp(x: __m512) -> __m512 {
    // SAFETY: register arithmetic only (the caller enables AVX-512F).
    unsafe {
        let zero = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, _mm512_set1_ps(-103.0));
        let x = _mm512_max_ps(
            _mm512_min_ps(x, _mm512_set1_ps(88.7)),
            _mm512_set1_ps(-103.0),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_maskz_mov_ps(!zero, _mm512_scalef_ps(p, n))
    }
}
