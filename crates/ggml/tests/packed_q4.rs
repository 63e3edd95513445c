//! The packed q4_0 products against ggml's own q4_0 `mul_mat` on the same bytes.
mod common;

use common::{f32_bytes, values};
use ggml::{Backend, Context, Scheduler, Tensor, Type, packed_q4};

/// Computes `build(w, x)` on a 2-thread CPU scheduler.
fn compute(
    w_bytes: &[u8],
    w_ne: [usize; 2],
    x: &[f32],
    x_ne: &[usize],
    build: impl for<'c> Fn(&'c Context, Tensor<'c>, Tensor<'c>) -> ggml::Result<Tensor<'c>>,
) -> Vec<f32> {
    let ctx = Context::new(16, 64).unwrap();
    let w = ctx.input("w", Type::Q4_0, &w_ne).unwrap();
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
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
}

#[test]
fn products_match_ggml_for_every_tile_height() {
    let (k, n) = (96, 48);
    let w = ggml::quantize(Type::Q4_0, &values(k * n, 1), k).unwrap();
    let packed = packed_q4::pack_q4_0(&w, k, n).unwrap();
    assert_eq!(packed.len(), w.len());
    for m in [1, 2, 3, 7, 8, 9, 13, 19] {
        let x = values(k * m, 10 + m as u64);
        let want = compute(&w, [k, n], &x, &[k, m], |ctx, w, x| ctx.mul_mat(w, x));
        if !packed_q4::available() {
            let ctx = Context::new(4, 0).unwrap();
            let (wt, xt) = (ctx.new_tensor(Type::Q4_0, &[k, n]).unwrap(), ctx.new_tensor(Type::F32, &[k, m]).unwrap());
            assert!(ctx.mul_mat_packed_q4_0(wt, xt).unwrap_err().to_string().contains("VNNI"));
            continue;
        }
        let got = compute(&packed, [k, n], &x, &[k, m], |ctx, w, x| ctx.mul_mat_packed_q4_0(w, x));
        // Both quantize the activations alike; only the order of float sums differs.
        let err = worst_relative(&got, &want);
        assert!(err < 1e-5, "{m} rows: relative difference {err}");
    }
}

#[test]
fn rows_with_gaps_and_batches() {
    if !packed_q4::available() {
        return;
    }
    // x is [k, 3, 4] seen as [k, 4, 3] through a permutation: rows are not contiguous.
    let (k, n) = (64, 32);
    let w = ggml::quantize(Type::Q4_0, &values(k * n, 2), k).unwrap();
    let packed = packed_q4::pack_q4_0(&w, k, n).unwrap();
    let x = values(k * 12, 3);
    let want = compute(&w, [k, n], &x, &[k, 3, 4], |ctx, w, x| ctx.mul_mat(w, ctx.cont(ctx.permute(x, [0, 2, 1, 3])?)?));
    let got = compute(&packed, [k, n], &x, &[k, 3, 4], |ctx, w, x| ctx.mul_mat_packed_q4_0(w, ctx.permute(x, [0, 2, 1, 3])?));
    let err = worst_relative(&got, &want);
    assert!(err < 1e-5, "relative difference {err}");
}

#[test]
fn packing_checks_shapes_and_sizes() {
    assert!(packed_q4::packable(Type::Q4_0, &[64, 32]));
    assert!(!packed_q4::packable(Type::Q4_0, &[64, 24]), "outputs must come in groups of 16");
    assert!(!packed_q4::packable(Type::Q8_0, &[64, 32]));
    assert!(!packed_q4::packable(Type::Q4_0, &[64, 32, 2]));
    let err = packed_q4::pack_q4_0(&[0u8; 10], 64, 32).unwrap_err().to_string();
    assert!(err.contains("10"), "{err}");
    assert!(packed_q4::pack_q4_0(&[], 48, 32).is_err());
    let ctx = Context::new(4, 0).unwrap();
    let (w, x) = (ctx.new_tensor(Type::Q4_0, &[64, 32]).unwrap(), ctx.new_tensor(Type::F32, &[32, 2]).unwrap());
    assert!(ctx.mul_mat_packed_q4_0(w, x).is_err());
}
