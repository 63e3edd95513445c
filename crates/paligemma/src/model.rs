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
use std::sync::Arc;
use std::time::Instant;

/// Nodes a graph may have; PaliGemma 2 28B's decoder needs about 2,500.
const GRAPH_SIZE: usize = 16 * 1024;

/// Image patches one vision graph takes at most when [`Model::encode_images`] encodes
/// several frames together (four 224 px frames): it bounds the compute buffers. A
/// larger image runs in a graph of its own.
pub const VISION_BATCH_PATCHES: usize = 1024;

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

/// The lanes an engine runs when `lanes` are asked of a model on `device` with
/// `threads` CPU threads: lanes are for the CPU, at most one per thread.
pub fn usable_lanes(device: &str, threads: usize, lanes: usize) -> usize {
    if device == "cpu" { lanes.clamp(1, threads.max(1)) } else { 1 }
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
    /// On the CPU, store f16, bf16, q4_0, q8_0 and q4_k matrices in `ggml::packed`'s
    /// layout where the CPU has AVX-512 VNNI, and otherwise the matrices whose type the CPU's extra
    /// buffer types take (q4_0, q4_k, iq4_nl on x86 with AVX2) in their interleaved
    /// layouts, as llama.cpp does by default: faster prompt processing and batched
    /// decoding, at the cost of a copy of those weights in memory instead of using the
    /// mapped file in place. With the packed layout the graphs also use our own CPU
    /// attention (`ggml::Context::attention_cpu`); off, ggml's kernels do everything.
    pub repack: bool,
    /// Batches a `paligemma_stream::Engine` of this model runs at once on the CPU, each
    /// on a [`Model::fork`] with `max_sequences / lanes` of the sequences (rounded up),
    /// the lanes taking the `threads` turn by turn: all of them for a lane working
    /// alone, a share each for lanes working together. A small model's graphs leave
    /// threads waiting on each other, so with several cameras two lanes of one thread
    /// answer more than one batch on two threads. 1: one batch at a time on every
    /// thread; at most one lane per thread, CPU only.
    /// [`Model::load`] itself loads one.
    pub lanes: usize,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions { device: "cpu".into(), threads: 0, kv_type: KvType::F16, context: 0, max_sequences: 4, repack: true, lanes: 1 }
    }
}

impl ModelOptions {
    /// The CPU threads a model loaded with these options runs on: `threads`, or
    /// [`default_threads`] for 0.
    pub fn threads_or_default(&self) -> usize {
        if self.threads == 0 { default_threads() } else { self.threads }
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
    pub(crate) tokenizer: Arc<Tokenizer>,
    /// Shared with every [`Model::fork`].
    weights: Arc<Weights>,
    pub(crate) kv: KvCache,
    /// The answers in progress, by KV cache region (see [`crate::generate`]).
    pub(crate) sequences: Vec<Option<Sequence>>,
    sched: Scheduler,
    device: String,
    threads: usize,
    /// `general.file_type` of the file (for reports).
    file_type: String,
}

/// The weights on their backend and the typed handles the graphs read them by: loaded
/// once, read (never written) by every fork's graphs.
struct Weights {
    tensors: WeightStore,
    vision: VisionWeights,
    decoder: DecoderWeights,
    mask_decoder: Option<MaskDecoderWeights>,
}

impl Model {
    /// Loads a GGUF written by `paligemma convert`.
    pub fn load(path: impl AsRef<Path>, opts: &ModelOptions) -> Result<Model> {
        let path = path.as_ref().to_path_buf();
        let gguf = GgufFile::open(&path)?;
        // Everything the graphs rely on is checked before touching a backend.
        let (config, tokenizer) = crate::validate::model_file(&gguf)?;

        let threads = opts.threads_or_default();
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
        let weights = Arc::new(Weights { tensors: weights, vision, decoder, mask_decoder });
        Ok(Model { path, config, tokenizer: Arc::new(tokenizer), weights, kv, sequences, sched, device, threads, file_type })
    }

    /// Another executor of this model on the CPU: the same weights (not a copy), with a
    /// KV cache of its own (`max_sequences` regions of this one's size) and a pool of
    /// `threads`. Forks run graphs at the same time from different threads, for
    /// independent batches (see `paligemma_stream::Engine`).
    pub fn fork(&self, threads: usize, max_sequences: usize) -> Result<Model> {
        if self.device != "cpu" {
            return Err(Error::Invalid(format!("a model on {} cannot be forked (only on the CPU)", self.device)));
        }
        let backend = Backend::new(&self.device)?;
        let kv = KvCache::new(&backend, &self.config.text, self.kv.ty, self.kv.n_ctx, max_sequences)?;
        let threads = threads.max(1);
        Ok(Model {
            path: self.path.clone(),
            config: self.config.clone(),
            tokenizer: self.tokenizer.clone(),
            weights: self.weights.clone(),
            sequences: (0..kv.max_sequences).map(|_| None).collect(),
            kv,
            sched: Scheduler::new(backend, threads, GRAPH_SIZE)?,
            device: self.device.clone(),
            threads,
            file_type: self.file_type.clone(),
        })
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
        &self.weights.tensors.repacked
    }

    /// The device spec the model runs on (`cpu`, `cuda:0`...).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// CPU threads of the model's pool (what its graphs run on unless
    /// [`Model::use_threads`] says fewer).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs the next graphs on `threads` of the pool's threads (at least one, at most
    /// [`Model::threads`]): for an engine whose models share the cores, each taking as
    /// many as are free for its next step.
    pub fn use_threads(&mut self, threads: usize) {
        self.sched.use_threads(threads);
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
        self.weights.mask_decoder.is_some()
    }

    /// Decodes 16 `<segNNN>` codes (0..128) to the decoder's raw 64x64 output, row-major.
    pub fn decode_mask(&mut self, codes: &[u32]) -> Result<Vec<f32>> {
        let Some(w) = &self.weights.mask_decoder else {
            return Err(Error::Invalid(format!("{} has no segmentation decoder (convert with --seg-decoder vae-oid.npz)", self.path.display())));
        };
        let size = w.codebook_size;
        if codes.len() != crate::segment::CODES || codes.iter().any(|&c| c as usize >= size) {
            return Err(Error::Invalid(format!("a mask needs {} codes in 0..{size}, got {codes:?}", crate::segment::CODES)));
        }
        let ctx = Context::new(1024, 1024)?;
        let input = ctx.input("seg_codes", Type::I32, &[codes.len()])?;
        let out = crate::segment::build(&ctx, &self.weights.tensors.store, w, input)?;
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
        Ok(self.encode_images(&[image])?.remove(0))
    }

    /// Preprocesses several images and encodes them together: as many as fit in
    /// [`VISION_BATCH_PATCHES`] share one graph, so that frames of several cameras
    /// cost one pass over the weights (and one set of graph overheads) instead of one
    /// each.
    pub fn encode_images(&mut self, images: &[&RgbImage]) -> Result<Vec<ImageEmbedding>> {
        let mut pre = Vec::with_capacity(images.len());
        let pixels: Vec<PixelValues> = images
            .iter()
            .map(|image| {
                let start = Instant::now();
                let pixels = preprocess(image, &self.config.vision);
                pre.push(ms(start));
                pixels
            })
            .collect();
        let mut embeddings = self.encode_pixels_batch(&pixels.iter().collect::<Vec<_>>())?;
        for ((emb, image), pre) in embeddings.iter_mut().zip(images).zip(pre) {
            emb.timings.preprocess = pre;
            (emb.width, emb.height) = (image.width, image.height);
        }
        Ok(embeddings)
    }

    /// Encodes preprocessed pixel values.
    pub fn encode_pixels(&mut self, pixels: &PixelValues) -> Result<ImageEmbedding> {
        Ok(self.encode_pixels_batch(&[pixels])?.remove(0))
    }

    /// Encodes several images' pixel values, [`VISION_BATCH_PATCHES`] at most per graph.
    fn encode_pixels_batch(&mut self, pixels: &[&PixelValues]) -> Result<Vec<ImageEmbedding>> {
        let per_graph = (VISION_BATCH_PATCHES / self.config.vision.n_patches()).max(1);
        let mut embeddings = Vec::with_capacity(pixels.len());
        for group in pixels.chunks(per_graph) {
            let start = Instant::now();
            let stages = self.run_vision(group, false)?;
            let vision = ms(start);
            embeddings.extend(stages.into_iter().zip(group).map(|(s, p)| ImageEmbedding {
                features: s.projector,
                width: p.size,
                height: p.size,
                timings: Timings { vision, ..Default::default() },
            }));
        }
        Ok(embeddings)
    }

    /// Vision tower and projector outputs, for parity checks.
    pub fn vision_stages(&mut self, pixels: &PixelValues) -> Result<VisionStages> {
        Ok(self.run_vision(&[pixels], true)?.remove(0))
    }

    /// Runs the vision graph on images of the model's size, all in one graph.
    fn run_vision(&mut self, pixels: &[&PixelValues], keep_vision: bool) -> Result<Vec<VisionStages>> {
        let v = &self.config.vision;
        if let Some(bad) = pixels.iter().find(|p| p.size != v.image_size) {
            return Err(Error::Image(format!("pixel values are {0}x{0}, the model takes {1}x{1}", bad.size, v.image_size)));
        }
        let ctx = Context::new(GRAPH_SIZE, GRAPH_SIZE)?;
        let input = ctx.input("pixels", Type::F32, &[v.image_size, v.image_size, 3, pixels.len()])?;
        let (vision, projector) = crate::vision::build(&ctx, &self.weights.tensors.store, &self.weights.vision, v, input)?;
        vision.set_output();
        projector.set_output();
        let mut graph = ctx.graph(GRAPH_SIZE)?;
        graph.expand(vision)?;
        graph.expand(projector)?;
        self.sched.alloc(&graph)?;
        input.write_f32(&pixels.iter().flat_map(|p| p.data.iter().copied()).collect::<Vec<_>>())?;
        self.sched.compute(&graph)?;
        let n = pixels.len();
        let vision = if keep_vision { vision.read_f32()? } else { Vec::new() };
        let projector = projector.read_f32()?;
        let (vision_size, projector_size) = (vision.len() / n, projector.len() / n);
        Ok((0..n)
            .map(|i| VisionStages {
                vision: vision.get(i * vision_size..(i + 1) * vision_size).unwrap_or_default().to_vec(),
                projector: projector[i * projector_size..(i + 1) * projector_size].to_vec(),
            })
            .collect())
    }

    /// Runs the decoder over a batch and returns the logits of its `batch.outputs`
    /// rows, [outputs, vocab] row-major, before the final softcap.
    pub(crate) fn forward(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        let t = &self.config.text;
        let n = batch.ids.len();
        if n == 0 || batch.outputs.is_empty() || batch.outputs.iter().any(|&r| r >= n) {
            return Err(Error::Invalid(format!("a batch of {n} tokens with logits wanted at rows {:?}", batch.outputs)));
        }
        if let Some(&bad) = batch.ids.iter().find(|&&id| id as usize >= t.vocab_size) {
            return Err(Error::Prompt(format!("token id {bad} is outside the vocabulary of {}", t.vocab_size)));
        }
        let runs = batch.runs(t.sliding_window);
        let embeddings = self.embedding_rows(batch, &runs)?;

        let ctx = Context::new(GRAPH_SIZE, GRAPH_SIZE)?;
        let store = &self.weights.tensors.store;
        // The image features of every prefix in one input, the text tokens' embeddings
        // in another; a gather puts the rows in batch order when they interleave.
        let mut parts = Vec::new();
        let image_in = if embeddings.image_features.is_empty() {
            None
        } else {
            let img = ctx.input("image_features", Type::F32, &[t.width, embeddings.image_features.len() / t.width])?;
            parts.push(img);
            Some(img)
        };
        let ids_in = if embeddings.text_ids.is_empty() {
            None
        } else {
            let tid = ctx.input("token_ids", Type::I32, &[embeddings.text_ids.len()])?;
            let emb = ctx.get_rows(store.get(self.weights.decoder.token_embd), tid)?;
            parts.push(ctx.scale(emb, t.embed_scale)?);
            Some(tid)
        };
        let mut x = parts[0];
        for p in &parts[1..] {
            x = ctx.concat(x, *p, 1)?;
        }
        let order_in = if embeddings.order.iter().enumerate().all(|(i, &o)| i as i32 == o) {
            None
        } else {
            let order = ctx.input("row_order", Type::I32, &[n])?;
            x = ctx.get_rows(x, order)?;
            Some(order)
        };
        let outputs_in = if batch.outputs.len() == n && batch.outputs.iter().enumerate().all(|(i, &r)| i == r) {
            None
        } else {
            Some(ctx.input("output_rows", Type::I32, &[batch.outputs.len()])?)
        };
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
        let inputs = DecoderInputs { x, pos, slots, runs: attention, outputs: outputs_in };
        let logits = crate::decoder::build(&ctx, store, &self.weights.decoder, t, &mut graph, &self.kv, inputs)?;
        logits.set_output();
        graph.expand(logits)?;
        self.sched.alloc(&graph)?;

        if let Some(img) = image_in {
            img.write_f32(&embeddings.image_features)?;
        }
        if let Some(tid) = ids_in {
            tid.write_i32(&embeddings.text_ids)?;
        }
        if let Some(order) = order_in {
            order.write_i32(&embeddings.order)?;
        }
        if let Some(outputs) = outputs_in {
            outputs.write_i32(&batch.outputs.iter().map(|&r| r as i32).collect::<Vec<_>>())?;
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

/// Where each row of a batch takes its embedding from (see [`Model::forward`]).
struct EmbeddingRows {
    /// The features of every prefix's image tokens, one after another.
    image_features: Vec<f32>,
    /// The ids of the other tokens, in batch order.
    text_ids: Vec<i32>,
    /// Per batch row, its row among the image features followed by the text embeddings.
    order: Vec<i32>,
}

impl Model {
    /// Sorts the rows of a batch into image features (the image tokens that start each
    /// prefix, which must be exactly the model's count with an encoding of as many
    /// features) and text tokens (every other id: a generated image token is embedded
    /// as text).
    fn embedding_rows(&self, batch: &Batch<'_>, runs: &[Run<Vec<f32>>]) -> Result<EmbeddingRows> {
        let t = &self.config.text;
        let (image_id, expected) = (self.config.tokens.image_token_id, self.config.tokens.image_token_count);
        let mut image_rows = vec![false; batch.ids.len()];
        let mut image_features = Vec::new();
        for run in runs {
            let leading = batch.ids[run.first..run.first + run.len].iter().take_while(|&&id| id == image_id).count();
            let image = batch.images.iter().find(|(row, _)| *row == run.first).map(|(_, e)| *e);
            if leading == 0 || !batch.prefix {
                continue;
            }
            let Some(image) = image.filter(|e| leading == expected && e.features.len() == expected * t.width) else {
                return Err(Error::Prompt(format!("the prefix needs {expected} image tokens at the start and an image encoding of as many features")));
            };
            image_rows[run.first..run.first + leading].iter_mut().for_each(|r| *r = true);
            image_features.extend_from_slice(&image.features);
        }
        let n_image = image_features.len() / t.width;
        let (mut next_image, mut next_text) = (0, n_image as i32);
        let mut text_ids = Vec::new();
        let order = batch
            .ids
            .iter()
            .zip(&image_rows)
            .map(|(&id, &image)| {
                if image {
                    next_image += 1;
                    next_image - 1
                } else {
                    text_ids.push(id as i32);
                    next_text += 1;
                    next_text - 1
                }
            })
            .collect();
        Ok(EmbeddingRows { image_features, text_ids, order })
    }
}

/// Milliseconds since `start`.
pub(crate) fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}
