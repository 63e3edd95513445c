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

/// Elements `at..at + count` (count <= 16) of an f16 or f32 row as f32, the rest 0.
#[inline(always)]
pub(crate) unsafe fn load16(src: *const u8, f16: bool, at: usize, count: usize) -> __m512 {
    // SAFETY: the row holds `at + count` elements; the masked lanes are not read (the
    // caller enables AVX-512 F/BW and F16C).
    unsafe {
        if f16 {
            let bits = _mm512_maskz_loadu_epi16(lanes(count) as u32, src.add(2 * at) as *const i16);
            _mm512_cvtph_ps(_mm512_castsi512_si256(bits))
        } else {
            _mm512_maskz_loadu_ps(lanes(count), src.add(4 * at) as *const f32)
        }
    }
}

/// A row of `k` f16 or f32 elements rounded to bf16 (to nearest even, `vcvtneps2bf16`),
/// 16 at a time.
#[inline(always)]
pub(crate) unsafe fn row_bf16(src: *const u8, f16: bool, k: usize, dst: *mut u16) {
    // SAFETY: `src` holds `k` elements, `dst` room for `k` bf16; masked lanes are neither
    // read nor written (the caller enables AVX-512 F/BW, F16C and BF16).
    unsafe {
        for at in (0..k).step_by(16) {
            let count = (k - at).min(16);
            let b = _mm512_cvtneps_pbh(load16(src, f16, at, count));
            _mm512_mask_storeu_epi16(
                dst.add(at) as *mut i16,
                lanes(count) as u32,
                _mm512_castsi256_si512(std::mem::transmute::<__m256bh, __m256i>(b)),
            );
        }
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
