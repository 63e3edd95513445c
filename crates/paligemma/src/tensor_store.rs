//! Loading a model file's weights onto a backend: used in place from the mapped
//! file on the CPU (or repacked into the CPU's interleaved layouts), copied to the
//! device otherwise. The graphs get typed structs of handles ([`crate::vision::VisionWeights`],
//! [`crate::decoder::DecoderWeights`], [`crate::segment::MaskDecoderWeights`]) resolved
//! here once, so a missing tensor is a load error and a graph build looks nothing up.
use crate::format::names::{POSITION_EMBD, TOKEN_EMBD};
use crate::nn::{CpuOps, LayerNorm, Linear, RmsNorm};
use crate::{Error, Result};
use ggml::gguf::{GgufFile, TensorInfo};
use ggml::{Backend, Buffer, Context, SharedStore, TensorRef, TensorStore, Type, packed};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Name of the repacked copy of the token embedding used as the LM head.
pub(crate) const LM_HEAD: &str = "lm_head.repacked";

/// How [`crate::Weights::repacked`] names the matrices in `ggml::packed`'s layout, with
/// the instruction set whose kernels multiply them.
fn packed_name() -> String {
    let set = packed::kernels().map_or("none", |k| k.description());
    format!("packed f16/bf16/q4_0/q4_K/q8_0 ({set})")
}

/// Every weight of a model file on a backend, read-only once loaded (the contexts of a
/// model share them).
pub(crate) struct WeightStore {
    pub store: SharedStore,
    /// Kept alive for the tensors placed in them.
    _buffers: Vec<Buffer>,
    /// Names of the extra buffer types used, with how many tensors each holds.
    pub repacked: Vec<(String, usize)>,
}

/// Weights by name, only while a model is being loaded.
pub(crate) struct WeightNames<'a> {
    path: &'a Path,
    by_name: HashMap<String, Weight>,
    /// Our own CPU kernels run (the weights were packed for them).
    own_kernels: bool,
}

/// A loaded tensor, and whether it is in `ggml::packed`'s layout (then only
/// `Context::mul_mat_packed` may read it).
#[derive(Clone, Copy)]
struct Weight {
    tensor: TensorRef,
    packed: bool,
    ty: Type,
}

impl WeightStore {
    /// Loads every tensor of `gguf`; returns the store and the names to resolve the
    /// typed weight structs from.
    pub fn load<'g>(
        gguf: &'g GgufFile,
        backend: &Backend,
        repack: bool,
    ) -> Result<(WeightStore, WeightNames<'g>)> {
        let path = gguf.path();
        // Matrices the CPU may repack: every 2-D weight read only by matrix products (the
        // token embedding is also gathered by row, the position embedding added, the mask
        // decoder's tensors read by their own ops).
        let extra = if repack && backend.is_cpu() {
            backend.device().extra_buffer_types()
        } else {
            Vec::new()
        };
        let repack_group = |info: &TensorInfo| {
            extra
                .iter()
                .position(|b| b.supports_weight(backend.device(), info.ty, &info.shape))
                .map(|g| g + 1)
        };
        // On CPUs with AVX2 or AVX-512 VNNI, f16, bf16, q4_0, q4_K and q8_0 matrices go to our
        // own packed layout instead of ggml's (see `ggml::packed`): the last group. A
        // PALIGEMMA_CPU_KERNELS this CPU cannot honour is an error here, not a silent fallback.
        let pack = repack && backend.is_cpu() && packed::selection()?.is_some();
        let packed_group = 1 + extra.len();
        let mut groups: Vec<Vec<(String, &TensorInfo)>> = vec![Vec::new(); 2 + extra.len()];
        for info in &gguf.tensors {
            let matrix = info.shape.len() == 2
                && ![TOKEN_EMBD, POSITION_EMBD].contains(&info.name.as_str())
                && !info.name.starts_with("seg.");
            let g = if !matrix {
                None
            } else if pack && packed::packable(info.ty, &info.shape) {
                Some(packed_group)
            } else {
                repack_group(info)
            };
            groups[g.unwrap_or(0)].push((info.name.clone(), info));
            // The tied LM head reads the whole embedding: like llama.cpp, it gets a repacked
            // copy of its own while the row lookups keep using the file. Not a packed one in
            // f16 or bf16: that copy would be large (1.2 GB for 3B), and only decoding's
            // one-row products, bound by memory, read the head.
            if info.name == TOKEN_EMBD {
                let half = matches!(info.ty, ggml::Type::F16 | ggml::Type::BF16);
                let g = if pack && !half && packed::packable(info.ty, &info.shape) {
                    Some(packed_group)
                } else {
                    repack_group(info)
                };
                if let Some(g) = g {
                    groups[g].push((LM_HEAD.to_string(), info));
                }
            }
        }
        let (mut store, mut buffers, mut repacked) = (TensorStore::new(), Vec::new(), Vec::new());
        let mut by_name = HashMap::new();
        for (g, infos) in groups.iter().enumerate() {
            if infos.is_empty() && g > 0 {
                continue;
            }
            let ctx = Context::new(infos.len() + 1, 0)?;
            for (name, info) in infos {
                ctx.new_named(name, info.ty, &info.shape)?;
            }
            let buffer = if g == 0 && backend.is_cpu() {
                let buffer = Buffer::from_host(gguf.mmap())?;
                for (t, (_, info)) in ctx.tensors().zip(infos) {
                    buffer.place(t, gguf.data_offset + info.offset)?;
                }
                buffer
            } else {
                let buft = if g == 0 || g == packed_group {
                    backend.buffer_type()
                } else {
                    extra[g - 1]
                };
                let buffer = buft.alloc_tensors(&ctx)?;
                // Read with plain file reads: touching the mapping would leave those pages
                // counted in the process's memory beside the copy.
                let mut file = std::fs::File::open(path).map_err(crate::error::io(path))?;
                let mut data = Vec::new();
                for (t, (name, info)) in ctx.tensors().zip(infos) {
                    data.resize(t.nbytes(), 0);
                    read_at(
                        &mut file,
                        (gguf.data_offset + info.offset) as u64,
                        &mut data,
                    )
                    .map_err(crate::error::io(path))?;
                    if g == packed_group {
                        let packed = packed::pack(info.ty, &data, info.shape[0], info.shape[1])
                            .map_err(|e| Error::Tensor {
                                path: path.to_path_buf(),
                                name: name.clone(),
                                detail: e.to_string(),
                            })?;
                        t.write_bytes(&packed)?;
                    } else {
                        t.write_bytes(&data)?;
                    }
                }
                if g == packed_group {
                    repacked.push((packed_name(), infos.len()));
                } else if g > 0 {
                    repacked.push((buft.name(), infos.len()));
                }
                buffer
            };
            buffer.set_weights_usage();
            buffers.push(buffer);
            let refs = store.insert(ctx);
            for ((name, info), r) in infos.iter().zip(refs) {
                by_name.insert(
                    name.clone(),
                    Weight {
                        tensor: r,
                        packed: g == packed_group,
                        ty: info.ty,
                    },
                );
            }
        }
        let weights = WeightStore {
            store: store.share()?,
            _buffers: buffers,
            repacked,
        };
        Ok((
            weights,
            WeightNames {
                path,
                by_name,
                own_kernels: pack,
            },
        ))
    }
}

fn read_at(file: &mut std::fs::File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

impl WeightNames<'_> {
    pub fn path(&self) -> PathBuf {
        self.path.to_path_buf()
    }

    pub fn has(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The tensor `name`; its absence is an error naming the file and the tensor.
    pub fn tensor(&self, name: &str) -> Result<TensorRef> {
        Ok(self.weight(name)?.tensor)
    }

    fn weight(&self, name: &str) -> Result<Weight> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::Tensor {
                path: self.path(),
                name: name.into(),
                detail: "missing from the model file".into(),
            })
    }

    /// `{prefix}.weight` and, when `bias`, `{prefix}.bias`.
    pub fn linear(&self, prefix: &str, bias: bool) -> Result<Linear> {
        Ok(Linear {
            b: if bias {
                Some(self.tensor(&format!("{prefix}.bias"))?)
            } else {
                None
            },
            ..self.matrix(&format!("{prefix}.weight"))?
        })
    }

    /// The matrix `name`, without a bias.
    pub fn matrix(&self, name: &str) -> Result<Linear> {
        let w = self.weight(name)?;
        Ok(Linear {
            w: w.tensor,
            packed: w.packed,
            b: None,
        })
    }

    /// Attention's, joins' and GELU's ops, by the same choice as the matrices' (see
    /// `WeightOptions::repack`), for a tower whose matrices are of the type of
    /// `{prefix}.weight`.
    pub fn cpu_ops(&self, prefix: &str) -> Result<CpuOps> {
        Ok(CpuOps {
            own: self.own_kernels,
            bf16_attention: self.weight(&format!("{prefix}.weight"))?.ty != Type::F32,
        })
    }

    pub fn layer_norm(&self, prefix: &str, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm {
            w: self.tensor(&format!("{prefix}.weight"))?,
            b: self.tensor(&format!("{prefix}.bias"))?,
            eps,
        })
    }

    pub fn rms_norm(&self, prefix: &str, eps: f32) -> Result<RmsNorm> {
        Ok(RmsNorm {
            w: self.tensor(&format!("{prefix}.weight"))?,
            eps,
        })
    }
}
