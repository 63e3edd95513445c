//! The node as a client of a Zenoh router (the `rmw_zenoh` layout) when the router is
//! killed and started again on the same port: results, asks, prompt updates and
//! liveliness all come back without restarting the node, and the time from the router
//! being up again to the first result is reported.
use std::time::{Duration, Instant};
use zenoh::Wait;

mod common;
use common::{Router, fixture_model, free_port, router_client, start_node_logged};

/// The first sample on `sub` whose key ends with `suffix`, within `secs`.
fn next_on(
    sub: &zenoh::pubsub::Subscriber<zenoh::handlers::FifoChannelHandler<zenoh::sample::Sample>>,
    suffix: &str,
    secs: u64,
) -> Option<Instant> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while let Ok(Some(s)) = sub.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if s.key_expr().as_str().ends_with(suffix) {
            return Some(Instant::now());
        }
    }
    None
}

#[test]
fn router_restart_is_ridden_out() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model(dir.path());
    let port = free_port();
    let prefix = format!("pgrouter/{port}");
    let (router, _) = Router::start(port);
    let (_node, log) = start_node_logged(
        dir.path(),
        &format!(
            r#"
node = "routed"
prefix = "{prefix}"
allow_prompt_updates = true
status_interval_s = 0
[model]
path = "{model}"
threads = 1
[zenoh]
mode = "client"
connect = ["tcp/127.0.0.1:{port}"]
[[camera]]
name = "cam"
pipeline = "videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1"
[[camera.prompt]]
id = "scene"
task = "caption en"
max_tokens = 2
[[camera]]
name = "net"
zenoh_key = "{prefix}/frames-in"
[[camera.prompt]]
id = "scene"
task = "caption en"
max_tokens = 2
"#,
            model = model.display()
        ),
    );
    let session = router_client(port);
    let results = session
        .declare_subscriber(format!("{prefix}/*/*"))
        .wait()
        .unwrap();
    // A camera on the network: frames at 10 fps through the router, whatever it does.
    let png = std::fs::read(common::repo_root().join("tests/fixtures/images/rgb.png")).unwrap();
    let (sender, frames_key) = (session.clone(), format!("{prefix}/frames-in"));
    std::thread::spawn(move || {
        while sender.put(frames_key.as_str(), png.clone()).wait().is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    next_on(&results, "/cam/scene", 120).expect("results before the router restarts");
    next_on(&results, "/net/scene", 60).expect("network frames answered");

    // The router dies (SIGKILL), stays away for 5 s (long enough for the node's waits
    // between tries to have grown to their longest) and comes back on the same port.
    drop(router);
    std::thread::sleep(Duration::from_secs(5));
    while results.try_recv().ok().flatten().is_some() {}
    let (_router, up) = Router::start(port);
    let first = next_on(&results, "/cam/scene", 60).expect("results after the router restart");
    let gap = first.duration_since(up);
    println!(
        "router restart: first result {:.2} s after the router was up again",
        gap.as_secs_f64()
    );
    let bound = if common::emulated() { 20.0 } else { 3.0 };
    assert!(
        gap.as_secs_f64() < bound,
        "first result {gap:?} after the router was back (target under {bound} s)"
    );
    next_on(&results, "/net/scene", 60).expect("network frames answered again");

    // An ask is answered through the new router.
    let replies = session
        .get(format!("{prefix}/cam/ask"))
        .payload("caption en")
        .timeout(Duration::from_secs(60))
        .wait()
        .unwrap();
    let reply = replies
        .recv_timeout(Duration::from_secs(60))
        .unwrap()
        .expect("an ask's reply after the router restart");
    let answer: serde_json::Value =
        serde_json::from_slice(&reply.result().expect("an answer").payload().to_bytes()).unwrap();
    assert_eq!(answer["prompt"]["id"], "ask", "{answer}");

    // A prompt update reaches the node's subscriber, declared again by Zenoh.
    session
        .put(
            format!("{prefix}/cam/prompts"),
            r#"[{"id":"after","task":"caption en","max_tokens":2}]"#,
        )
        .wait()
        .unwrap();
    next_on(&results, "/cam/after", 60).expect("the updated prompt answers");

    // The node's and the camera's liveliness tokens are there again.
    let tokens: Vec<String> = session
        .liveliness()
        .get(format!("{prefix}/**"))
        .timeout(Duration::from_secs(10))
        .wait()
        .unwrap()
        .iter()
        .filter_map(|r| r.result().ok().map(|s| s.key_expr().to_string()))
        .collect();
    let node_key = prefix.clone();
    for want in [node_key.as_str(), &format!("{prefix}/cam")] {
        assert!(tokens.iter().any(|t| t == want), "{want} not in {tokens:?}");
    }
    // The loss and the return, each logged once.
    let log = std::fs::read_to_string(log).unwrap();
    for (line, times) in [
        ("zenoh: no router or peer connected any more", 1),
        ("zenoh: connected again", 1),
    ] {
        assert_eq!(log.matches(line).count(), times, "{line:?} in:\n{log}");
    }
}
