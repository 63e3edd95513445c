//! Faults a robot's cameras have, with the real node: a pipeline that ends (EOS) and
//! one that cannot play are started again with a growing back-off, a network source that
//! stops is `stalled` until its frames come back; every transition is in the log, on
//! `<camera>/errors`, in status and in the ROS 2 diagnostics, and results resume.
use paligemma_ros2::msgs::{DiagnosticArray, DiagnosticStatus, KeyValue, from_cdr};
use paligemma_ros2::type_hash::rihs01;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zenoh::Wait;

mod common;
use common::{client, fixture_model, free_port, start_node_logged};

/// Samples as they arrived: when, on which key, the JSON.
type Seen = Arc<Mutex<Vec<(Instant, String, Value)>>>;

/// Every sample under `key` with the time it arrived, as JSON.
fn collect(session: &zenoh::Session, key: String) -> (Seen, zenoh::pubsub::Subscriber<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let sub = session
        .declare_subscriber(key)
        .callback(move |s| {
            if let Ok(v) = serde_json::from_slice(&s.payload().to_bytes()) {
                sink.lock()
                    .unwrap()
                    .push((Instant::now(), s.key_expr().to_string(), v));
            }
        })
        .wait()
        .unwrap();
    (seen, sub)
}

/// The times at which `camera`'s source entered `state`.
fn entered(seen: &[(Instant, String, Value)], camera: &str, state: &str) -> Vec<Instant> {
    seen.iter()
        .filter(|(_, k, v)| {
            k.ends_with(&format!("/{camera}/errors"))
                && v["kind"] == "source"
                && v["state"] == state
        })
        .map(|(t, _, _)| *t)
        .collect()
}

fn wait_until(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sources_that_end_fail_or_stall_are_ridden_out() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model(dir.path());
    let (port, metrics_port) = (free_port(), free_port());
    let prefix = format!("pgfaults/{port}");
    let (_node, log) = start_node_logged(
        dir.path(),
        &format!(
            r#"
node = "faults"
prefix = "{prefix}"
status_interval_s = 0.25
[model]
path = "{model}"
threads = 1
[zenoh]
listen = ["tcp/127.0.0.1:{port}"]
[ros2]
domain_id = 9
node_name = "faults"
diagnostics_period_s = 0.25
[metrics]
listen = "127.0.0.1:{metrics_port}"
[[camera]]
name = "eos"
pipeline = "videotestsrc num-buffers=3 ! video/x-raw,width=64,height=48,framerate=10/1"
restart_backoff_ms = 300
restart_backoff_max_ms = 10000
[[camera.prompt]]
id = "scene"
task = "caption en"
max_tokens = 2
[[camera]]
name = "broken"
uri = "file://{missing}"
restart_backoff_ms = 300
[[camera.prompt]]
id = "scene"
task = "caption en"
[[camera]]
name = "net"
zenoh_key = "{prefix}/frames-in"
stall_after_ms = 1000
[[camera.prompt]]
id = "scene"
task = "caption en"
max_tokens = 2
"#,
            model = model.display(),
            missing = dir.path().join("unplugged.mp4").display(),
        ),
    );
    let session = client(port);
    let (seen, _sub) = collect(&session, format!("{prefix}/*/*"));
    let diagnostics = session
        .declare_subscriber(format!(
            "9/diagnostics/diagnostic_msgs::msg::dds_::DiagnosticArray_/{}",
            rihs01("diagnostic_msgs/msg/DiagnosticArray").unwrap()
        ))
        .wait()
        .unwrap();
    // The newest status of `camera` in the diagnostics received so far.
    let camera_diagnostic = |camera: &str| {
        let mut newest = None;
        while let Ok(Some(s)) = diagnostics.try_recv() {
            let array: DiagnosticArray = from_cdr(&s.payload().to_bytes(), 1 << 20).unwrap();
            assert_eq!(array.status.len(), 4, "3 cameras and the node");
            newest = array
                .status
                .into_iter()
                .find(|s| s.name == format!("faults: camera {camera}"))
                .or(newest);
        }
        newest
    };
    let snapshot = || seen.lock().unwrap().clone();
    let png = std::fs::read(common::repo_root().join("tests/fixtures/images/rgb.png")).unwrap();
    let frames = |how_long: Duration| {
        let end = Instant::now() + how_long;
        while Instant::now() < end {
            session
                .put(format!("{prefix}/frames-in"), png.clone())
                .wait()
                .unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // A network source: streaming, then silent for 3 s (stalled), then back.
    wait_until("the node", 120, || {
        snapshot()
            .iter()
            .any(|(_, k, _)| k.ends_with("/net/status"))
    });
    frames(Duration::from_millis(1500));
    assert_eq!(
        camera_diagnostic("net").expect("diagnostics").level,
        DiagnosticStatus::OK
    );
    let stop = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    // Stalled: a warning on /diagnostics, with the state among the values.
    let stalled = camera_diagnostic("net").unwrap();
    println!("diagnostics of the stalled camera: {stalled:?}");
    assert_eq!(stalled.level, DiagnosticStatus::WARN, "{stalled:?}");
    assert!(stalled.message.starts_with("stalled for"), "{stalled:?}");
    assert!(stalled.values.contains(&KeyValue {
        key: "state".into(),
        value: "stalled".into()
    }));
    let stalled = entered(&snapshot(), "net", "stalled");
    assert!(
        stalled.len() == 1 && stalled[0] > stop,
        "one stall, after the frames stopped: {:?}",
        stalled.len()
    );
    let back = Instant::now();
    frames(Duration::from_millis(1500));
    let s = snapshot();
    assert!(
        entered(&s, "net", "streaming").iter().any(|&t| t > back),
        "streaming again"
    );
    assert!(
        s.iter()
            .any(|(t, k, _)| *t > back && k.ends_with("/net/scene")),
        "results again"
    );

    // Meanwhile the pipeline that ends has been started again and again, each wait
    // longer than the last (300 ms doubling, ±20%), and answered between restarts.
    wait_until("4 restarts of the ended pipeline", 60, || {
        entered(&snapshot(), "eos", "restarting").len() >= 4
    });
    let s = snapshot();
    let restarts = entered(&s, "eos", "restarting");
    let gaps: Vec<f64> = restarts
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64())
        .collect();
    println!("restarts of the ended pipeline {:.2?} s apart", gaps);
    assert!(
        gaps.windows(2).take(2).all(|g| g[1] > g[0]),
        "the back-off grows: {gaps:?}"
    );
    assert!(
        s.iter()
            .any(|(t, k, _)| *t > restarts[1] && k.ends_with("/eos/scene")),
        "results after a restart"
    );
    // The source that cannot play: restarted too, its error in status.
    let broken = s
        .iter()
        .rev()
        .find(|(_, k, _)| k.ends_with("/broken/status"))
        .map(|(_, _, v)| v["source_state"].clone())
        .unwrap();
    println!("broken camera: {broken}");
    let level = camera_diagnostic("broken").unwrap().level;
    assert!(
        [DiagnosticStatus::WARN, DiagnosticStatus::ERROR].contains(&level),
        "{level}"
    );
    assert!(
        ["restarting", "failed"].contains(&broken["state"].as_str().unwrap())
            && broken["restarts"].as_u64() >= Some(2),
        "{broken}"
    );
    assert!(
        broken["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{broken}"
    );
    let eos = s
        .iter()
        .rev()
        .find(|(_, k, _)| k.ends_with("/eos/status"))
        .map(|(_, _, v)| v["source_state"].clone())
        .unwrap();
    assert!(
        eos["restarts"].as_u64() >= Some(3) && eos["last_error"] == "the stream ended (EOS)",
        "{eos}"
    );
    // The same counters and states on the metrics port, in Prometheus' text format,
    // once the network source is silent again since its second burst.
    wait_until("the network source stalled again", 20, || {
        entered(&snapshot(), "net", "stalled").len() >= 2
    });
    let metrics = ureq::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} not in:\n{metrics}"))
    };
    let net_seen = value(r#"paligemma_frames_seen_total{camera="net"}"#);
    println!("net camera: {net_seen} frames seen (metrics)");
    assert!(net_seen >= 20.0, "{net_seen}");
    assert!(value(r#"paligemma_results_total{camera="net"}"#) >= 1.0);
    assert!(value(r#"paligemma_camera_source_restarts_total{camera="eos"}"#) >= 3.0);
    assert_eq!(
        value(r#"paligemma_camera_source_state{camera="net",state="stalled"}"#),
        1.0
    );
    assert_eq!(
        value(r#"paligemma_camera_source_state{camera="net",state="streaming"}"#),
        0.0
    );
    assert!(value(r#"paligemma_stage_seconds_count{stage="vision",task="caption"}"#) >= 1.0);
    let log = std::fs::read_to_string(log).unwrap();
    for line in [
        "eos: frame source streaming -> restarting: the stream ended (EOS)",
        "net: frame source streaming -> stalled: no frame for",
        "net: frame source stalled -> streaming",
    ] {
        assert!(log.contains(line), "{line:?} not in the log:\n{log}");
    }
}
