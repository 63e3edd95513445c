//! The converter: f32 round trips and bad checkpoints.
mod common;
use common::*;
use ggml::Type;
use ggml::gguf::GgufFile;
use paligemma::convert::{ConvertOptions, canonical_name, convert, parse_weight_type};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// All checkpoint tensors of a fixture as (canonical name -> (shape, f32 values)).
fn checkpoint_tensors(name: &str) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let dir = fixtures_dir().join(name).join("hf");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (key, view) in st.tensors() {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            out.insert(
                canonical_name(&key).unwrap(),
                (view.shape().to_vec(), values),
            );
        }
    }
    out
}

#[test]
fn f32_conversion_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let gguf_path = convert_fixture(name, Type::F32, Type::F32, dir.path());
        let gguf = GgufFile::open(&gguf_path).unwrap();
        let ckpt = checkpoint_tensors(name);
        let mut matched = 0;
        for (canon, (shape, values)) in &ckpt {
            let gname = gguf_name(canon, name == "pg1");
            let info = gguf
                .tensor(&gname)
                .unwrap_or_else(|| panic!("{name}: {gname} missing"));
            assert_eq!(info.ty, Type::F32, "{gname}");
            let rev: Vec<usize> = shape.iter().rev().copied().collect();
            assert_eq!(info.shape, rev, "{gname}");
            let got = gguf.tensor_f32(&gname).unwrap();
            // Gemma's RMSNorm weights are stored as 1 + w.
            let is_rms = canon.starts_with("text.") && canon.contains("norm");
            let want: Vec<u32> = values
                .iter()
                .map(|&v| {
                    if is_rms {
                        (v + 1.0).to_bits()
                    } else {
                        v.to_bits()
                    }
                })
                .collect();
            assert!(
                got.iter().map(|v| v.to_bits()).eq(want.iter().copied()),
                "{name}: {gname} differs"
            );
            matched += 1;
        }
        assert_eq!(
            matched,
            gguf.tensors.len(),
            "{name}: every GGUF tensor comes from the checkpoint"
        );
    }
}

/// Our GGUF name for a canonical checkpoint name: the converter's table, restated
/// independently so that a mistake in one shows up against the other.
fn gguf_name(canon: &str, gemma1: bool) -> String {
    let globals = [
        ("vision.embeddings.patch_embedding.", "v.patch_embd."),
        ("vision.embeddings.position_embedding.", "v.position_embd."),
        ("vision.post_layernorm.", "v.post_ln."),
        ("projector.", "mm."),
        ("text.embed_tokens.", "token_embd."),
        ("text.norm.", "output_norm."),
    ];
    for (from, to) in globals {
        if let Some(rest) = canon.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    let (prefix, layers, table): (&str, &str, &[(&str, &str)]) = if canon.starts_with("vision.") {
        (
            "v.blk",
            "vision.encoder.layers.",
            &[
                ("layer_norm1", "ln1"),
                ("layer_norm2", "ln2"),
                ("self_attn.q_proj", "attn_q"),
                ("self_attn.k_proj", "attn_k"),
                ("self_attn.v_proj", "attn_v"),
                ("self_attn.out_proj", "attn_out"),
                ("mlp.fc1", "ffn_up"),
                ("mlp.fc2", "ffn_down"),
            ],
        )
    } else {
        (
            "blk",
            "text.layers.",
            &[
                ("input_layernorm", "attn_norm"),
                ("self_attn.q_proj", "attn_q"),
                ("self_attn.k_proj", "attn_k"),
                ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_output"),
                ("pre_feedforward_layernorm", "ffn_norm"),
                ("post_feedforward_layernorm", "post_ffw_norm"),
                ("mlp.gate_proj", "ffn_gate"),
                ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
                // Gemma 1's post_attention_layernorm is its pre-MLP norm.
                (
                    "post_attention_layernorm",
                    if gemma1 {
                        "ffn_norm"
                    } else {
                        "post_attention_norm"
                    },
                ),
            ],
        )
    };
    let rest = canon
        .strip_prefix(layers)
        .unwrap_or_else(|| panic!("{canon}"));
    let (layer, rest) = rest.split_once('.').unwrap();
    let (base, suffix) = rest.rsplit_once('.').unwrap();
    let (_, to) = table
        .iter()
        .find(|(from, _)| *from == base)
        .unwrap_or_else(|| panic!("{canon}"));
    format!("{prefix}.{layer}.{to}.{suffix}")
}

/// A copy of a fixture's HF folder that a test may damage.
fn scratch_checkpoint(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("hf");
    std::fs::create_dir(&dst).unwrap();
    for entry in std::fs::read_dir(fixtures_dir().join(name).join("hf")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    (tmp, dst)
}

/// Rewrites model.safetensors through `edit` (name -> (shape, bytes)).
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, data))| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn convert_err(dir: &Path, ty: &str) -> String {
    let out = dir.parent().unwrap().join("out.gguf");
    let result = parse_weight_type(ty).and_then(|ty| {
        convert(
            dir,
            &out,
            &ConvertOptions {
                ty,
                vision_ty: Type::F16,
                seg_decoder: None,
                cancel: None,
            },
            |_| {},
        )
    });
    let err = result.expect_err("conversion must fail").to_string();
    assert!(!out.exists(), "no partial output after: {err}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n != "hf")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    err
}

#[test]
fn folder_without_config() {
    let (_tmp, dir) = scratch_checkpoint("pg2_gqa");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = convert_err(&dir, "f16");
    assert!(e.contains("no config.json"), "{e}");
}

#[test]
fn unknown_model_type() {
    let (_tmp, dir) = scratch_checkpoint("pg2_gqa");
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"model_type\": \"paligemma\"", "\"model_type\": \"llava\"");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let e = convert_err(&dir, "f16");
    assert!(
        e.contains("config.json") && e.contains("llava") && e.contains("paligemma"),
        "{e}"
    );
}

#[test]
fn tensor_with_wrong_shape() {
    let (_tmp, dir) = scratch_checkpoint("pg2_gqa");
    rewrite_weights(&dir, |t| {
        let key = t
            .keys()
            .find(|k| k.ends_with("layers.1.mlp.up_proj.weight"))
            .unwrap()
            .clone();
        let (shape, data) = t.get_mut(&key).unwrap();
        shape.swap(0, 1);
        let _ = data;
    });
    let e = convert_err(&dir, "f16");
    assert!(
        e.contains("layers.1.mlp.up_proj.weight")
            && e.contains("shape [64, 96]")
            && e.contains("expected [96, 64]"),
        "{e}"
    );
}

#[test]
fn missing_tensor() {
    let (_tmp, dir) = scratch_checkpoint("pg2_gqa");
    rewrite_weights(&dir, |t| {
        let key = t
            .keys()
            .find(|k| k.ends_with("layers.2.self_attn.k_proj.weight"))
            .unwrap()
            .clone();
        t.remove(&key);
    });
    let e = convert_err(&dir, "q8_0");
    assert!(
        e.contains("text.layers.2.self_attn.k_proj.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors() {
    let (_tmp, dir) = scratch_checkpoint("pg2_gqa");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = convert_err(&dir, "f16");
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors file"),
        "{e}"
    );
}

#[test]
fn unknown_type() {
    let (_tmp, dir) = scratch_checkpoint("pg2_gqa");
    let e = convert_err(&dir, "q3_xs");
    assert!(e.contains("q3_xs") && e.contains("q4_k"), "{e}");
}

#[test]
fn quantized_types_fall_back_where_rows_do_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert_fixture("pg2_gqa", Type::Q4_K, Type::Q8_0, dir.path());
    let f = GgufFile::open(&path).unwrap();
    let ty = |n: &str| f.tensor(n).unwrap().ty;
    assert_eq!(ty("blk.0.attn_norm.weight"), Type::F32, "norms stay f32");
    assert_eq!(ty("v.position_embd.weight"), Type::F32);
    assert_eq!(
        ty("blk.0.ffn_up.weight"),
        Type::Q5_0,
        "64-wide rows cannot hold 256-wide K blocks"
    );
    assert_eq!(ty("v.blk.0.attn_q.weight"), Type::Q8_0);
    assert_eq!(
        ty("v.patch_embd.weight"),
        Type::F16,
        "14-wide kernel rows fall back to f16"
    );
    // 48-wide rows fit no q8_0 block: the matrix is stored padded with zero columns.
    let down = f.tensor("v.blk.0.ffn_down.weight").unwrap();
    assert_eq!((down.ty, down.shape.clone()), (Type::Q8_0, vec![64, 32]));
    let rows = ggml::to_f32(down.ty, f.tensor_data(down), 64 * 32).unwrap();
    assert!(
        rows.chunks(64).all(|r| r[48..].iter().all(|&v| v == 0.0)),
        "padding columns are zero"
    );
    // The MLP's first matrix and its bias give 64 outputs to match, the extra ones zero.
    let (up, bias) = (
        f.tensor("v.blk.0.ffn_up.weight").unwrap(),
        f.tensor("v.blk.0.ffn_up.bias").unwrap(),
    );
    assert_eq!(
        (up.shape.clone(), bias.shape.clone()),
        (vec![32, 64], vec![64])
    );
    let up_rows = ggml::to_f32(up.ty, f.tensor_data(up), 32 * 64).unwrap();
    assert!(
        up_rows[48 * 32..].iter().all(|&v| v == 0.0)
            && up_rows[..48 * 32].iter().any(|&v| v != 0.0)
    );
    assert!(
        f.tensor_f32("v.blk.0.ffn_up.bias").unwrap()[48..]
            .iter()
            .all(|&v| v == 0.0)
    );
}

/// A format version 2 file (SigLIP's `ffn_up` outputs not padded, so the graph pads
/// `ffn_down`'s input instead) still loads and computes what version 3 computes.
#[test]
fn version_2_files_with_unpadded_outputs_still_load() {
    use paligemma::{ContextOptions, GenerateOptions, Model};
    let dir = tempfile::tempdir().unwrap();
    let v3 = convert_fixture("pg2_gqa", Type::Q8_0, Type::Q8_0, dir.path());
    let v2 = dir.path().join("v2.gguf");
    GgufFile::open(&v3)
        .unwrap()
        .rewrite(&v2, |meta, tensors| {
            meta.iter_mut()
                .filter(|(k, _)| k == "paligemma.format_version")
                .for_each(|(_, v)| *v = ggml::gguf::Value::U32(2));
            for (name, _, shape) in tensors
                .iter_mut()
                .filter(|(n, ..)| n.starts_with("v.blk.") && n.contains(".ffn_up."))
            {
                *shape.last_mut().unwrap() = 48;
                assert!(name.ends_with("weight") || shape.len() == 1);
            }
        })
        .unwrap();
    let image =
        paligemma::preprocess::RgbImage::open(&fixtures_dir().join("images/photo.jpg")).unwrap();
    let run = |path: &Path| {
        let mut model = Model::load(
            path,
            &ContextOptions {
                threads: 2,
                ..Default::default()
            },
        )
        .unwrap();
        let emb = model.encode_image(&image).unwrap();
        let tokens = generate(
            &mut model,
            &emb,
            "caption en",
            &GenerateOptions {
                max_tokens: 8,
                ..Default::default()
            },
        )
        .unwrap()
        .tokens;
        (emb.features, tokens)
    };
    let ((f3, t3), (f2, t2)) = (run(&v3), run(&v2));
    assert_eq!(
        GgufFile::open(&v2)
            .unwrap()
            .tensor("v.blk.0.ffn_up.bias")
            .unwrap()
            .shape,
        vec![48]
    );
    assert!(rel_max_diff(&f2, &f3) < 1e-6, "{}", rel_max_diff(&f2, &f3));
    assert_eq!(t2, t3);
}
