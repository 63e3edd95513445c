//! Choosing the next token from the decoder's logits, and the probability the model
//! gave it (the basis of every confidence the engine reports).
use crate::config::TokenConfig;
use crate::{Error, Result};

/// How the next token is chosen: greedy (the default) unless `temperature` is above 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 (the default) always picks the most likely token.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the most likely tokens up to this cumulative probability (1: all).
    pub top_p: f32,
    /// Seed of the generator; the same seed gives the same answer.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl Sampling {
    /// Checks that the temperature is finite and at least 0 and top-p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=f32::MAX).contains(&self.temperature) || !(f32::MIN_POSITIVE..=1.0).contains(&self.top_p) {
            return Err(Error::Invalid(format!(
                "sampling with temperature {} and top-p {}: expected a finite temperature >= 0 and top-p in (0, 1]",
                self.temperature, self.top_p
            )));
        }
        Ok(())
    }
}

/// Gemma 2's final logit softcap, `cap * tanh(l / cap)`. The decoder graph leaves it
/// out: it is monotonic, so greedy decoding takes the argmax of the raw logits, and
/// only sampling with a temperature, probabilities and reported logits need it (a
/// vocabulary of tanh per token would cost more than the attention of a decode step).
pub(crate) fn softcap(l: f32, cap: f32) -> f32 {
    cap * (l / cap).tanh()
}

/// The probability of `id` under the softmax of the (soft-capped) logits; masked ids
/// (-inf) count for nothing. This is a pass over the vocabulary on every decode step, so
/// the cap's tanh is written with one f32 exp, `c tanh(l / c) = c - 2c / (1 + e^(2l/c))`:
/// 1.9 ms for 257,216 logits on this machine where libm's tanh took 6.1 ms (about 4.5%
/// of a 3B q4_0 decode step instead of 15%), within 2e-6 of it relatively. The softcap
/// is monotonic, so the largest capped logit is the cap of the largest raw one.
pub(crate) fn probability(logits: &[f32], id: u32, cap: Option<f32>) -> f32 {
    let capped = |l: f32| cap.map_or(l, |c| c - 2.0 * c / (1.0 + (2.0 * l / c).exp()));
    let max = capped(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let term = |l: f32| if l.is_finite() { (capped(l) - max).exp() as f64 } else { 0.0 };
    let total: f64 = logits.iter().map(|&l| term(l)).sum();
    logits.get(id as usize).map_or(0.0, |&l| (term(l) / total) as f32)
}

/// Greedy or temperature / top-k / top-p sampling with a seeded generator, never
/// picking a token that only a prefix may hold.
pub(crate) struct TokenSampler {
    /// Applied to the logits before sampling with a temperature.
    softcap: Option<f32>,
    settings: Sampling,
    state: u64,
    /// `<image>`, `<pad>` and `<bos>`: an `<image>` in an answer would make the next
    /// decode step fail and lose the answer; the others mean nothing there. Ids past the
    /// tokenizer's vocabulary (the embedding's padding rows) stay allowed, as in the
    /// reference: the text decoder skips them.
    banned: [u32; 3],
}

impl TokenSampler {
    pub fn new(settings: &Sampling, softcap: Option<f32>, tokens: &TokenConfig) -> TokenSampler {
        TokenSampler {
            softcap,
            settings: settings.clone(),
            state: settings.seed ^ 0x9E37_79B9_7F4A_7C15,
            banned: [tokens.image_token_id, tokens.pad, tokens.bos],
        }
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

    /// Picks the next token from raw logits (before the final softcap); the banned ids'
    /// logits are set to -inf on the way.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        for &id in &self.banned {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        // The softcap is monotonic: the greedy choice is the same with or without it (up to
        // ties among logits so large that their capped values round to the same f32).
        let argmax = logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &l)| if l > best.1 { (i, l) } else { best }).0;
        let Sampling { temperature, top_k, top_p, .. } = self.settings;
        if temperature <= 0.0 {
            return argmax as u32;
        }
        let cap = |l: f32| self.softcap.map_or(l, |c| softcap(l, c));
        let mut cand: Vec<(usize, f32)> = logits.iter().map(|&l| cap(l)).enumerate().filter(|(_, l)| l.is_finite()).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if top_k > 0 {
            cand.truncate(top_k);
        }
        let max = cand.first().map_or(0.0, |c| c.1);
        let mut probs: Vec<f64> = cand.iter().map(|c| (((c.1 - max) / temperature) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|p| {
                acc += p;
                acc >= top_p as f64
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
