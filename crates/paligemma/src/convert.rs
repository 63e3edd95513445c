//! Hugging Face checkpoint folder -> one self-contained GGUF.
//!
//! Reads `config.json`, `tokenizer.json`, `preprocessor_config.json` and the
//! (possibly sharded) safetensors through memory maps, one tensor at a time, and
//! accepts the three key layouts seen in the wild (hub repos, transformers 5
//! `save_pretrained`, transformers 4.5x `save_pretrained`). The output appears only
//! when complete: an error at any point leaves no partial file.
use crate::config::{Config, TextArch};
use crate::{Error, Result};
use ggml::Type;
use ggml::gguf::{GgufHeader, GgufWriter, Value};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Conversion options.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Type of the decoder's (and projector's) weight matrices.
    pub ty: Type,
    /// Type of the SigLIP weight matrices.
    pub vision_ty: Type,
    /// big_vision's VQ-VAE weights (`vae-oid.npz`) for segmentation masks.
    pub seg_decoder: Option<PathBuf>,
    /// Set (by a signal handler) to stop between two tensors: the conversion then
    /// fails with [`Error::Interrupted`] and leaves no partial file.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions { ty: Type::F16, vision_ty: Type::F16, seg_decoder: None, cancel: None }
    }
}

/// The SigLIP type that goes with decoder type `ty` when none is asked for: the same
/// for the float types (so an "f32" model is f32 throughout and matches the reference
/// to 1e-5), f16 for the quantized ones (SigLIP loses more to quantization than Gemma).
pub fn default_vision_type(ty: Type) -> Type {
    if matches!(ty, Type::F32 | Type::F16 | Type::BF16) { ty } else { Type::F16 }
}

/// Types `--type` accepts.
pub const WEIGHT_TYPES: [Type; 8] = [Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0, Type::Q4_K, Type::Q5_K, Type::Q6_K];

/// Parses a weight type name, listing the accepted ones on error.
pub fn parse_weight_type(name: &str) -> Result<Type> {
    let names = || WEIGHT_TYPES.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ");
    match Type::from_name(name) {
        Ok(t) if WEIGHT_TYPES.contains(&t) => Ok(t),
        _ => Err(Error::Invalid(format!("unknown weight type {name:?} (expected one of {})", names()))),
    }
}

/// Progress of a conversion, reported once per tensor.
pub struct Progress<'a> {
    /// 0-based position of the tensor about to be written.
    pub index: usize,
    /// Tensors in the file, mask decoder included.
    pub total: usize,
    /// GGUF name of the tensor.
    pub name: &'a str,
    /// Type the tensor is stored as.
    pub ty: Type,
}

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// The model file written.
    pub path: PathBuf,
    /// Tensors written, mask decoder included.
    pub tensors: usize,
    /// Per type name: how many tensors, and their bytes of data.
    pub bytes_per_type: BTreeMap<String, (usize, u64)>,
    /// Size of the file in bytes.
    pub file_size: u64,
    /// The hyper-parameters written to the file.
    pub config: Config,
    /// What the user should know (checkpoint files that were ignored...).
    pub notes: Vec<String>,
}

/// How a checkpoint tensor is turned into a GGUF tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transform {
    None,
    /// Gemma RMSNorm computes x * (1 + w); store 1 + w as llama.cpp does.
    PlusOne,
}

/// One tensor the model needs: GGUF name, HF name (canonical layout), shape in
/// HF order, transform, and whether it belongs to the vision tower.
struct Expected {
    gguf: String,
    hf: String,
    shape: Vec<usize>,
    transform: Transform,
    vision: bool,
}

fn expected_tensors(cfg: &Config) -> Vec<Expected> {
    let mut out = Vec::new();
    let mut push = |gguf: String, hf: String, shape: Vec<usize>, transform, vision| out.push(Expected { gguf, hf, shape, transform, vision });
    let v = &cfg.vision;
    let (d, p) = (v.width, v.patch_size);
    push("v.patch_embd.weight".into(), "vision.embeddings.patch_embedding.weight".into(), vec![d, 3, p, p], Transform::None, true);
    push("v.patch_embd.bias".into(), "vision.embeddings.patch_embedding.bias".into(), vec![d], Transform::None, true);
    push("v.position_embd.weight".into(), "vision.embeddings.position_embedding.weight".into(), vec![v.n_patches(), d], Transform::None, true);
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
            push(gg(&format!("{g}.weight")), hf(&format!("{h}.weight")), shape, Transform::None, true);
            push(gg(&format!("{g}.bias")), hf(&format!("{h}.bias")), bias, Transform::None, true);
        }
    }
    push("v.post_ln.weight".into(), "vision.post_layernorm.weight".into(), vec![d], Transform::None, true);
    push("v.post_ln.bias".into(), "vision.post_layernorm.bias".into(), vec![d], Transform::None, true);
    let t = &cfg.text;
    push("mm.weight".into(), "projector.weight".into(), vec![cfg.projection_dim, d], Transform::None, false);
    push("mm.bias".into(), "projector.bias".into(), vec![cfg.projection_dim], Transform::None, false);
    let w = t.width;
    push("token_embd.weight".into(), "text.embed_tokens.weight".into(), vec![t.vocab_size, w], Transform::None, false);
    let (q, kv) = (t.heads * t.head_dim, t.kv_heads * t.head_dim);
    for i in 0..t.depth {
        let hf = |s: &str| format!("text.layers.{i}.{s}.weight");
        let gg = |s: &str| format!("blk.{i}.{s}.weight");
        let norm = Transform::PlusOne;
        push(gg("attn_norm"), hf("input_layernorm"), vec![w], norm, false);
        push(gg("attn_q"), hf("self_attn.q_proj"), vec![q, w], Transform::None, false);
        push(gg("attn_k"), hf("self_attn.k_proj"), vec![kv, w], Transform::None, false);
        push(gg("attn_v"), hf("self_attn.v_proj"), vec![kv, w], Transform::None, false);
        push(gg("attn_output"), hf("self_attn.o_proj"), vec![w, q], Transform::None, false);
        match t.arch {
            // Naming trap: Gemma 1's "post_attention_layernorm" is its pre-MLP norm.
            TextArch::Gemma => push(gg("ffn_norm"), hf("post_attention_layernorm"), vec![w], norm, false),
            TextArch::Gemma2 => {
                push(gg("post_attention_norm"), hf("post_attention_layernorm"), vec![w], norm, false);
                push(gg("ffn_norm"), hf("pre_feedforward_layernorm"), vec![w], norm, false);
                push(gg("post_ffw_norm"), hf("post_feedforward_layernorm"), vec![w], norm, false);
            }
        }
        push(gg("ffn_gate"), hf("mlp.gate_proj"), vec![t.ffn, w], Transform::None, false);
        push(gg("ffn_up"), hf("mlp.up_proj"), vec![t.ffn, w], Transform::None, false);
        push(gg("ffn_down"), hf("mlp.down_proj"), vec![w, t.ffn], Transform::None, false);
    }
    push("output_norm.weight".into(), "text.norm.weight".into(), vec![w], Transform::PlusOne, false);
    out
}

/// Every tensor a model of `cfg` has: GGUF name and shape in ggml order.
pub fn tensor_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    expected_tensors(cfg).into_iter().map(|e| (e.gguf, e.shape.into_iter().rev().collect())).collect()
}

/// Maps a checkpoint key of any known layout to our canonical HF-style name:
/// `vision.*`, `projector.*`, `text.*`. Returns None for keys we do not use.
pub fn canonical_name(key: &str) -> Option<String> {
    let key = key.strip_prefix("model.").unwrap_or(key);
    if let Some(rest) = key.strip_prefix("vision_tower.") {
        let rest = rest.strip_prefix("vision_model.").unwrap_or(rest);
        return Some(format!("vision.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("multi_modal_projector.linear.") {
        return Some(format!("projector.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("language_model.") {
        let rest = rest.strip_prefix("model.").unwrap_or(rest);
        return Some(format!("text.{rest}"));
    }
    None
}

/// How a tensor is stored: its type and its row length.
///
/// 1-D tensors and position embeddings stay f32. A K-quant whose blocks do not fit a
/// row falls back the way llama.cpp does (`q4_k` to `q5_0`, `q5_k` to `q5_1`, `q6_k`
/// to `q8_0`). A weight matrix whose rows are still not a whole number of blocks is
/// padded with zero columns up to the next block: the graph pads its input with zeros
/// too, so the product is unchanged (llama.cpp stores such matrices as f16 instead; for
/// SigLIP's 4304-wide `ffn_down` that would leave a third of the tower's arithmetic in
/// f16 kernels, 3x slower per FLOP than repacked q4_0 on a CPU). Other tensors (the
/// patch kernel, the token embedding, which is also read by row) fall back to f16.
fn storage(e: &Expected, opts: &ConvertOptions) -> (Type, usize) {
    let row = *e.shape.last().unwrap();
    if e.shape.len() == 1 || e.gguf == "v.position_embd.weight" {
        return (Type::F32, row);
    }
    let wanted = if e.vision { opts.vision_ty } else { opts.ty };
    let chain: &[Type] = match wanted {
        t if t == Type::Q4_K => &[Type::Q4_K, Type::Q5_0],
        t if t == Type::Q5_K => &[Type::Q5_K, Type::Q5_1],
        t if t == Type::Q6_K => &[Type::Q6_K, Type::Q8_0],
        _ => &[wanted],
    };
    if let Some(ty) = chain.iter().copied().find(|t| row.is_multiple_of(t.block_size())) {
        return (ty, row);
    }
    let last = chain[chain.len() - 1];
    if paddable(&e.gguf, e.shape.len()) { (last, row.next_multiple_of(last.block_size())) } else { (Type::F16, row) }
}

/// Whether [`storage`] may pad a tensor's rows: weight matrices only, and not the token
/// embedding, which is also read by row.
fn paddable(name: &str, dims: usize) -> bool {
    dims == 2 && name != "token_embd.weight"
}

/// Whether a stored weight of shape `got` (ggml order) holds the matrix of shape `want`
/// with its rows padded by [`storage`] for a type of `block`-wide blocks.
pub(crate) fn is_padded_matrix(name: &str, got: &[usize], want: &[usize], block: usize) -> bool {
    paddable(name, want.len()) && got.len() == 2 && got[1] == want[1] && got[0] > want[0] && got[0] == want[0].next_multiple_of(block)
}

/// The matrix whose inputs are the outputs of `producer` (SigLIP's `ffn_up` weight and
/// bias feed `ffn_down` through a GELU, which keeps zeros zero). When that matrix's rows
/// are padded ([`storage`]), the producer's outputs are padded with zeros to the same
/// length (format version 3), so that the graph needs no padding op between the two
/// (ggml's pad is an element-by-element copy: 6% of the tower's time at 224 px).
pub(crate) fn padded_consumer(producer: &str) -> Option<String> {
    let block = producer.strip_prefix("v.blk.")?;
    let (layer, kind) = block.split_once('.')?;
    matches!(kind, "ffn_up.weight" | "ffn_up.bias").then(|| format!("v.blk.{layer}.ffn_down.weight"))
}

/// Rows of `row` values, each followed by zeros up to `stored` values.
fn pad_rows(data: Vec<f32>, row: usize, stored: usize) -> Vec<f32> {
    if stored == row {
        return data;
    }
    data.chunks(row).flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(0.0, stored - row))).collect()
}

/// A checkpoint tensor: its file, its key there, its shape.
struct Entry {
    file: usize,
    key: String,
    shape: Vec<usize>,
}

/// A checkpoint folder opened for reading.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, memmap2::Mmap)>,
    /// Canonical name -> where it is, read once from the headers.
    index: BTreeMap<String, Entry>,
    /// Hyper-parameters from `config.json` and `preprocessor_config.json`.
    pub config: Config,
    /// Contents of the folder's `tokenizer.json`.
    pub tokenizer_json: String,
    /// Files of the folder that were not read, and why.
    pub notes: Vec<String>,
}

impl Checkpoint {
    /// Opens a Hugging Face checkpoint folder: reads its configuration and tokenizer and
    /// indexes the tensors of its safetensors files (memory-mapped, not read yet).
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint { path: dir.into(), detail: "not a directory (expected a Hugging Face checkpoint folder)".into() });
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::Checkpoint { path: dir.into(), detail: "no config.json in this folder".into() });
        }
        let tok_path = dir.join("tokenizer.json");
        let tokenizer_json = std::fs::read_to_string(&tok_path).map_err(crate::error::io(&tok_path))?;
        let tokenizer = crate::tokenizer::parse_json(&tokenizer_json)
            .map_err(|e| Error::Checkpoint { path: tok_path.clone(), detail: format!("not a valid tokenizer.json: {e}") })?;

        let (files, notes) = safetensors_files(dir)?;
        let mut index = BTreeMap::new();
        let mut embed_dtype = None;
        for (i, (path, map)) in files.iter().enumerate() {
            let st =
                SafeTensors::deserialize(map).map_err(|e| Error::Checkpoint { path: path.clone(), detail: format!("not a valid safetensors file: {e}") })?;
            for (key, view) in st.tensors() {
                if let Some(canon) = canonical_name(&key) {
                    if canon == "text.embed_tokens.weight" {
                        embed_dtype = Some(view.dtype());
                    }
                    let entry = Entry { file: i, key: key.clone(), shape: view.shape().to_vec() };
                    if let Some(other) = index.insert(canon.clone(), entry) {
                        return Err(Error::Checkpoint {
                            path: path.clone(),
                            detail: format!("{key:?} and {:?} (in {}) are the same tensor {canon:?}", other.key, files[other.file].0.display()),
                        });
                    }
                }
            }
        }
        let pp_path = dir.join("preprocessor_config.json");
        let pp = if pp_path.is_file() {
            let text = std::fs::read_to_string(&pp_path).map_err(crate::error::io(&pp_path))?;
            Some(
                serde_json::from_str::<serde_json::Value>(&text)
                    .map_err(|e| Error::Config { path: pp_path.clone(), detail: format!("not valid JSON: {e}") })?,
            )
        } else {
            None
        };
        let dtype = match embed_dtype {
            Some(Dtype::BF16) => "bfloat16",
            Some(Dtype::F16) => "float16",
            _ => "float32",
        };
        let config = Config::from_hf(&config_path, pp.as_ref().map(|p| (pp_path.as_path(), p)), &|t| tokenizer.token_to_id(t), dtype)?;
        Ok(Checkpoint { dir: dir.into(), files, index, config, tokenizer_json, notes })
    }

    /// A tensor as f32 values with its HF shape.
    fn tensor_f32(&self, canon: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let Entry { file, key, .. } =
            self.index.get(canon).ok_or_else(|| Error::Tensor { path: self.dir.clone(), name: canon.into(), detail: "missing from the checkpoint".into() })?;
        let (path, map) = &self.files[*file];
        let st = SafeTensors::deserialize(map).map_err(|e| Error::Checkpoint { path: path.clone(), detail: e.to_string() })?;
        let view = st.tensor(key).map_err(|e| Error::Tensor { path: path.clone(), name: key.clone(), detail: e.to_string() })?;
        let data = view.data();
        let values = match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes(b.try_into().unwrap()).to_f32()).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes(b.try_into().unwrap()).to_f32()).collect(),
            other => {
                return Err(Error::Tensor { path: path.clone(), name: key.clone(), detail: format!("dtype {other:?}, expected F32, F16 or BF16") });
            }
        };
        Ok((view.shape().to_vec(), values))
    }

    fn check_shape(&self, e: &Expected) -> Result<()> {
        let entry = self.index.get(&e.hf).ok_or_else(|| Error::Tensor {
            path: self.dir.clone(),
            name: e.hf.clone(),
            detail: format!("missing from the checkpoint (needed for {})", e.gguf),
        })?;
        if entry.shape != e.shape {
            return Err(Error::Tensor {
                path: self.files[entry.file].0.clone(),
                name: entry.key.clone(),
                detail: format!("shape {:?}, expected {:?} from config.json", entry.shape, e.shape),
            });
        }
        Ok(())
    }
}

/// Weight files with their maps.
type MappedFiles = Vec<(PathBuf, memmap2::Mmap)>;

/// The checkpoint's weight files, found as transformers finds them: the shards named
/// by `model.safetensors.index.json`, or else `model.safetensors`. Any other
/// `*.safetensors` (an adapter, a second copy) is left alone and listed in the notes.
fn safetensors_files(dir: &Path) -> Result<(MappedFiles, Vec<String>)> {
    const INDEX: &str = "model.safetensors.index.json";
    const SINGLE: &str = "model.safetensors";
    let index_path = dir.join(INDEX);
    let (source, names): (&str, Vec<String>) = if index_path.is_file() {
        let text = String::from_utf8(crate::read_input_file(&index_path, 64 << 20)?)
            .map_err(|_| Error::Config { path: index_path.clone(), detail: "not UTF-8".into() })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Config { path: index_path.clone(), detail: format!("not valid JSON: {e}") })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Config { path: index_path.clone(), detail: "field weight_map: expected an object".into() })?;
        let mut files = Vec::new();
        for (key, file) in map {
            let name = file.as_str().filter(|f| is_plain_file_name(f)).ok_or_else(|| Error::Config {
                path: index_path.clone(),
                detail: format!("weight_map[{key:?}] is {file}, expected the name of a file in this folder"),
            })?;
            files.push(name.to_string());
        }
        files.sort();
        files.dedup();
        (INDEX, files)
    } else if dir.join(SINGLE).is_file() {
        (SINGLE, vec![SINGLE.to_string()])
    } else {
        return Err(Error::Checkpoint { path: dir.into(), detail: format!("no {INDEX} and no {SINGLE} (the files transformers reads)") });
    };
    if names.is_empty() {
        return Err(Error::Config { path: index_path, detail: "weight_map names no file".into() });
    }
    let mut notes = Vec::new();
    let mut others: Vec<String> = std::fs::read_dir(dir)
        .map_err(crate::error::io(dir))?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
        .filter(|n| n.ends_with(".safetensors") && !names.contains(n))
        .collect();
    others.sort();
    for other in others {
        notes.push(format!("ignored {other}: not a weight file of the model (transformers reads {source})"));
    }
    let files = names
        .into_iter()
        .map(|name| {
            let p = dir.join(name);
            let f = std::fs::File::open(&p).map_err(crate::error::io(&p))?;
            // SAFETY of the map is the memmap2 contract: read-only, file not modified meanwhile.
            let map = map_file(&f).map_err(crate::error::io(&p))?;
            Ok((p, map))
        })
        .collect::<Result<_>>()?;
    Ok((files, notes))
}

/// A file name without a directory part (an index naming `../x` or `/etc/x` is refused).
fn is_plain_file_name(name: &str) -> bool {
    let path = Path::new(name);
    !name.is_empty() && path.file_name().is_some_and(|f| f == path.as_os_str())
}

fn map_file(f: &std::fs::File) -> std::io::Result<memmap2::Mmap> {
    ggml::map_readonly(f)
}

/// Converts the checkpoint in `dir` to a GGUF at `out`.
pub fn convert(dir: &Path, out: &Path, opts: &ConvertOptions, progress: impl FnMut(Progress<'_>)) -> Result<Summary> {
    let ckpt = Checkpoint::open(dir)?;
    let expected = expected_tensors(&ckpt.config);
    for e in &expected {
        ckpt.check_shape(e)?;
    }
    let mut summary = write_model(&ckpt.config, &ckpt.tokenizer_json, opts, out, |e| Ok(ckpt.tensor_f32(&e.hf)?.1), progress)?;
    summary.notes = ckpt.notes;
    Ok(summary)
}

/// Writes a GGUF of random weights with the shapes of `config` (for benchmarks of
/// real model sizes without a checkpoint). Values are uniform in +-`scale`, norms
/// around 1.
pub fn write_random(
    config: &Config,
    tokenizer_json: &str,
    opts: &ConvertOptions,
    out: &Path,
    seed: u64,
    progress: impl FnMut(Progress<'_>),
) -> Result<Summary> {
    let mut state = seed ^ 0x5DEE_CE66_D1CE_4E5B;
    write_model(
        config,
        tokenizer_json,
        opts,
        out,
        |e| {
            let n: usize = e.shape.iter().product();
            let norm = e.shape.len() == 1 && (e.gguf.contains("norm") || e.gguf.contains("ln"));
            Ok((0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let u = ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                    if norm { 1.0 + 0.1 * u } else { 0.02 * u }
                })
                .collect())
        },
        progress,
    )
}

/// Writes config, tokenizer and the tensors `values` produces (HF layout, f32).
fn write_model(
    cfg: &Config,
    tokenizer_json: &str,
    opts: &ConvertOptions,
    out: &Path,
    mut values: impl FnMut(&Expected) -> Result<Vec<f32>>,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<Summary> {
    // The file must pass what the loader checks: validated before anything is written,
    // and every count then fits the u32 it is stored as.
    let invalid = |detail: String| Error::Invalid(format!("refusing to write {}: {detail}", out.display()));
    cfg.validate().map_err(|p| invalid(format!("invalid hyper-parameters: {p}")))?;
    let expected = expected_tensors(cfg);
    let seg = opts.seg_decoder.as_deref().map(crate::segment::SegWeights::from_npz).transpose()?;
    let mut header = GgufHeader::new();
    cfg.write_gguf(&mut header);
    header.set("general.file_type", Value::String(opts.ty.name().into()));
    header.set("paligemma.vision_file_type", Value::String(opts.vision_ty.name().into()));
    header.set("tokenizer.huggingface.json", Value::String(tokenizer_json.to_string()));
    let stored: Vec<(Type, usize)> = expected.iter().map(|e| storage(e, opts)).collect();
    let stored_row = |name: &str| expected.iter().zip(&stored).find(|(e, _)| e.gguf == name).map(|(_, s)| s.1);
    let mut plan = Vec::new();
    for (e, &(ty, mut row)) in expected.iter().zip(&stored) {
        let mut ggml_shape: Vec<usize> = e.shape.iter().rev().copied().collect();
        ggml_shape[0] = row;
        // The outputs feeding a padded matrix are padded to match (weight rows, bias).
        let outputs = padded_consumer(&e.gguf).and_then(|c| stored_row(&c)).filter(|&r| r > e.shape[0]);
        match (outputs, ggml_shape.len()) {
            (Some(n), 1) => (ggml_shape[0], row) = (n, n),
            (Some(n), _) => ggml_shape[1] = n,
            (None, _) => {}
        }
        header.add_tensor(e.gguf.clone(), ty, &ggml_shape)?;
        plan.push((e, ty, row, ggml_shape.iter().product::<usize>()));
    }
    if let Some(seg) = &seg {
        seg.declare(&mut header)?;
    }
    crate::validate::tensors(cfg, header.tensors()).map_err(invalid)?;
    let total = plan.len() + seg.as_ref().map_or(0, |s| s.len());
    let mut writer = GgufWriter::create(out, header)?;
    let mut bytes_per_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut record = |ty: Type, len: usize| {
        let entry = bytes_per_type.entry(ty.name().into()).or_default();
        entry.0 += 1;
        entry.1 += len as u64;
    };
    let cancelled = || opts.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
    for (index, (e, ty, row, len)) in plan.iter().enumerate() {
        if cancelled() {
            return Err(Error::Interrupted);
        }
        progress(Progress { index, total, name: &e.gguf, ty: *ty });
        let mut data = values(e)?;
        if e.transform == Transform::PlusOne {
            data.iter_mut().for_each(|v| *v += 1.0);
        }
        let mut data = pad_rows(data, *e.shape.last().unwrap(), *row);
        data.resize(*len, 0.0);
        let bytes = ggml::quantize(*ty, &data, *row)?;
        record(*ty, bytes.len());
        writer.write_tensor(&e.gguf, &bytes)?;
    }
    for (i, (name, data)) in seg.iter().flat_map(|s| s.tensors()).enumerate() {
        progress(Progress { index: plan.len() + i, total, name, ty: Type::F32 });
        let bytes = ggml::quantize(Type::F32, data, data.len())?;
        record(Type::F32, bytes.len());
        writer.write_tensor(name, &bytes)?;
    }
    if cancelled() {
        return Err(Error::Interrupted);
    }
    let file_size = writer.finish()?;
    Ok(Summary { path: out.into(), tensors: total, bytes_per_type, file_size, config: cfg.clone(), notes: Vec::new() })
}
