//! A model file's weights loaded on a device, with its hyper-parameters and tokenizer:
//! loaded once ([`Weights::load`]) and read, never written, by the graphs of every
//! context ([`crate::Model::new`]) made of them, as llama.cpp's `llama_model` is by its
//! contexts.
use crate::Result;
use crate::config::Config;
use crate::decoder::DecoderWeights;
use crate::options::WeightOptions;
use crate::segment::MaskDecoderWeights;
use crate::tensor_store::WeightStore;
use crate::tokenizer::Tokenizer;
use crate::vision::VisionWeights;
use ggml::gguf::GgufFile;
use ggml::{Backend, Device};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A model file's weights on a device, the typed handles the graphs read them by, its
/// hyper-parameters and its tokenizer.
pub struct Weights {
    path: PathBuf,
    pub(crate) config: Config,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) tensors: WeightStore,
    pub(crate) vision: VisionWeights,
    pub(crate) decoder: DecoderWeights,
    pub(crate) mask_decoder: Option<MaskDecoderWeights>,
    device: Device,
    /// `general.file_type` of the file (for reports).
    file_type: String,
}

impl Weights {
    /// Loads a GGUF written by `paligemma convert`: every tensor, on `opts.device`, after
    /// checking everything the graphs rely on ([`crate::validate::model_file`]).
    pub fn load(path: impl AsRef<Path>, opts: &WeightOptions) -> Result<Arc<Weights>> {
        let path = path.as_ref().to_path_buf();
        let gguf = GgufFile::open(&path)?;
        let (config, tokenizer) = crate::validate::model_file(&gguf)?;
        // The buffers hold the weights; the backend that placed them is not needed after.
        let backend = Backend::on(opts.device)?;
        let (tensors, names) = WeightStore::load(&gguf, &backend, opts.repack)?;
        let vision = VisionWeights::load(&names, &config.vision)?;
        let decoder = DecoderWeights::load(&names, &config.text)?;
        let mask_decoder = MaskDecoderWeights::load(&names, &tensors.store)?;
        let file_type = gguf
            .get("general.file_type")
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_string();
        Ok(Arc::new(Weights {
            path,
            config,
            tokenizer,
            tensors,
            vision,
            decoder,
            mask_decoder,
            device: opts.device,
            file_type,
        }))
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Path of the model file the weights were loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The weight types of the file as the converter wrote them (`general.file_type`,
    /// e.g. `q4_0` or `q4_0+vision-f16`).
    pub fn weight_type(&self) -> &str {
        &self.file_type
    }

    /// The extra buffer types holding repacked weights, with how many tensors each holds
    /// (empty when nothing was repacked).
    pub fn repacked(&self) -> &[(String, usize)] {
        &self.tensors.repacked
    }

    /// The device the weights are on, and their contexts run.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Whether the file carries the VQ-VAE mask decoder.
    pub fn has_segmentation(&self) -> bool {
        self.mask_decoder.is_some()
    }
}
