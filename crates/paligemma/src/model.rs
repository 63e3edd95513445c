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
    /// Tokens the KV cache holds (0: image tokens + 512, at most the model's context).
    pub context: usize,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions { device: "cpu".into(), threads: 0, kv_type: KvType::F16, context: 0 }
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
    weights: Context,
    /// Position of each weight in `weights`' tensor list.
    index: HashMap<String, usize>,
    _weight_buffer: Buffer,
    kv: Context,
    _kv_buffer: Buffer,
    n_ctx: usize,
    kv_type: KvType,
    sched: Scheduler,
    device: String,
    threads: usize,
    /// Tensor data types of the file (for reports).
    pub weight_type: String,
    has_seg_decoder: bool,
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
}

/// The tensors every model must have, given its configuration.
fn required_tensors(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let v = &cfg.vision;
    let t = &cfg.text;
    let mut out = vec![
        ("v.patch_embd.weight".to_string(), vec![v.patch_size, v.patch_size, 3, v.width]),
        ("v.patch_embd.bias".into(), vec![v.width]),
        ("v.position_embd.weight".into(), vec![v.width, v.n_patches()]),
        ("v.post_ln.weight".into(), vec![v.width]),
        ("v.post_ln.bias".into(), vec![v.width]),
        ("mm.weight".into(), vec![v.width, cfg.projection_dim]),
        ("mm.bias".into(), vec![cfg.projection_dim]),
        ("token_embd.weight".into(), vec![t.width, t.vocab_size]),
        ("output_norm.weight".into(), vec![t.width]),
    ];
    for i in 0..v.depth {
        for (n, shape) in [
            ("ln1", vec![v.width, v.width]),
            ("ln2", vec![v.width, v.width]),
            ("attn_q", vec![v.width, v.width]),
            ("attn_k", vec![v.width, v.width]),
            ("attn_v", vec![v.width, v.width]),
            ("attn_out", vec![v.width, v.width]),
            ("ffn_up", vec![v.width, v.ffn]),
            ("ffn_down", vec![v.ffn, v.width]),
        ] {
            out.push((format!("v.blk.{i}.{n}.bias"), vec![shape[1]]));
            out.push((format!("v.blk.{i}.{n}.weight"), if n.starts_with("ln") { vec![v.width] } else { shape }));
        }
    }
    let (q, kv) = (t.heads * t.head_dim, t.kv_heads * t.head_dim);
    for i in 0..t.depth {
        let mut layer = vec![
            ("attn_norm", vec![t.width]),
            ("attn_q", vec![t.width, q]),
            ("attn_k", vec![t.width, kv]),
            ("attn_v", vec![t.width, kv]),
            ("attn_output", vec![q, t.width]),
            ("ffn_norm", vec![t.width]),
            ("ffn_gate", vec![t.width, t.ffn]),
            ("ffn_up", vec![t.width, t.ffn]),
            ("ffn_down", vec![t.ffn, t.width]),
        ];
        if t.arch == TextArch::Gemma2 {
            layer.push(("post_attention_norm", vec![t.width]));
            layer.push(("post_ffw_norm", vec![t.width]));
        }
        out.extend(layer.into_iter().map(|(n, s)| (format!("blk.{i}.{n}.weight"), s)));
    }
    out
}

impl Model {
    /// Loads a GGUF written by `paligemma convert`.
    pub fn load(path: impl AsRef<Path>, opts: &ModelOptions) -> Result<Model> {
        let path = path.as_ref().to_path_buf();
        let gguf = GgufFile::open(&path)?;
        let config = Config::from_gguf(&gguf)?;
        let model_err = |detail: String| Error::Model { path: path.clone(), detail };
        let json = gguf
            .get("tokenizer.huggingface.json")
            .and_then(|v| v.as_str())
            .ok_or_else(|| model_err("no tokenizer.huggingface.json: the tokenizer is missing".into()))?;
        let tokenizer = Tokenizer::from_json(json, config.tokens.clone())?;

        // Check every tensor the graphs use before touching a backend.
        for (name, shape) in required_tensors(&config) {
            let info = gguf.tensor(&name).ok_or_else(|| model_err(format!("tensor {name} is missing")))?;
            let mut got = info.shape.clone();
            got.resize(shape.len().max(got.len()), 1);
            if got != shape {
                return Err(model_err(format!("tensor {name} has shape {:?}, expected {shape:?}", info.shape)));
            }
        }

        let threads = if opts.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { opts.threads };
        let backend = Backend::new(&opts.device)?;
        let device = backend.device().spec();

        // Weights: metadata in one context; data used in place from the mapped file
        // on the CPU, copied to the device otherwise.
        let weights = Context::new(gguf.tensors.len() + 1, 0)?;
        let mut index = HashMap::new();
        for (i, info) in gguf.tensors.iter().enumerate() {
            weights.new_named(&info.name, info.ty, &info.shape)?;
            index.insert(info.name.clone(), i);
        }
        let weight_buffer = if backend.is_cpu() {
            let buffer = Buffer::from_host(gguf.mmap())?;
            for (t, info) in weights.tensors().zip(&gguf.tensors) {
                buffer.place(t, gguf.data_offset + info.offset)?;
            }
            buffer
        } else {
            let buffer = backend.alloc_tensors(&weights)?;
            for (t, info) in weights.tensors().zip(&gguf.tensors) {
                t.write_bytes(gguf.tensor_data(info))?;
            }
            buffer
        };
        weight_buffer.set_weights_usage();

        let t = &config.text;
        let n_ctx = match opts.context {
            0 => (config.tokens.image_token_count + 512).min(t.context_length),
            n => n,
        };
        if opts.kv_type == KvType::Q8_0 && t.head_dim % Type::Q8_0.block_size() != 0 {
            return Err(Error::Invalid(format!("a q8_0 KV cache needs head_dim divisible by 32, this model has {}", t.head_dim)));
        }
        let kv = Context::new(2 * t.depth, 0)?;
        for i in 0..t.depth {
            kv.new_named(&format!("cache_k.{i}"), opts.kv_type.ggml(), &[t.head_dim * t.kv_heads, n_ctx])?;
            kv.new_named(&format!("cache_v.{i}"), opts.kv_type.ggml(), &[t.head_dim * t.kv_heads, n_ctx])?;
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
            index,
            _weight_buffer: weight_buffer,
            kv,
            _kv_buffer: kv_buffer,
            n_ctx,
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
        Weights { all: self.weights.tensors().collect(), index: &self.index }
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
        Ok(ImageEmbedding {
            features: stages.projector,
            width: pixels.size,
            height: pixels.size,
            timings: Timings { vision: ms(start), ..Default::default() },
        })
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

    /// Runs the decoder over `ids` (image positions take `image`'s features) starting
    /// at cache position `n_past`, and returns the logits of the last `n_logits`
    /// positions, [n_logits, vocab] row-major.
    fn decode_batch(&mut self, image: Option<&ImageEmbedding>, ids: &[u32], n_past: usize, n_logits: usize) -> Result<Vec<f32>> {
        let t = &self.config.text;
        let n = ids.len();
        if n_past + n > self.n_ctx {
            return Err(Error::Prompt(format!(
                "{} tokens do not fit the context of {} tokens (image tokens included); load the model with a larger context",
                n_past + n,
                self.n_ctx
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= t.vocab_size) {
            return Err(Error::Prompt(format!("token id {bad} is outside the vocabulary of {}", t.vocab_size)));
        }
        let image_id = self.config.tokens.image_token_id;
        let n_image = ids.iter().take_while(|&&id| id == image_id).count();
        if n_image > 0 {
            let expected = self.config.tokens.image_token_count;
            let features = image.map_or(0, |e| e.features.len() / t.width);
            if n_past != 0 || n_image != expected || features != expected {
                return Err(Error::Prompt(format!("the prefix needs {expected} image tokens at the start and an image encoding of as many features")));
            }
        }

        let ctx = Context::new(GRAPH_SIZE, GRAPH_SIZE)?;
        let w = self.weights();
        let text_ids: Vec<i32> = ids[n_image..].iter().map(|&id| id as i32).collect();
        let mut inputs = DecodeInputs { image: None, ids: None, pos: None, mask: None };
        let mut parts = Vec::new();
        if n_image > 0 {
            let img = ctx.input("image_features", Type::F32, &[t.width, n_image])?;
            inputs.image = Some(img);
            parts.push(img);
        }
        if !text_ids.is_empty() {
            let tid = ctx.input("token_ids", Type::I32, &[text_ids.len()])?;
            inputs.ids = Some(tid);
            let emb = ctx.get_rows(w.get("token_embd.weight"), tid)?;
            parts.push(ctx.scale(emb, t.embed_scale)?);
        }
        let mut x = parts[0];
        for p in &parts[1..] {
            x = ctx.concat(x, *p, 1)?;
        }
        let pos = ctx.input("positions", Type::I32, &[n])?;
        inputs.pos = Some(pos);
        let n_kv = n_past + n;
        // Sliding layers need a mask once a generated token's window excludes older keys.
        let window = t.sliding_window.filter(|&win| n_past > 0 && n_kv > win);
        let mask = match window {
            Some(_) => {
                let m = ctx.input("sliding_mask", Type::F32, &[n_kv, n])?;
                inputs.mask = Some(m);
                Some(ctx.cast(m, Type::F16)?)
            }
            None => None,
        };
        let kv: Vec<Tensor<'_>> = self.kv.tensors().collect();
        let mut graph = ctx.graph(GRAPH_SIZE)?;
        let logits = build_decoder(&ctx, &w, &self.config, &mut graph, &kv, x, pos, mask, n_past, n_logits)?;
        logits.set_output();
        graph.expand(logits)?;
        self.sched.alloc(&graph)?;

        if let (Some(img), Some(e)) = (inputs.image, image) {
            img.write_f32(&e.features)?;
        }
        if let Some(tid) = inputs.ids {
            tid.write_i32(&text_ids)?;
        }
        // Positions are numbered from 1, as in the reference.
        let positions: Vec<i32> = (0..n).map(|i| (n_past + i + 1) as i32).collect();
        pos.write_i32(&positions)?;
        if let (Some(m), Some(win)) = (inputs.mask, window) {
            m.write_f32(&sliding_mask(n_past, n, win))?;
        }
        self.sched.compute(&graph)?;
        Ok(logits.read_f32()?)
    }

    /// Logits at every prefix position, [n_prefix, vocab], for parity checks.
    pub fn prefix_logits(&mut self, image: &ImageEmbedding, ids: &[u32]) -> Result<Vec<f32>> {
        self.decode_batch(Some(image), ids, 0, ids.len())
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
        if ids.len() + opts.max_tokens > self.n_ctx {
            return Err(Error::Prompt(format!(
                "prefix of {} tokens plus {} new tokens exceeds the context of {} tokens",
                ids.len(),
                opts.max_tokens,
                self.n_ctx
            )));
        }
        let mut timings = image.timings.clone();
        timings.prefix_tokens = ids.len();
        let start = Instant::now();
        let first_logits = self.decode_batch(Some(image), ids, 0, 1)?;
        timings.prefill = ms(start);

        let start = Instant::now();
        let mut sampler = Sampler::new(opts);
        let eos = self.config.tokens.eos;
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut logits = first_logits.clone();
        let mut stopped_at_eos = false;
        while tokens.len() < opts.max_tokens {
            let next = sampler.sample(&logits);
            if next == eos && !opts.ignore_eos {
                stopped_at_eos = true;
                break;
            }
            tokens.push(next);
            let full = self.tokenizer.decode(&tokens)?;
            let piece = full.get(text.len()..).unwrap_or("").to_string();
            text = full;
            if !on_token(next, &piece) || tokens.len() == opts.max_tokens {
                break;
            }
            logits = self.decode_batch(None, &[next], ids.len() + tokens.len() - 1, 1)?;
        }
        timings.decode = ms(start);
        timings.generated_tokens = tokens.len();
        Ok(Generation { text, tokens, prompt_tokens: ids.len(), stopped_at_eos, first_logits, timings })
    }
}

struct DecodeInputs<'a> {
    image: Option<Tensor<'a>>,
    ids: Option<Tensor<'a>>,
    pos: Option<Tensor<'a>>,
    mask: Option<Tensor<'a>>,
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// Mask of a sliding-window layer for `n` new tokens after `n_past` cached ones:
/// query q (position n_past + i + 1) sees key k (position j + 1) when q - W < k <= q.
fn sliding_mask(n_past: usize, n: usize, window: usize) -> Vec<f32> {
    let n_kv = n_past + n;
    let mut mask = vec![0f32; n_kv * n];
    for i in 0..n {
        let q = n_past + i + 1;
        for j in 0..n_kv {
            let k = j + 1;
            if k > q || k + window <= q {
                mask[i * n_kv + j] = f32::NEG_INFINITY;
            }
        }
    }
    mask
}

/// `layer_norm(x) * w + b` over the innermost dimension.
fn layer_norm<'c>(ctx: &'c Context, x: Tensor<'_>, w: Tensor<'_>, b: Tensor<'_>, eps: f32) -> Result<Tensor<'c>> {
    Ok(ctx.add(ctx.mul(ctx.norm(x, eps)?, w)?, b)?)
}

/// `rms_norm(x) * w` (Gemma's 1 + w is stored in the file).
fn rms_norm<'c>(ctx: &'c Context, x: Tensor<'_>, w: Tensor<'_>, eps: f32) -> Result<Tensor<'c>> {
    Ok(ctx.mul(ctx.rms_norm(x, eps)?, w)?)
}

/// `w x + b`.
fn linear<'c>(ctx: &'c Context, x: Tensor<'_>, w: Tensor<'_>, b: Option<Tensor<'_>>) -> Result<Tensor<'c>> {
    let y = ctx.mul_mat(w, x)?;
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

/// The Gemma / Gemma 2 decoder over embeddings `x` [width, n] at cache positions
/// n_past.., writing K/V into the cache. Returns logits of the last `n_logits`
/// positions [vocab, n_logits].
#[allow(clippy::too_many_arguments)]
fn build_decoder<'c>(
    ctx: &'c Context,
    w: &Weights<'_>,
    cfg: &Config,
    graph: &mut Graph<'_>,
    cache: &[Tensor<'_>],
    mut x: Tensor<'c>,
    pos: Tensor<'_>,
    sliding_mask: Option<Tensor<'_>>,
    n_past: usize,
    n_logits: usize,
) -> Result<Tensor<'c>> {
    let t = &cfg.text;
    let n = x.ne()[1];
    let (hd, heads, kv_heads) = (t.head_dim, t.heads, t.kv_heads);
    let n_kv = n_past + n;
    let scale = t.query_pre_attn_scalar.powf(-0.5);
    let softcap = t.attn_softcap.unwrap_or(0.0);
    for i in 0..t.depth {
        let p = |s: &str| w.get(&format!("blk.{i}.{s}.weight"));
        let h = rms_norm(ctx, x, p("attn_norm"), t.rms_eps)?;
        let q = ctx.reshape(ctx.mul_mat(p("attn_q"), h)?, &[hd, heads, n])?;
        let k = ctx.reshape(ctx.mul_mat(p("attn_k"), h)?, &[hd, kv_heads, n])?;
        let v = ctx.mul_mat(p("attn_v"), h)?; // [hd * kv_heads, n]
        let q = ctx.rope_neox(q, pos, hd, t.rope_theta)?;
        let k = ctx.rope_neox(k, pos, hd, t.rope_theta)?;

        // Append this batch's K/V to the cache, then attend over the whole cache.
        let (ck, cv) = (cache[2 * i], cache[2 * i + 1]);
        let row = ck.ty().row_size(hd * kv_heads)?;
        let k_dst = ctx.view(ck, &[hd * kv_heads, n], &[row], n_past * row)?;
        let v_dst = ctx.view(cv, &[hd * kv_heads, n], &[row], n_past * row)?;
        let k_store = ctx.cpy(ctx.reshape(k, &[hd * kv_heads, n])?, k_dst)?;
        let v_store = ctx.cpy(v, v_dst)?;
        let head_row = ck.ty().row_size(hd)?;
        let keys = ctx.view(ck, &[hd, n_kv, kv_heads], &[row, head_row], 0)?;
        let values = ctx.view(cv, &[hd, n_kv, kv_heads], &[row, head_row], 0)?;
        // The stores must run before the attention reads the cache: expanding them
        // now puts them earlier in the graph's execution order.
        graph.expand(k_store)?;
        graph.expand(v_store)?;

        let q = ctx.permute(q, [0, 2, 1, 3])?; // [hd, n, heads]
        let mask = if t.sliding_layers[i] { sliding_mask } else { None };
        let attn = ctx.flash_attn_ext(q, keys, values, mask, scale, softcap)?; // [hd, heads, n]
        let attn = ctx.reshape(attn, &[hd * heads, n])?;
        let mut o = ctx.mul_mat(p("attn_output"), attn)?;
        if t.arch == TextArch::Gemma2 {
            o = rms_norm(ctx, o, p("post_attention_norm"), t.rms_eps)?;
        }
        x = ctx.add(x, o)?;

        let h = rms_norm(ctx, x, p("ffn_norm"), t.rms_eps)?;
        let gate = ctx.gelu_precise(ctx.mul_mat(p("ffn_gate"), h)?)?;
        let up = ctx.mul_mat(p("ffn_up"), h)?;
        let mut down = ctx.mul_mat(p("ffn_down"), ctx.mul(gate, up)?)?;
        if t.arch == TextArch::Gemma2 {
            down = rms_norm(ctx, down, p("post_ffw_norm"), t.rms_eps)?;
        }
        x = ctx.add(x, down)?;
    }
    let n_logits = n_logits.clamp(1, n);
    let last = ctx.view(x, &[t.width, n_logits], &[x.nb()[1]], (n - n_logits) * x.nb()[1])?;
    let h = rms_norm(ctx, last, w.get("output_norm.weight"), t.rms_eps)?;
    let mut logits = ctx.mul_mat(w.get("token_embd.weight"), h)?; // tied LM head
    if let Some(cap) = t.final_softcap {
        logits = ctx.scale(ctx.tanh(ctx.scale(logits, 1.0 / cap)?)?, cap)?;
    }
    Ok(logits)
}

/// Greedy or temperature / top-k / top-p sampling with a seeded generator.
struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    state: u64,
}

impl Sampler {
    fn new(opts: &GenerateOptions) -> Sampler {
        Sampler { temperature: opts.temperature, top_k: opts.top_k, top_p: opts.top_p, state: opts.seed ^ 0x9E37_79B9_7F4A_7C15 }
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

    fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &l)| if l > best.1 { (i, l) } else { best }).0;
        if self.temperature <= 0.0 {
            return argmax as u32;
        }
        let mut cand: Vec<(usize, f32)> = logits.iter().copied().enumerate().filter(|(_, l)| l.is_finite()).collect();
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
