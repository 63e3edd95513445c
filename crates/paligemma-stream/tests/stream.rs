//! Prompts, sampling, streams and the shared engine on a fixture model.
use paligemma::preprocess::RgbImage;
use paligemma::{ContextOptions, Model, ResultKind, Task, WeightOptions, Weights};
use paligemma_stream::message::FrameInfo;
use paligemma_stream::message::Source;
use paligemma_stream::prompts::Schedule;
use paligemma_stream::{
    Engine, EngineOptions, Frame, FrameSamplerConfig, PromptSet, ResultMessage, StandingPrompt,
    Stream, StreamConfig,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model_file(dir: &Path) -> PathBuf {
    let out = dir.join("m.gguf");
    let opts = paligemma::convert::ConvertOptions::default();
    paligemma::convert::convert(&fixtures().join("pg2_gqa/hf"), &out, &opts, |_| {}).unwrap();
    out
}

/// An engine of its own on the fixture model.
fn model(dir: &Path) -> Arc<Engine> {
    Engine::new(
        Model::load(
            model_file(dir),
            &ContextOptions {
                threads: 1,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

fn frame(seq: u64) -> Frame {
    let img = RgbImage::open(&fixtures().join("images/rgb.png")).unwrap();
    let info = FrameInfo {
        seq,
        pts_ns: Some(seq * 33_333_333),
        width: img.width,
        height: img.height,
        ..Default::default()
    };
    Frame::new(info, img)
}

/// Returns once the engine works on the stream's frame. Tests flush then, not after a
/// fixed pause: 400 tokens of the fixture take 80 ms on a fast core, and the answer
/// could be finished first.
fn wait_busy(worker: &Stream) {
    let t = Instant::now();
    while !worker.stats().busy {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the engine never took the frame"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn collector() -> (Arc<Mutex<Vec<ResultMessage>>>, paligemma_stream::Sink) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    (
        got,
        Box::new(move |m: &ResultMessage| g.lock().unwrap().push(m.clone())),
    )
}

#[test]
fn prompt_forms_and_validation() {
    let set = PromptSet::from_short("caption en|detect person ; car|detect cat", 500, 16).unwrap();
    let ids: Vec<&str> = set.prompts.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["caption", "detect", "detect2"]);
    let toml = r#"
        [[prompt]]
        id = "people"
        task = "detect person ; car"
        every_ms = 2000
        max_tokens = 24
        [[prompt]]
        id = "scene"
        task = "caption en"
        every_frames = 5
    "#;
    let set = PromptSet::from_toml(toml).unwrap();
    assert_eq!(set.prompts[0].max_tokens, 24);
    assert_eq!(
        set.prompts[1].max_tokens,
        paligemma_stream::prompts::DEFAULT_MAX_TOKENS
    );
    for (bad, why) in [
        ("[[prompt]]\nid = \"a b\"\ntask = \"ocr\"", "letters"),
        (
            "[[prompt]]\nid = \"a\"\ntask = \"detect ;\"",
            "at least one",
        ),
        (
            "[[prompt]]\nid = \"a\"\ntask = \"ocr\"\n[[prompt]]\nid = \"a\"\ntask = \"ocr\"",
            "twice",
        ),
        (
            "[[prompt]]\nid = \"a\"\ntask = \"ocr\"\ncolour = 3",
            "unknown field",
        ),
        ("[[prompt]\n", "invalid prompts TOML"),
    ] {
        let e = PromptSet::from_toml(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad:?}: {e}");
    }
    let json = PromptSet::from_json(r#"[{"id":"x","task":"caption en"}]"#).unwrap();
    assert_eq!(json.prompts[0].task, Task::Caption { lang: "en".into() });
    assert!(PromptSet::from_json("{nope").is_err());
}

#[test]
fn schedule_honours_time_and_frame_intervals() {
    let mut set = PromptSet::from_short("caption en", 1000, 8).unwrap();
    set.prompts.push(StandingPrompt {
        every_frames: 3,
        ..StandingPrompt::new("ocr", Task::Ocr)
    });
    let mut s = Schedule::default();
    let t0 = Instant::now();
    let ids = |v: Vec<&StandingPrompt>| v.iter().map(|p| p.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(s.due(&set, 1, t0)), ["caption", "ocr"]);
    assert!(ids(s.due(&set, 2, t0 + Duration::from_millis(500))).is_empty());
    assert_eq!(
        ids(s.due(&set, 3, t0 + Duration::from_millis(1100))),
        ["caption"]
    );
    assert_eq!(
        ids(s.due(&set, 4, t0 + Duration::from_millis(1200))),
        ["ocr"]
    );
}

#[test]
fn worker_answers_standing_prompts_newest_frame_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (got, sink) = collector();
    let prompts = PromptSet::from_short("detect cat ; dog|caption en", 0, 6).unwrap();
    let worker = Stream::attach(model(dir.path()), prompts, StreamConfig::default(), sink);
    // A burst of frames: the producer never waits, older frames are dropped.
    let start = Instant::now();
    for seq in 0..50 {
        worker.submit(frame(seq));
    }
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "submit must not block"
    );
    assert!(worker.drain(Duration::from_secs(60)));
    let msgs = got.lock().unwrap().clone();
    assert!(
        msgs.len() >= 2 && msgs.len() % 2 == 0,
        "{} results",
        msgs.len()
    );
    assert_eq!(
        msgs.last().unwrap().frame.seq,
        49,
        "the newest frame is analysed"
    );
    let det = msgs.iter().find(|m| m.prompt.id == "detect").unwrap();
    assert_eq!(det.result.kind(), ResultKind::Detections);
    assert_eq!(det.frame.pts_ns, Some(det.frame.seq * 33_333_333));
    assert!(det.latency_ms.total > 0.0 && det.tokens.prompt == 22);
    let stats = worker.stats();
    assert_eq!(stats.frames_seen, 50);
    assert!(stats.frames_dropped >= 40, "{stats:?}");
    // Every message of a frame says how many frames were dropped before it.
    assert!(
        msgs.chunks(2)
            .all(|pair| pair[0].frames_dropped == pair[1].frames_dropped
                && pair[0].frame.seq == pair[1].frame.seq)
    );
    assert_eq!(
        msgs.iter()
            .filter(|m| m.prompt.id == "detect")
            .map(|m| m.frames_dropped)
            .sum::<u64>(),
        stats.frames_dropped
    );
    let v: serde_json::Value = serde_json::from_str(&det.to_json()).unwrap();
    assert_eq!(v["schema"], "paligemma.result/1");
}

#[test]
fn sync_analysis_ask_errors_and_prompt_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (_got, sink) = collector();
    let worker = Stream::attach(
        model(dir.path()),
        PromptSet::from_short("ocr", 0, 4).unwrap(),
        StreamConfig::default(),
        sink,
    );
    let results = worker.analyse(frame(7)).unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(
        (results[0].frame.seq, results[0].prompt.id.as_str()),
        (7, "ocr")
    );

    let ask = worker
        .ask(
            frame(8),
            StandingPrompt::new("ask", Task::parse("caption en").unwrap()),
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(ask.result.kind(), ResultKind::Caption);
    // An invalid prompt is refused before it reaches the engine: its text does not
    // parse, or its settings are out of range.
    assert!(paligemma_stream::payload::parse_ask(b"detect ;", 1024).is_err());
    let no_tokens = StandingPrompt {
        max_tokens: 0,
        ..StandingPrompt::new("ask", Task::Ocr)
    };
    assert!(
        worker
            .ask(frame(9), no_tokens, Duration::from_secs(30))
            .is_err()
    );
    // A prompt too long for the context becomes an error result; the worker carries on.
    let long = StandingPrompt {
        max_tokens: 4,
        ..StandingPrompt::new("long", Task::parse(&"cat ".repeat(3000)).unwrap())
    };
    let msg = worker
        .ask(frame(10), long, Duration::from_secs(30))
        .unwrap();
    assert!(msg.is_error(), "{msg:?}");
    worker.set_prompts(PromptSet::from_short("caption en|detect cat", 0, 4).unwrap());
    let results = worker.analyse(frame(11)).unwrap();
    assert_eq!(
        results
            .iter()
            .map(|m| m.prompt.id.as_str())
            .collect::<Vec<_>>(),
        ["caption", "detect"]
    );
}

/// An ask's text arrives token by token as it is decoded, sampling follows its seed,
/// and an asker who gives up stops the work at the next token.
#[test]
fn asks_stream_sample_and_cancel() {
    use paligemma_stream::AskOptions;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let (_got, sink) = collector();
    let worker = Stream::attach(
        model(dir.path()),
        PromptSet::default(),
        StreamConfig::default(),
        sink,
    );
    let prompt = || StandingPrompt {
        max_tokens: 12,
        ..StandingPrompt::new("ask", Task::parse("caption en").unwrap())
    };
    let pieces = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = pieces.clone();
    let opts = AskOptions {
        on_text: Some(Arc::new(move |t: &str| seen.lock().unwrap().push(t.into()))),
        ..Default::default()
    };
    let msg = worker
        .ask_with(frame(1), prompt(), opts, Duration::from_secs(30))
        .unwrap();
    let pieces = pieces.lock().unwrap().clone();
    assert_eq!(pieces.len(), msg.tokens.generated, "one call per token");
    assert_eq!(pieces.concat(), msg.raw, "the pieces add up to the answer");
    let greedy = worker
        .ask(frame(1), prompt(), Duration::from_secs(30))
        .unwrap();
    assert_eq!(greedy.raw, msg.raw);

    let sampled = |seed| {
        let opts = AskOptions {
            sampling: paligemma::Sampling {
                temperature: 1.5,
                seed,
                ..Default::default()
            },
            ..Default::default()
        };
        worker
            .ask_with(frame(1), prompt(), opts, Duration::from_secs(30))
            .unwrap()
            .raw
    };
    assert_eq!(sampled(7), sampled(7), "the same seed, the same answer");

    // Cancelled after the second token: the answer stops there (or is dropped).
    let cancel = Arc::new(AtomicBool::new(false));
    let (flag, tokens) = (cancel.clone(), Arc::new(AtomicU64::new(0)));
    let counted = tokens.clone();
    let opts = AskOptions {
        on_text: Some(Arc::new(move |_: &str| {
            if counted.fetch_add(1, Ordering::Relaxed) + 1 == 2 {
                flag.store(true, Ordering::Relaxed);
            }
        })),
        cancel,
        ..Default::default()
    };
    let long = StandingPrompt {
        max_tokens: 64,
        ..prompt()
    };
    match worker.ask_with(frame(2), long, opts, Duration::from_secs(30)) {
        Ok(msg) => assert!(msg.tokens.generated <= 3, "{:?}", msg.tokens),
        Err(e) => assert!(matches!(e, paligemma_stream::Error::Stopped), "{e}"),
    }
    assert!(tokens.load(Ordering::Relaxed) <= 3);
    // The stream goes on answering.
    assert!(
        worker
            .ask(frame(3), prompt(), Duration::from_secs(30))
            .is_ok()
    );
}

#[test]
fn stop_and_flush_return_promptly_mid_inference() {
    let dir = tempfile::tempdir().unwrap();
    let (got, sink) = collector();
    let prompts = PromptSet::from_short("caption en", 0, 400).unwrap();
    let worker = Stream::attach(model(dir.path()), prompts, StreamConfig::default(), sink);
    worker.submit(frame(1));
    wait_busy(&worker);
    let t = Instant::now();
    worker.flush();
    assert!(
        worker.drain(Duration::from_secs(5)),
        "flush abandons the work in progress"
    );
    assert!(
        got.lock().unwrap().is_empty(),
        "abandoned work produces no stale result"
    );
    worker.submit(frame(2));
    std::thread::sleep(Duration::from_millis(100));
    worker.stop();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );
}

#[test]
fn minimum_interval_and_unchanged_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (got, sink) = collector();
    let config = StreamConfig {
        sampler: FrameSamplerConfig {
            min_interval: Duration::from_millis(300),
            skip_unchanged_below: Some(1.0),
        },
        ..Default::default()
    };
    let worker = Stream::attach(
        model(dir.path()),
        PromptSet::from_short("ocr", 0, 2).unwrap(),
        config,
        sink,
    );
    for seq in 0..5 {
        worker.submit(frame(seq));
        assert!(worker.drain(Duration::from_secs(20)));
    }
    // The same picture five times: analysed once, the rest skipped as unchanged.
    assert_eq!(got.lock().unwrap().len(), 1);
    assert!(worker.stats().frames_dropped >= 4);
}

fn stream_config(camera: &str) -> StreamConfig {
    StreamConfig {
        source: Source {
            node: "test".into(),
            camera: camera.into(),
        },
        ..Default::default()
    }
}

/// Streams that load the same file with the same options share one engine; other
/// options give another.
#[test]
fn one_engine_per_model_file_and_options() {
    let dir = tempfile::tempdir().unwrap();
    let path = model_file(dir.path());
    let opts = EngineOptions {
        context: ContextOptions {
            threads: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let a = Engine::shared(&path, &opts).unwrap();
    let b = Engine::shared(dir.path().join(".").join("m.gguf"), &opts).unwrap();
    assert!(
        Arc::ptr_eq(&a, &b),
        "the same file by another path is the same engine"
    );
    let c = Engine::shared(
        &path,
        &EngineOptions {
            context: ContextOptions {
                max_sequences: 2,
                ..opts.context
            },
            ..opts
        },
    )
    .unwrap();
    assert!(!Arc::ptr_eq(&a, &c));
    let d = Engine::shared(
        &path,
        &EngineOptions {
            weights: WeightOptions {
                repack: false,
                ..opts.weights
            },
            ..opts
        },
    )
    .unwrap();
    assert!(
        !Arc::ptr_eq(&a, &d) && !Arc::ptr_eq(&c, &d),
        "every option keeps engines apart"
    );
    let (_g1, s1) = collector();
    let (_g2, s2) = collector();
    let w1 = Stream::attach(
        a.clone(),
        PromptSet::from_short("ocr", 0, 2).unwrap(),
        stream_config("one"),
        s1,
    );
    let w2 = Stream::attach(
        b.clone(),
        PromptSet::from_short("ocr", 0, 2).unwrap(),
        stream_config("two"),
        s2,
    );
    assert_eq!(a.streams(), 2);
    drop(w1);
    assert!(
        w2.analyse(frame(1)).unwrap().len() == 1,
        "the other stream goes on"
    );
    drop(w2);
    assert!(Engine::shared(&path, &opts).unwrap().streams() == 0);
}

/// Four busy cameras on one engine: every one is answered, at rates and latencies
/// within a small factor of each other, and an ask overtakes their standing work.
#[test]
fn streams_share_fairly_and_asks_go_first() {
    let dir = tempfile::tempdir().unwrap();
    share_fairly(Engine::new(
        Model::load(
            model_file(dir.path()),
            &ContextOptions {
                threads: 1,
                max_sequences: 8,
                ..Default::default()
            },
        )
        .unwrap(),
    ));
}

/// The same with two lanes (contexts of one model, a thread each) taking the cameras' work.
#[test]
fn lanes_share_fairly_and_asks_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let weights = Weights::load(model_file(dir.path()), &WeightOptions::default()).unwrap();
    share_fairly(
        Engine::with_lanes(
            weights,
            &ContextOptions {
                threads: 2,
                max_sequences: 8,
                ..Default::default()
            },
            2,
        )
        .unwrap(),
    );
}

fn share_fairly(engine: Arc<Engine>) {
    let cams: Vec<_> = (0..4)
        .map(|i| {
            let (got, sink) = collector();
            let prompts = PromptSet::from_short("caption en|detect cat ; dog", 0, 16).unwrap();
            (
                got,
                Stream::attach(
                    engine.clone(),
                    prompts,
                    stream_config(&format!("cam{i}")),
                    sink,
                ),
            )
        })
        .collect();
    // Every camera sends more frames than the engine can answer, camera 0 four times
    // as many as the others: it must not get more than its share.
    let start = Instant::now();
    let mut seq = 0;
    while start.elapsed() < Duration::from_secs(3) {
        for (i, (_, w)) in cams.iter().enumerate() {
            for _ in 0..if i == 0 { 4 } else { 1 } {
                w.submit(frame(seq));
                seq += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // While they are all busy, an ask is answered before the standing work queued. The
    // fastest of three counts: a pause of the test's own threads (other tests run
    // beside it) is not the scheduler's doing.
    let asks: Vec<f64> = (0..3)
        .map(|i| {
            let t = Instant::now();
            let ask = cams[1 + i]
                .1
                .ask(
                    frame(9999),
                    StandingPrompt::new("ask", Task::Ocr),
                    Duration::from_secs(30),
                )
                .unwrap();
            assert_eq!(ask.result.kind(), ResultKind::Ocr);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let ask_ms = asks.iter().copied().fold(f64::MAX, f64::min);
    for (_, w) in &cams {
        assert!(w.drain(Duration::from_secs(60)));
    }
    let answers: Vec<usize> = cams
        .iter()
        .map(|(g, _)| {
            g.lock()
                .unwrap()
                .iter()
                .filter(|m| m.prompt.id != "ask")
                .count()
        })
        .collect();
    let p90 = |g: &Mutex<Vec<ResultMessage>>| {
        let mut l: Vec<f64> = g
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.latency_ms.total)
            .collect();
        l.sort_by(f64::total_cmp);
        l[(l.len() * 9 / 10).min(l.len() - 1)]
    };
    let p90s: Vec<f64> = cams.iter().map(|(g, _)| p90(g)).collect();
    println!("answers per camera {answers:?}, p90 latency ms {p90s:?}, asks {asks:.0?} ms");
    let (min, max) = (
        answers.iter().min().copied().unwrap(),
        answers.iter().max().copied().unwrap(),
    );
    assert!(
        min >= 4 && max * 2 <= 3 * min,
        "answers per camera {answers:?}"
    );
    let (lo, hi) = (
        p90s.iter().copied().fold(f64::MAX, f64::min),
        p90s.iter().copied().fold(0.0, f64::max),
    );
    assert!(hi <= 2.0 * lo, "p90 latencies {p90s:?}");
    // Standing work of four cameras is in flight or queued; the ask waits for at most
    // the sequences already decoding, not for the other cameras' frames.
    assert!(
        ask_ms < 3.0 * hi,
        "the ask took {ask_ms:.0} ms, a standing answer's p90 is {hi:.0} ms"
    );
}

/// A camera with more prompts than the others keeps its turn: while cameras of one
/// prompt each keep the engine's sequences busy, it is not overtaken (it got half the
/// frames of the others when streams that did not fit were skipped).
#[test]
fn many_prompts_are_not_starved_by_few() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(
        Model::load(
            model_file(dir.path()),
            &ContextOptions {
                threads: 1,
                max_sequences: 4,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    // The one-prompt answers stop at different lengths, so their sequences come free one
    // at a time: three are never free together unless the scheduler waits for them.
    let cams: Vec<_> = [
        ("caption en|detect cat|ocr", 12),
        ("caption en", 3),
        ("caption en", 5),
        ("caption en", 7),
    ]
    .iter()
    .enumerate()
    .map(|(i, (prompts, tokens))| {
        let (got, sink) = collector();
        (
            got,
            Stream::attach(
                engine.clone(),
                PromptSet::from_short(prompts, 0, *tokens).unwrap(),
                stream_config(&format!("cam{i}")),
                sink,
            ),
        )
    })
    .collect();
    let start = Instant::now();
    let mut seq = 0;
    while start.elapsed() < Duration::from_secs(2) {
        for (_, w) in &cams {
            w.submit(frame(seq));
            seq += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for (_, w) in &cams {
        assert!(w.drain(Duration::from_secs(60)));
    }
    let frames: Vec<usize> = cams
        .iter()
        .enumerate()
        .map(|(i, (g, _))| g.lock().unwrap().len() / if i == 0 { 3 } else { 1 })
        .collect();
    println!("frames answered per camera {frames:?}");
    let most = frames.iter().copied().max().unwrap();
    assert!(
        frames[0] * 3 >= most * 2,
        "the three-prompt camera got {} frames answered, the others up to {most}",
        frames[0]
    );
}

/// A sink that panics loses its message, not the engine: the stream is still served
/// and the other stream of the engine too.
#[test]
fn a_panicking_sink_does_not_stop_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let engine = model(dir.path());
    let calls = Arc::new(Mutex::new(0));
    let c = calls.clone();
    let sink: paligemma_stream::Sink = Box::new(move |_: &ResultMessage| {
        *c.lock().unwrap() += 1;
        panic!("a broken sink");
    });
    let a = Stream::attach(
        engine.clone(),
        PromptSet::from_short("caption en", 0, 4).unwrap(),
        stream_config("a"),
        sink,
    );
    let (got_b, sink_b) = collector();
    let b = Stream::attach(
        engine.clone(),
        PromptSet::from_short("caption en", 0, 4).unwrap(),
        stream_config("b"),
        sink_b,
    );
    for seq in 0..2 {
        a.submit(frame(seq));
        assert!(
            a.drain(Duration::from_secs(30)),
            "frame {seq}: the stream drains after its sink panicked"
        );
    }
    b.submit(frame(7));
    assert!(b.drain(Duration::from_secs(30)));
    assert_eq!(*calls.lock().unwrap(), 2, "both frames reached the sink");
    assert_eq!(
        got_b.lock().unwrap().len(),
        1,
        "the other stream is answered"
    );
}

/// A flush abandons only its own stream's work.
#[test]
fn flush_of_one_stream_leaves_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let engine = model(dir.path());
    let (got_a, sink_a) = collector();
    let (got_b, sink_b) = collector();
    let a = Stream::attach(
        engine.clone(),
        PromptSet::from_short("caption en", 0, 300).unwrap(),
        stream_config("a"),
        sink_a,
    );
    let b = Stream::attach(
        engine.clone(),
        PromptSet::from_short("caption en", 0, 6).unwrap(),
        stream_config("b"),
        sink_b,
    );
    a.submit(frame(1));
    b.submit(frame(1));
    wait_busy(&a);
    a.flush();
    assert!(a.drain(Duration::from_secs(5)) && b.drain(Duration::from_secs(30)));
    assert!(
        got_a.lock().unwrap().is_empty(),
        "the flushed stream gets no stale result"
    );
    assert_eq!(
        got_b.lock().unwrap().len(),
        1,
        "the other stream's answer arrives"
    );
}

/// Cameras whose frames arrive together are served by one vision pass and one prefill
/// (see the scheduler): each still gets the answers its frame gets alone.
#[test]
fn cameras_served_together_get_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let path = model_file(dir.path());
    let images: Vec<RgbImage> = ["photo.jpg", "rgb.png", "rgba.png"]
        .iter()
        .map(|f| RgbImage::open(&fixtures().join("images").join(f)).unwrap())
        .collect();
    let frame_of = |i: usize| {
        Frame::new(
            FrameInfo {
                seq: i as u64,
                width: images[i % 3].width,
                height: images[i % 3].height,
                ..Default::default()
            },
            images[i % 3].clone(),
        )
    };
    let prompts = || PromptSet::from_short("caption en|detect cat ; dog", 0, 12).unwrap();
    let alone_engine = Engine::new(
        Model::load(
            &path,
            &ContextOptions {
                threads: 1,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let (_g, sink) = collector();
    let alone = Stream::attach(alone_engine, prompts(), stream_config("alone"), sink);
    let want: Vec<Vec<String>> = (0..4)
        .map(|i| {
            alone
                .analyse(frame_of(i))
                .unwrap()
                .iter()
                .map(|m| m.raw.clone())
                .collect()
        })
        .collect();

    // One lane, then two (each context must compute what the model computes alone).
    for lanes in [1, 2] {
        let weights = Weights::load(&path, &WeightOptions::default()).unwrap();
        let context = ContextOptions {
            threads: lanes,
            max_sequences: 8,
            ..Default::default()
        };
        same_answers_together(
            Engine::with_lanes(weights, &context, lanes).unwrap(),
            &want,
            &frame_of,
            &prompts,
        );
    }
}

fn same_answers_together(
    engine: Arc<Engine>,
    want: &[Vec<String>],
    frame_of: &dyn Fn(usize) -> Frame,
    prompts: &dyn Fn() -> PromptSet,
) {
    let cams: Vec<_> = (0..4)
        .map(|i| {
            let (got, sink) = collector();
            (
                got,
                Stream::attach(
                    engine.clone(),
                    prompts(),
                    stream_config(&format!("cam{i}")),
                    sink,
                ),
            )
        })
        .collect();
    for round in 0..3 {
        for (i, (_, w)) in cams.iter().enumerate() {
            w.submit(frame_of(i));
        }
        for (_, w) in &cams {
            assert!(w.drain(Duration::from_secs(30)), "round {round}");
        }
    }
    for (i, (got, _)) in cams.iter().enumerate() {
        let got = got.lock().unwrap();
        assert!(!got.is_empty(), "camera {i} was answered");
        for m in got.iter() {
            let p = if m.prompt.id == "caption" { 0 } else { 1 };
            assert!(!m.is_error(), "{m:?}");
            assert_eq!(m.raw, want[i][p], "camera {i}, prompt {}", m.prompt.id);
        }
        let vision: Vec<f64> = got.iter().map(|m| m.latency_ms.vision).collect();
        println!("camera {i}: {} answers, vision ms {vision:.2?}", got.len());
    }
}
