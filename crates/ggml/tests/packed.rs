//! The packed f16, bf16, q4_0, q8_0 and q4_K products against ggml's own `mul_mat` on
//! the same bytes, and against the exact product.
mod common;

use common::{f32_bytes, values};
use ggml::packed::{self, Kernels};
use ggml::{Backend, Context, Scheduler, Tensor, Type};

/// Computes `build(w, x)` on a 2-thread CPU scheduler.
fn compute(
    ty: Type,
    w_bytes: &[u8],
    w_ne: [usize; 2],
    x: &[f32],
    x_ne: &[usize],
    build: impl for<'c> Fn(&'c Context, Tensor<'c>, Tensor<'c>) -> ggml::Result<Tensor<'c>>,
) -> Vec<f32> {
    let ctx = Context::new(16, 64).unwrap();
    let w = ctx.input("w", ty, &w_ne).unwrap();
    let xt = ctx.input("x", Type::F32, x_ne).unwrap();
    let out = build(&ctx, w, xt).unwrap();
    out.set_output();
    let mut graph = ctx.graph(64).unwrap();
    graph.expand(out).unwrap();
    let mut sched = Scheduler::new(Backend::cpu().unwrap(), 2, 64).unwrap();
    sched.alloc(&graph).unwrap();
    w.write_bytes(w_bytes).unwrap();
    xt.write_bytes(&f32_bytes(x)).unwrap();
    sched.compute(&graph).unwrap();
    out.read_f32().unwrap()
}

fn worst_relative(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / scale
}

/// out[r][j] = sum_i w[j][i] * x[r][i], in f64.
fn exact_product(w: &[f32], x: &[f32], k: usize) -> Vec<f32> {
    x.chunks_exact(k)
        .flat_map(|row| {
            w.chunks_exact(k).map(move |col| {
                col.iter()
                    .zip(row)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>() as f32
            })
        })
        .collect()
}

/// The instruction sets this CPU runs, each tested.
fn sets() -> Vec<Kernels> {
    Kernels::ALL.into_iter().filter(|k| k.runs_here()).collect()
}

/// The packed product on every instruction set this CPU runs against ggml's on the
/// same bytes, for every tile height; returns the worst relative difference from the
/// exact product of the stored weights per set.
fn matches_ggml(ty: Type, k: usize, n: usize, tol: f32) -> Vec<(Kernels, f32)> {
    let w = ggml::quantize(ty, &values(k * n, 1), k).unwrap();
    let packed = packed::pack(ty, &w, k, n).unwrap();
    assert_eq!(packed.len(), w.len());
    let mut worst_exact = Vec::new();
    for set in Kernels::ALL {
        if !set.runs_here() {
            let ctx = Context::new(4, 0).unwrap();
            let (wt, xt) = (
                ctx.new_tensor(ty, &[k, n]).unwrap(),
                ctx.new_tensor(Type::F32, &[k, 1]).unwrap(),
            );
            let err = ctx.mul_mat_packed_on(set, wt, xt).unwrap_err().to_string();
            assert!(err.contains(set.description()), "{err}");
            continue;
        }
        for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 19] {
            let x = values(k * m, 10 + m as u64);
            let want = compute(ty, &w, [k, n], &x, &[k, m], |ctx, w, x| ctx.mul_mat(w, x));
            let got = compute(ty, &packed, [k, n], &x, &[k, m], |ctx, w, x| {
                ctx.mul_mat_packed_on(set, w, x)
            });
            let err = worst_relative(&got, &want);
            assert!(
                err < tol,
                "{ty} on {set:?}, {m} rows: relative difference {err}"
            );
            // Against the exact product with the dequantized weights, no worse than ggml (RMS).
            let exact = exact_product(&ggml::to_f32(ty, &w, k * n).unwrap(), &x, k);
            let rms = |v: &[f32]| {
                (v.iter()
                    .zip(&exact)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>()
                    / v.len() as f64)
                    .sqrt()
            };
            let (ours, theirs) = (rms(&got), rms(&want));
            assert!(
                ours <= theirs * 1.1,
                "{ty} on {set:?}, {m} rows: {ours} from the exact product, ggml {theirs}"
            );
            let err = worst_relative(&got, &exact);
            match worst_exact.last_mut() {
                Some((s, worst)) if *s == set => *worst = f32::max(*worst, err),
                _ => worst_exact.push((set, err)),
            }
        }
    }
    worst_exact
}

/// The sets agree to float rounding: they quantize the activations alike and sum the
/// integer products exactly (f16 and bf16: multiply in f32); only the order of the
/// float sums differs.
#[test]
fn instruction_sets_agree() {
    let sets = sets();
    for (ty, k) in [
        (Type::Q4_0, 96),
        (Type::Q8_0, 96),
        (Type::Q4_K, 512),
        (Type::F16, 100),
        (Type::BF16, 100),
    ] {
        let n = 32;
        let w = ggml::quantize(ty, &values(k * n, 5), k).unwrap();
        let packed = packed::pack(ty, &w, k, n).unwrap();
        let x = values(k * 11, 6);
        let on = |set: Kernels| {
            compute(ty, &packed, [k, n], &x, &[k, 11], |ctx, w, x| {
                ctx.mul_mat_packed_on(set, w, x)
            })
        };
        let first = on(sets[0]);
        for &set in &sets[1..] {
            // bf16 activations on `vdpbf16ps`: bf16's rounding, not the same bits.
            let tol = if ty == Type::BF16 && set == Kernels::Avx512Bf16 {
                1e-2
            } else {
                1e-6
            };
            let err = worst_relative(&on(set), &first);
            assert!(
                err < tol,
                "{ty}: {set:?} differs from {:?} by {err}",
                sets[0]
            );
        }
    }
}

/// Every extreme byte the formats can hold: q8_0's -128 and 127, q4's 0 and 15 against
/// activations at full scale. Guards AVX2's 16-bit pair sums, which would saturate
/// if a product could leave their range.
#[test]
fn extreme_weights_and_activations() {
    let (k, n) = (64, 16);
    for ty in [Type::Q4_0, Type::Q8_0] {
        let block = if ty == Type::Q4_0 { 18 } else { 34 };
        let mut w = vec![0u8; k / 32 * n * block];
        for (b, chunk) in w.chunks_exact_mut(block).enumerate() {
            chunk[..2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
            let fill = match (ty, b % 2) {
                (Type::Q4_0, 0) => 0xFF, // every nibble 15: weight 7
                (Type::Q4_0, _) => 0x00, // every nibble 0: weight -8
                (_, 0) => 0x80,          // -128
                _ => 0x7F,               // 127
            };
            chunk[2..].fill(fill);
        }
        let packed = packed::pack(ty, &w, k, n).unwrap();
        // Rows at +-full scale, one with alternating signs.
        let mut x = vec![1.0f32; k];
        x.extend(vec![-1.0f32; k]);
        x.extend((0..k).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }));
        let want = compute(ty, &w, [k, n], &x, &[k, 3], |ctx, w, x| ctx.mul_mat(w, x));
        for set in sets() {
            let got = compute(ty, &packed, [k, n], &x, &[k, 3], |ctx, w, x| {
                ctx.mul_mat_packed_on(set, w, x)
            });
            let err = worst_relative(&got, &want);
            assert!(err < 1e-5, "{ty} on {set:?}: relative difference {err}");
        }
    }
}

#[test]
fn half_products_are_exact_in_f32() {
    // ggml rounds the activations to f16 (bf16) first; the FMA kernels keep them f32,
    // so they are within float rounding of the exact product. `vdpbf16ps` rounds them
    // to bf16 as ggml does, so it is held to ggml's distance (in `matches_ggml`). 100
    // inputs: not a multiple of the kernels' unrolling.
    for (ty, ggml_tol) in [(Type::F16, 2e-3), (Type::BF16, 1e-2)] {
        for (set, err) in matches_ggml(ty, 100, 48, ggml_tol) {
            if ty == Type::BF16 && set == Kernels::Avx512Bf16 {
                assert!(err < 1e-2, "bf16 on {set:?}: {err} from the exact product");
            } else {
                assert!(
                    err < 1e-5,
                    "{ty} on {set:?}: relative difference {err} from the exact product"
                );
            }
        }
    }
    // An odd width: odd row counts then end the gathered rows off 8-byte alignment.
    for (set, err) in matches_ggml(Type::F16, 7, 32, 2e-3) {
        assert!(
            err < 1e-5,
            "f16 on {set:?}, 7 inputs: relative difference {err}"
        );
    }
    // bf16 rounding of a width that is not a multiple of 16 (the masked tail).
    matches_ggml(Type::BF16, 38, 32, 1e-2);
}

#[test]
fn q4_0_products_match_ggml() {
    // Both quantize the activations alike; only the order of float sums differs.
    matches_ggml(Type::Q4_0, 96, 48, 1e-5);
}

#[test]
fn q8_0_products_match_ggml() {
    matches_ggml(Type::Q8_0, 96, 48, 1e-5);
}

#[test]
fn q4_k_products_match_ggml() {
    // ggml quantizes q4_K's activations per 256 values, this per 32: they round differently.
    matches_ggml(Type::Q4_K, 512, 32, 1e-2);
}

#[test]
fn rows_with_gaps_and_batches() {
    if !packed::available() {
        return;
    }
    // x is [k, 3, 4] seen as [k, 4, 3] through a permutation: rows are not contiguous.
    let (k, n) = (64, 32);
    let w = ggml::quantize(Type::Q4_0, &values(k * n, 2), k).unwrap();
    let packed = packed::pack(Type::Q4_0, &w, k, n).unwrap();
    let x = values(k * 12, 3);
    let want = compute(Type::Q4_0, &w, [k, n], &x, &[k, 3, 4], |ctx, w, x| {
        ctx.mul_mat(w, ctx.cont(ctx.permute(x, [0, 2, 1, 3])?)?)
    });
    let got = compute(Type::Q4_0, &packed, [k, n], &x, &[k, 3, 4], |ctx, w, x| {
        ctx.mul_mat_packed(w, ctx.permute(x, [0, 2, 1, 3])?)
    });
    let err = worst_relative(&got, &want);
    assert!(err < 1e-5, "relative difference {err}");
}

#[test]
fn packing_checks_shapes_and_sizes() {
    assert!(packed::packable(Type::Q4_0, &[64, 32]));
    assert!(packed::packable(Type::Q4_K, &[256, 32]));
    assert!(
        !packed::packable(Type::Q4_K, &[128, 32]),
        "q4_K blocks hold 256 inputs"
    );
    assert!(
        !packed::packable(Type::Q4_0, &[64, 24]),
        "outputs must come in groups of 16"
    );
    assert!(packed::packable(Type::Q8_0, &[64, 32]));
    assert!(
        packed::packable(Type::F16, &[7, 32]),
        "f16 takes any number of inputs"
    );
    assert!(!packed::packable(Type::BF16, &[64, 40]));
    assert!(
        !packed::packable(Type::BF16, &[7, 32]),
        "bf16 is packed by pairs of inputs"
    );
    assert!(!packed::packable(Type::F32, &[64, 32]));
    assert!(!packed::packable(Type::Q5_0, &[64, 32]));
    assert!(!packed::packable(Type::Q4_0, &[64, 32, 2]));
    let err = packed::pack(Type::Q4_0, &[0u8; 10], 64, 32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("10"), "{err}");
    assert!(packed::pack(Type::Q4_0, &[], 48, 32).is_err());
    assert!(packed::pack(Type::Q5_0, &[0u8; 22 * 2 * 32], 64, 32).is_err());
    let ctx = Context::new(4, 0).unwrap();
    let (w, x) = (
        ctx.new_tensor(Type::Q4_0, &[64, 32]).unwrap(),
        ctx.new_tensor(Type::F32, &[32, 2]).unwrap(),
    );
    assert!(ctx.mul_mat_packed(w, x).is_err());
}
