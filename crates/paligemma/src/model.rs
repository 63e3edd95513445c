//! A loaded model: its weights on a backend, the tokenizer, the KV cache and the
//! scheduler that runs the graphs of `vision.rs`, `decoder.rs` and [`crate::segment`].
//! Generation lives in [`crate::generate`], tasks and parsed results in `answer.rs`
//! ([`Model::answer`]).
use crate::config::Config;
use crate::decoder::{DecoderInputs, DecoderWeights};
use crate::generate::Sequence;
use crate::kv_cache::{Batch, KvCache, KvType, Run};
use crate::preprocess::{PixelValues, RgbImage, preprocess};
use crate::segment::MaskDecoderWeights;
use crate::tokenizer::Tokenizer;
use crate::vision::VisionWeights;
use crate::weights::WeightStore;
use crate::{Error, Result};
use ggml::gguf::GgufFile;
use ggml::{Backend, Context, Scheduler, Type};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Nodes a graph may have; PaliGemma 2 28B's decoder needs about 2,500.
const GRAPH_SIZE: usize = 16 * 1024;

/// CPU threads when none are asked for: half the cores this process may use, at
/// least one. ggml's workers meet at every node of a graph and wait for each other by
/// spinning, so one worker that shares a core with another busy program holds all the
/// others up (two cameras with all cores each, or one with a busy process beside it,
/// answered 40x slower than with one thread). A robot always runs other programs;
/// leaving them half the cores keeps the model out of that. Ask for more on a machine
/// that does nothing else.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).div_ceil(2)
}

/// How to load a model.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// `cpu`, `cuda:N`, `vulkan:N` or `gpu`.
    pub device: String,
    /// CPU threads (0: [`default_threads`]).
    pub threads: usize,
    /// Element type of the KV cache.
    pub kv_type: KvType,
    /// Tokens the KV cache holds per sequence (0: image tokens + 512, at most the model's context).
    pub context: usize,
    /// Prompts that one call of [`Model::answer_batch`] or [`Model::generate`] decodes
    /// together (each gets its own KV cache region of `context` tokens).
    pub max_sequences: usize,
    /// On the CPU, store the matrices whose type the CPU's extra buffer types take
    /// (q4_0, q4_k, iq4_nl on x86 with AVX2) in their interleaved layouts, as llama.cpp
    /// does by default: faster prompt processing and batched decoding, at the cost of a
    /// copy of those weights in memory instead of using the mapped file in place.
    pub repack: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions { device: "cpu".into(), threads: 0, kv_type: KvType::F16, context: 0, max_sequences: 4, repack: true }
    }
}

/// Time spent per stage, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Resizing and normalising the image (0 when pixel values were given).
    pub preprocess: f64,
    /// Vision tower and projector.
    pub vision: f64,
    /// Running the prefix (image tokens and prompt) through the decoder.
    pub prefill: f64,
    /// Decode steps, each a batch shared with the other answers in progress.
    pub decode: f64,
    /// Tokens in the prefix (a count, not milliseconds).
    pub prefix_tokens: usize,
    /// Tokens generated (a count, not milliseconds).
    pub generated_tokens: usize,
}

/// An image run through the vision tower and projector, ready for any number of prompts.
#[derive(Clone, Debug)]
pub struct ImageEmbedding {
    /// [n_image_tokens, text width], row-major.
    pub features: Vec<f32>,
    /// Size of the original frame: detections are reported in its pixels.
    pub width: usize,
    /// Height of the original frame in pixels.
    pub height: usize,
    /// Time spent preprocessing and encoding the image (carried into each answer's timings).
    pub timings: Timings,
}

/// Outputs of the vision stages, for parity checks.
pub struct VisionStages {
    /// Vision tower output after the post layer norm: [n_patches, vision width].
    pub vision: Vec<f32>,
    /// Projector output: [n_patches, text width].
    pub projector: Vec<f32>,
}

/// A loaded model: weights on a backend, tokenizer, scheduler and KV cache.
pub struct Model {
    path: PathBuf,
    pub(crate) config: Config,
    pub(crate) tokenizer: Tokenizer,
    weights: WeightStore,
    vision: VisionWeights,
    decoder: DecoderWeights,
    mask_decoder: Option<MaskDecoderWeights>,
    pub(crate) kv: KvCache,
    /// The answers in progress, by KV cache region (see [`crate::generate`]).
    pub(crate) sequences: Vec<Option<Sequence>>,
    sched: Scheduler,
    device: String,
    threads: usize,
    /// `general.file_type` of the file (for reports).
    file_type: String,
}

impl Model {
    /// Loads a GGUF written by `paligemma convert`.
    pub fn load(path: impl AsRef<Path>, opts: &ModelOptions) -> Result<Model> {
        let path = path.as_ref().to_path_buf();
        let gguf = GgufFile::open(&path)?;
        // Everything the graphs rely on is checked before touching a backend.
        let (config, tokenizer) = crate::validate::model_file(&gguf)?;

        let threads = if opts.threads == 0 { default_threads() } else { opts.threads };
        let backend = Backend::new(&opts.device)?;
        let device = backend.device().spec();
        let (weights, names) = WeightStore::load(&gguf, &backend, opts.repack)?;
        let vision = VisionWeights::load(&names, &config.vision)?;
        let decoder = DecoderWeights::load(&names, &config.text)?;
        let mask_decoder = MaskDecoderWeights::load(&names, &weights.store)?;

        let n_ctx = match opts.context {
            0 => (config.tokens.image_token_count + 512).min(config.text.context_length),
            n => n,
        };
        let kv = KvCache::new(&backend, &config.text, opts.kv_type, n_ctx, opts.max_sequences)?;
        let sched = Scheduler::new(backend, threads, GRAPH_SIZE)?;
        let file_type = gguf.get("general.file_type").and_then(|v| v.as_str()).unwrap_or("?").to_string();
        let sequences = (0..kv.max_sequences).map(|_| None).collect();
        Ok(Model { path, config, tokenizer, weights, vision, decoder, mask_decoder, kv, sequences, sched, device, threads, file_type })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Path of the model file it was loaded from.
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
        &self.weights.repacked
    }

    /// The device spec the model runs on (`cpu`, `cuda:0`...).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// CPU threads the graphs run on.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Changes the number of CPU threads (a new pool of that many).
    pub fn set_threads(&mut self, threads: usize) -> Result<()> {
        self.sched.set_n_threads(threads.max(1))?;
        self.threads = threads.max(1);
        Ok(())
    }

    /// Tokens the KV cache holds per sequence.
    pub fn context_size(&self) -> usize {
        self.kv.n_ctx
    }

    /// Prompts answered together at most.
    pub fn max_sequences(&self) -> usize {
        self.kv.max_sequences
    }

    /// Bytes of the KV cache (every sequence region).
    pub fn kv_cache_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// Element type of the KV cache.
    pub fn kv_type(&self) -> KvType {
        self.kv.ty
    }

    /// Bytes of compute buffers the scheduler holds (the largest graph run so far).
    pub fn compute_buffer_bytes(&self) -> usize {
        self.sched.buffer_sizes().iter().map(|(_, n)| n).sum()
    }

    /// Whether the file carries the VQ-VAE mask decoder.
    pub fn has_segmentation(&self) -> bool {
        self.mask_decoder.is_some()
    }

    /// Decodes 16 `<segNNN>` codes (0..128) to the decoder's raw 64x64 output, row-major.
    pub fn decode_mask(&mut self, codes: &[u32]) -> Result<Vec<f32>> {
        let Some(w) = &self.mask_decoder else {
            return Err(Error::Invalid(format!("{} has no segmentation decoder (convert with --seg-decoder vae-oid.npz)", self.path.display())));
        };
        let size = w.codebook_size;
        if codes.len() != crate::segment::CODES || codes.iter().any(|&c| c as usize >= size) {
            return Err(Error::Invalid(format!("a mask needs {} codes in 0..{size}, got {codes:?}", crate::segment::CODES)));
        }
        let ctx = Context::new(1024, 1024)?;
        let input = ctx.input("seg_codes", Type::I32, &[codes.len()])?;
        let out = crate::segment::build(&ctx, &self.weights.store, w, input)?;
        out.set_output();
        let mut graph = ctx.graph(1024)?;
        graph.expand(out)?;
        self.sched.alloc(&graph)?;
        input.write_i32(&codes.iter().map(|&c| c as i32).collect::<Vec<_>>())?;
        self.sched.compute(&graph)?;
        Ok(out.read_f32()?)
    }

    /// Preprocesses an image and encodes it.
    pub fn encode_image(&mut self, image: &RgbImage) -> Result<ImageEmbedding> {
        let start = Instant::now();
        let pixels = preprocess(image, &self.config.vision);
        let pre = ms(start);
        let mut emb = self.encode_pixels(&pixels)?;
        emb.timings.preprocess = pre;
        (emb.width, emb.height) = (image.width, image.height);
        Ok(emb)
    }

    /// Encodes preprocessed pixel values.
    pub fn encode_pixels(&mut self, pixels: &PixelValues) -> Result<ImageEmbedding> {
        let start = Instant::now();
        let stages = self.run_vision(pixels, false)?;
        Ok(ImageEmbedding { features: stages.projector, width: pixels.size, height: pixels.size, timings: Timings { vision: ms(start), ..Default::default() } })
    }

    /// Vision tower and projector outputs, for parity checks.
    pub fn vision_stages(&mut self, pixels: &PixelValues) -> Result<VisionStages> {
        self.run_vision(pixels, true)
    }

    fn run_vision(&mut self, pixels: &PixelValues, keep_vision: bool) -> Result<VisionStages> {
        let v = &self.config.vision;
        if pixels.size != v.image_size {
            return Err(Error::Image(format!("pixel values are {0}x{0}, the model takes {1}x{1}", pixels.size, v.image_size)));
        }
        let ctx = Context::new(GRAPH_SIZE, GRAPH_SIZE)?;
        let input = ctx.input("pixels", Type::F32, &[v.image_size, v.image_size, 3, 1])?;
        let (vision, projector) = crate::vision::build(&ctx, &self.weights.store, &self.vision, v, input)?;
        vision.set_output();
        projector.set_output();
        let mut graph = ctx.graph(GRAPH_SIZE)?;
        graph.expand(vision)?;
        graph.expand(projector)?;
        self.sched.alloc(&graph)?;
        input.write_f32(&pixels.data)?;
        self.sched.compute(&graph)?;
        Ok(VisionStages { vision: if keep_vision { vision.read_f32()? } else { Vec::new() }, projector: projector.read_f32()? })
    }

    /// Runs the decoder over a batch and returns the logits of its last
    /// `batch.n_logits` tokens, [n_logits, vocab] row-major, before the final softcap.
    pub(crate) fn forward(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        let t = &self.config.text;
        let n = batch.ids.len();
        if let Some(&bad) = batch.ids.iter().find(|&&id| id as usize >= t.vocab_size) {
            return Err(Error::Prompt(format!("token id {bad} is outside the vocabulary of {}", t.vocab_size)));
        }
        let image_id = self.config.tokens.image_token_id;
        let n_image = batch.ids.iter().take_while(|&&id| id == image_id).count();
        if n_image > 0 {
            let expected = self.config.tokens.image_token_count;
            let features = batch.image.map_or(0, |e| e.features.len() / t.width);
            if !batch.prefix || n_image != expected || features != expected {
                return Err(Error::Prompt(format!("the prefix needs {expected} image tokens at the start and an image encoding of as many features")));
            }
        }
        let runs = batch.runs(t.sliding_window);

        let ctx = Context::new(GRAPH_SIZE, GRAPH_SIZE)?;
        let store = &self.weights.store;
        let text_ids: Vec<i32> = batch.ids[n_image..].iter().map(|&id| id as i32).collect();
        let mut parts = Vec::new();
        let image_in = if n_image > 0 {
            let img = ctx.input("image_features", Type::F32, &[t.width, n_image])?;
            parts.push(img);
            Some(img)
        } else {
            None
        };
        let ids_in = if text_ids.is_empty() {
            None
        } else {
            let tid = ctx.input("token_ids", Type::I32, &[text_ids.len()])?;
            let emb = ctx.get_rows(store.get(self.decoder.token_embd), tid)?;
            parts.push(ctx.scale(emb, t.embed_scale)?);
            Some(tid)
        };
        let mut x = parts[0];
        for p in &parts[1..] {
            x = ctx.concat(x, *p, 1)?;
        }
        let pos = ctx.input("positions", Type::I32, &[n])?;
        let slots = ctx.input("slots", Type::I32, &[n])?;
        // Masks as f32 inputs (written below), read by the attention as f16. A mask no
        // layer reads would never be allocated.
        let read = [t.sliding_layers.iter().any(|&s| !s), t.sliding_layers.iter().any(|&s| s)];
        let mut mask_inputs = Vec::new();
        let mut attention = Vec::new();
        for (r, run) in runs.iter().enumerate() {
            let mut masks = [None, None];
            for ((slot, read), (kind, m)) in masks.iter_mut().zip(read).zip([("full", &run.full), ("sliding", &run.sliding)]) {
                if let (true, Some(values)) = (read, m) {
                    let input = ctx.input(&format!("{kind}_mask.{r}"), Type::F32, &[run.kv, run.len])?;
                    mask_inputs.push((input, values));
                    *slot = Some(ctx.cast(input, Type::F16)?);
                }
            }
            let [full, sliding] = masks;
            attention.push(Run { base: run.base, first: run.first, len: run.len, kv: run.kv, full, sliding });
        }
        let mut graph = ctx.graph(GRAPH_SIZE)?;
        let inputs = DecoderInputs { x, pos, slots, runs: attention, n_logits: batch.n_logits };
        let logits = crate::decoder::build(&ctx, store, &self.decoder, t, &mut graph, &self.kv, inputs)?;
        logits.set_output();
        graph.expand(logits)?;
        self.sched.alloc(&graph)?;

        if let (Some(img), Some(e)) = (image_in, batch.image) {
            img.write_f32(&e.features)?;
        }
        if let Some(tid) = ids_in {
            tid.write_i32(&text_ids)?;
        }
        pos.write_i32(&batch.positions)?;
        slots.write_i32(&batch.slots.iter().map(|&s| s as i32).collect::<Vec<_>>())?;
        for (input, values) in mask_inputs {
            input.write_f32(values)?;
        }
        self.sched.compute(&graph)?;
        Ok(logits.read_f32()?)
    }
}

/// Milliseconds since `start`.
pub(crate) fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}
