//! q4_0, q8_0, q4_K, f16 and bf16 matrix products of our own, for the many-row
//! products of prefill and the vision tower (and the one-row products of decoding,
//! which they also run at memory speed), in one binary for every x86-64 CPU: the
//! kernels come for AVX-512 VNNI, with BF16 or without (`avx512.rs`), and for AVX2
//! (`avx2.rs`, with FMA and F16C), and [`kernels`] picks the best this CPU runs when the
//! program starts, so that a build for the lowest CPU it supports (`-C
//! target-cpu=x86-64-v2`, as distributions build) loses none of it.
//! `PALIGEMMA_CPU_KERNELS` forces a lower set (or `ggml` for none) so that each can be
//! tested and measured on one machine.
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
//! f16 matrices (the SigLIP tower of a default conversion, whole f16 models) are packed
//! as one 16-row vector of weights per input, bf16 matrices as one 16-row vector of
//! pairs of inputs (a 32-bit lane per row). `vcvtph2ps` (for bf16: a shift or a mask)
//! gives 16 f32 weights that meet one broadcast activation in an FMA, 8 rows at a time.
//! The activations stay f32, where ggml rounds them to f16 (or bf16) first, so these
//! products are nearer the exact one than ggml's; ggml's own f16 kernel (tinyBLAS) also
//! converts both operands on every step and runs at about half the FMA peak. With
//! AVX-512 BF16, bf16 matrices instead meet activations rounded to bf16 in `vdpbf16ps`,
//! two products per lane, as ggml and torch's bf16 do: twice as fast, and as exact as
//! ggml's.
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

/// The packed formats: inputs and bytes per block of one row, and whether the weights
/// are floats (a "block" is one f16 input, or a pair of bf16 inputs).
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
const F16: Format = Format {
    inputs: 1,
    bytes: 2,
    float: true,
};
/// bf16 weights by pairs of inputs: one 32-bit lane per row holds two neighbouring
/// weights, the layout `vdpbf16ps` multiplies, and FMA kernels split with a shift or a
/// mask, no widening.
const BF16: Format = Format {
    inputs: 2,
    bytes: 4,
    float: true,
};

fn format(ty: Type) -> Option<Format> {
    match ty {
        Type::Q4_0 => Some(Q4_0),
        Type::Q4_K => Some(Q4_K),
        Type::Q8_0 => Some(Q8_0),
        Type::F16 => Some(F16),
        Type::BF16 => Some(BF16),
        _ => None,
    }
}

/// How the rows of activations are prepared for a product.
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // made only by the x86-64 `ops`
enum Activations {
    /// Quantized per block of 32, as ggml's q8_0 (the integer formats).
    Q8,
    /// Kept f32 (the FMA kernels of f16 and bf16).
    F32,
    /// Rounded to bf16 (`vdpbf16ps`).
    Bf16,
}

impl Activations {
    /// Bytes of one row of `k` activations.
    fn row_bytes(self, k: usize) -> usize {
        match self {
            Activations::Q8 => k / BLOCK * ACT_BLOCK_BYTES,
            Activations::F32 => k * 4,
            Activations::Bf16 => k * 2,
        }
    }
}

/// The instruction sets the packed kernels come in, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernels {
    /// AVX2, FMA and F16C: 8 outputs per vector, `vpmaddubsw` byte products.
    Avx2,
    /// AVX-512 F/BW, VNNI and F16C: 16 outputs per vector, `vpdpbusd` byte products.
    Avx512Vnni,
    /// The same with AVX-512 BF16: bf16 matrices meet activations rounded to bf16 in
    /// `vdpbf16ps`, two products per lane (as ggml and torch's bf16 do; the other sets
    /// keep them f32, which is exact and half as fast), and so does attention over
    /// several queries where its caller allows (see `Context::attention_cpu`).
    Avx512Bf16,
}

/// The environment variable that forces a lower set than the CPU's best.
pub const KERNELS_VAR: &str = "PALIGEMMA_CPU_KERNELS";

impl Kernels {
    /// Every set, lowest first.
    pub const ALL: [Kernels; 3] = [Kernels::Avx2, Kernels::Avx512Vnni, Kernels::Avx512Bf16];

    /// The name users read and `PALIGEMMA_CPU_KERNELS` takes.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Avx2 => "avx2",
            Kernels::Avx512Vnni => "avx512",
            Kernels::Avx512Bf16 => "avx512bf16",
        }
    }

    /// What the set needs, as `paligemma devices` prints it.
    pub fn description(self) -> &'static str {
        match self {
            Kernels::Avx2 => "AVX2 + FMA + F16C",
            Kernels::Avx512Vnni => "AVX-512 VNNI",
            Kernels::Avx512Bf16 => "AVX-512 VNNI + BF16",
        }
    }

    /// The best set this CPU runs, whatever the environment says.
    pub fn detected() -> Option<Kernels> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("f16c") {
                return Some(if has!("avx512bf16") {
                    Kernels::Avx512Bf16
                } else {
                    Kernels::Avx512Vnni
                });
            }
            if has!("avx2") && has!("fma") && has!("f16c") {
                return Some(Kernels::Avx2);
            }
        }
        None
    }

    /// Whether this CPU runs this set.
    pub fn runs_here(self) -> bool {
        Kernels::detected().is_some_and(|best| self <= best)
    }
}

/// The set `PALIGEMMA_CPU_KERNELS` (a [`Kernels::name`] or `ggml`; unset: the CPU's
/// best) chooses on this CPU, none for `ggml` or where no set runs, read once for the
/// whole process; an error names a value it does not know or a set this CPU lacks
/// (`Model::load` and `paligemma devices` report it).
pub fn selection() -> Result<Option<Kernels>> {
    static CHOSEN: std::sync::OnceLock<Result<Option<Kernels>, String>> =
        std::sync::OnceLock::new();
    CHOSEN
        .get_or_init(|| choose(std::env::var(KERNELS_VAR).ok().as_deref()))
        .clone()
        .map_err(Error::Setting)
}

fn choose(forced: Option<&str>) -> Result<Option<Kernels>, String> {
    let wanted = match forced.map(str::trim) {
        None | Some("") => return Ok(Kernels::detected()),
        Some("ggml") => return Ok(None),
        Some(name) => Kernels::ALL.into_iter().rev().find(|k| k.name() == name),
    };
    match wanted {
        None => {
            let names: Vec<&str> = Kernels::ALL.iter().rev().map(|k| k.name()).collect();
            Err(format!(
                "{KERNELS_VAR}={}: expected {} or ggml",
                forced.unwrap_or_default().trim(),
                names.join(", ")
            ))
        }
        Some(set) if !set.runs_here() => Err(format!(
            "{KERNELS_VAR}={}: this CPU lacks {}",
            set.name(),
            set.description()
        )),
        Some(set) => Ok(Some(set)),
    }
}

/// The set the packed products use in this process: [`selection`], none when it is an
/// error.
pub fn kernels() -> Option<Kernels> {
    selection().ok().flatten()
}

/// Whether the packed products run in this process (see [`kernels`]).
pub fn available() -> bool {
    kernels().is_some()
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
        // Per group, block `b`'s (an f16 input's, a bf16 pair's) 16 rows side by side;
        // each source row read in order.
        let row_bytes = blocks * f.bytes;
        for (g, group) in out.chunks_exact_mut(row_bytes * GROUP).enumerate() {
            for j in 0..GROUP {
                let row = &data[(g * GROUP + j) * row_bytes..][..row_bytes];
                for (b, w) in row.chunks_exact(f.bytes).enumerate() {
                    group[(b * GROUP + j) * f.bytes..][..f.bytes].copy_from_slice(w);
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
    /// `[k, n]`) and f32 `x` of shape `[k, ...]`, on the kernels of [`kernels`]: two
    /// graph nodes, one quantizing the rows of `x` (f16, bf16: gathering them as they
    /// are), one multiplying. CPU backends only, and only where [`available`].
    pub fn mul_mat_packed<'s>(&'s self, w: Tensor<'_>, x: Tensor<'_>) -> Result<Tensor<'s>> {
        match kernels() {
            Some(k) => self.mul_mat_packed_on(k, w, x),
            None => Err(shape(
                "mul_mat_packed",
                "no packed kernels run here (this CPU lacks AVX2 and AVX-512 VNNI, or they are turned off)".to_string(),
            )),
        }
    }

    /// [`Context::mul_mat_packed`] on the kernels of `set`, which this CPU must run.
    pub fn mul_mat_packed_on<'s>(
        &'s self,
        set: Kernels,
        w: Tensor<'_>,
        x: Tensor<'_>,
    ) -> Result<Tensor<'s>> {
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
        if !set.runs_here() {
            return Err(shape(
                "mul_mat_packed",
                format!("this CPU lacks {}", set.description()),
            ));
        }
        self.room_for(2)?;
        // The quantized (or gathered) rows, then the multiplication's work counter (see `driver::multiply`).
        let rows = xn[1] * xn[2] * xn[3];
        let (prepare, activations, multiply) = ops(set, w.ty());
        let q = self.custom(
            Type::I8,
            [rows * activations.row_bytes(xn[0]) + COUNTER_BYTES, 1, 1, 1],
            &[x],
            prepare,
            0,
        )?;
        self.custom(
            Type::F32,
            [wn[1], xn[1], xn[2], xn[3]],
            &[w, q],
            multiply,
            0,
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod driver;

/// A ggml custom operation.
type Op = unsafe extern "C" fn(*mut crate::sys::ggml_tensor, i32, i32, *mut std::ffi::c_void);

/// The ggml operations that prepare the rows (and what they make of them) and multiply
/// for a packable type on `set`.
#[cfg(target_arch = "x86_64")]
fn ops(set: Kernels, ty: Type) -> (Op, Activations, Op) {
    use Activations::*;
    macro_rules! of {
        ($set:ident) => {
            match ty {
                Type::Q4_0 => ($set::quantize_rows, Q8, $set::multiply_q4_0),
                Type::Q8_0 => ($set::quantize_rows, Q8, $set::multiply_q8_0),
                Type::Q4_K => ($set::quantize_rows, Q8, $set::multiply_q4_k),
                Type::F16 => (driver::gather_rows, F32, $set::multiply_f16),
                _ => (driver::gather_rows, F32, $set::multiply_bf16),
            }
        };
    }
    match (set, ty) {
        (Kernels::Avx2, _) => of!(avx2),
        (Kernels::Avx512Bf16, Type::BF16) => {
            (avx512::round_rows_bf16, Bf16, avx512::multiply_bf16_dot)
        }
        (Kernels::Avx512Vnni | Kernels::Avx512Bf16, _) => of!(avx512),
    }
}

/// Never called: no set runs off x86-64 ([`Kernels::runs_here`]), so no graph holds
/// these operations.
#[cfg(not(target_arch = "x86_64"))]
fn ops(_: Kernels, _: Type) -> (Op, Activations, Op) {
    unreachable!("no packed kernels off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_chooses_a_set_this_cpu_runs() {
        assert_eq!(choose(None).unwrap(), Kernels::detected());
        assert_eq!(choose(Some(" ")).unwrap(), Kernels::detected());
        assert_eq!(choose(Some("ggml")).unwrap(), None);
        let err = choose(Some("avx9")).unwrap_err();
        assert!(
            err.contains("PALIGEMMA_CPU_KERNELS=avx9: expected avx512bf16, avx512, avx2 or ggml"),
            "{err}"
        );
        for set in Kernels::ALL {
            match choose(Some(set.name())) {
                Ok(chosen) => assert!(set.runs_here() && chosen == Some(set)),
                Err(e) => {
                    assert!(!set.runs_here());
                    assert!(e.contains(set.description()), "{e}");
                }
            }
        }
    }
}
