//! What the packed kernels of every instruction set share: preparing the activation
//! rows, handing out the work to ggml's threads, reading an activation block, and the
//! macro that makes a set's ggml entry points.
use super::{ACT_BLOCK_BYTES, BLOCK, Format, GROUP};
use crate::{Context, sys};
use std::arch::x86_64::*;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Most rows of activations one tile call takes.
pub const ROWS: usize = 8;
/// Groups of 16 outputs a thread takes at a time.
const GROUPS_PER_CHUNK: usize = 4;

/// A tile kernel: 16 outputs of the first `R` rows (`R` its place in its table plus
/// one), over `blocks` blocks.
pub type Tile = unsafe fn(*const u8, usize, &[*const u8; ROWS], &[*mut f32; ROWS]);

/// The tile kernel `$tile` (with its further generic arguments) for 1 to `$n` rows.
macro_rules! tiles {
    (4, $tile:ident $(, $arg:expr)?) => {
        [$tile::<1 $(, $arg)?>, $tile::<2 $(, $arg)?>, $tile::<3 $(, $arg)?>, $tile::<4 $(, $arg)?>]
    };
    (8, $tile:ident $(, $arg:expr)?) => {
        [$tile::<1 $(, $arg)?>, $tile::<2 $(, $arg)?>, $tile::<3 $(, $arg)?>, $tile::<4 $(, $arg)?>, $tile::<5 $(, $arg)?>, $tile::<6 $(, $arg)?>, $tile::<7 $(, $arg)?>, $tile::<8 $(, $arg)?>]
    };
}
pub(super) use tiles;

/// One instruction set's ggml entry points: `quantize_rows` with its row quantizer,
/// and a multiplication per format with its tile table.
macro_rules! entry_points {
    (quantize: $quantize:ident; $($name:ident: $format:expr, $tiles:expr;)*) => {
        /// Quantizes each row of `src[0]` (f32, any row strides) into the contiguous rows of `dst`.
        pub unsafe extern "C" fn quantize_rows(
            dst: *mut crate::sys::ggml_tensor,
            ith: i32,
            nth: i32,
            _: *mut std::ffi::c_void,
        ) {
            // SAFETY: ggml hands allocated tensors of the shapes `mul_mat_packed` built.
            unsafe { super::driver::quantize_rows(dst, ith, nth, $quantize) }
        }
        $(
            pub unsafe extern "C" fn $name(
                dst: *mut crate::sys::ggml_tensor,
                _: i32,
                _: i32,
                _: *mut std::ffi::c_void,
            ) {
                // SAFETY: ggml calls it on the node `mul_mat_packed` built, as `multiply` requires.
                unsafe { super::driver::multiply(dst, $format, &$tiles) }
            }
        )*
    };
}
pub(super) use entry_points;

/// The work counter after `offset` bytes of quantized or gathered rows, at the next
/// multiple of 8 (f32 rows of an odd width times an odd count end off it).
///
/// # Safety
/// `q` was built by `mul_mat_packed` with those rows.
unsafe fn counter<'a>(q: *const sys::ggml_tensor, offset: usize) -> &'a AtomicUsize {
    // SAFETY: `super::COUNTER_BYTES` (64, room for the rounding and the counter) follow the
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

/// Quantizes this thread's share of the rows of `dst`'s source with `quantize_row`
/// (`src` holding `blocks * 32` floats, `dst` room for `blocks` activation blocks).
///
/// # Safety
/// `dst` was built by `mul_mat_packed` for a quantized format.
pub unsafe fn quantize_rows(
    dst: *mut sys::ggml_tensor,
    ith: i32,
    nth: i32,
    quantize_row: unsafe fn(*const f32, *mut u8, usize),
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
pub unsafe fn prepare_rows(
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

/// `dst = src[0]^T src[1]`: packed weights of format `f` times prepared rows, `tiles`
/// taking up to `tiles.len()` rows at a time. Each group's weights stay in cache while
/// every row passes. Threads take chunks of groups from a shared counter rather than
/// fixed shares, as ggml's own products do: a thread that loses its core to another
/// process then holds up the others by one chunk, not by its whole share.
///
/// # Safety
/// `src[0]` was packed by `pack` in format `f`, `src[1]` written by the same
/// instruction set's `quantize_rows` (`gather_rows` for f16 and bf16); `tiles` run on
/// this CPU.
pub unsafe fn multiply(dst: *mut sys::ggml_tensor, f: Format, tiles: &[Tile]) {
    // SAFETY: see above; ggml hands allocated tensors of the shapes `mul_mat_packed` built.
    unsafe {
        let (d, w, q) = (&*dst, &*(*dst).src[0], (*dst).src[1]);
        let blocks = w.ne[0] as usize / f.inputs;
        let rows = (d.ne[1] * d.ne[2] * d.ne[3]) as usize;
        // The prepared rows fill `src[1]` but for the counter's room.
        let row_bytes = ((*q).ne[0] as usize - super::COUNTER_BYTES) / rows.max(1);
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
                    let n = (rows - r0).min(tiles.len());
                    let mut a = [row(r0); ROWS];
                    let mut out = [ptr::null_mut(); ROWS];
                    for i in 0..n {
                        a[i] = row(r0 + i);
                        out[i] =
                            (d.data as *mut u8).add((r0 + i) * d.nb[1] + g * GROUP * 4) as *mut f32;
                    }
                    tiles[n - 1](wg, blocks, &a, &out);
                    r0 += n;
                }
            }
        }
    }
}

/// The activation block `b` of a row: its 32 quants, its scale, scale * sum.
///
/// # Safety
/// The row `a` holds block `b`.
#[inline(always)]
pub unsafe fn act(a: *const u8, b: usize) -> (*const i32, f32, f32) {
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

/// The sums of `n` steps for the first `R` rows, in vectors `V` of any width: step `k`
/// loads `weights(k)` once and adds it into each row's sum with
/// `add(sum, weights, row, k)` (an FMA, a dot product). Below 4 rows the steps go to
/// interleaved partial sums, joined with `join` at the end, so that at least 4
/// independent chains hide the latency of the FMA or dot product (decoding has one
/// row). No intrinsics of its own: it takes the instruction set of the kernel it is
/// inlined into, whose closures it calls.
#[inline(always)]
pub fn split_sums<const R: usize, W: Copy, V: Copy>(
    n: usize,
    zero: V,
    weights: impl Fn(usize) -> W,
    add: impl Fn(V, W, usize, usize) -> V,
    join: impl Fn(V, V) -> V,
) -> [V; R] {
    const UNROLL: usize = 4;
    let split = if R >= UNROLL { 1 } else { UNROLL / R };
    let mut acc = [[zero; R]; UNROLL];
    let whole = n / UNROLL * UNROLL;
    for k in (0..whole).step_by(UNROLL) {
        for u in 0..UNROLL {
            let v = weights(k + u);
            for (i, sum) in acc[u % split].iter_mut().enumerate() {
                *sum = add(*sum, v, i, k + u);
            }
        }
    }
    for k in whole..n {
        let v = weights(k);
        for (i, sum) in acc[0].iter_mut().enumerate() {
            *sum = add(*sum, v, i, k);
        }
    }
    std::array::from_fn(|i| {
        acc.iter()
            .take(split)
            .skip(1)
            .fold(acc[0][i], |sum, part| join(sum, part[i]))
    })
}

/// The 6-bit scales and minimums of q4_K's sub-block `s` (0..8) for the rows whose 12
/// scale bytes `byte(i)` returns (one row per byte lane), as ggml's
/// `get_scale_min_k4` decodes them.
///
/// # Safety
/// `byte` reads bytes the caller owns.
#[inline(always)]
pub unsafe fn q4_k_scale_min(byte: impl Fn(usize) -> __m128i, s: usize) -> (__m128i, __m128i) {
    // SAFETY: SSE2 is part of x86-64; `byte` is the caller's.
    unsafe {
        let (six, four) = (_mm_set1_epi8(63), _mm_set1_epi8(0x0F));
        // Bits 6-7 to 4-5.
        let top2 = |v: __m128i| _mm_and_si128(_mm_srli_epi16::<2>(v), _mm_set1_epi8(0x30));
        if s < 4 {
            (_mm_and_si128(byte(s), six), _mm_and_si128(byte(s + 4), six))
        } else {
            let v = byte(s + 4);
            (
                _mm_or_si128(_mm_and_si128(v, four), top2(byte(s - 4))),
                _mm_or_si128(_mm_and_si128(_mm_srli_epi16::<4>(v), four), top2(byte(s))),
            )
        }
    }
}
