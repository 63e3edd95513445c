//! q4_0, q8_0 and q4_K matrix products with AVX-512 VNNI, for the many-row products of
//! prefill and the vision tower (and the one-row products of decoding, which they also
//! run at memory speed).
//!
//! Why this exists: ggml's repacked kernels turn every weight into a signed byte and
//! spend three more instructions on each `vpdpbusd` to make one operand unsigned, which
//! leaves them near 40% of the core's int8 peak. Here the weights are made unsigned as
//! stored (q4's nibbles are already the value plus 8 or above the block's minimum; q8_0's
//! bytes get 128 added by flipping their top bit) and feed `vpdpbusd` as they are; what
//! that added (8, 128, q4_K's minimum) comes off once per block of 32 as a multiple of
//! `sum(a)`, a sum taken when the activations are quantized.
//!
//! A packed matrix holds the very bytes of the file, regrouped by 16 output rows, so it
//! is exactly as large. Per group of 16 rows, block by block:
//! - q4_0 (32 inputs, 288 bytes): the 16 rows' f16 scales, then 4 chunks of 64 bytes
//!   where chunk `p` holds bytes `4p..4p+4` of each row's 16 quant bytes: a byte's low
//!   nibble is input `4p + t`, its high nibble input `16 + 4p + t`.
//! - q8_0 (32 inputs, 544 bytes): the 16 scales, then 8 chunks of 64 bytes where chunk
//!   `p` holds inputs `4p..4p+4` of each row.
//! - q4_K (256 inputs, 2304 bytes): the 16 `d`, the 16 `dmin` (f16), the 12 bytes of
//!   6-bit scales and minimums as 12 vectors of 16 rows, then 32 chunks of 64 bytes where
//!   chunk `8c + t` holds bytes `32c + 4t..+4` of each row's 128 quant bytes: low nibbles
//!   are sub-block `2c`, high nibbles sub-block `2c + 1`, inputs `4t..4t+4` of each.
//!
//! Every way, one 32-bit broadcast of four activations meets 16 rows at once.
//!
//! Activations are quantized per block of 32 exactly as ggml's q8_0 does (q4_0's and
//! q8_0's products then differ from ggml's only in the order of float sums; ggml
//! quantizes q4_K's activations per 256 instead, so those differ by that rounding).
//!
//! f16 and bf16 matrices (the SigLIP tower of a default conversion, whole f16 models)
//! are packed as one 16-row vector of weights per input: `vcvtph2ps` (or a shift, for
//! bf16) gives 16 f32 weights that meet one broadcast activation in an FMA, 8 rows at
//! a time. The activations stay f32, where ggml rounds them to f16 (or bf16) first, so
//! these products are nearer the exact one than ggml's; ggml's own f16 kernel (tinyBLAS)
//! also converts both operands on every step and runs at about half the FMA peak.
use crate::error::shape;
use crate::{Context, Error, Result, Tensor, Type};

/// Inputs per activation block (q8_0's, q4_0's, a q4_K sub-block).
const BLOCK: usize = 32;
/// Output rows per packed group: one 512-bit vector of f32 results.
const GROUP: usize = 16;
/// Bytes of one quantized activation block: 32 quants, the scale, scale * sum.
const ACT_BLOCK_BYTES: usize = BLOCK + 8;
/// Room after the quantized rows for the multiplication's work counter.
const COUNTER_BYTES: usize = 64;

/// The packed formats: inputs and bytes per block of one row, and whether the
/// activations stay f32 (f16, bf16: a "block" is one input) or are quantized.
#[derive(Clone, Copy)]
struct Format {
    inputs: usize,
    bytes: usize,
    float: bool,
}

const Q4_0: Format = Format {
    inputs: 32,
    bytes: 18,
    float: false,
};
const Q4_K: Format = Format {
    inputs: 256,
    bytes: 144,
    float: false,
};
const Q8_0: Format = Format {
    inputs: 32,
    bytes: 34,
    float: false,
};
const HALF: Format = Format {
    inputs: 1,
    bytes: 2,
    float: true,
};

fn format(ty: Type) -> Option<Format> {
    match ty {
        Type::Q4_0 => Some(Q4_0),
        Type::Q4_K => Some(Q4_K),
        Type::Q8_0 => Some(Q8_0),
        Type::F16 | Type::BF16 => Some(HALF),
        _ => None,
    }
}

impl Format {
    /// Bytes of one row of `k` activations as the multiplication reads them.
    fn activation_row_bytes(self, k: usize) -> usize {
        if self.float {
            k * 4
        } else {
            k / BLOCK * ACT_BLOCK_BYTES
        }
    }
}

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
    format(ty).is_some_and(|f| {
        shape.len() == 2 && shape[0].is_multiple_of(f.inputs) && shape[1].is_multiple_of(GROUP)
    })
}

/// Regroups an f16, bf16, q4_0, q8_0 or q4_K matrix of `outputs` rows of `inputs` values into the packed layout.
pub fn pack(ty: Type, data: &[u8], inputs: usize, outputs: usize) -> Result<Vec<u8>> {
    let f = match format(ty) {
        Some(f) if packable(ty, &[inputs, outputs]) => f,
        _ => {
            return Err(shape(
                "pack",
                format!(
                    "{} [{inputs}, {outputs}]: f16, bf16, q4_0, q8_0 or q4_K with whole blocks of inputs and outputs in groups of {GROUP}",
                    ty.name()
                ),
            ));
        }
    };
    let blocks = inputs / f.inputs;
    let expected = outputs * blocks * f.bytes;
    if data.len() != expected {
        return Err(Error::DataSize {
            name: format!("<{} matrix>", ty.name()),
            got: data.len(),
            expected,
        });
    }
    let mut out = vec![0u8; expected];
    if f.float {
        // Per group, input `k`'s 16 weights side by side; each source row read in order.
        for (g, group) in out.chunks_exact_mut(inputs * GROUP * 2).enumerate() {
            for j in 0..GROUP {
                let row = &data[(g * GROUP + j) * inputs * 2..][..inputs * 2];
                for (k, w) in row.chunks_exact(2).enumerate() {
                    group[(k * GROUP + j) * 2..][..2].copy_from_slice(w);
                }
            }
        }
        return Ok(out);
    }
    for (g, group) in out.chunks_exact_mut(blocks * GROUP * f.bytes).enumerate() {
        for (b, packed) in group.chunks_exact_mut(GROUP * f.bytes).enumerate() {
            for j in 0..GROUP {
                let src = &data[((g * GROUP + j) * blocks + b) * f.bytes..][..f.bytes];
                // Every quantized format starts with an f16 scale (`d`).
                packed[2 * j..2 * j + 2].copy_from_slice(&src[..2]);
                if ty != Type::Q4_K {
                    // q4_0's 16 and q8_0's 32 quant bytes, 4 at a time.
                    for p in 0..(f.bytes - 2) / 4 {
                        packed[32 + p * 64 + j * 4..][..4].copy_from_slice(&src[2 + 4 * p..][..4]);
                    }
                } else {
                    packed[32 + 2 * j..32 + 2 * j + 2].copy_from_slice(&src[2..4]);
                    for i in 0..12 {
                        packed[64 + i * GROUP + j] = src[4 + i];
                    }
                    for chunk in 0..32 {
                        packed[256 + chunk * 64 + j * 4..][..4]
                            .copy_from_slice(&src[16 + 4 * chunk..][..4]);
                    }
                }
            }
        }
    }
    Ok(out)
}

impl Context {
    /// `w^T x` for a weight packed by [`pack`] (typed f16, bf16, q4_0, q8_0 or q4_K, shape
    /// `[k, n]`) and f32 `x` of shape `[k, ...]`: two graph nodes, one quantizing the rows
    /// of `x` (f16, bf16: gathering them as they are), one multiplying. CPU backends
    /// only, and only where [`available`].
    pub fn mul_mat_packed<'s>(&'s self, w: Tensor<'_>, x: Tensor<'_>) -> Result<Tensor<'s>> {
        let (wn, xn) = (w.ne(), x.ne());
        if !packable(w.ty(), &w.shape()) || x.ty() != Type::F32 || xn[0] != wn[0] || x.nb()[0] != 4
        {
            return Err(shape(
                "mul_mat_packed",
                format!(
                    "{} {:?} x {} {:?}",
                    w.ty().name(),
                    w.shape(),
                    x.ty().name(),
                    x.shape()
                ),
            ));
        }
        if !available() {
            return Err(shape(
                "mul_mat_packed",
                "this CPU lacks AVX-512 VNNI".to_string(),
            ));
        }
        self.room_for(2)?;
        // The quantized (or gathered) rows, then the multiplication's work counter (see `kernels::multiply`).
        let f = format(w.ty()).expect("packable");
        let rows = xn[1] * xn[2] * xn[3];
        let prepare = if f.float {
            kernels::gather_rows
        } else {
            kernels::quantize_rows
        };
        let q = self.custom(
            Type::I8,
            [
                rows * f.activation_row_bytes(xn[0]) + COUNTER_BYTES,
                1,
                1,
                1,
            ],
            &[x],
            prepare,
            0,
        )?;
        let multiply = match w.ty() {
            Type::Q4_0 => kernels::multiply_q4_0,
            Type::Q8_0 => kernels::multiply_q8_0,
            Type::Q4_K => kernels::multiply_q4_k,
            Type::F16 => kernels::multiply_f16,
            _ => kernels::multiply_bf16,
        };
        self.custom(
            Type::F32,
            [wn[1], xn[1], xn[2], xn[3]],
            &[w, q],
            multiply,
            0,
        )
    }
}

/// The kernels, called by ggml's CPU threads (`ith` of `nth`) on allocated tensors.
#[cfg(target_arch = "x86_64")]
mod kernels {
    use super::{ACT_BLOCK_BYTES, BLOCK, Format, GROUP, HALF, Q4_0, Q4_K, Q8_0};
    use crate::{Context, sys};
    use std::arch::x86_64::*;
    use std::ptr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Rows of activations per tile: 8 rows x 16 outputs keep the sums in registers.
    const ROWS: usize = 8;
    /// Groups of 16 outputs a thread takes at a time.
    const GROUPS_PER_CHUNK: usize = 4;

    /// A tile kernel: 16 outputs of the first `R` rows, over `blocks` blocks.
    type Tile = unsafe fn(*const u8, usize, &[*const u8; ROWS], &[*mut f32; ROWS]);

    /// The work counter after `offset` bytes of quantized or gathered rows, at the next
    /// multiple of 8 (f32 rows of an odd width times an odd count end off it).
    ///
    /// # Safety
    /// `q` was built by `mul_mat_packed` with those rows.
    unsafe fn counter<'a>(q: *const sys::ggml_tensor, offset: usize) -> &'a AtomicUsize {
        // SAFETY: `COUNTER_BYTES` (64, room for the rounding and the counter) follow the
        // rows in `q`'s allocation, and ggml aligns tensor data to at least 32 bytes; the
        // counter lives while the graph runs.
        unsafe {
            AtomicUsize::from_ptr(
                (*q).data
                    .cast::<u8>()
                    .add(offset.next_multiple_of(8))
                    .cast(),
            )
        }
    }

    /// The part `[ith * n / nth, (ith + 1) * n / nth)` of `n` items.
    fn share(n: usize, ith: i32, nth: i32) -> std::ops::Range<usize> {
        let (i, t) = (ith.max(0) as usize, nth.max(1) as usize);
        i * n / t..(i + 1) * n / t
    }

    /// Quantizes each row of `src[0]` (f32, any row strides) into the contiguous rows of `dst`.
    pub unsafe extern "C" fn quantize_rows(
        dst: *mut sys::ggml_tensor,
        ith: i32,
        nth: i32,
        _: *mut std::ffi::c_void,
    ) {
        // SAFETY: ggml hands allocated tensors of the shapes `mul_mat_packed` built.
        unsafe {
            let blocks = (*(*dst).src[0]).ne[0] as usize / BLOCK;
            prepare_rows(dst, ith, nth, blocks * ACT_BLOCK_BYTES, |src, out| {
                quantize_row(src, out, blocks)
            });
        }
    }

    /// Copies each row of `src[0]` (f32, any row strides) into the contiguous rows of `dst`.
    pub unsafe extern "C" fn gather_rows(
        dst: *mut sys::ggml_tensor,
        ith: i32,
        nth: i32,
        _: *mut std::ffi::c_void,
    ) {
        // SAFETY: ggml hands allocated tensors of the shapes `mul_mat_packed` built.
        unsafe {
            let k = (*(*dst).src[0]).ne[0] as usize;
            prepare_rows(dst, ith, nth, k * 4, |src, out| {
                ptr::copy_nonoverlapping(src, out as *mut f32, k)
            });
        }
    }

    /// This thread's share of the rows of `src[0]`, each handed to `write` with its place
    /// among `dst`'s contiguous rows of `row_bytes`; thread 0 then resets the work counter.
    ///
    /// # Safety
    /// `dst` was built by `mul_mat_packed` with rows of `row_bytes`, and `write` writes
    /// at most that many bytes.
    unsafe fn prepare_rows(
        dst: *mut sys::ggml_tensor,
        ith: i32,
        nth: i32,
        row_bytes: usize,
        write: impl Fn(*const f32, *mut u8),
    ) {
        // SAFETY: as the caller promises; every row index is inside `src[0]`.
        unsafe {
            let (d, x) = (&*dst, &*(*dst).src[0]);
            let (n1, n2) = (x.ne[1] as usize, x.ne[2] as usize);
            let rows = n1 * n2 * x.ne[3] as usize;
            for r in share(rows, ith, nth) {
                let src = Context::row_start(x, r % n1, r / n1 % n2, r / (n1 * n2)) as *const f32;
                write(src, (d.data as *mut u8).add(r * row_bytes));
            }
            if ith == 0 {
                counter(dst, rows * row_bytes).store(0, Ordering::Relaxed);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    unsafe fn quantize_row(src: *const f32, dst: *mut u8, blocks: usize) {
        // SAFETY: `src` holds `blocks * 32` floats, `dst` `blocks * 40` bytes.
        unsafe {
            for b in 0..blocks {
                let (v0, v1) = (
                    _mm512_loadu_ps(src.add(b * BLOCK)),
                    _mm512_loadu_ps(src.add(b * BLOCK + 16)),
                );
                let amax =
                    _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
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

    /// The tile kernel `$tile` (with its further generic arguments) for 1 to 8 rows.
    macro_rules! tiles {
        ($tile:ident $(, $arg:expr)?) => {
            [$tile::<1 $(, $arg)?>, $tile::<2 $(, $arg)?>, $tile::<3 $(, $arg)?>, $tile::<4 $(, $arg)?>, $tile::<5 $(, $arg)?>, $tile::<6 $(, $arg)?>, $tile::<7 $(, $arg)?>, $tile::<8 $(, $arg)?>]
        };
    }

    pub unsafe extern "C" fn multiply_q4_0(
        dst: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
        // SAFETY: as `multiply` requires.
        unsafe { multiply(dst, Q4_0, &tiles!(tile_b32, false)) }
    }

    pub unsafe extern "C" fn multiply_q8_0(
        dst: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
        // SAFETY: as `multiply` requires.
        unsafe { multiply(dst, Q8_0, &tiles!(tile_b32, true)) }
    }

    pub unsafe extern "C" fn multiply_q4_k(
        dst: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
        // SAFETY: as `multiply` requires.
        unsafe { multiply(dst, Q4_K, &tiles!(tile_q4_k)) }
    }

    pub unsafe extern "C" fn multiply_f16(
        dst: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
        // SAFETY: as `multiply` requires.
        unsafe { multiply(dst, HALF, &tiles!(tile_half, false)) }
    }

    pub unsafe extern "C" fn multiply_bf16(
        dst: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
        // SAFETY: as `multiply` requires.
        unsafe { multiply(dst, HALF, &tiles!(tile_half, true)) }
    }

    /// `dst = src[0]^T src[1]`: packed weights of format `f` times quantized rows. Each
    /// group's weights stay in cache while every row passes. Threads take chunks of
    /// groups from a shared counter rather than fixed shares, as ggml's own products do:
    /// a thread that loses its core to another process then holds up the others by one
    /// chunk, not by its whole share.
    ///
    /// # Safety
    /// `src[0]` was packed by `pack` in format `f`, `src[1]` written by `quantize_rows`
    /// (`gather_rows` for f16 and bf16).
    unsafe fn multiply(dst: *mut sys::ggml_tensor, f: Format, tiles: &[Tile; ROWS]) {
        // SAFETY: see above; ggml hands allocated tensors of the shapes `mul_mat_packed` built.
        unsafe {
            let (d, w, q) = (&*dst, &*(*dst).src[0], (*dst).src[1]);
            let blocks = w.ne[0] as usize / f.inputs;
            let rows = (d.ne[1] * d.ne[2] * d.ne[3]) as usize;
            let row_bytes = f.activation_row_bytes(w.ne[0] as usize);
            let row = |r: usize| ((*q).data as *const u8).add(r * row_bytes);
            let next = counter(q, rows * row_bytes);
            let groups = w.ne[1] as usize / GROUP;
            loop {
                let start = next.fetch_add(GROUPS_PER_CHUNK, Ordering::Relaxed);
                if start >= groups {
                    break;
                }
                for g in start..(start + GROUPS_PER_CHUNK).min(groups) {
                    let wg = (w.data as *const u8).add(g * blocks * GROUP * f.bytes);
                    let mut r0 = 0;
                    while r0 < rows {
                        let n = (rows - r0).min(ROWS);
                        let mut a = [row(r0); ROWS];
                        let mut out = [ptr::null_mut(); ROWS];
                        for i in 0..n {
                            a[i] = row(r0 + i);
                            out[i] = (d.data as *mut u8).add((r0 + i) * d.nb[1] + g * GROUP * 4)
                                as *mut f32;
                        }
                        tiles[n - 1](wg, blocks, &a, &out);
                        r0 += n;
                    }
                }
            }
        }
    }

    /// The activation block `b` of a row: its 32 quants, its scale, scale * sum.
    #[inline(always)]
    unsafe fn act(a: *const u8, b: usize) -> (*const i32, f32, f32) {
        // SAFETY: the caller's row holds block `b`.
        unsafe {
            let p = a.add(b * ACT_BLOCK_BYTES);
            let f = p.add(BLOCK) as *const f32;
            (
                p as *const i32,
                f.read_unaligned(),
                f.add(1).read_unaligned(),
            )
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
    /// the broadcast activation. Below 4 rows the sum over inputs is split into
    /// interleaved partial sums, so that at least 4 independent FMA chains hide the
    /// FMA's latency (decoding has one row).
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    unsafe fn tile_half<const R: usize, const BF16: bool>(
        w: *const u8,
        inputs: usize,
        a: &[*const u8; ROWS],
        out: &[*mut f32; ROWS],
    ) {
        // SAFETY: `w` holds `inputs` vectors of 16 weights, each `a[i]` `inputs` floats,
        // each `out[i]` room for 16 floats.
        unsafe {
            const UNROLL: usize = 4;
            let split = if R >= UNROLL { 1 } else { UNROLL / R };
            let weights = |k: usize| {
                let v = _mm256_loadu_si256(w.add(k * GROUP * 2) as *const __m256i);
                if BF16 {
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
                } else {
                    _mm512_cvtph_ps(v)
                }
            };
            let x = |i: usize, k: usize| _mm512_set1_ps((a[i] as *const f32).add(k).read());
            let mut acc = [[_mm512_setzero_ps(); R]; UNROLL];
            let whole = inputs / UNROLL * UNROLL;
            for k in (0..whole).step_by(UNROLL) {
                for u in 0..UNROLL {
                    let v = weights(k + u);
                    for (i, sum) in acc[u % split].iter_mut().enumerate() {
                        *sum = _mm512_fmadd_ps(v, x(i, k + u), *sum);
                    }
                }
            }
            for k in whole..inputs {
                let v = weights(k);
                for (i, sum) in acc[0].iter_mut().enumerate() {
                    *sum = _mm512_fmadd_ps(v, x(i, k), *sum);
                }
            }
            for i in 0..R {
                let mut sum = acc[0][i];
                for part in acc.iter().take(split).skip(1) {
                    sum = _mm512_add_ps(sum, part[i]);
                }
                _mm512_storeu_ps(out[i], sum);
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
        // SAFETY: as in `tile_q4_0`, with q4_K's blocks of 256 inputs (8 activation blocks).
        unsafe {
            let low = _mm512_set1_epi8(0x0F);
            let (six, four) = (_mm_set1_epi8(63), _mm_set1_epi8(0x0F));
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..blocks {
                let wb = w.add(b * GROUP * Q4_K.bytes);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(wb as *const __m256i));
                let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(wb.add(32) as *const __m256i));
                let sb = |i: usize| _mm_loadu_si128(wb.add(64 + i * GROUP) as *const __m128i);
                let top2 = |v: __m128i| _mm_and_si128(_mm_srli_epi16::<2>(v), _mm_set1_epi8(0x30)); // bits 6-7 to 4-5
                for s in 0..8 {
                    // The 6-bit scale and minimum of sub-block `s` for the 16 rows (ggml's get_scale_min_k4).
                    let (sc, m) = if s < 4 {
                        (_mm_and_si128(sb(s), six), _mm_and_si128(sb(s + 4), six))
                    } else {
                        let v = sb(s + 4);
                        (
                            _mm_or_si128(_mm_and_si128(v, four), top2(sb(s - 4))),
                            _mm_or_si128(_mm_and_si128(_mm_srli_epi16::<4>(v), four), top2(sb(s))),
                        )
                    };
                    let scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
                    let min = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m)));
                    let mut sums = [_mm512_setzero_si512(); R];
                    for t in 0..8 {
                        let raw = _mm512_loadu_si512(
                            wb.add(256 + ((s / 2) * 8 + t) * 64) as *const __m512i
                        );
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
}

/// Never called: [`available`] is false off x86-64, so no graph holds these ops.
#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    use crate::sys;
    pub unsafe extern "C" fn quantize_rows(
        _: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
    }
    pub unsafe extern "C" fn multiply_q4_0(
        _: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
    }
    pub unsafe extern "C" fn multiply_q4_k(
        _: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
    }
    pub unsafe extern "C" fn multiply_q8_0(
        _: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
    }
    pub unsafe extern "C" fn gather_rows(
        _: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
    }
    pub unsafe extern "C" fn multiply_f16(
        _: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
    }
    pub unsafe extern "C" fn multiply_bf16(
        _: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
    }
}
