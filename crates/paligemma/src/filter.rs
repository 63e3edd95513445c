//! Which detections a caller gets: a score threshold and duplicate suppression, the
//! two steps every detector pipeline runs after its model. What they drop is counted
//! in the result ([`Dropped`]), never lost silently.
pub use crate::output::Dropped;
use crate::output::{Detection, TaskResult};
use crate::{Error, Result};

/// Thresholds applied to detection and segmentation results.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DetectionFilter {
    /// Detections scoring below this are dropped (0: keep all). Detections without a
    /// score (parsed from text alone) are kept.
    pub min_score: f32,
    /// A box that overlaps a better-scoring box of the same label with an IoU above this
    /// is a duplicate and dropped (non-maximum suppression); 1 keeps every box.
    pub duplicate_iou: f32,
}

/// The default [`DetectionFilter::duplicate_iou`]: the IoU from which detection
/// benchmarks call two boxes the same object.
pub const DEFAULT_DUPLICATE_IOU: f32 = 0.5;

impl Default for DetectionFilter {
    fn default() -> Self {
        DetectionFilter {
            min_score: 0.0,
            duplicate_iou: DEFAULT_DUPLICATE_IOU,
        }
    }
}

impl DetectionFilter {
    /// Checks that both values are in [0, 1].
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("min_score", self.min_score),
            ("duplicate_iou", self.duplicate_iou),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::Invalid(format!(
                    "{name} {v}: expected a number from 0 to 1"
                )));
            }
        }
        Ok(())
    }

    /// Drops the detections of a detection or segmentation result that score below
    /// the threshold, then the duplicates (the best-scoring box of a group is kept), and
    /// adds what it dropped to the result's counts. The kept detections stay in the
    /// order the model wrote them. Other results are left as they are.
    pub fn apply(&self, result: &mut TaskResult) {
        let (TaskResult::Detections {
            detections,
            dropped,
            ..
        }
        | TaskResult::Segmentation {
            detections,
            dropped,
            ..
        }) = result
        else {
            return;
        };
        let before = detections.len();
        detections.retain(|d| d.score.is_none_or(|s| s >= self.min_score));
        dropped.below_min_score += before - detections.len();
        let keep = self.suppress_duplicates(detections);
        dropped.duplicates += keep.iter().filter(|k| !**k).count();
        let mut keep = keep.into_iter();
        detections.retain(|_| keep.next().unwrap_or(true));
    }

    /// Greedy non-maximum suppression per label: which detections to keep.
    fn suppress_duplicates(&self, detections: &[Detection]) -> Vec<bool> {
        let mut order: Vec<usize> = (0..detections.len()).collect();
        // Best score first; a stable sort keeps the written order among equal (or no) scores.
        order.sort_by(|&a, &b| {
            detections[b]
                .score
                .unwrap_or(0.0)
                .total_cmp(&detections[a].score.unwrap_or(0.0))
        });
        let mut keep = vec![true; detections.len()];
        for (n, &i) in order.iter().enumerate() {
            if !keep[i] {
                continue;
            }
            for &j in &order[n + 1..] {
                if keep[j]
                    && detections[j].label == detections[i].label
                    && iou(&detections[i], &detections[j]) > self.duplicate_iou
                {
                    keep[j] = false;
                }
            }
        }
        keep
    }
}

/// The intersection over union of two detections' boxes (as fractions of the frame, so
/// that it does not depend on the frame's size).
pub fn iou(a: &Detection, b: &Detection) -> f32 {
    let (a, b) = (a.box_norm, b.box_norm);
    let w = (a.x2.min(b.x2) - a.x1.max(b.x1)).max(0.0);
    let h = (a.y2.min(b.y2) - a.y1.max(b.y1)).max(0.0);
    let inter = w * h;
    let area = |x1: f32, y1: f32, x2: f32, y2: f32| (x2 - x1).max(0.0) * (y2 - y1).max(0.0);
    let union = area(a.x1, a.y1, a.x2, a.y2) + area(b.x1, b.y1, b.x2, b.y2) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_detections;

    fn result(text: &str, scores: &[f32]) -> TaskResult {
        let mut r = parse_detections(text, 100, 100, 1023.0, false);
        if let TaskResult::Detections { detections, .. } = &mut r {
            detections
                .iter_mut()
                .zip(scores)
                .for_each(|(d, &s)| d.score = Some(s));
        }
        r
    }

    #[test]
    fn drops_low_scores_and_duplicates_keeping_the_best_in_written_order() {
        // Two overlapping cats (IoU 0.9), a dog on the first cat, a lone cat, a weak cat.
        let text = "<loc0100><loc0100><loc0500><loc0500> cat ; <loc0100><loc0110><loc0500><loc0500> cat ; \
                    <loc0100><loc0100><loc0500><loc0500> dog ; <loc0700><loc0700><loc0900><loc0900> cat ; <loc0000><loc0000><loc0050><loc0050> cat";
        let mut r = result(text, &[0.6, 0.9, 0.5, 0.7, 0.1]);
        DetectionFilter {
            min_score: 0.2,
            ..Default::default()
        }
        .apply(&mut r);
        let TaskResult::Detections {
            detections,
            dropped,
            ..
        } = &r
        else {
            panic!()
        };
        let kept: Vec<(&str, f32)> = detections
            .iter()
            .map(|d| (d.label.as_str(), d.score.unwrap()))
            .collect();
        assert_eq!(kept, [("cat", 0.9), ("dog", 0.5), ("cat", 0.7)]);
        assert_eq!(
            *dropped,
            Dropped {
                below_min_score: 1,
                duplicates: 1
            }
        );
        // An IoU of 1 keeps every box; the counts add up over calls.
        let mut r = result(text, &[0.6, 0.9, 0.5, 0.7, 0.1]);
        DetectionFilter {
            min_score: 0.0,
            duplicate_iou: 1.0,
        }
        .apply(&mut r);
        assert_eq!(r.detections().len(), 5);
        assert!(
            DetectionFilter {
                min_score: 1.5,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            DetectionFilter {
                min_score: f32::NAN,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }
}
