//! The VQ-VAE mask decoder and pasting against the PyTorch / big_vision reference.
mod common;
use common::*;
use ggml::Type;
use paligemma::convert::{ConvertOptions, convert};
use paligemma::{ContextOptions, Model};

fn reference() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("vae/reference.json")).unwrap(),
    )
    .unwrap()
}

fn model_with_decoder(dir: &std::path::Path) -> Model {
    let out = dir.join("seg.gguf");
    let opts = ConvertOptions {
        ty: Type::F32,
        vision_ty: Type::F32,
        seg_decoder: Some(fixtures_dir().join("vae/vae-random.npz")),
        cancel: None,
    };
    convert(&fixtures_dir().join("pg2_gqa/hf"), &out, &opts, |_| {}).unwrap();
    Model::load(
        &out,
        &ContextOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn decoder_matches_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = model_with_decoder(dir.path());
    assert!(model.weights().has_segmentation());
    let mut worst = 0f32;
    for case in reference()["outputs"].as_array().unwrap() {
        let codes = ids(&case["codes"]);
        let got = model.decode_mask(&codes).unwrap();
        let want = floats(&case["output"]);
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        worst = worst.max(diff);
        assert!(diff < 1e-4, "{}: max abs difference {diff}", case["name"]);
    }
    println!("worst decoder difference: {worst:e}");
    assert!(model.decode_mask(&[1, 2, 3]).is_err());
    assert!(model.decode_mask(&[200; 16]).is_err());
}

/// The frame bitmap of a reference RLE (`[start, length, ...]` runs of ones).
fn frame_bits(rle: &serde_json::Value, w: usize, h: usize) -> Vec<bool> {
    let r = ids(rle);
    let mut bits = vec![false; w * h];
    for pair in r.chunks(2) {
        for i in pair[0]..pair[0] + pair[1] {
            bits[i as usize] = true;
        }
    }
    bits
}

#[test]
fn pasting_matches_big_vision_on_non_square_frames() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = model_with_decoder(dir.path());
    let reference = reference();
    for case in reference["pasting"]["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (w, h) = (
            case["frame"]["width"].as_u64().unwrap() as usize,
            case["frame"]["height"].as_u64().unwrap() as usize,
        );
        let bins = ids(&case["box_bins"]);
        let raw = model.decode_mask(&ids(&case["codes"])).unwrap();
        let want = &case["big_vision_eval"];
        let mask =
            paligemma::segment::paste(&raw, [bins[0], bins[1], bins[2], bins[3]], 1023.0, w, h);
        if !want["valid"].as_bool().unwrap() {
            assert!(mask.is_none(), "{name}: expected no mask");
            continue;
        }
        let mask = mask.unwrap_or_else(|| panic!("{name}: no mask"));
        let b = &want["box_px"];
        assert_eq!(
            (mask.x, mask.y, mask.x + mask.width, mask.y + mask.height),
            (
                b["x1"].as_u64().unwrap() as usize,
                b["y1"].as_u64().unwrap() as usize,
                b["x2"].as_u64().unwrap() as usize,
                b["y2"].as_u64().unwrap() as usize
            ),
            "{name}: box"
        );
        let mut got = vec![false; w * h];
        for (i, bit) in mask.to_bitmap().into_iter().enumerate() {
            got[(mask.y + i / mask.width) * w + mask.x + i % mask.width] = bit;
        }
        let want_bits = frame_bits(&want["rle"], w, h);
        let near_zero: std::collections::HashSet<usize> = case["big_vision_eval"]
            .get("near_zero")
            .or(case.get("near_zero"))
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as usize)
                    .collect()
            })
            .unwrap_or_default();
        let wrong: Vec<usize> = (0..w * h)
            .filter(|&i| got[i] != want_bits[i] && !near_zero.contains(&i))
            .collect();
        assert!(
            wrong.is_empty(),
            "{name}: {} pixels differ (first {:?})",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
}

#[test]
fn segment_task_end_to_end_and_without_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let reference = reference();
    let example = &reference["text_examples"][0];
    let text = example["output"].as_str().unwrap();
    let (w, h) = (
        example["frame"]["width"].as_u64().unwrap() as usize,
        example["frame"]["height"].as_u64().unwrap() as usize,
    );
    let r = paligemma::parse::parse_detections(text, w, h, 1023.0, true);
    let d = &r.detections()[0];
    let mut model = model_with_decoder(dir.path());
    let raw = model.decode_mask(d.seg_codes.as_ref().unwrap()).unwrap();
    let mask = paligemma::segment::paste(&raw, d.loc_bins, 1023.0, w, h).unwrap();
    assert!(mask.rle.len() > 2, "a non-trivial mask");

    // A model without the decoder still detects and says segmentation is unavailable.
    let plain = convert_fixture("pg2_gqa", Type::F16, Type::F16, dir.path());
    let mut model = Model::load(
        &plain,
        &ContextOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!model.weights().has_segmentation());
    assert!(
        model
            .decode_mask(&[0; 16])
            .unwrap_err()
            .to_string()
            .contains("no segmentation decoder")
    );
}

#[test]
fn bad_npz_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("vae.npz");
    std::fs::write(&bogus, b"PK\x03\x04 not really").unwrap();
    let out = dir.path().join("x.gguf");
    let opts = ConvertOptions {
        ty: Type::F16,
        vision_ty: Type::F16,
        seg_decoder: Some(bogus.clone()),
        cancel: None,
    };
    let e = convert(&fixtures_dir().join("pg2_gqa/hf"), &out, &opts, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("vae.npz"), "{e}");
    assert!(!out.exists());
}
