//! Hyper-parameters from a Hugging Face checkpoint's `config.json` and
//! `preprocessor_config.json`, with the defaults transformers applies to missing keys.
use crate::config::{Config, TextArch, TextConfig, TokenConfig, VisionConfig, round_to_dtype};
use crate::{Error, Result};
use serde_json::Value as Json;
use std::path::Path;

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
            detail: format!(
                "field {}{key}: expected {expected}, found {}",
                self.section,
                self.obj.get(key).unwrap_or(&Json::Null)
            ),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.obj.get(key) {
            None | Some(Json::Null) => Ok(default),
            // Every count is stored as a u32 in the GGUF.
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0 && n <= u32::MAX as u64)
                .map(|n| n as usize)
                .ok_or_else(|| self.err(key, "a positive integer below 2^32")),
        }
    }

    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.obj.get(key) {
            None | Some(Json::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|n| n as f32)
                .ok_or_else(|| self.err(key, "a number")),
        }
    }

    /// A nullable number: absent means `default`, null means none.
    fn opt_f32(&self, key: &str, default: Option<f32>) -> Result<Option<f32>> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|n| Some(n as f32))
                .ok_or_else(|| self.err(key, "a number or null")),
        }
    }

    fn f32x3_or(&self, key: &str, default: [f32; 3]) -> Result<[f32; 3]> {
        match self.obj.get(key) {
            None | Some(Json::Null) => Ok(default),
            Some(Json::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
            Some(Json::Array(a)) if a.len() == 3 && a.iter().all(Json::is_number) => {
                Ok([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0) as f32))
            }
            Some(_) => Err(self.err(key, "three numbers")),
        }
    }
}

impl Config {
    /// Builds the configuration from an HF checkpoint's `config.json` and (optional)
    /// `preprocessor_config.json`. Token ids come from the tokenizer (`lookup`);
    /// `weights_dtype` is the dtype of the stored embedding matrix.
    pub fn from_hf(
        config_path: &Path,
        preprocessor: Option<(&Path, &Json)>,
        lookup: &dyn Fn(&str) -> Option<u32>,
        weights_dtype: &str,
    ) -> Result<Config> {
        let text = std::fs::read_to_string(config_path).map_err(crate::error::io(config_path))?;
        let root: Json = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: config_path.into(),
            detail: format!("not valid JSON: {e}"),
        })?;
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
        let cfg_err = |detail: String| Error::Config {
            path: config_path.into(),
            detail,
        };
        match root.get("model_type").and_then(Json::as_str) {
            Some("paligemma") => {}
            Some(other) => {
                return Err(cfg_err(format!(
                    "model_type is {other:?}, expected \"paligemma\""
                )));
            }
            None => {
                return Err(cfg_err(
                    "field model_type is missing (expected \"paligemma\")".into(),
                ));
            }
        }
        let null = Json::Object(Default::default());
        let text_obj = root.get("text_config").unwrap_or(&null);
        let vision_obj = root.get("vision_config").unwrap_or(&null);
        let arch = match text_obj
            .get("model_type")
            .and_then(Json::as_str)
            .unwrap_or("gemma")
        {
            "gemma" => TextArch::Gemma,
            "gemma2" => TextArch::Gemma2,
            other => {
                return Err(cfg_err(format!(
                    "field text_config.model_type is {other:?}, expected \"gemma\" or \"gemma2\""
                )));
            }
        };
        let t = Fields {
            path: config_path,
            section: "text_config.",
            obj: text_obj,
        };
        let v = Fields {
            path: config_path,
            section: "vision_config.",
            obj: vision_obj,
        };
        let r = Fields {
            path: config_path,
            section: "",
            obj: root,
        };

        // Defaults of transformers' PaliGemmaConfig / Gemma2Config / SiglipVisionConfig
        // for keys that hub configs leave out.
        let (d_width, d_depth, d_heads, d_kv, d_ffn) = match arch {
            TextArch::Gemma => (2048, 18, 8, 1, 16384),
            TextArch::Gemma2 => (2304, 26, 8, 4, 9216),
        };
        let width = t.usize_or("hidden_size", d_width)?;
        let depth = t.usize_or("num_hidden_layers", d_depth)?;
        // Bounded before the per-layer list below is built from it.
        if depth > crate::limits::MAX_LAYERS {
            return Err(t.err(
                "num_hidden_layers",
                &format!("at most {} layers", crate::limits::MAX_LAYERS),
            ));
        }
        let heads = t.usize_or("num_attention_heads", d_heads)?;
        let kv_heads = t.usize_or("num_key_value_heads", d_kv)?;
        let head_dim = t.usize_or("head_dim", 256)?;
        let rope_theta = match text_obj
            .get("rope_parameters")
            .and_then(|p| p.get("rope_theta"))
        {
            Some(theta) => theta
                .as_f64()
                .ok_or_else(|| t.err("rope_parameters.rope_theta", "a number"))?
                as f32,
            None => t.f32_or("rope_theta", 10000.0)?,
        };
        let (attn_softcap, final_softcap, sliding_window, sliding_layers, query_pre_attn_scalar) =
            match arch {
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
                                    _ => Err(t.err(
                                        "layer_types",
                                        "\"sliding_attention\" or \"full_attention\" entries",
                                    )),
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
        let p = Fields {
            path: pp_path,
            section: "",
            obj: pp,
        };
        let image_size = v.usize_or("image_size", 224)?;
        if let Some(size) = pp.get("size") {
            let h = size.get("height").and_then(Json::as_u64);
            if h.is_some_and(|h| h as usize != image_size) {
                return Err(Error::Config {
                    path: pp_path.into(),
                    detail: format!(
                        "size.height {} disagrees with vision_config.image_size {image_size}",
                        h.unwrap_or(0)
                    ),
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
        let token = |name: &str| {
            lookup(name)
                .ok_or_else(|| Error::Tokenizer(format!("the tokenizer has no {name} token")))
        };
        let image_token_id = match root.get("image_token_id").or(root.get("image_token_index")) {
            Some(id) => id
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| r.err("image_token_id", "a token id below 2^32"))?,
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
        let projection_dim = vision_obj
            .get("projection_dim")
            .and_then(Json::as_u64)
            .or(root.get("projection_dim").and_then(Json::as_u64))
            .map_or(width, |d| d as usize);
        let name = root
            .get("_name_or_path")
            .and_then(Json::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("paligemma")
            .to_string();
        let config = Config {
            name,
            vision,
            projection_dim,
            text: text_cfg,
            tokens,
        };
        // Consistency (heads, patches, projection width, token ids) is checked once, by
        // the validation the loader runs too.
        config
            .validate()
            .map_err(|problem| cfg_err(format!("invalid hyper-parameters: {problem}")))?;
        Ok(config)
    }
}
