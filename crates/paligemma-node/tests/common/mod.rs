//! What the node's tests share: the fixture model, a free port, the node process.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Child;

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
