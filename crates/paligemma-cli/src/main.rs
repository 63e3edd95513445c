//! `paligemma`: convert Hugging Face checkpoints, inspect and run models.
use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use paligemma::convert::{ConvertOptions, default_vision_type, parse_weight_type};
use paligemma::preprocess::{PixelValues, RgbImage};
use paligemma::{
    AnswerOptions, ContextOptions, DetectionFilter, Device, KvType, Model, Sampling, Task,
    WeightOptions, Weights,
};
mod bench;
mod bench_streams;
mod eval;
mod eval_tracking;
mod serve;
mod shapes;
mod vs_llama;

use npyz::WriterBuilder;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

#[derive(Parser)]
#[command(
    name = "paligemma",
    version,
    about = "PaliGemma 1 and 2 on ggml: convert, inspect and run models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a Hugging Face checkpoint folder into one self-contained GGUF.
    Convert {
        /// Folder with config.json, *.safetensors, tokenizer.json, preprocessor_config.json.
        hf_dir: PathBuf,
        /// Output GGUF file.
        #[arg(short, long)]
        out: PathBuf,
        /// Type of the decoder and projector weights: f32, f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k.
        #[arg(long = "type", default_value = "f16")]
        ty: String,
        /// Type of the SigLIP weights (same choices; default: --type when that is f32,
        /// f16 or bf16, else f16, since SigLIP loses more to quantization than Gemma).
        #[arg(long)]
        vision_type: Option<String>,
        /// big_vision's VQ-VAE weights (vae-oid.npz) to store for segmentation masks.
        #[arg(long)]
        seg_decoder: Option<PathBuf>,
    },
    /// Print a model's hyper-parameters, tokenizer summary and tensor table.
    Info {
        model: PathBuf,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Answer a prompt about an image.
    Run {
        #[command(flatten)]
        load: LoadArgs,
        /// Image file (PNG, JPEG, ...).
        #[arg(short, long, required_unless_present = "pixel_values")]
        image: Option<PathBuf>,
        /// Prompt, e.g. "caption en", "detect cat ; dog".
        #[arg(short, long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Sampling temperature (0: greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print one JSON object instead of streaming text.
        #[arg(long)]
        json: bool,
        /// Write the f32 logits of the first generated position to this .npy file.
        #[arg(long)]
        logits_out: Option<PathBuf>,
        /// Use these preprocessed pixel values (.npy, f32, [1,]3,S,S) instead of an image.
        #[arg(long)]
        pixel_values: Option<PathBuf>,
        /// Divisor of loc bins (1023 as trained; some demos use 1024).
        #[arg(long, default_value_t = paligemma::output::DEFAULT_LOC_DIVISOR)]
        loc_divisor: f32,
        /// Largest image accepted, in pixels (width x height), checked before decoding.
        #[arg(long, default_value_t = paligemma::preprocess::DEFAULT_MAX_PIXELS)]
        max_pixels: usize,
        /// Drop detections scoring below this (0 to 1; the score is the model's probability
        /// that the box and label are right).
        #[arg(long, default_value_t = 0.0)]
        min_score: f32,
        /// Same-label boxes overlapping with an IoU above this are one object: the
        /// better-scoring one is kept (1 keeps every box).
        #[arg(long, default_value_t = paligemma::filter::DEFAULT_DUPLICATE_IOU)]
        duplicate_iou: f32,
    },
    /// Decode 16 segmentation codes to the mask decoder's raw 64x64 f32 output.
    DecodeMask {
        #[command(flatten)]
        load: LoadArgs,
        /// Sixteen codes, comma-separated (0..127).
        #[arg(long, value_delimiter = ',', num_args = 1..)]
        codes: Vec<u32>,
        /// Output .npy file (f32, 64x64).
        #[arg(long)]
        out: PathBuf,
    },
    /// List the compute devices of this build and check that each runs a graph.
    Devices,
    /// Measure preprocessing, vision, prefill, decode and memory on a model file or
    /// on random weights of a published shape.
    Bench(bench::BenchArgs),
    /// Evaluate a model on a held-out set of synthetic frames (tests/reference/train_demo.py
    /// --export-eval): detection recall at IoU >= 0.5, caption and counting accuracy.
    Eval(eval::EvalArgs),
    /// Serve the models over HTTP: OpenAI-compatible chat completions with images, the
    /// node's result JSON (/v1/analyze) and Prometheus metrics (docs/serve.md).
    Serve(serve::ServeArgs),
}

#[derive(clap::Args)]
struct LoadArgs {
    /// Model file written by `paligemma convert`.
    #[arg(short, long)]
    model: PathBuf,
    /// cpu, cuda:N, vulkan:N or gpu.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads (0: half the cores, see paligemma::default_threads).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// KV cache type: f16, f32, q8_0.
    #[arg(long, default_value = "f16")]
    kv_type: String,
    /// Tokens the KV cache holds (0: image tokens + 512).
    #[arg(long, default_value_t = 0)]
    context: usize,
    /// Use every CPU weight in place from the file instead of repacking the matrices the
    /// CPU kernels read faster interleaved (f16, q4_0, q4_k...), and ggml's kernels only.
    #[arg(long)]
    no_repack: bool,
}

impl LoadArgs {
    fn load(&self) -> Result<Model> {
        let weights = WeightOptions {
            device: Device::find(&self.device)?,
            repack: !self.no_repack,
        };
        let context = ContextOptions {
            threads: self.threads,
            kv_type: self.kv_type.parse::<KvType>()?,
            context: self.context,
            ..Default::default()
        };
        Ok(Model::new(Weights::load(&self.model, &weights)?, &context)?)
    }
}

fn main() {
    let cli = Cli::parse();
    // A server logs what it does (RUST_LOG overrides); the one-shot commands stay quiet.
    let default = match cli.command {
        Command::Serve(_) => "info",
        _ => "error",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    ggml::set_log_quiet(std::env::var_os("PALIGEMMA_GGML_LOG").is_none());
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert {
            hf_dir,
            out,
            ty,
            vision_type,
            seg_decoder,
        } => convert(&hf_dir, &out, &ty, vision_type.as_deref(), seg_decoder),
        Command::Info { model, json } => info(&model, json),
        Command::Run {
            load,
            image,
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            json,
            logits_out,
            pixel_values,
            loc_divisor,
            max_pixels,
            min_score,
            duplicate_iou,
        } => {
            let filter = DetectionFilter {
                min_score,
                duplicate_iou,
            };
            filter.validate()?;
            let opts = AnswerOptions {
                max_tokens,
                sampling: Sampling {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                },
                loc_divisor,
                filter,
            };
            let inputs = Inputs {
                image: image.as_deref(),
                pixel_values: pixel_values.as_deref(),
                max_pixels,
            };
            run_prompt(&load, inputs, &prompt, &opts, json, logits_out.as_deref())
        }
        Command::DecodeMask { load, codes, out } => {
            let mut model = load.load()?;
            let mask = model.decode_mask(&codes)?;
            write_npy(&out, &mask, &[64, 64])
        }
        Command::Devices => devices(),
        Command::Bench(args) => bench::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Serve(args) => serve::run(args),
    }
}

fn convert(
    hf_dir: &Path,
    out: &Path,
    ty: &str,
    vision_ty: Option<&str>,
    seg_decoder: Option<PathBuf>,
) -> Result<()> {
    // SIGINT, SIGTERM and SIGHUP stop the conversion between two tensors, so that the
    // writer removes its partial file before the process exits.
    let cancel = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, cancel.clone())
            .context("installing a signal handler")?;
    }
    let ty = parse_weight_type(ty)?;
    let vision_ty = vision_ty
        .map(parse_weight_type)
        .transpose()?
        .unwrap_or_else(|| default_vision_type(ty));
    let opts = ConvertOptions {
        ty,
        vision_ty,
        seg_decoder,
        cancel: Some(cancel),
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let summary = paligemma::convert::convert(hf_dir, out, &opts, |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.index as u64 + 1);
        bar.set_message(format!("{} ({})", p.name, p.ty));
    });
    bar.finish_and_clear();
    let summary = match summary {
        Err(paligemma::Error::Interrupted) => {
            eprintln!("interrupted: {} was not written", out.display());
            std::process::exit(130);
        }
        other => other?,
    };
    for note in &summary.notes {
        eprintln!("note: {note}");
    }
    println!(
        "wrote {} ({} tensors, {})",
        summary.path.display(),
        summary.tensors,
        human_bytes(summary.file_size)
    );
    for (ty, (count, bytes)) in &summary.bytes_per_type {
        println!("  {ty:>6}: {count:>5} tensors, {}", human_bytes(*bytes));
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    let mut v = n as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 {
            return format!("{v:.1} {unit}");
        }
        v /= 1024.0;
    }
    format!("{v:.1} TiB")
}

fn info(path: &Path, json: bool) -> Result<()> {
    let f = ggml::gguf::GgufFile::open(path)?;
    let (cfg, tok) = paligemma::validate::model_file(&f)?;
    // The types the matrices really have (metadata could say anything).
    let matrix_types = |vision: bool| -> Vec<&str> {
        let mut types: Vec<&str> = f
            .tensors
            .iter()
            .filter(|t| {
                t.shape.len() == 2
                    && t.name.starts_with("v.blk.") == vision
                    && t.name.contains("blk.")
            })
            .map(|t| t.ty.name())
            .collect();
        types.sort();
        types.dedup();
        types
    };
    let (decoder_types, vision_types) = (matrix_types(false), matrix_types(true));
    if json {
        let tensors: Vec<_> = f.tensors.iter().map(|t| serde_json::json!({"name": t.name, "type": t.ty.name(), "shape": t.shape, "bytes": t.nbytes})).collect();
        let out = serde_json::json!({"config": cfg, "tokenizer": {"vocab_size": tok.vocab_size()}, "file_size": f.file_size(),
                                     "weight_types": {"decoder": decoder_types, "vision": vision_types}, "tensors": tensors});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{}: {} ({}), format version {}",
        path.display(),
        cfg.name,
        cfg.text.arch.name(),
        f.get("paligemma.format_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
    );
    println!(
        "weights: decoder layers {}, vision layers {}",
        decoder_types.join("+"),
        vision_types.join("+")
    );
    let v = &cfg.vision;
    println!(
        "vision: {}px, patch {}, width {}, {} layers, {} heads, ffn {}, {} image tokens",
        v.image_size,
        v.patch_size,
        v.width,
        v.depth,
        v.heads,
        v.ffn,
        v.n_patches()
    );
    let t = &cfg.text;
    println!(
        "text: width {}, {} layers, {} heads / {} kv heads, head_dim {}, ffn {}, vocab {}, context {}",
        t.width, t.depth, t.heads, t.kv_heads, t.head_dim, t.ffn, t.vocab_size, t.context_length
    );
    println!(
        "      rope theta {}, query scalar {}, softcaps attn {:?} final {:?}, sliding window {:?} on {} layers, embedding scale {}",
        t.rope_theta,
        t.query_pre_attn_scalar,
        t.attn_softcap,
        t.final_softcap,
        t.sliding_window,
        t.sliding_layers.iter().filter(|&&s| s).count(),
        t.embed_scale
    );
    let k = &cfg.tokens;
    println!(
        "tokenizer: {} tokens; bos {} eos {} pad {} image {}; loc from {:?}; seg from {:?}",
        tok.vocab_size(),
        k.bos,
        k.eos,
        k.pad,
        k.image_token_id,
        k.loc_first,
        k.seg_first
    );
    println!(
        "tensors: {} ({} file)",
        f.tensors.len(),
        human_bytes(f.file_size() as u64)
    );
    for t in &f.tensors {
        println!("  {:<32} {:>6} {:?}", t.name, t.ty.name(), t.shape);
    }
    Ok(())
}

fn read_pixel_values(path: &Path, size: usize) -> Result<PixelValues> {
    // 3 channels of f32 plus the header.
    let bytes = paligemma::read_input_file(path, 3 * 4 * size * size + 4096)?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .with_context(|| format!("{}: not a .npy file", path.display()))?;
    let data: Vec<f32> = npy
        .into_vec()
        .with_context(|| format!("{}: expected f32 values", path.display()))?;
    PixelValues::from_chw(size, data).with_context(|| path.display().to_string())
}

fn write_npy(path: &Path, values: &[f32], shape: &[u64]) -> Result<()> {
    let mut out = Vec::new();
    {
        let mut w = npyz::WriteOptions::<f32>::new()
            .default_dtype()
            .shape(shape)
            .writer(&mut out)
            .begin_nd()?;
        w.extend(values.iter().copied())?;
        w.finish()?;
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// Where the image comes from.
struct Inputs<'a> {
    image: Option<&'a Path>,
    pixel_values: Option<&'a Path>,
    max_pixels: usize,
}

fn run_prompt(
    load: &LoadArgs,
    inputs: Inputs<'_>,
    prompt: &str,
    opts: &AnswerOptions,
    json: bool,
    logits_out: Option<&Path>,
) -> Result<()> {
    let task = Task::parse(prompt)?;
    let mut model = load.load()?;
    let embedding = match (inputs.pixel_values, inputs.image) {
        (Some(p), _) => {
            model.encode_pixels(&read_pixel_values(p, model.config().vision.image_size)?)?
        }
        (None, Some(i)) => model.encode_image(&RgbImage::open_limited(i, inputs.max_pixels)?)?,
        (None, None) => bail!("give --image or --pixel-values"),
    };
    let stdout = std::io::stdout();
    let mut answers = model.answer_batch(
        &embedding,
        std::slice::from_ref(&task),
        opts,
        &mut |token| {
            if !json {
                let mut out = stdout.lock();
                let _ = out.write_all(token.text.as_bytes());
                let _ = out.flush();
            }
            true
        },
    )?;
    let answer = answers.remove(0);
    let generation = &answer.generation;
    if let Some(path) = logits_out {
        write_npy(
            path,
            &generation.first_logits,
            &[generation.first_logits.len() as u64],
        )?;
    }
    if json {
        let t = &generation.timings;
        let out = serde_json::json!({
            "text": generation.text,
            "tokens": generation.tokens,
            "task": answer.task.kind(),
            "result": answer.result,
            "mean_logprob": generation.mean_logprob(),
            "timings_ms": {"preprocess": t.preprocess, "vision": t.vision, "prefill": t.prefill, "decode": t.decode,
                           "prefix_tokens": t.prefix_tokens, "generated_tokens": t.generated_tokens},
        });
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!();
        for d in answer.result.detections() {
            let b = &d.bbox;
            let score = d.score.map_or(String::new(), |s| format!(" score {s:.2}"));
            eprintln!(
                "  {}: x {:.0} y {:.0} w {:.0} h {:.0}{score}{}",
                d.label,
                b.x,
                b.y,
                b.w,
                b.h,
                if d.mask.is_some() { " (mask)" } else { "" }
            );
        }
        let dropped = answer.result.dropped();
        if !dropped.is_none() {
            eprintln!(
                "  dropped: {} below --min-score, {} duplicates",
                dropped.below_min_score, dropped.duplicates
            );
        }
    }
    Ok(())
}

fn devices() -> Result<()> {
    for device in ggml::Device::all() {
        let backend = ggml::Backend::on(device)?;
        // A small matmul on the device, checked against the host.
        let ctx = ggml::Context::new(8, 64)?;
        let a = ctx.input("a", ggml::Type::F32, &[4, 2])?;
        let b = ctx.input("b", ggml::Type::F32, &[4, 1])?;
        let c = ctx.mul_mat(a, b)?;
        c.set_output();
        let mut graph = ctx.graph(64)?;
        graph.expand(c)?;
        let mut sched = ggml::Scheduler::new(backend, 1, 64)?;
        sched.alloc(&graph)?;
        a.write_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])?;
        b.write_f32(&[1.0, 0.5, 0.25, 0.125])?;
        sched.compute(&graph)?;
        let got = c.read_f32()?;
        let ok = got == [3.25, 10.75];
        println!(
            "{:<10} {:<40} {}",
            device.spec(),
            device.description(),
            if ok { "ok" } else { "WRONG RESULT" }
        );
        if device.is_cpu() {
            let features = ggml::cpu_features().join(" ");
            let ggml_kernels = format!(
                "ggml's kernels ({})",
                if features.is_empty() {
                    "plain C"
                } else {
                    &features
                }
            );
            let best = ggml::packed::Kernels::detected();
            let kernels = match ggml::packed::selection()? {
                Some(set) => format!(
                    "our packed {} kernels ({}){}",
                    set.name(),
                    set.description(),
                    if Some(set) == best {
                        String::new()
                    } else {
                        format!(", forced by {}", ggml::packed::KERNELS_VAR)
                    }
                ),
                None if best.is_some() => {
                    format!("{ggml_kernels}, forced by {}", ggml::packed::KERNELS_VAR)
                }
                None => ggml_kernels,
            };
            println!(
                "{:<10} f16, bf16, q4_0, q8_0 and q4_K matrices run on {kernels}",
                ""
            );
            println!(
                "{:<10} ggml's CPU features: {features} ({})",
                "",
                std::env::consts::ARCH
            );
        }
    }
    Ok(())
}
