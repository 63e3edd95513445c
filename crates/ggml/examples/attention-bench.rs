//! Times one attention product on the CPU: ggml's `flash_attn_ext` against our kernel
//! with f32 products (`avx512`) and bf16 products (`avx512bf16`) where this CPU runs them.
//!
//! `cargo run --release -p ggml --example attention-bench -- [KEYS] [HEADS] [HEAD_SIZE] [THREADS] [REPS] [QUERIES] [KV_HEADS]`
//! (default: SigLIP at 896 px, 4096 patches attending to each other, 16 heads of 72, 2
//! threads, 3 repetitions, no mask; keys and values in f32 as the vision tower has them,
//! in f16 as the decoder's cache has them when KV_HEADS is given: `4100 8 256 2 20 1 4`
//! is a 3B decoder's step at 896 px).
use ggml::packed::Kernels;
use ggml::{Backend, Context, Scheduler, Type};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(match std::env::args().nth(i) {
            Some(a) => a.parse()?,
            None => default,
        })
    };
    let (n, heads, hd, threads, reps) = (
        arg(1, 4096)?,
        arg(2, 16)?,
        arg(3, 72)?,
        arg(4, 2)?,
        arg(5, 3)?,
    );
    let (queries, kv_heads) = (arg(6, n)?, arg(7, 0)?);
    let (kv_type, kv_heads) = match kv_heads {
        0 => (Type::F32, heads),
        h => (Type::F16, h),
    };
    let data = |rows: usize, ty: Type| -> Result<Vec<u8>, ggml::Error> {
        let x: Vec<f32> = (0..hd * rows)
            .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        ggml::quantize(ty, &x, hd)
    };
    let mut runs: Vec<(&str, Option<Kernels>)> = vec![("ggml flash_attn_ext", None)];
    for set in [Kernels::Avx512Vnni, Kernels::Avx512Bf16] {
        if set.runs_here() {
            runs.push((set.name(), Some(set)));
        }
    }
    println!(
        "{queries} queries x {n} keys, {heads} heads of {hd} ({kv_heads} for keys and values, {}), {threads} threads",
        kv_type.name()
    );
    for (name, set) in runs {
        let ctx = Context::new(16, 64)?;
        let q = ctx.input("q", Type::F32, &[hd, queries, heads, 1])?;
        let k = ctx.input("k", kv_type, &[hd, n, kv_heads, 1])?;
        let v = ctx.input("v", kv_type, &[hd, n, kv_heads, 1])?;
        let scale = (hd as f32).powf(-0.5);
        let out = match set {
            Some(set) => ctx.attention_cpu_on(set, q, k, v, None, scale, 0.0, true)?,
            None => ctx.flash_attn_ext(q, k, v, None, scale, 0.0)?,
        };
        out.set_output();
        let mut graph = ctx.graph(16)?;
        graph.expand(out)?;
        let mut sched = Scheduler::new(Backend::cpu()?, threads, 16)?;
        sched.alloc(&graph)?;
        q.write_bytes(&data(queries * heads, Type::F32)?)?;
        for t in [k, v] {
            t.write_bytes(&data(n * kv_heads, kv_type)?)?;
        }
        sched.compute(&graph)?; // warm-up
        let mut times = Vec::new();
        for _ in 0..reps {
            let t0 = Instant::now();
            sched.compute(&graph)?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!("{name:>20}: {:9.3} ms (median of {reps})", times[reps / 2]);
    }
    Ok(())
}
