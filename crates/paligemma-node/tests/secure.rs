//! The node behind mutual TLS and access control, with the shipped
//! `configs/zenoh-secure.json5` and certificates made at test time (never committed):
//! who cannot connect, who may watch and ask, who may steer, who may feed frames.
use paligemma_ros2::{keys, msgs, type_hash::rihs01};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use zenoh::Wait;

mod common;
use common::{Node, fixture_model, free_port};

/// A CA, the node's certificate (for 127.0.0.1) and one per client common name, as
/// the secure configuration expects them under `certs/`.
fn make_certificates(dir: &Path) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "paligemma test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(certs.join("ca.pem"), ca.pem()).unwrap();
    for (name, names) in [
        ("node", vec!["127.0.0.1".to_string(), "localhost".into()]),
        ("viewer", vec![]),
        ("operator", vec![]),
        ("camera", vec![]),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(certs.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(certs.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// A client session to the node; with `who`, presenting that certificate.
fn client(dir: &Path, port: u16, who: Option<&str>) -> zenoh::Result<zenoh::Session> {
    let certs = dir.join("certs");
    let path = |f: &str| format!("{:?}", certs.join(f).display().to_string());
    let mut c = zenoh::Config::default();
    c.insert_json5("mode", "\"client\"").unwrap();
    c.insert_json5("connect/endpoints", &format!("[\"tls/127.0.0.1:{port}\"]"))
        .unwrap();
    c.insert_json5("scouting/multicast/enabled", "false")
        .unwrap();
    c.insert_json5("transport/link/tls/root_ca_certificate", &path("ca.pem"))
        .unwrap();
    if let Some(name) = who {
        c.insert_json5("transport/link/tls/enable_mtls", "true")
            .unwrap();
        c.insert_json5(
            "transport/link/tls/connect_certificate",
            &path(&format!("{name}.pem")),
        )
        .unwrap();
        c.insert_json5(
            "transport/link/tls/connect_private_key",
            &path(&format!("{name}.key")),
        )
        .unwrap();
    }
    zenoh::open(c).wait()
}

type Subscriber =
    zenoh::pubsub::Subscriber<zenoh::handlers::FifoChannelHandler<zenoh::sample::Sample>>;

fn wait_for(sub: &Subscriber, secs: u64, key_suffix: &str) -> Option<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Ok(Some(s)) = sub.recv_timeout(Duration::from_millis(200))
            && s.key_expr().as_str().ends_with(key_suffix)
        {
            return serde_json::from_slice(&s.payload().to_bytes()).ok();
        }
    }
    None
}

fn prompt_ids(session: &zenoh::Session, key: &str) -> Vec<String> {
    let replies = session
        .get(key)
        .timeout(Duration::from_secs(10))
        .wait()
        .unwrap();
    let reply = replies
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("a reply");
    let v: serde_json::Value =
        serde_json::from_slice(&reply.result().expect("prompts").payload().to_bytes()).unwrap();
    v["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn mutual_tls_and_access_control() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::repo_root();
    let model = fixture_model(dir.path());
    make_certificates(dir.path());
    let port = free_port();
    let prefix = "paligemma/secure";
    std::fs::write(
        dir.path().join("node.toml"),
        format!(
            r#"
node = "secure"
status_interval_s = 0
allow_prompt_updates = true
[model]
path = "{model}"
threads = 1
[zenoh]
config = "{secure}"
listen = ["tls/127.0.0.1:{port}"]
[ros2]
enabled = true
[[camera]]
name = "cam"
pipeline = "videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1"
[[camera.prompt]]
id = "scene"
task = "caption en"
max_tokens = 3
[[camera]]
name = "zcam"
zenoh_key = "cameras/zcam"
[[camera.prompt]]
id = "text"
task = "ocr"
max_tokens = 3
[[camera]]
name = "rcam"
ros2_image = "/arm/image_raw"
[[camera.prompt]]
id = "text"
task = "ocr"
max_tokens = 3
"#,
            model = model.display(),
            secure = root.join("configs/zenoh-secure.json5").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("node.log");
    let child = Command::new(env!("CARGO_BIN_EXE_paligemma-node"))
        .args(["--config", "node.toml"])
        .current_dir(dir.path())
        .env(
            "RUST_LOG",
            "info,zenoh::net::routing::interceptor::access_control=trace",
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _node = Node(child);

    // The viewer connects (retrying while the node starts), watches and asks.
    let deadline = Instant::now() + Duration::from_secs(30);
    let viewer = loop {
        match client(dir.path(), port, Some("viewer")) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("the viewer cannot connect: {e}"),
        }
    };
    let results = viewer
        .declare_subscriber(format!("{prefix}/**"))
        .wait()
        .unwrap();
    let scene = wait_for(&results, 60, "/cam/scene").expect("the viewer receives results");
    assert_eq!(scene["schema"], "paligemma.result/1");
    let replies = viewer
        .get(format!("{prefix}/cam/ask"))
        .payload("caption en")
        .timeout(Duration::from_secs(30))
        .wait()
        .unwrap();
    let reply = replies
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("an answer to the viewer's ask");
    assert!(reply.result().is_ok(), "the viewer may ask");

    // A peer without a certificate cannot even connect.
    assert!(
        client(dir.path(), port, None).is_err(),
        "a client without a certificate connected"
    );

    // The viewer may not steer: its put is dropped by the node's access control.
    viewer
        .put(
            format!("{prefix}/cam/prompts"),
            r#"[{"id":"hijack","task":"ocr"}]"#,
        )
        .wait()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        prompt_ids(&viewer, &format!("{prefix}/cam/prompts")),
        ["scene"]
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("unauthorized") && l.contains("prompts")),
        "the refusal is logged:\n{logged}"
    );

    // The operator may.
    let operator = client(dir.path(), port, Some("operator")).expect("the operator connects");
    operator
        .put(
            format!("{prefix}/cam/prompts"),
            r#"[{"id":"steered","task":"ocr","max_tokens":3}]"#,
        )
        .wait()
        .unwrap();
    wait_for(&results, 60, "/cam/steered").expect("the operator's prompt answers");

    // Frames on the Zenoh camera: the viewer's are ignored, the camera's analysed.
    let png = std::fs::read(root.join("tests/fixtures/images/rgb.png")).unwrap();
    viewer.put("cameras/zcam", png.clone()).wait().unwrap();
    assert!(
        wait_for(&results, 5, "/zcam/text").is_none(),
        "a frame from the viewer was analysed"
    );
    let camera = client(dir.path(), port, Some("camera")).expect("the camera connects");
    camera.put("cameras/zcam", png.clone()).wait().unwrap();
    let v = wait_for(&results, 60, "/zcam/text").expect("the camera's frame is analysed");
    assert_eq!(v["frame"]["width"], 97);

    // ROS 2 on domain 0: the viewer receives the String samples and sees the graph;
    // images come from the camera only.
    let ros_results = viewer
        .declare_subscriber("0/paligemma/cam/steered/**")
        .wait()
        .unwrap();
    let sample = ros_results
        .recv_timeout(Duration::from_secs(60))
        .unwrap()
        .expect("the viewer receives ROS 2 samples");
    let text: msgs::StringMsg = msgs::from_cdr(&sample.payload().to_bytes(), 1 << 20).unwrap();
    println!("{}: {text:?}", sample.key_expr());
    let tokens = viewer
        .liveliness()
        .get("@ros2_lv/0/**")
        .timeout(Duration::from_secs(5))
        .wait()
        .unwrap();
    let node_token =
        std::iter::from_fn(|| tokens.recv_timeout(Duration::from_secs(5)).ok().flatten())
            .filter_map(|r| r.result().ok().map(|s| s.key_expr().to_string()))
            .find(|k| k.ends_with("/NN/%/%/paligemma"));
    assert!(node_token.is_some(), "the viewer sees the ROS 2 node");
    let rgb = image::load_from_memory(&png).unwrap().to_rgb8();
    let (w, h) = rgb.dimensions();
    let header = msgs::Header {
        stamp: msgs::Time {
            sec: 1_700_000_000,
            nanosec: 0,
        },
        frame_id: "arm".into(),
    };
    let frame = msgs::to_cdr(&msgs::Image {
        header,
        height: h,
        width: w,
        encoding: "rgb8".into(),
        is_bigendian: 0,
        step: w * 3,
        data: rgb.into_raw(),
    });
    let image_key = format!(
        "0/arm/image_raw/sensor_msgs::msg::dds_::Image_/{}",
        rihs01("sensor_msgs/msg/Image").unwrap()
    );
    viewer
        .put(&image_key, frame.clone())
        .attachment(keys::attachment(1, 0, &[1; 16]))
        .wait()
        .unwrap();
    assert!(
        wait_for(&results, 5, "/rcam/text").is_none(),
        "a ROS 2 image from the viewer was analysed"
    );
    camera
        .put(&image_key, frame)
        .attachment(keys::attachment(1, 0, &[2; 16]))
        .wait()
        .unwrap();
    let v = wait_for(&results, 60, "/rcam/text").expect("the camera's ROS 2 image is analysed");
    assert_eq!(v["frame"]["frame_id"], "arm");
}

/// Two members of a pool behind the same mutual TLS and access control, the second
/// connecting to the first with its node certificate: they find each other, share the
/// cameras fed by a camera client, and when one is killed the other answers its
/// cameras; a viewer watches it all through the first.
#[test]
fn a_pool_behind_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::repo_root();
    let model = fixture_model(dir.path());
    make_certificates(dir.path());
    let ports = [free_port(), free_port()];
    let prefix = "paligemma/site";
    let start = |node: &str, listen: u16, connect: Option<u16>| {
        let mut toml = format!(
            r#"
node = "{node}"
pool = "site"
pool_settle_ms = 300
status_interval_s = 0
[model]
path = "{model}"
threads = 1
[zenoh]
config = "{secure}"
listen = ["tls/127.0.0.1:{listen}"]
connect = [{connect}]
"#,
            model = model.display(),
            secure = root.join("configs/zenoh-secure.json5").display(),
            connect = connect.map_or(String::new(), |p| format!("\"tls/127.0.0.1:{p}\"")),
        );
        for c in 0..4 {
            toml += &format!(
                "[[camera]]\nname = \"z{c}\"\nzenoh_key = \"cameras/z{c}\"\n[[camera.prompt]]\nid = \"scene\"\ntask = \"caption en\"\nmax_tokens = 2\n"
            );
        }
        let config = dir.path().join(format!("{node}.toml"));
        std::fs::write(&config, toml).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_paligemma-node"))
            .args(["--config", config.to_str().unwrap()])
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Node(child)
    };
    let _a = start("a", ports[0], None);
    let deadline = Instant::now() + Duration::from_secs(30);
    let viewer = loop {
        match client(dir.path(), ports[0], Some("viewer")) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("the viewer cannot connect: {e}"),
        }
    };
    let mut b = start("b", ports[1], Some(ports[0]));
    let status = |members: usize| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let replies: Vec<serde_json::Value> = viewer
                .get(format!("{prefix}/@pool/status"))
                .consolidation(zenoh::query::ConsolidationMode::None)
                .timeout(Duration::from_secs(5))
                .wait()
                .unwrap()
                .iter()
                .filter_map(|r| serde_json::from_slice(&r.result().ok()?.payload().to_bytes()).ok())
                .collect();
            // Every member sees them all and has applied the rule to them alike.
            if replies.len() == members
                && replies.iter().all(|r| {
                    r["members"].as_array().unwrap().len() == members
                        && r["cameras"] == replies[0]["cameras"]
                        && r["cameras"].as_object().is_some_and(|c| c.len() == 4)
                })
            {
                return replies[0]["cameras"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "the pool did not form: {replies:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let owners = status(2);
    println!("behind mutual TLS: {owners}");
    let of_b: Vec<String> = owners
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, o)| *o == "b")
        .map(|(c, _)| c.clone())
        .collect();
    assert!(!of_b.is_empty(), "b serves some of the 4 cameras: {owners}");

    let results = viewer
        .declare_subscriber(format!("{prefix}/*/scene"))
        .wait()
        .unwrap();
    let camera = client(dir.path(), ports[0], Some("camera")).expect("the camera connects");
    let png = std::fs::read(root.join("tests/fixtures/images/rgb.png")).unwrap();
    let feed = || {
        for c in 0..4 {
            camera
                .put(format!("cameras/z{c}"), png.clone())
                .wait()
                .unwrap();
        }
    };
    // Every camera answered, b's through a's links.
    let answered_by = |secs: u64| {
        let mut by = std::collections::BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while by.len() < 4 && Instant::now() < deadline {
            feed();
            while let Ok(Some(s)) = results.recv_timeout(Duration::from_millis(100)) {
                let v: serde_json::Value = serde_json::from_slice(&s.payload().to_bytes()).unwrap();
                by.insert(
                    v["source"]["camera"].as_str().unwrap().to_string(),
                    v["source"]["node"].as_str().unwrap().to_string(),
                );
            }
        }
        by
    };
    let before = answered_by(60);
    assert_eq!(
        serde_json::to_value(&before).unwrap(),
        owners,
        "each by its member"
    );

    // b is killed: a answers its cameras.
    b.0.kill().unwrap();
    let killed = Instant::now();
    let _ = status(1);
    while results.try_recv().ok().flatten().is_some() {}
    let after = answered_by(60);
    println!("b killed: {after:?} after {:.2?}", killed.elapsed());
    assert!(
        after.len() == 4 && after.values().all(|n| n == "a"),
        "{after:?}"
    );
}
