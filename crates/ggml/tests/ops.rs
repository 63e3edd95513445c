//! Each operation on the CPU backend against a plain Rust computation of the same thing.
mod common;

use common::{f32_bytes, values};
use ggml::{Backend, Context, Result, Scheduler, Tensor, Type};

/// Builds a graph with `build`, which declares inputs (with their f32 data) and
/// returns the output; computes it on a CPU scheduler and returns the output as f32.
fn run<'c>(
    ctx: &'c Context,
    build: impl FnOnce(&'c Context, &mut Vec<(Tensor<'c>, Vec<u8>)>) -> Result<Tensor<'c>>,
) -> Vec<f32> {
    let mut inputs = Vec::new();
    let out = build(ctx, &mut inputs).unwrap();
    out.set_output();
    let mut graph = ctx.graph(256).unwrap();
    graph.expand(out).unwrap();
    let mut sched = Scheduler::new(Backend::cpu().unwrap(), 2, 256).unwrap();
    sched.alloc(&graph).unwrap();
    for (t, data) in &inputs {
        t.write_bytes(data).unwrap();
    }
    sched.compute(&graph).unwrap();
    out.read_f32().unwrap()
}

fn input<'c>(
    ctx: &'c Context,
    inputs: &mut Vec<(Tensor<'c>, Vec<u8>)>,
    name: &str,
    ne: &[usize],
    data: &[f32],
) -> Result<Tensor<'c>> {
    let t = ctx.input(name, Type::F32, ne)?;
    inputs.push((t, f32_bytes(data)));
    Ok(t)
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= tol,
        "max abs difference {worst} > {tol}\n got {:?}\nwant {:?}",
        &got[..got.len().min(8)],
        &want[..want.len().min(8)]
    );
}

/// out[n][m] = sum_k a[m][k] * b[n][k]
fn matmul_ref(a: &[f32], b: &[f32], k: usize, m: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[j * m + i] = (0..k).map(|x| a[i * k + x] * b[j * k + x]).sum();
        }
    }
    out
}

#[test]
fn matmul_f32() {
    let (k, m, n) = (8, 5, 3);
    let (a, b) = (values(k * m, 1), values(k * n, 2));
    let ctx = Context::new(16, 256).unwrap();
    let got = run(&ctx, |ctx, ins| {
        let ta = input(ctx, ins, "a", &[k, m], &a)?;
        let tb = input(ctx, ins, "b", &[k, n], &b)?;
        ctx.mul_mat(ta, tb)
    });
    assert_close(&got, &matmul_ref(&a, &b, k, m, n), 1e-5);
}

fn matmul_quantized(ty: Type, tol: f32) {
    let (k, m, n) = (256, 4, 3);
    let (a, b) = (values(k * m, 3), values(k * n, 4));
    let qa = ggml::quantize(ty, &a, k).unwrap();
    let deq = ggml::to_f32(ty, &qa, k * m).unwrap();
    // Quantization must stay close to the original values...
    let qerr = a
        .iter()
        .zip(&deq)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(qerr < 0.15, "{ty} round trip error {qerr}");
    let ctx = Context::new(16, 256).unwrap();
    let got = run(&ctx, |ctx, ins| {
        let ta = ctx.input("a", ty, &[k, m])?;
        ins.push((ta, qa.clone()));
        let tb = input(ctx, ins, "b", &[k, n], &b)?;
        ctx.mul_mat(ta, tb)
    });
    // ...and the product must match the product with the dequantized weights (the
    // CPU also quantizes the activations, hence the tolerance).
    assert_close(&got, &matmul_ref(&deq, &b, k, m, n), tol);
}

#[test]
fn matmul_q8_0() {
    matmul_quantized(Type::Q8_0, 0.05);
}

#[test]
fn matmul_q4_k() {
    matmul_quantized(Type::Q4_K, 0.05);
}

#[test]
fn matmul_rejects_mismatched_shapes() {
    let ctx = Context::new(8, 0).unwrap();
    let a = ctx.new_tensor(Type::F32, &[8, 4]).unwrap();
    let b = ctx.new_tensor(Type::F32, &[7, 3]).unwrap();
    let err = ctx.mul_mat(a, b).unwrap_err().to_string();
    assert!(err.contains("mul_mat"), "{err}");
}

#[test]
fn soft_max_with_mask() {
    let (n_kv, n_q, heads) = (6, 4, 2);
    let x = values(n_kv * n_q * heads, 5);
    // Causal-like mask: query q sees keys 0..=q+2.
    let mask: Vec<f32> = (0..n_q)
        .flat_map(|q| (0..n_kv).map(move |k| if k <= q + 2 { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let scale = 0.5;
    let ctx = Context::new(16, 256).unwrap();
    let got = run(&ctx, |ctx, ins| {
        let tx = input(ctx, ins, "x", &[n_kv, n_q, heads], &x)?;
        let tm = input(ctx, ins, "mask", &[n_kv, n_q], &mask)?;
        ctx.soft_max_ext(tx, Some(tm), scale)
    });
    let mut want = vec![0f32; x.len()];
    for h in 0..heads {
        for q in 0..n_q {
            let row = (h * n_q + q) * n_kv;
            let s: Vec<f32> = (0..n_kv)
                .map(|k| x[row + k] * scale + mask[q * n_kv + k])
                .collect();
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = s.iter().map(|v| (v - max).exp()).sum();
            for k in 0..n_kv {
                want[row + k] = (s[k] - max).exp() / sum;
            }
        }
    }
    assert_close(&got, &want, 1e-6);
}

#[test]
fn rope_neox() {
    let (d, heads, tokens) = (8, 2, 3);
    let x = values(d * heads * tokens, 6);
    let pos = [1i32, 2, 7];
    let theta = 10000f32;
    let ctx = Context::new(16, 256).unwrap();
    let got = run(&ctx, |ctx, ins| {
        let tx = input(ctx, ins, "x", &[d, heads, tokens], &x)?;
        let tp = ctx.input("pos", Type::I32, &[tokens])?;
        ins.push((tp, pos.iter().flat_map(|p| p.to_le_bytes()).collect()));
        ctx.rope_neox(tx, tp, d, theta)
    });
    let mut want = x.clone();
    for (t, &p) in pos.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * d;
            for i in 0..d / 2 {
                let angle = p as f32 * theta.powf(-2.0 * i as f32 / d as f32);
                let (x0, x1) = (x[base + i], x[base + i + d / 2]);
                want[base + i] = x0 * angle.cos() - x1 * angle.sin();
                want[base + i + d / 2] = x0 * angle.sin() + x1 * angle.cos();
            }
        }
    }
    assert_close(&got, &want, 1e-5);
}

#[test]
fn conv2d_im2col() {
    let (w, h, cin, cout, kk) = (5, 4, 2, 3, 3);
    let x = values(w * h * cin, 7);
    let k = values(kk * kk * cin * cout, 8);
    let ctx = Context::new(16, 256).unwrap();
    let got = run(&ctx, |ctx, ins| {
        let tk = input(ctx, ins, "k", &[kk, kk, cin, cout], &k)?;
        let tx = input(ctx, ins, "x", &[w, h, cin, 1], &x)?;
        ctx.conv_2d(tk, tx, 1, 1)
    });
    let mut want = vec![0f32; w * h * cout];
    for o in 0..cout {
        for y in 0..h {
            for xx in 0..w {
                let mut s = 0f32;
                for c in 0..cin {
                    for ky in 0..kk {
                        for kx in 0..kk {
                            let (iy, ix) = (y as i64 + ky as i64 - 1, xx as i64 + kx as i64 - 1);
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                s += x[(c * h + iy as usize) * w + ix as usize]
                                    * k[((o * cin + c) * kk + ky) * kk + kx];
                            }
                        }
                    }
                }
                want[(o * h + y) * w + xx] = s;
            }
        }
    }
    assert_close(&got, &want, 1e-5);
}

fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044715 * x * x * x)).tanh())
}

/// Typical activations, then the extremes where a naive tanh or division would break,
/// and a length that is not a whole number of vectors.
fn gelu_inputs() -> Vec<f32> {
    let mut x: Vec<f32> = values(63, 9).iter().map(|v| v * 6.0).collect();
    x.extend([0.0, -1e4, -40.0, -9.5, 1e4, 3e-30, -3e-30]);
    x
}

fn assert_gelu(x: &[f32], got: &[f32], times: &[f32]) {
    for (((&x, &g), w), t) in x
        .iter()
        .zip(got)
        .zip(x.iter().map(|&v| gelu_tanh(v)))
        .zip(times)
    {
        let w = w * t;
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
            "gelu({x}) * {t} = {g}, expected {w}"
        );
    }
}

/// `gelu` alone and times a gate against the formula.
fn check_gelu(gelu: for<'c> fn(&'c Context, Tensor<'c>, Option<Tensor<'c>>) -> Result<Tensor<'c>>) {
    let x = gelu_inputs();
    let y: Vec<f32> = values(x.len(), 12).iter().map(|v| v * 3.0).collect();
    for gated in [false, true] {
        let ctx = Context::new(16, 256).unwrap();
        let got = run(&ctx, |ctx, ins| {
            let tx = input(ctx, ins, "x", &[x.len()], &x)?;
            let ty = if gated {
                Some(input(ctx, ins, "y", &[x.len()], &y)?)
            } else {
                None
            };
            gelu(ctx, tx, ty)
        });
        let times = if gated { y.clone() } else { vec![1.0; x.len()] };
        assert_gelu(&x, &got, &times);
    }
}

#[test]
fn gelu_precise_matches_formula() {
    check_gelu(|ctx, x, times| ctx.gelu_precise(x, times));
}

#[test]
fn gelu_in_one_pass_matches_formula() {
    // Our op on AVX-512 CPUs (ggml's ops elsewhere), over several threads' shares.
    check_gelu(|ctx, x, times| ctx.gelu_cpu(x, times));
}

#[test]
fn gelu_table_is_close() {
    let x: Vec<f32> = values(64, 10).iter().map(|v| v * 4.0).collect();
    let ctx = Context::new(16, 256).unwrap();
    let got = run(&ctx, |ctx, ins| {
        let tx = input(ctx, ins, "x", &[64], &x)?;
        ctx.gelu(tx)
    });
    let want: Vec<f32> = x.iter().map(|&v| gelu_tanh(v)).collect();
    assert_close(&got, &want, 1e-2);
}

#[test]
fn rms_norm() {
    let (n, rows) = (16, 3);
    let x = values(n * rows, 11);
    let eps = 1e-6;
    let ctx = Context::new(16, 256).unwrap();
    let got = run(&ctx, |ctx, ins| {
        let tx = input(ctx, ins, "x", &[n, rows], &x)?;
        ctx.rms_norm(tx, eps)
    });
    let want: Vec<f32> = x
        .chunks(n)
        .flat_map(|r| {
            let ms = r.iter().map(|v| v * v).sum::<f32>() / n as f32;
            r.iter()
                .map(move |v| v / (ms + eps).sqrt())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_close(&got, &want, 1e-5);
}

/// Plain attention with softcap: out[q] = sum_k softmax(cap*tanh(s/cap) + mask) v.
#[test]
fn flash_attention_with_softcap() {
    let (d, n_q, n_kv, heads, kv_heads) = (16, 3, 5, 4, 2);
    let q = values(d * n_q * heads, 12);
    let k: Vec<f32> = values(d * n_kv * kv_heads, 13)
        .iter()
        .map(|v| v * 3.0)
        .collect();
    let v = values(d * n_kv * kv_heads, 14);
    let (scale, cap) = (0.3f32, 2.0f32);
    let mask: Vec<f32> = (0..n_q)
        .flat_map(|qi| (0..n_kv).map(move |ki| if ki <= qi + 2 { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let ctx = Context::new(32, 256).unwrap();
    let got = run(&ctx, |ctx, ins| {
        // q as [d, n_q, heads], k/v as [d, n_kv, kv_heads] (F16 like a KV cache).
        let tq = input(ctx, ins, "q", &[d, n_q, heads], &q)?;
        let tk = ctx.cast(input(ctx, ins, "k", &[d, n_kv, kv_heads], &k)?, Type::F16)?;
        let tv = ctx.cast(input(ctx, ins, "v", &[d, n_kv, kv_heads], &v)?, Type::F16)?;
        let tm = ctx.cast(input(ctx, ins, "mask", &[n_kv, n_q], &mask)?, Type::F16)?;
        ctx.flash_attn_ext(tq, tk, tv, Some(tm), scale, cap)
    });
    // Result layout: [d, heads, n_q].
    let f16 = |x: f32| half::f16::from_f32(x).to_f32();
    let mut want = vec![0f32; d * heads * n_q];
    for h in 0..heads {
        let kh = h / (heads / kv_heads);
        for qi in 0..n_q {
            let qv = &q[(h * n_q + qi) * d..][..d];
            let s: Vec<f32> = (0..n_kv)
                .map(|ki| {
                    let kv = &k[(kh * n_kv + ki) * d..][..d];
                    let dot: f32 = qv.iter().zip(kv).map(|(a, b)| a * f16(*b)).sum::<f32>() * scale;
                    cap * (dot / cap).tanh() + mask[qi * n_kv + ki]
                })
                .collect();
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f32 = w.iter().sum();
            for j in 0..d {
                let acc: f32 = (0..n_kv)
                    .map(|ki| w[ki] * f16(v[(kh * n_kv + ki) * d + j]))
                    .sum();
                want[(qi * heads + h) * d + j] = acc / sum;
            }
        }
    }
    assert_close(&got, &want, 2e-3);
}

#[test]
fn get_rows_and_views() {
    let (n, rows) = (4, 5);
    let x = values(n * rows, 15);
    let ctx = Context::new(16, 256).unwrap();
    let got = run(&ctx, |ctx, ins| {
        let tx = input(ctx, ins, "x", &[n, rows], &x)?;
        let ids = ctx.input("ids", Type::I32, &[2])?;
        ins.push((
            ids,
            [3i32, 1].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
        ctx.get_rows(tx, ids)
    });
    let want: Vec<f32> = [3, 1]
        .iter()
        .flat_map(|&r| x[r * n..(r + 1) * n].to_vec())
        .collect();
    assert_close(&got, &want, 0.0);

    let small = ctx.new_tensor(Type::F32, &[4, 2]).unwrap();
    assert!(
        ctx.view(small, &[4, 3], &[16], 0).is_err(),
        "a view past the end must be refused"
    );
    assert!(ctx.reshape(small, &[3, 3]).is_err());
}

#[test]
fn devices_and_backend_names() {
    let cpu = ggml::Device::find("cpu").unwrap();
    assert_eq!(cpu.spec(), "cpu");
    let err = ggml::Device::find("cuda:7").unwrap_err().to_string();
    assert!(err.contains("cuda:7") && err.contains("cpu"), "{err}");
}

#[test]
fn type_names_round_trip() {
    for ty in Type::ALL {
        assert_eq!(Type::from_name(ty.name()).unwrap(), ty);
    }
    assert!(
        Type::from_name("q9_9")
            .unwrap_err()
            .to_string()
            .contains("q4_k")
    );
    assert!(Type::from_raw(9999).is_err());
    assert!(
        ggml::quantize(Type::Q4_K, &[0.0; 100], 100).is_err(),
        "100 is not a multiple of 256"
    );
}

#[test]
fn join_cpu_puts_parts_back_to_back() {
    // 13 parts (more than one node takes) of uneven lengths along dimension 2.
    let lens: Vec<usize> = (1..=13).map(|i| (i * 7) % 5 + 1).collect();
    let data: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| values(5 * 3 * n, i as u64 + 10))
        .collect();
    let ctx = Context::new(64, 64).unwrap();
    let got = run(&ctx, |ctx, inputs| {
        let parts = lens
            .iter()
            .zip(&data)
            .enumerate()
            .map(|(i, (&n, d))| input(ctx, inputs, &format!("p{i}"), &[5, 3, n], d))
            .collect::<Result<Vec<_>>>()?;
        let joined = ctx.join_cpu(&parts, 2)?;
        assert_eq!(joined.shape(), vec![5, 3, lens.iter().sum::<usize>()]);
        Ok(joined)
    });
    assert_eq!(got, data.concat());
}

#[test]
fn join_cpu_rejects_parts_that_are_not_stacked() {
    let ctx = Context::new(16, 16).unwrap();
    let a = ctx.input("a", Type::F32, &[4, 2, 3]).unwrap();
    let narrow = ctx.input("narrow", Type::F32, &[4, 1, 3]).unwrap();
    let wide = ctx.input("wide", Type::F32, &[4, 2, 3, 2]).unwrap();
    assert!(
        ctx.join_cpu(&[a, narrow], 2).is_err(),
        "dimension 1 differs"
    );
    assert!(
        ctx.join_cpu(&[a, wide], 2).is_err(),
        "a dimension above the joined one is not 1"
    );
    assert!(
        ctx.join_cpu(&[a, ctx.permute(a, [0, 2, 1, 3]).unwrap()], 2)
            .is_err(),
        "not contiguous"
    );
    assert!(ctx.join_cpu(&[], 2).is_err());
    assert_eq!(ctx.join_cpu(&[a, a], 2).unwrap().shape(), vec![4, 2, 6]);
}

#[test]
fn a_full_graph_is_an_error_and_takes_what_fits_after() {
    let ctx = Context::new(64, 64).unwrap();
    let a = ctx.input("a", Type::F32, &[4]).unwrap();
    let mut chain = vec![a];
    for _ in 0..10 {
        chain.push(ctx.scale(*chain.last().unwrap(), 2.0).unwrap());
    }
    let mut graph = ctx.graph(8).unwrap();
    graph.expand(chain[4]).unwrap();
    assert_eq!(graph.n_nodes(), 4);
    // Six more nodes do not fit in 8; the refused expansion adds nothing, so two more
    // fit, then two more, then none.
    assert!(matches!(
        graph.expand(chain[10]),
        Err(ggml::Error::GraphFull(8))
    ));
    graph.expand(chain[6]).unwrap();
    graph.expand(chain[8]).unwrap();
    assert_eq!(graph.n_nodes(), 8);
    assert!(matches!(
        graph.expand(chain[9]),
        Err(ggml::Error::GraphFull(8))
    ));
    // Expanding what the graph holds adds nothing.
    graph.expand(chain[8]).unwrap();
    let mut sched = Scheduler::new(Backend::cpu().unwrap(), 1, 8).unwrap();
    chain[8].set_output();
    sched.alloc(&graph).unwrap();
    a.write_bytes(&f32_bytes(&[1.0, 2.0, 3.0, 4.0])).unwrap();
    sched.compute(&graph).unwrap();
    assert_eq!(chain[8].read_f32().unwrap(), [256.0, 512.0, 768.0, 1024.0]);
}

/// `w · x` with the weight `w` (`[k, n]`, bytes of `ty`) placed in a buffer of `buft`
/// (ggml's CPU repacks its weights when they are written there) and `m` rows of `x`.
fn product_in(
    buft: ggml::BufferType,
    ty: Type,
    w: &[u8],
    k: usize,
    n: usize,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    let weights = Context::new(1, 0).unwrap();
    let tw = weights.new_named("w", ty, &[k, n]).unwrap();
    let _buffer = buft.alloc_tensors(&weights).unwrap();
    tw.write_bytes(w).unwrap();
    let ctx = Context::new(16, 256).unwrap();
    run(&ctx, |ctx, ins| {
        let tx = input(ctx, ins, "x", &[k, m], x)?;
        ctx.mul_mat(tw, tx)
    })
}

/// ggml's CPU repacks weights into interleaved layouts for its own kernels, other ones on
/// each CPU (AVX2 on x86-64; dotprod and i8mm on ARM), with activations quantized the
/// same way: a product with repacked weights is the product in place but for the order
/// of its sums, for every batch of rows (whole interleaved groups and the rest).
#[test]
fn repacked_matmul_matches_in_place() {
    let backend = Backend::cpu().unwrap();
    let (k, n) = (256, 16);
    let mut checked = Vec::new();
    for ty in [Type::Q4_0, Type::Q8_0, Type::Q4_K] {
        let w = ggml::quantize(ty, &values(k * n, 5), k).unwrap();
        for buft in backend
            .device()
            .extra_buffer_types()
            .into_iter()
            .filter(|b| b.supports_weight(backend.device(), ty, &[k, n]))
        {
            for m in [1, 2, 3, 4, 5, 8, 9, 17] {
                let x = values(k * m, 6);
                let plain = product_in(backend.buffer_type(), ty, &w, k, n, &x, m);
                let repacked = product_in(buft, ty, &w, k, n, &x, m);
                let scale = plain.iter().fold(0f32, |a, v| a.max(v.abs()));
                let worst = plain
                    .iter()
                    .zip(&repacked)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max)
                    / scale;
                println!(
                    "{ty} in {}, {m} rows: repacked differs by {worst:.2e} of the largest output",
                    buft.name()
                );
                assert!(worst < 1e-5, "{ty} in {}, {m} rows: {worst:e}", buft.name());
            }
            checked.push(format!("{ty} in {}", buft.name()));
        }
    }
    println!("checked: {checked:?}");
}
