//! The layout of a model file, written once for the converter, the validation and the
//! loaders: every tensor a model of a configuration has (its GGUF name, the checkpoint
//! tensor it comes from, its shape and how it is transformed), and the rules by which
//! matrices are padded (see `docs/gguf-format.md`).
use crate::config::{Config, TextArch};

/// How a checkpoint tensor is turned into a GGUF tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transform {
    None,
    /// Gemma RMSNorm computes x * (1 + w); store 1 + w as llama.cpp does.
    PlusOne,
}

/// One tensor the model needs: GGUF name, HF name (canonical layout), shape in
/// HF order, transform, and whether it belongs to the vision tower.
pub(crate) struct Expected {
    pub(crate) gguf: String,
    pub(crate) hf: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) transform: Transform,
    pub(crate) vision: bool,
}

/// The GGUF names of a model's tensors (llama.cpp's spelling where it has one): the
/// converter writes them, the validation expects them and the loaders look them up,
/// all from here. Layer tensors are `<layer prefix>.<part>` with `.weight`/`.bias`
/// for matrices and layer norms (`vision_layer`, `text_layer`).
pub mod names {
    /// SigLIP's patch embedding (a convolution), with `.weight` and `.bias`.
    pub const PATCH_EMBD: &str = "v.patch_embd";
    /// SigLIP's learned position embedding.
    pub const POSITION_EMBD: &str = "v.position_embd.weight";
    /// SigLIP's final layer norm.
    pub const VISION_POST_LN: &str = "v.post_ln";
    /// The projector from SigLIP's width to the decoder's.
    pub const PROJECTOR: &str = "mm";
    /// The token embedding, also the LM head (tied).
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    /// The decoder's final RMS norm.
    pub const OUTPUT_NORM: &str = "output_norm";

    /// SigLIP layer part: layer norm before attention.
    pub const V_LN1: &str = "ln1";
    /// SigLIP layer part: layer norm before the MLP.
    pub const V_LN2: &str = "ln2";
    /// SigLIP layer part: query projection.
    pub const V_ATTN_Q: &str = "attn_q";
    /// SigLIP layer part: key projection.
    pub const V_ATTN_K: &str = "attn_k";
    /// SigLIP layer part: value projection.
    pub const V_ATTN_V: &str = "attn_v";
    /// SigLIP layer part: attention output projection.
    pub const V_ATTN_OUT: &str = "attn_out";
    /// SigLIP layer part: mLP input projection (`fc1`).
    pub const V_FFN_UP: &str = "ffn_up";
    /// SigLIP layer part: mLP output projection (`fc2`).
    pub const V_FFN_DOWN: &str = "ffn_down";

    /// Gemma layer part: rMS norm before attention.
    pub const T_ATTN_NORM: &str = "attn_norm";
    /// Gemma layer part: query projection.
    pub const T_ATTN_Q: &str = "attn_q";
    /// Gemma layer part: key projection.
    pub const T_ATTN_K: &str = "attn_k";
    /// Gemma layer part: value projection.
    pub const T_ATTN_V: &str = "attn_v";
    /// Gemma layer part: attention output projection.
    pub const T_ATTN_OUT: &str = "attn_output";
    /// Gemma layer part: rMS norm after attention (Gemma 2).
    pub const T_POST_ATTN_NORM: &str = "post_attention_norm";
    /// Gemma layer part: rMS norm before the MLP.
    pub const T_FFN_NORM: &str = "ffn_norm";
    /// Gemma layer part: rMS norm after the MLP (Gemma 2).
    pub const T_POST_FFN_NORM: &str = "post_ffw_norm";
    /// Gemma layer part: mLP gate projection.
    pub const T_FFN_GATE: &str = "ffn_gate";
    /// Gemma layer part: mLP up projection.
    pub const T_FFN_UP: &str = "ffn_up";
    /// Gemma layer part: mLP down projection.
    pub const T_FFN_DOWN: &str = "ffn_down";

    /// What SigLIP's layer names start with (before `.<layer>.`).
    pub const VISION_BLOCK: &str = "v.blk";

    /// A part of SigLIP layer `i`, e.g. `v.blk.3.attn_q`.
    pub fn vision_layer(i: usize, part: &str) -> String {
        format!("{VISION_BLOCK}.{i}.{part}")
    }

    /// A part of Gemma layer `i`, e.g. `blk.3.attn_q`.
    pub fn text_layer(i: usize, part: &str) -> String {
        format!("blk.{i}.{part}")
    }
}

pub(crate) fn expected_tensors(cfg: &Config) -> Vec<Expected> {
    use names::*;
    let mut out = Vec::new();
    let mut push = |gguf: String, hf: &str, shape: Vec<usize>, transform, vision| {
        out.push(Expected {
            gguf,
            hf: hf.to_string(),
            shape,
            transform,
            vision,
        })
    };
    let v = &cfg.vision;
    let (d, p) = (v.width, v.patch_size);
    let hf_patch = "vision.embeddings.patch_embedding";
    push(
        format!("{PATCH_EMBD}.weight"),
        &format!("{hf_patch}.weight"),
        vec![d, 3, p, p],
        Transform::None,
        true,
    );
    push(
        format!("{PATCH_EMBD}.bias"),
        &format!("{hf_patch}.bias"),
        vec![d],
        Transform::None,
        true,
    );
    let hf_positions = "vision.embeddings.position_embedding.weight";
    push(
        POSITION_EMBD.into(),
        hf_positions,
        vec![v.n_patches(), d],
        Transform::None,
        true,
    );
    for i in 0..v.depth {
        for (g, h, shape) in [
            (V_LN1, "layer_norm1", vec![d]),
            (V_LN2, "layer_norm2", vec![d]),
            (V_ATTN_Q, "self_attn.q_proj", vec![d, d]),
            (V_ATTN_K, "self_attn.k_proj", vec![d, d]),
            (V_ATTN_V, "self_attn.v_proj", vec![d, d]),
            (V_ATTN_OUT, "self_attn.out_proj", vec![d, d]),
            (V_FFN_UP, "mlp.fc1", vec![v.ffn, d]),
            (V_FFN_DOWN, "mlp.fc2", vec![d, v.ffn]),
        ] {
            let (gg, hf) = (vision_layer(i, g), format!("vision.encoder.layers.{i}.{h}"));
            let bias = vec![shape[0]];
            push(
                format!("{gg}.weight"),
                &format!("{hf}.weight"),
                shape,
                Transform::None,
                true,
            );
            push(
                format!("{gg}.bias"),
                &format!("{hf}.bias"),
                bias,
                Transform::None,
                true,
            );
        }
    }
    let post = "vision.post_layernorm";
    push(
        format!("{VISION_POST_LN}.weight"),
        &format!("{post}.weight"),
        vec![d],
        Transform::None,
        true,
    );
    push(
        format!("{VISION_POST_LN}.bias"),
        &format!("{post}.bias"),
        vec![d],
        Transform::None,
        true,
    );
    let (t, out_dim) = (&cfg.text, cfg.projection_dim);
    push(
        format!("{PROJECTOR}.weight"),
        "projector.weight",
        vec![out_dim, d],
        Transform::None,
        false,
    );
    push(
        format!("{PROJECTOR}.bias"),
        "projector.bias",
        vec![out_dim],
        Transform::None,
        false,
    );
    let w = t.width;
    push(
        TOKEN_EMBD.into(),
        "text.embed_tokens.weight",
        vec![t.vocab_size, w],
        Transform::None,
        false,
    );
    let (q, kv) = (t.heads * t.head_dim, t.kv_heads * t.head_dim);
    for i in 0..t.depth {
        let mut layer = |part: &str, hf: &str, shape: Vec<usize>, transform| {
            let gguf = format!("{}.weight", text_layer(i, part));
            push(
                gguf,
                &format!("text.layers.{i}.{hf}.weight"),
                shape,
                transform,
                false,
            )
        };
        let (norm, none) = (Transform::PlusOne, Transform::None);
        layer(T_ATTN_NORM, "input_layernorm", vec![w], norm);
        layer(T_ATTN_Q, "self_attn.q_proj", vec![q, w], none);
        layer(T_ATTN_K, "self_attn.k_proj", vec![kv, w], none);
        layer(T_ATTN_V, "self_attn.v_proj", vec![kv, w], none);
        layer(T_ATTN_OUT, "self_attn.o_proj", vec![w, q], none);
        match t.arch {
            // Naming trap: Gemma 1's "post_attention_layernorm" is its pre-MLP norm.
            TextArch::Gemma => layer(T_FFN_NORM, "post_attention_layernorm", vec![w], norm),
            TextArch::Gemma2 => {
                layer(T_POST_ATTN_NORM, "post_attention_layernorm", vec![w], norm);
                layer(T_FFN_NORM, "pre_feedforward_layernorm", vec![w], norm);
                layer(T_POST_FFN_NORM, "post_feedforward_layernorm", vec![w], norm);
            }
        }
        layer(T_FFN_GATE, "mlp.gate_proj", vec![t.ffn, w], none);
        layer(T_FFN_UP, "mlp.up_proj", vec![t.ffn, w], none);
        layer(T_FFN_DOWN, "mlp.down_proj", vec![w, t.ffn], none);
    }
    let norm = format!("{OUTPUT_NORM}.weight");
    push(norm, "text.norm.weight", vec![w], Transform::PlusOne, false);
    out
}

/// Every tensor a model of `cfg` has: GGUF name and shape in ggml order.
pub fn tensor_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    expected_tensors(cfg)
        .into_iter()
        .map(|e| (e.gguf, e.shape.into_iter().rev().collect()))
        .collect()
}

/// Whether the converter may pad a tensor's rows: weight matrices only, and not the token
/// embedding, which is also read by row.
pub(crate) fn paddable(name: &str, dims: usize) -> bool {
    dims == 2 && name != names::TOKEN_EMBD
}

/// Whether a stored weight of shape `got` (ggml order) holds the matrix of shape `want`
/// with its rows padded by the converter for a type of `block`-wide blocks.
pub(crate) fn is_padded_matrix(name: &str, got: &[usize], want: &[usize], block: usize) -> bool {
    paddable(name, want.len())
        && got.len() == 2
        && got[1] == want[1]
        && got[0] > want[0]
        && got[0] == want[0].next_multiple_of(block)
}

/// The matrix whose inputs are the outputs of `producer` (SigLIP's `ffn_up` weight and
/// bias feed `ffn_down` through a GELU, which keeps zeros zero). When that matrix's rows
/// are padded, the producer's outputs are padded with zeros to the same
/// length (format version 3), so that the graph needs no padding op between the two
/// (ggml's pad is an element-by-element copy: 6% of the tower's time at 224 px).
pub(crate) fn padded_consumer(producer: &str) -> Option<String> {
    use names::{V_FFN_DOWN, V_FFN_UP, VISION_BLOCK, vision_layer};
    let block = producer.strip_prefix(VISION_BLOCK)?.strip_prefix('.')?;
    let (layer, kind) = block.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let up = [format!("{V_FFN_UP}.weight"), format!("{V_FFN_UP}.bias")];
    up.contains(&kind.to_string())
        .then(|| format!("{}.weight", vision_layer(layer, V_FFN_DOWN)))
}
