//! big_vision's VQ-VAE mask decoder (weights from `vae-oid.npz`) as a ggml graph,
//! and pasting its 64x64 output into an object's box.
//!
//! Architecture: 16 codes pick 16 codebook vectors laid out 4x4 (row-major); a 1x1
//! conv to 128 channels + ReLU; two residual blocks (3x3 conv, ReLU, 3x3 conv,
//! ReLU, 1x1 conv, plus the skip); four transposed convs (kernel 4, stride 2,
//! PyTorch padding 1) with ReLU, 128 -> 128 -> 64 -> 32 -> 16 channels, 4x4 ->
//! 64x64; a 1x1 conv to one channel.
//!
//! Each transposed conv is computed in f32 as a zero-insertion upsample followed by
//! an ordinary conv with the spatially flipped kernel (ggml's CPU transposed conv
//! works in f16, too coarse to match the reference to 1e-4); the converter stores
//! the kernels already flipped.
use crate::output::Mask;
use crate::tensor_store::WeightNames;
use crate::{Error, Result};
use ggml::gguf::GgufHeader;
use ggml::{Context, SharedStore, Tensor, TensorRef, Type};
use std::path::Path;

/// Side of the decoder's output mask.
pub const MASK_SIZE: usize = 64;
/// Seg tokens (codebook indices) per object mask, laid out 4x4.
pub const CODES: usize = 16;
const UP_CHANNELS: [usize; 5] = [128, 128, 64, 32, 16];

/// GGUF names of the decoder's tensors, in file order.
fn gguf_names() -> Vec<String> {
    let mut names = vec![
        "seg.codebook".to_string(),
        "seg.conv_in.weight".into(),
        "seg.conv_in.bias".into(),
    ];
    for r in 0..2 {
        for c in 0..3 {
            names.push(format!("seg.res{r}.conv{c}.weight"));
            names.push(format!("seg.res{r}.conv{c}.bias"));
        }
    }
    for u in 0..4 {
        names.push(format!("seg.up{u}.weight"));
        names.push(format!("seg.up{u}.bias"));
    }
    names.push("seg.conv_out.weight".into());
    names.push("seg.conv_out.bias".into());
    names
}

/// The npz key (without any prefix) each GGUF tensor comes from.
fn npz_key(gguf: &str) -> String {
    if gguf == "seg.codebook" {
        return "_vq_vae._embedding".into();
    }
    let (layer, part) = gguf.rsplit_once('.').unwrap_or((gguf, ""));
    let base = match layer {
        "seg.conv_in" => "decoder.0".to_string(),
        "seg.conv_out" => "decoder.12".to_string(),
        l if l.starts_with("seg.res") => {
            let r: usize = l[7..8].parse().unwrap_or(0);
            let c: usize = l[l.len() - 1..].parse().unwrap_or(0);
            format!("decoder.{}.net.{}", r + 2, c * 2)
        }
        l => {
            let u: usize = l[l.len() - 1..].parse().unwrap_or(0);
            format!("decoder.{}", 4 + 2 * u)
        }
    };
    format!("{base}.{part}")
}

/// Largest `vae-oid.npz` read (the published one is 11 MB).
const MAX_NPZ_BYTES: usize = 1 << 30;

/// Decoder weights read from a `vae-oid.npz`, as (GGUF name, ggml shape, f32 data).
pub struct SegWeights {
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl SegWeights {
    /// Reads the npz; keys may carry any prefix before `_vq_vae.` / `decoder.`.
    pub fn from_npz(path: &Path) -> Result<SegWeights> {
        let bytes = crate::read_input_file(path, MAX_NPZ_BYTES)?;
        Self::from_npz_bytes(path, &bytes)
    }

    /// [`SegWeights::from_npz`] of the bytes of a file (`path` names it in errors).
    pub fn from_npz_bytes(path: &Path, bytes: &[u8]) -> Result<SegWeights> {
        let err = |detail: String| Error::Checkpoint {
            path: path.into(),
            detail,
        };
        // An npz is a zip archive of `.npy` files, one per array.
        let mut npz = zip::ZipArchive::new(std::io::Cursor::new(bytes))
            .map_err(|e| err(format!("not an npz archive: {e}")))?;
        let names: Vec<String> = npz
            .file_names()
            .filter_map(|n| n.strip_suffix(".npy"))
            .map(String::from)
            .collect();
        let find = |key: &str| {
            names
                .iter()
                .find(|n| {
                    n.as_str() == key
                        || n.ends_with(&format!(".{key}"))
                        || n.ends_with(&format!("/{key}"))
                })
                .cloned()
        };
        let mut tensors = Vec::new();
        let mut dim = None;
        for name in gguf_names() {
            let key = npz_key(&name);
            let found = find(&key).ok_or_else(|| {
                err(format!(
                    "array {key:?} is missing (found: {})",
                    names.join(", ")
                ))
            })?;
            let member = npz
                .by_name(&format!("{found}.npy"))
                .map_err(|e| err(format!("{found}: {e}")))?;
            let array = npyz::NpyFile::new(member)
                .map_err(|e| err(format!("{found}: not a .npy array ({e})")))?;
            let shape: Vec<usize> = array.shape().iter().map(|&d| d as usize).collect();
            // The shape is checked before the data is read: an array's header may claim
            // any size.
            let expected = expected_shape(
                &name,
                *dim.get_or_insert(if name == "seg.codebook" {
                    shape.get(1).copied().unwrap_or(0)
                } else {
                    0
                }),
            );
            if shape != expected || dim.is_some_and(|d| d > crate::limits::MAX_WIDTH) {
                return Err(err(format!(
                    "array {found:?} has shape {shape:?}, expected {expected:?}"
                )));
            }
            let data: Vec<f32> = array
                .into_vec::<f32>()
                .map_err(|e| err(format!("{found}: expected float32 values ({e})")))?;
            let (ggml_shape, data) = if name.starts_with("seg.up") && name.ends_with(".weight") {
                flip_transposed_kernel(&shape, &data)
            } else {
                (shape.iter().rev().copied().collect(), data)
            };
            tensors.push((name, ggml_shape, data));
        }
        Ok(SegWeights { tensors })
    }

    /// Number of decoder tensors read.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether no decoder tensor was read.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Declares the tensors (all f32) in a GGUF header.
    pub fn declare(&self, header: &mut GgufHeader) -> Result<()> {
        for (name, shape, _) in &self.tensors {
            header.add_tensor(name.clone(), Type::F32, shape)?;
        }
        header.set(
            "paligemma.seg.codebook_size",
            ggml::gguf::Value::U32(self.tensors[0].1[1] as u32),
        );
        Ok(())
    }

    /// Each tensor's GGUF name and f32 data, in file order (transposed-conv kernels already
    /// flipped).
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[f32])> {
        self.tensors
            .iter()
            .map(|(n, _, d)| (n.as_str(), d.as_slice()))
    }
}

/// PyTorch shapes of the npz arrays.
fn expected_shape(name: &str, dim: usize) -> Vec<usize> {
    if name == "seg.codebook" {
        return vec![128, dim];
    }
    let bias = name.ends_with(".bias");
    let (cout, cin, k) = match name.rsplit_once('.').map_or(name, |(l, _)| l) {
        "seg.conv_in" => (128, dim, 1),
        "seg.conv_out" => (1, 16, 1),
        l if l.starts_with("seg.res") => (128, 128, if l.ends_with('2') { 1 } else { 3 }),
        l => {
            let u: usize = l[l.len() - 1..].parse().unwrap_or(0);
            // ConvTranspose2d weights are [in, out, kh, kw].
            if bias {
                return vec![UP_CHANNELS[u + 1]];
            }
            return vec![UP_CHANNELS[u], UP_CHANNELS[u + 1], 4, 4];
        }
    };
    if bias {
        vec![cout]
    } else {
        vec![cout, cin, k, k]
    }
}

/// A ConvTranspose2d kernel [in, out, kh, kw] as the equivalent conv kernel
/// [out, in, kh, kw] flipped in space; returned in ggml order [kw, kh, in, out].
fn flip_transposed_kernel(shape: &[usize], data: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let (cin, cout, kh, kw) = (shape[0], shape[1], shape[2], shape[3]);
    let mut out = vec![0f32; data.len()];
    for i in 0..cin {
        for o in 0..cout {
            for y in 0..kh {
                for x in 0..kw {
                    out[((o * cin + i) * kh + y) * kw + x] =
                        data[((i * cout + o) * kh + (kh - 1 - y)) * kw + (kw - 1 - x)];
                }
            }
        }
    }
    (vec![kw, kh, cin, cout], out)
}

/// Every decoder tensor with its shape in a model file (ggml order), for a codebook
/// of `dim`-wide vectors.
pub(crate) fn gguf_shapes(dim: usize) -> Vec<(String, Vec<usize>)> {
    gguf_names()
        .into_iter()
        .map(|name| {
            let shape = expected_shape(&name, dim);
            // Transposed-conv kernels are stored flipped, [kw, kh, in, out].
            let ggml = if shape.len() == 4 && name.starts_with("seg.up") {
                vec![shape[3], shape[2], shape[0], shape[1]]
            } else {
                shape.into_iter().rev().collect()
            };
            (name, ggml)
        })
        .collect()
}

/// A convolution's kernel and bias.
#[derive(Clone, Copy, Debug)]
struct Conv {
    w: TensorRef,
    b: TensorRef,
}

/// The mask decoder's weights, when a model file has them.
#[derive(Debug)]
pub(crate) struct MaskDecoderWeights {
    codebook: TensorRef,
    /// Codes a mask may use (`0..codebook_size`).
    pub codebook_size: usize,
    conv_in: Conv,
    res: [[Conv; 3]; 2],
    up: [Conv; 4],
    conv_out: Conv,
}

impl MaskDecoderWeights {
    /// The decoder of a model file; none when it has no `seg.` tensors (validation
    /// guarantees all or none).
    pub fn load(w: &WeightNames<'_>, store: &SharedStore) -> Result<Option<MaskDecoderWeights>> {
        if !w.has("seg.codebook") {
            return Ok(None);
        }
        let conv = |layer: &str| -> Result<Conv> {
            Ok(Conv {
                w: w.tensor(&format!("{layer}.weight"))?,
                b: w.tensor(&format!("{layer}.bias"))?,
            })
        };
        let res = |r: usize| -> Result<[Conv; 3]> {
            Ok([
                conv(&format!("seg.res{r}.conv0"))?,
                conv(&format!("seg.res{r}.conv1"))?,
                conv(&format!("seg.res{r}.conv2"))?,
            ])
        };
        let codebook = w.tensor("seg.codebook")?;
        Ok(Some(MaskDecoderWeights {
            codebook,
            codebook_size: store.get(codebook).ne()[1],
            conv_in: conv("seg.conv_in")?,
            res: [res(0)?, res(1)?],
            up: [
                conv("seg.up0")?,
                conv("seg.up1")?,
                conv("seg.up2")?,
                conv("seg.up3")?,
            ],
            conv_out: conv("seg.conv_out")?,
        }))
    }
}

/// Builds the decoder graph on `codes` (I32 [16]); returns [64, 64] f32.
pub(crate) fn build<'c>(
    ctx: &'c Context,
    store: &SharedStore,
    w: &MaskDecoderWeights,
    codes: Tensor<'_>,
) -> Result<Tensor<'c>> {
    let bias = |x: Tensor<'c>, b: TensorRef| -> Result<Tensor<'c>> {
        let b = store.get(b);
        Ok(ctx.add(x, ctx.reshape(b, &[1, 1, b.ne()[0]])?)?)
    };
    let conv = |x: Tensor<'c>, layer: Conv, pad: usize| -> Result<Tensor<'c>> {
        bias(ctx.conv_2d(store.get(layer.w), x, 1, pad)?, layer.b)
    };
    let codebook = store.get(w.codebook);
    let dim = codebook.ne()[0];
    let vectors = ctx.get_rows(codebook, codes)?; // [dim, 16]
    let mut x = ctx.reshape(ctx.cont(ctx.transpose(vectors)?)?, &[4, 4, dim, 1])?;
    x = ctx.relu(conv(x, w.conv_in, 0)?)?;
    for [c0, c1, c2] in w.res {
        let skip = x;
        let mut h = ctx.relu(conv(x, c0, 1)?)?;
        h = ctx.relu(conv(h, c1, 1)?)?;
        h = conv(h, c2, 0)?;
        x = ctx.add(h, skip)?;
    }
    for up in w.up {
        let [wd, ht, ch, _] = x.ne();
        // Zero insertion: each pixel followed by a zero, in x then in y.
        let z = ctx.pad(ctx.reshape(x, &[1, wd, ht, ch])?, [1, 0, 0, 0])?;
        let z = ctx.reshape(z, &[2 * wd, 1, ht, ch])?;
        let z = ctx.pad(z, [0, 1, 0, 0])?;
        let z = ctx.reshape(z, &[2 * wd, 2 * ht, ch, 1])?;
        // Transposed conv (k 4, s 2, p 1) == conv with the flipped kernel, padding
        // k - 1 - p = 2, over the zero-inserted input; the trailing zero row/column
        // adds one output that is cropped.
        let y = ctx.conv_2d(store.get(up.w), z, 1, 2)?; // [2wd+1, 2ht+1, cout]
        let cout = y.ne()[2];
        let y = ctx.view(
            y,
            &[2 * wd, 2 * ht, cout, 1],
            &[y.nb()[1], y.nb()[2], y.nb()[3]],
            0,
        )?;
        x = ctx.relu(bias(ctx.cont(y)?, up.b)?)?;
    }
    let out = conv(x, w.conv_out, 0)?;
    Ok(ctx.reshape(out, &[MASK_SIZE, MASK_SIZE])?)
}

/// Pastes a raw 64x64 decoder output into an object's box on a `width` x `height`
/// frame the way big_vision's segmentation evaluator does: box corners truncated
/// to pixels (`int(bin / 1023 * size)`), the mask resized to the box with Pillow's
/// float bilinear filter (antialiased when shrinking) and thresholded at 0.
/// `bins` are the loc bins (y1, x1, y2, x2) as the model wrote them.
pub fn paste(
    raw: &[f32],
    bins: [u32; 4],
    divisor: f32,
    width: usize,
    height: usize,
) -> Option<Mask> {
    if raw.len() != MASK_SIZE * MASK_SIZE {
        return None;
    }
    let px = |bin: u32, size: usize| {
        (((bin as f64 / divisor as f64).clamp(0.0, 1.0) * size as f64) as usize).min(size)
    };
    let (y1, x1, y2, x2) = (
        px(bins[0], height),
        px(bins[1], width),
        px(bins[2], height),
        px(bins[3], width),
    );
    if x2 <= x1 || y2 <= y1 {
        return None;
    }
    let (bw, bh) = (x2 - x1, y2 - y1);
    let resized = crate::preprocess::resize_f32_bilinear(raw, MASK_SIZE, MASK_SIZE, bw, bh);
    let bits: Vec<bool> = resized.iter().map(|&v| v > 0.0).collect();
    Some(Mask::from_bitmap(x1, y1, bw, bh, &bits))
}
