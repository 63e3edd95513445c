//! `paligemma bench --vs-llama-bench PATH`: our decoder against llama.cpp's on the
//! same bytes, in one sitting. The model's Gemma 2 decoder is written out as a GGUF that
//! llama.cpp loads (its `gemma2` architecture, the same tensors byte for byte, a
//! placeholder vocabulary of the model's size), then our prefill and decode and
//! `llama-bench`'s (`-p` at depth 0, `-n` at a depth of our prefix) run in turn, rep by
//! rep, so that the machine's drift hits both alike. Build llama-bench on our ggml with
//! `scripts/llama-bench-build.sh`.
use crate::bench::{BenchArgs, median};
use anyhow::{Context, Result, bail};
use ggml::gguf::{GgufFile, GgufHeader, GgufWriter, Value};
use paligemma::config::TextArch;
use paligemma::preprocess::RgbImage;
use paligemma::{GenerateOptions, Model};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What one sitting measured: medians over the reps, tokens per second.
#[derive(serde::Serialize)]
struct Comparison {
    cpu: String,
    cpu_flags: Vec<String>,
    threads: usize,
    ours: PathBuf,
    llama_cpp: PathBuf,
    prefix_tokens: usize,
    decode_tokens: usize,
    ours_prefill: f64,
    llama_prefill: f64,
    prefill_ratio: f64,
    ours_decode: f64,
    llama_decode: f64,
    decode_ratio: f64,
}

/// The tensors of the decoder (llama.cpp's names are ours).
fn decoder_tensor(name: &str) -> bool {
    name == "token_embd.weight" || name == "output_norm.weight" || name.starts_with("blk.")
}

/// Writes the decoder of `model` as a llama.cpp `gemma2` GGUF at `out` (once).
fn write_gemma2(model: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        return Ok(());
    }
    let gguf = GgufFile::open(model)?;
    let (config, _) = paligemma::validate::model_file(&gguf)?;
    let t = &config.text;
    if t.arch != TextArch::Gemma2 {
        bail!(
            "{}: llama.cpp is compared on Gemma 2 decoders, this one is {:?}",
            model.display(),
            t.arch
        );
    }
    let mut header = GgufHeader::new();
    let u32v = |v: usize| Value::U32(v as u32);
    let mut set = |key: &str, v: Value| header.set(key, v);
    set("general.architecture", Value::String("gemma2".into()));
    set(
        "general.name",
        Value::String(format!("decoder of {}", config.name)),
    );
    set("gemma2.context_length", u32v(t.context_length));
    set("gemma2.embedding_length", u32v(t.width));
    set("gemma2.block_count", u32v(t.depth));
    set("gemma2.feed_forward_length", u32v(t.ffn));
    set("gemma2.attention.head_count", u32v(t.heads));
    set("gemma2.attention.head_count_kv", u32v(t.kv_heads));
    set("gemma2.attention.key_length", u32v(t.head_dim));
    set("gemma2.attention.value_length", u32v(t.head_dim));
    set(
        "gemma2.attention.layer_norm_rms_epsilon",
        Value::F32(t.rms_eps),
    );
    set("gemma2.rope.freq_base", Value::F32(t.rope_theta));
    if let Some(w) = t.sliding_window {
        set("gemma2.attention.sliding_window", u32v(w));
    }
    if let Some(cap) = t.attn_softcap {
        set("gemma2.attn_logit_softcapping", Value::F32(cap));
    }
    if let Some(cap) = t.final_softcap {
        set("gemma2.final_logit_softcapping", Value::F32(cap));
    }
    // llama-bench feeds random ids; it needs a vocabulary of the model's size, not words.
    let tok = &config.tokens;
    let special = [tok.bos, tok.eos, tok.pad];
    set("tokenizer.ggml.model", Value::String("llama".into()));
    set(
        "tokenizer.ggml.tokens",
        Value::Array(
            (0..t.vocab_size)
                .map(|i| Value::String(format!("<t{i}>")))
                .collect(),
        ),
    );
    set(
        "tokenizer.ggml.scores",
        Value::Array(vec![Value::F32(0.0); t.vocab_size]),
    );
    set(
        "tokenizer.ggml.token_type",
        Value::Array(
            (0..t.vocab_size)
                .map(|i| Value::I32(if special.contains(&(i as u32)) { 3 } else { 1 }))
                .collect(),
        ),
    );
    set("tokenizer.ggml.bos_token_id", Value::U32(tok.bos));
    set("tokenizer.ggml.eos_token_id", Value::U32(tok.eos));
    set("tokenizer.ggml.padding_token_id", Value::U32(tok.pad));
    let tensors: Vec<_> = gguf
        .tensors
        .iter()
        .filter(|i| decoder_tensor(&i.name))
        .collect();
    for info in &tensors {
        header.add_tensor(info.name.clone(), info.ty, &info.shape)?;
    }
    let mut writer = GgufWriter::create(out, header)?;
    for info in &tensors {
        writer.write_tensor(&info.name, gguf.tensor_data(info))?;
    }
    writer.finish()?;
    Ok(())
}

/// The CPU's model name and the flags that decide which kernels run.
fn cpu() -> (String, Vec<String>) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let wanted = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx512_bf16",
        "avx_vnni",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
    ];
    let flags = field("flags").unwrap_or_default();
    let present = wanted
        .iter()
        .filter(|f| flags.split_whitespace().any(|g| g == **f))
        .map(|f| f.to_string())
        .collect();
    (
        field("model name").unwrap_or_else(|| "unknown CPU".into()),
        present,
    )
}

/// One llama-bench test: tokens per second.
fn llama_bench(bin: &Path, model: &Path, threads: usize, args: &[String]) -> Result<f64> {
    let out = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args([
            "-t",
            &threads.to_string(),
            "-fa",
            "1",
            "-r",
            "1",
            "-o",
            "json",
        ])
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("the JSON of {}", bin.display()))?;
    runs.get(0)
        .and_then(|r| r.get("avg_ts"))
        .and_then(serde_json::Value::as_f64)
        .context("llama-bench printed no avg_ts")
}

pub fn run(
    args: &BenchArgs,
    path: &Path,
    mut model: Model,
    image: &RgbImage,
    llama: &Path,
) -> Result<()> {
    let gemma2 = path.with_extension("gemma2.gguf");
    write_gemma2(path, &gemma2).with_context(|| format!("writing {}", gemma2.display()))?;
    let threads = model.threads();
    let ids = model.tokenizer().prefix_ids("caption en")?;
    let emb = model.encode_image(image)?;
    let n = args.decode_tokens.max(1);
    let options = GenerateOptions {
        max_tokens: n + 1,
        ignore_eos: true,
        ..Default::default()
    };
    let (p, depth) = (ids.len().to_string(), ids.len().to_string());
    let (mut ours_prefill, mut ours_decode, mut llama_prefill, mut llama_decode) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..args.warmup + args.reps {
        let g = model
            .generate(&emb, std::slice::from_ref(&ids), &options, &mut |_| true)?
            .remove(0);
        let op = ids.len() as f64 / (g.timings.prefill / 1e3);
        let od = g.tokens.len().saturating_sub(1) as f64 / (g.timings.decode / 1e3);
        let lp = llama_bench(
            llama,
            &gemma2,
            threads,
            &["-p".into(), p.clone(), "-n".into(), "0".into()],
        )?;
        let ld = llama_bench(
            llama,
            &gemma2,
            threads,
            &[
                "-p".into(),
                "0".into(),
                "-n".into(),
                n.to_string(),
                "-d".into(),
                depth.clone(),
            ],
        )?;
        eprintln!(
            "rep {rep}: prefill {op:.1} / {lp:.1} tokens/s, decode {od:.1} / {ld:.1} tokens/s"
        );
        if rep >= args.warmup {
            ours_prefill.push(op);
            ours_decode.push(od);
            llama_prefill.push(lp);
            llama_decode.push(ld);
        }
    }
    let (cpu, cpu_flags) = cpu();
    let (op, lp, od, ld) = (
        median(ours_prefill),
        median(llama_prefill),
        median(ours_decode),
        median(llama_decode),
    );
    let c = Comparison {
        cpu,
        cpu_flags,
        threads,
        ours: path.to_path_buf(),
        llama_cpp: gemma2,
        prefix_tokens: ids.len(),
        decode_tokens: n,
        ours_prefill: op,
        llama_prefill: lp,
        prefill_ratio: op / lp,
        ours_decode: od,
        llama_decode: ld,
        decode_ratio: od / ld,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        println!(
            "cpu        {} ({}), {} threads, {} reps interleaved",
            c.cpu,
            c.cpu_flags.join(" "),
            c.threads,
            args.reps
        );
        println!(
            "model      {} against llama.cpp on {}",
            c.ours.display(),
            c.llama_cpp.display()
        );
        println!(
            "prefill    {:>8.1} tokens/s, llama.cpp {:>8.1} (-p {}): {:.2}x",
            c.ours_prefill, c.llama_prefill, c.prefix_tokens, c.prefill_ratio
        );
        println!(
            "decode     {:>8.1} tokens/s, llama.cpp {:>8.1} (-n {} -d {}): {:.2}x",
            c.ours_decode, c.llama_decode, n, c.prefix_tokens, c.decode_ratio
        );
    }
    Ok(())
}
