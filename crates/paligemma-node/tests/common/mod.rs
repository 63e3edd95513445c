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
    paligemma::convert::convert(&repo_root().join("tests/fixtures/pg2_gqa/hf"), &model, &Default::default(), |_| {}).unwrap();
    model
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
    let config = dir.join("node.toml");
    std::fs::write(&config, toml).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_paligemma-node"))
        .args(["--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Node(child)
}
