//! Floods of refused input on a camera (malformed frames on its Zenoh key, malformed
//! prompt updates): the node's log and `<camera>/errors` stay small, the reports' counts
//! add up to every refusal, status counts them exactly, and good frames sent during the
//! flood are answered at no less than half their rate without it.
use serde_json::Value;
use std::time::{Duration, Instant};
use zenoh::Wait;
use zenoh::qos::CongestionControl;

mod common;
use common::{client, fixture_model, free_port, start_node_logged};

/// Malformed samples per flood (fewer under emulation, where the node's side runs
/// 10-50 times slower).
fn flood_size() -> u64 {
    if common::emulated() { 10_000 } else { 100_000 }
}
/// How long each measurement of the good frames' answers lasts, and the flood at least.
const MEASURE: Duration = Duration::from_secs(4);
/// One good frame every 100 ms.
const FRAME_EVERY: Duration = Duration::from_millis(100);
const WINDOW_S: f64 = 2.0;

type Sub = zenoh::pubsub::Subscriber<zenoh::handlers::FifoChannelHandler<zenoh::sample::Sample>>;

/// Good frames every [`FRAME_EVERY`] for `how_long` (while `more` holds too), counting
/// the answers that arrive meanwhile.
fn answers_while(
    session: &zenoh::Session,
    frames_key: &str,
    png: &[u8],
    answers: &Sub,
    how_long: Duration,
    more: impl Fn() -> bool,
) -> (usize, Duration) {
    while answers.try_recv().ok().flatten().is_some() {}
    let start = Instant::now();
    let mut count = 0;
    let mut next = start;
    while start.elapsed() < how_long || more() {
        if Instant::now() >= next {
            session.put(frames_key, png.to_vec()).wait().unwrap();
            next += FRAME_EVERY;
        }
        if let Ok(Some(_)) = answers.recv_timeout(Duration::from_millis(10)) {
            count += 1;
        }
    }
    (count, start.elapsed())
}

/// Floods `target` with `bad` payloads as fast as the node takes them (congestion control
/// `Block`, so none is dropped on the way and status must count every one), spread over
/// at least [`MEASURE`], while good frames go to the camera; checks the log, the errors
/// key and status, and returns the answer rates without and with the flood.
fn flood(kind: &str, target: &str, bad: &'static [u8], allow_prompt_updates: bool) {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model(dir.path());
    let port = free_port();
    let prefix = format!("pgflood/{port}");
    let (_node, log) = start_node_logged(
        dir.path(),
        &format!(
            r#"
node = "flood"
prefix = "{prefix}"
status_interval_s = 0.5
allow_prompt_updates = {allow_prompt_updates}
refusal_window_s = {WINDOW_S}
[model]
path = "{model}"
threads = 1
[zenoh]
listen = ["tcp/127.0.0.1:{port}"]
[[camera]]
name = "cam"
zenoh_key = "{prefix}/frames-in"
[[camera.prompt]]
id = "scene"
task = "caption en"
max_tokens = 2
"#,
            model = model.display()
        ),
    );
    let session = client(port);
    let answers = session
        .declare_subscriber(format!("{prefix}/cam/scene"))
        .wait()
        .unwrap();
    // The errors key's messages with the time each arrived.
    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Instant, Value)>::new()));
    let sink = reports.clone();
    let _errors = session
        .declare_subscriber(format!("{prefix}/cam/errors"))
        .callback(move |s| {
            sink.lock().unwrap().push((
                Instant::now(),
                serde_json::from_slice(&s.payload().to_bytes()).unwrap(),
            ))
        })
        .wait()
        .unwrap();
    let frames_key = format!("{prefix}/frames-in");
    let png = std::fs::read(common::repo_root().join("tests/fixtures/images/rgb.png")).unwrap();
    let ready = Instant::now();
    while answers
        .recv_timeout(Duration::from_millis(500))
        .ok()
        .flatten()
        .is_none()
    {
        assert!(
            ready.elapsed() < Duration::from_secs(120),
            "the camera never answered"
        );
        session.put(&frames_key, png.clone()).wait().unwrap();
    }

    let (before, before_time) =
        answers_while(&session, &frames_key, &png, &answers, MEASURE, || false);
    let log_before = std::fs::metadata(&log).unwrap().len();
    let n = flood_size();
    let flooder = {
        let publisher = session
            .declare_publisher(format!("{prefix}/{target}"))
            .congestion_control(CongestionControl::Block)
            .wait()
            .unwrap();
        std::thread::spawn(move || {
            let start = Instant::now();
            for i in 0..n {
                publisher.put(bad).wait().unwrap();
                // Spread over MEASURE at least: ahead of schedule, wait.
                std::thread::sleep(
                    MEASURE
                        .mul_f64(i as f64 / n as f64)
                        .saturating_sub(start.elapsed()),
                );
            }
            start.elapsed()
        })
    };
    let (during, during_time) =
        answers_while(&session, &frames_key, &png, &answers, MEASURE, || {
            !flooder.is_finished()
        });
    let flood_time = flooder.join().unwrap();
    // Declared only now: a subscriber's queue that nobody reads stops the session's
    // delivery to every other subscriber once it is full.
    let status = session
        .declare_subscriber(format!("{prefix}/cam/status"))
        .wait()
        .unwrap();

    // Every refusal is counted in status, by kind, and the reports' counts add up to it
    // once the last window has closed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let counted = loop {
        let s = status
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .map(|s| serde_json::from_slice::<Value>(&s.payload().to_bytes()).unwrap());
        if let Some(s) = s.filter(|s| s["refusals"][kind].as_u64() == Some(n)) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "status never counted {n} {kind} refusals"
        );
    };
    std::thread::sleep(Duration::from_secs_f64(WINDOW_S + 1.0));
    let reports = std::mem::take(&mut *reports.lock().unwrap());
    let log_growth = std::fs::metadata(&log).unwrap().len() - log_before;
    let accounted: u64 = reports
        .iter()
        .filter(|(_, r)| r["kind"] == kind)
        .map(|(_, r)| r["refusals"].as_u64().unwrap())
        .sum();
    let (before_rate, during_rate) = (
        before as f64 / before_time.as_secs_f64(),
        during as f64 / during_time.as_secs_f64(),
    );
    println!(
        "{kind} flood: {n} samples in {flood_time:.1?}; log +{log_growth} bytes; {} error messages accounting for {accounted}; \
         good frames answered {before_rate:.1}/s without the flood ({before} in {before_time:.1?}), {during_rate:.1}/s during it ({during} in {during_time:.1?})",
        reports.len()
    );
    for (_, r) in &reports {
        println!("  errors: {r}");
    }
    println!("  status: {counted}");
    assert_eq!(accounted, n, "the reports account for every refusal");
    assert!(log_growth <= 100_000, "the log grew by {log_growth} bytes");
    // At most 5 messages a second on the errors key (0.9 s as they arrive here, for
    // the jitter of loopback delivery).
    for (i, (t, _)) in reports.iter().enumerate() {
        let within = reports[i..]
            .iter()
            .filter(|(u, _)| u.duration_since(*t) < Duration::from_millis(900))
            .count();
        assert!(
            within <= 5,
            "{within} messages on the errors key within a second"
        );
    }
    assert!(
        during_rate >= 0.5 * before_rate,
        "good frames answered {during_rate:.1}/s during the flood, {before_rate:.1}/s without"
    );
}

#[test]
fn malformed_frame_flood() {
    flood("frame", "frames-in", b"PGRF not a frame at all", false);
}

#[test]
fn malformed_prompt_update_flood() {
    flood(
        "prompt_update",
        "cam/prompts",
        b"[[prompt]]\nid = 'x'\n",
        true,
    );
}
