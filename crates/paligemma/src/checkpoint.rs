//! A Hugging Face checkpoint folder opened for reading: `config.json`,
//! `tokenizer.json`, `preprocessor_config.json` and the (possibly sharded) safetensors
//! through memory maps, one tensor at a time, in any of the three key layouts seen in
//! the wild (hub repos, transformers 5 `save_pretrained`, transformers 4.5x
//! `save_pretrained`). What the converter reads.
use crate::config::Config;
use crate::format::Expected;
use crate::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
            return Err(Error::Checkpoint {
                path: dir.into(),
                detail: "not a directory (expected a Hugging Face checkpoint folder)".into(),
            });
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::Checkpoint {
                path: dir.into(),
                detail: "no config.json in this folder".into(),
            });
        }
        let tok_path = dir.join("tokenizer.json");
        let tokenizer_json =
            std::fs::read_to_string(&tok_path).map_err(crate::error::io(&tok_path))?;
        let tokenizer =
            crate::tokenizer::parse_json(&tokenizer_json).map_err(|e| Error::Checkpoint {
                path: tok_path.clone(),
                detail: format!("not a valid tokenizer.json: {e}"),
            })?;

        let (files, notes) = safetensors_files(dir)?;
        let mut index = BTreeMap::new();
        let mut embed_dtype = None;
        for (i, (path, map)) in files.iter().enumerate() {
            let st = SafeTensors::deserialize(map).map_err(|e| Error::Checkpoint {
                path: path.clone(),
                detail: format!("not a valid safetensors file: {e}"),
            })?;
            for (key, view) in st.tensors() {
                if let Some(canon) = canonical_name(&key) {
                    if canon == "text.embed_tokens.weight" {
                        embed_dtype = Some(view.dtype());
                    }
                    let entry = Entry {
                        file: i,
                        key: key.clone(),
                        shape: view.shape().to_vec(),
                    };
                    if let Some(other) = index.insert(canon.clone(), entry) {
                        return Err(Error::Checkpoint {
                            path: path.clone(),
                            detail: format!(
                                "{key:?} and {:?} (in {}) are the same tensor {canon:?}",
                                other.key,
                                files[other.file].0.display()
                            ),
                        });
                    }
                }
            }
        }
        let pp_path = dir.join("preprocessor_config.json");
        let pp = if pp_path.is_file() {
            let text = std::fs::read_to_string(&pp_path).map_err(crate::error::io(&pp_path))?;
            Some(
                serde_json::from_str::<serde_json::Value>(&text).map_err(|e| Error::Config {
                    path: pp_path.clone(),
                    detail: format!("not valid JSON: {e}"),
                })?,
            )
        } else {
            None
        };
        let dtype = match embed_dtype {
            Some(Dtype::BF16) => "bfloat16",
            Some(Dtype::F16) => "float16",
            _ => "float32",
        };
        let config = Config::from_hf(
            &config_path,
            pp.as_ref().map(|p| (pp_path.as_path(), p)),
            &|t| tokenizer.token_to_id(t),
            dtype,
        )?;
        Ok(Checkpoint {
            dir: dir.into(),
            files,
            index,
            config,
            tokenizer_json,
            notes,
        })
    }

    /// A tensor as f32 values with its HF shape.
    pub(crate) fn tensor_f32(&self, canon: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let Entry { file, key, .. } = self.index.get(canon).ok_or_else(|| Error::Tensor {
            path: self.dir.clone(),
            name: canon.into(),
            detail: "missing from the checkpoint".into(),
        })?;
        let (path, map) = &self.files[*file];
        let st = SafeTensors::deserialize(map).map_err(|e| Error::Checkpoint {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let view = st.tensor(key).map_err(|e| Error::Tensor {
            path: path.clone(),
            name: key.clone(),
            detail: e.to_string(),
        })?;
        let data = view.data();
        let values = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes(b.try_into().unwrap()).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes(b.try_into().unwrap()).to_f32())
                .collect(),
            other => {
                return Err(Error::Tensor {
                    path: path.clone(),
                    name: key.clone(),
                    detail: format!("dtype {other:?}, expected F32, F16 or BF16"),
                });
            }
        };
        Ok((view.shape().to_vec(), values))
    }

    pub(crate) fn check_shape(&self, e: &Expected) -> Result<()> {
        let entry = self.index.get(&e.hf).ok_or_else(|| Error::Tensor {
            path: self.dir.clone(),
            name: e.hf.clone(),
            detail: format!("missing from the checkpoint (needed for {})", e.gguf),
        })?;
        if entry.shape != e.shape {
            return Err(Error::Tensor {
                path: self.files[entry.file].0.clone(),
                name: entry.key.clone(),
                detail: format!(
                    "shape {:?}, expected {:?} from config.json",
                    entry.shape, e.shape
                ),
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
        let text =
            String::from_utf8(crate::read_input_file(&index_path, 64 << 20)?).map_err(|_| {
                Error::Config {
                    path: index_path.clone(),
                    detail: "not UTF-8".into(),
                }
            })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: index_path.clone(),
            detail: format!("not valid JSON: {e}"),
        })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Config {
                path: index_path.clone(),
                detail: "field weight_map: expected an object".into(),
            })?;
        let mut files = Vec::new();
        for (key, file) in map {
            let name = file
                .as_str()
                .filter(|f| is_plain_file_name(f))
                .ok_or_else(|| Error::Config {
                    path: index_path.clone(),
                    detail: format!(
                        "weight_map[{key:?}] is {file}, expected the name of a file in this folder"
                    ),
                })?;
            files.push(name.to_string());
        }
        files.sort();
        files.dedup();
        (INDEX, files)
    } else if dir.join(SINGLE).is_file() {
        (SINGLE, vec![SINGLE.to_string()])
    } else {
        return Err(Error::Checkpoint {
            path: dir.into(),
            detail: format!("no {INDEX} and no {SINGLE} (the files transformers reads)"),
        });
    };
    if names.is_empty() {
        return Err(Error::Config {
            path: index_path,
            detail: "weight_map names no file".into(),
        });
    }
    let mut notes = Vec::new();
    let mut others: Vec<String> = std::fs::read_dir(dir)
        .map_err(crate::error::io(dir))?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
        .filter(|n| n.ends_with(".safetensors") && !names.contains(n))
        .collect();
    others.sort();
    for other in others {
        notes.push(format!(
            "ignored {other}: not a weight file of the model (transformers reads {source})"
        ));
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
