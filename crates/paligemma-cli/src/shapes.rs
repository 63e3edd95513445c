//! The shapes of the published checkpoints, for benchmarks on random weights
//! (`paligemma bench --random SHAPE`): the hyper-parameters of each, from its
//! `config.json`, with the tokenizer of the file the weights are written with.
use anyhow::Result;
use paligemma::config::{Config, TextArch, TextConfig, TokenConfig, VisionConfig, round_to_dtype};

/// Shapes of the published checkpoints, for benchmarks on random weights.
pub const NAMED_SHAPES: [&str; 6] = [
    "pg2-3b-224",
    "pg2-3b-448",
    "pg2-3b-896",
    "pg2-10b-224",
    "pg2-28b-224",
    "pg1-3b-224",
];

/// The configuration of a published model size (see [`NAMED_SHAPES`]) with the token
/// ids of `tokens`.
pub fn named(name: &str, mut tokens: TokenConfig) -> Result<Config> {
    let (family, size, px) = {
        let parts: Vec<&str> = name.split('-').collect();
        match parts[..] {
            [f, s, p] => (f, s, p.parse::<usize>().ok()),
            _ => ("", "", None),
        }
    };
    let err = || {
        anyhow::anyhow!(format!(
            "unknown model shape {name:?} (expected one of {})",
            NAMED_SHAPES.join(", ")
        ))
    };
    let image_size = px.filter(|p| [224, 448, 896].contains(p)).ok_or_else(err)?;
    // width, layers, heads, kv heads, head_dim, ffn, query scalar
    let (arch, w, l, h, kv, hd, ffn, qs) = match (family, size) {
        ("pg1", "3b") => (TextArch::Gemma, 2048, 18, 8, 1, 256, 16384, 256.0),
        ("pg2", "3b") => (TextArch::Gemma2, 2304, 26, 8, 4, 256, 9216, 256.0),
        ("pg2", "10b") => (TextArch::Gemma2, 3584, 42, 16, 8, 256, 14336, 256.0),
        ("pg2", "28b") => (TextArch::Gemma2, 4608, 46, 32, 16, 128, 36864, 144.0),
        _ => return Err(err()),
    };
    let vision = VisionConfig {
        image_size,
        patch_size: 14,
        width: 1152,
        depth: 27,
        heads: 16,
        ffn: 4304,
        ln_eps: 1e-6,
        image_mean: [0.5; 3],
        image_std: [0.5; 3],
        rescale: 1.0 / 255.0,
    };
    tokens.image_token_count = vision.n_patches();
    let gemma2 = arch == TextArch::Gemma2;
    let text = TextConfig {
        arch,
        width: w,
        depth: l,
        heads: h,
        kv_heads: kv,
        head_dim: hd,
        ffn,
        rms_eps: 1e-6,
        rope_theta: 10000.0,
        query_pre_attn_scalar: qs,
        attn_softcap: gemma2.then_some(50.0),
        final_softcap: gemma2.then_some(30.0),
        sliding_window: gemma2.then_some(4096),
        sliding_layers: (0..l).map(|i| gemma2 && i % 2 == 0).collect(),
        context_length: 8192,
        vocab_size: 257216,
        embed_scale: round_to_dtype((w as f32).sqrt(), "bfloat16"),
    };
    Ok(Config {
        name: format!("random-{name}"),
        vision,
        projection_dim: w,
        text,
        tokens,
    })
}
