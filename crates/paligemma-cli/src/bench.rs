//! `paligemma bench`: per-stage timings with warm-up and repetitions, and peak RSS.
use crate::shapes::{NAMED_SHAPES, named};
use anyhow::{Context, Result, bail};
use paligemma::config::TokenConfig;
use paligemma::convert::{ConvertOptions, default_vision_type, parse_weight_type, write_random};
use paligemma::preprocess::{RgbImage, preprocess};
use paligemma::{
    ContextOptions, Device, GenerateOptions, KvType, Model, Start, WeightOptions, Weights,
};
use std::path::PathBuf;
use std::time::Instant;

/// A tokenizer with the real structure (specials, bytes, loc/seg tokens), for random models.
const BENCH_TOKENIZER: &str = include_str!("../../../tests/fixtures/pg2_gqa/hf/tokenizer.json");

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model file to measure.
    #[arg(short, long, conflicts_with = "random")]
    model: Option<PathBuf>,
    /// Random weights of a published shape: pg2-3b-224, pg2-3b-448, pg2-3b-896, pg2-10b-224, pg2-28b-224, pg1-3b-224.
    #[arg(long)]
    random: Option<String>,
    /// Decoder weight type for --random.
    #[arg(long = "type", default_value = "q4_k")]
    ty: String,
    /// SigLIP weight type for --random (default as for `convert`: --type when that is
    /// f32, f16 or bf16, else f16).
    #[arg(long)]
    vision_type: Option<String>,
    /// Where random models are kept between runs.
    #[arg(long, default_value = "bench-models")]
    cache: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads (0: half the cores, see paligemma::default_threads).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value = "f16")]
    kv_type: String,
    /// Tokens to decode per repetition (with --streams: per answer at most).
    #[arg(long, default_value_t = 20)]
    pub decode_tokens: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Also prefill and decode this many prompts on one frame as one batch, and encode
    /// as many frames together, and compare with running them one after another.
    #[arg(long, default_value_t = 4)]
    prompts: usize,
    /// Use every weight in place from the file (no repacked CPU layouts) and ggml's kernels only.
    #[arg(long)]
    no_repack: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Instead of the stages: this many cameras with standing prompts against one
    /// shared engine (see `--separate`), for `--seconds` at `--fps`.
    #[arg(long, default_value_t = 0)]
    pub streams: usize,
    /// With --streams: an engine (model, thread pool) per camera instead of one shared.
    #[arg(long)]
    pub separate: bool,
    /// With --streams: batches the shared engine runs at once, sharing --threads (see
    /// `paligemma_stream::EngineOptions::lanes`).
    #[arg(long, default_value_t = 1)]
    pub lanes: usize,
    /// With --streams: the standing prompts of every camera, `|`-separated (each
    /// answers at most --decode-tokens tokens).
    #[arg(long, default_value = "caption en|detect cat ; dog")]
    pub stream_prompts: String,
    /// With --streams: how long to run.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// With --streams: frames per second each camera sends.
    #[arg(long, default_value_t = 30.0)]
    pub fps: f64,
    /// With --streams: the frame every camera sends (default: a generated 640x480 one).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Instead of the stages: compare prefill and decode with this `llama-bench` (see
    /// scripts/llama-bench-build.sh) on the model's Gemma 2 decoder, the same bytes
    /// written as a llama.cpp GGUF beside the model, --reps runs of each interleaved.
    #[arg(long, value_name = "LLAMA_BENCH")]
    pub vs_llama_bench: Option<PathBuf>,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Peak resident memory of this process (VmHWM), in bytes.
pub(crate) fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

fn model_path(args: &BenchArgs) -> Result<PathBuf> {
    if let Some(m) = &args.model {
        return Ok(m.clone());
    }
    let Some(name) = &args.random else {
        bail!(
            "give --model FILE or --random SHAPE ({})",
            NAMED_SHAPES.join(", ")
        )
    };
    let ty = parse_weight_type(&args.ty)?;
    let vision_ty = args
        .vision_type
        .as_deref()
        .map(parse_weight_type)
        .transpose()?
        .unwrap_or_else(|| default_vision_type(ty));
    let opts = ConvertOptions {
        ty,
        vision_ty,
        seg_decoder: None,
        cancel: None,
    };
    let path = args
        .cache
        .join(format!("{name}-{}-v{}.gguf", opts.ty, opts.vision_ty));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&args.cache).with_context(|| args.cache.display().to_string())?;
    let tok = tokenizers_ids();
    let cfg = named(name, tok)?;
    eprintln!(
        "writing random weights of {name} ({} / vision {}) to {} ...",
        opts.ty,
        opts.vision_ty,
        path.display()
    );
    let bar = indicatif::ProgressBar::new(0);
    write_random(&cfg, BENCH_TOKENIZER, &opts, &path, 42, |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.index as u64 + 1);
    })?;
    bar.finish_and_clear();
    Ok(path)
}

fn tokenizers_ids() -> TokenConfig {
    // Ids of the bundled tokenizer (see tests/fixtures/tokenizer_cases.json).
    TokenConfig {
        image_token_id: 1840,
        image_token_count: 0,
        bos: 2,
        eos: 1,
        pad: 0,
        loc_first: Some(688),
        seg_first: Some(1712),
    }
}

#[derive(serde::Serialize)]
struct Report {
    model: String,
    file_bytes: u64,
    device: String,
    threads: usize,
    /// Extra buffer types holding repacked weights, with their tensor counts.
    repacked: Vec<(String, usize)>,
    prefix_tokens: usize,
    preprocess_ms: f64,
    vision_ms: f64,
    prefill_ms: f64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    frame_ms: f64,
    batch_prompts: usize,
    batch_decode_tokens_per_s: f64,
    batch_speedup: f64,
    batch_prefill_tokens_per_s: f64,
    batch_prefill_speedup: f64,
    batch_vision_ms: f64,
    batch_vision_speedup: f64,
    peak_rss_bytes: Option<u64>,
    kv_cache_bytes: usize,
    compute_buffer_bytes: usize,
}

/// A 640x480 frame with structure (gradients and edges).
fn test_frame() -> RgbImage {
    let (w, h) = (640, 480);
    let data = (0..w * h)
        .flat_map(|i| {
            let (x, y) = (i % w, i / w);
            [
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                if (x / 40 + y / 40) % 2 == 0 { 220 } else { 30 },
            ]
        })
        .collect();
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let path = model_path(args)?;
    let file_bytes = std::fs::metadata(&path)?.len();
    let weights = WeightOptions {
        device: Device::find(&args.device)?,
        repack: !args.no_repack,
    };
    let context = ContextOptions {
        threads: args.threads,
        kv_type: args.kv_type.parse::<KvType>()?,
        ..Default::default()
    };
    let image = match &args.image {
        Some(p) => RgbImage::open(p)?,
        None => test_frame(),
    };
    if args.streams > 0 {
        return crate::bench_streams::run(args, &path, &weights, &context, image);
    }
    if let Some(llama) = &args.vs_llama_bench {
        return crate::vs_llama::run(
            args,
            &path,
            Model::new(Weights::load(&path, &weights)?, &context)?,
            &image,
            llama,
        );
    }
    let mut model = Model::new(Weights::load(&path, &weights)?, &context)?;
    let ids = model.tokenizer().prefix_ids("caption en")?;
    let options = GenerateOptions {
        max_tokens: args.decode_tokens + 1,
        ignore_eos: true,
        ..Default::default()
    };
    let (mut pre, mut vis, mut prefill, mut decode) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..args.warmup + args.reps {
        let t = Instant::now();
        let pixels = preprocess(&image, &model.config().vision);
        let pre_ms = t.elapsed().as_secs_f64() * 1e3;
        let emb = model.encode_pixels(&pixels)?;
        let g = model
            .generate(&emb, std::slice::from_ref(&ids), &options, &mut |_| true)?
            .remove(0);
        if rep >= args.warmup {
            pre.push(pre_ms);
            vis.push(emb.timings.vision);
            prefill.push(g.timings.prefill);
            // The first token comes from the prefill; the rest are decode steps.
            decode.push((g.tokens.len().saturating_sub(1)) as f64 / (g.timings.decode / 1e3));
        }
    }
    let (pre, vis, prefill, decode) = (median(pre), median(vis), median(prefill), median(decode));
    // Several prompts on one frame: their prefills in one graph, their decode steps as
    // one batch; as many frames (of as many cameras) through the vision tower together.
    let n = args.prompts.clamp(1, model.max_sequences());
    let prompts = [
        "caption en",
        "detect cat ; dog",
        "ocr",
        "answer en what is in the image?",
    ];
    let prefixes = (0..n)
        .map(|i| model.tokenizer().prefix_ids(prompts[i % prompts.len()]))
        .collect::<paligemma::Result<Vec<_>>>()?;
    let pixels = preprocess(&image, &model.config().vision);
    let emb = model.encode_pixels(&pixels)?;
    let frames = vec![&image; n];
    let (mut batch, mut batch_prefill, mut batch_vision) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..args.warmup + args.reps {
        let t = Instant::now();
        let encoded = model.encode_images(&frames)?;
        let vision_ms = t.elapsed().as_secs_f64() * 1e3
            - encoded.iter().map(|e| e.timings.preprocess).sum::<f64>();
        let starts: Vec<Start<'_>> = prefixes
            .iter()
            .map(|prefix| Start {
                image: &emb,
                prefix,
                opts: &options,
            })
            .collect();
        let t = Instant::now();
        let seqs = model.start_batch(&starts)?;
        let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        while model.active_sequences() > 0 {
            model.step(&mut |_, _| true)?;
        }
        let decode_ms = t.elapsed().as_secs_f64() * 1e3;
        let tokens: usize = seqs
            .into_iter()
            .filter_map(|s| model.finish(s))
            .map(|g| g.tokens.len().saturating_sub(1))
            .sum();
        if rep >= args.warmup {
            batch.push(tokens as f64 / (decode_ms / 1e3));
            batch_prefill
                .push(prefixes.iter().map(Vec::len).sum::<usize>() as f64 / (prefill_ms / 1e3));
            batch_vision.push(vision_ms);
        }
    }
    let (batch_prefill, batch_vision) = (median(batch_prefill), median(batch_vision));
    let batch = median(batch);
    let report = Report {
        model: path.display().to_string(),
        file_bytes,
        device: model.weights().device().spec(),
        threads: model.threads(),
        repacked: model.weights().repacked().to_vec(),
        prefix_tokens: ids.len(),
        preprocess_ms: pre,
        vision_ms: vis,
        prefill_ms: prefill,
        prefill_tokens_per_s: ids.len() as f64 / (prefill / 1e3),
        decode_tokens_per_s: decode,
        frame_ms: pre + vis + prefill + 20.0 / decode * 1e3,
        batch_prompts: n,
        batch_decode_tokens_per_s: batch,
        batch_speedup: batch / decode,
        batch_prefill_tokens_per_s: batch_prefill,
        batch_prefill_speedup: batch_prefill / (ids.len() as f64 / (prefill / 1e3)),
        batch_vision_ms: batch_vision,
        batch_vision_speedup: n as f64 * vis / batch_vision,
        peak_rss_bytes: peak_rss(),
        kv_cache_bytes: model.kv_cache_bytes(),
        compute_buffer_bytes: model.compute_buffer_bytes(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model      {} ({:.2} GB), {} with {} threads",
            report.model,
            file_bytes as f64 / 1e9,
            report.device,
            report.threads
        );
        for (buft, n) in &report.repacked {
            println!("repacked   {n} matrices into {buft}");
        }
        println!("preprocess {:>9.1} ms", report.preprocess_ms);
        println!(
            "vision     {:>9.1} ms  (SigLIP + projector, {} image tokens)",
            report.vision_ms,
            model.config().tokens.image_token_count
        );
        println!(
            "prefill    {:>9.1} ms  ({} tokens, {:.1} tokens/s)",
            report.prefill_ms, report.prefix_tokens, report.prefill_tokens_per_s
        );
        println!("decode     {:>9.1} tokens/s", report.decode_tokens_per_s);
        println!(
            "frame      {:>9.1} ms  (preprocess + vision + prefill + 20 tokens)",
            report.frame_ms
        );
        println!(
            "batch      {:>9.1} tokens/s decoding {} prompts together ({:.2}x one after another)",
            report.batch_decode_tokens_per_s, n, report.batch_speedup
        );
        println!(
            "           {:>9.1} tokens/s prefilling them in one graph ({:.2}x one at a time)",
            report.batch_prefill_tokens_per_s, report.batch_prefill_speedup
        );
        println!(
            "           {:>9.1} ms encoding {n} frames in one graph ({:.2}x one after another)",
            report.batch_vision_ms, report.batch_vision_speedup
        );
        if let Some(rss) = report.peak_rss_bytes {
            println!(
                "peak RSS   {:>9.2} GB  ({:.2}x the file; KV cache {:.2} GB for {} sequences, compute buffers {:.2} GB)",
                rss as f64 / 1e9,
                rss as f64 / file_bytes as f64,
                report.kv_cache_bytes as f64 / 1e9,
                model.max_sequences(),
                report.compute_buffer_bytes as f64 / 1e9
            );
        }
    }
    Ok(())
}
