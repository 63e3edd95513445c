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
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    /// Checks that the temperature is finite and at least 0 and top-p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=f32::MAX).contains(&self.temperature)
            || !(f32::MIN_POSITIVE..=1.0).contains(&self.top_p)
        {
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
/// it is written for the compiler to vectorise: the cap's tanh as one exp,
/// `c tanh(l / c) = c - 2c / (1 + e^(2l/c))`, both exps as [`exp`] (libm's are scalar
/// calls), sums in 16 f32 lanes gathered into an f64 every 1024 logits. Within 1e-6
/// of the same formula in f64 (1e-5 for probabilities below 1e-6). The softcap is monotonic, so the largest capped logit
/// is the cap of the largest raw one.
pub(crate) fn probability(logits: &[f32], id: u32, cap: Option<f32>) -> f32 {
    let id = id as usize;
    probabilities(logits, id..id + 1, cap)
        .first()
        .copied()
        .unwrap_or(0.0)
}

/// The probabilities of the ids in `range` (clipped to the vocabulary) under the same
/// softmax as [`probability`], for one pass over the vocabulary: the distribution over
/// the location tokens that detection confidences are worked out from.
pub(crate) fn probabilities(
    logits: &[f32],
    range: std::ops::Range<usize>,
    cap: Option<f32>,
) -> Vec<f32> {
    match cap {
        Some(c) => probabilities_with(logits, range, |l| c - 2.0 * c / (1.0 + exp(2.0 * l / c))),
        None => probabilities_with(logits, range, |l| l),
    }
}

/// [`probabilities`] with the cap as a function, so that each case compiles to its own
/// branch-free loop.
#[inline(always)]
fn probabilities_with(
    logits: &[f32],
    range: std::ops::Range<usize>,
    capped: impl Fn(f32) -> f32 + Copy,
) -> Vec<f32> {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for chunk in &mut chunks {
        for j in 0..LANES {
            lanes[j] = lanes[j].max(chunk[j]);
        }
    }
    let max = capped(
        chunks
            .remainder()
            .iter()
            .chain(&lanes)
            .copied()
            .fold(f32::NEG_INFINITY, f32::max),
    );
    let term = |l: f32| {
        let t = exp(capped(l) - max);
        if l.is_finite() { t } else { 0.0 }
    };
    let mut total = 0f64;
    for block in logits.chunks(1024) {
        let mut sums = [0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for chunk in &mut chunks {
            for j in 0..LANES {
                sums[j] += term(chunk[j]);
            }
        }
        total += sums.iter().map(|&s| s as f64).sum::<f64>()
            + chunks
                .remainder()
                .iter()
                .map(|&l| term(l) as f64)
                .sum::<f64>();
    }
    let range = range.start.min(logits.len())..range.end.min(logits.len());
    logits[range]
        .iter()
        .map(|&l| (term(l) as f64 / total) as f32)
        .collect()
}

/// `e^x` in f32 with plain arithmetic, so that loops over it vectorise: `x = n ln 2 + r`
/// with `|r| <= ln 2 / 2`, a degree-6 polynomial for `e^r` (relative error below 2e-7),
/// `2^n` from the exponent bits. Inputs are clamped to [-87, 88] (below, the result is
/// tiny rather than 0; above, f32 overflows anyway).
#[inline(always)]
fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer, kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let n = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    p * f32::from_bits(((n + 127) as u32) << 23)
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
        let argmax = logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 { (i, l) } else { best }
            })
            .0;
        let Sampling {
            temperature,
            top_k,
            top_p,
            ..
        } = self.settings;
        if temperature <= 0.0 {
            return argmax as u32;
        }
        let cap = |l: f32| self.softcap.map_or(l, |c| softcap(l, c));
        let mut cand: Vec<(usize, f32)> = logits
            .iter()
            .map(|&l| cap(l))
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if top_k > 0 {
            cand.truncate(top_k);
        }
        let max = cand.first().map_or(0.0, |c| c.1);
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|c| (((c.1 - max) / temperature) as f64).exp())
            .collect();
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
        cand.get(probs.len().saturating_sub(1))
            .map_or(argmax, |c| c.0) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probabilities against the same formulas in f64 with libm, over a vocabulary
    /// of spread-out logits with masked ids, with and without a cap.
    #[test]
    fn probability_matches_f64() {
        let logits: Vec<f32> = (0..50_000u32)
            .map(|i| {
                if i % 997 == 0 {
                    f32::NEG_INFINITY
                } else {
                    ((i * 7919 % 10_007) as f32 / 10_007.0 - 0.5) * 90.0
                }
            })
            .collect();
        for cap in [None, Some(30.0f32)] {
            let capped = |l: f64| cap.map_or(l, |c| c as f64 * (l / c as f64).tanh());
            let max = logits
                .iter()
                .map(|&l| capped(l as f64))
                .fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits
                .iter()
                .filter(|l| l.is_finite())
                .map(|&l| (capped(l as f64) - max).exp())
                .sum();
            for id in [0u32, 1, 2, 500, 12_345, 49_999] {
                let want = if logits[id as usize].is_finite() {
                    (capped(logits[id as usize] as f64) - max).exp() / total
                } else {
                    0.0
                };
                let got = probability(&logits, id, cap) as f64;
                // Far in the tail, f32's rounding of `l - max` alone is 1e-6 of the result.
                let tol = if want > 1e-6 { 1e-6 } else { 1e-5 };
                assert!(
                    (got - want).abs() <= tol * want,
                    "cap {cap:?} id {id}: {got:e} against {want:e}"
                );
            }
        }
        let all = probabilities(&logits, 0..logits.len() + 5, Some(30.0));
        assert_eq!(all.len(), logits.len());
        assert!((all.iter().map(|&p| p as f64).sum::<f64>() - 1.0).abs() < 1e-5);
        for x in [
            -100.0f32, -87.0, -20.5, -1.0, -0.3, 0.0, 0.2, 1.0, 10.25, 80.0,
        ] {
            let want = (x as f64).clamp(-87.0, 88.0).exp();
            assert!(
                ((exp(x) as f64) - want).abs() <= 3e-7 * want,
                "exp({x}) = {} against {want}",
                exp(x)
            );
        }
    }
}
