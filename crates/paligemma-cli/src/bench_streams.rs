//! `paligemma bench --streams N`: N cameras feeding frames at a rate, each with
//! standing prompts, answered by one shared engine (or, with `--separate`, by an
//! engine per camera, as each camera of the node had its own model before): answers
//! per second and latency per camera, frames dropped, peak RSS.
use crate::bench::{BenchArgs, peak_rss};
use anyhow::Result;
use paligemma::preprocess::RgbImage;
use paligemma::{ContextOptions, Model, WeightOptions, Weights};
use paligemma_stream::message::{FrameInfo, Source};
use paligemma_stream::{Engine, Frame, PromptSet, ResultMessage, Stream, StreamConfig};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(serde::Serialize)]
struct StreamReport {
    answers: usize,
    answers_per_s: f64,
    /// Generated tokens per answer, on average: how much of the work is decoding.
    mean_tokens: f64,
    p50_latency_ms: f64,
    p90_latency_ms: f64,
    frames_seen: u64,
    frames_dropped: u64,
}

#[derive(serde::Serialize)]
struct Report {
    model: String,
    streams: usize,
    prompts_per_stream: usize,
    engines: usize,
    threads: usize,
    seconds: f64,
    fps: f64,
    total_answers_per_s: f64,
    per_stream: Vec<StreamReport>,
    peak_rss_bytes: Option<u64>,
}

/// What the bench keeps of an answer: keeping whole messages would count thousands of
/// them in the peak RSS (32 KB each for a detection, allocator pages included).
struct Answer {
    latency_ms: f64,
    tokens: usize,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        0.0
    } else {
        sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
    }
}

pub fn run(
    args: &BenchArgs,
    path: &Path,
    weights: &WeightOptions,
    context: &ContextOptions,
    image: RgbImage,
) -> Result<()> {
    let n = args.streams;
    let prompts = PromptSet::from_short(&args.stream_prompts, 0, args.decode_tokens)?;
    let prompt_count = prompts.prompts.len();
    // A sequence per prompt of every camera, and with lanes enough for each to hold one
    // camera's frame (its prompts decode together).
    let cameras = if args.separate {
        1
    } else {
        n.max(paligemma_stream::usable_lanes(
            weights.device,
            context.threads_or_default(),
            args.lanes,
        ))
    };
    let context = ContextOptions {
        max_sequences: (cameras * prompt_count).clamp(1, paligemma::MAX_SEQUENCES),
        ..*context
    };
    let engines: Vec<Arc<Engine>> = if args.separate {
        (0..n)
            .map(|_| {
                Ok(Engine::new(Model::new(
                    Weights::load(path, weights)?,
                    &context,
                )?))
            })
            .collect::<Result<_>>()?
    } else {
        vec![Engine::with_lanes(
            Weights::load(path, weights)?,
            &context,
            args.lanes,
        )?]
    };
    let image = Arc::new(image);
    let results: Vec<Arc<Mutex<Vec<Answer>>>> = (0..n).map(|_| Arc::default()).collect();
    let workers: Vec<Stream> = (0..n)
        .map(|i| {
            let got = results[i].clone();
            let config = StreamConfig {
                source: Source {
                    node: "bench".into(),
                    camera: format!("cam{i}"),
                },
                ..Default::default()
            };
            Stream::attach(
                engines[i % engines.len()].clone(),
                prompts.clone(),
                config,
                Box::new(move |m: &ResultMessage| {
                    got.lock().unwrap().push(Answer {
                        latency_ms: m.latency_ms.total,
                        tokens: m.tokens.generated,
                    })
                }),
            )
        })
        .collect();
    eprintln!(
        "{n} stream(s) x {prompt_count} prompt(s) at {} fps for {} s on {} engine(s) ...",
        args.fps,
        args.seconds,
        engines.len()
    );
    let start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / args.fps.max(0.1));
    let mut seq = 0u64;
    while start.elapsed().as_secs_f64() < args.seconds {
        for w in &workers {
            let info = FrameInfo {
                seq,
                width: image.width,
                height: image.height,
                ..Default::default()
            };
            w.submit(Frame {
                info,
                image: image.clone(),
                received: Instant::now(),
            });
        }
        seq += 1;
        std::thread::sleep(period.saturating_sub(Duration::from_micros(200)));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let stats: Vec<_> = workers.iter().map(Stream::stats).collect();
    drop(workers);
    let per_stream: Vec<StreamReport> = results
        .iter()
        .zip(&stats)
        .map(|(r, s)| {
            let msgs = r.lock().unwrap();
            let mut latency: Vec<f64> = msgs.iter().map(|m| m.latency_ms).collect();
            latency.sort_by(f64::total_cmp);
            StreamReport {
                answers: msgs.len(),
                answers_per_s: msgs.len() as f64 / elapsed,
                mean_tokens: msgs.iter().map(|m| m.tokens as f64).sum::<f64>()
                    / msgs.len().max(1) as f64,
                p50_latency_ms: percentile(&latency, 0.5),
                p90_latency_ms: percentile(&latency, 0.9),
                frames_seen: s.frames_seen,
                frames_dropped: s.frames_dropped,
            }
        })
        .collect();
    let report = Report {
        model: path.display().to_string(),
        streams: n,
        prompts_per_stream: prompt_count,
        engines: engines.len(),
        threads: context.threads,
        seconds: elapsed,
        fps: args.fps,
        total_answers_per_s: per_stream.iter().map(|s| s.answers_per_s).sum(),
        per_stream,
        peak_rss_bytes: peak_rss(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} stream(s) x {} prompt(s) on {} engine(s), {:.1} s",
        report.streams, report.prompts_per_stream, report.engines, report.seconds
    );
    for (i, s) in report.per_stream.iter().enumerate() {
        println!(
            "cam{i}  {:>6.2} answers/s ({:.1} tokens)  latency p50 {:>7.0} ms  p90 {:>7.0} ms  dropped {}/{} frames",
            s.answers_per_s,
            s.mean_tokens,
            s.p50_latency_ms,
            s.p90_latency_ms,
            s.frames_dropped,
            s.frames_seen
        );
    }
    println!("total {:>6.2} answers/s", report.total_answers_per_s);
    if let Some(rss) = report.peak_rss_bytes {
        println!("peak RSS {:.2} GB", rss as f64 / 1e9);
    }
    Ok(())
}
