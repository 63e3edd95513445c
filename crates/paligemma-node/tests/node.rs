//! The real `paligemma-node` binary on loopback with a fixture model, a
//! videotestsrc camera and a Zenoh frame source, driven by a separate Zenoh client.
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use zenoh::Wait;

mod common;
use common::{Node, client, fixture_model, free_port, start_node};

/// Collects JSON payloads from a subscriber until `pred` matches or the deadline.
fn wait_for(
    sub: &zenoh::pubsub::Subscriber<zenoh::handlers::FifoChannelHandler<zenoh::sample::Sample>>,
    secs: u64,
    pred: impl Fn(&str, &serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Ok(Some(s)) = sub.recv_timeout(Duration::from_millis(200)) {
            // The test's own puts (frames, prompt lists) arrive here too: skip them.
            if s.key_expr().as_str().ends_with("/prompts")
                || s.key_expr().as_str().ends_with("/frames-in")
            {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&s.payload().to_bytes())
                .unwrap_or_else(|e| panic!("bad JSON on {}: {e}", s.key_expr()));
            if pred(s.key_expr().as_str(), &v) {
                return Some(v);
            }
        }
    }
    None
}

fn get(session: &zenoh::Session, key: &str, payload: Vec<u8>) -> Result<serde_json::Value, String> {
    let replies = session
        .get(key)
        .payload(payload)
        .timeout(Duration::from_secs(60))
        .wait()
        .unwrap();
    let reply = replies
        .recv_timeout(Duration::from_secs(60))
        .unwrap()
        .ok_or("no reply")?;
    match reply.result() {
        Ok(s) => Ok(serde_json::from_slice(&s.payload().to_bytes()).unwrap()),
        Err(e) => Err(e
            .payload()
            .try_to_string()
            .map(|s| s.to_string())
            .unwrap_or_default()),
    }
}

#[test]
fn node_end_to_end_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = common::repo_root().join("tests/fixtures");
    let model = fixture_model(dir.path());
    let port = free_port();
    let prefix = format!("pgtest/{port}");
    let config = dir.path().join("node.toml");
    let mut f = std::fs::File::create(&config).unwrap();
    write!(
        f,
        r#"
node = "test"
prefix = "{prefix}"
status_interval_s = 0.5
ask_timeout_ms = 30000
max_pixels = 1000000
allow_prompt_updates = true
ask_rate = 50.0
ask_burst = 20
[model]
path = "{model}"
threads = 1
[zenoh]
mode = "peer"
listen = ["tcp/127.0.0.1:{port}"]
multicast_scouting = false
[[camera]]
name = "cam"
pipeline = "videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=30/1"
[[camera.prompt]]
id = "objects"
task = "detect cat ; dog"
max_tokens = 6
[[camera.prompt]]
id = "scene"
task = "caption en"
max_tokens = 4
[[camera]]
name = "zcam"
zenoh_key = "{prefix}/frames-in"
[[camera.prompt]]
id = "text"
task = "ocr"
max_tokens = 3
"#,
        model = model.display()
    )
    .unwrap();
    drop(f);
    let child = Command::new(env!("CARGO_BIN_EXE_paligemma-node"))
        .args(["--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut node = Node(child);
    let session = client(port);
    let results = session
        .declare_subscriber(format!("{prefix}/**"))
        .wait()
        .unwrap();

    // Standing prompts on the GStreamer camera.
    for id in ["objects", "scene"] {
        let v = wait_for(&results, 60, |k, _| k == format!("{prefix}/cam/{id}"))
            .unwrap_or_else(|| panic!("no {id} result"));
        assert_eq!(v["schema"], "paligemma.result/1");
        assert_eq!(v["source"]["camera"], "cam");
        assert_eq!(v["prompt"]["id"], id);
        assert!(
            v["frame"]["width"] == 64 && v["latency_ms"]["total"].as_f64().unwrap() > 0.0,
            "{v}"
        );
        assert!(
            v["mean_logprob"].as_f64().is_some_and(|lp| lp <= 0.0) || v["tokens"]["generated"] == 0,
            "{v}"
        );
    }
    let kind =
        wait_for(&results, 30, |k, _| k.ends_with("/cam/objects")).unwrap()["result"]["kind"]
            .clone();
    assert_eq!(kind, "detections");
    // Status with drop counts: the camera runs at 30 fps, the model answers far fewer.
    let status = wait_for(&results, 10, |k, _| k.ends_with("/cam/status")).expect("status");
    println!("status: {status}");
    assert!(status["frames_seen"].as_u64().unwrap() > 0);

    // Ask on the newest frame.
    let v = get(
        &session,
        &format!("{prefix}/cam/ask"),
        b"caption en".to_vec(),
    )
    .unwrap();
    assert_eq!(v["result"]["kind"], "caption");
    let v = get(
        &session,
        &format!("{prefix}/cam/ask"),
        br#"{"prompt":"detect cat","max_tokens":3}"#.to_vec(),
    )
    .unwrap();
    assert_eq!(v["result"]["kind"], "detections");
    assert!(v["tokens"]["generated"].as_u64().unwrap() <= 3);
    // An ask's own threshold: nothing scores above 1.
    let v = get(
        &session,
        &format!("{prefix}/cam/ask"),
        br#"{"prompt":"detect cat","max_tokens":6,"min_score":1.0}"#.to_vec(),
    )
    .unwrap();
    assert_eq!(v["result"]["detections"], serde_json::json!([]), "{v}");
    let e = get(
        &session,
        &format!("{prefix}/cam/ask"),
        br#"{"prompt":"detect cat","min_score":2}"#.to_vec(),
    )
    .unwrap_err();
    assert!(
        e.contains("min_score 2: expected a number from 0 to 1"),
        "{e}"
    );
    // Bad asks are reply errors.
    let e = get(&session, &format!("{prefix}/cam/ask"), Vec::new()).unwrap_err();
    assert!(e.contains("prompt is empty"), "{e}");
    let e = get(&session, &format!("{prefix}/cam/ask"), vec![b'a'; 1 << 20]).unwrap_err();
    assert!(e.contains("longer than"), "{e}");
    let e = get(&session, &format!("{prefix}/zcam/ask"), b"ocr".to_vec()).unwrap_err();
    assert!(e.contains("no frame"), "{e}");

    // Replace the standing prompts; the new one takes effect, get returns it.
    session
        .put(
            format!("{prefix}/cam/prompts"),
            r#"[{"id":"counting","task":"answer en how many cats?","max_tokens":3}]"#,
        )
        .wait()
        .unwrap();
    wait_for(&results, 60, |k, _| k.ends_with("/cam/counting")).expect("the new prompt answers");
    let list = get(&session, &format!("{prefix}/cam/prompts"), Vec::new()).unwrap();
    assert_eq!(list["prompt"][0]["id"], "counting");
    // An update that does not parse is reported; the old prompts stay.
    session
        .put(format!("{prefix}/cam/prompts"), "[[prompt]]\nid = 'x'\n")
        .wait()
        .unwrap();
    let err = wait_for(&results, 10, |k, _| k.ends_with("/cam/errors")).expect("error message");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("keeping the current"),
        "{err}"
    );
    wait_for(&results, 60, |k, _| k.ends_with("/cam/counting")).expect("still serving");

    // Zenoh frame source: PNG works, garbage and bad raw frames are errors, serving goes on.
    let png = std::fs::read(fixtures.join("images/rgb.png")).unwrap();
    session
        .put(format!("{prefix}/frames-in"), png.clone())
        .wait()
        .unwrap();
    let v =
        wait_for(&results, 60, |k, _| k.ends_with("/zcam/text")).expect("result for a Zenoh frame");
    assert_eq!(v["frame"]["width"], 97);
    session
        .put(format!("{prefix}/frames-in"), b"not an image".to_vec())
        .wait()
        .unwrap();
    let err =
        wait_for(&results, 10, |k, _| k.ends_with("/zcam/errors")).expect("error for garbage");
    assert!(
        err["message"].as_str().unwrap().contains("cannot decode"),
        "{err}"
    );
    let mut raw = b"PGRF".to_vec();
    for v in [8u32, 8, 24] {
        raw.extend(v.to_le_bytes());
    }
    raw.extend(vec![0u8; 50]);
    session
        .put(format!("{prefix}/frames-in"), raw)
        .wait()
        .unwrap();
    let err = wait_for(&results, 10, |k, _| k.ends_with("/zcam/errors"))
        .expect("error for a short raw frame");
    assert!(err["message"].as_str().unwrap().contains("needs"), "{err}");
    // A raw frame described by an attachment.
    let mut pixels = Vec::new();
    for i in 0..(32 * 16) {
        pixels.extend([(i % 255) as u8, 100, 200]);
    }
    session
        .put(format!("{prefix}/frames-in"), pixels)
        .attachment(r#"{"width":32,"height":16,"format":"rgb8"}"#)
        .wait()
        .unwrap();
    let v = wait_for(&results, 60, |k, v| {
        k.ends_with("/zcam/text") && v["frame"]["width"] == 32
    })
    .expect("raw frame result");
    assert_eq!(v["frame"]["height"], 16);
    wait_for(&results, 60, |k, _| k.ends_with("/cam/counting"))
        .expect("the camera is still served");

    // Hostile frames: a stride whose arithmetic wraps (it used to kill the subscriber
    // task for good) and an image over max_pixels, refused from its header. Each is an
    // error message, counted in status, and the camera analyses the next frame.
    session
        .put(format!("{prefix}/frames-in"), vec![0u8; 9])
        .attachment(r#"{"width":1,"height":3,"stride":9223372036854775808}"#)
        .wait()
        .unwrap();
    let err = wait_for(&results, 10, |k, _| k.ends_with("/zcam/errors"))
        .expect("error for a wrapping stride");
    assert!(
        err["message"].as_str().unwrap().contains("more than 2^64"),
        "{err}"
    );
    let mut big = Vec::new();
    image::GrayImage::new(2000, 1000)
        .write_to(&mut std::io::Cursor::new(&mut big), image::ImageFormat::Png)
        .unwrap();
    session
        .put(format!("{prefix}/frames-in"), big)
        .wait()
        .unwrap();
    let err = wait_for(&results, 10, |k, _| k.ends_with("/zcam/errors"))
        .expect("error for a frame over max_pixels");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("2000x1000 is larger than the limit of 1000000 pixels"),
        "{err}"
    );
    session
        .put(format!("{prefix}/frames-in"), png.clone())
        .wait()
        .unwrap();
    wait_for(&results, 60, |k, v| {
        k.ends_with("/zcam/text") && v["frame"]["width"] == 97
    })
    .expect("the Zenoh camera still analyses frames");
    let status = wait_for(&results, 10, |k, v| {
        k.ends_with("/zcam/status") && v["errors"].as_u64().unwrap() >= 4
    })
    .expect("errors counted in status");
    println!("zcam status: {status}");

    // Prompt ids that are the node's own keys are refused.
    for id in ["status", "prompts", "errors", "ask"] {
        session
            .put(
                format!("{prefix}/cam/prompts"),
                format!(r#"[{{"id":"{id}","task":"caption en"}}]"#),
            )
            .wait()
            .unwrap();
        let err = wait_for(&results, 10, |k, _| k.ends_with("/cam/errors"))
            .expect("error for a reserved id");
        assert!(
            err["message"].as_str().unwrap().contains("is reserved"),
            "{id}: {err}"
        );
    }
    wait_for(&results, 60, |k, _| k.ends_with("/cam/counting")).expect("the old prompts stay");

    // Liveliness of the node and cameras.
    let alive = session
        .liveliness()
        .get(format!("{prefix}/**"))
        .timeout(Duration::from_secs(5))
        .wait()
        .unwrap();
    let mut keys = Vec::new();
    while let Ok(Some(r)) = alive.recv_timeout(Duration::from_secs(5)) {
        if let Ok(s) = r.result() {
            keys.push(s.key_expr().to_string());
        }
    }
    keys.sort();
    assert_eq!(
        keys,
        [
            prefix.clone(),
            format!("{prefix}/cam"),
            format!("{prefix}/zcam")
        ]
    );

    // Clean shutdown on SIGTERM.
    let t = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &node.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(s) = node.0.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "node did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    println!("SIGTERM to exit: {:?}", t.elapsed());
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[model]\npath = \"x.gguf\"\n[[camera]]\nname = \"a\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_paligemma-node"))
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "exactly one of pipeline, uri, zenoh_key, ros2_image or ros2_compressed_image"
        ),
        "{err}"
    );
    std::fs::write(
        &config,
        "[model]\npath = \"x.gguf\"\n[[camera]]\nname = \"a\"\nros2_image = \"/cam/image_raw\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_paligemma-node"))
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("ROS 2 is off: add a [ros2] section"),
        "{err}"
    );
    std::fs::write(&config, "[model]\npath = \"x.gguf\"\ncolour = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_paligemma-node"))
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"));
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The safe defaults: prompt updates are refused unless enabled, and a flood of asks
/// gets "busy" replies while the standing prompts keep their rate and memory stays flat.
/// Under emulation, where an answer costs 10-50 times more, the node admits 1 ask a
/// second instead of 5 (at 5 the admitted asks alone fill the emulated engine).
#[test]
fn prompt_updates_off_and_ask_flood() {
    let (ask_rate, ask_burst) = if common::emulated() { (1, 1) } else { (5, 5) };
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model(dir.path());
    let port = free_port();
    let prefix = format!("pgflood/{port}");
    let node = start_node(
        dir.path(),
        &format!(
            r#"
node = "flood"
prefix = "{prefix}"
status_interval_s = 0.5
ask_rate = {ask_rate}.0
ask_burst = {ask_burst}
[model]
path = "{model}"
threads = 1
[zenoh]
listen = ["tcp/127.0.0.1:{port}"]
[[camera]]
name = "cam"
pipeline = "videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=30/1"
[[camera.prompt]]
id = "scene"
task = "caption en"
every_ms = 500
max_tokens = 4
"#,
            model = model.display()
        ),
    );
    let session = client(port);
    let results = session
        .declare_subscriber(format!("{prefix}/**"))
        .wait()
        .unwrap();
    wait_for(&results, 60, |k, _| k.ends_with("/cam/scene")).expect("the standing prompt answers");

    // Prompt updates are off by default: the put is refused and reported.
    session
        .put(
            format!("{prefix}/cam/prompts"),
            r#"[{"id":"other","task":"ocr"}]"#,
        )
        .wait()
        .unwrap();
    let err = wait_for(&results, 10, |k, _| k.ends_with("/cam/errors")).expect("refusal reported");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("allow_prompt_updates"),
        "{err}"
    );
    assert_eq!(
        get(&session, &format!("{prefix}/cam/prompts"), Vec::new()).unwrap()["prompt"][0]["id"],
        "scene"
    );

    // Hundreds of asks per second for three seconds.
    let rss_before = rss_kb(node.0.id());
    let start = Instant::now();
    let mut pending = Vec::new();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(3) {
        for _ in 0..10 {
            pending.push(
                session
                    .get(format!("{prefix}/cam/ask"))
                    .payload("caption en")
                    .timeout(Duration::from_secs(30))
                    .wait()
                    .unwrap(),
            );
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Meanwhile the standing prompt keeps its rate (every 500 ms).
    let mut scene = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(s)) = results.recv_timeout(Duration::from_millis(100))
            && s.key_expr().as_str().ends_with("/cam/scene")
        {
            scene += 1;
        }
    }
    let (mut answered, mut busy) = (0, 0);
    for replies in pending {
        if let Ok(Some(r)) = replies.recv_timeout(Duration::from_secs(30)) {
            match r.result() {
                Ok(_) => answered += 1,
                Err(e)
                    if e.payload()
                        .try_to_string()
                        .is_ok_and(|t| t.contains("busy")) =>
                {
                    busy += 1
                }
                Err(_) => {}
            }
        }
    }
    let rss_after = rss_kb(node.0.id());
    println!(
        "{sent} asks: {answered} answered, {busy} busy; {scene} standing answers in 3 s; RSS {rss_before} -> {rss_after} kB"
    );
    assert!(sent >= 300, "{sent} asks sent");
    assert!(
        answered <= ask_burst + ask_rate * 4 + 5,
        "at most the burst plus the rate: {answered} answered"
    );
    assert!(busy >= sent - answered - 5, "the rest are busy: {busy}");
    assert!(
        scene >= 3,
        "the standing prompt kept about its rate: {scene} answers in 3 s"
    );
    assert!(
        rss_after < rss_before + 30_000,
        "memory flat: {rss_before} -> {rss_after} kB"
    );
    let status = wait_for(&results, 10, |k, v| {
        k.ends_with("/cam/status") && v["requests_refused"].as_u64().unwrap_or(0) > 0
    })
    .expect("refusals counted in status");
    assert!(
        status["requests_refused"].as_u64().unwrap() >= busy as u64,
        "{status}"
    );
}

/// With `[ros2]` on, each standing prompt's results are ROS 2 samples on the
/// `rmw_zenoh` keys (CDR, attachment) and the node and its publishers are on the graph.
#[test]
fn ros2_publications_on_rmw_zenoh_keys() {
    use paligemma_ros2::{keys, msgs, type_hash::rihs01};
    let dir = tempfile::tempdir().unwrap();
    // The bundled demo model finds the ball of videotestsrc's "ball" pattern.
    let model = common::repo_root().join("models/demo/paligemma2-demo-f16.gguf");
    // As on a ROS 2 robot: a router (rmw_zenohd's role) and the node as its client; the
    // test's session, like `ros2 topic echo`, reaches the node only through the router.
    let port = free_port();
    let mut router = zenoh::Config::default();
    router.insert_json5("mode", "\"router\"").unwrap();
    router
        .insert_json5("listen/endpoints", &format!("[\"tcp/127.0.0.1:{port}\"]"))
        .unwrap();
    router
        .insert_json5("scouting/multicast/enabled", "false")
        .unwrap();
    let _router = zenoh::open(router).wait().unwrap();
    let _node = start_node(
        dir.path(),
        &format!(
            r#"
node = "rostest{port}"
status_interval_s = 0
[model]
path = "{model}"
threads = 1
[zenoh]
mode = "client"
connect = ["tcp/127.0.0.1:{port}"]
[ros2]
enabled = true
domain_id = 3
namespace = "/robot1"
[[camera]]
name = "front-cam"
frame_id = "front_camera"
pipeline = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=10/1"
[[camera.prompt]]
id = "objects"
task = "detect ball"
max_tokens = 12
[[camera.prompt]]
id = "scene"
task = "caption en"
max_tokens = 4
[[camera]]
name = "rcam"
ros2_image = "/robot1/arm/image_raw"
[[camera.prompt]]
id = "text"
task = "ocr"
max_tokens = 3
[[camera]]
name = "ccam"
ros2_compressed_image = "/robot1/arm/image_raw/compressed"
[[camera.prompt]]
id = "text"
task = "ocr"
max_tokens = 3
"#,
            model = model.display()
        ),
    );
    let session = client(port);
    let detections_key = format!(
        "3/robot1/paligemma/front_cam/objects/vision_msgs::msg::dds_::Detection2DArray_/{}",
        rihs01("vision_msgs/msg/Detection2DArray").unwrap()
    );
    let text_key = format!(
        "3/robot1/paligemma/front_cam/scene/std_msgs::msg::dds_::String_/{}",
        rihs01("std_msgs/msg/String").unwrap()
    );
    let detections = session
        .declare_subscriber(detections_key.as_str())
        .wait()
        .unwrap();
    let own = session
        .declare_subscriber("**/front-cam/objects")
        .wait()
        .unwrap();
    let texts = session
        .declare_subscriber(text_key.as_str())
        .wait()
        .unwrap();

    let (mut sequences, mut found, mut track_ids) =
        (Vec::new(), 0, std::collections::BTreeSet::new());
    for _ in 0..3 {
        let sample = detections
            .recv_timeout(Duration::from_secs(60))
            .unwrap()
            .expect("a Detection2DArray sample");
        let array: msgs::Detection2DArray =
            msgs::from_cdr(&sample.payload().to_bytes(), 1 << 20).unwrap();
        println!("{}: {array:?}", sample.key_expr());
        assert_eq!(array.header.frame_id, "front_camera");
        assert!(
            array.header.stamp.sec > 1_700_000_000,
            "the frame's capture time: {:?}",
            array.header.stamp
        );
        for d in &array.detections {
            // The ball is tracked: its id is its track id, the same over the frames.
            assert!(
                d.results[0].hypothesis.class_id == "ball" && d.id.parse::<u64>().is_ok(),
                "{d:?}"
            );
            track_ids.insert(d.id.clone());
            assert!(
                d.results[0].hypothesis.score > 0.0 && d.results[0].hypothesis.score <= 1.0,
                "{d:?}"
            );
            let (b, c) = (&d.bbox, &d.bbox.center.position);
            assert!(
                b.size_x > 0.0
                    && b.size_y > 0.0
                    && c.x > 0.0
                    && c.x < 320.0
                    && c.y > 0.0
                    && c.y < 240.0,
                "{d:?}"
            );
            found += 1;
        }
        let (sequence, _, _) =
            keys::parse_attachment(&sample.attachment().expect("an attachment").to_bytes())
                .unwrap();
        sequences.push(sequence);
    }
    // Numbered from 1 per publisher, one by one (the first may have gone before we subscribed).
    assert!(
        sequences[0] >= 1 && sequences.windows(2).all(|w| w[1] == w[0] + 1),
        "{sequences:?}"
    );
    assert!(found > 0, "the demo model finds the ball");
    assert_eq!(track_ids.len(), 1, "one ball, one track id: {track_ids:?}");
    // The node's own result messages carry the same track id.
    let sample = own
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("a result message");
    let v: serde_json::Value = serde_json::from_slice(&sample.payload().to_bytes()).unwrap();
    let ids: Vec<String> = v["result"]["detections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["track_id"].to_string())
        .collect();
    assert!(
        !ids.is_empty() && ids.iter().all(|id| track_ids.contains(id)),
        "{v}"
    );
    let sample = texts
        .recv_timeout(Duration::from_secs(60))
        .unwrap()
        .expect("a String sample");
    let text: msgs::StringMsg = msgs::from_cdr(&sample.payload().to_bytes(), 1 << 20).unwrap();
    println!("{}: {text:?}", sample.key_expr());

    // The graph: the node and its two publishers.
    let tokens = session
        .liveliness()
        .get("@ros2_lv/3/**")
        .timeout(Duration::from_secs(5))
        .wait()
        .unwrap();
    let mut keys_seen = Vec::new();
    while let Ok(Some(r)) = tokens.recv_timeout(Duration::from_secs(5)) {
        if let Ok(s) = r.result() {
            keys_seen.push(s.key_expr().to_string());
        }
    }
    assert!(
        keys_seen
            .iter()
            .any(|k| k.ends_with("/NN/%/%robot1/paligemma")),
        "{keys_seen:?}"
    );
    let publisher =
        keys_seen.iter().find(|k| k.contains("/MP/%/%robot1/paligemma/%robot1%paligemma%front_cam%objects/vision_msgs::msg::dds_::Detection2DArray_/RIHS01_"));
    assert!(
        publisher.is_some_and(|k| k.ends_with("/::,10:,:,:,,")),
        "{keys_seen:?}"
    );
    assert!(
        keys_seen
            .iter()
            .any(|k| k.contains("%front_cam%scene/std_msgs::msg::dds_::String_/")),
        "{keys_seen:?}"
    );
    assert!(
        keys_seen.iter().any(|k| k.contains(
            "/MS/%/%robot1/paligemma/%robot1%arm%image_raw/sensor_msgs::msg::dds_::Image_/"
        )),
        "{keys_seen:?}"
    );
    ros2_images_in(&session, &format!("paligemma/rostest{port}"));
}

/// ROS 2 images as frame sources: raw and compressed samples are analysed with their
/// header's stamp and frame_id; bad ones are errors and the camera goes on.
fn ros2_images_in(session: &zenoh::Session, prefix: &str) {
    use paligemma_ros2::{keys, msgs, type_hash::rihs01};
    let results = session
        .declare_subscriber(format!("{prefix}/**"))
        .wait()
        .unwrap();
    let header = msgs::Header {
        stamp: msgs::Time {
            sec: 1_700_000_123,
            nanosec: 45,
        },
        frame_id: "arm_camera".into(),
    };
    let png = std::fs::read(common::repo_root().join("tests/fixtures/images/rgb.png")).unwrap();
    let rgb = image::load_from_memory(&png).unwrap().to_rgb8();
    let (w, h) = rgb.dimensions();
    let raw = |encoding: &str, step: u32, data: Vec<u8>| {
        msgs::to_cdr(&msgs::Image {
            header: header.clone(),
            height: h,
            width: w,
            encoding: encoding.into(),
            is_bigendian: 0,
            step,
            data,
        })
    };
    let image_key = format!(
        "3/robot1/arm/image_raw/sensor_msgs::msg::dds_::Image_/{}",
        rihs01("sensor_msgs/msg/Image").unwrap()
    );
    let compressed_key = format!(
        "3/robot1/arm/image_raw/compressed/sensor_msgs::msg::dds_::CompressedImage_/{}",
        rihs01("sensor_msgs/msg/CompressedImage").unwrap()
    );
    let put = |key: &str, payload: Vec<u8>| {
        session
            .put(key, payload)
            .attachment(keys::attachment(1, 0, &[7; 16]))
            .wait()
            .unwrap()
    };

    // Bad samples first: each is an error message, the camera keeps serving.
    for (bad, why) in [
        (
            raw("rgb8", w * 3, rgb.as_raw().clone())[..40].to_vec(),
            "not a valid CDR message",
        ),
        (
            raw("yuv422", w * 2, vec![0; (w * h * 2) as usize]),
            "image encoding \"yuv422\"",
        ),
        (raw("rgb8", w * 3, vec![0; 10]), "needs"),
        (
            msgs::to_cdr(&msgs::Image {
                header: header.clone(),
                height: 100_000,
                width: 100_000,
                encoding: "mono8".into(),
                step: 100_000,
                ..Default::default()
            }),
            "larger than the limit",
        ),
    ] {
        put(&image_key, bad);
        let err =
            wait_for(&results, 10, |k, _| k.ends_with("/rcam/errors")).expect("an error message");
        assert!(
            err["message"].as_str().unwrap().contains(why),
            "{why}: {err}"
        );
    }
    put(&image_key, raw("rgb8", w * 3, rgb.as_raw().clone()));
    let v = wait_for(&results, 60, |k, _| k.ends_with("/rcam/text"))
        .expect("the raw ROS 2 image is analysed");
    assert_eq!(
        (
            v["frame"]["width"].as_u64(),
            v["frame"]["frame_id"].as_str()
        ),
        (Some(w as u64), Some("arm_camera"))
    );
    assert_eq!(
        v["frame"]["capture_unix_ns"].as_u64(),
        Some(1_700_000_123_000_000_045)
    );
    put(
        &compressed_key,
        msgs::to_cdr(&msgs::CompressedImage {
            header: header.clone(),
            format: "png".into(),
            data: png,
        }),
    );
    let v = wait_for(&results, 60, |k, _| k.ends_with("/ccam/text"))
        .expect("the compressed ROS 2 image is analysed");
    assert_eq!(v["frame"]["frame_id"], "arm_camera");
}

/// Prompt updates survive a restart (the state file beside the configuration), and a
/// corrupt state file is reported while the configuration's prompts apply.
#[test]
fn updated_prompts_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model(dir.path());
    let port = free_port();
    let prefix = format!("pgstate/{port}");
    let config = format!(
        r#"
node = "state"
prefix = "{prefix}"
allow_prompt_updates = true
[model]
path = "{model}"
threads = 1
[zenoh]
listen = ["tcp/127.0.0.1:{port}"]
[[camera]]
name = "cam"
pipeline = "videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1"
[[camera.prompt]]
id = "scene"
task = "caption en"
max_tokens = 3
"#,
        model = model.display()
    );
    let stop = |node: common::Node| {
        assert!(
            Command::new("kill")
                .args(["-TERM", &node.0.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
        drop(node); // waits for it
    };
    let prompt_ids = |session: &zenoh::Session| {
        let list = get(session, &format!("{prefix}/cam/prompts"), Vec::new()).unwrap();
        list["prompt"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };

    let node = start_node(dir.path(), &config);
    let session = client(port);
    let results = session
        .declare_subscriber(format!("{prefix}/cam/*"))
        .wait()
        .unwrap();
    wait_for(&results, 60, |k, _| k.ends_with("/cam/scene"))
        .expect("the configured prompt answers");
    session
        .put(
            format!("{prefix}/cam/prompts"),
            r#"[{"id":"counting","task":"answer en how many cats?","max_tokens":3}]"#,
        )
        .wait()
        .unwrap();
    wait_for(&results, 60, |k, _| k.ends_with("/cam/counting")).expect("the new prompt answers");
    stop(node);
    let state = dir.path().join("node.state.json");
    assert!(
        std::fs::read_to_string(&state)
            .unwrap()
            .contains("how many cats"),
        "the update is saved"
    );

    // Restarted: the updated prompts, not the configuration's.
    let (node, log) = common::start_node_logged(dir.path(), &config);
    wait_for(&results, 60, |k, _| k.ends_with("/cam/counting"))
        .expect("the restored prompt answers");
    assert_eq!(prompt_ids(&session), ["counting"]);
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("standing prompts [\"counting\"] restored from")
    );
    stop(node);

    // A corrupt state file: reported, and the configuration's prompts apply.
    std::fs::write(&state, b"{\"schema\": \"paligemma.state/1\", \"cam").unwrap();
    let (_node, log) = common::start_node_logged(dir.path(), &config);
    wait_for(&results, 60, |k, _| k.ends_with("/cam/scene"))
        .expect("the configured prompt answers again");
    assert_eq!(prompt_ids(&session), ["scene"]);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("node.state.json: ignored, the configuration's prompts apply"),
        "{log}"
    );
}
