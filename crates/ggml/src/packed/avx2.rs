//! The packed kernels on AVX2 with FMA and F16C, for the x86-64 CPUs without AVX-512
//! (Intel before Ice Lake and its client chips since Alder Lake, AMD before Zen 4).
//!
//! The weights are the same packed bytes as for AVX-512; a 64-byte chunk of 16 rows is
//! two 256-bit vectors of 8 rows, and a tile takes the group's two halves one after the
//! other, up to 4 activation rows at a time (16 vector registers).
//!
//! Without VNNI the byte products are `vpmaddubsw` (unsigned bytes times signed bytes,
//! pairs summed into 16 bits) and `vpmaddwd` by ones into 32 bits:
//! - q4_0 and q4_K: the stored nibbles (0..15) are the unsigned operand as they are, so
//!   a pair is at most 2 x 15 x 127 = 3,810 and a block's 8 products add up in 16 bits
//!   (at most 30,480) before one widening; the offset (8, q4_K's minimum) comes off
//!   with `sum(a)` as on AVX-512;
//! - q8_0: the signed weights' magnitudes meet the activations carrying the weights'
//!   signs (`vpsignb`), as ggml's AVX2 kernel does; a pair can reach 32,512, so each
//!   product is widened at once.
use super::driver::{ROWS, act, entry_points, q4_k_scale_min, split_sums, tiles};
use super::{ACT_BLOCK_BYTES, BF16, BLOCK, F16, GROUP, Q4_0, Q4_K, Q8_0};
use std::arch::x86_64::*;

entry_points! {
    quantize: quantize_row;
    multiply_q4_0: Q4_0, tiles!(4, tile_b32, false);
    multiply_q8_0: Q8_0, tiles!(4, tile_b32, true);
    multiply_q4_k: Q4_K, tiles!(4, tile_q4_k);
    multiply_f16: F16, tiles!(4, tile_half, false);
    multiply_bf16: BF16, tiles!(4, tile_half, true);
}

/// Outputs per vector: half a group.
const HALF_GROUP: usize = GROUP / 2;

/// Quantizes one row of `blocks * 32` floats exactly as ggml's q8_0 (and the AVX-512
/// quantizer) does: the scale kept as f16, the values multiplied by 127 / amax and
/// rounded to nearest even.
///
/// # Safety
/// `src` holds `blocks * 32` floats, `dst` room for `blocks` activation blocks; the CPU
/// has AVX2 and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row(src: *const f32, dst: *mut u8, blocks: usize) {
    // SAFETY: as the caller promises.
    unsafe {
        for b in 0..blocks {
            let v = std::slice::from_raw_parts(src.add(b * BLOCK), BLOCK);
            let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            let scale = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
                _mm_set_ss(amax / 127.0),
            )));
            let inv = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let out = dst.add(b * ACT_BLOCK_BYTES);
            let mut sum = 0i32;
            for (i, x) in v.iter().enumerate() {
                let q = (x * inv).round_ties_even().clamp(-128.0, 127.0) as i32;
                out.add(i).write(q as i8 as u8);
                sum += q;
            }
            (out.add(BLOCK) as *mut f32).write_unaligned(scale);
            (out.add(BLOCK + 4) as *mut f32).write_unaligned(scale * sum as f32);
        }
    }
}

/// The 8 f16 values at `p` as f32.
#[inline(always)]
unsafe fn halves(p: *const u8) -> __m256 {
    // SAFETY: the caller's `p` holds 16 bytes; F16C is enabled where this is inlined.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}

/// Four activation bytes at `q`, broadcast.
#[inline(always)]
unsafe fn broadcast(q: *const i32) -> __m256i {
    // SAFETY: the caller's `q` holds 4 bytes.
    unsafe { _mm256_set1_epi32(q.read_unaligned()) }
}

/// q4_0 and q8_0 (`EIGHT_BIT`), 16 outputs of `R` (at most 4) rows. One or two rows
/// (decoding) take both halves of the group in one pass over its blocks, for more
/// independent work per loaded byte; more rows take the halves one after the other,
/// which keeps their sums in registers.
///
/// # Safety
/// `w` holds `blocks` packed blocks, each `a[i]` `blocks` activation blocks, each
/// `out[i]` room for 16 floats; the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_b32<const R: usize, const EIGHT_BIT: bool>(
    w: *const u8,
    blocks: usize,
    a: &[*const u8; ROWS],
    out: &[*mut f32; ROWS],
) {
    // SAFETY: as the caller promises.
    unsafe {
        if R <= 2 {
            halves_b32::<R, 2, EIGHT_BIT>(w, blocks, a, out, 0);
        } else {
            halves_b32::<R, 1, EIGHT_BIT>(w, blocks, a, out, 0);
            halves_b32::<R, 1, EIGHT_BIT>(w, blocks, a, out, 1);
        }
    }
}

/// `H` halves of the group from half `first` on, for `tile_b32`: per block, the integer
/// sums (see the module documentation), then
/// `scale_w * (scale_a * sum - offset * scale_a * sum(a))` into f32 accumulators.
///
/// # Safety
/// As for `tile_b32`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn halves_b32<const R: usize, const H: usize, const EIGHT_BIT: bool>(
    w: *const u8,
    blocks: usize,
    a: &[*const u8; ROWS],
    out: &[*mut f32; ROWS],
    first: usize,
) {
    // SAFETY: as the caller promises.
    unsafe {
        let (low, ones) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1));
        let (f, offset) = if EIGHT_BIT { (Q8_0, 0.0) } else { (Q4_0, 8.0) };
        let mut acc = [[_mm256_setzero_ps(); R]; H];
        for b in 0..blocks {
            let wb = w.add(b * GROUP * f.bytes);
            let chunk = |p: usize, h: usize| {
                _mm256_loadu_si256(wb.add(32 + p * 64 + (first + h) * 32) as *const __m256i)
            };
            let mut sums = [[_mm256_setzero_si256(); R]; H];
            if EIGHT_BIT {
                for p in 0..8 {
                    for (h, sums) in sums.iter_mut().enumerate() {
                        let v = chunk(p, h);
                        let magnitude = _mm256_abs_epi8(v);
                        for (i, sum) in sums.iter_mut().enumerate() {
                            let (q, _, _) = act(a[i], b);
                            let signed = _mm256_sign_epi8(broadcast(q.add(p)), v);
                            let pairs = _mm256_maddubs_epi16(magnitude, signed);
                            *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
                        }
                    }
                }
            } else {
                let mut pairs = [[_mm256_setzero_si256(); R]; H];
                for p in 0..4 {
                    for (h, pairs) in pairs.iter_mut().enumerate() {
                        let raw = chunk(p, h);
                        let lo = _mm256_and_si256(raw, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                        for (i, pair) in pairs.iter_mut().enumerate() {
                            let (q, _, _) = act(a[i], b);
                            let both = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, broadcast(q.add(p))),
                                _mm256_maddubs_epi16(hi, broadcast(q.add(4 + p))),
                            );
                            *pair = _mm256_add_epi16(*pair, both);
                        }
                    }
                }
                for (sums, pairs) in sums.iter_mut().zip(&pairs) {
                    for (sum, pair) in sums.iter_mut().zip(pairs) {
                        *sum = _mm256_madd_epi16(*pair, ones);
                    }
                }
            }
            for (h, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
                let scales = halves(wb.add((first + h) * 16));
                for (i, (acc, sum)) in acc.iter_mut().zip(sums).enumerate() {
                    let (_, scale, scaled_sum) = act(a[i], b);
                    let t = _mm256_fmsub_ps(
                        _mm256_cvtepi32_ps(*sum),
                        _mm256_set1_ps(scale),
                        _mm256_set1_ps(offset * scaled_sum),
                    );
                    *acc = _mm256_fmadd_ps(scales, t, *acc);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            for (i, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out[i].add((first + h) * HALF_GROUP), *acc);
            }
        }
    }
}

/// f16 and bf16 (`BF16`), 16 outputs of `R` (at most 4) rows: per input, each half's 8
/// weights made f32 and one FMA per row with the broadcast activation.
///
/// # Safety
/// `w` holds `blocks` packed blocks (f16: one input each, bf16: a pair), each `a[i]`
/// that many inputs as f32, each `out[i]` room for 16 floats; the CPU has AVX2, FMA
/// and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_half<const R: usize, const BF16: bool>(
    w: *const u8,
    blocks: usize,
    a: &[*const u8; ROWS],
    out: &[*mut f32; ROWS],
) {
    // SAFETY: as the caller promises.
    unsafe {
        let inputs = if BF16 { 2 * blocks } else { blocks };
        let weights = |k: usize, h: usize| {
            if BF16 {
                // Lane `j` holds row `8h + j`'s inputs `k & !1` (low half) and `k | 1`.
                let v = _mm256_loadu_si256(w.add(k / 2 * GROUP * 4 + h * 32) as *const __m256i);
                _mm256_castsi256_ps(if k.is_multiple_of(2) {
                    _mm256_slli_epi32::<16>(v)
                } else {
                    _mm256_and_si256(v, _mm256_set1_epi32(-65536))
                })
            } else {
                halves(w.add(k * GROUP * 2 + h * 16))
            }
        };
        let x = |i: usize, k: usize| _mm256_set1_ps((a[i] as *const f32).add(k).read());
        for h in 0..2 {
            let sums = split_sums::<R, _, _>(
                inputs,
                _mm256_setzero_ps(),
                |k| weights(k, h),
                |sum, v, i, k| _mm256_fmadd_ps(v, x(i, k), sum),
                |a, b| _mm256_add_ps(a, b),
            );
            for (i, sum) in sums.iter().enumerate() {
                _mm256_storeu_ps(out[i].add(h * HALF_GROUP), *sum);
            }
        }
    }
}

/// q4_K, 16 outputs of `R` (at most 4) rows, the halves of the group taken as in
/// `tile_b32`.
///
/// # Safety
/// As for `tile_b32`, with q4_K's blocks of 256 inputs (8 activation blocks).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q4_k<const R: usize>(
    w: *const u8,
    blocks: usize,
    a: &[*const u8; ROWS],
    out: &[*mut f32; ROWS],
) {
    // SAFETY: as the caller promises.
    unsafe {
        if R <= 2 {
            halves_q4_k::<R, 2>(w, blocks, a, out, 0);
        } else {
            halves_q4_k::<R, 1>(w, blocks, a, out, 0);
            halves_q4_k::<R, 1>(w, blocks, a, out, 1);
        }
    }
}

/// `H` halves of the group from half `first` on, for `tile_q4_k`: per sub-block of 32,
/// 8 `vpmaddubsw` per row summed in 16 bits, then
/// `d * sc * scale_a * sum - dmin * m * scale_a * sum(a)` into f32 accumulators.
///
/// # Safety
/// As for `tile_q4_k`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn halves_q4_k<const R: usize, const H: usize>(
    w: *const u8,
    blocks: usize,
    a: &[*const u8; ROWS],
    out: &[*mut f32; ROWS],
    first: usize,
) {
    // SAFETY: as the caller promises.
    unsafe {
        let (low, ones) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1));
        let mut acc = [[_mm256_setzero_ps(); R]; H];
        for b in 0..blocks {
            let wb = w.add(b * GROUP * Q4_K.bytes);
            for s in 0..8 {
                let mut pairs = [[_mm256_setzero_si256(); R]; H];
                for t in 0..8 {
                    for (h, pairs) in pairs.iter_mut().enumerate() {
                        let raw = _mm256_loadu_si256(
                            wb.add(256 + ((s / 2) * 8 + t) * 64 + (first + h) * 32)
                                as *const __m256i,
                        );
                        let v = if s % 2 == 0 {
                            _mm256_and_si256(raw, low)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low)
                        };
                        for (i, pair) in pairs.iter_mut().enumerate() {
                            let (q, _, _) = act(a[i], b * 8 + s);
                            *pair = _mm256_add_epi16(
                                *pair,
                                _mm256_maddubs_epi16(v, broadcast(q.add(t))),
                            );
                        }
                    }
                }
                for (h, (acc, pairs)) in acc.iter_mut().zip(&pairs).enumerate() {
                    let half = first + h;
                    // This half's 8 rows of the 6-bit scale and minimum bytes `i`.
                    let sb = |i: usize| {
                        _mm_loadl_epi64(wb.add(64 + i * GROUP + half * 8) as *const __m128i)
                    };
                    let (sc, m) = q4_k_scale_min(sb, s);
                    let scale = _mm256_mul_ps(
                        halves(wb.add(half * 16)),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)),
                    );
                    let min = _mm256_mul_ps(
                        halves(wb.add(32 + half * 16)),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m)),
                    );
                    for (i, (acc, pair)) in acc.iter_mut().zip(pairs).enumerate() {
                        let (_, sa, scaled_sum) = act(a[i], b * 8 + s);
                        let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(*pair, ones));
                        *acc = _mm256_fmadd_ps(scale, _mm256_mul_ps(sum, _mm256_set1_ps(sa)), *acc);
                        *acc = _mm256_fnmadd_ps(min, _mm256_set1_ps(scaled_sum), *acc);
                    }
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            for (i, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out[i].add((first + h) * HALF_GROUP), *acc);
            }
        }
    }
}
