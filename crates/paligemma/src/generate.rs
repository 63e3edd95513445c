//! Generation at the token level: prefill each prompt's prefix into its own KV cache
//! region, then decode the unfinished answers together, one batched step per token
//! (llama.cpp's `llama_decode` loop). [`crate::Model::answer`] builds on this with
//! tasks and parsed results.
use crate::embedding::{ImageEmbedding, Timings, ms};
use crate::kv_cache::{Batch, Prefix};
use crate::model::Model;
use crate::sampling::{Sampling, TokenSampler, probabilities, probability, softcap};
use crate::sequence::{LOC_BINS, LocDistribution, Sequence};
use crate::{Error, Result};
use std::time::Instant;

/// Settings of [`Model::generate`].
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// New tokens at most per answer.
    pub max_tokens: usize,
    /// How each next token is chosen (greedy by default).
    pub sampling: Sampling,
    /// Keep generating past `<eos>` (benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 64,
            sampling: Sampling::default(),
            ignore_eos: false,
        }
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
    /// Its id in the model's vocabulary.
    pub id: u32,
    /// The text it adds to the answer: empty for a token that leaves a character
    /// incomplete, whose bytes then come with the token that completes it; the pieces
    /// of an answer add up to its text.
    pub text: &'a str,
    /// The probability the model gave it (see [`Generation::token_probs`]).
    pub probability: f32,
}

/// The streaming callback: sees every token; returning false ends that answer there.
pub type OnToken<'a> = dyn FnMut(&Token<'_>) -> bool + 'a;

/// One answer at the token level.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    /// The answer's text, decoded from `tokens` (special tokens dropped, `<locNNNN>` and
    /// `<segNNN>` kept).
    pub text: String,
    /// Generated ids, eos excluded.
    pub tokens: Vec<u32>,
    /// The probability the model gave each generated id (softmax of its final logits at
    /// temperature 1, whatever the sampling settings): the basis of confidences.
    pub token_probs: Vec<f32>,
    /// At every generated `<locNNNN>` token, the model's whole distribution over the
    /// location bins: what detection confidences are worked out from
    /// ([`crate::confidence`]).
    #[serde(skip)]
    pub loc_distributions: Vec<LocDistribution>,
    /// Tokens of the prefix: image tokens, `<bos>`, prompt and newline.
    pub prompt_tokens: usize,
    /// Whether generation ended at eos (rather than the token limit or the callback).
    pub stopped_at_eos: bool,
    /// Logits of the first generated position (after the final softcap).
    #[serde(skip)]
    pub first_logits: Vec<f32>,
    /// Time spent on this answer, from preprocessing the image to its last decode step.
    pub timings: Timings,
}

impl Generation {
    /// The mean natural-log probability of the generated tokens (none for an empty
    /// answer): the confidence of a caption, answer or OCR text.
    pub fn mean_logprob(&self) -> Option<f32> {
        (!self.token_probs.is_empty()).then(|| {
            self.token_probs
                .iter()
                .map(|p| p.max(f32::MIN_POSITIVE).ln())
                .sum::<f32>()
                / self.token_probs.len() as f32
        })
    }
}

/// Tokens one prefill graph takes at most when [`Model::start_batch`] prefills several
/// prefixes together (llama.cpp's default physical batch): it bounds the compute
/// buffers. A longer prefix runs in a graph of its own.
pub const PREFILL_BATCH_TOKENS: usize = 512;

/// An answer to start with [`Model::start_batch`].
#[derive(Clone, Copy, Debug)]
pub struct Start<'a> {
    /// The frame it is about.
    pub image: &'a ImageEmbedding,
    /// Its prefix ids (see [`Model::generate`]).
    pub prefix: &'a [u32],
    /// Its token limit and sampling.
    pub opts: &'a GenerateOptions,
}

/// An answer in progress, as [`Model::start`] returns it: the index of its KV cache
/// region (0..[`Model::max_sequences`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SequenceId(pub usize);

impl Model {
    /// Answers prompts given as prefix ids (image tokens, `<bos>`, text and the newline,
    /// as [`crate::tokenizer::Tokenizer::prefix_ids`] makes them) on one encoded image:
    /// the prefixes are prefilled together ([`Model::start_batch`]), then the decode steps of all unfinished
    /// answers run as one batch. At most [`Model::max_sequences`] prefixes at once, and
    /// none may be in progress from [`Model::start`].
    pub fn generate(
        &mut self,
        image: &ImageEmbedding,
        prefixes: &[Vec<u32>],
        opts: &GenerateOptions,
        on_token: &mut OnToken<'_>,
    ) -> Result<Vec<Generation>> {
        if prefixes.is_empty() || prefixes.len() > self.free_sequences() {
            return Err(Error::Invalid(format!(
                "{} prompts in one batch; this model was loaded for 1 to {} ({} free)",
                prefixes.len(),
                self.max_sequences(),
                self.free_sequences()
            )));
        }
        let starts: Vec<Start<'_>> = prefixes
            .iter()
            .map(|prefix| Start {
                image,
                prefix,
                opts,
            })
            .collect();
        let ids = self.start_batch(&starts)?;
        let result = (|| {
            let index = |id: SequenceId| ids.iter().position(|&s| s == id).expect("one of ours");
            while self.active_sequences() > 0 {
                self.step(&mut |id, t| {
                    on_token(&Token {
                        prompt: index(id),
                        ..*t
                    })
                })?;
            }
            Ok(())
        })();
        // Whatever happened, the regions are free again.
        let generations: Vec<Generation> = ids.iter().filter_map(|&id| self.finish(id)).collect();
        result.map(|()| generations)
    }

    /// KV cache regions free for [`Model::start`].
    pub fn free_sequences(&self) -> usize {
        self.sequences.iter().filter(|s| s.is_none()).count()
    }

    /// Answers started and not yet finished by their token limit, eos or the callback.
    pub fn active_sequences(&self) -> usize {
        self.sequences.iter().flatten().filter(|s| !s.done).count()
    }

    /// Starts an answer in a free KV cache region: prefills `prefix` (see
    /// [`Model::generate`]); its tokens come from the following [`Model::step`]s, along
    /// with those of every other answer in progress (continuous batching). The region
    /// stays taken until [`Model::finish`].
    pub fn start(
        &mut self,
        image: &ImageEmbedding,
        prefix: &[u32],
        opts: &GenerateOptions,
    ) -> Result<SequenceId> {
        Ok(self.start_batch(&[Start {
            image,
            prefix,
            opts,
        }])?[0])
    }

    /// Starts several answers as [`Model::start`] does, prefilling their prefixes
    /// together: as many as fit in [`PREFILL_BATCH_TOKENS`] share one graph, each
    /// attending only to itself. Small prefixes (a small model's, or many prompts on
    /// small frames) then cost one pass over the weights and one set of graph
    /// overheads instead of one each. Either every answer starts or, on an error,
    /// none does.
    pub fn start_batch(&mut self, starts: &[Start<'_>]) -> Result<Vec<SequenceId>> {
        for s in starts {
            if s.prefix.is_empty() {
                return Err(Error::Prompt(
                    "an empty prefix (it needs at least <bos>)".into(),
                ));
            }
            s.opts.sampling.validate()?;
            self.kv.check_fits(s.prefix.len(), s.opts.max_tokens)?;
        }
        if starts.len() > self.free_sequences() {
            return Err(Error::Invalid(format!(
                "{} answers to start, but {} of the {} sequences of this model are free; finish one first",
                starts.len(),
                self.free_sequences(),
                self.max_sequences()
            )));
        }
        let slots: Vec<usize> = (0..self.sequences.len())
            .filter(|&s| self.sequences[s].is_none())
            .take(starts.len())
            .collect();
        let mut first = 0;
        while first < starts.len() {
            let mut end = first + 1;
            let mut tokens = starts[first].prefix.len();
            while end < starts.len() && tokens + starts[end].prefix.len() <= PREFILL_BATCH_TOKENS {
                tokens += starts[end].prefix.len();
                end += 1;
            }
            if let Err(e) = self.prefill(&starts[first..end], &slots[first..end]) {
                slots[..first]
                    .iter()
                    .for_each(|&s| self.sequences[s] = None);
                return Err(e);
            }
            first = end;
        }
        Ok(slots.into_iter().map(SequenceId).collect())
    }

    /// Prefills prefixes in one graph and starts their answers in the regions `slots`.
    fn prefill(&mut self, starts: &[Start<'_>], slots: &[usize]) -> Result<()> {
        let start = Instant::now();
        let prefixes: Vec<Prefix<'_>> = starts
            .iter()
            .zip(slots)
            .map(|(s, &slot)| (s.image, s.prefix, self.kv.base(slot)))
            .collect();
        let logits = self.forward(&Batch::prefixes(&prefixes, false))?;
        let elapsed = ms(start);
        let vocab = logits.len() / starts.len();
        let cap = self.weights.config.text.final_softcap;
        for ((s, &slot), logits) in starts.iter().zip(slots).zip(logits.chunks_exact(vocab)) {
            let mut first_logits = logits.to_vec();
            self.final_softcap(&mut first_logits);
            let mut timings = s.image.timings.clone();
            timings.prefix_tokens = s.prefix.len();
            timings.prefill = elapsed;
            self.sequences[slot] = Some(Sequence {
                base: self.kv.base(slot),
                prefix: s.prefix.len(),
                tokens: Vec::new(),
                token_probs: Vec::new(),
                loc_distributions: Vec::new(),
                text: String::new(),
                streamed: 0,
                logits: logits.to_vec(),
                first_logits,
                max_tokens: s.opts.max_tokens,
                ignore_eos: s.opts.ignore_eos,
                done: s.opts.max_tokens == 0,
                eos: false,
                sampler: TokenSampler::new(&s.opts.sampling, cap, &self.weights.config.tokens),
                timings,
            });
        }
        Ok(())
    }

    /// Samples the next token of every active answer (each seen by `on_token`, whose
    /// false ends that answer), then runs one decode step for those still going, as one
    /// batch. An error leaves every answer of the batch finished as it was.
    pub fn step(&mut self, on_token: &mut dyn FnMut(SequenceId, &Token<'_>) -> bool) -> Result<()> {
        let eos = self.weights.config.tokens.eos;
        let cap = self.weights.config.text.final_softcap;
        let locs = self
            .weights
            .config
            .tokens
            .loc_first
            .map(|first| first as usize..first as usize + LOC_BINS);
        for (slot, seq) in self.sequences.iter_mut().enumerate() {
            let Some(seq) = seq.as_mut().filter(|q| !q.done) else {
                continue;
            };
            let next = seq.sampler.sample(&mut seq.logits);
            if next == eos && !seq.ignore_eos {
                seq.eos = true;
                seq.done = true;
                continue;
            }
            let p = match locs.clone().filter(|l| l.contains(&(next as usize))) {
                Some(locs) => {
                    let probs = probabilities(&seq.logits, locs.clone(), cap);
                    let p = probs
                        .get(next as usize - locs.start)
                        .copied()
                        .unwrap_or(0.0);
                    let bin = next - locs.start as u32;
                    seq.loc_distributions.push(LocDistribution {
                        index: seq.tokens.len(),
                        bin,
                        probs,
                    });
                    p
                }
                None => probability(&seq.logits, next, cap),
            };
            seq.tokens.push(next);
            seq.token_probs.push(p);
            let full = self.weights.tokenizer.decode(&seq.tokens)?;
            // A character whose bytes span several tokens decodes to U+FFFD until its
            // last byte comes: it is held back (up to the answer's last allowed token),
            // so that the pieces add up to the final text.
            let settled = if seq.tokens.len() >= seq.max_tokens {
                full.as_str()
            } else {
                full.trim_end_matches('\u{FFFD}')
            };
            let piece = settled.get(seq.streamed..).unwrap_or("");
            seq.streamed = seq.streamed.max(settled.len());
            let token = Token {
                prompt: 0,
                index: seq.tokens.len() - 1,
                id: next,
                text: piece,
                probability: p,
            };
            if !on_token(SequenceId(slot), &token) || seq.tokens.len() >= seq.max_tokens {
                seq.done = true;
            }
            seq.text = full;
        }
        let active: Vec<usize> = (0..self.sequences.len())
            .filter(|&s| self.sequences[s].as_ref().is_some_and(|q| !q.done))
            .collect();
        if active.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let seq = |s: usize| self.sequences[s].as_ref().expect("active");
        let batch = Batch {
            images: Vec::new(),
            ids: active
                .iter()
                .map(|&s| *seq(s).tokens.last().expect("sampled"))
                .collect(),
            positions: active
                .iter()
                .map(|&s| (seq(s).prefix + seq(s).tokens.len()) as i32)
                .collect(),
            slots: active
                .iter()
                .map(|&s| seq(s).base + seq(s).prefix + seq(s).tokens.len() - 1)
                .collect(),
            seq_base: active.iter().map(|&s| seq(s).base).collect(),
            prefix: false,
            outputs: (0..active.len()).collect(),
        };
        let logits = self.forward(&batch);
        let elapsed = ms(start);
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                active
                    .iter()
                    .for_each(|&s| self.sequences[s].as_mut().expect("active").done = true);
                return Err(e);
            }
        };
        let vocab = logits.len() / active.len();
        for (i, &s) in active.iter().enumerate() {
            let q = self.sequences[s].as_mut().expect("active");
            q.logits = logits[i * vocab..(i + 1) * vocab].to_vec();
            q.timings.decode += elapsed;
        }
        Ok(())
    }

    /// Whether an answer has finished (its region still held until [`Model::finish`]).
    pub fn is_finished(&self, id: SequenceId) -> bool {
        self.sequences
            .get(id.0)
            .and_then(Option::as_ref)
            .is_none_or(|q| q.done)
    }

    /// Ends an answer (finished or not) and frees its region; none for a free region.
    pub fn finish(&mut self, id: SequenceId) -> Option<Generation> {
        let q = self.sequences.get_mut(id.0)?.take()?;
        let mut timings = q.timings;
        timings.generated_tokens = q.tokens.len();
        Some(Generation {
            text: q.text,
            tokens: q.tokens,
            token_probs: q.token_probs,
            loc_distributions: q.loc_distributions,
            prompt_tokens: q.prefix,
            stopped_at_eos: q.eos,
            first_logits: q.first_logits,
            timings,
        })
    }

    /// Logits at every prefix position, [n_prefix, vocab] after the final softcap, for
    /// parity checks.
    pub fn prefix_logits(&mut self, image: &ImageEmbedding, ids: &[u32]) -> Result<Vec<f32>> {
        self.kv.check_fits(ids.len(), 0)?;
        let mut logits = self.forward(&Batch::prefixes(&[(image, ids, 0)], true))?;
        self.final_softcap(&mut logits);
        Ok(logits)
    }

    /// Applies Gemma 2's final logit softcap to logits the decoder returned (see
    /// [`softcap`]); nothing for a model without one.
    fn final_softcap(&self, logits: &mut [f32]) {
        if let Some(cap) = self.weights.config.text.final_softcap {
            logits.iter_mut().for_each(|l| *l = softcap(*l, cap));
        }
    }
}
