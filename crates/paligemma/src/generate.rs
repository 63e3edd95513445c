//! Generation at the token level: prefill each prompt's prefix into its own KV cache
//! region, then decode the unfinished answers together, one batched step per token
//! (llama.cpp's `llama_decode` loop). [`crate::Model::answer`] builds on this with
//! tasks and parsed results.
use crate::kv_cache::Batch;
use crate::model::{ImageEmbedding, Model, Timings, ms};
use crate::sampling::{Sampling, TokenSampler, probability, softcap};
use crate::{Error, Result};
use std::time::Instant;

/// Settings of [`Model::generate`].
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// New tokens at most per answer.
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Keep generating past `<eos>` (benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_tokens: 64, sampling: Sampling::default(), ignore_eos: false }
    }
}

/// A token as it is generated, as the streaming callback of [`Model::generate`],
/// [`Model::answer`] and [`Model::answer_batch`] sees it.
#[derive(Clone, Copy, Debug)]
pub struct Token<'a> {
    /// Which prompt (task) of the batch it belongs to; 0 for a single answer.
    pub prompt: usize,
    /// Its place in that answer (0 for the first token).
    pub index: usize,
    pub id: u32,
    /// The text it adds to the answer (may be empty, for a token that completes a
    /// character only with the next one).
    pub text: &'a str,
    /// The probability the model gave it (see [`Generation::token_probs`]).
    pub probability: f32,
}

/// The streaming callback: sees every token; returning false ends that answer there.
pub type OnToken<'a> = dyn FnMut(&Token<'_>) -> bool + 'a;

/// One answer at the token level.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub text: String,
    /// Generated ids, eos excluded.
    pub tokens: Vec<u32>,
    /// The probability the model gave each generated id (softmax of its final logits at
    /// temperature 1, whatever the sampling settings): the basis of confidences.
    pub token_probs: Vec<f32>,
    pub prompt_tokens: usize,
    /// Whether generation ended at eos (rather than the token limit or the callback).
    pub stopped_at_eos: bool,
    /// Logits of the first generated position (after the final softcap).
    #[serde(skip)]
    pub first_logits: Vec<f32>,
    pub timings: Timings,
}

impl Generation {
    /// The mean natural-log probability of the generated tokens (none for an empty
    /// answer): the confidence of a caption, answer or OCR text.
    pub fn mean_logprob(&self) -> Option<f32> {
        (!self.token_probs.is_empty()).then(|| self.token_probs.iter().map(|p| p.max(f32::MIN_POSITIVE).ln()).sum::<f32>() / self.token_probs.len() as f32)
    }
}

/// An answer being generated.
struct Sequence {
    /// First KV cache row of its region.
    base: usize,
    prefix: usize,
    tokens: Vec<u32>,
    token_probs: Vec<f32>,
    text: String,
    logits: Vec<f32>,
    first_logits: Vec<f32>,
    done: bool,
    eos: bool,
    sampler: TokenSampler,
    timings: Timings,
}

impl Model {
    /// Answers prompts given as prefix ids (image tokens, `<bos>`, text and the newline,
    /// as [`crate::tokenizer::Tokenizer::prefix_ids`] makes them) on one encoded image:
    /// each prefix is prefilled on its own, then the decode steps of all unfinished
    /// answers run as one batch. At most [`Model::max_sequences`] prefixes at once.
    pub fn generate(&mut self, image: &ImageEmbedding, prefixes: &[Vec<u32>], opts: &GenerateOptions, on_token: &mut OnToken<'_>) -> Result<Vec<Generation>> {
        if prefixes.is_empty() || prefixes.len() > self.max_sequences() {
            return Err(Error::Invalid(format!("{} prompts in one batch; this model was loaded for 1 to {}", prefixes.len(), self.max_sequences())));
        }
        opts.sampling.validate()?;
        for ids in prefixes {
            self.kv.check_fits(ids.len(), opts.max_tokens)?;
        }
        let cap = self.config.text.final_softcap;
        let mut seqs = Vec::new();
        for (s, ids) in prefixes.iter().enumerate() {
            let start = Instant::now();
            let base = self.kv.base(s);
            let logits = self.forward(&Batch::prefix(image, ids, base, 1))?;
            let first_logits = logits.iter().map(|&l| cap.map_or(l, |c| softcap(l, c))).collect();
            let mut timings = image.timings.clone();
            timings.prefix_tokens = ids.len();
            timings.prefill = ms(start);
            seqs.push(Sequence {
                base,
                prefix: ids.len(),
                tokens: Vec::new(),
                token_probs: Vec::new(),
                text: String::new(),
                first_logits,
                logits,
                done: opts.max_tokens == 0,
                eos: false,
                sampler: TokenSampler::new(&opts.sampling, cap, &self.config.tokens),
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
                let p = probability(&seq.logits, next, cap);
                seq.tokens.push(next);
                seq.token_probs.push(p);
                let full = self.tokenizer.decode(&seq.tokens)?;
                let piece = full.get(seq.text.len()..).unwrap_or("");
                let token = Token { prompt: s, index: seq.tokens.len() - 1, id: next, text: piece, probability: p };
                if !on_token(&token) || seq.tokens.len() >= opts.max_tokens {
                    seq.done = true;
                }
                seq.text = full;
            }
            let active: Vec<usize> = (0..seqs.len()).filter(|&s| !seqs[s].done).collect();
            if active.is_empty() {
                break;
            }
            // One decode step for all of them.
            let next_row = |q: &Sequence| q.base + q.prefix + q.tokens.len() - 1;
            let batch = Batch {
                image: None,
                ids: active.iter().map(|&s| *seqs[s].tokens.last().expect("sampled")).collect(),
                positions: active.iter().map(|&s| (seqs[s].prefix + seqs[s].tokens.len()) as i32).collect(),
                slots: active.iter().map(|&s| next_row(&seqs[s])).collect(),
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

    /// Logits at every prefix position, [n_prefix, vocab] after the final softcap, for
    /// parity checks.
    pub fn prefix_logits(&mut self, image: &ImageEmbedding, ids: &[u32]) -> Result<Vec<f32>> {
        self.kv.check_fits(ids.len(), 0)?;
        let mut logits = self.forward(&Batch::prefix(image, ids, 0, ids.len()))?;
        if let Some(cap) = self.config.text.final_softcap {
            logits.iter_mut().for_each(|l| *l = softcap(*l, cap));
        }
        Ok(logits)
    }
}
