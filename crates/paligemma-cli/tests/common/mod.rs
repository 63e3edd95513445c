//! The `paligemma serve` process of the tests, and requests to it.
#![allow(dead_code)] // each test file uses its share of these

use base64::Engine as _;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MODEL: &str = "paligemma2-demo-f16";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The server process, killed when the test ends however it ends.
pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// The server on the bundled demo model.
pub fn start(extra: &[&str]) -> Server {
    start_with(
        &repo_root().join(format!("models/demo/{MODEL}.gguf")),
        extra,
    )
}

pub fn start_with(model: &std::path::Path, extra: &[&str]) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args(["serve", "-m", model.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    // Up once it accepts connections (plain HTTP or TLS alike).
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the server did not come up");
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("the server exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

pub fn image_url(name: &str) -> String {
    let png = std::fs::read(repo_root().join("tests/fixtures/demo_eval").join(name)).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

pub fn chat_body(task: &str, url: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": task},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
        "max_tokens": 24,
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// Status, `Retry-After` and body text of a POST.
pub fn post(base: &str, path: &str, body: &[u8]) -> (u16, Option<String>, String) {
    let mut response = agent()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let text = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .unwrap();
    (response.status().as_u16(), retry, text)
}

pub fn chat(base: &str, body: &Value) -> (u16, Value) {
    let (status, _, text) = post(base, "/v1/chat/completions", body.to_string().as_bytes());
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
