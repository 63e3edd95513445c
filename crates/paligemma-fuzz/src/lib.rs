//! One entry point per parser of untrusted bytes. Each takes arbitrary bytes and must
//! return (an error is fine) without panicking, aborting or allocating without bound.
//! The cargo-fuzz targets in `fuzz/` call these, and `tests/replay.rs` replays the
//! committed corpus and every crash found so far through them on stable Rust, so CI
//! checks the same code paths the fuzzer explores.
//!
//! Inputs that combine two parts (a frame and its attachment, a config and a weight
//! file) are split by [`split`]: a little-endian u16 length, then the first part.
use paligemma::preprocess::RgbImage;
use std::path::Path;

/// Frames decoded while fuzzing are capped lower than in production, so that the
/// fuzzer spends its time on the parsers rather than on resizing.
const FUZZ_MAX_PIXELS: usize = 1 << 20;

/// Splits `data` into a first part of the length given by its first two bytes and
/// the rest.
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return (&[], data);
    };
    rest.split_at((u16::from_le_bytes(*len) as usize).min(rest.len()))
}

/// A GGUF model file: the reader, then everything `Model::load` checks before it
/// builds a graph (hyper-parameters, tensor table and types, tokenizer).
pub fn gguf(data: &[u8]) {
    if let Ok(file) = ggml::gguf::GgufFile::from_bytes("fuzz.gguf", data) {
        let _ = paligemma::validate::model_file(&file);
    }
}

/// A Hugging Face checkpoint: `config.json` (first part) and a safetensors file.
pub fn checkpoint(data: &[u8]) {
    let (config, weights) = split(data);
    let path = Path::new("config.json");
    let ids = [
        "<image>",
        "<bos>",
        "<eos>",
        "<pad>",
        "<loc0000>",
        "<seg000>",
    ];
    let lookup = |token: &str| {
        ids.iter()
            .position(|t| *t == token)
            .map(|i| 257_000 + i as u32)
    };
    let config = serde_json::from_slice::<serde_json::Value>(config)
        .ok()
        .and_then(|root| {
            paligemma::Config::from_hf_json(path, &root, None, &lookup, "bfloat16").ok()
        });
    if let Ok(st) = safetensors::SafeTensors::deserialize(weights) {
        for (key, view) in st.tensors() {
            let _ = (
                paligemma::convert::canonical_name(&key),
                view.shape(),
                view.data().len(),
            );
        }
    }
    if let Some(config) = config {
        let _ = paligemma::format::tensor_shapes(&config).len();
    }
}

/// big_vision's mask decoder weights (`vae-oid.npz`).
pub fn npz(data: &[u8]) {
    let _ = paligemma::segment::SegWeights::from_npz_bytes(Path::new("fuzz.npz"), data);
}

/// A frame on a camera's Zenoh key: a JSON attachment (first part) and the payload.
pub fn frame(data: &[u8]) {
    let (attachment, payload) = split(data);
    let attachment = (!attachment.is_empty()).then_some(attachment);
    if let Ok(RgbImage {
        width,
        height,
        data,
    }) = paligemma_stream::payload::decode_frame(payload, attachment, FUZZ_MAX_PIXELS)
    {
        assert_eq!(
            data.len(),
            width * height * 3,
            "a decoded frame holds its pixels"
        );
    }
}

/// A standing-prompts update (TOML or JSON), an `ask` payload, the element's short form.
pub fn prompts(data: &[u8]) {
    let _ = paligemma_stream::payload::parse_prompts(data);
    let _ = paligemma_stream::payload::parse_ask(data, 4096);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = paligemma_stream::PromptSet::from_short(text, 0, 32);
    }
}

/// A model's answer to a prompt (first part): the parser of captions, detections,
/// masks and OCR, on a frame whose size the first bytes of the prompt choose.
pub fn output(data: &[u8]) {
    let (prompt, answer) = split(data);
    let (Ok(prompt), Ok(answer)) = (std::str::from_utf8(prompt), std::str::from_utf8(answer))
    else {
        return;
    };
    let Ok(task) = paligemma::Task::parse(prompt) else {
        return;
    };
    let size = prompt.len() % 2000 + 1;
    let result = paligemma::parse::parse(
        &task,
        answer,
        size,
        size / 2 + 1,
        paligemma::output::DEFAULT_LOC_DIVISOR,
    );
    let _ = serde_json::to_string(&result);
}

/// A request body of `paligemma serve`: a chat completion (its messages, task and
/// inline image, as the server reads them), and the bytes as an image `data:` URL.
pub fn http(data: &[u8]) {
    use paligemma_serve::{image_url, openai::ChatRequest};
    if let Ok(request) = serde_json::from_slice::<ChatRequest>(data)
        && let Ok(asked) = request.asked()
    {
        let _ = paligemma::Task::parse(&asked.prompt);
        let _ = image_url::decode(asked.image_url, FUZZ_MAX_PIXELS);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = image_url::decode(text, FUZZ_MAX_PIXELS);
    }
}

/// A ROS 2 sample from the network: its attachment (first part) and CDR payload, read
/// as each message type the node takes or sends, and as a camera image.
pub fn ros2(data: &[u8]) {
    use paligemma_ros2::{keys, msgs};
    let (attachment, payload) = split(data);
    let _ = keys::parse_attachment(attachment);
    let limit = 1 << 20;
    let _ = msgs::from_cdr::<msgs::Image>(payload, limit);
    let _ = msgs::from_cdr::<msgs::CompressedImage>(payload, limit);
    let _ = msgs::from_cdr::<msgs::StringMsg>(payload, limit);
    let _ = msgs::from_cdr::<msgs::Detection2DArray>(payload, limit);
    for kind in [
        paligemma_ros2::images::ImageKind::Raw,
        paligemma_ros2::images::ImageKind::Compressed,
    ] {
        let _ = paligemma_ros2::images::decode(kind, payload, FUZZ_MAX_PIXELS);
    }
}

/// A fuzz target: takes any bytes, must never panic.
pub type Target = fn(&[u8]);

/// Every target by name, for the replay test and `scripts/fuzz.sh`.
pub const TARGETS: [(&str, Target); 8] = [
    ("gguf", gguf),
    ("checkpoint", checkpoint),
    ("npz", npz),
    ("frame", frame),
    ("prompts", prompts),
    ("output", output),
    ("ros2", ros2),
    ("http", http),
];
