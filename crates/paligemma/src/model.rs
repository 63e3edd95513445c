//! The PaliGemma forward pass on ggml: SigLIP vision tower + projector as one graph,
//! the Gemma / Gemma 2 decoder with the prefix-LM mask and a KV cache, and
//! generation. Read top to bottom like a llama.cpp graph builder.
use crate::config::{Config, TextArch};
use crate::preprocess::{PixelValues, RgbImage, preprocess};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use ggml::gguf::GgufFile;
use ggml::{Backend, Buffer, Context, Graph, Scheduler, Tensor, Type};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Nodes a graph may have; PaliGemma 2 28B's decoder needs about 2,500.
const GRAPH_SIZE: usize = 16 * 1024;

/// Most prompts one batch may decode together (each has a KV cache region).
pub const MAX_SEQUENCES: usize = 256;

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F16,
    F32,
    Q8_0,
}

impl KvType {
    fn ggml(self) -> Type {
        match self {
            KvType::F16 => Type::F16,
            KvType::F32 => Type::F32,
            KvType::Q8_0 => Type::Q8_0,
        }
    }
}

impl std::str::FromStr for KvType {
    type Err = Error;
    fn from_str(s: &str) -> Result<KvType> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(KvType::F16),
            "f32" => Ok(KvType::F32),
            "q8_0" => Ok(KvType::Q8_0),
            _ => Err(Error::Invalid(format!("unknown KV cache type {s:?} (expected f16, f32 or q8_0)"))),
        }
    }
}

/// How to load a model.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// `cpu`, `cuda:N`, `vulkan:N` or `gpu`.
    pub device: String,
    /// CPU threads (0: all available cores).
    pub threads: usize,
    pub kv_type: KvType,
    /// Tokens the KV cache holds per sequence (0: image tokens + 512, at most the model's context).
    pub context: usize,
    /// Prompts that [`Model::generate_batch`] can answer at once (each gets its own
    /// KV cache region of `context` tokens).
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
    pub preprocess: f64,
    pub vision: f64,
    pub prefill: f64,
    pub decode: f64,
    pub prefix_tokens: usize,
    pub generated_tokens: usize,
}

/// An image run through the vision tower and projector, ready for any number of prompts.
#[derive(Clone, Debug)]
pub struct ImageEmbedding {
    /// [n_image_tokens, text width], row-major.
    pub features: Vec<f32>,
    /// Size of the original frame: detections are reported in its pixels.
    pub width: usize,
    pub height: usize,
    pub timings: Timings,
}

/// Outputs of the vision stages, for parity checks.
pub struct VisionStages {
    /// Vision tower output after the post layer norm: [n_patches, vision width].
    pub vision: Vec<f32>,
    /// Projector output: [n_patches, text width].
    pub projector: Vec<f32>,
}

/// Sampling settings. Greedy unless a temperature above 0 is set.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    /// Keep generating past `<eos>` (benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_tokens: 64, temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, ignore_eos: false }
    }
}

/// The result of [`Model::generate`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub text: String,
    /// Generated ids, eos excluded.
    pub tokens: Vec<u32>,
    /// The probability the model gave each generated id (softmax of its final logits at
    /// temperature 1, whatever the sampling settings): the basis of confidences.
    pub token_probs: Vec<f32>,
    pub prompt_tokens: usize,
    /// Whether generation ended at eos (rather than the token limit).
    pub stopped_at_eos: bool,
    /// Logits of the first generated position (after the final softcap).
    #[serde(skip)]
    pub first_logits: Vec<f32>,
    pub timings: Timings,
}

/// A loaded model: weights on a backend, tokenizer, scheduler and KV cache.
pub struct Model {
    path: PathBuf,
    config: Config,
    tokenizer: Tokenizer,
    weights: WeightStore,
    kv: Context,
    kv_buffer: Buffer,
    n_ctx: usize,
    max_sequences: usize,
    kv_type: KvType,
    sched: Scheduler,
    device: String,
    threads: usize,
    /// Tensor data types of the file (for reports).
    pub weight_type: String,
    has_seg_decoder: bool,
}

/// Name of the repacked copy of the token embedding used as the LM head.
const LM_HEAD: &str = "lm_head.repacked";

/// The weights of a model: tensor metadata in contexts, data in buffers.
struct WeightStore {
    /// Tensors used in place from the mapped file (or copied to the device), then the
    /// repacked ones.
    contexts: Vec<Context>,
    /// Position of each weight in the concatenated tensor lists of `contexts`.
    index: HashMap<String, usize>,
    _buffers: Vec<Buffer>,
    /// Names of the extra buffer types used, with how many tensors each holds.
    repacked: Vec<(String, usize)>,
}

impl WeightStore {
    fn load(gguf: &GgufFile, backend: &Backend, repack: bool) -> Result<WeightStore> {
        let path = gguf.path();
        // Matrices the CPU may repack: every 2-D weight read only by matrix products (the
        // token embedding is also gathered by row, the mask decoder's tensors by their own ops).
        let extra = if repack && backend.is_cpu() { backend.device().extra_buffer_types() } else { Vec::new() };
        let repack_group = |info: &ggml::gguf::TensorInfo| extra.iter().position(|b| b.supports_weight(backend.device(), info.ty, &info.shape)).map(|g| g + 1);
        let mut groups: Vec<Vec<(String, &ggml::gguf::TensorInfo)>> = vec![Vec::new(); 1 + extra.len()];
        for info in &gguf.tensors {
            let matrix = info.shape.len() == 2 && info.name != "token_embd.weight" && !info.name.starts_with("seg.");
            let g = if matrix { repack_group(info) } else { None };
            groups[g.unwrap_or(0)].push((info.name.clone(), info));
            // The tied LM head reads the whole embedding: like llama.cpp, it gets a repacked
            // copy of its own while the row lookups keep using the file.
            if info.name == "token_embd.weight"
                && let Some(g) = repack_group(info)
            {
                groups[g].push((LM_HEAD.to_string(), info));
            }
        }
        let mut store = WeightStore { contexts: Vec::new(), index: HashMap::new(), _buffers: Vec::new(), repacked: Vec::new() };
        for (g, infos) in groups.iter().enumerate() {
            if infos.is_empty() && g > 0 {
                continue;
            }
            let ctx = Context::new(infos.len() + 1, 0)?;
            for (name, info) in infos {
                ctx.new_named(name, info.ty, &info.shape)?;
                store.index.insert(name.clone(), store.index.len());
            }
            let buffer = if g == 0 && backend.is_cpu() {
                let buffer = Buffer::from_host(gguf.mmap())?;
                for (t, (_, info)) in ctx.tensors().zip(infos) {
                    buffer.place(t, gguf.data_offset + info.offset)?;
                }
                buffer
            } else {
                let buft = if g == 0 { backend.buffer_type() } else { extra[g - 1] };
                let buffer = buft.alloc_tensors(&ctx)?;
                // Read with plain file reads: touching the mapping would leave those pages
                // counted in the process's memory beside the copy.
                let mut file = std::fs::File::open(path).map_err(crate::error::io(path))?;
                let mut data = Vec::new();
                for (t, (_, info)) in ctx.tensors().zip(infos) {
                    data.resize(t.nbytes(), 0);
                    read_at(&mut file, (gguf.data_offset + info.offset) as u64, &mut data).map_err(crate::error::io(path))?;
                    t.write_bytes(&data)?;
                }
                if g > 0 {
                    store.repacked.push((buft.name(), infos.len()));
                }
                buffer
            };
            buffer.set_weights_usage();
            store._buffers.push(buffer);
            store.contexts.push(ctx);
        }
        Ok(store)
    }

    fn all(&self) -> Vec<Tensor<'_>> {
        self.contexts.iter().flat_map(|c| c.tensors()).collect()
    }
}

fn read_at(file: &mut std::fs::File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// Looks weights up by name during graph building.
struct Weights<'a> {
    all: Vec<Tensor<'a>>,
    index: &'a HashMap<String, usize>,
}

impl<'a> Weights<'a> {
    fn get(&self, name: &str) -> Tensor<'a> {
        // Every name used by the graphs was checked to exist at load time.
        self.all[self.index[name]]
    }

    /// The LM head: the token embedding (tied), or its repacked copy.
    fn lm_head(&self) -> Tensor<'a> {
        self.get(if self.index.contains_key(LM_HEAD) { LM_HEAD } else { "token_embd.weight" })
    }
}

impl Model {
    /// Loads a GGUF written by `paligemma convert`.
    pub fn load(path: impl AsRef<Path>, opts: &ModelOptions) -> Result<Model> {
        let path = path.as_ref().to_path_buf();
        let gguf = GgufFile::open(&path)?;
        // Everything the graphs rely on is checked before touching a backend.
        let (config, tokenizer) = crate::validate::model_file(&gguf)?;

        let threads = if opts.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { opts.threads };
        let backend = Backend::new(&opts.device)?;
        let device = backend.device().spec();

        // Weights: data used in place from the mapped file on the CPU (or repacked),
        // copied to the device otherwise.
        let weights = WeightStore::load(&gguf, &backend, opts.repack)?;

        let t = &config.text;
        let n_ctx = match opts.context {
            0 => (config.tokens.image_token_count + 512).min(t.context_length),
            n => n,
        };
        if opts.kv_type == KvType::Q8_0 && t.head_dim % Type::Q8_0.block_size() != 0 {
            return Err(Error::Invalid(format!("a q8_0 KV cache needs head_dim divisible by 32, this model has {}", t.head_dim)));
        }
        if n_ctx > t.context_length {
            return Err(Error::Invalid(format!("a context of {n_ctx} tokens: this model takes 1 to {}", t.context_length)));
        }
        if opts.max_sequences > MAX_SEQUENCES {
            return Err(Error::Invalid(format!("{} sequences: at most {MAX_SEQUENCES} are supported", opts.max_sequences)));
        }
        let max_sequences = opts.max_sequences.max(1);
        let kv = Context::new(2 * t.depth, 0)?;
        for i in 0..t.depth {
            kv.new_named(&format!("cache_k.{i}"), opts.kv_type.ggml(), &[t.head_dim * t.kv_heads, n_ctx * max_sequences])?;
            kv.new_named(&format!("cache_v.{i}"), opts.kv_type.ggml(), &[t.head_dim * t.kv_heads, n_ctx * max_sequences])?;
        }
        let kv_buffer = backend.alloc_tensors(&kv)?;
        let sched = Scheduler::new(backend, threads, GRAPH_SIZE)?;
        let has_seg_decoder = crate::segment::tensor_names().iter().all(|n| gguf.tensor(n).is_some());
        let weight_type = gguf.get("general.file_type").and_then(|v| v.as_str()).unwrap_or("?").to_string();
        Ok(Model {
            path,
            config,
            tokenizer,
            weights,
            kv,
            kv_buffer,
            n_ctx,
            max_sequences,
            kv_type: opts.kv_type,
            sched,
            device,
            threads,
            weight_type,
            has_seg_decoder,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The extra buffer types holding repacked weights, with how many tensors each holds
    /// (empty when nothing was repacked).
    pub fn repacked(&self) -> &[(String, usize)] {
        &self.weights.repacked
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device spec the model runs on (`cpu`, `cuda:0`...).
    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Tokens the KV cache holds.
    pub fn context_size(&self) -> usize {
        self.n_ctx
    }

    /// Prompts [`Model::generate_batch`] answers at once.
    pub fn max_sequences(&self) -> usize {
        self.max_sequences
    }

    /// Bytes of the KV cache (every sequence region).
    pub fn kv_cache_bytes(&self) -> usize {
        self.kv_buffer.size()
    }

    /// Bytes of compute buffers the scheduler holds (the largest graph run so far).
    pub fn compute_buffer_bytes(&self) -> usize {
        self.sched.buffer_sizes().iter().map(|(_, n)| n).sum()
    }

    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Whether the file carries the VQ-VAE mask decoder.
    pub fn has_segmentation(&self) -> bool {
        self.has_seg_decoder
    }

    /// Decodes 16 `<segNNN>` codes (0..128) to the decoder's raw 64x64 output, row-major.
    pub fn decode_mask(&mut self, codes: &[u32]) -> Result<Vec<f32>> {
        if !self.has_seg_decoder {
            return Err(Error::Invalid(format!("{} has no segmentation decoder (convert with --seg-decoder vae-oid.npz)", self.path.display())));
        }
        let size = self.weights().get("seg.codebook").ne()[1];
        if codes.len() != crate::segment::CODES || codes.iter().any(|&c| c as usize >= size) {
            return Err(Error::Invalid(format!("a mask needs {} codes in 0..{size}, got {codes:?}", crate::segment::CODES)));
        }
        let ctx = Context::new(1024, 1024)?;
        let w = self.weights();
        let input = ctx.input("seg_codes", Type::I32, &[codes.len()])?;
        let out = crate::segment::build(&ctx, &|name| w.get(name), input)?;
        out.set_output();
        let mut graph = ctx.graph(1024)?;
        graph.expand(out)?;
        self.sched.alloc(&graph)?;
        input.write_i32(&codes.iter().map(|&c| c as i32).collect::<Vec<_>>())?;
        self.sched.compute(&graph)?;
        Ok(out.read_f32()?)
    }

    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
        self.sched.set_n_threads(self.threads);
    }

    fn weights(&self) -> Weights<'_> {
        Weights { all: self.weights.all(), index: &self.weights.index }
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
        let w = self.weights();
        let input = ctx.input("pixels", Type::F32, &[v.image_size, v.image_size, 3, 1])?;
        let (vision, projector) = build_vision(&ctx, &w, &self.config, input)?;
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
    /// `batch.n_logits` tokens, [n_logits, vocab] row-major.
    fn forward(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
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
        let w = self.weights();
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
            let emb = ctx.get_rows(w.get("token_embd.weight"), tid)?;
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
        let kv: Vec<Tensor<'_>> = self.kv.tensors().collect();
        let mut graph = ctx.graph(GRAPH_SIZE)?;
        let inputs = DecoderInputs { x, pos, slots, runs: attention, n_logits: batch.n_logits };
        let logits = build_decoder(&ctx, &w, &self.config, &mut graph, &kv, inputs)?;
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

    /// Checks that a prefix and its answer fit one sequence's cache region.
    fn check_fits(&self, prefix: usize, max_tokens: usize) -> Result<()> {
        if prefix.checked_add(max_tokens).is_none_or(|n| n > self.n_ctx) {
            return Err(Error::Prompt(format!(
                "prefix of {prefix} tokens plus {max_tokens} new tokens exceeds the context of {} tokens (image tokens included); load the model with a larger context",
                self.n_ctx
            )));
        }
        Ok(())
    }

    /// Logits at every prefix position, [n_prefix, vocab], for parity checks.
    pub fn prefix_logits(&mut self, image: &ImageEmbedding, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_fits(ids.len(), 0)?;
        let mut logits = self.forward(&Batch::prefix(image, ids, 0, ids.len()))?;
        self.final_softcap(&mut logits);
        Ok(logits)
    }

    /// Gemma 2's final logit softcap, `cap * tanh(logits / cap)`. The decoder graph leaves
    /// it out: it is monotonic, so greedy decoding takes the argmax of the raw logits,
    /// and only sampling with a temperature and the reported first logits need it (a
    /// vocabulary of tanh per token would cost more than the attention of a decode step).
    fn final_softcap(&self, logits: &mut [f32]) {
        if let Some(cap) = self.config.text.final_softcap {
            logits.iter_mut().for_each(|l| *l = softcap(*l, cap));
        }
    }

    /// Answers `prompt` about an encoded image. `on_token` sees each generated id and
    /// the text it adds; returning false stops generation.
    pub fn generate(
        &mut self,
        image: &ImageEmbedding,
        prompt: &str,
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32, &str) -> bool,
    ) -> Result<Generation> {
        let ids = self.tokenizer.prefix_ids(prompt)?;
        self.generate_ids(image, &ids, opts, &mut on_token)
    }

    /// [`Model::generate`] from prefix ids (image tokens included).
    pub fn generate_ids(
        &mut self,
        image: &ImageEmbedding,
        ids: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32, &str) -> bool,
    ) -> Result<Generation> {
        let mut out = self.generate_batch(image, &[ids.to_vec()], opts, &mut |_, id, piece| on_token(id, piece))?;
        Ok(out.remove(0))
    }

    /// Answers several prompts on one encoded image: each prefix is prefilled on
    /// its own, then the decode steps of all unfinished answers run as one batch.
    /// `on_token` sees (prompt index, id, text piece); returning false stops that answer.
    pub fn generate_batch(
        &mut self,
        image: &ImageEmbedding,
        prefixes: &[Vec<u32>],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(usize, u32, &str) -> bool,
    ) -> Result<Vec<Generation>> {
        if prefixes.is_empty() || prefixes.len() > self.max_sequences {
            return Err(Error::Invalid(format!("{} prompts in one batch; this model was loaded for 1 to {}", prefixes.len(), self.max_sequences)));
        }
        if !(0.0..=f32::MAX).contains(&opts.temperature) || !(f32::MIN_POSITIVE..=1.0).contains(&opts.top_p) {
            return Err(Error::Invalid(format!(
                "sampling with temperature {} and top-p {}: expected a finite temperature >= 0 and top-p in (0, 1]",
                opts.temperature, opts.top_p
            )));
        }
        for ids in prefixes {
            self.check_fits(ids.len(), opts.max_tokens)?;
        }
        struct Seq {
            base: usize,
            prefix: usize,
            tokens: Vec<u32>,
            token_probs: Vec<f32>,
            text: String,
            logits: Vec<f32>,
            first_logits: Vec<f32>,
            done: bool,
            eos: bool,
            sampler: Sampler,
            timings: Timings,
        }
        let mut seqs = Vec::new();
        for (s, ids) in prefixes.iter().enumerate() {
            let start = Instant::now();
            let base = s * self.n_ctx;
            let logits = self.forward(&Batch::prefix(image, ids, base, 1))?;
            let mut first_logits = logits.clone();
            self.final_softcap(&mut first_logits);
            let mut timings = image.timings.clone();
            timings.prefix_tokens = ids.len();
            timings.prefill = ms(start);
            seqs.push(Seq {
                base,
                prefix: ids.len(),
                tokens: Vec::new(),
                token_probs: Vec::new(),
                text: String::new(),
                first_logits,
                logits,
                done: opts.max_tokens == 0,
                eos: false,
                sampler: Sampler::new(opts, self.config.text.final_softcap, self.answer_tokens()),
                timings,
            });
        }
        let eos = self.config.tokens.eos;
        let start = Instant::now();
        loop {
            // Sample the next token of every unfinished answer.
            for (s, seq) in seqs.iter_mut().enumerate().filter(|(_, q)| !q.done) {
                let next = seq.sampler.sample(&mut seq.logits);
                if next == eos && !opts.ignore_eos {
                    seq.eos = true;
                    seq.done = true;
                    continue;
                }
                seq.tokens.push(next);
                seq.token_probs.push(probability(&seq.logits, next, self.config.text.final_softcap));
                let full = self.tokenizer.decode(&seq.tokens)?;
                let piece = full.get(seq.text.len()..).unwrap_or("").to_string();
                seq.text = full;
                if !on_token(s, next, &piece) || seq.tokens.len() >= opts.max_tokens {
                    seq.done = true;
                }
            }
            let active: Vec<usize> = (0..seqs.len()).filter(|&s| !seqs[s].done).collect();
            if active.is_empty() {
                break;
            }
            // One decode step for all of them.
            let batch = Batch {
                image: None,
                ids: active.iter().map(|&s| *seqs[s].tokens.last().expect("sampled")).collect(),
                positions: active.iter().map(|&s| (seqs[s].prefix + seqs[s].tokens.len()) as i32).collect(),
                slots: active.iter().map(|&s| seqs[s].base + seqs[s].prefix + seqs[s].tokens.len() - 1).collect(),
                seq_base: active.iter().map(|&s| seqs[s].base).collect(),
                prefix: false,
                n_logits: active.len(),
            };
            let logits = self.forward(&batch)?;
            let vocab = logits.len() / active.len();
            for (i, &s) in active.iter().enumerate() {
                seqs[s].logits = logits[i * vocab..(i + 1) * vocab].to_vec();
            }
        }
        let decode_ms = ms(start);
        Ok(seqs
            .into_iter()
            .map(|mut q| {
                q.timings.decode = decode_ms;
                q.timings.generated_tokens = q.tokens.len();
                Generation {
                    text: q.text,
                    tokens: q.tokens,
                    token_probs: q.token_probs,
                    prompt_tokens: q.prefix,
                    stopped_at_eos: q.eos,
                    first_logits: q.first_logits,
                    timings: q.timings,
                }
            })
            .collect())
    }
}

impl Model {
    /// The ids an answer may not contain: those only a prefix holds.
    fn answer_tokens(&self) -> AnswerTokens {
        let k = &self.config.tokens;
        AnswerTokens { excluded: [k.image_token_id, k.pad, k.bos] }
    }
}

/// The ids a sampler never picks: `<image>`, `<pad>` and `<bos>` (an `<image>` in an
/// answer would make the next decode step fail and lose the answer; the others mean
/// nothing there). Ids past the tokenizer's vocabulary (the embedding's padding rows)
/// stay allowed, as in the reference: the text decoder skips them.
#[derive(Clone, Debug)]
struct AnswerTokens {
    excluded: [u32; 3],
}

impl AnswerTokens {
    /// Sets the logits of every id that cannot be part of an answer to -inf.
    fn mask(&self, logits: &mut [f32]) {
        for &id in &self.excluded {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Tokens to run through the decoder in one graph.
struct Batch<'a> {
    /// Features for the image tokens at the start of a prefix.
    image: Option<&'a ImageEmbedding>,
    ids: Vec<u32>,
    /// RoPE positions, numbered from 1 as in the reference.
    positions: Vec<i32>,
    /// KV cache slot of each token.
    slots: Vec<usize>,
    /// First slot of each token's sequence.
    seq_base: Vec<usize>,
    /// A whole prefix of one sequence: its tokens see each other both ways.
    prefix: bool,
    n_logits: usize,
}

impl<'a> Batch<'a> {
    fn prefix(image: &'a ImageEmbedding, ids: &[u32], base: usize, n_logits: usize) -> Batch<'a> {
        Batch {
            image: Some(image),
            ids: ids.to_vec(),
            positions: (1..=ids.len() as i32).collect(),
            slots: (base..base + ids.len()).collect(),
            seq_base: vec![base; ids.len()],
            prefix: true,
            n_logits,
        }
    }

    /// Splits the batch into runs of consecutive tokens of one sequence. Each run attends
    /// only to its own sequence's cache region (not to the slots of the others), with masks
    /// [len][kv] only where some key in that region is hidden from some query of the run:
    /// the full mask lets the prefix see itself both ways and generated tokens see keys up
    /// to their own; the sliding mask further keeps a generated token at position q to keys
    /// q - W < k <= q (the window never cuts the prefix).
    fn runs(&self, window: Option<usize>) -> Vec<Run<Vec<f32>>> {
        let mut runs: Vec<Run<Vec<f32>>> = Vec::new();
        for i in 0..self.ids.len() {
            match runs.last_mut() {
                Some(run) if run.base == self.seq_base[i] => run.len += 1,
                _ => runs.push(Run { base: self.seq_base[i], first: i, len: 1, kv: 0, full: None, sliding: None }),
            }
        }
        for run in &mut runs {
            let queries = run.first..run.first + run.len;
            run.kv = queries.clone().map(|i| self.slots[i] - run.base + 1).max().unwrap_or(0);
            // A prefix sees itself both ways; a generated token sees the slots up to its own.
            let visible_end = |i: usize| if self.prefix { run.len } else { self.slots[i] - run.base + 1 };
            let mut full = vec![0f32; run.kv * run.len];
            let mut sliding = vec![0f32; run.kv * run.len];
            let (mut full_needed, mut sliding_needed) = (false, false);
            for (q, i) in queries.enumerate() {
                for j in 0..run.kv {
                    if j >= visible_end(i) {
                        full[q * run.kv + j] = f32::NEG_INFINITY;
                        sliding[q * run.kv + j] = f32::NEG_INFINITY;
                        full_needed = true;
                    } else if let (false, Some(w)) = (self.prefix, window)
                        && (j + 1 + w) as i64 <= self.positions[i] as i64
                    {
                        sliding[q * run.kv + j] = f32::NEG_INFINITY;
                        sliding_needed = true;
                    }
                }
            }
            run.full = full_needed.then_some(full);
            run.sliding = (sliding_needed || full_needed).then_some(sliding);
        }
        runs
    }
}

/// Consecutive tokens of one sequence in a batch: they attend to the cache slots
/// `base..base + kv`, through masks [len, kv] where needed. The masks are values
/// (`Vec<f32>`) when the batch is planned, f16 tensors in the graph.
struct Run<M> {
    base: usize,
    /// Position of the run's first token in the batch.
    first: usize,
    len: usize,
    kv: usize,
    full: Option<M>,
    sliding: Option<M>,
}

/// Graph inputs of the decoder.
struct DecoderInputs<'a> {
    /// Embeddings [width, n].
    x: Tensor<'a>,
    /// RoPE positions (I32 [n]).
    pos: Tensor<'a>,
    /// Cache slot of each token (I32 [n]).
    slots: Tensor<'a>,
    /// The sequences of the batch, each attending to its own cache region.
    runs: Vec<Run<Tensor<'a>>>,
    n_logits: usize,
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// `layer_norm(x) * w + b` over the innermost dimension.
fn layer_norm<'c>(ctx: &'c Context, x: Tensor<'_>, w: Tensor<'_>, b: Tensor<'_>, eps: f32) -> Result<Tensor<'c>> {
    Ok(ctx.add(ctx.mul(ctx.norm(x, eps)?, w)?, b)?)
}

/// `rms_norm(x) * w` (Gemma's 1 + w is stored in the file).
fn rms_norm<'c>(ctx: &'c Context, x: Tensor<'_>, w: Tensor<'_>, eps: f32) -> Result<Tensor<'c>> {
    Ok(ctx.mul(ctx.rms_norm(x, eps)?, w)?)
}

/// `w x + b`. A weight whose rows were padded with zero columns (see the converter)
/// gets its input padded with zeros to match.
fn linear<'c>(ctx: &'c Context, x: Tensor<'_>, w: Tensor<'_>, b: Option<Tensor<'_>>) -> Result<Tensor<'c>> {
    let (k, have) = (w.ne()[0], x.ne()[0]);
    let y = if k > have { ctx.mul_mat(w, ctx.pad(x, [k - have, 0, 0, 0])?)? } else { ctx.mul_mat(w, x)? };
    Ok(match b {
        Some(b) => ctx.add(y, b)?,
        None => y,
    })
}

/// SigLIP + projector. Returns (vision output [width, n_patches], projector output
/// [text width, n_patches]).
fn build_vision<'c>(ctx: &'c Context, w: &Weights<'_>, cfg: &Config, pixels: Tensor<'_>) -> Result<(Tensor<'c>, Tensor<'c>)> {
    let v = &cfg.vision;
    let (d, n, heads) = (v.width, v.n_patches(), v.heads);
    let hd = d / heads;
    // Patch embedding: a conv with kernel = stride = patch; patches in row-major order.
    let patches = ctx.conv_2d(w.get("v.patch_embd.weight"), pixels, v.patch_size, 0)?; // [px, py, d, 1]
    let patches = ctx.reshape(patches, &[n, d])?;
    let mut x = ctx.cont(ctx.transpose(patches)?)?; // [d, n]
    x = ctx.add(x, w.get("v.patch_embd.bias"))?;
    x = ctx.add(x, w.get("v.position_embd.weight"))?;
    let scale = (hd as f32).powf(-0.5);
    for i in 0..v.depth {
        let p = |s: &str| w.get(&format!("v.blk.{i}.{s}"));
        let h = layer_norm(ctx, x, p("ln1.weight"), p("ln1.bias"), v.ln_eps)?;
        let heads_of = |t: Tensor<'_>| -> Result<Tensor<'c>> {
            // [d, n] -> [hd, n, heads]
            Ok(ctx.permute(ctx.reshape(t, &[hd, heads, n])?, [0, 2, 1, 3])?)
        };
        let q = heads_of(linear(ctx, h, p("attn_q.weight"), Some(p("attn_q.bias")))?)?;
        let k = heads_of(linear(ctx, h, p("attn_k.weight"), Some(p("attn_k.bias")))?)?;
        let val = heads_of(linear(ctx, h, p("attn_v.weight"), Some(p("attn_v.bias")))?)?;
        let attn = ctx.flash_attn_ext(q, k, val, None, scale, 0.0)?; // [hd, heads, n]
        let attn = ctx.reshape(attn, &[d, n])?;
        x = ctx.add(x, linear(ctx, attn, p("attn_out.weight"), Some(p("attn_out.bias")))?)?;
        let h = layer_norm(ctx, x, p("ln2.weight"), p("ln2.bias"), v.ln_eps)?;
        let h = ctx.gelu_precise(linear(ctx, h, p("ffn_up.weight"), Some(p("ffn_up.bias")))?)?;
        x = ctx.add(x, linear(ctx, h, p("ffn_down.weight"), Some(p("ffn_down.bias")))?)?;
    }
    let vision = layer_norm(ctx, x, w.get("v.post_ln.weight"), w.get("v.post_ln.bias"), v.ln_eps)?;
    let projected = linear(ctx, vision, w.get("mm.weight"), Some(w.get("mm.bias")))?;
    Ok((vision, projected))
}

/// The Gemma / Gemma 2 decoder: writes each token's K/V into its cache slot, attends
/// over cache slots 0..span with the masks, and returns the logits of the last
/// `n_logits` tokens [vocab, n_logits].
fn build_decoder<'c>(
    ctx: &'c Context,
    w: &Weights<'_>,
    cfg: &Config,
    graph: &mut Graph<'_>,
    cache: &[Tensor<'_>],
    inputs: DecoderInputs<'c>,
) -> Result<Tensor<'c>> {
    let t = &cfg.text;
    let DecoderInputs { mut x, pos, slots, runs, n_logits } = inputs;
    let n = x.ne()[1];
    let (hd, heads, kv_heads) = (t.head_dim, t.heads, t.kv_heads);
    let scale = t.query_pre_attn_scalar.powf(-0.5);
    let softcap = t.attn_softcap.unwrap_or(0.0);
    for i in 0..t.depth {
        let p = |s: &str| w.get(&format!("blk.{i}.{s}.weight"));
        let h = rms_norm(ctx, x, p("attn_norm"), t.rms_eps)?;
        let q = ctx.reshape(linear(ctx, h, p("attn_q"), None)?, &[hd, heads, n])?;
        let k = ctx.reshape(linear(ctx, h, p("attn_k"), None)?, &[hd, kv_heads, n])?;
        let v = linear(ctx, h, p("attn_v"), None)?; // [hd * kv_heads, n]
        let q = ctx.rope_neox(q, pos, hd, t.rope_theta)?;
        let k = ctx.rope_neox(k, pos, hd, t.rope_theta)?;

        // Store this batch's K/V in their slots (expanded first, so they run before
        // the attention reads the cache), then each sequence attends to its own region.
        let (ck, cv) = (cache[2 * i], cache[2 * i + 1]);
        graph.expand(ctx.set_rows(ck, ctx.reshape(k, &[hd * kv_heads, n])?, slots)?)?;
        graph.expand(ctx.set_rows(cv, v, slots)?)?;
        let row = ck.ty().row_size(hd * kv_heads)?;
        let head_row = ck.ty().row_size(hd)?;
        let q = ctx.permute(q, [0, 2, 1, 3])?; // [hd, n, heads]
        let mut attn: Option<Tensor<'c>> = None;
        for run in &runs {
            let q = if run.len == n { q } else { ctx.view(q, &[hd, run.len, heads], &[q.nb()[1], q.nb()[2]], run.first * q.nb()[1])? };
            let keys = ctx.view(ck, &[hd, run.kv, kv_heads], &[row, head_row], run.base * row)?;
            let values = ctx.view(cv, &[hd, run.kv, kv_heads], &[row, head_row], run.base * row)?;
            let mask = if t.sliding_layers[i] { run.sliding } else { run.full };
            let a = ctx.flash_attn_ext(q, keys, values, mask, scale, softcap)?; // [hd, heads, len]
            attn = Some(match attn {
                Some(prev) => ctx.concat(prev, a, 2)?,
                None => a,
            });
        }
        let attn = ctx.reshape(attn.ok_or_else(|| Error::Invalid("an empty batch".into()))?, &[hd * heads, n])?;
        let mut o = linear(ctx, attn, p("attn_output"), None)?;
        if t.arch == TextArch::Gemma2 {
            o = rms_norm(ctx, o, p("post_attention_norm"), t.rms_eps)?;
        }
        x = ctx.add(x, o)?;

        let h = rms_norm(ctx, x, p("ffn_norm"), t.rms_eps)?;
        let gate = ctx.gelu_precise(linear(ctx, h, p("ffn_gate"), None)?)?;
        let up = linear(ctx, h, p("ffn_up"), None)?;
        let mut down = linear(ctx, ctx.mul(gate, up)?, p("ffn_down"), None)?;
        if t.arch == TextArch::Gemma2 {
            down = rms_norm(ctx, down, p("post_ffw_norm"), t.rms_eps)?;
        }
        x = ctx.add(x, down)?;
    }
    let n_logits = n_logits.clamp(1, n);
    let last = ctx.view(x, &[t.width, n_logits], &[x.nb()[1]], (n - n_logits) * x.nb()[1])?;
    let h = rms_norm(ctx, last, w.get("output_norm.weight"), t.rms_eps)?;
    // Logits before the final softcap: see `Model::final_softcap`.
    Ok(ctx.mul_mat(w.lm_head(), h)?)
}

impl Generation {
    /// The mean natural-log probability of the generated tokens (none for an empty
    /// answer): the confidence of a caption, answer or OCR text.
    pub fn mean_logprob(&self) -> Option<f32> {
        (!self.token_probs.is_empty()).then(|| self.token_probs.iter().map(|p| p.max(f32::MIN_POSITIVE).ln()).sum::<f32>() / self.token_probs.len() as f32)
    }
}

/// The probability of `id` under the softmax of the (soft-capped) logits; masked ids
/// (-inf) count for nothing. This is a pass over the vocabulary on every decode step, so
/// the cap's tanh is written with one f32 exp, `c tanh(l / c) = c - 2c / (1 + e^(2l/c))`:
/// 1.9 ms for 257,216 logits on this machine where libm's tanh took 6.1 ms (about 4.5%
/// of a 3B q4_0 decode step instead of 15%), within 2e-6 of it relatively. The softcap
/// is monotonic, so the largest capped logit is the cap of the largest raw one.
fn probability(logits: &[f32], id: u32, cap: Option<f32>) -> f32 {
    let capped = |l: f32| cap.map_or(l, |c| c - 2.0 * c / (1.0 + (2.0 * l / c).exp()));
    let max = capped(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let term = |l: f32| if l.is_finite() { (capped(l) - max).exp() as f64 } else { 0.0 };
    let total: f64 = logits.iter().map(|&l| term(l)).sum();
    logits.get(id as usize).map_or(0.0, |&l| (term(l) / total) as f32)
}

/// `cap * tanh(l / cap)`.
fn softcap(l: f32, cap: f32) -> f32 {
    cap * (l / cap).tanh()
}

/// Greedy or temperature / top-k / top-p sampling with a seeded generator.
struct Sampler {
    /// Applied to the logits before sampling with a temperature.
    softcap: Option<f32>,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    state: u64,
    allowed: AnswerTokens,
}

impl Sampler {
    fn new(opts: &GenerateOptions, softcap: Option<f32>, allowed: AnswerTokens) -> Sampler {
        Sampler { softcap, temperature: opts.temperature, top_k: opts.top_k, top_p: opts.top_p, state: opts.seed ^ 0x9E37_79B9_7F4A_7C15, allowed }
    }

    /// splitmix64, mapped to [0, 1).
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks the next token from raw logits (before the final softcap), never one
    /// that cannot be part of an answer.
    fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.allowed.mask(logits);
        // The softcap is monotonic: the greedy choice is the same with or without it (up to
        // ties among logits so large that their capped values round to the same f32).
        let argmax = logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &l)| if l > best.1 { (i, l) } else { best }).0;
        if self.temperature <= 0.0 {
            return argmax as u32;
        }
        let cap = |l: f32| self.softcap.map_or(l, |c| softcap(l, c));
        let mut cand: Vec<(usize, f32)> = logits.iter().map(|&l| cap(l)).enumerate().filter(|(_, l)| l.is_finite()).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if self.top_k > 0 {
            cand.truncate(self.top_k);
        }
        let max = cand.first().map_or(0.0, |c| c.1);
        let mut probs: Vec<f64> = cand.iter().map(|c| (((c.1 - max) / self.temperature) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|p| {
                acc += p;
                acc >= self.top_p as f64
            });
            let keep = keep.map_or(probs.len(), |k| k + 1);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut r = self.uniform();
        for (c, p) in cand.iter().zip(&probs) {
            if r < *p {
                return c.0 as u32;
            }
            r -= p;
        }
        cand.get(probs.len().saturating_sub(1)).map_or(argmax, |c| c.0) as u32
    }
}
