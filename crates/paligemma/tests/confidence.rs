//! Confidences: each generated token's probability, a score per detection, the mean
//! log-probability of an answer.
mod common;
use common::convert_fixture;
use ggml::Type;
use paligemma::preprocess::RgbImage;
use paligemma::{AnswerOptions, ContextOptions, Model, Task};

#[test]
fn token_probabilities_and_detection_scores() {
    let dir = tempfile::tempdir().unwrap();
    let path = convert_fixture("pg2_gqa", Type::F32, Type::F32, dir.path());
    let mut model = Model::load(
        &path,
        &ContextOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let image = RgbImage::open(&common::fixtures_dir().join("images/rgb.png")).unwrap();
    let emb = model.encode_image(&image).unwrap();
    let opts = AnswerOptions {
        max_tokens: 24,
        ..Default::default()
    };
    let answer = model
        .answer(&emb, &Task::parse("detect cat ; dog").unwrap(), &opts)
        .unwrap();
    let g = &answer.generation;
    assert_eq!(g.token_probs.len(), g.tokens.len());
    assert!(
        g.token_probs.iter().all(|p| *p > 0.0 && *p <= 1.0),
        "{:?}",
        g.token_probs
    );
    // The first token's probability is the softmax of the first (soft-capped) logits
    // over the ids an answer may hold (not <image>, <pad>, <bos>).
    let k = model.config().tokens.clone();
    let max = g
        .first_logits
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let allowed = |id: usize| ![k.image_token_id, k.pad, k.bos].contains(&(id as u32));
    let total: f64 = g
        .first_logits
        .iter()
        .enumerate()
        .filter(|(id, _)| allowed(*id))
        .map(|(_, &l)| (l as f64 - max).exp())
        .sum();
    let want = (g.first_logits[g.tokens[0] as usize] as f64 - max).exp() / total;
    assert!(
        (g.token_probs[0] as f64 - want).abs() < 1e-5,
        "{} vs {want}",
        g.token_probs[0]
    );
    // Greedy picks the most probable token.
    assert!(
        g.first_logits
            .iter()
            .all(|&l| l <= g.first_logits[g.tokens[0] as usize])
    );
    let mean = g.token_probs.iter().map(|p| (*p as f64).ln()).sum::<f64>() / g.tokens.len() as f64;
    assert!((g.mean_logprob().unwrap() as f64 - mean).abs() < 1e-4);
    for d in answer.result.detections() {
        let s = d.score.expect("a detection from the model has a score");
        assert!(s > 0.0 && s <= 1.0, "{s}");
    }
    println!(
        "{:?} -> {:?}, mean log-prob {:?}",
        g.text,
        answer.result,
        g.mean_logprob()
    );
}
