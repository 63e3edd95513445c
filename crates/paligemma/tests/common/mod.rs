//! Shared helpers for tests against the reference fixtures in tests/fixtures/.
#![allow(dead_code)]
use ggml::Type;
use paligemma::convert::{ConvertOptions, convert};
use std::path::{Path, PathBuf};

pub const FIXTURES: [&str; 3] = ["pg2_gqa", "pg2_mqa", "pg1"];

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn reference_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures_dir().join(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A reference tensor as f32 values.
pub fn reference_tensor(name: &str, tensor: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixtures_dir().join(name).join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st
        .tensor(tensor)
        .unwrap_or_else(|e| panic!("{name}: {tensor}: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Converts a fixture's HF folder to a GGUF of the given types in `dir`.
pub fn convert_fixture(name: &str, ty: Type, vision_ty: Type, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{name}-{ty}.gguf"));
    let opts = ConvertOptions {
        ty,
        vision_ty,
        seg_decoder: None,
        cancel: None,
    };
    convert(&fixtures_dir().join(name).join("hf"), &out, &opts, |_| {})
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    out
}

/// max |a - b| / std(b).
pub fn rel_max_diff(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    let n = want.len() as f64;
    let mean = want.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (want.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    let max = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    max / std
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// One answer to prefix ids, without streaming.
pub fn generate_ids(
    model: &mut paligemma::Model,
    emb: &paligemma::ImageEmbedding,
    ids: &[u32],
    opts: &paligemma::GenerateOptions,
) -> paligemma::Result<paligemma::Generation> {
    Ok(model
        .generate(emb, &[ids.to_vec()], opts, &mut |_| true)?
        .remove(0))
}

/// One answer to a prompt's text, without streaming.
pub fn generate(
    model: &mut paligemma::Model,
    emb: &paligemma::ImageEmbedding,
    prompt: &str,
    opts: &paligemma::GenerateOptions,
) -> paligemma::Result<paligemma::Generation> {
    let ids = model.tokenizer().prefix_ids(prompt)?;
    generate_ids(model, emb, &ids, opts)
}
