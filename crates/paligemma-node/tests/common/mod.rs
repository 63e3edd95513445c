//! What the node's tests share: the fixture model, a free port, the node process.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use zenoh::Wait;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The fixture model converted into `dir`.
pub fn fixture_model(dir: &Path) -> PathBuf {
    let model = dir.join("pg2.gguf");
    paligemma::convert::convert(
        &repo_root().join("tests/fixtures/pg2_gqa/hf"),
        &model,
        &Default::default(),
        |_| {},
    )
    .unwrap();
    model
}

/// A Zenoh peer connected to the node on loopback only.
pub fn client(port: u16) -> zenoh::Session {
    use zenoh::Wait;
    let mut c = zenoh::Config::default();
    c.insert_json5("mode", "\"peer\"").unwrap();
    c.insert_json5("connect/endpoints", &format!("[\"tcp/127.0.0.1:{port}\"]"))
        .unwrap();
    c.insert_json5("listen/endpoints", "[]").unwrap();
    c.insert_json5("scouting/multicast/enabled", "false")
        .unwrap();
    zenoh::open(c).wait().unwrap()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The node process, killed when the test ends however it ends.
pub struct Node(pub Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `toml` as `dir/node.toml` and starts the node on it.
pub fn start_node(dir: &Path, toml: &str) -> Node {
    spawn_node(dir, toml, std::process::Stdio::inherit())
}

/// The same with the node's log (stderr) written to `dir/node.log`.
pub fn start_node_logged(dir: &Path, toml: &str) -> (Node, PathBuf) {
    let log = dir.join("node.log");
    (
        spawn_node(dir, toml, std::fs::File::create(&log).unwrap().into()),
        log,
    )
}

fn spawn_node(dir: &Path, toml: &str, stderr: std::process::Stdio) -> Node {
    let config = dir.join("node.toml");
    std::fs::write(&config, toml).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_paligemma-node"))
        .args(["--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    Node(child)
}

/// Whether the tests run under emulation (`scripts/arm64-check.sh` sets it), where the
/// floods and loads of some tests are scaled down.
pub fn emulated() -> bool {
    std::env::var_os("PALIGEMMA_EMULATED").is_some()
}

const ROUTER_PORT: &str = "PALIGEMMA_TEST_ROUTER_PORT";

/// Not a test: the body of the router process that [`Router::start`] runs (this test
/// executable again, with the port in the environment), so that the router can be
/// killed like a real `zenohd` or `rmw_zenohd` rather than closed politely.
#[test]
#[ignore = "the body of the router process Router::start runs"]
fn zenoh_router_process() {
    let Some(port) = std::env::var_os(ROUTER_PORT) else {
        return;
    };
    let port = port.to_string_lossy();
    let mut c = zenoh::Config::default();
    c.insert_json5("mode", "\"router\"").unwrap();
    c.insert_json5("listen/endpoints", &format!("[\"tcp/127.0.0.1:{port}\"]"))
        .unwrap();
    c.insert_json5("scouting/multicast/enabled", "false")
        .unwrap();
    let _router = zenoh::open(c).wait().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// A router process, killed with SIGKILL when dropped.
pub struct Router(Child);

impl Router {
    /// Starts the router on `port` and returns once it accepts connections, with the
    /// time it did.
    pub fn start(port: u16) -> (Router, Instant) {
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "common::zenoh_router_process",
                "--ignored",
                "--quiet",
            ])
            .env(ROUTER_PORT, port.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let router = Router(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the router did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        (router, Instant::now())
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client of the router that tries again quickly, so that the time measured is the
/// node's and not this observer's.
pub fn router_client(port: u16) -> zenoh::Session {
    let mut c = zenoh::Config::default();
    c.insert_json5("mode", "\"client\"").unwrap();
    c.insert_json5("connect/endpoints", &format!("[\"tcp/127.0.0.1:{port}\"]"))
        .unwrap();
    c.insert_json5(
        "connect/retry",
        "{period_init_ms: 50, period_max_ms: 100, period_increase_factor: 1}",
    )
    .unwrap();
    c.insert_json5("scouting/multicast/enabled", "false")
        .unwrap();
    zenoh::open(c).wait().unwrap()
}
