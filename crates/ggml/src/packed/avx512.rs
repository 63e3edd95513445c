//! The packed kernels on AVX-512 (F, BW, VNNI) with F16C: 16 outputs per vector, up
//! to 8 activation rows per tile.
use super::driver::{ROWS, act, entry_points, prepare_rows, q4_k_scale_min, split_sums, tiles};
use super::{ACT_BLOCK_BYTES, BF16, BLOCK, F16, GROUP, Q4_0, Q4_K, Q8_0};
use std::arch::x86_64::*;

entry_points! {
    quantize: quantize_row;
    multiply_q4_0: Q4_0, tiles!(8, tile_b32, false);
    multiply_q8_0: Q8_0, tiles!(8, tile_b32, true);
    multiply_q4_k: Q4_K, tiles!(8, tile_q4_k);
    multiply_f16: F16, tiles!(8, tile_half, false);
    multiply_bf16: BF16, tiles!(8, tile_half, true);
    multiply_bf16_dot: BF16, tiles!(8, tile_bf16_dot);
}

/// Rounds each row of `src[0]` (f32, any row strides) to bf16, to nearest even, into
/// the contiguous rows of `dst`: the activations of `tile_bf16_dot`.
pub unsafe extern "C" fn round_rows_bf16(
    dst: *mut crate::sys::ggml_tensor,
    ith: i32,
    nth: i32,
    _: *mut std::ffi::c_void,
) {
    // SAFETY: ggml hands allocated tensors of the shapes `mul_mat_packed` built.
    unsafe {
        let k = (*(*dst).src[0]).ne[0] as usize;
        prepare_rows(dst, ith, nth, k * 2, |src, out| round_row_bf16(src, out, k));
    }
}

/// `k` floats to bf16 with `vcvtneps2bf16`, 16 at a time.
///
/// # Safety
/// `src` holds `k` floats, `dst` room for `k` bf16; the CPU has AVX-512 BF16.
#[target_feature(enable = "avx512f,avx512bw,f16c,avx512bf16")]
unsafe fn round_row_bf16(src: *const f32, dst: *mut u8, k: usize) {
    // SAFETY: as the caller promises.
    unsafe { crate::simd::row_bf16(src as *const u8, false, k, dst as *mut u16) }
}

/// bf16 weights by pairs of inputs times activations rounded to bf16: per pair, one
/// `vdpbf16ps` per row adds both products to each row's f32 sum.
///
/// # Safety
/// `w` holds `pairs` packed pairs, each `a[i]` `2 * pairs` bf16, each `out[i]` room for
/// 16 floats; the CPU has AVX-512 BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_bf16_dot<const R: usize>(
    w: *const u8,
    pairs: usize,
    a: &[*const u8; ROWS],
    out: &[*mut f32; ROWS],
) {
    // SAFETY: as the caller promises.
    unsafe {
        let weights = |p: usize| bf16s(_mm512_loadu_si512(w.add(p * GROUP * 4) as *const __m512i));
        let x = |i: usize, p: usize| {
            bf16s(_mm512_set1_epi32(
                (a[i] as *const i32).add(p).read_unaligned(),
            ))
        };
        let sums = split_sums::<R, _, _>(
            pairs,
            _mm512_setzero_ps(),
            weights,
            |sum, v, i, p| _mm512_dpbf16_ps(sum, v, x(i, p)),
            |a, b| _mm512_add_ps(a, b),
        );
        for (i, sum) in sums.iter().enumerate() {
            _mm512_storeu_ps(out[i], *sum);
        }
    }
}

/// A vector of 32 bf16 seen as the type `vdpbf16ps` takes.
#[inline(always)]
fn bf16s(v: __m512i) -> __m512bh {
    // SAFETY: both are 64 bytes of plain bits.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// Quantizes one row of `blocks * 32` floats exactly as ggml's q8_0 does.
///
/// # Safety
/// `src` holds `blocks * 32` floats, `dst` room for `blocks` activation blocks; the CPU
/// has AVX-512 F/BW and F16C.
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn quantize_row(src: *const f32, dst: *mut u8, blocks: usize) {
    // SAFETY: `src` holds `blocks * 32` floats, `dst` `blocks * 40` bytes.
    unsafe {
        for b in 0..blocks {
            let (v0, v1) = (
                _mm512_loadu_ps(src.add(b * BLOCK)),
                _mm512_loadu_ps(src.add(b * BLOCK + 16)),
            );
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            // ggml's q8_0 exactly: the scale is kept as f16, the values are multiplied
            // by 127 / amax and rounded to nearest even.
            let scale = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
                _mm_set_ss(amax / 127.0),
            )));
            let inv = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let (q0, q1) = (
                _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)),
                _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv)),
            );
            let out = dst.add(b * ACT_BLOCK_BYTES);
            _mm_storeu_si128(out as *mut __m128i, _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128(out.add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(q1));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            (out.add(BLOCK) as *mut f32).write_unaligned(scale);
            (out.add(BLOCK + 4) as *mut f32).write_unaligned(scale * sum as f32);
        }
    }
}

/// q4_0 and q8_0 (`EIGHT_BIT`): per block, 8 `vpdpbusd` per row into integer sums of
/// the stored weights made unsigned (q4_0's nibbles are the value + 8; q8_0's bytes
/// get + 128 by flipping their top bit), then `scale_w * (scale_a * sum - offset *
/// scale_a * sum(a))` into f32 accumulators.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn tile_b32<const R: usize, const EIGHT_BIT: bool>(
    w: *const u8,
    blocks: usize,
    a: &[*const u8; ROWS],
    out: &[*mut f32; ROWS],
) {
    // SAFETY: `w` holds `blocks` packed blocks, each `a[i]` `blocks` activation blocks,
    // each `out[i]` room for 16 floats.
    unsafe {
        let (low, top) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(-128));
        let (f, offset) = if EIGHT_BIT {
            (Q8_0, 128.0)
        } else {
            (Q4_0, 8.0)
        };
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let wb = w.add(b * GROUP * f.bytes);
            let scales = _mm512_cvtph_ps(_mm256_loadu_si256(wb as *const __m256i));
            let mut sums = [_mm512_setzero_si512(); R];
            // A chunk of 64 bytes is 16 rows x 4 inputs (q8_0) or two such vectors
            // (q4_0: inputs 4p.. in the low nibbles, 16 + 4p.. in the high ones).
            if EIGHT_BIT {
                for p in 0..8 {
                    let v = _mm512_xor_si512(
                        _mm512_loadu_si512(wb.add(32 + p * 64) as *const __m512i),
                        top,
                    );
                    for i in 0..R {
                        let (q, _, _) = act(a[i], b);
                        sums[i] = _mm512_dpbusd_epi32(
                            sums[i],
                            v,
                            _mm512_set1_epi32(q.add(p).read_unaligned()),
                        );
                    }
                }
            } else {
                for p in 0..4 {
                    let raw = _mm512_loadu_si512(wb.add(32 + p * 64) as *const __m512i);
                    let lo = _mm512_and_si512(raw, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                    for i in 0..R {
                        let (q, _, _) = act(a[i], b);
                        sums[i] = _mm512_dpbusd_epi32(
                            sums[i],
                            lo,
                            _mm512_set1_epi32(q.add(p).read_unaligned()),
                        );
                        sums[i] = _mm512_dpbusd_epi32(
                            sums[i],
                            hi,
                            _mm512_set1_epi32(q.add(4 + p).read_unaligned()),
                        );
                    }
                }
            }
            for i in 0..R {
                let (_, scale, scaled_sum) = act(a[i], b);
                let t = _mm512_fmsub_ps(
                    _mm512_cvtepi32_ps(sums[i]),
                    _mm512_set1_ps(scale),
                    _mm512_set1_ps(offset * scaled_sum),
                );
                acc[i] = _mm512_fmadd_ps(scales, t, acc[i]);
            }
        }
        for i in 0..R {
            _mm512_storeu_ps(out[i], acc[i]);
        }
    }
}

/// f16 and bf16 (`BF16`): per input, its 16 weights made f32 and one FMA per row with
/// the broadcast activation.
///
/// # Safety
/// `w` holds `blocks` packed blocks (f16: one input each, bf16: a pair), each `a[i]`
/// that many inputs as f32, each `out[i]` room for 16 floats; the CPU has AVX-512 F/BW
/// and F16C.
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn tile_half<const R: usize, const BF16: bool>(
    w: *const u8,
    blocks: usize,
    a: &[*const u8; ROWS],
    out: &[*mut f32; ROWS],
) {
    // SAFETY: as the caller promises.
    unsafe {
        let inputs = if BF16 { 2 * blocks } else { blocks };
        let weights = |k: usize| {
            if BF16 {
                // Lane `j` holds row `j`'s inputs `k & !1` (low half) and `k | 1`.
                let v = _mm512_loadu_si512(w.add(k / 2 * GROUP * 4) as *const __m512i);
                _mm512_castsi512_ps(if k.is_multiple_of(2) {
                    _mm512_slli_epi32::<16>(v)
                } else {
                    _mm512_and_si512(v, _mm512_set1_epi32(-65536))
                })
            } else {
                _mm512_cvtph_ps(_mm256_loadu_si256(w.add(k * GROUP * 2) as *const __m256i))
            }
        };
        let x = |i: usize, k: usize| _mm512_set1_ps((a[i] as *const f32).add(k).read());
        let sums = split_sums::<R, _, _>(
            inputs,
            _mm512_setzero_ps(),
            weights,
            |sum, v, i, k| _mm512_fmadd_ps(v, x(i, k), sum),
            |a, b| _mm512_add_ps(a, b),
        );
        for (i, sum) in sums.iter().enumerate() {
            _mm512_storeu_ps(out[i], *sum);
        }
    }
}

/// q4_K: per sub-block of 32, 8 `vpdpbusd` per row, then
/// `d * sc * scale_a * sum - dmin * m * scale_a * sum(a)` into f32 accumulators.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn tile_q4_k<const R: usize>(
    w: *const u8,
    blocks: usize,
    a: &[*const u8; ROWS],
    out: &[*mut f32; ROWS],
) {
    // SAFETY: as in `tile_b32`, with q4_K's blocks of 256 inputs (8 activation blocks).
    unsafe {
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let wb = w.add(b * GROUP * Q4_K.bytes);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(wb as *const __m256i));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(wb.add(32) as *const __m256i));
            let sb = |i: usize| _mm_loadu_si128(wb.add(64 + i * GROUP) as *const __m128i);
            for s in 0..8 {
                let (sc, m) = q4_k_scale_min(sb, s);
                let scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
                let min = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m)));
                let mut sums = [_mm512_setzero_si512(); R];
                for t in 0..8 {
                    let raw =
                        _mm512_loadu_si512(wb.add(256 + ((s / 2) * 8 + t) * 64) as *const __m512i);
                    let v = if s % 2 == 0 {
                        _mm512_and_si512(raw, low)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low)
                    };
                    for i in 0..R {
                        let (q, _, _) = act(a[i], b * 8 + s);
                        sums[i] = _mm512_dpbusd_epi32(
                            sums[i],
                            v,
                            _mm512_set1_epi32(q.add(t).read_unaligned()),
                        );
                    }
                }
                for i in 0..R {
                    let (_, sa, scaled_sum) = act(a[i], b * 8 + s);
                    acc[i] = _mm512_fmadd_ps(
                        scale,
                        _mm512_mul_ps(_mm512_cvtepi32_ps(sums[i]), _mm512_set1_ps(sa)),
                        acc[i],
                    );
                    acc[i] = _mm512_fnmadd_ps(min, _mm512_set1_ps(scaled_sum), acc[i]);
                }
            }
        }
        for i in 0..R {
            _mm512_storeu_ps(out[i], acc[i]);
        }
    }
}
