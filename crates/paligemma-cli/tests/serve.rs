//! `paligemma serve` on the bundled demo model, driven over HTTP as an OpenAI client
//! would: captions, detections with their boxes in the extra field, a streamed reply
//! that adds up to the whole one, OpenAI-style errors that leave the server serving,
//! batching through HTTP, 429 beyond the queue, and `/metrics` counting what happened.
//! (The load test is `serve_load.rs`; `scripts/serve-check.sh` does the same with the official `openai` Python package
//! and Prometheus' own parser.)
use base64::Engine as _;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

mod common;
use common::{MODEL, agent, chat, chat_body, image_url, post, start, start_with};

/// The `data:` payloads of a streamed reply, in order.
fn events(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(String::from)
        .collect()
}

/// The server's `/metrics` text.
fn metrics_text(base: &str) -> String {
    agent()
        .get(format!("{base}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// `metric{labels}` values of the text exposition, by the whole series name.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn openai_api_on_the_demo_model() {
    let server = start(&["--max-pixels", "1000000", "--max-body-bytes", "4000000"]);
    let base = &server.base;

    let models: Value = agent()
        .get(format!("{base}/v1/models"))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);

    // A caption: the model's text as the message, the typed result beside it.
    let frame = image_url("frame_0000.png");
    let (status, caption) = chat(base, &chat_body("caption en", &frame, json!({})));
    assert_eq!(status, 200, "{caption}");
    let text = caption["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert!(!text.is_empty());
    assert_eq!(caption["choices"][0]["message"]["role"], "assistant");
    assert_eq!(caption["paligemma"]["schema"], "paligemma.result/1");
    assert_eq!(caption["paligemma"]["result"]["kind"], "caption");
    assert!(
        caption["usage"]["prompt_tokens"].as_u64() > Some(16),
        "image and text tokens"
    );

    // A detection: boxes in pixels of the frame, with scores, in the extra field.
    let detect = chat_body(
        "detect ball ; circle ; square ; triangle",
        &frame,
        json!({}),
    );
    let (status, detection) = chat(base, &detect);
    assert_eq!(status, 200, "{detection}");
    let result = &detection["paligemma"];
    let (width, height) = (
        result["frame"]["width"].as_f64().unwrap(),
        result["frame"]["height"].as_f64().unwrap(),
    );
    let boxes = result["result"]["detections"].as_array().unwrap();
    assert!(!boxes.is_empty(), "{detection}");
    for d in boxes {
        let b = &d["box"];
        assert!(b["x2"].as_f64().unwrap() <= width && b["y2"].as_f64().unwrap() <= height);
        assert!(
            b["w"].as_f64().unwrap() > 1.0,
            "pixels, not a fraction: {b}"
        );
        assert!((0.0..=1.0).contains(&d["score"].as_f64().unwrap()));
    }
    let whole = detection["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert!(whole.starts_with("<loc"), "{whole}");

    // Streamed: the role, the text token by token, the finish with the typed result,
    // the usage, [DONE]; the pieces add up to the whole reply.
    let streamed = chat_body(
        "detect ball ; circle ; square ; triangle",
        &frame,
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let (status, _, text) = post(
        base,
        "/v1/chat/completions",
        streamed.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    let events = events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, whole, "the streamed pieces add up to the reply");
    assert!(chunks.len() > 4, "token by token: {} chunks", chunks.len());
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["paligemma"]["result"], result["result"]);
    assert_eq!(chunks.last().unwrap()["usage"], detection["usage"]);

    // Bad requests: OpenAI-style errors with 4xx codes, and the server goes on.
    let error = |status: u16, body: &str| -> Value {
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert!(v["error"]["type"].is_string());
        assert!((400..500).contains(&status), "{status} {body}");
        v
    };
    let no_image = json!({"model": MODEL, "messages": [{"role": "user", "content": "caption en"}]});
    let (status, body) = chat(base, &no_image);
    assert_eq!(
        (status, &error(status, &body.to_string())["error"]["code"]),
        (400, &json!("missing_image"))
    );
    let broken = chat_body(
        "caption en",
        "data:image/png;base64,iVBORw0KGgo!!!",
        json!({}),
    );
    let (status, body) = chat(base, &broken);
    assert_eq!(
        (status, &error(status, &body.to_string())["error"]["code"]),
        (400, &json!("invalid_image"))
    );
    let not_png = chat_body(
        "caption en",
        &format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(b"not an image at all")
        ),
        json!({}),
    );
    assert_eq!(chat(base, &not_png).0, 400);
    let mut big = Vec::new();
    image::RgbImage::new(1100, 1000)
        .write_to(&mut std::io::Cursor::new(&mut big), image::ImageFormat::Png)
        .unwrap();
    let huge = chat_body(
        "caption en",
        &format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&big)
        ),
        json!({}),
    );
    let (status, body) = chat(base, &huge);
    assert_eq!(
        (status, &error(status, &body.to_string())["error"]["code"]),
        (400, &json!("image_too_large"))
    );
    let (status, _, body) = post(base, "/v1/chat/completions", &vec![b' '; 5_000_000]);
    assert_eq!(
        (status, &error(status, &body)["error"]["code"]),
        (413, &json!("request_too_large"))
    );
    let (status, body) = chat(
        base,
        &chat_body("caption en", "https://example.com/cat.png", json!({})),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = chat(base, &json!({"model": "gpt-4o", "messages": []}));
    assert_eq!(status, 404, "{body}");
    let (status, body) = chat(base, &chat_body("detect ;", &frame, json!({})));
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_task")),
        "{body}"
    );
    let (status, again) = chat(base, &chat_body("caption en", &frame, json!({})));
    assert_eq!(
        (status, &again["choices"]),
        (200, &caption["choices"]),
        "still serving, same answer"
    );

    // The native endpoint: exactly the node's message.
    let analyze = json!({"prompt": "detect circle", "image": image_url("frame_0000.png")});
    let (status, _, body) = post(base, "/v1/analyze", analyze.to_string().as_bytes());
    assert_eq!(status, 200, "{body}");
    let msg: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(msg["schema"], "paligemma.result/1");
    assert_eq!(msg["prompt"]["task"], "detect");

    // The metrics count what was asked.
    let metrics = metrics_text(base);
    let count = |series: &str| metric(&metrics, series);
    assert_eq!(
        count(r#"paligemma_requests_total{endpoint="chat",task="caption",status="200"}"#),
        2.0
    );
    assert_eq!(
        count(r#"paligemma_requests_total{endpoint="chat",task="detect",status="200"}"#),
        2.0
    );
    assert_eq!(
        count(r#"paligemma_requests_total{endpoint="analyze",task="detect",status="200"}"#),
        1.0
    );
    // Bad images (broken, not an image, too large, a URL) are caption requests; no image
    // and an empty detection are refused before a task is known.
    assert_eq!(
        count(r#"paligemma_requests_total{endpoint="chat",task="caption",status="400"}"#),
        4.0
    );
    assert_eq!(
        count(r#"paligemma_requests_total{endpoint="chat",task="",status="400"}"#),
        2.0
    );
    assert_eq!(
        count(r#"paligemma_requests_total{endpoint="chat",task="",status="413"}"#),
        1.0
    );
    assert_eq!(
        count(r#"paligemma_requests_total{endpoint="chat",task="",status="404"}"#),
        1.0
    );
    assert_eq!(
        count(r#"paligemma_stage_seconds_count{stage="vision",task="detect"}"#),
        3.0
    );
    assert!(count(r#"paligemma_kv_cache_bytes{model="paligemma2-demo-f16"}"#) > 0.0);
    assert!(count("process_resident_memory_bytes") > 1e6);
    assert!(metrics.contains("# TYPE paligemma_stage_seconds histogram"));
}

/// A client that goes away mid-answer: its work is cancelled (the next request does not
/// wait for it) and it is counted with status 499, streamed or not.
#[test]
fn a_client_that_goes_away_cancels_its_work() {
    use std::io::{Read, Write};
    // The random-weight fixture: it answers up to its token limit, never early.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("pg2-fixture.gguf");
    let converted = std::process::Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .arg("convert")
        .arg(common::repo_root().join("tests/fixtures/pg2_gqa/hf"))
        .arg("-o")
        .arg(&model)
        .output()
        .unwrap();
    assert!(converted.status.success());
    let server = start_with(&model, &["--parallel", "1"]);
    let base = &server.base;
    let png = std::fs::read(common::repo_root().join("tests/fixtures/images/rgb.png")).unwrap();
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    );
    let body = |max_tokens: usize, stream: bool| {
        let mut b = chat_body(
            "caption en",
            &url,
            json!({"max_tokens": max_tokens, "stream": stream}),
        );
        b["model"] = json!("pg2-fixture");
        b
    };
    let (status, whole) = chat(base, &body(480, false));
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["usage"]["completion_tokens"], 480);

    let addr = base.trim_start_matches("http://").to_string();
    let leave_early = |body: &Value, wait_for_first_bytes: bool| {
        let text = body.to_string();
        let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            tcp,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        )
        .unwrap();
        if wait_for_first_bytes {
            let mut first = [0u8; 64];
            let _ = tcp.read(&mut first).unwrap();
        } else {
            std::thread::sleep(Duration::from_millis(30));
        }
        // Dropped: the connection closes mid-answer.
    };
    let abandoned = |series: &str| metric(&metrics_text(base), series);
    for (n, streamed) in [(1.0, false), (2.0, true)] {
        leave_early(&body(480, streamed), streamed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while abandoned(r#"paligemma_requests_total{endpoint="chat",task="caption",status="499"}"#)
            < n
        {
            assert!(
                Instant::now() < deadline,
                "the abandoned request was not counted"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // One place only: a request now waits for nothing the gone client asked.
        let started = Instant::now();
        let (status, _) = chat(base, &body(1, false));
        println!(
            "after a client left {} mid-answer: the next answer in {:.0?}",
            if streamed {
                "a streamed reply"
            } else {
                "a request"
            },
            started.elapsed()
        );
        assert_eq!(status, 200);
    }
}

/// Image URLs are fetched only when the server is started with `--allow-image-urls`, and
/// then within the body limit; without it they are refused with a clear error.
#[test]
fn image_urls_are_fetched_only_when_allowed() {
    use std::io::{Read, Write};
    // A web server with the frame at /frame.png and 2 MB of noise at /big.png.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web = format!("http://{}", listener.local_addr().unwrap());
    let png =
        std::fs::read(common::repo_root().join("tests/fixtures/demo_eval/frame_0000.png")).unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut request = [0u8; 2048];
            let n = conn.read(&mut request).unwrap_or(0);
            let body = if String::from_utf8_lossy(&request[..n]).contains("GET /big.png") {
                vec![7u8; 2_000_000]
            } else {
                png.clone()
            };
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(&body);
        }
    });
    let url = format!("{web}/frame.png");
    let detect = || chat_body("detect ball ; circle ; square ; triangle", &url, json!({}));

    let closed = start(&[]);
    let (status, body) = chat(&closed.base, &detect());
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("unsupported_image_url")),
        "{body}"
    );
    drop(closed);

    let open = start(&["--allow-image-urls", "--max-body-bytes", "1000000"]);
    let (status, fetched) = chat(&open.base, &detect());
    assert_eq!(status, 200, "{fetched}");
    let (_, inline) = chat(
        &open.base,
        &chat_body(
            "detect ball ; circle ; square ; triangle",
            &image_url("frame_0000.png"),
            json!({}),
        ),
    );
    assert_eq!(
        fetched["choices"], inline["choices"],
        "the same image, the same answer"
    );
    let (status, body) = chat(
        &open.base,
        &chat_body("caption en", &format!("{web}/big.png"), json!({})),
    );
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("image_url_failed")),
        "{body}"
    );
    let (status, body) = chat(
        &open.base,
        &chat_body("caption en", "http://127.0.0.1:1/none.png", json!({})),
    );
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("image_url_failed")),
        "{body}"
    );
}

/// HTTPS with a certificate made here, and a bearer token: without the token a request
/// is 401, with it answered; `/health` stays open; plain HTTP gets nothing.
#[test]
fn https_and_a_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let server = start(&[
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
        "--api-key",
        "sesame",
    ]);
    let https = server.base.replace("http://", "https://");
    let root = ureq::tls::Certificate::from_pem(cert.pem().as_bytes()).unwrap();
    let tls_agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
                    root,
                ])))
                .build(),
        )
        .build()
        .into();
    assert_eq!(
        tls_agent
            .get(format!("{https}/health"))
            .call()
            .unwrap()
            .status(),
        200
    );
    let body = chat_body("caption en", &image_url("frame_0000.png"), json!({})).to_string();
    let post = |token: Option<&str>| {
        let mut request = tls_agent
            .post(format!("{https}/v1/chat/completions"))
            .header("content-type", "application/json");
        if let Some(t) = token {
            request = request.header("authorization", format!("Bearer {t}"));
        }
        let mut response = request.send(body.as_bytes()).unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        (response.status().as_u16(), text)
    };
    let (status, text) = post(None);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("invalid_api_key"));
    assert_eq!(post(Some("open sesame")).0, 401);
    let (status, text) = post(Some("sesame"));
    assert_eq!(status, 200, "{text}");
    // The TLS port does not speak plain HTTP.
    assert!(
        agent()
            .get(format!("{}/health", server.base))
            .call()
            .is_err()
    );
    // SIGTERM: the server drains its connections and exits cleanly.
    let mut server = server;
    let pid = server.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
