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

pub(crate) fn expected_tensors(cfg: &Config) -> Vec<Expected> {
    let mut out = Vec::new();
    let mut push = |gguf: String, hf: String, shape: Vec<usize>, transform, vision| {
        out.push(Expected {
            gguf,
            hf,
            shape,
            transform,
            vision,
        })
    };
    let v = &cfg.vision;
    let (d, p) = (v.width, v.patch_size);
    push(
        "v.patch_embd.weight".into(),
        "vision.embeddings.patch_embedding.weight".into(),
        vec![d, 3, p, p],
        Transform::None,
        true,
    );
    push(
        "v.patch_embd.bias".into(),
        "vision.embeddings.patch_embedding.bias".into(),
        vec![d],
        Transform::None,
        true,
    );
    push(
        "v.position_embd.weight".into(),
        "vision.embeddings.position_embedding.weight".into(),
        vec![v.n_patches(), d],
        Transform::None,
        true,
    );
    for i in 0..v.depth {
        let hf = |s: &str| format!("vision.encoder.layers.{i}.{s}");
        let gg = |s: &str| format!("v.blk.{i}.{s}");
        for (g, h, shape) in [
            ("ln1", "layer_norm1", vec![d]),
            ("ln2", "layer_norm2", vec![d]),
            ("attn_q", "self_attn.q_proj", vec![d, d]),
            ("attn_k", "self_attn.k_proj", vec![d, d]),
            ("attn_v", "self_attn.v_proj", vec![d, d]),
            ("attn_out", "self_attn.out_proj", vec![d, d]),
            ("ffn_up", "mlp.fc1", vec![v.ffn, d]),
            ("ffn_down", "mlp.fc2", vec![d, v.ffn]),
        ] {
            let bias = vec![shape[0]];
            push(
                gg(&format!("{g}.weight")),
                hf(&format!("{h}.weight")),
                shape,
                Transform::None,
                true,
            );
            push(
                gg(&format!("{g}.bias")),
                hf(&format!("{h}.bias")),
                bias,
                Transform::None,
                true,
            );
        }
    }
    push(
        "v.post_ln.weight".into(),
        "vision.post_layernorm.weight".into(),
        vec![d],
        Transform::None,
        true,
    );
    push(
        "v.post_ln.bias".into(),
        "vision.post_layernorm.bias".into(),
        vec![d],
        Transform::None,
        true,
    );
    let t = &cfg.text;
    push(
        "mm.weight".into(),
        "projector.weight".into(),
        vec![cfg.projection_dim, d],
        Transform::None,
        false,
    );
    push(
        "mm.bias".into(),
        "projector.bias".into(),
        vec![cfg.projection_dim],
        Transform::None,
        false,
    );
    let w = t.width;
    push(
        "token_embd.weight".into(),
        "text.embed_tokens.weight".into(),
        vec![t.vocab_size, w],
        Transform::None,
        false,
    );
    let (q, kv) = (t.heads * t.head_dim, t.kv_heads * t.head_dim);
    for i in 0..t.depth {
        let hf = |s: &str| format!("text.layers.{i}.{s}.weight");
        let gg = |s: &str| format!("blk.{i}.{s}.weight");
        let norm = Transform::PlusOne;
        push(gg("attn_norm"), hf("input_layernorm"), vec![w], norm, false);
        push(
            gg("attn_q"),
            hf("self_attn.q_proj"),
            vec![q, w],
            Transform::None,
            false,
        );
        push(
            gg("attn_k"),
            hf("self_attn.k_proj"),
            vec![kv, w],
            Transform::None,
            false,
        );
        push(
            gg("attn_v"),
            hf("self_attn.v_proj"),
            vec![kv, w],
            Transform::None,
            false,
        );
        push(
            gg("attn_output"),
            hf("self_attn.o_proj"),
            vec![w, q],
            Transform::None,
            false,
        );
        match t.arch {
            // Naming trap: Gemma 1's "post_attention_layernorm" is its pre-MLP norm.
            TextArch::Gemma => push(
                gg("ffn_norm"),
                hf("post_attention_layernorm"),
                vec![w],
                norm,
                false,
            ),
            TextArch::Gemma2 => {
                push(
                    gg("post_attention_norm"),
                    hf("post_attention_layernorm"),
                    vec![w],
                    norm,
                    false,
                );
                push(
                    gg("ffn_norm"),
                    hf("pre_feedforward_layernorm"),
                    vec![w],
                    norm,
                    false,
                );
                push(
                    gg("post_ffw_norm"),
                    hf("post_feedforward_layernorm"),
                    vec![w],
                    norm,
                    false,
                );
            }
        }
        push(
            gg("ffn_gate"),
            hf("mlp.gate_proj"),
            vec![t.ffn, w],
            Transform::None,
            false,
        );
        push(
            gg("ffn_up"),
            hf("mlp.up_proj"),
            vec![t.ffn, w],
            Transform::None,
            false,
        );
        push(
            gg("ffn_down"),
            hf("mlp.down_proj"),
            vec![w, t.ffn],
            Transform::None,
            false,
        );
    }
    push(
        "output_norm.weight".into(),
        "text.norm.weight".into(),
        vec![w],
        Transform::PlusOne,
        false,
    );
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
    dims == 2 && name != "token_embd.weight"
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
    let block = producer.strip_prefix("v.blk.")?;
    let (layer, kind) = block.split_once('.')?;
    matches!(kind, "ffn_up.weight" | "ffn_up.bias")
        .then(|| format!("v.blk.{layer}.ffn_down.weight"))
}
