//! Attention over many query rows (prefill, the vision tower) on AVX-512: our own
//! kernel for what ggml's `flash_attn_ext` computes, for f16 or f32 keys and values.
//!
//! Why this exists: ggml's CPU flash attention applies Gemma 2's logit soft-cap with one
//! scalar libm `tanhf` per score, re-converts the keys for every tile of 32 queries, and
//! took about a third of the demo model's prefill and 30% of a 448 px 3B frame.
//!
//! The layout puts query rows in vector lanes: one work item is up to 32 rows (64 with
//! bf16 products, below: the heads that share a key/value head, times a block of
//! queries), and each key's score for all of them is one to four vectors, computed as
//! products of a broadcast key element with the item's queries transposed once
//! (`[d][row]`). The online softmax (a reference maximum, rescales, exponentials, the
//! soft-cap as `1 - 2 / (exp(2x) + 1)`) then works lane-wise with no horizontal sums,
//! and the output accumulates transposed too, `out[d][row] += v[j][d] * p[j][row]`.
//! Keys and values are converted once per head and thread where a head has several
//! items, else chunk by chunk. Rows of one item that a block does not fill repeat its
//! last query and are not written.
//!
//! Two precisions, by the caller's choice and the kernel set ([`packed::kernels`]):
//! - **f32** (the `avx512` set, single queries, and callers that keep f32): FMAs on
//!   f32, as ggml's tiled path; within a few ulp of the exact result.
//! - **bf16 products** (asked for, the `avx512bf16` set, more than one query):
//!   `vdpbf16ps` on the queries, keys, probabilities and values rounded to bf16, with
//!   f32 sums and the softmax in f32: two products per lane and instruction, rounded as
//!   torch's bf16 attention and ggml's (which rounds queries to f16) also round. Queries
//!   and keys pair up along the head dimension; probabilities and values along the
//!   keys, so values are stored as pairs of rows interleaved. At 448 and 896 px, where
//!   SigLIP attends over 1024 and 4096 patches in each of its 27 layers, attention is
//!   most of the vision tower's time; this path halves its instructions.
//!
//! Decoding (one query of at most 4 heads per item) would leave most lanes empty in
//! that layout (14 of 16 for a 3B model's pairs of heads: 4.0 ms per layer at 4100
//! keys against ggml's 1.0-1.1), so such items put the keys in the lanes instead
//! (`Job::few_rows`): 1.0-1.5 ms there, 0.041 ms against ggml's 0.085 at 300
//! keys. Ours also does not depend on how ggml was compiled: in a portable `x86-64-v2`
//! build, ggml's scalar f16 attention took decode from 20 to 11-13 tokens/s. Key/value
//! types other than f16 and f32 keep ggml's op.
use crate::error::shape;
use crate::packed::Kernels;
use crate::{Context, Result, Tensor, Type, packed};

impl Context {
    /// `flash_attn_ext`'s result (q [d, n_q, H, B], k/v [d, n_kv, H_kv, B], mask F16
    /// [n_kv, >= n_q]; result [d, H, n_q, B]) from our CPU kernel where it applies (see the
    /// module documentation; with an AVX-512 set of [`packed::kernels`]), else from
    /// ggml's op. With `bf16_products`, where more than one query attends and the set has
    /// AVX-512 BF16, the products are taken in bf16; otherwise in f32. Only for graphs
    /// that run on the CPU.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_cpu<'s>(
        &'s self,
        q: Tensor<'_>,
        k: Tensor<'_>,
        v: Tensor<'_>,
        mask: Option<Tensor<'_>>,
        scale: f32,
        softcap: f32,
        bf16_products: bool,
    ) -> Result<Tensor<'s>> {
        match packed::kernels() {
            Some(set) if set >= Kernels::Avx512Vnni => {
                self.attention_cpu_on(set, q, k, v, mask, scale, softcap, bf16_products)
            }
            _ => self.flash_attn_ext(q, k, v, mask, scale, softcap),
        }
    }

    /// [`Context::attention_cpu`] on kernel set `set` (an AVX-512 set this CPU runs), or
    /// ggml's op where the shapes do not fit ours.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_cpu_on<'s>(
        &'s self,
        set: Kernels,
        q: Tensor<'_>,
        k: Tensor<'_>,
        v: Tensor<'_>,
        mask: Option<Tensor<'_>>,
        scale: f32,
        softcap: f32,
        bf16_products: bool,
    ) -> Result<Tensor<'s>> {
        if set < Kernels::Avx512Vnni || !set.runs_here() {
            return Err(shape(
                "attention_cpu",
                format!("the {} kernels have no attention", set.name()),
            ));
        }
        let (qn, kn, vn) = (q.ne(), k.ne(), v.ne());
        let element = |t: Tensor<'_>| {
            matches!(t.ty(), Type::F16 | Type::F32) && t.nb()[0] == t.ty().row_size(1).unwrap_or(0)
        };
        let fits = q.ty() == Type::F32
            && q.nb()[0] == 4
            && element(k)
            && element(v)
            && qn[0] == kn[0]
            && vn[0] == kn[0]
            && kn[1] == vn[1]
            && kn[2] == vn[2]
            && qn[2] % kn[2] == 0
            && qn[2] / kn[2] <= kernels::GROUPS
            && kn[3] == qn[3]
            && vn[3] == qn[3]
            && mask.is_none_or(|m| {
                m.ty() == Type::F16
                    && m.nb()[0] == 2
                    && m.ne()[0] == kn[1]
                    && m.ne()[1] >= qn[1]
                    && m.ne()[2] == 1
                    && m.ne()[3] == 1
            });
        if !fits {
            return self.flash_attn_ext(q, k, v, mask, scale, softcap);
        }
        if !softcap.is_finite() || !scale.is_finite() {
            return Err(shape(
                "attention_cpu",
                format!("scale {scale}, soft-cap {softcap}"),
            ));
        }
        let bf16 =
            bf16_products && set >= Kernels::Avx512Bf16 && qn[1] > 1 && qn[0].is_multiple_of(2);
        let mut args = vec![q, k, v];
        args.extend(mask);
        // Both factors travel in the pointer-sized user data (ggml never reads it).
        let params = (scale.to_bits() as u64 | (softcap.to_bits() as u64) << 32) as usize;
        self.custom(
            Type::F32,
            [kn[0], qn[2], qn[1], qn[3]],
            &args,
            if bf16 {
                kernels::attention_bf16
            } else {
                kernels::attention_f32
            },
            params,
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use crate::simd::{exp, lanes, load16, row_bf16};
    use crate::{Context, sys};
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Query heads per key/value head at most (an item holds whole groups).
    pub const GROUPS: usize = 32;
    /// Keys per chunk (even: the bf16 path pairs them).
    const KEYS: usize = 32;
    /// How far a score may rise above the softmax's reference maximum before the
    /// reference moves (probabilities stay below e^8, about 3000: no overflow in f32 or
    /// bf16 sums of thousands of keys).
    const SLACK: f32 = 8.0;

    thread_local! {
        /// Each ggml worker's scratch, kept between calls.
        static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// The custom op's entry with f32 products: `dst` [d, H, n_q, B] from `src` = q, k,
    /// v (, mask).
    pub unsafe extern "C" fn attention_f32(
        dst: *mut sys::ggml_tensor,
        ith: i32,
        nth: i32,
        params: *mut std::ffi::c_void,
    ) {
        // SAFETY: as `attention_cpu_on` checked.
        unsafe { entry::<F32>(dst, ith, nth, params) }
    }

    /// The same with bf16 products (the head size is even).
    pub unsafe extern "C" fn attention_bf16(
        dst: *mut sys::ggml_tensor,
        ith: i32,
        nth: i32,
        params: *mut std::ffi::c_void,
    ) {
        // SAFETY: as `attention_cpu_on` checked, on a CPU with AVX-512 BF16.
        unsafe { entry::<Bf16>(dst, ith, nth, params) }
    }

    unsafe fn entry<P: Products>(
        dst: *mut sys::ggml_tensor,
        ith: i32,
        nth: i32,
        params: *mut std::ffi::c_void,
    ) {
        let params = params as usize as u64;
        let (scale, cap) = (
            f32::from_bits(params as u32),
            f32::from_bits((params >> 32) as u32),
        );
        // SAFETY: ggml hands the allocated tensors `attention_cpu_on` checked.
        unsafe {
            let d = &*dst;
            let (q, k, v) = (&*d.src[0], &*d.src[1], &*d.src[2]);
            let mask = d.src[3].as_ref();
            let (n_q, heads, batch) = (q.ne[1] as usize, q.ne[2] as usize, q.ne[3] as usize);
            let kv_heads = k.ne[2] as usize;
            let group = heads / kv_heads;
            // Lane r of an item is head `r / block` of the group, query `first + r % block`.
            let block = (P::LANES / group).max(1).min(n_q);
            let blocks = n_q.div_ceil(block);
            let items = batch * kv_heads * blocks;
            let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
            let job = Job {
                whole_heads: blocks > 1,
                dst: d,
                q,
                k,
                v,
                mask,
                group,
                block,
                scale,
                cap,
            };
            // An item's sequence, key/value head and first query.
            let work = |item: usize| {
                (
                    item / (kv_heads * blocks),
                    item / blocks % kv_heads,
                    item % blocks * block,
                )
            };
            match group * block {
                1 if P::FEW_ROWS >= 1 => job.few_rows::<1>(ith, nth, items, work),
                2 if P::FEW_ROWS >= 2 => job.few_rows::<2>(ith, nth, items, work),
                3 if P::FEW_ROWS >= 3 => job.few_rows::<3>(ith, nth, items, work),
                4 if P::FEW_ROWS >= 4 => job.few_rows::<4>(ith, nth, items, work),
                rows => match rows.div_ceil(16) {
                    1 => job.run::<1, P>(ith, nth, items, work),
                    2 => job.run::<2, P>(ith, nth, items, work),
                    3 => job.run::<3, P>(ith, nth, items, work),
                    _ => job.run::<4, P>(ith, nth, items, work),
                },
            }
        }
    }

    /// An f16's bits as f32.
    #[inline(always)]
    unsafe fn half_to_f32(bits: u16) -> f32 {
        // SAFETY: register arithmetic only (the caller enables F16C).
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
    }

    /// `x` rounded to bf16 (to nearest, ties to even), as `vcvtneps2bf16` rounds finite values.
    fn bf16(x: f32) -> u32 {
        let b = x.to_bits();
        b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16
    }

    /// `vpermw`'s indices that interleave the halves of 32 bf16 (`a0..a15 b0..b15` into
    /// `a0 b0 a1 b1 ...`), so that lane `r` holds the pair `(a_r, b_r)`.
    static INTERLEAVE: [u16; 32] = {
        let mut t = [0u16; 32];
        let mut i = 0;
        while i < 16 {
            t[2 * i] = i as u16;
            t[2 * i + 1] = 16 + i as u16;
            i += 1;
        }
        t
    };

    /// Lane `r`: the pair `(bf16(a_r), bf16(b_r))` that `vdpbf16ps` multiplies.
    #[inline(always)]
    unsafe fn pairs(a: __m512, b: __m512) -> __m512i {
        // SAFETY: register arithmetic and a read of a static (the caller enables AVX-512 BF16).
        unsafe {
            let halves = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a));
            let order = _mm512_loadu_epi16(INTERLEAVE.as_ptr() as *const i16);
            _mm512_permutexvar_epi16(order, halves)
        }
    }

    /// A vector of 32 bf16 seen as the type `vdpbf16ps` takes.
    #[inline(always)]
    fn bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 64 plain bytes.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// `cap * tanh(x)` lane-wise, as `cap * (1 - 2 / (exp(2x) + 1))`.
    #[inline(always)]
    unsafe fn softcap(x: __m512, cap: __m512) -> __m512 {
        // SAFETY: register arithmetic only.
        unsafe {
            let one = _mm512_set1_ps(1.0);
            let e = exp(_mm512_add_ps(x, x));
            _mm512_mul_ps(
                cap,
                _mm512_sub_ps(
                    one,
                    _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(e, one)),
                ),
            )
        }
    }

    /// How an item multiplies: the layouts its queries, keys and values take in the
    /// scratch, the scores and the weighted sum of values. Every function is inlined
    /// into an item compiled with the features it needs.
    trait Products {
        /// Query rows per item at most.
        const LANES: usize;
        /// Key or value elements per 32-bit word of the scratch.
        const PACK: usize;
        /// Items of at most this many rows take `Job::few_rows` instead (keys in lanes).
        const FEW_ROWS: usize;
        /// Lane `r` of the transposed queries `qt` (`w` lanes) from a row of `hd` f32
        /// times `factor`.
        unsafe fn query(row: *const f32, hd: usize, factor: f32, r: usize, w: usize, qt: *mut f32);
        /// Key `j` into `keys` from an f16 or f32 row.
        unsafe fn key(src: *const u8, f16: bool, hd: usize, j: usize, keys: *mut f32);
        /// Values `2 * pair` and, unless it is past the last key, `2 * pair + 1` into `values`.
        unsafe fn values(
            a: *const u8,
            b: Option<*const u8>,
            f16: bool,
            hd: usize,
            pair: usize,
            values: *mut f32,
        );
        /// A probability as the products take it, so that the softmax's sum is of the
        /// same numbers (the rows' weights then add up to exactly 1).
        unsafe fn round(p: __m512) -> __m512;
        /// `acc + a * b` for each lane's `PACK` elements (a word's bits in each lane).
        unsafe fn madd(acc: __m512, a: __m512, b: __m512) -> __m512;
        /// The probabilities of a chunk's `n` keys, from `s` [KEYS][w], in the layout the
        /// values' products take ([n / PACK][w] words; `pp` is room for it).
        unsafe fn probabilities<const V: usize>(
            s: *const f32,
            pp: *mut f32,
            n: usize,
            w: usize,
        ) -> *const f32;
    }

    /// The scores of keys `j..j + t` (t <= 4; the other accumulators repeat the last key):
    /// `sum_d keys[j][d] * qt[d][lanes]`, `P::PACK` dimensions per word.
    #[inline(always)]
    unsafe fn scores<const V: usize, P: Products>(
        qt: *const f32,
        keys: *const f32,
        j: usize,
        t: usize,
        hd: usize,
        w: usize,
    ) -> [[__m512; V]; 4] {
        let words = hd / P::PACK;
        // SAFETY: keys `j..j + t` and `qt` [words][w] are in the scratch.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; 4];
            for i in 0..words {
                let qv: [__m512; V] =
                    std::array::from_fn(|c| _mm512_loadu_ps(qt.add(i * w + 16 * c)));
                for (u, a) in acc.iter_mut().enumerate() {
                    let kd = broadcast(keys.add((j + u.min(t - 1)) * words + i));
                    for (a, q) in a.iter_mut().zip(&qv) {
                        *a = P::madd(*a, kd, *q);
                    }
                }
            }
            acc
        }
    }

    /// `out[d][lanes] += sum_j values[j][d] * p[j][lanes]` over a chunk's `n` keys, with
    /// the probabilities in `s` [KEYS][w] (`pp`: room for them in the products' layout),
    /// 4 dimensions at a time.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn accumulate<const V: usize, P: Products>(
        s: *const f32,
        pp: *mut f32,
        values: *const f32,
        n: usize,
        hd: usize,
        w: usize,
        out: *mut f32,
    ) {
        // SAFETY: as the arguments say; values [n / PACK][hd] words.
        unsafe {
            let p = P::probabilities::<V>(s, pp, n, w);
            let words = n.div_ceil(P::PACK);
            let mut dd = 0;
            while dd < hd {
                let t = (hd - dd).min(4);
                let mut acc: [[__m512; V]; 4] = std::array::from_fn(|u| {
                    std::array::from_fn(|c| {
                        _mm512_loadu_ps(out.add((dd + u.min(t - 1)) * w + 16 * c))
                    })
                });
                for jw in 0..words {
                    let pv: [__m512; V] =
                        std::array::from_fn(|c| _mm512_loadu_ps(p.add(jw * w + 16 * c)));
                    for (u, a) in acc.iter_mut().enumerate() {
                        let vd = broadcast(values.add(jw * hd + dd + u.min(t - 1)));
                        for (a, p) in a.iter_mut().zip(&pv) {
                            *a = P::madd(*a, vd, *p);
                        }
                    }
                }
                store(&acc, t, out.add(dd * w), w);
                dd += t;
            }
        }
    }

    /// A scratch word's bits in every lane.
    #[inline(always)]
    unsafe fn broadcast(word: *const f32) -> __m512 {
        // SAFETY: `word` is in the scratch; read as bits, whatever they hold.
        unsafe { _mm512_castsi512_ps(_mm512_set1_epi32((word as *const i32).read())) }
    }

    /// f32 FMAs: queries `[d][lane]`, keys and values as rows of f32.
    struct F32;

    impl Products for F32 {
        const LANES: usize = 32;
        const PACK: usize = 1;
        const FEW_ROWS: usize = 4;

        #[inline(always)]
        unsafe fn round(p: __m512) -> __m512 {
            p
        }

        #[inline(always)]
        unsafe fn query(row: *const f32, hd: usize, factor: f32, r: usize, w: usize, qt: *mut f32) {
            // SAFETY: `row` holds `hd` floats, `qt` [hd][w].
            unsafe {
                for dd in 0..hd {
                    *qt.add(dd * w + r) = *row.add(dd) * factor;
                }
            }
        }

        #[inline(always)]
        unsafe fn key(src: *const u8, f16: bool, hd: usize, j: usize, keys: *mut f32) {
            // SAFETY: `keys` holds a row of `hd` for every key.
            unsafe { row_f32(src, f16, hd, keys.add(j * hd)) }
        }

        #[inline(always)]
        unsafe fn values(
            a: *const u8,
            b: Option<*const u8>,
            f16: bool,
            hd: usize,
            pair: usize,
            values: *mut f32,
        ) {
            // SAFETY: `values` holds a row of `hd` for every key (and one past an odd count).
            unsafe {
                row_f32(a, f16, hd, values.add(2 * pair * hd));
                if let Some(b) = b {
                    row_f32(b, f16, hd, values.add((2 * pair + 1) * hd));
                }
            }
        }

        #[inline(always)]
        unsafe fn madd(acc: __m512, a: __m512, b: __m512) -> __m512 {
            // SAFETY: register arithmetic only.
            unsafe { _mm512_fmadd_ps(a, b, acc) }
        }

        #[inline(always)]
        unsafe fn probabilities<const V: usize>(
            s: *const f32,
            _: *mut f32,
            _: usize,
            _: usize,
        ) -> *const f32 {
            s
        }
    }

    /// bf16 pairs for `vdpbf16ps`: queries `[d / 2][lane]` as pairs of neighbouring
    /// dimensions, keys as rows of bf16 (the same pairs), probabilities `[j / 2][lane]`
    /// and values `[j / 2][d]` as pairs of neighbouring keys.
    struct Bf16;

    impl Products for Bf16 {
        const LANES: usize = 64;
        const PACK: usize = 2;
        const FEW_ROWS: usize = 0;

        /// To the nearest bf16 (ties to even), kept in f32: what `pairs` then converts exactly.
        #[inline(always)]
        unsafe fn round(p: __m512) -> __m512 {
            // SAFETY: register arithmetic only.
            unsafe {
                let b = _mm512_castps_si512(p);
                let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
                let up = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
                _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(-0x1_0000)))
            }
        }

        #[inline(always)]
        unsafe fn query(row: *const f32, hd: usize, factor: f32, r: usize, w: usize, qt: *mut f32) {
            let qt = qt as *mut u32;
            // SAFETY: `row` holds `hd` (even) floats, `qt` [hd / 2][w] pairs.
            unsafe {
                for i in 0..hd / 2 {
                    let (lo, hi) = (*row.add(2 * i) * factor, *row.add(2 * i + 1) * factor);
                    *qt.add(i * w + r) = bf16(lo) | bf16(hi) << 16;
                }
            }
        }

        #[inline(always)]
        unsafe fn key(src: *const u8, f16: bool, hd: usize, j: usize, keys: *mut f32) {
            // SAFETY: `keys` holds a row of `hd` bf16 for every key.
            unsafe { row_bf16(src, f16, hd, (keys as *mut u16).add(j * hd)) }
        }

        #[inline(always)]
        unsafe fn values(
            a: *const u8,
            b: Option<*const u8>,
            f16: bool,
            hd: usize,
            pair: usize,
            values: *mut f32,
        ) {
            // SAFETY: `values` holds a row of `hd` pairs for every pair of keys.
            unsafe {
                for at in (0..hd).step_by(16) {
                    let count = (hd - at).min(16);
                    let second = match b {
                        Some(b) => load16(b, f16, at, count),
                        None => _mm512_setzero_ps(),
                    };
                    _mm512_mask_storeu_epi32(
                        values.add(pair * hd + at) as *mut i32,
                        lanes(count),
                        pairs(load16(a, f16, at, count), second),
                    );
                }
            }
        }

        #[inline(always)]
        unsafe fn madd(acc: __m512, a: __m512, b: __m512) -> __m512 {
            // SAFETY: register arithmetic only (the caller enables AVX-512 BF16).
            unsafe { _mm512_dpbf16_ps(acc, bh(_mm512_castps_si512(a)), bh(_mm512_castps_si512(b))) }
        }

        /// Pairs of neighbouring keys' probabilities, [n / 2][w] (0 for a key past `n`).
        #[inline(always)]
        unsafe fn probabilities<const V: usize>(
            s: *const f32,
            pp: *mut f32,
            n: usize,
            w: usize,
        ) -> *const f32 {
            // SAFETY: `s` holds `n` rows of `w`, `pp` room for `n / 2` rounded up.
            unsafe {
                for pair in 0..n.div_ceil(2) {
                    for c in 0..V {
                        let a = _mm512_loadu_ps(s.add(2 * pair * w + 16 * c));
                        let b = if 2 * pair + 1 < n {
                            _mm512_loadu_ps(s.add((2 * pair + 1) * w + 16 * c))
                        } else {
                            _mm512_setzero_ps()
                        };
                        _mm512_storeu_ps(
                            pp.add(pair * w + 16 * c),
                            _mm512_castsi512_ps(pairs(a, b)),
                        );
                    }
                }
            }
            pp
        }
    }

    /// An f16 or f32 row of `d` elements as f32.
    #[inline(always)]
    unsafe fn row_f32(src: *const u8, f16: bool, d: usize, out: *mut f32) {
        // SAFETY: `src` holds `d` elements, `out` room for `d` floats.
        unsafe {
            for at in (0..d).step_by(16) {
                let count = (d - at).min(16);
                _mm512_mask_storeu_ps(out.add(at), lanes(count), load16(src, f16, at, count));
            }
        }
    }

    /// The first `t` rows of accumulators to `out` [t][w].
    #[inline(always)]
    unsafe fn store<const V: usize>(acc: &[[__m512; V]; 4], t: usize, out: *mut f32, w: usize) {
        // SAFETY: `out` holds `t` rows of `w`.
        unsafe {
            for (u, a) in acc.iter().enumerate().take(t) {
                for (c, a) in a.iter().enumerate() {
                    _mm512_storeu_ps(out.add(u * w + 16 * c), *a);
                }
            }
        }
    }

    struct Job<'a> {
        dst: &'a sys::ggml_tensor,
        q: &'a sys::ggml_tensor,
        k: &'a sys::ggml_tensor,
        v: &'a sys::ggml_tensor,
        mask: Option<&'a sys::ggml_tensor>,
        /// Query heads per key/value head.
        group: usize,
        /// Queries per work item (lanes used: `group * block`).
        block: usize,
        /// Heads have several items (query blocks), so each thread converts a head's keys
        /// and values once for all of its items; otherwise (decoding's single queries)
        /// they are converted chunk by chunk, staying in the L1 cache.
        whole_heads: bool,
        scale: f32,
        cap: f32,
    }

    impl Job<'_> {
        /// Items `ith, ith + nth, ...` (interleaved: later query blocks may see more keys).
        unsafe fn run<const V: usize, P: Products>(
            &self,
            ith: usize,
            nth: usize,
            items: usize,
            work: impl Fn(usize) -> (usize, usize, usize),
        ) {
            let hd = self.k.ne[0] as usize;
            let n_kv = self.k.ne[1] as usize;
            let w = 16 * V;
            SCRATCH.with_borrow_mut(|scratch| {
                // qt [hd][w], the head's (or a chunk's) keys and values [rows][hd] (in
                // words: bf16 packs two), s [KEYS][w], out [hd][w], mask [KEYS][w], pairs
                // of probabilities [KEYS / 2][w].
                let rows = if self.whole_heads { n_kv } else { KEYS };
                let head = rows.next_multiple_of(2) * hd / P::PACK;
                let sizes = [hd * w, head, head, KEYS * w, hd * w, KEYS * w, KEYS / 2 * w];
                scratch.resize(sizes.iter().sum::<usize>() + 16, 0.0);
                let mut parts = [std::ptr::null_mut::<f32>(); 7];
                let mut at = scratch.as_mut_ptr();
                for (p, n) in parts.iter_mut().zip(sizes) {
                    *p = at;
                    // SAFETY: inside `scratch`.
                    at = unsafe { at.add(n) };
                }
                // The head whose keys and values the scratch holds: a thread's items of one
                // head follow each other, so each thread converts each head once.
                let mut loaded = None;
                for item in (ith..items).step_by(nth) {
                    let (b, kvh, first) = work(item);
                    let load = loaded != Some((b, kvh));
                    loaded = Some((b, kvh));
                    // SAFETY: indices inside the tensors; scratch sized above; the bf16
                    // entry runs only where `attention_cpu_on` found AVX-512 BF16.
                    unsafe {
                        if P::LANES == Bf16::LANES {
                            self.item_bf16::<V, P>(b, kvh, first, load, parts)
                        } else {
                            self.item_f32::<V, P>(b, kvh, first, load, parts)
                        }
                    }
                }
            });
        }

        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        unsafe fn item_f32<const V: usize, P: Products>(
            &self,
            b: usize,
            kvh: usize,
            first: usize,
            load: bool,
            parts: [*mut f32; 7],
        ) {
            // SAFETY: as `run` promises.
            unsafe { self.item::<V, P>(b, kvh, first, load, parts) }
        }

        #[target_feature(enable = "avx512f,avx512bw,f16c,avx512bf16")]
        unsafe fn item_bf16<const V: usize, P: Products>(
            &self,
            b: usize,
            kvh: usize,
            first: usize,
            load: bool,
            parts: [*mut f32; 7],
        ) {
            // SAFETY: as `run` promises.
            unsafe { self.item::<V, P>(b, kvh, first, load, parts) }
        }

        /// Keys and values `from..to` (`from` even) of head `kvh` in sequence `b` into the
        /// scratch, from its start.
        #[inline(always)]
        unsafe fn convert<P: Products>(
            &self,
            b: usize,
            kvh: usize,
            from: usize,
            to: usize,
            keys: *mut f32,
            values: *mut f32,
        ) {
            let hd = self.k.ne[0] as usize;
            let (k16, v16) = (
                self.k.type_ == sys::GGML_TYPE_F16,
                self.v.type_ == sys::GGML_TYPE_F16,
            );
            // SAFETY: rows inside the tensors; the scratch holds `to - from` rows (and one
            // past an odd count).
            unsafe {
                for pair in 0..(to - from).div_ceil(2) {
                    let (a, second) = (from + 2 * pair, from + 2 * pair + 1);
                    for j in [a, second].into_iter().filter(|&j| j < to) {
                        P::key(
                            Context::row_start(self.k, j, kvh, b),
                            k16,
                            hd,
                            j - from,
                            keys,
                        );
                    }
                    P::values(
                        Context::row_start(self.v, a, kvh, b),
                        (second < to).then(|| Context::row_start(self.v, second, kvh, b)),
                        v16,
                        hd,
                        pair,
                        values,
                    );
                }
            }
        }

        /// Items of `R` rows (decoding: one query of a few heads) with the keys in the
        /// lanes instead of the rows: each key's dot products are whole vectors along
        /// the head dimension, summed across at the end, so that no lane is idle (the
        /// rows-in-lanes layout leaves 14 of 16 lanes empty for a 3B model's pairs of
        /// heads, which cost 4.0 ms against ggml's 1.5 ms per layer at 4100 keys).
        unsafe fn few_rows<const R: usize>(
            &self,
            ith: usize,
            nth: usize,
            items: usize,
            work: impl Fn(usize) -> (usize, usize, usize),
        ) {
            let hd = self.k.ne[0] as usize;
            SCRATCH.with_borrow_mut(|scratch| {
                // Queries [R][hd], output [R][hd].
                scratch.resize(2 * R * hd + 16, 0.0);
                let (qs, out) = scratch.split_at_mut(R * hd);
                for item in (ith..items).step_by(nth) {
                    let (b, kvh, first) = work(item);
                    // SAFETY: indices inside the tensors; scratch sized above.
                    unsafe { self.few_item::<R>(b, kvh, first, qs.as_mut_ptr(), out.as_mut_ptr()) };
                }
            });
        }

        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        unsafe fn few_item<const R: usize>(
            &self,
            b: usize,
            kvh: usize,
            first: usize,
            qs: *mut f32,
            out: *mut f32,
        ) {
            let (hd, n_kv, n_q) = (
                self.k.ne[0] as usize,
                self.k.ne[1] as usize,
                self.q.ne[1] as usize,
            );
            let (k16, v16) = (
                self.k.type_ == sys::GGML_TYPE_F16,
                self.v.type_ == sys::GGML_TYPE_F16,
            );
            let factor = self.query_factor();
            let parts = hd.div_ceil(16);
            // SAFETY: as `few_rows` promises; masked lanes are neither read nor written.
            unsafe {
                for r in 0..R {
                    let (h, i) = self.lane(kvh, first, r);
                    let row = Context::row_start(self.q, i, h, b) as *const f32;
                    for d in 0..hd {
                        *qs.add(r * hd + d) = *row.add(d) * factor;
                    }
                }
                std::ptr::write_bytes(out, 0, R * hd);
                let (mut m, mut l) = ([f32::NEG_INFINITY; R], [0f32; R]);
                let mut p = [[0f32; 16]; R];
                for j0 in (0..n_kv).step_by(16) {
                    let n = (n_kv - j0).min(16);
                    // Each row's mask over these keys; a chunk masked for every row is skipped.
                    let mut bias = [[0f32; 16]; R];
                    if let Some(mk) = self.mask {
                        let mut open = false;
                        for (r, bias) in bias.iter_mut().enumerate() {
                            let (_, i) = self.lane(kvh, first, r);
                            let bits = Context::row_start(mk, i, 0, 0) as *const u16;
                            for (u, x) in bias.iter_mut().enumerate().take(n) {
                                *x = half_to_f32(*bits.add(j0 + u));
                                open |= *x != f32::NEG_INFINITY;
                            }
                        }
                        if !open {
                            continue;
                        }
                    }
                    let mut scores = [[0f32; 16]; R];
                    for u in 0..n {
                        let key = Context::row_start(self.k, j0 + u, kvh, b);
                        let mut acc = [_mm512_setzero_ps(); R];
                        for part in 0..parts {
                            let (at, count) = (16 * part, (hd - 16 * part).min(16));
                            let kv = load16(key, k16, at, count);
                            for (r, a) in acc.iter_mut().enumerate() {
                                let q = _mm512_maskz_loadu_ps(lanes(count), qs.add(r * hd + at));
                                *a = _mm512_fmadd_ps(kv, q, *a);
                            }
                        }
                        for (row, a) in scores.iter_mut().zip(&acc) {
                            row[u] = _mm512_reduce_add_ps(*a);
                        }
                    }
                    for r in 0..R {
                        let mut x = _mm512_loadu_ps(scores[r].as_ptr());
                        if self.cap != 0.0 {
                            x = softcap(x, _mm512_set1_ps(self.cap));
                        }
                        x = _mm512_add_ps(x, _mm512_loadu_ps(bias[r].as_ptr()));
                        let x = _mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), lanes(n), x);
                        let top = _mm512_reduce_max_ps(x);
                        if top > m[r] {
                            let alpha = (m[r] - top).exp();
                            l[r] *= alpha;
                            for d in 0..hd {
                                *out.add(r * hd + d) *= alpha;
                            }
                            m[r] = top;
                        }
                        let e = if m[r] == f32::NEG_INFINITY {
                            _mm512_setzero_ps()
                        } else {
                            exp(_mm512_sub_ps(x, _mm512_set1_ps(m[r])))
                        };
                        l[r] += _mm512_reduce_add_ps(e);
                        _mm512_storeu_ps(p[r].as_mut_ptr(), e);
                    }
                    for part in 0..parts {
                        let (at, count) = (16 * part, (hd - 16 * part).min(16));
                        let mut acc: [__m512; R] = std::array::from_fn(|r| {
                            _mm512_maskz_loadu_ps(lanes(count), out.add(r * hd + at))
                        });
                        for u in 0..n {
                            let value = Context::row_start(self.v, j0 + u, kvh, b);
                            let vv = load16(value, v16, at, count);
                            for (a, row) in acc.iter_mut().zip(&p) {
                                *a = _mm512_fmadd_ps(_mm512_set1_ps(row[u]), vv, *a);
                            }
                        }
                        for (r, a) in acc.iter().enumerate() {
                            _mm512_mask_storeu_ps(out.add(r * hd + at), lanes(count), *a);
                        }
                    }
                }
                // Divide by the sums (0 where every key was masked, as ggml) and write each row.
                for (r, &sum) in l.iter().enumerate() {
                    if r % self.block >= self.block.min(n_q - first) {
                        continue;
                    }
                    let f = if sum != 0.0 { 1.0 / sum } else { 0.0 };
                    let (h, i) = self.lane(kvh, first, r);
                    let dst = Context::row_start(self.dst, h, i, b) as *mut f32;
                    for d in 0..hd {
                        *dst.add(d) = *out.add(r * hd + d) * f;
                    }
                }
            }
        }

        /// What the queries are multiplied by: the scale, and 1 / cap where a soft-cap
        /// applies (to q.k * scale, as `cap * tanh(x / cap)`).
        fn query_factor(&self) -> f32 {
            if self.cap != 0.0 {
                self.scale / self.cap
            } else {
                self.scale
            }
        }

        /// Lane `r`'s head and query.
        fn lane(&self, kvh: usize, first: usize, r: usize) -> (usize, usize) {
            let n_q = self.q.ne[1] as usize;
            (
                kvh * self.group + (r / self.block).min(self.group - 1),
                (first + r % self.block).min(n_q - 1),
            )
        }

        /// One item: the queries `first..` of head group `kvh` in sequence `b`, after
        /// converting that head's keys and values into the scratch if `load`.
        #[inline(always)]
        unsafe fn item<const V: usize, P: Products>(
            &self,
            b: usize,
            kvh: usize,
            first: usize,
            load: bool,
            parts: [*mut f32; 7],
        ) {
            let (hd, n_kv) = (self.k.ne[0] as usize, self.k.ne[1] as usize);
            let w = 16 * V;
            let [qt, keys, values, s, out, maskt, pp] = parts;
            let n_q = self.q.ne[1] as usize;
            let queries = self.block.min(n_q - first);
            // SAFETY: as `run` promises.
            unsafe {
                // The queries, transposed and scaled.
                let factor = self.query_factor();
                for r in 0..w {
                    let (h, i) = self.lane(kvh, first, r);
                    let row = Context::row_start(self.q, i, h, b) as *const f32;
                    P::query(row, hd, factor, r, w, qt);
                }
                if load && self.whole_heads {
                    self.convert::<P>(b, kvh, 0, n_kv, keys, values);
                }
                std::ptr::write_bytes(out, 0, hd * w);
                let mut m = [_mm512_set1_ps(f32::NEG_INFINITY); V];
                let mut l = [_mm512_setzero_ps(); V];
                let cap = _mm512_set1_ps(self.cap);
                let mut j0 = 0;
                while j0 < n_kv {
                    let n = KEYS.min(n_kv - j0);
                    let masking = match self.mask {
                        Some(mk) => self.mask_chunk::<V>(mk, kvh, first, j0, n, maskt),
                        None => Mask::None,
                    };
                    if matches!(masking, Mask::Skip) {
                        j0 += n;
                        continue;
                    }
                    let (keys, values) = if self.whole_heads {
                        (keys.add(j0 * hd / P::PACK), values.add(j0 * hd / P::PACK))
                    } else {
                        self.convert::<P>(b, kvh, j0, j0 + n, keys, values);
                        (keys, values)
                    };
                    // Scores: s[j][lanes], 4 keys at a time, soft-capped and masked.
                    let mut j = 0;
                    while j < n {
                        let t = (n - j).min(4);
                        let mut acc = scores::<V, P>(qt, keys, j, t, hd, w);
                        for (u, a) in acc.iter_mut().enumerate().take(t) {
                            for (c, x) in a.iter_mut().enumerate() {
                                if self.cap != 0.0 {
                                    *x = softcap(*x, cap);
                                }
                                if matches!(masking, Mask::Add) {
                                    *x = _mm512_add_ps(
                                        *x,
                                        _mm512_loadu_ps(maskt.add((j + u) * w + 16 * c)),
                                    );
                                }
                            }
                        }
                        store(&acc, t, s.add(j * w), w);
                        j += t;
                    }
                    // Online softmax, lane-wise, against a reference maximum that moves
                    // only when a score rises more than SLACK above it: probabilities may
                    // then reach e^SLACK (the division by their sum takes it out), and
                    // rescaling the output, a pass over `out`, is left out for every
                    // chunk that raises no lane's reference (most chunks after the first).
                    for c in 0..V {
                        let mut top = _mm512_set1_ps(f32::NEG_INFINITY);
                        for j in 0..n {
                            top = _mm512_max_ps(top, _mm512_loadu_ps(s.add(j * w + 16 * c)));
                        }
                        let raise = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(
                            top,
                            _mm512_add_ps(m[c], _mm512_set1_ps(SLACK)),
                        );
                        if raise != 0 {
                            let next = _mm512_mask_mov_ps(m[c], raise, top);
                            // 0 for lanes raised from -inf (nothing summed yet), 1 where kept.
                            let alpha = _mm512_mask_mov_ps(
                                _mm512_set1_ps(1.0),
                                raise,
                                exp(_mm512_sub_ps(m[c], next)),
                            );
                            l[c] = _mm512_mul_ps(l[c], alpha);
                            for dd in 0..hd {
                                let o = out.add(dd * w + 16 * c);
                                _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), alpha));
                            }
                            m[c] = next;
                        }
                        // Lanes with nothing unmasked yet take a finite reference (their p is 0).
                        let reference = _mm512_mask_mov_ps(
                            m[c],
                            _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(
                                m[c],
                                _mm512_set1_ps(f32::NEG_INFINITY),
                            ),
                            _mm512_setzero_ps(),
                        );
                        let mut sum = _mm512_setzero_ps();
                        for j in 0..n {
                            let p = P::round(exp(_mm512_sub_ps(
                                _mm512_loadu_ps(s.add(j * w + 16 * c)),
                                reference,
                            )));
                            _mm512_storeu_ps(s.add(j * w + 16 * c), p);
                            sum = _mm512_add_ps(sum, p);
                        }
                        l[c] = _mm512_add_ps(l[c], sum);
                    }
                    accumulate::<V, P>(s, pp, values, n, hd, w, out);
                    j0 += n;
                }
                // Divide by the sums (0 where every key was masked, as ggml) and write each row.
                let mut inv = [0f32; 64];
                for (c, &lc) in l.iter().enumerate() {
                    let nz = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(lc, _mm512_setzero_ps());
                    _mm512_storeu_ps(
                        inv.as_mut_ptr().add(16 * c),
                        _mm512_maskz_div_ps(nz, _mm512_set1_ps(1.0), lc),
                    );
                }
                for (r, f) in inv.iter().enumerate().take(self.group * self.block) {
                    if r % self.block >= queries {
                        continue;
                    }
                    let (h, i) = self.lane(kvh, first, r);
                    let dst = Context::row_start(self.dst, h, i, b) as *mut f32;
                    for dd in 0..hd {
                        *dst.add(dd) = *out.add(dd * w + r) * f;
                    }
                }
            }
        }

        /// How the mask treats keys `j0..j0 + n` for this item's queries: not at all (all
        /// zero), entirely (all -inf: the chunk is skipped), or as a transposed block
        /// written to `maskt` [n][w].
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        unsafe fn mask_chunk<const V: usize>(
            &self,
            mk: &sys::ggml_tensor,
            kvh: usize,
            first: usize,
            j0: usize,
            n: usize,
            maskt: *mut f32,
        ) -> Mask {
            let w = 16 * V;
            let queries = self.block.min(self.q.ne[1] as usize - first);
            let (mut zero, mut masked) = (true, true);
            // SAFETY: rows `first..first + queries` and keys `j0..j0 + n` are inside the mask.
            unsafe {
                for i in first..first + queries {
                    let bits = Context::row_start(mk, i, 0, 0) as *const u16;
                    for j in j0..j0 + n {
                        let x = *bits.add(j);
                        zero &= x & 0x7FFF == 0;
                        masked &= x == 0xFC00;
                    }
                }
                if zero {
                    return Mask::None;
                }
                if masked {
                    return Mask::Skip;
                }
                for r in 0..w {
                    let (_, i) = self.lane(kvh, first, r);
                    let bits = Context::row_start(mk, i, 0, 0) as *const u16;
                    for j in 0..n {
                        *maskt.add(j * w + r) = half_to_f32(*bits.add(j0 + j));
                    }
                }
            }
            Mask::Add
        }
    }

    enum Mask {
        None,
        Skip,
        Add,
    }
}

/// Never called: [`packed::kernels`] is none off x86-64, so no graph holds these ops.
#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    use crate::sys;
    pub const GROUPS: usize = 32;
    pub unsafe extern "C" fn attention_f32(
        _: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
    }
    pub use attention_f32 as attention_bf16;
}
