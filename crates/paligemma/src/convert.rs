//! Hugging Face checkpoint folder (read by `checkpoint.rs`) -> one self-contained
//! GGUF, laid out as `format.rs` says. The output appears only when complete: an error
//! at any point leaves no partial file.
pub use crate::checkpoint::{Checkpoint, canonical_name};
use crate::config::Config;
use crate::format::{Expected, Transform, expected_tensors, paddable, padded_consumer};
use crate::{Error, Result};
use ggml::Type;
use ggml::gguf::{GgufHeader, GgufWriter, Value};
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
        ConvertOptions {
            ty: Type::F16,
            vision_ty: Type::F16,
            seg_decoder: None,
            cancel: None,
        }
    }
}

/// The SigLIP type that goes with decoder type `ty` when none is asked for: the same
/// for the float types (so an "f32" model is f32 throughout and matches the reference
/// to 1e-5), f16 for the quantized ones (SigLIP loses more to quantization than Gemma).
pub fn default_vision_type(ty: Type) -> Type {
    if matches!(ty, Type::F32 | Type::F16 | Type::BF16) {
        ty
    } else {
        Type::F16
    }
}

/// Types `--type` accepts.
pub const WEIGHT_TYPES: [Type; 8] = [
    Type::F32,
    Type::F16,
    Type::BF16,
    Type::Q8_0,
    Type::Q4_0,
    Type::Q4_K,
    Type::Q5_K,
    Type::Q6_K,
];

/// Parses a weight type name, listing the accepted ones on error.
pub fn parse_weight_type(name: &str) -> Result<Type> {
    let names = || {
        WEIGHT_TYPES
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match Type::from_name(name) {
        Ok(t) if WEIGHT_TYPES.contains(&t) => Ok(t),
        _ => Err(Error::Invalid(format!(
            "unknown weight type {name:?} (expected one of {})",
            names()
        ))),
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
    if e.shape.len() == 1 || e.gguf == crate::format::names::POSITION_EMBD {
        return (Type::F32, row);
    }
    let wanted = if e.vision { opts.vision_ty } else { opts.ty };
    let chain: &[Type] = match wanted {
        t if t == Type::Q4_K => &[Type::Q4_K, Type::Q5_0],
        t if t == Type::Q5_K => &[Type::Q5_K, Type::Q5_1],
        t if t == Type::Q6_K => &[Type::Q6_K, Type::Q8_0],
        _ => &[wanted],
    };
    if let Some(ty) = chain
        .iter()
        .copied()
        .find(|t| row.is_multiple_of(t.block_size()))
    {
        return (ty, row);
    }
    let last = chain[chain.len() - 1];
    if paddable(&e.gguf, e.shape.len()) {
        (last, row.next_multiple_of(last.block_size()))
    } else {
        (Type::F16, row)
    }
}

/// Rows of `row` values, each followed by zeros up to `stored` values.
fn pad_rows(data: Vec<f32>, row: usize, stored: usize) -> Vec<f32> {
    if stored == row {
        return data;
    }
    data.chunks(row)
        .flat_map(|r| {
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(0.0, stored - row))
        })
        .collect()
}

/// Converts the checkpoint in `dir` to a GGUF at `out`.
pub fn convert(
    dir: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: impl FnMut(Progress<'_>),
) -> Result<Summary> {
    let ckpt = Checkpoint::open(dir)?;
    let expected = expected_tensors(&ckpt.config);
    for e in &expected {
        ckpt.check_shape(e)?;
    }
    let mut summary = write_model(
        &ckpt.config,
        &ckpt.tokenizer_json,
        opts,
        out,
        |e| Ok(ckpt.tensor_f32(&e.hf)?.1),
        progress,
    )?;
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
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
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
    let invalid =
        |detail: String| Error::Invalid(format!("refusing to write {}: {detail}", out.display()));
    cfg.validate()
        .map_err(|p| invalid(format!("invalid hyper-parameters: {p}")))?;
    let expected = expected_tensors(cfg);
    let seg = opts
        .seg_decoder
        .as_deref()
        .map(crate::segment::SegWeights::from_npz)
        .transpose()?;
    let mut header = GgufHeader::new();
    cfg.write_gguf(&mut header);
    header.set("general.file_type", Value::String(opts.ty.name().into()));
    header.set(
        "paligemma.vision_file_type",
        Value::String(opts.vision_ty.name().into()),
    );
    header.set(
        "tokenizer.huggingface.json",
        Value::String(tokenizer_json.to_string()),
    );
    let stored: Vec<(Type, usize)> = expected.iter().map(|e| storage(e, opts)).collect();
    let stored_row = |name: &str| {
        expected
            .iter()
            .zip(&stored)
            .find(|(e, _)| e.gguf == name)
            .map(|(_, s)| s.1)
    };
    let mut plan = Vec::new();
    for (e, &(ty, mut row)) in expected.iter().zip(&stored) {
        let mut ggml_shape: Vec<usize> = e.shape.iter().rev().copied().collect();
        ggml_shape[0] = row;
        // The outputs feeding a padded matrix are padded to match (weight rows, bias).
        let outputs = padded_consumer(&e.gguf)
            .and_then(|c| stored_row(&c))
            .filter(|&r| r > e.shape[0]);
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
    let cancelled = || {
        opts.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    };
    for (index, (e, ty, row, len)) in plan.iter().enumerate() {
        if cancelled() {
            return Err(Error::Interrupted);
        }
        progress(Progress {
            index,
            total,
            name: &e.gguf,
            ty: *ty,
        });
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
        progress(Progress {
            index: plan.len() + i,
            total,
            name,
            ty: Type::F32,
        });
        let bytes = ggml::quantize(Type::F32, data, data.len())?;
        record(Type::F32, bytes.len());
        writer.write_tensor(name, &bytes)?;
    }
    if cancelled() {
        return Err(Error::Interrupted);
    }
    let file_size = writer.finish()?;
    Ok(Summary {
        path: out.into(),
        tensors: total,
        bytes_per_type,
        file_size,
        config: cfg.clone(),
        notes: Vec::new(),
    })
}
