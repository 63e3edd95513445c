//! Detection confidences from the model's own distributions.
//!
//! A detection's `score` estimates the probability that its box is right (IoU >= 0.5
//! with the object it names) and its label is right. It is worked out from what the
//! model itself said while writing the object, with nothing fitted to one model, so it
//! carries over between checkpoints:
//! - at each of the four `<locNNNN>` tokens (y1, x1, y2, x2) the model gave every bin a
//!   probability. Reading those four distributions as its belief about where the
//!   object's edges really are, the score takes the probability that a box drawn from
//!   them overlaps the box it wrote with IoU >= 0.5, estimated on [`SAMPLES`] points of
//!   a low-discrepancy sequence (deterministic: the same answer gives the same score).
//!   The distributions are taken under the softmax over the whole vocabulary, so the
//!   probability of writing a location at all (rather than ending the answer) counts
//!   too: the model's doubt that there is another object;
//! - the label contributes the product of its tokens' probabilities.
//!
//! A box's tokens spread their probability over neighbouring bins (nearby bins mean
//! nearly the same box), which is why the probability of the single least certain
//! token, the engine's first score (kept as
//! [`crate::output::Detection::min_token_prob`]), is small even for a right box.
use crate::generate::Generation;
use crate::sequence::{LOC_BINS, LocDistribution};
use crate::tokenizer::Tokenizer;

/// Points at which the box's distribution is sampled: the estimate's standard error is
/// at most 1.6% (`0.5 / sqrt(SAMPLES)`), less on the low-discrepancy points.
pub const SAMPLES: usize = 1024;

/// The IoU from which a box counts as right, as detection benchmarks count it.
pub const RIGHT_IOU: f32 = 0.5;

/// What the model said while writing one `;`-separated object of a detection answer.
#[derive(Debug, Default)]
pub struct ObjectEvidence<'a> {
    /// Distributions at its location tokens, in the order written.
    pub locs: Vec<&'a LocDistribution>,
    /// Probabilities of its other tokens that are not separators, location or
    /// segmentation tokens: its label.
    pub label_probs: Vec<f32>,
    /// The lowest probability of any of its tokens (loc, seg or label).
    pub min_prob: Option<f32>,
}

/// Splits a detection answer's tokens into its `;`-separated objects, in the order the
/// parser numbers them ([`crate::output::Detection::object`]). The text is the
/// concatenation of the tokens, so counting the `;` in each token's text finds the same
/// objects as the parser's split of the text.
pub fn objects<'a>(generation: &'a Generation, tokenizer: &Tokenizer) -> Vec<ObjectEvidence<'a>> {
    let tokens = tokenizer.config();
    let is_in = |first: Option<u32>, count: u32, id: u32| {
        first.is_some_and(|f| (f..f + count).contains(&id))
    };
    let mut locs = generation.loc_distributions.iter().peekable();
    let mut objects = vec![ObjectEvidence::default()];
    for (i, (&id, &p)) in generation
        .tokens
        .iter()
        .zip(&generation.token_probs)
        .enumerate()
    {
        let separators = tokenizer
            .id_to_token(id)
            .map_or(0, |t| t.matches(';').count());
        if separators == 0 {
            let object = objects.last_mut().expect("never empty");
            object.min_prob = Some(object.min_prob.map_or(p, |s| s.min(p)));
            if is_in(tokens.loc_first, LOC_BINS as u32, id) {
                if let Some(d) = locs.next_if(|d| d.index == i) {
                    object.locs.push(d);
                }
            } else if !is_in(tokens.seg_first, 128, id) {
                object.label_probs.push(p);
            }
        }
        objects.extend(std::iter::repeat_with(ObjectEvidence::default).take(separators));
    }
    objects
}

/// The score of an object (see the module's documentation); none when it does not have
/// exactly four location tokens (y1, x1, y2, x2).
pub fn score(evidence: &ObjectEvidence<'_>) -> Option<f32> {
    let [y1, x1, y2, x2] = evidence.locs.as_slice() else {
        return None;
    };
    let edges = [y1, x1, y2, x2].map(|d| Edge::new(&d.probs));
    let written = BinBox::new([y1.bin, x1.bin, y2.bin, x2.bin]);
    let located = edges.iter().map(|e| e.total).product::<f64>();
    let hits = if located > 0.0 {
        (0..SAMPLES)
            .filter(|&k| {
                written.iou(&BinBox::new(std::array::from_fn(|i| {
                    edges[i].quantile(r4(k, i))
                }))) >= RIGHT_IOU
            })
            .count()
    } else {
        0
    };
    let label: f64 = evidence.label_probs.iter().map(|&p| f64::from(p)).product();
    Some((located * hits as f64 / SAMPLES as f64 * label).clamp(0.0, 1.0) as f32)
}

/// One edge's distribution over the bins, normalised, as a cumulative table.
struct Edge {
    /// The probability of writing any bin there.
    total: f64,
    cumulative: Vec<f64>,
}

impl Edge {
    fn new(probs: &[f32]) -> Edge {
        let cumulative: Vec<f64> = probs
            .iter()
            .scan(0.0, |sum, &p| {
                *sum += f64::from(p.max(0.0));
                Some(*sum)
            })
            .collect();
        Edge {
            total: cumulative.last().copied().unwrap_or(0.0),
            cumulative,
        }
    }

    /// The bin at which the cumulative probability reaches `u` (in [0, 1)) of the total.
    fn quantile(&self, u: f64) -> u32 {
        let bin = self.cumulative.partition_point(|&c| c <= u * self.total);
        bin.min(self.cumulative.len().saturating_sub(1)) as u32
    }
}

/// A box in bins, edges sorted, each bin covering one unit (`[first, last + 1)`).
struct BinBox {
    top: u32,
    left: u32,
    bottom: u32,
    right: u32,
}

impl BinBox {
    /// From the bins as written, y1 x1 y2 x2 (corners in either order).
    fn new([y1, x1, y2, x2]: [u32; 4]) -> BinBox {
        BinBox {
            top: y1.min(y2),
            left: x1.min(x2),
            bottom: y1.max(y2) + 1,
            right: x1.max(x2) + 1,
        }
    }

    fn area(&self) -> f32 {
        ((self.bottom - self.top) * (self.right - self.left)) as f32
    }

    fn iou(&self, other: &BinBox) -> f32 {
        let h = self
            .bottom
            .min(other.bottom)
            .saturating_sub(self.top.max(other.top));
        let w = self
            .right
            .min(other.right)
            .saturating_sub(self.left.max(other.left));
        let inter = (h * w) as f32;
        inter / (self.area() + other.area() - inter)
    }
}

/// Coordinate `i` (0..4) of point `k` of Roberts' R4 sequence: `frac(0.5 + k / phi^(i+1))`
/// with `phi` the real root of `x^5 = x + 1`, the additive recurrence that covers the
/// 4-D unit cube most evenly.
fn r4(k: usize, i: usize) -> f64 {
    const PHI: f64 = 1.167_303_978_261_418_7;
    let alpha = 1.0 / PHI.powi(i as i32 + 1);
    (0.5 + k as f64 * alpha).fract()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A distribution with `mass` spread evenly over `bin - spread ..= bin + spread`.
    fn spread(index: usize, bin: u32, spread: u32, mass: f32) -> LocDistribution {
        let mut probs = vec![0.0; LOC_BINS];
        let (lo, hi) = (bin.saturating_sub(spread) as usize, (bin + spread) as usize);
        probs[lo..=hi]
            .iter_mut()
            .for_each(|p| *p = mass / (hi - lo + 1) as f32);
        LocDistribution { index, bin, probs }
    }

    fn evidence(locs: &[LocDistribution], label: &[f32]) -> f32 {
        score(&ObjectEvidence {
            locs: locs.iter().collect(),
            label_probs: label.to_vec(),
            min_prob: None,
        })
        .unwrap()
    }

    #[test]
    fn sure_boxes_score_their_label_and_doubt_lowers_the_score() {
        // A box of 200 x 200 bins written with all mass on the written bins.
        let sharp = [
            spread(0, 100, 0, 1.0),
            spread(1, 100, 0, 1.0),
            spread(2, 300, 0, 1.0),
            spread(3, 300, 0, 1.0),
        ];
        assert!((evidence(&sharp, &[0.9, 0.5]) - 0.45).abs() < 1e-6);
        // Spread by 10 bins either side: every drawn box still overlaps by far more than half.
        let near = [
            spread(0, 100, 10, 1.0),
            spread(1, 100, 10, 1.0),
            spread(2, 300, 10, 1.0),
            spread(3, 300, 10, 1.0),
        ];
        assert!((evidence(&near, &[1.0]) - 1.0).abs() < 1e-6);
        // Spread by 150 bins: many drawn boxes miss; fewer than half of them are right.
        let vague = [
            spread(0, 100, 100, 1.0),
            spread(1, 100, 100, 1.0),
            spread(2, 300, 150, 1.0),
            spread(3, 300, 150, 1.0),
        ];
        let s = evidence(&vague, &[1.0]);
        assert!(s > 0.05 && s < 0.5, "{s}");
        // The probability of writing a location at all: 60% here, the rest went to <eos>.
        let doubt = [
            spread(0, 100, 0, 0.6),
            spread(1, 100, 0, 1.0),
            spread(2, 300, 0, 1.0),
            spread(3, 300, 0, 1.0),
        ];
        assert!((evidence(&doubt, &[1.0]) - 0.6).abs() < 1e-6);
        // Nothing at all where the model wrote a location (sampling at a temperature).
        let none = [
            spread(0, 100, 0, 0.0),
            spread(1, 100, 0, 1.0),
            spread(2, 300, 0, 1.0),
            spread(3, 300, 0, 1.0),
        ];
        assert_eq!(evidence(&none, &[1.0]), 0.0);
        // Not four locations: no score.
        assert_eq!(
            score(&ObjectEvidence {
                locs: sharp[..3].iter().collect(),
                ..Default::default()
            }),
            None
        );
    }

    #[test]
    fn the_sequence_covers_each_axis_evenly() {
        for i in 0..4 {
            let mut counts = [0usize; 8];
            (0..SAMPLES).for_each(|k| counts[(r4(k, i) * 8.0) as usize] += 1);
            assert!(
                counts.iter().all(|&c| c.abs_diff(SAMPLES / 8) <= 8),
                "axis {i}: {counts:?}"
            );
        }
    }
}
