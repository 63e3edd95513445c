//! The elements in harnesses and real pipelines, on a fixture model.
use gst::prelude::*;
use gstpaligemma::result_meta::Region;
use paligemma::ResultKind;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn init() -> &'static Path {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = MODEL.get_or_init(|| {
        gst::init().unwrap();
        gstpaligemma::plugin_register_static().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pg2.gguf");
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        paligemma::convert::convert(
            &fixtures.join("pg2_gqa/hf"),
            &out,
            &Default::default(),
            |_| {},
        )
        .unwrap();
        (dir, out)
    });
    path
}

fn video_caps(w: i32, h: i32) -> gst::Caps {
    gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgb, w as u32, h as u32)
        .fps(gst::Fraction::new(30, 1))
        .build()
        .unwrap()
        .to_caps()
        .unwrap()
}

/// An RGB frame with GStreamer's default stride (rows padded to 4 bytes).
fn frame(w: usize, h: usize, pts_ms: u64) -> gst::Buffer {
    let stride = (w * 3).next_multiple_of(4);
    let mut data = vec![0u8; stride * h];
    for y in 0..h {
        for x in 0..w {
            data[y * stride + x * 3..][..3].copy_from_slice(&[
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                128,
            ]);
        }
    }
    let mut buf = gst::Buffer::from_mut_slice(data);
    buf.get_mut()
        .unwrap()
        .set_pts(gst::ClockTime::from_mseconds(pts_ms));
    buf
}

/// A harness around `paligemma` with its bus.
fn harness(props: &str) -> (gst_check::Harness, gst::Bus) {
    let model = init();
    let mut h = gst_check::Harness::new_parse(&format!(
        "paligemma model={} threads=1 {props}",
        model.display()
    ));
    let bus = gst::Bus::new();
    h.element().unwrap().set_bus(Some(&bus));
    h.set_src_caps(video_caps(64, 48));
    (h, bus)
}

fn results(bus: &gst::Bus) -> Vec<gst::Structure> {
    std::iter::from_fn(|| bus.pop())
        .filter_map(|m| match m.view() {
            gst::MessageView::Element(e) => e
                .structure()
                .filter(|s| s.name() == "paligemma-result")
                .map(|s| s.to_owned()),
            _ => None,
        })
        .collect()
}

#[test]
fn sync_mode_every_sampled_frame_carries_its_results() {
    let (mut h, bus) = harness("mode=sync prompts=\"detect cat ; dog|caption en\" max-tokens=6");
    for i in 0..3 {
        h.push(frame(64, 48, i * 40)).unwrap();
        let out = h.pull().unwrap();
        assert_eq!(out.pts(), Some(gst::ClockTime::from_mseconds(i * 40)));
        let regions = Region::from_buffer(&out);
        assert!(
            regions
                .iter()
                .any(|r| r.prompt_id == "caption" && r.kind == ResultKind::Caption),
            "frame {i}: {regions:?}"
        );
        assert!(regions.iter().all(|r| r.frame == (64, 48)));
    }
    let msgs = results(&bus);
    assert_eq!(msgs.len(), 6, "two prompts on three frames");
    for (n, m) in msgs.iter().enumerate() {
        let pts = m.get::<Option<gst::ClockTime>>("pts").unwrap();
        assert_eq!(
            pts,
            Some(gst::ClockTime::from_mseconds((n / 2) as u64 * 40)),
            "{m}"
        );
        let json: serde_json::Value = serde_json::from_str(m.get::<&str>("json").unwrap()).unwrap();
        assert_eq!(json["schema"], "paligemma.result/1");
        assert!(m.get::<gst::Array>("detections").is_ok());
        // An answer's confidence, present whenever it has tokens.
        assert!(
            m.get::<f64>("mean-logprob").is_ok_and(|lp| lp <= 0.0)
                || json["tokens"]["generated"] == 0,
            "{m}"
        );
        assert!(
            m.get::<Option<gst::ClockTime>>("running-time")
                .unwrap()
                .is_some()
        );
    }
}

#[test]
fn async_mode_attaches_results_to_a_later_frame() {
    let (mut h, bus) = harness("mode=async prompts=\"ocr\" max-tokens=3");
    let mut with_results = 0;
    let start = Instant::now();
    for i in 0..200u64 {
        h.push(frame(64, 48, i * 33)).unwrap();
        let out = h.pull().unwrap();
        if !Region::from_buffer(&out).is_empty() {
            with_results += 1;
        }
        if with_results >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(with_results >= 2, "results attached to outgoing frames");
    let msgs = results(&bus);
    assert!(!msgs.is_empty());
    // The analysed frame's pts is reported, not the frame that carries the meta.
    let pts = msgs[0]
        .get::<Option<gst::ClockTime>>("pts")
        .unwrap()
        .unwrap();
    assert!(pts.mseconds().is_multiple_of(33));
    assert!(start.elapsed() < Duration::from_secs(60));
}

#[test]
fn caps_change_mid_stream() {
    let (mut h, bus) = harness("mode=sync prompts=\"ocr\" max-tokens=2");
    h.push(frame(64, 48, 0)).unwrap();
    h.pull().unwrap();
    h.set_src_caps(video_caps(30, 90));
    h.push(frame(30, 90, 40)).unwrap();
    let out = h.pull().unwrap();
    assert_eq!(Region::from_buffer(&out)[0].frame, (30, 90));
    let json: Vec<serde_json::Value> = results(&bus)
        .iter()
        .map(|m| serde_json::from_str(m.get::<&str>("json").unwrap()).unwrap())
        .collect();
    assert_eq!(
        (
            json[0]["frame"]["width"].as_u64(),
            json[1]["frame"]["width"].as_u64()
        ),
        (Some(64), Some(30))
    );
}

#[test]
fn flushing_drops_stale_work() {
    // 400 tokens take the demo model 65 ms on a fast core: the flush comes 5 ms after
    // the frame, well inside the answer (a fixed 50 ms with 300 tokens was not).
    let (mut h, bus) = harness("mode=async prompts=\"caption en\" max-tokens=400");
    h.push(frame(64, 48, 0)).unwrap();
    h.pull().unwrap();
    std::thread::sleep(Duration::from_millis(5));
    assert!(h.push_event(gst::event::FlushStart::new()));
    assert!(h.push_event(gst::event::FlushStop::new(true)));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        results(&bus).is_empty(),
        "the pre-seek frame's long answer was abandoned"
    );
}

#[test]
fn missing_and_corrupt_models_fail_the_state_change() {
    init();
    for (path, why) in [
        ("/nonexistent/model.gguf", "No such file"),
        (
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
            "not a GGUF file",
        ),
    ] {
        let pipeline = gst::parse::launch(&format!(
            "videotestsrc num-buffers=2 ! paligemma model={path} ! fakesink"
        ))
        .unwrap();
        let bus = pipeline.bus().unwrap();
        assert!(pipeline.set_state(gst::State::Paused).is_err());
        let err = std::iter::from_fn(|| bus.pop()).find_map(|m| match m.view() {
            gst::MessageView::Error(e) => Some(format!("{} {:?}", e.error(), e.debug())),
            _ => None,
        });
        let err = err.expect("an error message");
        assert!(err.contains(path) && err.contains(why), "{err}");
        pipeline.set_state(gst::State::Null).unwrap();
    }
}

/// A copy of `model` with one tensor's type or one metadata value changed.
fn corrupted(
    model: &Path,
    out: &Path,
    tensor_type: Option<(&str, ggml::Type)>,
    meta: Option<(&str, ggml::gguf::Value)>,
) {
    let file = ggml::gguf::GgufFile::open(model).unwrap();
    file.rewrite(out, |metadata, tensors| {
        for (key, value) in metadata.iter_mut() {
            if let Some((_, v)) = meta.as_ref().filter(|(k, _)| k == key) {
                *value = v.clone();
            }
        }
        for (name, ty, _) in tensors.iter_mut() {
            if let Some((_, t)) = tensor_type.filter(|(n, _)| n == name) {
                *ty = t;
            }
        }
    })
    .unwrap();
}

/// Files that made ggml abort or crash the whole application (a norm stored as q4_0,
/// a matrix as i16, a negative epsilon) are refused by the element with an error
/// message naming the problem; the application goes on, and the same pipeline plays
/// once it is given a sound model.
#[test]
fn a_corrupted_model_is_an_error_message_and_the_application_goes_on() {
    let model = init();
    let dir = tempfile::tempdir().unwrap();
    type Case<'a> = (
        Option<(&'a str, ggml::Type)>,
        Option<(&'a str, ggml::gguf::Value)>,
        &'a str,
    );
    let cases: [Case; 3] = [
        (
            Some(("blk.0.attn_norm.weight", ggml::Type::Q4_0)),
            None,
            "blk.0.attn_norm.weight is q4_0",
        ),
        (
            Some(("blk.1.ffn_up.weight", ggml::Type::I16)),
            None,
            "blk.1.ffn_up.weight is i16",
        ),
        (
            None,
            Some((
                "paligemma.vision.attention.layer_norm_epsilon",
                ggml::gguf::Value::F32(-1.0),
            )),
            "layer_norm_epsilon is -1",
        ),
    ];
    let pipeline =
        gst::parse::launch("videotestsrc num-buffers=3 ! video/x-raw,width=64,height=48 ! paligemma name=pg mode=sync threads=1 max-tokens=4 ! fakesink")
            .unwrap()
            .downcast::<gst::Pipeline>()
            .unwrap();
    let element = pipeline.by_name("pg").unwrap();
    let bus = pipeline.bus().unwrap();
    for (i, (tensor, meta, why)) in cases.into_iter().enumerate() {
        let bad = dir.path().join(format!("bad{i}.gguf"));
        corrupted(model, &bad, tensor, meta);
        element.set_property("model", bad.to_str().unwrap());
        assert!(pipeline.set_state(gst::State::Playing).is_err(), "{why}");
        let err = std::iter::from_fn(|| bus.pop())
            .find_map(|m| match m.view() {
                gst::MessageView::Error(e) => Some(format!("{} {:?}", e.error(), e.debug())),
                _ => None,
            })
            .expect("an error message");
        assert!(err.contains(why), "expected {why:?} in {err}");
        pipeline.set_state(gst::State::Null).unwrap();
    }
    element.set_property("model", model.to_str().unwrap());
    pipeline.set_state(gst::State::Playing).unwrap();
    let mut answers = 0;
    for m in bus.iter_timed(gst::ClockTime::from_seconds(60)) {
        match m.view() {
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(e) => panic!("{} {:?}", e.error(), e.debug()),
            gst::MessageView::Element(e)
                if e.structure()
                    .is_some_and(|s| s.name() == "paligemma-result") =>
            {
                answers += 1
            }
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(
        answers > 0,
        "the pipeline answered once given a sound model"
    );
}

fn run_pipeline(desc: &str, until: Duration) -> (gst::Pipeline, Vec<gst::Structure>, Duration) {
    let pipeline = gst::parse::launch(desc)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
    let bus = pipeline.bus().unwrap();
    let start = Instant::now();
    pipeline.set_state(gst::State::Playing).unwrap();
    let mut msgs = Vec::new();
    while start.elapsed() < until {
        let Some(m) = bus.timed_pop(gst::ClockTime::from_mseconds(50)) else {
            continue;
        };
        match m.view() {
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(e) => panic!("{} {:?}", e.error(), e.debug()),
            gst::MessageView::Element(e) => msgs.extend(
                e.structure()
                    .filter(|s| s.name() == "paligemma-result")
                    .map(|s| s.to_owned()),
            ),
            _ => {}
        }
    }
    (pipeline, msgs, start.elapsed())
}

#[test]
fn live_source_keeps_its_frame_rate_in_async_mode() {
    let model = init();
    // 60 frames at 30 fps from a live source: the pipeline must take about 2 s even
    // though the model is busy for much of it.
    let desc = format!(
        "videotestsrc is-live=true num-buffers=60 ! video/x-raw,width=320,height=240,framerate=30/1 ! paligemma model={} threads=1 mode=async prompts=\"caption en\" max-tokens=24 ! fakesink sync=true",
        model.display()
    );
    let (pipeline, msgs, took) = run_pipeline(&desc, Duration::from_secs(20));
    pipeline.set_state(gst::State::Null).unwrap();
    println!(
        "60 live frames at 30 fps took {took:?}; {} results",
        msgs.len()
    );
    assert!(
        took < Duration::from_millis(2600),
        "the live source was slowed down: {took:?}"
    );
    assert!(!msgs.is_empty());
}

#[test]
fn sync_file_pipeline_eos_waits_and_null_returns_promptly() {
    let model = init();
    let desc = format!(
        "videotestsrc num-buffers=4 ! video/x-raw,width=64,height=48 ! paligemma model={} threads=1 mode=sync prompts=ocr max-tokens=3 ! fakesink",
        model.display()
    );
    let (pipeline, msgs, _) = run_pipeline(&desc, Duration::from_secs(60));
    pipeline.set_state(gst::State::Null).unwrap();
    assert_eq!(msgs.len(), 4, "every frame analysed before EOS");

    // NULL while the model is in the middle of a long answer.
    let desc = format!(
        "videotestsrc ! video/x-raw,width=64,height=48 ! paligemma model={} threads=1 mode=sync prompts=\"caption en\" max-tokens=480 ! fakesink",
        model.display()
    );
    let pipeline = gst::parse::launch(&desc).unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let start = Instant::now();
    pipeline.set_state(gst::State::Null).unwrap();
    println!("PLAYING -> NULL mid-inference took {:?}", start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn latency_query_reports_the_mode() {
    let model = init();
    let mut mins = Vec::new();
    for mode in ["async", "sync"] {
        let desc = format!(
            "videotestsrc is-live=true ! paligemma name=p model={} mode={mode} prompts=ocr max-tokens=2 ! fakesink",
            model.display()
        );
        let pipeline = gst::parse::launch(&desc)
            .unwrap()
            .downcast::<gst::Pipeline>()
            .unwrap();
        pipeline.set_state(gst::State::Playing).unwrap();
        // Query once the first analysis is done (sync reports what it measured).
        let bus = pipeline.bus().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let got = bus
                .timed_pop(gst::ClockTime::from_mseconds(100))
                .is_some_and(|m| matches!(m.view(), gst::MessageView::Element(e) if e.structure().is_some_and(|s| s.name() == "paligemma-result")));
            if got {
                break;
            }
        }
        let p = pipeline.by_name("p").unwrap();
        let mut q = gst::query::Latency::new();
        assert!(p.static_pad("src").unwrap().query(&mut q));
        let (live, min, _) = q.result();
        assert!(live);
        mins.push(min);
        pipeline.set_state(gst::State::Null).unwrap();
    }
    // videotestsrc reports one frame; async adds nothing, sync adds its analysis time.
    assert_eq!(
        mins[0],
        gst::ClockTime::from_nseconds(33_333_333),
        "async adds no latency"
    );
    assert!(
        mins[1] > mins[0],
        "sync reports its analysis time: {mins:?}"
    );
}

#[test]
fn text_pad_carries_timestamped_answers() {
    let model = init();
    let desc = format!(
        "videotestsrc num-buffers=2 ! video/x-raw,width=64,height=48 ! paligemma name=p model={} threads=1 mode=sync prompts=\"caption en\" max-tokens=3 ! fakesink \
         p.text_src ! text/x-raw,format=utf8 ! appsink name=text sync=false",
        model.display()
    );
    let pipeline = gst::parse::launch(&desc)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
    let sink = pipeline
        .by_name("text")
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let sample = sink
        .try_pull_sample(gst::ClockTime::from_seconds(30))
        .expect("a text buffer");
    let buf = sample.buffer().unwrap();
    let text = String::from_utf8(buf.map_readable().unwrap().to_vec()).unwrap();
    assert!(text.starts_with("caption: "), "{text}");
    assert_eq!(buf.pts(), Some(gst::ClockTime::ZERO));
    pipeline.set_state(gst::State::Null).unwrap();
}

#[test]
fn async_eos_does_not_wait_for_pending_results() {
    let model = init();
    // A long answer is in progress when the 5-frame file ends: EOS goes through at
    // once and the pending work is dropped.
    let desc = format!(
        "videotestsrc num-buffers=5 ! video/x-raw,width=64,height=48 ! paligemma model={} threads=1 mode=async prompts=\"caption en\" max-tokens=480 ! fakesink",
        model.display()
    );
    let (pipeline, msgs, took) = run_pipeline(&desc, Duration::from_secs(30));
    pipeline.set_state(gst::State::Null).unwrap();
    println!("async EOS after {took:?}, {} results", msgs.len());
    assert!(
        took < Duration::from_secs(3),
        "EOS waited for the model: {took:?}"
    );
    assert!(
        msgs.is_empty(),
        "the 480-token answer in progress at EOS was dropped, not posted"
    );
}

/// Two elements with the same model file and settings share one engine (one copy of
/// the weights, one thread pool) and both answer.
#[test]
fn elements_share_one_engine() {
    let model = init();
    let (mut a, bus_a) = harness("mode=sync prompts=\"ocr\" max-tokens=3");
    let (mut b, bus_b) = harness("mode=sync prompts=\"caption en\" max-tokens=3");
    let mut buf = frame(64, 48, 0);
    a.push(buf.clone()).unwrap();
    buf.make_mut().set_pts(gst::ClockTime::from_mseconds(40));
    b.push(buf).unwrap();
    // The elements load with these options; asking for them again finds their engine.
    let context = paligemma::ContextOptions {
        threads: 1,
        ..Default::default()
    };
    let engine = paligemma_stream::Engine::shared(
        model,
        &paligemma_stream::EngineOptions {
            context,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        engine.streams() >= 2,
        "both elements on one engine: {} stream(s)",
        engine.streams()
    );
    assert!(
        !results(&bus_a).is_empty() && !results(&bus_b).is_empty(),
        "both answer"
    );
    drop((a, b));
}
