//! Hyper-parameters of a PaliGemma model: read from a Hugging Face `config.json`
//! (with the defaults transformers applies to missing keys), written to and read
//! from GGUF metadata (see `docs/gguf-format.md`).
use crate::{Error, Result};
use ggml::gguf::{GgufFile, GgufHeader, Value};
use serde_json::Value as Json;
use std::path::Path;

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

/// Reads typed fields out of a JSON object, naming the file and field on error.
struct Fields<'a> {
    path: &'a Path,
    section: &'static str,
    obj: &'a Json,
}

impl Fields<'_> {
    fn err(&self, key: &str, expected: &str) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            detail: format!("field {}{key}: expected {expected}, found {}", self.section, self.obj.get(key).unwrap_or(&Json::Null)),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.obj.get(key) {
            None | Some(Json::Null) => Ok(default),
            // Every count is stored as a u32 in the GGUF.
            Some(v) => v.as_u64().filter(|&n| n > 0 && n <= u32::MAX as u64).map(|n| n as usize).ok_or_else(|| self.err(key, "a positive integer below 2^32")),
        }
    }

    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.obj.get(key) {
            None | Some(Json::Null) => Ok(default),
            Some(v) => v.as_f64().map(|n| n as f32).ok_or_else(|| self.err(key, "a number")),
        }
    }

    /// A nullable number: absent means `default`, null means none.
    fn opt_f32(&self, key: &str, default: Option<f32>) -> Result<Option<f32>> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(Json::Null) => Ok(None),
            Some(v) => v.as_f64().map(|n| Some(n as f32)).ok_or_else(|| self.err(key, "a number or null")),
        }
    }

    fn f32x3_or(&self, key: &str, default: [f32; 3]) -> Result<[f32; 3]> {
        match self.obj.get(key) {
            None | Some(Json::Null) => Ok(default),
            Some(Json::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
            Some(Json::Array(a)) if a.len() == 3 && a.iter().all(Json::is_number) => Ok([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0) as f32)),
            Some(_) => Err(self.err(key, "three numbers")),
        }
    }
}

/// Rounds `x` to the precision of a checkpoint dtype name (`bfloat16`, `float16`, `float32`).
pub fn round_to_dtype(x: f32, dtype: &str) -> f32 {
    match dtype {
        "bfloat16" | "BF16" => half::bf16::from_f32(x).to_f32(),
        "float16" | "F16" => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

impl Config {
    /// Builds the configuration from an HF checkpoint's `config.json` and (optional)
    /// `preprocessor_config.json`. Token ids come from the tokenizer (`lookup`);
    /// `weights_dtype` is the dtype of the stored embedding matrix.
    pub fn from_hf(config_path: &Path, preprocessor: Option<(&Path, &Json)>, lookup: &dyn Fn(&str) -> Option<u32>, weights_dtype: &str) -> Result<Config> {
        let text = std::fs::read_to_string(config_path).map_err(crate::error::io(config_path))?;
        let root: Json = serde_json::from_str(&text).map_err(|e| Error::Config { path: config_path.into(), detail: format!("not valid JSON: {e}") })?;
        Self::from_hf_json(config_path, &root, preprocessor, lookup, weights_dtype)
    }

    /// [`Config::from_hf`] of an already parsed `config.json` (`config_path` names it
    /// in errors).
    pub fn from_hf_json(
        config_path: &Path,
        root: &Json,
        preprocessor: Option<(&Path, &Json)>,
        lookup: &dyn Fn(&str) -> Option<u32>,
        weights_dtype: &str,
    ) -> Result<Config> {
        let cfg_err = |detail: String| Error::Config { path: config_path.into(), detail };
        match root.get("model_type").and_then(Json::as_str) {
            Some("paligemma") => {}
            Some(other) => {
                return Err(cfg_err(format!("model_type is {other:?}, expected \"paligemma\"")));
            }
            None => {
                return Err(cfg_err("field model_type is missing (expected \"paligemma\")".into()));
            }
        }
        let null = Json::Object(Default::default());
        let text_obj = root.get("text_config").unwrap_or(&null);
        let vision_obj = root.get("vision_config").unwrap_or(&null);
        let arch = match text_obj.get("model_type").and_then(Json::as_str).unwrap_or("gemma") {
            "gemma" => TextArch::Gemma,
            "gemma2" => TextArch::Gemma2,
            other => {
                return Err(cfg_err(format!("field text_config.model_type is {other:?}, expected \"gemma\" or \"gemma2\"")));
            }
        };
        let t = Fields { path: config_path, section: "text_config.", obj: text_obj };
        let v = Fields { path: config_path, section: "vision_config.", obj: vision_obj };
        let r = Fields { path: config_path, section: "", obj: root };

        // Defaults of transformers' PaliGemmaConfig / Gemma2Config / SiglipVisionConfig
        // for keys that hub configs leave out.
        let (d_width, d_depth, d_heads, d_kv, d_ffn) = match arch {
            TextArch::Gemma => (2048, 18, 8, 1, 16384),
            TextArch::Gemma2 => (2304, 26, 8, 4, 9216),
        };
        let width = t.usize_or("hidden_size", d_width)?;
        let depth = t.usize_or("num_hidden_layers", d_depth)?;
        // Bounded before the per-layer list below is built from it.
        if depth > crate::validate::MAX_LAYERS {
            return Err(t.err("num_hidden_layers", &format!("at most {} layers", crate::validate::MAX_LAYERS)));
        }
        let heads = t.usize_or("num_attention_heads", d_heads)?;
        let kv_heads = t.usize_or("num_key_value_heads", d_kv)?;
        let head_dim = t.usize_or("head_dim", 256)?;
        let rope_theta = match text_obj.get("rope_parameters").and_then(|p| p.get("rope_theta")) {
            Some(theta) => theta.as_f64().ok_or_else(|| t.err("rope_parameters.rope_theta", "a number"))? as f32,
            None => t.f32_or("rope_theta", 10000.0)?,
        };
        let (attn_softcap, final_softcap, sliding_window, sliding_layers, query_pre_attn_scalar) = match arch {
            TextArch::Gemma => (None, None, None, vec![false; depth], head_dim as f32),
            TextArch::Gemma2 => {
                let window = t.usize_or("sliding_window", 4096)?;
                let layers = match text_obj.get("layer_types") {
                    Some(Json::Array(types)) => {
                        if types.len() != depth {
                            return Err(t.err("layer_types", &format!("{depth} entries")));
                        }
                        types
                            .iter()
                            .map(|ty| match ty.as_str() {
                                Some("sliding_attention") => Ok(true),
                                Some("full_attention") => Ok(false),
                                _ => Err(t.err("layer_types", "\"sliding_attention\" or \"full_attention\" entries")),
                            })
                            .collect::<Result<Vec<_>>>()?
                    }
                    _ => (0..depth).map(|i| i % 2 == 0).collect(),
                };
                (
                    t.opt_f32("attn_logit_softcapping", Some(50.0))?,
                    t.opt_f32("final_logit_softcapping", Some(30.0))?,
                    Some(window),
                    layers,
                    t.f32_or("query_pre_attn_scalar", 256.0)?,
                )
            }
        };
        let vocab_size = t.usize_or("vocab_size", r.usize_or("vocab_size", 257216)?)?;
        let text_cfg = TextConfig {
            arch,
            width,
            depth,
            heads,
            kv_heads,
            head_dim,
            ffn: t.usize_or("intermediate_size", d_ffn)?,
            rms_eps: t.f32_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            query_pre_attn_scalar,
            attn_softcap,
            final_softcap,
            sliding_window,
            sliding_layers,
            context_length: t.usize_or("max_position_embeddings", 8192)?,
            vocab_size,
            embed_scale: round_to_dtype((width as f32).sqrt(), weights_dtype),
        };

        let (pp_path, pp) = preprocessor.map_or((config_path, &null), |(p, j)| (p, j));
        let p = Fields { path: pp_path, section: "", obj: pp };
        let image_size = v.usize_or("image_size", 224)?;
        if let Some(size) = pp.get("size") {
            let h = size.get("height").and_then(Json::as_u64);
            if h.is_some_and(|h| h as usize != image_size) {
                return Err(Error::Config {
                    path: pp_path.into(),
                    detail: format!("size.height {} disagrees with vision_config.image_size {image_size}", h.unwrap_or(0)),
                });
            }
        }
        let vision = VisionConfig {
            image_size,
            patch_size: v.usize_or("patch_size", 14)?,
            width: v.usize_or("hidden_size", 1152)?,
            depth: v.usize_or("num_hidden_layers", 27)?,
            heads: v.usize_or("num_attention_heads", 16)?,
            ffn: v.usize_or("intermediate_size", 4304)?,
            ln_eps: v.f32_or("layer_norm_eps", 1e-6)?,
            image_mean: p.f32x3_or("image_mean", [0.5; 3])?,
            image_std: p.f32x3_or("image_std", [0.5; 3])?,
            rescale: p.f32_or("rescale_factor", 1.0 / 255.0)?,
        };
        let token = |name: &str| lookup(name).ok_or_else(|| Error::Tokenizer(format!("the tokenizer has no {name} token")));
        let image_token_id = match root.get("image_token_id").or(root.get("image_token_index")) {
            Some(id) => id.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| r.err("image_token_id", "a token id below 2^32"))?,
            None => token("<image>")?,
        };
        let tokens = TokenConfig {
            image_token_id,
            image_token_count: vision.n_patches(),
            bos: token("<bos>")?,
            eos: token("<eos>")?,
            pad: token("<pad>")?,
            loc_first: lookup("<loc0000>"),
            seg_first: lookup("<seg000>"),
        };
        let projection_dim =
            vision_obj.get("projection_dim").and_then(Json::as_u64).or(root.get("projection_dim").and_then(Json::as_u64)).map_or(width, |d| d as usize);
        let name = root.get("_name_or_path").and_then(Json::as_str).filter(|s| !s.is_empty()).unwrap_or("paligemma").to_string();
        let config = Config { name, vision, projection_dim, text: text_cfg, tokens };
        // Consistency (heads, patches, projection width, token ids) is checked once, by
        // the validation the loader runs too.
        config.validate().map_err(|problem| cfg_err(format!("invalid hyper-parameters: {problem}")))?;
        Ok(config)
    }

    /// Writes the configuration as GGUF metadata.
    pub fn write_gguf(&self, h: &mut GgufHeader) {
        let u = |n: usize| Value::U32(n as u32);
        let f = Value::F32;
        h.set("general.architecture", Value::String(ARCHITECTURE.into()));
        h.set("general.name", Value::String(self.name.clone()));
        h.set("paligemma.format_version", Value::U32(FORMAT_VERSION));
        h.set("paligemma.text_arch", Value::String(self.text.arch.name().into()));
        let v = &self.vision;
        h.set("paligemma.vision.image_size", u(v.image_size));
        h.set("paligemma.vision.patch_size", u(v.patch_size));
        h.set("paligemma.vision.embedding_length", u(v.width));
        h.set("paligemma.vision.block_count", u(v.depth));
        h.set("paligemma.vision.attention.head_count", u(v.heads));
        h.set("paligemma.vision.feed_forward_length", u(v.ffn));
        h.set("paligemma.vision.attention.layer_norm_epsilon", f(v.ln_eps));
        h.set("paligemma.vision.image_mean", Value::Array(v.image_mean.iter().map(|&x| f(x)).collect()));
        h.set("paligemma.vision.image_std", Value::Array(v.image_std.iter().map(|&x| f(x)).collect()));
        h.set("paligemma.vision.rescale_factor", f(v.rescale));
        h.set("paligemma.vision.resize", Value::String("pil-bicubic".into()));
        h.set("paligemma.projection_dim", u(self.projection_dim));
        let t = &self.text;
        h.set("paligemma.text.embedding_length", u(t.width));
        h.set("paligemma.text.block_count", u(t.depth));
        h.set("paligemma.text.attention.head_count", u(t.heads));
        h.set("paligemma.text.attention.head_count_kv", u(t.kv_heads));
        h.set("paligemma.text.attention.key_length", u(t.head_dim));
        h.set("paligemma.text.attention.value_length", u(t.head_dim));
        h.set("paligemma.text.feed_forward_length", u(t.ffn));
        h.set("paligemma.text.attention.layer_norm_rms_epsilon", f(t.rms_eps));
        h.set("paligemma.text.rope.freq_base", f(t.rope_theta));
        h.set("paligemma.text.attention.query_pre_attn_scalar", f(t.query_pre_attn_scalar));
        h.set("paligemma.text.attn_logit_softcapping", f(t.attn_softcap.unwrap_or(0.0)));
        h.set("paligemma.text.final_logit_softcapping", f(t.final_softcap.unwrap_or(0.0)));
        h.set("paligemma.text.attention.sliding_window", u(t.sliding_window.unwrap_or(0)));
        h.set("paligemma.text.attention.sliding_layers", Value::Array(t.sliding_layers.iter().map(|&b| Value::Bool(b)).collect()));
        h.set("paligemma.text.context_length", u(t.context_length));
        h.set("paligemma.text.vocab_size", u(t.vocab_size));
        h.set("paligemma.text.embedding_scale", f(t.embed_scale));
        let k = &self.tokens;
        h.set("paligemma.image_token_id", Value::U32(k.image_token_id));
        h.set("paligemma.image_token_count", u(k.image_token_count));
        h.set("tokenizer.ggml.bos_token_id", Value::U32(k.bos));
        h.set("tokenizer.ggml.eos_token_id", Value::U32(k.eos));
        h.set("tokenizer.ggml.padding_token_id", Value::U32(k.pad));
        if let Some(id) = k.loc_first {
            h.set("paligemma.loc_token_first", Value::U32(id));
        }
        if let Some(id) = k.seg_first {
            h.set("paligemma.seg_token_first", Value::U32(id));
        }
    }

    /// Reads the configuration back from GGUF metadata, naming any missing or
    /// mistyped key.
    pub fn from_gguf(f: &GgufFile) -> Result<Config> {
        let err = |detail: String| Error::Model { path: f.path().into(), detail };
        match f.get("general.architecture").and_then(Value::as_str) {
            Some(ARCHITECTURE) => {}
            Some(other) => {
                return Err(err(format!("architecture is {other:?}, expected {ARCHITECTURE:?}")));
            }
            None => return Err(err("no general.architecture key: not a model file".into())),
        }
        let get = |key: &str| f.get(key).ok_or_else(|| err(format!("metadata key {key} is missing")));
        let int = |key: &str| -> Result<usize> {
            get(key)?
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .map(|v| v as usize)
                .ok_or_else(|| err(format!("metadata key {key} is not an integer below 2^32")))
        };
        let float = |key: &str| -> Result<f32> { get(key)?.as_f64().map(|v| v as f32).ok_or_else(|| err(format!("metadata key {key} is not a number"))) };
        let f3 = |key: &str| -> Result<[f32; 3]> {
            let a = get(key)?.as_array().filter(|a| a.len() == 3).ok_or_else(|| err(format!("metadata key {key} is not 3 numbers")))?;
            let v: Vec<f32> = a.iter().filter_map(|x| x.as_f64()).map(|x| x as f32).collect();
            v.try_into().map_err(|_| err(format!("metadata key {key} is not 3 numbers")))
        };
        let version = int("paligemma.format_version")?;
        if !(1..=FORMAT_VERSION).contains(&(version as u32)) {
            return Err(err(format!("format version {version}, this build reads versions 1 to {FORMAT_VERSION}: reconvert the checkpoint")));
        }
        let arch = match get("paligemma.text_arch")?.as_str() {
            Some("gemma") => TextArch::Gemma,
            Some("gemma2") => TextArch::Gemma2,
            other => {
                return Err(err(format!("paligemma.text_arch is {other:?}, expected \"gemma\" or \"gemma2\"")));
            }
        };
        let nonzero = |x: f32| (x != 0.0).then_some(x);
        let depth = int("paligemma.text.block_count")?;
        let sliding_layers: Vec<bool> = get("paligemma.text.attention.sliding_layers")?
            .as_array()
            .and_then(|a| a.iter().map(Value::as_bool).collect())
            .ok_or_else(|| err("metadata key paligemma.text.attention.sliding_layers is not an array of bools".into()))?;
        let vision = VisionConfig {
            image_size: int("paligemma.vision.image_size")?,
            patch_size: int("paligemma.vision.patch_size")?,
            width: int("paligemma.vision.embedding_length")?,
            depth: int("paligemma.vision.block_count")?,
            heads: int("paligemma.vision.attention.head_count")?,
            ffn: int("paligemma.vision.feed_forward_length")?,
            ln_eps: float("paligemma.vision.attention.layer_norm_epsilon")?,
            image_mean: f3("paligemma.vision.image_mean")?,
            image_std: f3("paligemma.vision.image_std")?,
            rescale: float("paligemma.vision.rescale_factor")?,
        };
        let text = TextConfig {
            arch,
            width: int("paligemma.text.embedding_length")?,
            depth,
            heads: int("paligemma.text.attention.head_count")?,
            kv_heads: int("paligemma.text.attention.head_count_kv")?,
            head_dim: int("paligemma.text.attention.key_length")?,
            ffn: int("paligemma.text.feed_forward_length")?,
            rms_eps: float("paligemma.text.attention.layer_norm_rms_epsilon")?,
            rope_theta: float("paligemma.text.rope.freq_base")?,
            query_pre_attn_scalar: float("paligemma.text.attention.query_pre_attn_scalar")?,
            attn_softcap: nonzero(float("paligemma.text.attn_logit_softcapping")?),
            final_softcap: nonzero(float("paligemma.text.final_logit_softcapping")?),
            sliding_window: Some(int("paligemma.text.attention.sliding_window")?).filter(|&w| w > 0),
            sliding_layers,
            context_length: int("paligemma.text.context_length")?,
            vocab_size: int("paligemma.text.vocab_size")?,
            embed_scale: float("paligemma.text.embedding_scale")?,
        };
        let id = |key: &str| int(key).map(|v| v as u32);
        let opt_id = |key: &str| f.get(key).map(|_| id(key)).transpose();
        let tokens = TokenConfig {
            image_token_id: id("paligemma.image_token_id")?,
            image_token_count: int("paligemma.image_token_count")?,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            loc_first: opt_id("paligemma.loc_token_first")?,
            seg_first: opt_id("paligemma.seg_token_first")?,
        };
        let name = f.get("general.name").and_then(Value::as_str).unwrap_or("paligemma").to_string();
        let config = Config { name, projection_dim: int("paligemma.projection_dim")?, vision, text, tokens };
        config.validate().map_err(|problem| err(format!("invalid hyper-parameters: {problem}")))?;
        Ok(config)
    }
}

/// Shapes of the published checkpoints, for benchmarks on random weights.
pub const NAMED_SHAPES: [&str; 6] = ["pg2-3b-224", "pg2-3b-448", "pg2-3b-896", "pg2-10b-224", "pg2-28b-224", "pg1-3b-224"];

impl Config {
    /// The configuration of a published model size (see [`NAMED_SHAPES`]) with the
    /// token ids of `tokens`.
    pub fn named(name: &str, mut tokens: TokenConfig) -> Result<Config> {
        let (family, size, px) = {
            let parts: Vec<&str> = name.split('-').collect();
            match parts[..] {
                [f, s, p] => (f, s, p.parse::<usize>().ok()),
                _ => ("", "", None),
            }
        };
        let err = || Error::Invalid(format!("unknown model shape {name:?} (expected one of {})", NAMED_SHAPES.join(", ")));
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
        Ok(Config { name: format!("random-{name}"), vision, projection_dim: w, text, tokens })
    }
}
