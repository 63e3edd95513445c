//! Hyper-parameters of a PaliGemma model: read from a Hugging Face `config.json` by
//! `hf_config.rs`, written to and read from GGUF metadata by `metadata.rs`, checked by
//! [`crate::validate`].
/// Version of our GGUF layout; bumped on any incompatible change. Version 2 may pad
/// weight rows with zero columns; version 3 may also pad the outputs that feed such
/// rows (SigLIP's `ffn_up`, see [`crate::convert`]). Versions 1 and 2 still load.
pub const FORMAT_VERSION: u32 = 3;
/// Value of `general.architecture` in the model files this crate writes and reads.
pub const ARCHITECTURE: &str = "paligemma";

/// The text decoder family: PaliGemma 1 uses Gemma, PaliGemma 2 Gemma 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TextArch {
    /// Gemma, the decoder of PaliGemma 1.
    Gemma,
    /// Gemma 2, the decoder of PaliGemma 2 (logit soft caps, sliding-window layers).
    Gemma2,
}

impl TextArch {
    /// Name as stored in the GGUF key `paligemma.text_arch` (`gemma` or `gemma2`).
    pub fn name(self) -> &'static str {
        match self {
            TextArch::Gemma => "gemma",
            TextArch::Gemma2 => "gemma2",
        }
    }
}

/// SigLIP vision tower.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VisionConfig {
    /// Side of the square input image in pixels (224, 448 or 896).
    pub image_size: usize,
    /// Side of a square patch in pixels (14); each patch becomes one image token.
    pub patch_size: usize,
    /// Hidden size of the vision tower (1152).
    pub width: usize,
    /// Number of encoder layers (27).
    pub depth: usize,
    /// Attention heads per layer (16).
    pub heads: usize,
    /// Inner size of each layer's MLP (4304).
    pub ffn: usize,
    /// Epsilon of the layer norms.
    pub ln_eps: f32,
    /// Per-channel (R, G, B) mean subtracted from the rescaled pixels (0.5).
    pub image_mean: [f32; 3],
    /// Per-channel (R, G, B) standard deviation the centred pixels are divided by (0.5).
    pub image_std: [f32; 3],
    /// Rescale factor applied to u8 pixels before normalising (1/255).
    pub rescale: f32,
}

impl VisionConfig {
    /// Patches along each side of the image (`image_size / patch_size`).
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patches in the image, one image token each (256 at 224 px).
    pub fn n_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }
}

/// Gemma / Gemma 2 decoder.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TextConfig {
    /// Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2).
    pub arch: TextArch,
    /// Hidden size of the decoder (2048 for PaliGemma 1; 2304, 3584 or 4608 for PaliGemma 2 3B, 10B, 28B).
    pub width: usize,
    /// Number of decoder layers.
    pub depth: usize,
    /// Query heads per layer.
    pub heads: usize,
    /// Key/value heads per layer (grouped-query attention; divides `heads`).
    pub kv_heads: usize,
    /// Size of each attention head (keys and values alike).
    pub head_dim: usize,
    /// Inner size of each layer's gated GELU MLP.
    pub ffn: usize,
    /// Epsilon of the RMS norms.
    pub rms_eps: f32,
    /// Base frequency of the rotary position embedding (10000).
    pub rope_theta: f32,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: f32,
    /// Gemma 2's attention logit soft cap (50); none for Gemma.
    pub attn_softcap: Option<f32>,
    /// Gemma 2's final logit soft cap (30), `cap * tanh(logit / cap)`; none for Gemma.
    pub final_softcap: Option<f32>,
    /// Attention window in tokens of the sliding-window layers (Gemma 2: 4096); none for Gemma.
    pub sliding_window: Option<usize>,
    /// Per layer: true when the layer uses the sliding window.
    pub sliding_layers: Vec<bool>,
    /// Longest sequence the model supports, in tokens (`max_position_embeddings`, 8192).
    pub context_length: usize,
    /// Rows of the embedding matrix (may exceed the tokenizer's vocabulary).
    pub vocab_size: usize,
    /// Factor the token embeddings are multiplied by: sqrt(width) rounded to the
    /// checkpoint's dtype, as the reference computes it.
    pub embed_scale: f32,
}

/// Special token ids and ranges, read from the tokenizer and config.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TokenConfig {
    /// Id of `<image>`, the placeholder repeated before the prompt for the image features.
    pub image_token_id: u32,
    /// Image tokens per prompt, one per patch (256 at 224 px, 1024 at 448, 4096 at 896).
    pub image_token_count: usize,
    /// Id of `<bos>`, which starts the prompt text.
    pub bos: u32,
    /// Id of `<eos>`, which ends an answer.
    pub eos: u32,
    /// Id of `<pad>` (never generated).
    pub pad: u32,
    /// Id of `<loc0000>`, the first of the 1024 location tokens; none when the tokenizer has no such token.
    pub loc_first: Option<u32>,
    /// Id of `<seg000>`, the first of the 128 segmentation tokens; none when the tokenizer has no such token.
    pub seg_first: Option<u32>,
}

/// Every hyper-parameter of a PaliGemma model: vision tower, projector, text decoder and
/// special tokens.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Config {
    /// Model name (`_name_or_path` of the checkpoint, `general.name` of the model file).
    pub name: String,
    /// The SigLIP vision tower.
    pub vision: VisionConfig,
    /// Projector output width (= text width).
    pub projection_dim: usize,
    /// The Gemma / Gemma 2 text decoder.
    pub text: TextConfig,
    /// Special token ids.
    pub tokens: TokenConfig,
}

/// Rounds `x` to the precision of a checkpoint dtype name (`bfloat16`, `float16`, `float32`).
pub fn round_to_dtype(x: f32, dtype: &str) -> f32 {
    match dtype {
        "bfloat16" | "BF16" => half::bf16::from_f32(x).to_f32(),
        "float16" | "F16" => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}
