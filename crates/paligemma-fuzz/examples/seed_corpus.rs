//! Writes the seed inputs of `fuzz/corpus/` (run from the repository root:
//! `cargo run --release -p paligemma-fuzz --example seed-corpus`). Seeds are small
//! valid inputs of each parser, so the fuzzer starts from the interesting paths:
//! a complete model of a few KB, a checkpoint header, frames of every kind, prompts
//! and answers of every task.
use base64::Engine as _;
use paligemma::config::{Config, TextArch, TextConfig, TokenConfig, VisionConfig};
use paligemma::convert::{ConvertOptions, write_random};
use std::path::Path;

/// A word-level tokenizer with the special tokens and a few words.
const TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"<pad>":0,"<eos>":1,"<bos>":2,"<image>":3,"cat":4,"dog":5,"caption":6,"en":7},"unk_token":"<pad>"}}"#;

fn tiny_config(arch: TextArch) -> Config {
    let vision = VisionConfig {
        image_size: 4,
        patch_size: 2,
        width: 4,
        depth: 1,
        heads: 2,
        ffn: 8,
        ln_eps: 1e-6,
        image_mean: [0.5; 3],
        image_std: [0.5; 3],
        rescale: 1.0 / 255.0,
    };
    let gemma2 = arch == TextArch::Gemma2;
    let text = TextConfig {
        arch,
        width: 8,
        depth: 2,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
        ffn: 16,
        rms_eps: 1e-6,
        rope_theta: 10000.0,
        query_pre_attn_scalar: 4.0,
        attn_softcap: gemma2.then_some(50.0),
        final_softcap: gemma2.then_some(30.0),
        sliding_window: gemma2.then_some(16),
        sliding_layers: vec![gemma2, false],
        context_length: 64,
        vocab_size: 8,
        embed_scale: 8f32.sqrt(),
    };
    let tokens = TokenConfig {
        image_token_id: 3,
        image_token_count: 4,
        bos: 2,
        eos: 1,
        pad: 0,
        loc_first: None,
        seg_first: None,
    };
    Config {
        name: "tiny".into(),
        vision,
        projection_dim: 8,
        text,
        tokens,
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// `first` and `rest` joined as [`paligemma_fuzz::split`] reads them.
fn pair(first: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut out = (first.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(first);
    out.extend_from_slice(rest);
    out
}

fn main() {
    let corpus = Path::new("fuzz/corpus");
    let tmp = std::env::temp_dir().join("paligemma-seed.gguf");
    for (arch, name) in [
        (TextArch::Gemma2, "tiny-gemma2.gguf"),
        (TextArch::Gemma, "tiny-gemma.gguf"),
    ] {
        let opts = ConvertOptions {
            ty: ggml::Type::Q8_0,
            vision_ty: ggml::Type::F16,
            ..Default::default()
        };
        write_random(&tiny_config(arch), TOKENIZER, &opts, &tmp, 1, |_| {}).unwrap();
        write(&corpus.join("gguf"), name, &std::fs::read(&tmp).unwrap());
    }
    std::fs::remove_file(&tmp).unwrap();

    let fixture = Path::new("tests/fixtures/pg2_gqa/hf");
    let config = std::fs::read(fixture.join("config.json")).unwrap();
    // A checkpoint's safetensors header and the start of its data.
    let weights = std::fs::read(fixture.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    write(
        &corpus.join("checkpoint"),
        "pg2-gqa",
        &pair(
            &config,
            &weights[..(8 + header_len + 256).min(weights.len())],
        ),
    );
    write(
        &corpus.join("checkpoint"),
        "defaults",
        &pair(
            br#"{"model_type":"paligemma","text_config":{"model_type":"gemma2"}}"#,
            b"",
        ),
    );

    // An npz is a zip of .npy arrays: the start of the random decoder's archive.
    let npz = std::fs::read("tests/fixtures/vae/vae-random.npz").unwrap();
    write(
        &corpus.join("npz"),
        "vae-random-head",
        &npz[..npz.len().min(4096)],
    );

    let frames = corpus.join("frame");
    for image in ["rgb.png", "rgba.png"] {
        write(
            &frames,
            image,
            &pair(
                b"",
                &std::fs::read(Path::new("tests/fixtures/images").join(image)).unwrap(),
            ),
        );
    }
    let mut pgrf = b"PGRF".to_vec();
    for v in [4u32, 2, 12] {
        pgrf.extend_from_slice(&v.to_le_bytes());
    }
    pgrf.extend_from_slice(&[128; 24]);
    write(&frames, "pgrf", &pair(b"", &pgrf));
    write(
        &frames,
        "attachment-bgra",
        &pair(
            br#"{"width":2,"height":2,"stride":8,"format":"bgra8"}"#,
            &[7; 16],
        ),
    );

    let prompts = corpus.join("prompts");
    write(
        &prompts,
        "toml",
        &std::fs::read("configs/prompts.toml").unwrap(),
    );
    write(
        &prompts,
        "json",
        br#"[{"id":"people","task":"detect person ; car","every_ms":500,"max_tokens":32}]"#,
    );
    write(
        &prompts,
        "ask",
        br#"{"prompt":"answer en how many cats?","max_tokens":8}"#,
    );
    write(
        &prompts,
        "short",
        b"caption en|detect cat ; dog|segment person",
    );

    let output = corpus.join("output");
    write(
        &output,
        "detect",
        &pair(
            b"detect cat ; dog",
            b"<loc0100><loc0200><loc0300><loc0400> cat ; <loc0000><loc0000><loc1023><loc1023> dog",
        ),
    );
    let seg: String = (0..16).map(|i| format!("<seg{:03}>", i * 7)).collect();
    write(
        &output,
        "segment",
        &pair(
            b"segment cat",
            format!("<loc0010><loc0020><loc0500><loc0600>{seg} cat").as_bytes(),
        ),
    );
    write(
        &output,
        "caption",
        &pair(b"caption en", b"a red ball on a table"),
    );
    write(&output, "ocr", &pair(b"ocr", b"STOP 42"));

    // ROS 2 samples as rosbags wrote them (tests/fixtures/ros2/reference.json).
    let ros2 = corpus.join("ros2");
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("tests/fixtures/ros2/reference.json").unwrap(),
    )
    .unwrap();
    let attachment = paligemma_ros2::keys::attachment(1, 1_700_000_000_000_000_000, &[0xa5; 16]);
    for (name, hex) in reference["cdr"].as_object().unwrap() {
        let hex = hex.as_str().unwrap();
        let cdr: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        write(
            &ros2,
            &name.replace(['/', '#'], "-"),
            &pair(&attachment, &cdr),
        );
    }

    // Request bodies of `paligemma serve`, with a real PNG inline.
    let http = corpus.join("http");
    let png = std::fs::read("tests/fixtures/images/rgb.png").unwrap();
    let data_url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    let chat = |task: &str, url: &str, extra: &str| {
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":{task:?}}},{{"type":"image_url","image_url":{{"url":{url:?}}}}}]}}],"max_tokens":8{extra}}}"#
        )
    };
    write(
        &http,
        "caption",
        chat("caption en", &data_url, "").as_bytes(),
    );
    write(
        &http,
        "detect-stream",
        chat("detect cup ; plate", &data_url, r#","stream":true,"stream_options":{"include_usage":true},"temperature":0.7,"top_p":0.9,"seed":3"#).as_bytes(),
    );
    write(
        &http,
        "no-image",
        br#"{"model":"m","messages":[{"role":"user","content":"caption en"}]}"#,
    );
    write(
        &http,
        "bad-base64",
        chat("ocr", "data:image/png;base64,iVBOR!!", "").as_bytes(),
    );
    write(&http, "data-url", data_url.as_bytes());
}
