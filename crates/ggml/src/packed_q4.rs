//! q4_0 matrix products with AVX-512 VNNI, for the many-row products of prefill and
//! the vision tower.
//!
//! Why this exists: ggml's repacked q4_0 kernel turns every 4-bit weight into a
//! signed byte and spends three more instructions on each `vpdpbusd` to make one
//! operand unsigned, which leaves it near 40% of the core's int8 peak. Here the
//! weights stay the unsigned nibbles q4_0 stores (the value plus 8) and feed
//! `vpdpbusd` as they are; the offset comes off once per block as `8 * sum(a)`, a sum
//! taken when the activations are quantized.
//!
//! The packed layout holds the very bytes of q4_0, regrouped by 16 output rows (so a
//! packed matrix is exactly as large as the file's): for each group of 16 rows and
//! each block of 32 inputs, the 16 rows' f16 scales (32 bytes), then 4 chunks of 64
//! bytes where chunk `p` holds bytes `4p..4p+4` of each row's 16 quant bytes. A byte's
//! low nibble is input `4p + t` and its high nibble input `16 + 4p + t`, so one
//! 32-bit broadcast of the activations meets 16 rows at once.
//!
//! Activations are quantized per block of 32 exactly as ggml's q8_0 does, so the two
//! engines multiply the same integers and differ only in the order of float sums.
use crate::error::shape;
use crate::{Context, Error, Result, Tensor, Type, sys};
use std::ptr;

/// Inputs per quantization block (q4_0's and q8_0's).
const BLOCK: usize = 32;
/// Output rows per packed group: one 512-bit vector of f32 results.
const GROUP: usize = 16;
/// Bytes of one q4_0 block: an f16 scale and 16 bytes of nibbles.
const Q4_0_BLOCK_BYTES: usize = 18;
/// Bytes of one packed block of a group: 16 scales and 16 x 16 bytes of nibbles.
const PACKED_BLOCK_BYTES: usize = GROUP * Q4_0_BLOCK_BYTES;
/// Bytes of one quantized activation block: 32 quants, the scale, the offset term.
const ACT_BLOCK_BYTES: usize = BLOCK + 8;

/// Whether this CPU runs the packed kernels (AVX-512 F/BW with VNNI, and F16C).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a weight of this type and shape (`[inputs, outputs]`) can be packed.
pub fn packable(ty: Type, shape: &[usize]) -> bool {
    ty == Type::Q4_0 && shape.len() == 2 && shape[0].is_multiple_of(BLOCK) && shape[1].is_multiple_of(GROUP)
}

/// Regroups a q4_0 matrix of `outputs` rows of `inputs` values into the packed layout.
pub fn pack_q4_0(data: &[u8], inputs: usize, outputs: usize) -> Result<Vec<u8>> {
    if !packable(Type::Q4_0, &[inputs, outputs]) {
        return Err(shape("pack_q4_0", format!("[{inputs}, {outputs}]: inputs must be a multiple of {BLOCK}, outputs of {GROUP}")));
    }
    let blocks = inputs / BLOCK;
    let expected = outputs * blocks * Q4_0_BLOCK_BYTES;
    if data.len() != expected {
        return Err(Error::DataSize { name: "<q4_0 matrix>".into(), got: data.len(), expected });
    }
    let mut out = vec![0u8; expected];
    for (g, group) in out.chunks_exact_mut(blocks * PACKED_BLOCK_BYTES).enumerate() {
        for (b, packed) in group.chunks_exact_mut(PACKED_BLOCK_BYTES).enumerate() {
            for j in 0..GROUP {
                let src = &data[((g * GROUP + j) * blocks + b) * Q4_0_BLOCK_BYTES..][..Q4_0_BLOCK_BYTES];
                packed[2 * j..2 * j + 2].copy_from_slice(&src[..2]);
                for p in 0..4 {
                    packed[2 * GROUP + p * 64 + j * 4..][..4].copy_from_slice(&src[2 + 4 * p..2 + 4 * p + 4]);
                }
            }
        }
    }
    Ok(out)
}

impl Context {
    /// `w^T x` for a weight packed by [`pack_q4_0`] (typed q4_0, shape `[k, n]`) and f32
    /// `x` of shape `[k, ...]`: two graph nodes, one quantizing the rows of `x`, one
    /// multiplying. CPU backends only, and only where [`available`].
    pub fn mul_mat_packed_q4_0<'s>(&'s self, w: Tensor<'_>, x: Tensor<'_>) -> Result<Tensor<'s>> {
        let (wn, xn) = (w.ne(), x.ne());
        if !packable(w.ty(), &w.shape()) || x.ty() != Type::F32 || xn[0] != wn[0] || x.nb()[0] != 4 {
            return Err(shape("mul_mat_packed_q4_0", format!("{} {:?} x {} {:?}", w.ty().name(), w.shape(), x.ty().name(), x.shape())));
        }
        if !available() {
            return Err(shape("mul_mat_packed_q4_0", "this CPU lacks AVX-512 VNNI".to_string()));
        }
        self.room_for(2)?;
        let row_bytes = xn[0] / BLOCK * ACT_BLOCK_BYTES;
        let q = self.custom(Type::I8, [row_bytes, xn[1], xn[2], xn[3]], &[x], kernels::quantize_rows)?;
        self.custom(Type::F32, [wn[1], xn[1], xn[2], xn[3]], &[w, q], kernels::multiply)
    }

    fn custom<'s>(
        &'s self,
        ty: Type,
        ne: [usize; 4],
        args: &[Tensor<'_>],
        fun: unsafe extern "C" fn(*mut sys::ggml_tensor, i32, i32, *mut std::ffi::c_void),
    ) -> Result<Tensor<'s>> {
        self.room()?;
        let mut srcs: Vec<*mut sys::ggml_tensor> = args.iter().map(|t| t.as_ptr()).collect();
        // SAFETY: valid context and tensors, positive dimensions taken from them; the callback only
        // reads its sources and writes its own result.
        let raw = unsafe {
            sys::ggml_custom_4d(
                self.as_ptr(),
                ty.raw(),
                ne[0] as i64,
                ne[1] as i64,
                ne[2] as i64,
                ne[3] as i64,
                srcs.as_mut_ptr(),
                srcs.len() as i32,
                Some(fun),
                -1,
                ptr::null_mut(),
            )
        };
        self.wrap("custom", raw)
    }
}

/// The two kernels, called by ggml's CPU threads (`ith` of `nth`) on allocated tensors.
#[cfg(target_arch = "x86_64")]
mod kernels {
    use super::{ACT_BLOCK_BYTES, BLOCK, GROUP, PACKED_BLOCK_BYTES};
    use crate::sys;
    use std::arch::x86_64::*;

    /// Rows of activations per tile: 8 rows x 16 outputs keep 16 accumulators in registers.
    const ROWS: usize = 8;

    /// The part `[ith * n / nth, (ith + 1) * n / nth)` of `n` items.
    fn share(n: usize, ith: i32, nth: i32) -> std::ops::Range<usize> {
        let (i, t) = (ith.max(0) as usize, nth.max(1) as usize);
        i * n / t..(i + 1) * n / t
    }

    /// Quantizes each row of `src[0]` (f32, any row strides) into the contiguous rows of `dst`.
    pub unsafe extern "C" fn quantize_rows(dst: *mut sys::ggml_tensor, ith: i32, nth: i32, _: *mut std::ffi::c_void) {
        // SAFETY: ggml hands allocated tensors of the shapes `mul_mat_packed_q4_0` built.
        unsafe {
            let (d, x) = (&*dst, &*(*dst).src[0]);
            let (n1, n2) = (x.ne[1] as usize, x.ne[2] as usize);
            let rows = n1 * n2 * x.ne[3] as usize;
            let blocks = x.ne[0] as usize / BLOCK;
            for r in share(rows, ith, nth) {
                let (i1, i2, i3) = (r % n1, r / n1 % n2, r / (n1 * n2));
                let src = (x.data as *const u8).add(i1 * x.nb[1] + i2 * x.nb[2] + i3 * x.nb[3]) as *const f32;
                quantize_row(src, (d.data as *mut u8).add(r * d.nb[1]), blocks);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    unsafe fn quantize_row(src: *const f32, dst: *mut u8, blocks: usize) {
        // SAFETY: `src` holds `blocks * 32` floats, `dst` `blocks * 40` bytes.
        unsafe {
            for b in 0..blocks {
                let (v0, v1) = (_mm512_loadu_ps(src.add(b * BLOCK)), _mm512_loadu_ps(src.add(b * BLOCK + 16)));
                let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
                // ggml's q8_0 exactly: the scale is kept as f16, the values are multiplied
                // by 127 / amax, so both engines see the same 8-bit activations.
                let scale = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(amax / 127.0))));
                let inv = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
                // Round to nearest (even), as ggml's SIMD q8_0 quantizers do.
                let (q0, q1) = (_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv)));
                let out = dst.add(b * ACT_BLOCK_BYTES);
                _mm_storeu_si128(out as *mut __m128i, _mm512_cvtsepi32_epi8(q0));
                _mm_storeu_si128(out.add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(q1));
                let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
                (out.add(BLOCK) as *mut f32).write_unaligned(scale);
                (out.add(BLOCK + 4) as *mut f32).write_unaligned(scale * 8.0 * sum as f32);
            }
        }
    }

    /// `dst = src[0]^T src[1]`: packed weights times quantized rows. Threads split the
    /// groups of 16 outputs; each group's weights stay in cache while every row passes.
    pub unsafe extern "C" fn multiply(dst: *mut sys::ggml_tensor, ith: i32, nth: i32, _: *mut std::ffi::c_void) {
        // SAFETY: as in `quantize_rows`; `src[0]` is packed by `pack_q4_0`, `src[1]` was
        // written by `quantize_rows`.
        unsafe {
            let (d, w, q) = (&*dst, &*(*dst).src[0], &*(*dst).src[1]);
            let blocks = w.ne[0] as usize / BLOCK;
            let rows = (q.ne[1] * q.ne[2] * q.ne[3]) as usize;
            for g in share(w.ne[1] as usize / GROUP, ith, nth) {
                let wg = (w.data as *const u8).add(g * blocks * PACKED_BLOCK_BYTES);
                let mut r0 = 0;
                while r0 < rows {
                    let n = (rows - r0).min(ROWS);
                    let mut a = [ptr_row(q, r0); ROWS];
                    let mut out = [ptr::null_mut(); ROWS];
                    for i in 0..n {
                        a[i] = ptr_row(q, r0 + i);
                        out[i] = (d.data as *mut u8).add((r0 + i) * d.nb[1] + g * GROUP * 4) as *mut f32;
                    }
                    match n {
                        8 => tile::<8>(wg, blocks, &a, &out),
                        7 => tile::<7>(wg, blocks, &a, &out),
                        6 => tile::<6>(wg, blocks, &a, &out),
                        5 => tile::<5>(wg, blocks, &a, &out),
                        4 => tile::<4>(wg, blocks, &a, &out),
                        3 => tile::<3>(wg, blocks, &a, &out),
                        2 => tile::<2>(wg, blocks, &a, &out),
                        _ => tile::<1>(wg, blocks, &a, &out),
                    }
                    r0 += n;
                }
            }
        }
    }

    use std::ptr;

    fn ptr_row(q: &sys::ggml_tensor, r: usize) -> *const u8 {
        (q.data as *const u8).wrapping_add(r * q.nb[1])
    }

    /// 16 outputs of `R` rows: per block, 8 `vpdpbusd` per row into integer sums, then
    /// `scale_w * (scale_a * sum - 8 * scale_a * sum(a))` into f32 accumulators.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn tile<const R: usize>(w: *const u8, blocks: usize, a: &[*const u8; ROWS], out: &[*mut f32; ROWS]) {
        // SAFETY: `w` holds `blocks` packed blocks, each `a[i]` `blocks` activation blocks,
        // each `out[i]` room for 16 floats.
        unsafe {
            let low = _mm512_set1_epi8(0x0F);
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..blocks {
                let wb = w.add(b * PACKED_BLOCK_BYTES);
                let scales = _mm512_cvtph_ps(_mm256_loadu_si256(wb as *const __m256i));
                let mut sums = [_mm512_setzero_si512(); R];
                for p in 0..4 {
                    let raw = _mm512_loadu_si512(wb.add(2 * GROUP + p * 64) as *const __m512i);
                    let lo = _mm512_and_si512(raw, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                    for i in 0..R {
                        let ab = a[i].add(b * ACT_BLOCK_BYTES) as *const i32;
                        sums[i] = _mm512_dpbusd_epi32(sums[i], lo, _mm512_set1_epi32(ab.add(p).read_unaligned()));
                        sums[i] = _mm512_dpbusd_epi32(sums[i], hi, _mm512_set1_epi32(ab.add(4 + p).read_unaligned()));
                    }
                }
                for i in 0..R {
                    let ab = a[i].add(b * ACT_BLOCK_BYTES + BLOCK) as *const f32;
                    let (scale, offset) = (ab.read_unaligned(), ab.add(1).read_unaligned());
                    let t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(sums[i]), _mm512_set1_ps(scale), _mm512_set1_ps(offset));
                    acc[i] = _mm512_fmadd_ps(scales, t, acc[i]);
                }
            }
            for i in 0..R {
                _mm512_storeu_ps(out[i], acc[i]);
            }
        }
    }
}

/// Never called: [`available`] is false off x86-64, so no graph holds these ops.
#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    use crate::sys;
    pub unsafe extern "C" fn quantize_rows(_: *mut sys::ggml_tensor, _: i32, _: i32, _: *mut std::ffi::c_void) {}
    pub unsafe extern "C" fn multiply(_: *mut sys::ggml_tensor, _: i32, _: i32, _: *mut std::ffi::c_void) {}
}
