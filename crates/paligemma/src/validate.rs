//! Everything a model must satisfy before any graph is built from it, in one place
//! shared by [`crate::Model::load`], `paligemma info` and the converter.
//!
//! ggml checks its inputs with assertions that abort the process (a norm stored as
//! q4_0, a negative epsilon) or not at all (a matrix of a type without a CPU dot
//! product calls a null function pointer). A model is read by robots and video
//! applications inside their own process, so every property the graphs rely on is
//! checked here first: hyper-parameters bounded and consistent (before anything is
//! allocated from them), every tensor present with its shape and a type its ops take,
//! special token ids inside the vocabulary. A file that passes runs; a file that fails
//! gets an error naming the key or tensor and what was expected.
use crate::config::Config;
use crate::format::names::{PATCH_EMBD, POSITION_EMBD};
pub use crate::limits::*;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use ggml::Type;
use ggml::gguf::{GgufFile, TensorInfo};

/// Types a weight matrix may have: the ones the converter writes (with its
/// fallbacks) and every backend's `mul_mat` and `get_rows` take.
pub const MATRIX_TYPES: [Type; 10] = [
    Type::F32,
    Type::F16,
    Type::BF16,
    Type::Q8_0,
    Type::Q4_0,
    Type::Q5_0,
    Type::Q5_1,
    Type::Q4_K,
    Type::Q5_K,
    Type::Q6_K,
];

/// How a tensor is used by the graphs, which decides the types it may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Read by matrix products (and, for the token embedding, by row lookups).
    Matrix,
    /// The patch embedding, read by `im2col` and a matrix product: f32, f16 or bf16.
    ConvKernel,
    /// Norm weights, biases, the position table and the mask decoder: added or
    /// multiplied element-wise, f32 only.
    Float,
}

impl Role {
    fn of(name: &str, dims: usize) -> Role {
        if name.strip_suffix(".weight") == Some(PATCH_EMBD) {
            Role::ConvKernel
        } else if dims == 2 && name != POSITION_EMBD && !name.starts_with("seg.") {
            Role::Matrix
        } else {
            Role::Float
        }
    }

    fn allowed(self) -> &'static [Type] {
        match self {
            Role::Matrix => &MATRIX_TYPES,
            Role::ConvKernel => &[Type::F32, Type::F16, Type::BF16],
            Role::Float => &[Type::F32],
        }
    }
}

fn names(types: &[Type]) -> String {
    types
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A problem found by validation: the key or tensor, and what was wrong.
pub type Problem = String;

/// Reads a model file's configuration and tokenizer and validates them and its tensor
/// table: what [`crate::Model::load`] and `paligemma info` accept.
pub fn model_file(gguf: &GgufFile) -> Result<(Config, Tokenizer)> {
    let config = Config::from_gguf(gguf)?;
    let model_err = |detail: String| Error::Model {
        path: gguf.path().into(),
        detail,
    };
    tensors(&config, &gguf.tensors).map_err(model_err)?;
    let json = gguf
        .get("tokenizer.huggingface.json")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            model_err("no tokenizer.huggingface.json: the tokenizer is missing".into())
        })?;
    let tokenizer = Tokenizer::from_json(json, config.tokens.clone())?;
    Ok((config, tokenizer))
}

fn check(ok: bool, what: impl FnOnce() -> String) -> std::result::Result<(), Problem> {
    if ok { Ok(()) } else { Err(what()) }
}

fn bounded(key: &str, value: usize, max: usize) -> std::result::Result<(), Problem> {
    check((1..=max).contains(&value), || {
        format!("{key} is {value}, expected 1 to {max}")
    })
}

fn positive(key: &str, value: f32) -> std::result::Result<(), Problem> {
    check(value.is_finite() && value > 0.0, || {
        format!("{key} is {value}, expected a finite number above 0")
    })
}

fn finite(key: &str, value: f32) -> std::result::Result<(), Problem> {
    check(value.is_finite(), || {
        format!("{key} is {value}, expected a finite number")
    })
}

impl Config {
    /// Checks that the hyper-parameters are bounded and consistent with each other.
    /// Names use the GGUF keys (`paligemma.` omitted).
    pub fn validate(&self) -> std::result::Result<(), Problem> {
        let v = &self.vision;
        bounded("vision.image_size", v.image_size, MAX_IMAGE_SIZE)?;
        bounded("vision.patch_size", v.patch_size, v.image_size)?;
        check(v.image_size.is_multiple_of(v.patch_size), || {
            format!(
                "vision.image_size {} is not a multiple of vision.patch_size {}",
                v.image_size, v.patch_size
            )
        })?;
        bounded("vision.embedding_length", v.width, MAX_WIDTH)?;
        bounded("vision.block_count", v.depth, MAX_LAYERS)?;
        bounded("vision.attention.head_count", v.heads, MAX_HEADS)?;
        check(v.width.is_multiple_of(v.heads), || {
            format!(
                "vision.attention.head_count {} does not divide vision.embedding_length {}",
                v.heads, v.width
            )
        })?;
        bounded("vision.feed_forward_length", v.ffn, 4 * MAX_WIDTH)?;
        positive("vision.attention.layer_norm_epsilon", v.ln_eps)?;
        for c in 0..3 {
            finite("vision.image_mean", v.image_mean[c])?;
            positive("vision.image_std", v.image_std[c])?;
        }
        positive("vision.rescale_factor", v.rescale)?;

        let t = &self.text;
        bounded("text.embedding_length", t.width, MAX_WIDTH)?;
        bounded("text.block_count", t.depth, MAX_LAYERS)?;
        bounded("text.attention.head_count", t.heads, MAX_HEADS)?;
        bounded("text.attention.head_count_kv", t.kv_heads, t.heads)?;
        check(t.heads.is_multiple_of(t.kv_heads), || {
            format!(
                "text.attention.head_count_kv {} does not divide text.attention.head_count {}",
                t.kv_heads, t.heads
            )
        })?;
        bounded("text.attention.key_length", t.head_dim, MAX_WIDTH)?;
        check(t.head_dim.is_multiple_of(2), || {
            format!(
                "text.attention.key_length {} is odd (RoPE rotates pairs)",
                t.head_dim
            )
        })?;
        bounded("text.feed_forward_length", t.ffn, 4 * MAX_WIDTH)?;
        positive("text.attention.layer_norm_rms_epsilon", t.rms_eps)?;
        positive("text.rope.freq_base", t.rope_theta)?;
        positive(
            "text.attention.query_pre_attn_scalar",
            t.query_pre_attn_scalar,
        )?;
        for (key, cap) in [
            ("text.attn_logit_softcapping", t.attn_softcap),
            ("text.final_logit_softcapping", t.final_softcap),
        ] {
            cap.map_or(Ok(()), |c| positive(key, c))?;
        }
        if let Some(w) = t.sliding_window {
            bounded("text.attention.sliding_window", w, u32::MAX as usize)?;
        }
        check(t.sliding_layers.len() == t.depth, || {
            format!(
                "text.attention.sliding_layers has {} entries for {} layers",
                t.sliding_layers.len(),
                t.depth
            )
        })?;
        bounded("text.context_length", t.context_length, MAX_CONTEXT)?;
        bounded("text.vocab_size", t.vocab_size, MAX_VOCAB)?;
        positive("text.embedding_scale", t.embed_scale)?;
        check(self.projection_dim == t.width, || {
            format!(
                "projection_dim {} differs from text.embedding_length {}",
                self.projection_dim, t.width
            )
        })?;

        let k = &self.tokens;
        check(k.image_token_count == v.n_patches(), || {
            format!(
                "image_token_count {} but the vision tower makes {} patches",
                k.image_token_count,
                v.n_patches()
            )
        })?;
        let ids = [
            ("image_token_id", Some(k.image_token_id)),
            ("bos_token_id", Some(k.bos)),
            ("eos_token_id", Some(k.eos)),
            ("padding_token_id", Some(k.pad)),
        ];
        let ranges = [
            (
                "loc_token_first",
                k.loc_first.map(|f| f.saturating_add(1023)),
            ),
            (
                "seg_token_first",
                k.seg_first.map(|f| f.saturating_add(127)),
            ),
        ];
        for (key, id) in ids.into_iter().chain(ranges) {
            if let Some(id) = id {
                check((id as usize) < t.vocab_size, || {
                    format!(
                        "{key}: token id {id} is outside the vocabulary of {} ids",
                        t.vocab_size
                    )
                })?;
            }
        }
        Ok(())
    }
}

/// Checks a tensor table (a file's, or the one the converter is about to write)
/// against the configuration: every tensor the graphs read is present, with the
/// expected shape (rows possibly padded, see the converter) and a type its ops take.
/// The mask decoder is optional, but all or nothing. Errors name the tensor.
pub fn tensors(cfg: &Config, table: &[TensorInfo]) -> std::result::Result<(), Problem> {
    let find = |name: &str| table.iter().find(|t| t.name == name);
    let mut expected = crate::format::tensor_shapes(cfg);
    let seg_dim = find("seg.codebook").map_or(0, |t| t.shape[0]);
    let seg = crate::segment::gguf_shapes(seg_dim);
    if seg.iter().any(|(name, _)| find(name).is_some()) {
        bounded("the width of tensor seg.codebook", seg_dim, MAX_WIDTH)?;
        expected.extend(seg);
    }
    for (name, shape) in expected {
        let info = find(&name).ok_or_else(|| format!("tensor {name} is missing"))?;
        let role = Role::of(&name, shape.len());
        check(role.allowed().contains(&info.ty), || {
            format!(
                "tensor {name} is {}, expected one of {}",
                info.ty.name(),
                names(role.allowed())
            )
        })?;
        let mut got = info.shape.clone();
        got.resize(shape.len().max(got.len()), 1);
        // Outputs may be padded to the padded rows of the matrix they feed.
        let mut shape = shape;
        let outputs = shape.len() - 1;
        if let Some(n) = crate::format::padded_consumer(&name)
            .and_then(|c| find(&c))
            .map(|c| c.shape[0])
            .filter(|&n| n > shape[outputs] && got[outputs] == n)
        {
            shape[outputs] = n;
        }
        let padded = role == Role::Matrix
            && crate::format::is_padded_matrix(&name, &got, &shape, info.ty.block_size());
        check(got == shape || padded, || {
            format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                info.shape
            )
        })?;
    }
    Ok(())
}
