//! `paligemma eval`: the engine and the output parsers against ground truth on
//! held-out synthetic frames.
use anyhow::{Context, Result};
use paligemma::filter::DEFAULT_DUPLICATE_IOU;
use paligemma::output::Detection;
use paligemma::preprocess::RgbImage;
use paligemma::{
    AnswerOptions, ContextOptions, DetectionFilter, Device, Model, Task, TaskResult, WeightOptions,
    Weights,
};
use paligemma_stream::tracker::TrackerConfig;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Model file.
    #[arg(short, long)]
    model: PathBuf,
    /// Folder with truth.jsonl and the frames.
    #[arg(long)]
    set: PathBuf,
    /// Evaluate at most this many frames (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print each frame's answers.
    #[arg(short, long)]
    verbose: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// The set is moving sequences (tests/reference/track_sequence.py): evaluate the
    /// tracker instead (ID switches, fragmentations, MOTA, IDF1).
    #[arg(long)]
    tracking: bool,
    /// With --tracking: answer every N-th frame, as a model a few times slower than the
    /// video would.
    #[arg(long, default_value_t = 3)]
    analyse_every: usize,
}

#[derive(serde::Deserialize)]
struct Truth {
    image: String,
    detect: DetectTruth,
    caption: TextTruth,
    count: CountTruth,
    objects: Vec<Object>,
}

#[derive(serde::Deserialize)]
struct DetectTruth {
    prompt: String,
    boxes: Vec<LabelledBox>,
}

#[derive(serde::Deserialize)]
struct LabelledBox {
    label: String,
    x1: f32,
    y1: f32,
    x2: f32,
    y2: f32,
}

#[derive(serde::Deserialize)]
struct TextTruth {
    prompt: String,
    text: String,
}

#[derive(serde::Deserialize)]
struct CountTruth {
    prompt: String,
    count: usize,
}

#[derive(serde::Deserialize)]
struct Object {
    label: String,
    colour: String,
}

/// A detection as the evaluation saw it.
#[derive(Clone, Copy, Debug)]
pub struct Scored {
    /// Its score ([`paligemma::confidence`]).
    pub score: f32,
    /// The engine's first score, the probability of its least certain token.
    pub min_token_prob: f32,
    /// Whether it matched a true box at IoU >= 0.5.
    pub right: bool,
}

/// Which of a detection's scores a figure is about.
#[derive(Clone, Copy)]
pub enum ScoreKind {
    Score,
    MinTokenProb,
}

impl ScoreKind {
    fn of(self, s: &Scored) -> f32 {
        match self {
            ScoreKind::Score => s.score,
            ScoreKind::MinTokenProb => s.min_token_prob,
        }
    }
}

/// The threshold the evaluation reports precision and recall at.
pub const EVAL_MIN_SCORE: f32 = 0.5;

/// The results of an evaluation.
#[derive(Debug, Default, serde::Serialize)]
pub struct Scores {
    pub frames: usize,
    pub boxes: usize,
    pub boxes_found: usize,
    pub detections: usize,
    pub detections_correct: usize,
    pub captions_exact: usize,
    /// Captions naming exactly the scene's (colour, shape) pairs.
    pub captions_objects: usize,
    pub counts_correct: usize,
    /// Per label: (boxes, found).
    pub per_label: std::collections::BTreeMap<String, (usize, usize)>,
    /// Same-label pairs of detections overlapping with IoU > 0.5 in what the model wrote,
    /// and after duplicate suppression.
    pub duplicate_pairs_written: usize,
    pub duplicate_pairs_kept: usize,
    /// Right boxes that duplicate suppression dropped.
    pub right_boxes_suppressed: usize,
    /// Every detection after duplicate suppression.
    #[serde(skip)]
    pub scored: Vec<Scored>,
}

/// One bin of a reliability table.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub struct ReliabilityBin {
    pub count: usize,
    pub score_sum: f64,
    pub right: usize,
}

impl ReliabilityBin {
    fn json(&self) -> serde_json::Value {
        let n = self.count.max(1) as f64;
        serde_json::json!({"count": self.count, "mean_score": self.score_sum / n, "right_share": self.right as f64 / n})
    }
}

impl Scores {
    pub fn recall(&self) -> f64 {
        self.boxes_found as f64 / self.boxes.max(1) as f64
    }
    pub fn precision(&self) -> f64 {
        self.detections_correct as f64 / self.detections.max(1) as f64
    }
    fn rate(&self, n: usize) -> f64 {
        n as f64 / self.frames.max(1) as f64
    }

    /// Area under the ROC curve of the scores for right (IoU >= 0.5) against wrong
    /// boxes: the chance that a right box scores above a wrong one (ties count half).
    /// None without both kinds.
    pub fn auc(&self, kind: ScoreKind) -> Option<f64> {
        let of = |right: bool| {
            self.scored
                .iter()
                .filter(|s| s.right == right)
                .map(|s| kind.of(s))
                .collect::<Vec<f32>>()
        };
        let (right, wrong) = (of(true), of(false));
        if right.is_empty() || wrong.is_empty() {
            return None;
        }
        let wins: f64 = right
            .iter()
            .flat_map(|r| wrong.iter().map(move |w| (r, w)))
            .map(|(r, w)| {
                if r > w {
                    1.0
                } else if r == w {
                    0.5
                } else {
                    0.0
                }
            })
            .sum();
        Some(wins / (right.len() * wrong.len()) as f64)
    }

    /// The reliability table: per tenth of the score range, how many detections scored
    /// in it, their summed score and how many of them were right.
    pub fn reliability(&self, kind: ScoreKind) -> [ReliabilityBin; 10] {
        let mut bins = [ReliabilityBin::default(); 10];
        for s in &self.scored {
            let v = kind.of(s).clamp(0.0, 1.0);
            let bin = &mut bins[((v * 10.0) as usize).min(9)];
            bin.count += 1;
            bin.score_sum += f64::from(v);
            bin.right += usize::from(s.right);
        }
        bins
    }

    /// Expected calibration error over 10 equal-width bins: the mean over detections of
    /// the gap between their bin's mean score and its share of right boxes.
    pub fn calibration_error(&self, kind: ScoreKind) -> Option<f64> {
        if self.scored.is_empty() {
            return None;
        }
        let gap: f64 = self
            .reliability(kind)
            .iter()
            .map(|b| (b.score_sum - b.right as f64).abs())
            .sum();
        Some(gap / self.scored.len() as f64)
    }

    /// Precision (none when nothing is kept) and recall of the detections scoring at
    /// least `min_score`.
    pub fn at_threshold(&self, kind: ScoreKind, min_score: f32) -> (Option<f64>, f64) {
        let kept: Vec<&Scored> = self
            .scored
            .iter()
            .filter(|s| kind.of(s) >= min_score)
            .collect();
        let right = kept.iter().filter(|s| s.right).count();
        (
            (!kept.is_empty()).then(|| right as f64 / kept.len() as f64),
            right as f64 / self.boxes.max(1) as f64,
        )
    }

    /// The median score of the right boxes.
    pub fn median_right(&self, kind: ScoreKind) -> Option<f32> {
        let mut v: Vec<f32> = self
            .scored
            .iter()
            .filter(|s| s.right)
            .map(|s| kind.of(s))
            .collect();
        v.sort_by(f32::total_cmp);
        v.get(v.len() / 2).copied()
    }

    /// The score figures as JSON.
    fn score_figures(&self, kind: ScoreKind) -> serde_json::Value {
        let (precision, recall) = self.at_threshold(kind, EVAL_MIN_SCORE);
        serde_json::json!({"roc_auc": self.auc(kind), "calibration_error": self.calibration_error(kind), "precision_at_0_5": precision,
                           "recall_at_0_5": recall, "median_right": self.median_right(kind),
                           "reliability": self.reliability(kind).iter().map(ReliabilityBin::json).collect::<Vec<_>>()})
    }
}

/// Same-label pairs overlapping with IoU above the default duplicate threshold.
fn duplicate_pairs(found: &[Detection]) -> usize {
    (0..found.len())
        .flat_map(|i| (i + 1..found.len()).map(move |j| (i, j)))
        .filter(|&(i, j)| {
            found[i].label == found[j].label
                && paligemma::filter::iou(&found[i], &found[j]) > DEFAULT_DUPLICATE_IOU
        })
        .count()
}

/// Which detections match a true box (same label, IoU >= 0.5, each used once, greedy
/// per true box).
fn match_truth(found: &[Detection], truth: &[LabelledBox]) -> Vec<bool> {
    let mut used = vec![false; found.len()];
    for b in truth {
        let truth_box = [b.x1, b.y1, b.x2, b.y2];
        let best = found
            .iter()
            .enumerate()
            .filter(|(i, d)| !used[*i] && d.label == b.label)
            .map(|(i, d)| (i, iou(truth_box, corners(d))))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((i, _)) = best.filter(|(_, v)| *v >= 0.5) {
            used[i] = true;
        }
    }
    used
}

/// A detection's box in pixels as [x1, y1, x2, y2].
pub(crate) fn corners(d: &Detection) -> [f32; 4] {
    [d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2]
}

/// The intersection over union of two [x1, y1, x2, y2] boxes.
pub(crate) fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let ix = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let iy = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = ix * iy;
    let area = |r: [f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    inter / (area(a) + area(b) - inter).max(1e-6)
}

const SHAPES: [&str; 4] = ["circle", "square", "triangle", "ball"];

/// (colour, shape) pairs a caption names, sorted: "a red circle and two blue squares".
fn caption_objects(text: &str) -> Vec<(String, String)> {
    let words: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let shape = SHAPES
            .iter()
            .find(|s| *w == **s || w.strip_suffix('s') == Some(**s));
        if let (Some(shape), Some(colour)) = (shape, i.checked_sub(1).map(|j| words[j])) {
            let count = i
                .checked_sub(2)
                .map(|j| words[j])
                .and_then(number)
                .unwrap_or(1);
            for _ in 0..count {
                out.push((colour.to_string(), shape.to_string()));
            }
        }
    }
    out.sort();
    out
}

fn number(w: &str) -> Option<usize> {
    ["zero", "one", "two", "three", "four", "five"]
        .iter()
        .position(|n| *n == w)
        .or_else(|| w.parse().ok())
}

pub fn evaluate(
    model: &mut Model,
    set: &std::path::Path,
    limit: usize,
    verbose: bool,
) -> Result<Scores> {
    let truth_path = set.join("truth.jsonl");
    let text =
        std::fs::read_to_string(&truth_path).with_context(|| truth_path.display().to_string())?;
    let mut s = Scores::default();
    let opts = AnswerOptions {
        max_tokens: 48,
        ..Default::default()
    };
    let written = AnswerOptions {
        filter: DetectionFilter {
            min_score: 0.0,
            duplicate_iou: 1.0,
        },
        ..opts.clone()
    };
    for (n, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        if limit > 0 && n >= limit {
            break;
        }
        let t: Truth = serde_json::from_str(line)
            .with_context(|| format!("{}: line {}", truth_path.display(), n + 1))?;
        let image = RgbImage::open(&set.join(&t.image))?;
        let emb = model.encode_image(&image)?;
        s.frames += 1;

        // Everything the model wrote, then what the default filter keeps.
        let det = model.answer(&emb, &Task::parse(&t.detect.prompt)?, &written)?;
        let mut kept = det.result.clone();
        DetectionFilter::default().apply(&mut kept);
        s.duplicate_pairs_written += duplicate_pairs(det.result.detections());
        s.duplicate_pairs_kept += duplicate_pairs(kept.detections());
        let right_written = match_truth(det.result.detections(), &t.detect.boxes)
            .iter()
            .filter(|r| **r)
            .count();
        let found = kept.detections();
        let used = match_truth(found, &t.detect.boxes);
        let right = used.iter().filter(|r| **r).count();
        s.right_boxes_suppressed += right_written - right;
        s.detections += found.len();
        s.detections_correct += right;
        s.boxes += t.detect.boxes.len();
        s.boxes_found += right;
        for b in &t.detect.boxes {
            s.per_label.entry(b.label.clone()).or_default().0 += 1;
        }
        for (d, _) in found.iter().zip(&used).filter(|(_, r)| **r) {
            s.per_label.entry(d.label.clone()).or_default().1 += 1;
        }
        s.scored
            .extend(found.iter().zip(&used).map(|(d, &right)| Scored {
                score: d.score.unwrap_or(0.0),
                min_token_prob: d.min_token_prob.unwrap_or(0.0),
                right,
            }));

        let cap = model.answer(&emb, &Task::parse(&t.caption.prompt)?, &opts)?;
        let cap_text = match &cap.result {
            TaskResult::Caption { text } => text.trim().to_string(),
            _ => String::new(),
        };
        if cap_text == t.caption.text.trim() {
            s.captions_exact += 1;
        }
        let mut want: Vec<(String, String)> = t
            .objects
            .iter()
            .map(|o| (o.colour.clone(), o.label.clone()))
            .collect();
        want.sort();
        if caption_objects(&cap_text) == want {
            s.captions_objects += 1;
        }

        let count = model.answer(
            &emb,
            &Task::parse(&t.count.prompt)?,
            &AnswerOptions {
                max_tokens: 4,
                ..Default::default()
            },
        )?;
        let answer = count.generation.text.trim().to_string();
        if number(&answer) == Some(t.count.count) {
            s.counts_correct += 1;
        }
        if verbose {
            println!(
                "{}: {:?} -> {:?} | {:?} (truth {:?}) | {:?} -> {answer:?} (truth {})",
                t.image,
                t.detect.prompt,
                det.generation.text,
                cap_text,
                t.caption.text,
                t.count.prompt,
                t.count.count
            );
        }
    }
    Ok(s)
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let weights = WeightOptions {
        device: Device::find(&args.device)?,
        ..Default::default()
    };
    let mut model = Model::new(
        Weights::load(&args.model, &weights)?,
        &ContextOptions {
            threads: args.threads,
            ..Default::default()
        },
    )?;
    if args.tracking {
        let e = crate::eval_tracking::evaluate(
            &mut model,
            &args.set,
            args.analyse_every,
            args.limit,
            &TrackerConfig::default(),
        )?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"model": e.model, "true_boxes": e.oracle})
                )?
            );
        } else {
            crate::eval_tracking::print(&e, args.analyse_every);
        }
        return Ok(());
    }
    let s = evaluate(&mut model, &args.set, args.limit, args.verbose)?;
    if args.json {
        let v = serde_json::json!({
            "scores": s, "detection_recall_iou50": s.recall(), "detection_precision_iou50": s.precision(),
            "caption_exact": s.rate(s.captions_exact), "caption_objects": s.rate(s.captions_objects), "count_accuracy": s.rate(s.counts_correct),
            "detections_right_wrong": [s.detections_correct, s.detections - s.detections_correct],
            "score": s.score_figures(ScoreKind::Score), "min_token_prob": s.score_figures(ScoreKind::MinTokenProb),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("frames                      {}", s.frames);
        println!(
            "detection recall @ IoU 0.5  {:.1}% ({} of {} boxes)",
            100.0 * s.recall(),
            s.boxes_found,
            s.boxes
        );
        for (label, (n, found)) in &s.per_label {
            println!(
                "  recall for {label:<9}       {:.1}% ({found} of {n})",
                100.0 * *found as f64 / (*n).max(1) as f64
            );
        }
        println!(
            "detection precision         {:.1}% ({} right, {} wrong boxes)",
            100.0 * s.precision(),
            s.detections_correct,
            s.detections - s.detections_correct
        );
        println!(
            "duplicate pairs             {} written, {} kept; {} right boxes suppressed",
            s.duplicate_pairs_written, s.duplicate_pairs_kept, s.right_boxes_suppressed
        );
        println!("                            score    min token prob");
        let both = |f: &dyn Fn(ScoreKind) -> String| {
            println!("{:<10} {}", f(ScoreKind::Score), f(ScoreKind::MinTokenProb))
        };
        let or_dash = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        print!("  ROC AUC, right/wrong      ");
        both(&|k| or_dash(s.auc(k)));
        print!("  calibration error (ECE)   ");
        both(&|k| or_dash(s.calibration_error(k)));
        print!("  precision at score >= 0.5 ");
        both(&|k| {
            s.at_threshold(k, EVAL_MIN_SCORE)
                .0
                .map_or("- (none kept)".into(), |p| format!("{:.1}%", 100.0 * p))
        });
        print!("  recall at score >= 0.5    ");
        both(&|k| format!("{:.1}%", 100.0 * s.at_threshold(k, EVAL_MIN_SCORE).1));
        print!("  median score, right boxes ");
        both(&|k| or_dash(s.median_right(k).map(f64::from)));
        println!("  reliability of the score (bin: detections, mean score, share right)");
        for (i, b) in s.reliability(ScoreKind::Score).iter().enumerate() {
            if b.count > 0 {
                println!(
                    "    {:.1}-{:.1}: {:>4}, {:.3}, {:.3}",
                    i as f64 / 10.0,
                    (i + 1) as f64 / 10.0,
                    b.count,
                    b.score_sum / b.count as f64,
                    b.right as f64 / b.count as f64
                );
            }
        }
        println!(
            "captions exact              {:.1}%",
            100.0 * s.rate(s.captions_exact)
        );
        println!(
            "captions right objects      {:.1}%",
            100.0 * s.rate(s.captions_objects)
        );
        println!(
            "counting accuracy           {:.1}%",
            100.0 * s.rate(s.counts_correct)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_pairs_and_iou() {
        assert_eq!(
            caption_objects("a red circle and two blue squares"),
            vec![
                ("blue".into(), "square".into()),
                ("blue".into(), "square".into()),
                ("red".into(), "circle".into())
            ]
        );
        assert!((iou([0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]) - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(iou([0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]), 0.0);
    }

    fn scores(scored: &[(f32, bool)]) -> Scores {
        let scored = scored
            .iter()
            .map(|&(score, right)| Scored {
                score,
                min_token_prob: 0.0,
                right,
            })
            .collect();
        Scores {
            scored,
            boxes: 4,
            ..Default::default()
        }
    }

    #[test]
    fn score_figures() {
        let auc = |scored: &[(f32, bool)]| scores(scored).auc(ScoreKind::Score);
        assert_eq!(auc(&[(0.9, true), (0.8, true), (0.2, false)]), Some(1.0));
        assert_eq!(auc(&[(0.1, true), (0.8, false)]), Some(0.0));
        assert_eq!(
            auc(&[(0.5, true), (0.5, false), (0.9, true), (0.1, false)]),
            Some(0.875)
        );
        assert_eq!(auc(&[(0.5, true)]), None);
        // Bins [0.9, 1): 0.95 and 0.95, both right (gap 0.1); [0.2, 0.3): 0.25, wrong (0.25);
        // [0.6, 0.7): 0.65 right, 0.65 wrong (2 x 0.65 - 1 = 0.3).
        let s = scores(&[
            (0.95, true),
            (0.95, true),
            (0.25, false),
            (0.65, true),
            (0.65, false),
        ]);
        assert!(
            (s.calibration_error(ScoreKind::Score).unwrap() - (0.1 + 0.25 + 0.3) / 5.0).abs()
                < 1e-6
        );
        let bins = s.reliability(ScoreKind::Score);
        assert_eq!((bins[9].count, bins[9].right), (2, 2));
        assert!((bins[9].score_sum - 1.9).abs() < 1e-6);
        assert_eq!((bins[6].count, bins[6].right), (2, 1));
        assert_eq!((bins[2].count, bins[2].right), (1, 0));
        assert_eq!(bins.iter().map(|b| b.count).sum::<usize>(), 5);
        assert_eq!(s.at_threshold(ScoreKind::Score, 0.5), (Some(0.75), 0.75));
        assert_eq!(s.at_threshold(ScoreKind::Score, 0.99), (None, 0.0));
        assert_eq!(s.median_right(ScoreKind::Score), Some(0.95));
    }
}
