//! Hyper-parameters as GGUF metadata: written by the converter, read back by the
//! loader and the validation, naming any missing or mistyped key (see
//! `docs/gguf-format.md`).
use crate::config::{
    ARCHITECTURE, Config, FORMAT_VERSION, TextArch, TextConfig, TokenConfig, VisionConfig,
};
use crate::{Error, Result};
use ggml::gguf::{GgufFile, GgufHeader, Value};

impl Config {
    /// Writes the configuration as GGUF metadata.
    pub fn write_gguf(&self, h: &mut GgufHeader) {
        let u = |n: usize| Value::U32(n as u32);
        let f = Value::F32;
        h.set("general.architecture", Value::String(ARCHITECTURE.into()));
        h.set("general.name", Value::String(self.name.clone()));
        h.set("paligemma.format_version", Value::U32(FORMAT_VERSION));
        h.set(
            "paligemma.text_arch",
            Value::String(self.text.arch.name().into()),
        );
        let v = &self.vision;
        h.set("paligemma.vision.image_size", u(v.image_size));
        h.set("paligemma.vision.patch_size", u(v.patch_size));
        h.set("paligemma.vision.embedding_length", u(v.width));
        h.set("paligemma.vision.block_count", u(v.depth));
        h.set("paligemma.vision.attention.head_count", u(v.heads));
        h.set("paligemma.vision.feed_forward_length", u(v.ffn));
        h.set("paligemma.vision.attention.layer_norm_epsilon", f(v.ln_eps));
        h.set(
            "paligemma.vision.image_mean",
            Value::Array(v.image_mean.iter().map(|&x| f(x)).collect()),
        );
        h.set(
            "paligemma.vision.image_std",
            Value::Array(v.image_std.iter().map(|&x| f(x)).collect()),
        );
        h.set("paligemma.vision.rescale_factor", f(v.rescale));
        h.set(
            "paligemma.vision.resize",
            Value::String("pil-bicubic".into()),
        );
        h.set("paligemma.projection_dim", u(self.projection_dim));
        let t = &self.text;
        h.set("paligemma.text.embedding_length", u(t.width));
        h.set("paligemma.text.block_count", u(t.depth));
        h.set("paligemma.text.attention.head_count", u(t.heads));
        h.set("paligemma.text.attention.head_count_kv", u(t.kv_heads));
        h.set("paligemma.text.attention.key_length", u(t.head_dim));
        h.set("paligemma.text.attention.value_length", u(t.head_dim));
        h.set("paligemma.text.feed_forward_length", u(t.ffn));
        h.set(
            "paligemma.text.attention.layer_norm_rms_epsilon",
            f(t.rms_eps),
        );
        h.set("paligemma.text.rope.freq_base", f(t.rope_theta));
        h.set(
            "paligemma.text.attention.query_pre_attn_scalar",
            f(t.query_pre_attn_scalar),
        );
        h.set(
            "paligemma.text.attn_logit_softcapping",
            f(t.attn_softcap.unwrap_or(0.0)),
        );
        h.set(
            "paligemma.text.final_logit_softcapping",
            f(t.final_softcap.unwrap_or(0.0)),
        );
        h.set(
            "paligemma.text.attention.sliding_window",
            u(t.sliding_window.unwrap_or(0)),
        );
        h.set(
            "paligemma.text.attention.sliding_layers",
            Value::Array(t.sliding_layers.iter().map(|&b| Value::Bool(b)).collect()),
        );
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
        let err = |detail: String| Error::Model {
            path: f.path().into(),
            detail,
        };
        match f.get("general.architecture").and_then(Value::as_str) {
            Some(ARCHITECTURE) => {}
            Some(other) => {
                return Err(err(format!(
                    "architecture is {other:?}, expected {ARCHITECTURE:?}"
                )));
            }
            None => return Err(err("no general.architecture key: not a model file".into())),
        }
        let get = |key: &str| {
            f.get(key)
                .ok_or_else(|| err(format!("metadata key {key} is missing")))
        };
        let int = |key: &str| -> Result<usize> {
            get(key)?
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .map(|v| v as usize)
                .ok_or_else(|| err(format!("metadata key {key} is not an integer below 2^32")))
        };
        let float = |key: &str| -> Result<f32> {
            get(key)?
                .as_f64()
                .map(|v| v as f32)
                .ok_or_else(|| err(format!("metadata key {key} is not a number")))
        };
        let f3 = |key: &str| -> Result<[f32; 3]> {
            let a = get(key)?
                .as_array()
                .filter(|a| a.len() == 3)
                .ok_or_else(|| err(format!("metadata key {key} is not 3 numbers")))?;
            let v: Vec<f32> = a
                .iter()
                .filter_map(|x| x.as_f64())
                .map(|x| x as f32)
                .collect();
            v.try_into()
                .map_err(|_| err(format!("metadata key {key} is not 3 numbers")))
        };
        let version = int("paligemma.format_version")?;
        if !(1..=FORMAT_VERSION).contains(&(version as u32)) {
            return Err(err(format!(
                "format version {version}, this build reads versions 1 to {FORMAT_VERSION}: reconvert the checkpoint"
            )));
        }
        let arch = match get("paligemma.text_arch")?.as_str() {
            Some("gemma") => TextArch::Gemma,
            Some("gemma2") => TextArch::Gemma2,
            other => {
                return Err(err(format!(
                    "paligemma.text_arch is {other:?}, expected \"gemma\" or \"gemma2\""
                )));
            }
        };
        let nonzero = |x: f32| (x != 0.0).then_some(x);
        let depth = int("paligemma.text.block_count")?;
        let sliding_layers: Vec<bool> = get("paligemma.text.attention.sliding_layers")?
            .as_array()
            .and_then(|a| a.iter().map(Value::as_bool).collect())
            .ok_or_else(|| {
                err(
                    "metadata key paligemma.text.attention.sliding_layers is not an array of bools"
                        .into(),
                )
            })?;
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
            sliding_window: Some(int("paligemma.text.attention.sliding_window")?)
                .filter(|&w| w > 0),
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
        let name = f
            .get("general.name")
            .and_then(Value::as_str)
            .unwrap_or("paligemma")
            .to_string();
        let config = Config {
            name,
            projection_dim: int("paligemma.projection_dim")?,
            vision,
            text,
            tokens,
        };
        config
            .validate()
            .map_err(|problem| err(format!("invalid hyper-parameters: {problem}")))?;
        Ok(config)
    }
}
