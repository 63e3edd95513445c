//! Attention over many query rows (prefill, the vision tower) on AVX-512: our own
//! kernel for what ggml's `flash_attn_ext` computes, for f16 or f32 keys and values.
//!
//! Why this exists: ggml's CPU flash attention applies Gemma 2's logit soft-cap with one
//! scalar libm `tanhf` per score, re-converts the keys for every tile of 32 queries, and
//! took about a third of the demo model's prefill and 30% of a 448 px 3B frame.
//!
//! The layout puts query rows in vector lanes: one work item is up to 32 rows (the
//! heads that share a key/value head, times a block of queries), and each key's
//! score for all of them is one or two vectors, computed as FMAs of a broadcast key
//! element with the item's queries transposed once (`[d][row]`). The online softmax
//! (running maximum, rescale, exponentials, the soft-cap as `1 - 2 / (exp(2x) + 1)`)
//! then works lane-wise with no horizontal sums, and the output accumulates transposed
//! too, `out[d][row] += v[j][d] * p[j][row]`, from keys and values converted to f32
//! once per chunk of 32 keys for all of an item's rows. Everything is f32, as in
//! ggml's tiled path; rows of one item that a block does not fill repeat its last
//! query and are not written.
//!
//! Decoding's one query per sequence leaves most lanes empty (2 of 16 for a 3B model's
//! pairs of heads), which costs little at decoding's few hundred keys: decode runs as
//! fast as on ggml's op (18.5 against 17.5 tokens/s, 3 interleaved runs) and no longer
//! depends on how ggml was compiled: in a portable `x86-64-v2` build, ggml's scalar f16
//! attention took decode from 20 to 11-13 tokens/s. Key/value types other than f16 and
//! f32 keep ggml's op.
use crate::error::shape;
use crate::{Context, Result, Tensor, Type, packed};

impl Context {
    /// `flash_attn_ext`'s result (q [d, n_q, H, B], k/v [d, n_kv, H_kv, B], mask F16
    /// [n_kv, >= n_q]; result [d, H, n_q, B]) from our CPU kernel where it applies (see the
    /// module documentation; with an AVX-512 set of [`packed::kernels`]), else from
    /// ggml's op. Only for graphs that run on the CPU.
    pub fn attention_cpu<'s>(
        &'s self,
        q: Tensor<'_>,
        k: Tensor<'_>,
        v: Tensor<'_>,
        mask: Option<Tensor<'_>>,
        scale: f32,
        softcap: f32,
    ) -> Result<Tensor<'s>> {
        let (qn, kn, vn) = (q.ne(), k.ne(), v.ne());
        let element = |t: Tensor<'_>| {
            matches!(t.ty(), Type::F16 | Type::F32) && t.nb()[0] == t.ty().row_size(1).unwrap_or(0)
        };
        let fits = packed::kernels() >= Some(packed::Kernels::Avx512Vnni)
            && q.ty() == Type::F32
            && q.nb()[0] == 4
            && element(k)
            && element(v)
            && qn[0] == kn[0]
            && vn[0] == kn[0]
            && kn[1] == vn[1]
            && kn[2] == vn[2]
            && qn[2] % kn[2] == 0
            && qn[2] / kn[2] <= kernels::LANES
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
        let mut args = vec![q, k, v];
        args.extend(mask);
        // Both factors travel in the pointer-sized user data (ggml never reads it).
        let params = (scale.to_bits() as u64 | (softcap.to_bits() as u64) << 32) as usize;
        self.custom(
            Type::F32,
            [kn[0], qn[2], qn[1], qn[3]],
            &args,
            kernels::attention,
            params,
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use crate::{Context, sys};
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Query rows per work item: two vectors.
    pub const LANES: usize = 32;
    /// Keys per chunk.
    const KEYS: usize = 32;

    thread_local! {
        /// Each ggml worker's scratch, kept between calls.
        static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// `d` elements of an f16 or f32 row as f32.
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn load_row(src: *const u8, f16: bool, d: usize, out: *mut f32) {
        // SAFETY: `src` holds `d` elements, `out` room for `d` floats.
        unsafe {
            if !f16 {
                std::ptr::copy_nonoverlapping(src as *const f32, out, d);
                return;
            }
            let mut i = 0;
            while i + 16 <= d {
                _mm512_storeu_ps(
                    out.add(i),
                    _mm512_cvtph_ps(_mm256_loadu_si256(src.add(2 * i) as *const __m256i)),
                );
                i += 16;
            }
            for j in i..d {
                *out.add(j) = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                    (src.add(2 * j) as *const u16).read_unaligned() as i32,
                )));
            }
        }
    }

    /// `exp(x)` lane-wise to about 1 ulp: `2^n exp(r)` with `|r| <= ln 2 / 2` and a
    /// degree-7 Taylor polynomial. Lanes at or below -103 (masked scores) give exactly 0.
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
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

    /// The custom op's entry: `dst` [d, H, n_q, B] from `src` = q, k, v (, mask).
    pub unsafe extern "C" fn attention(
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
        // SAFETY: ggml hands the allocated tensors `attention_cpu` checked.
        unsafe {
            let d = &*dst;
            let (q, k, v) = (&*d.src[0], &*d.src[1], &*d.src[2]);
            let mask = d.src[3].as_ref();
            let (n_q, heads, batch) = (q.ne[1] as usize, q.ne[2] as usize, q.ne[3] as usize);
            let kv_heads = k.ne[2] as usize;
            let group = heads / kv_heads;
            // Lane r of an item is head `r / block` of the group, query `first + r % block`.
            let block = (LANES / group).max(1).min(n_q);
            let blocks = n_q.div_ceil(block);
            let items = batch * kv_heads * blocks;
            let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
            let job = Job {
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
            if group * block <= 16 {
                job.run::<1>(ith, nth, items, blocks)
            } else {
                job.run::<2>(ith, nth, items, blocks)
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
        /// Queries per work item (lanes used: `group * block`, at most 32).
        block: usize,
        scale: f32,
        cap: f32,
    }

    impl Job<'_> {
        /// Items `ith, ith + nth, ...` (interleaved: later query blocks may see more keys).
        unsafe fn run<const V: usize>(&self, ith: usize, nth: usize, items: usize, blocks: usize) {
            let hd = self.k.ne[0] as usize;
            let n_kv = self.k.ne[1] as usize;
            let w = 16 * V;
            SCRATCH.with_borrow_mut(|scratch| {
                // qt [hd][w], keys [KEYS][hd], values [KEYS][hd], s [KEYS][w], out [hd][w], mask [KEYS][w].
                let sizes = [hd * w, KEYS * hd, KEYS * hd, KEYS * w, hd * w, KEYS * w];
                scratch.resize(sizes.iter().sum::<usize>() + 16, 0.0);
                let mut parts = [std::ptr::null_mut::<f32>(); 6];
                let mut at = scratch.as_mut_ptr();
                for (p, n) in parts.iter_mut().zip(sizes) {
                    *p = at;
                    // SAFETY: inside `scratch`.
                    at = unsafe { at.add(n) };
                }
                let kv_heads = self.k.ne[2] as usize;
                let mut item = ith;
                while item < items {
                    let (b, kvh, qb) = (
                        item / (kv_heads * blocks),
                        item / blocks % kv_heads,
                        item % blocks,
                    );
                    // SAFETY: indices inside the tensors; scratch sized above.
                    unsafe { self.item::<V>(b, kvh, qb * self.block, hd, n_kv, parts) };
                    item += nth;
                }
            });
        }

        /// Lane `r`'s head and query.
        fn lane(&self, kvh: usize, first: usize, r: usize) -> (usize, usize) {
            let n_q = self.q.ne[1] as usize;
            (
                kvh * self.group + (r / self.block).min(self.group - 1),
                (first + r % self.block).min(n_q - 1),
            )
        }

        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        unsafe fn item<const V: usize>(
            &self,
            b: usize,
            kvh: usize,
            first: usize,
            hd: usize,
            n_kv: usize,
            parts: [*mut f32; 6],
        ) {
            let w = 16 * V;
            let [qt, keys, values, s, out, maskt] = parts;
            let n_q = self.q.ne[1] as usize;
            let queries = self.block.min(n_q - first);
            let k16 = self.k.type_ == sys::GGML_TYPE_F16;
            let v16 = self.v.type_ == sys::GGML_TYPE_F16;
            // SAFETY: as `run` promises.
            unsafe {
                // The queries, transposed and scaled (by 1 / cap too: the cap applies to q.k * scale).
                let factor = if self.cap != 0.0 {
                    self.scale / self.cap
                } else {
                    self.scale
                };
                for r in 0..w {
                    let (h, i) = self.lane(kvh, first, r);
                    let src = Context::row_start(self.q, i, h, b) as *const f32;
                    for dd in 0..hd {
                        *qt.add(dd * w + r) = *src.add(dd) * factor;
                    }
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
                    for j in 0..n {
                        load_row(
                            Context::row_start(self.k, j0 + j, kvh, b),
                            k16,
                            hd,
                            keys.add(j * hd),
                        );
                        load_row(
                            Context::row_start(self.v, j0 + j, kvh, b),
                            v16,
                            hd,
                            values.add(j * hd),
                        );
                    }
                    // Scores: s[j][lanes] = sum_d keys[j][d] * qt[d][lanes], 4 keys at a time.
                    let mut j = 0;
                    while j < n {
                        let t = (n - j).min(4);
                        let mut acc = [[_mm512_setzero_ps(); V]; 4];
                        for dd in 0..hd {
                            let qv: [__m512; V] =
                                std::array::from_fn(|c| _mm512_loadu_ps(qt.add(dd * w + 16 * c)));
                            for (u, a) in acc.iter_mut().enumerate() {
                                let kd = _mm512_set1_ps(*keys.add((j + u.min(t - 1)) * hd + dd));
                                for (a, q) in a.iter_mut().zip(&qv) {
                                    *a = _mm512_fmadd_ps(kd, *q, *a);
                                }
                            }
                        }
                        for (u, a) in acc.iter().enumerate().take(t) {
                            for (c, &x) in a.iter().enumerate() {
                                let mut x = x;
                                if self.cap != 0.0 {
                                    x = softcap(x, cap);
                                }
                                if matches!(masking, Mask::Add) {
                                    x = _mm512_add_ps(
                                        x,
                                        _mm512_loadu_ps(maskt.add((j + u) * w + 16 * c)),
                                    );
                                }
                                _mm512_storeu_ps(s.add((j + u) * w + 16 * c), x);
                            }
                        }
                        j += t;
                    }
                    // Online softmax, lane-wise.
                    for c in 0..V {
                        let mut top = m[c];
                        for j in 0..n {
                            top = _mm512_max_ps(top, _mm512_loadu_ps(s.add(j * w + 16 * c)));
                        }
                        // Lanes with nothing unmasked yet keep a finite reference (their p is 0).
                        let none = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(
                            top,
                            _mm512_set1_ps(f32::NEG_INFINITY),
                        );
                        let top = _mm512_mask_mov_ps(top, none, _mm512_setzero_ps());
                        let alpha = exp(_mm512_sub_ps(m[c], top));
                        let mut sum = _mm512_setzero_ps();
                        for j in 0..n {
                            let p = exp(_mm512_sub_ps(_mm512_loadu_ps(s.add(j * w + 16 * c)), top));
                            _mm512_storeu_ps(s.add(j * w + 16 * c), p);
                            sum = _mm512_add_ps(sum, p);
                        }
                        l[c] = _mm512_fmadd_ps(l[c], alpha, sum);
                        m[c] = _mm512_mask_mov_ps(top, none, _mm512_set1_ps(f32::NEG_INFINITY));
                        for dd in 0..hd {
                            let o = out.add(dd * w + 16 * c);
                            _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), alpha));
                        }
                    }
                    // out[d][lanes] += values[j][d] * p[j][lanes], 4 dimensions at a time.
                    let mut dd = 0;
                    while dd < hd {
                        let t = (hd - dd).min(4);
                        let mut acc: [[__m512; V]; 4] = std::array::from_fn(|u| {
                            std::array::from_fn(|c| {
                                _mm512_loadu_ps(out.add((dd + u.min(t - 1)) * w + 16 * c))
                            })
                        });
                        for j in 0..n {
                            let p: [__m512; V] =
                                std::array::from_fn(|c| _mm512_loadu_ps(s.add(j * w + 16 * c)));
                            for (u, a) in acc.iter_mut().enumerate() {
                                let vd = _mm512_set1_ps(*values.add(j * hd + dd + u.min(t - 1)));
                                for (a, p) in a.iter_mut().zip(&p) {
                                    *a = _mm512_fmadd_ps(vd, *p, *a);
                                }
                            }
                        }
                        for (u, a) in acc.iter().enumerate().take(t) {
                            for (c, a) in a.iter().enumerate() {
                                _mm512_storeu_ps(out.add((dd + u) * w + 16 * c), *a);
                            }
                        }
                        dd += t;
                    }
                    j0 += n;
                }
                // Divide by the sums (0 where every key was masked, as ggml) and write each row.
                let mut inv = [0f32; 32];
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
                        *maskt.add(j * w + r) = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                            *bits.add(j0 + j) as i32,
                        )));
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

/// Never called: [`packed::kernels`] is none off x86-64, so no graph holds this op.
#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    use crate::sys;
    pub const LANES: usize = 32;
    pub unsafe extern "C" fn attention(
        _: *mut sys::ggml_tensor,
        _: i32,
        _: i32,
        _: *mut std::ffi::c_void,
    ) {
    }
}
