//! Hostile input: model files, images, sampling settings and checkpoint folders that
//! used to crash or exhaust a host process each get a clear error, and what passes
//! validation runs.
mod common;
use common::{convert_fixture, fixtures_dir};
use ggml::Type;
use ggml::gguf::{GgufFile, Value};
use paligemma::convert::{ConvertOptions, convert};
use paligemma::preprocess::{PixelFormat, RgbImage};
use paligemma::{ContextOptions, GenerateOptions, Model, Sampling};
use std::path::{Path, PathBuf};

/// A copy of `model` with metadata values and tensor types replaced.
fn edited(model: &Path, out: &Path, meta: &[(&str, Value)], types: &[(&str, Type)]) -> PathBuf {
    let file = GgufFile::open(model).unwrap();
    file.rewrite(out, |metadata, tensors| {
        for (key, value) in metadata.iter_mut() {
            if let Some((_, v)) = meta.iter().find(|(k, _)| k == key) {
                *value = v.clone();
            }
        }
        for (name, ty, _) in tensors.iter_mut() {
            if let Some((_, t)) = types.iter().find(|(n, _)| n == name) {
                *ty = *t;
            }
        }
    })
    .unwrap();
    out.to_path_buf()
}

fn load_error(path: &Path) -> String {
    let opts = ContextOptions {
        threads: 1,
        ..Default::default()
    };
    match Model::load(path, &opts) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_reported_model_crash_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert_fixture("pg2_gqa", Type::Q8_0, Type::F16, dir.path());
    let u = Value::U32;
    type Case<'a> = (
        &'a str,
        Vec<(&'a str, Value)>,
        Vec<(&'a str, Type)>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        // Types ggml's kernels do not take for a role (SIGSEGV / SIGABRT before).
        (
            "matrix as i16",
            vec![],
            vec![("blk.0.attn_q.weight", Type::I16)],
            "tensor blk.0.attn_q.weight is i16, expected one of",
        ),
        (
            "matrix as q4_1",
            vec![],
            vec![("blk.2.ffn_gate.weight", Type::Q4_1)],
            "tensor blk.2.ffn_gate.weight is q4_1",
        ),
        (
            "norm as q4_0",
            vec![],
            vec![("blk.0.attn_norm.weight", Type::Q4_0)],
            "tensor blk.0.attn_norm.weight is q4_0, expected one of f32",
        ),
        (
            "bias as f16",
            vec![],
            vec![("v.blk.0.attn_q.bias", Type::F16)],
            "tensor v.blk.0.attn_q.bias is f16",
        ),
        (
            "position table as f16",
            vec![],
            vec![("v.position_embd.weight", Type::F16)],
            "tensor v.position_embd.weight is f16",
        ),
        (
            "embedding as i32",
            vec![],
            vec![("token_embd.weight", Type::I32)],
            "tensor token_embd.weight is i32",
        ),
        (
            "embedding as f64",
            vec![],
            vec![("token_embd.weight", Type::from_raw(28).unwrap())],
            "tensor token_embd.weight is f64",
        ),
        (
            "matrix as q8_1",
            vec![],
            vec![("mm.weight", Type::from_raw(9).unwrap())],
            "tensor mm.weight is q8_1",
        ),
        (
            "position table as q4_0",
            vec![],
            vec![("v.position_embd.weight", Type::Q4_0)],
            "tensor v.position_embd.weight is q4_0",
        ),
        // Hyper-parameters ggml asserts on, or that size allocations.
        (
            "negative epsilon",
            vec![(
                "paligemma.vision.attention.layer_norm_epsilon",
                Value::F32(-1e-6),
            )],
            vec![],
            "vision.attention.layer_norm_epsilon is -0.000001",
        ),
        (
            "NaN epsilon",
            vec![(
                "paligemma.text.attention.layer_norm_rms_epsilon",
                Value::F32(f32::NAN),
            )],
            vec![],
            "layer_norm_rms_epsilon is NaN",
        ),
        (
            "infinite epsilon",
            vec![(
                "paligemma.text.attention.layer_norm_rms_epsilon",
                Value::F32(f32::INFINITY),
            )],
            vec![],
            "layer_norm_rms_epsilon is inf",
        ),
        (
            "vision layers 2^32-1",
            vec![("paligemma.vision.block_count", u(u32::MAX))],
            vec![],
            "vision.block_count is 4294967295, expected 1 to 512",
        ),
        (
            "vision layers 2^24",
            vec![("paligemma.vision.block_count", u(1 << 24))],
            vec![],
            "vision.block_count is 16777216",
        ),
        (
            "vision layers as u64",
            vec![("paligemma.vision.block_count", Value::U64(1 << 40))],
            vec![],
            "paligemma.vision.block_count is not an integer below 2^32",
        ),
        (
            "heads do not divide",
            vec![("paligemma.vision.attention.head_count", u(3))],
            vec![],
            "head_count 3 does not divide vision.embedding_length 32",
        ),
        (
            "eos outside vocabulary",
            vec![("tokenizer.ggml.eos_token_id", u(1_000_000))],
            vec![],
            "eos_token_id: token id 1000000 is outside the vocabulary",
        ),
        (
            "image token outside vocabulary",
            vec![("paligemma.image_token_id", u(1856))],
            vec![],
            "image_token_id: token id 1856 is outside",
        ),
        (
            "zero kv heads",
            vec![("paligemma.text.attention.head_count_kv", u(0))],
            vec![],
            "head_count_kv is 0",
        ),
    ];
    for (what, meta, types, expected) in cases {
        let path = edited(&model, &dir.path().join("bad.gguf"), &meta, &types);
        let err = load_error(&path);
        assert!(
            err.contains(expected),
            "{what}: expected {expected:?} in {err:?}"
        );
        assert!(
            err.contains("bad.gguf"),
            "{what}: the error names the file: {err}"
        );
        // `info` shares the validation.
        let file = GgufFile::open(&path).unwrap();
        assert!(
            paligemma::validate::model_file(&file).is_err(),
            "{what}: info accepts it"
        );
    }
}

#[test]
fn a_model_that_passes_validation_runs() {
    let dir = tempfile::tempdir().unwrap();
    // Matrices in every type the validation allows for them whose blocks fit the
    // fixture's 64-wide rows (the k-quants' 256-wide blocks are covered by the parity
    // tests of larger rows).
    for ty in paligemma::validate::MATRIX_TYPES
        .into_iter()
        .filter(|t| 64 % t.block_size() == 0)
    {
        let model = convert_fixture("pg2_gqa", Type::Q8_0, Type::F16, dir.path());
        let path = edited(
            &model,
            &dir.path().join(format!("{ty}.gguf")),
            &[],
            &[("blk.1.attn_output.weight", ty)],
        );
        let file = GgufFile::open(&path).unwrap();
        paligemma::validate::model_file(&file).unwrap_or_else(|e| panic!("{ty}: {e}"));
        let mut m = Model::load(
            &path,
            &ContextOptions {
                threads: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let img = RgbImage::from_raw(&[90; 8 * 8 * 3], 8, 8, 24, PixelFormat::Rgb).unwrap();
        let emb = m.encode_image(&img).unwrap();
        common::generate(
            &mut m,
            &emb,
            "caption en",
            &GenerateOptions {
                max_tokens: 3,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{ty}: {e}"));
    }
}

#[test]
fn sampling_never_emits_prefix_tokens_and_limits_do_not_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert_fixture("pg2_gqa", Type::F32, Type::F32, dir.path());
    let mut m = Model::load(
        &path,
        &ContextOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let img = RgbImage::from_raw(&[200; 16 * 16 * 3], 16, 16, 48, PixelFormat::Rgb).unwrap();
    let emb = m.encode_image(&img).unwrap();
    let k = m.config().tokens.clone();
    // A very high temperature samples nearly uniformly: before, most runs hit <image>
    // within a few tokens and lost the whole answer.
    for seed in 0..20 {
        let opts = GenerateOptions {
            max_tokens: 24,
            sampling: Sampling {
                temperature: 5.0,
                seed,
                ..Default::default()
            },
            ..Default::default()
        };
        let g = common::generate(&mut m, &emb, "caption en", &opts)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        for id in g.tokens {
            assert!(
                id != k.image_token_id && id != k.pad && id != k.bos,
                "seed {seed}: sampled {id}"
            );
        }
    }
    let huge = GenerateOptions {
        max_tokens: usize::MAX,
        ..Default::default()
    };
    let err = common::generate(&mut m, &emb, "caption en", &huge)
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceeds the context"), "{err}");
    for (temperature, top_p) in [(f32::NAN, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, f32::NAN)] {
        let opts = GenerateOptions {
            sampling: Sampling {
                temperature,
                top_p,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(
            common::generate(&mut m, &emb, "caption en", &opts).is_err(),
            "temperature {temperature} top-p {top_p}"
        );
    }
}

#[test]
fn frames_and_files_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // A small PNG that declares 12000 x 12000 pixels is refused from its header.
    let png = dir.path().join("huge.png");
    image::GrayImage::new(12000, 12000).save(&png).unwrap();
    let size = std::fs::metadata(&png).unwrap().len();
    assert!(size < 2 << 20, "a compressed file of {size} bytes");
    let err = RgbImage::open(&png).unwrap_err().to_string();
    assert!(
        err.contains("12000x12000 is larger than the limit of 67108864 pixels"),
        "{err}"
    );
    assert!(RgbImage::open_limited(&png, 12000 * 12000).is_ok());
    let small = RgbImage::decode_limited(
        &std::fs::read(fixtures_dir().join("images/rgb.png")).unwrap(),
        100,
    )
    .unwrap_err()
    .to_string();
    assert!(
        small.contains("larger than the limit of 100 pixels"),
        "{small}"
    );
    // Devices and FIFOs are not read.
    let err = RgbImage::open(Path::new("/dev/zero"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a regular file"), "{err}");
    let fifo = dir.path().join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let err = RgbImage::open(&fifo).unwrap_err().to_string();
    assert!(err.contains("not a regular file"), "{err}");
    // Strides whose arithmetic overflows.
    let err = RgbImage::from_raw(&[0; 9], 1, 3, 1 << 63, PixelFormat::Rgb)
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs more than 2^64 bytes"), "{err}");
    let err = RgbImage::from_raw(&[0; 9], usize::MAX, 3, 3, PixelFormat::Rgb)
        .unwrap_err()
        .to_string();
    assert!(err.contains("larger than the limit"), "{err}");
}

/// A checkpoint folder whose config.json is edited by `edit`.
fn checkpoint_with(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = fixtures_dir().join("pg2_gqa/hf");
    let out = dir.join("hf");
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, out.join(p.file_name().unwrap())).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    out
}

#[test]
fn the_converter_refuses_what_the_loader_would() {
    type Case<'a> = (&'a str, fn(&mut serde_json::Value), &'a str);
    let cases: [Case; 6] = [
        (
            "1e9 vision layers",
            |c| c["vision_config"]["num_hidden_layers"] = 1_000_000_000.into(),
            "vision.block_count is 1000000000, expected 1 to 512",
        ),
        (
            "1e9 text layers",
            |c| c["text_config"]["num_hidden_layers"] = 1_000_000_000.into(),
            "at most 512 layers",
        ),
        (
            "image token 2^40",
            |c| c["image_token_index"] = (1u64 << 40).into(),
            "a token id below 2^32",
        ),
        (
            "sliding window 2^63",
            |c| c["text_config"]["sliding_window"] = (1u64 << 63).into(),
            "a positive integer below 2^32",
        ),
        (
            "heads do not divide",
            |c| c["vision_config"]["num_attention_heads"] = 5.into(),
            "does not divide",
        ),
        (
            "image token outside vocabulary",
            |c| c["image_token_index"] = 5000.into(),
            "outside the vocabulary",
        ),
    ];
    for (what, edit, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let hf = checkpoint_with(dir.path(), edit);
        let out = dir.path().join("out.gguf");
        let err = convert(&hf, &out, &ConvertOptions::default(), |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(expected),
            "{what}: expected {expected:?} in {err}"
        );
        assert!(!out.exists());
    }
}

#[test]
fn the_converter_reads_the_files_transformers_reads() {
    let dir = tempfile::tempdir().unwrap();
    let hf = checkpoint_with(dir.path(), |_| {});
    // An adapter and a second copy of the weights beside model.safetensors.
    std::fs::write(
        hf.join("adapter_model.safetensors"),
        b"not even a safetensors file",
    )
    .unwrap();
    std::fs::copy(
        hf.join("model.safetensors"),
        hf.join("model-copy.safetensors"),
    )
    .unwrap();
    let out = dir.path().join("out.gguf");
    let summary = convert(&hf, &out, &ConvertOptions::default(), |_| {}).unwrap();
    assert_eq!(summary.notes.len(), 2, "{:?}", summary.notes);
    assert!(
        summary.notes[0].contains("ignored adapter_model.safetensors"),
        "{:?}",
        summary.notes
    );
    // An index naming a file outside the folder is refused.
    std::fs::write(
        hf.join("model.safetensors.index.json"),
        r#"{"weight_map":{"x":"../model.safetensors"}}"#,
    )
    .unwrap();
    let err = convert(&hf, &out, &ConvertOptions::default(), |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("expected the name of a file in this folder"),
        "{err}"
    );
}

#[test]
fn an_interrupted_conversion_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opts = ConvertOptions {
        cancel: Some(cancel.clone()),
        ..Default::default()
    };
    // The "signal" arrives while the fifth tensor is written.
    let err = convert(&fixtures_dir().join("pg2_gqa/hf"), &out, &opts, |p| {
        if p.index == 5 {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .unwrap_err();
    assert!(matches!(err, paligemma::Error::Interrupted), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
