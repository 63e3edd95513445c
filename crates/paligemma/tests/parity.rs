//! The engine against the transformers reference, stage by stage, on every fixture.
mod common;
use common::*;
use ggml::Type;
use paligemma::preprocess::PixelValues;
use paligemma::{GenerateOptions, KvType, Model, ModelOptions};

fn load(path: &std::path::Path, kv_type: KvType) -> Model {
    Model::load(path, &ModelOptions { device: std::env::var("PALIGEMMA_TEST_DEVICE").unwrap_or("cpu".into()), threads: 2, kv_type, context: 0 })
        .unwrap()
}

/// Tolerance on max |diff| / std(reference); looser on non-CPU backends.
fn tolerance() -> f64 {
    std::env::var("PALIGEMMA_TEST_TOL").ok().and_then(|s| s.parse().ok()).unwrap_or(1e-4)
}

#[test]
fn f32_matches_reference_per_stage() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let reference = reference_json(name);
        let gguf = convert_fixture(name, Type::F32, Type::F32, dir.path());
        let mut model = load(&gguf, KvType::F32);
        let size = model.config().vision.image_size;
        let pixels = PixelValues::from_chw(size, reference_tensor(name, "pixel_values")).unwrap();

        let stages = model.vision_stages(&pixels).unwrap();
        let vision = rel_max_diff(&stages.vision, &reference_tensor(name, "vision_out"));
        let projector = rel_max_diff(&stages.projector, &reference_tensor(name, "projector_out"));

        let ids = ids(&reference["input_ids"]);
        let emb = model.encode_pixels(&pixels).unwrap();
        let logits = model.prefix_logits(&emb, &ids).unwrap();
        let prefix = rel_max_diff(&logits, &reference_tensor(name, "prefix_logits"));

        let generation = model.generate_ids(&emb, &ids, &GenerateOptions { max_tokens: 20, ..Default::default() }, &mut |_, _| true).unwrap();
        let first = rel_max_diff(&generation.first_logits, &reference_tensor(name, "first_logits"));
        println!("{name}: vision {vision:.2e} projector {projector:.2e} prefix logits {prefix:.2e} first logits {first:.2e}");
        let tol = tolerance();
        assert!(vision < tol, "{name}: vision tower differs by {vision:e} of the reference's std");
        assert!(projector < tol, "{name}: projector differs by {projector:e}");
        assert!(prefix < tol, "{name}: prefix logits differ by {prefix:e}");
        assert!(first < tol, "{name}: first generated logits differ by {first:e}");
        assert_eq!(generation.tokens, common::ids(&reference["greedy_ids"]), "{name}: greedy ids");
    }
}
