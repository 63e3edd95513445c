//! `paligemma eval`: the engine and the output parsers against ground truth on
//! held-out synthetic frames.
use anyhow::{Context, Result};
use paligemma::preprocess::RgbImage;
use paligemma::{AnswerOptions, KvType, Model, ModelOptions, Task, TaskResult};
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
    /// Each detection's score and whether it matched a true box at IoU >= 0.5.
    #[serde(skip)]
    pub scored: Vec<(f32, bool)>,
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

    /// Area under the ROC curve of the detection scores for right (IoU >= 0.5) against
    /// wrong boxes: the chance that a right box scores above a wrong one (ties count
    /// half). None without both kinds.
    pub fn score_auc(&self) -> Option<f64> {
        let right: Vec<f32> = self.scored.iter().filter(|s| s.1).map(|s| s.0).collect();
        let wrong: Vec<f32> = self.scored.iter().filter(|s| !s.1).map(|s| s.0).collect();
        if right.is_empty() || wrong.is_empty() {
            return None;
        }
        let wins: f64 = right
            .iter()
            .map(|r| {
                wrong
                    .iter()
                    .map(|w| {
                        if r > w {
                            1.0
                        } else if r == w {
                            0.5
                        } else {
                            0.0
                        }
                    })
                    .sum::<f64>()
            })
            .sum();
        Some(wins / (right.len() * wrong.len()) as f64)
    }
}

fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let ix = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let iy = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = ix * iy;
    let area = |r: [f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    inter / (area(a) + area(b) - inter).max(1e-6)
}

const SHAPES: [&str; 4] = ["circle", "square", "triangle", "ball"];

/// (colour, shape) pairs a caption names, sorted: "a red circle and two blue squares".
fn caption_objects(text: &str) -> Vec<(String, String)> {
    let words: Vec<&str> = text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let shape = SHAPES.iter().find(|s| *w == **s || w.strip_suffix('s') == Some(**s));
        if let (Some(shape), Some(colour)) = (shape, i.checked_sub(1).map(|j| words[j])) {
            let count = i.checked_sub(2).map(|j| words[j]).and_then(number).unwrap_or(1);
            for _ in 0..count {
                out.push((colour.to_string(), shape.to_string()));
            }
        }
    }
    out.sort();
    out
}

fn number(w: &str) -> Option<usize> {
    ["zero", "one", "two", "three", "four", "five"].iter().position(|n| *n == w).or_else(|| w.parse().ok())
}

pub fn evaluate(model: &mut Model, set: &std::path::Path, limit: usize, verbose: bool) -> Result<Scores> {
    let truth_path = set.join("truth.jsonl");
    let text = std::fs::read_to_string(&truth_path).with_context(|| truth_path.display().to_string())?;
    let mut s = Scores::default();
    let opts = AnswerOptions { max_tokens: 48, ..Default::default() };
    for (n, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        if limit > 0 && n >= limit {
            break;
        }
        let t: Truth = serde_json::from_str(line).with_context(|| format!("{}: line {}", truth_path.display(), n + 1))?;
        let image = RgbImage::open(&set.join(&t.image))?;
        let emb = model.encode_image(&image)?;
        s.frames += 1;

        let det = model.answer(&emb, &Task::parse(&t.detect.prompt)?, &opts)?;
        let found = det.result.detections();
        s.detections += found.len();
        let mut used = vec![false; found.len()];
        for b in &t.detect.boxes {
            s.boxes += 1;
            s.per_label.entry(b.label.clone()).or_default().0 += 1;
            let truth_box = [b.x1, b.y1, b.x2, b.y2];
            let best = found
                .iter()
                .enumerate()
                .filter(|(i, d)| !used[*i] && d.label == b.label)
                .map(|(i, d)| (i, iou(truth_box, [d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2])))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((i, v)) = best.filter(|(_, v)| *v >= 0.5) {
                used[i] = true;
                s.boxes_found += 1;
                s.per_label.entry(b.label.clone()).or_default().1 += 1;
                s.detections_correct += 1;
                let _ = v;
            }
        }

        s.scored.extend(found.iter().zip(&used).map(|(d, &right)| (d.score.unwrap_or(0.0), right)));

        let cap = model.answer(&emb, &Task::parse(&t.caption.prompt)?, &opts)?;
        let cap_text = match &cap.result {
            TaskResult::Caption { text } => text.trim().to_string(),
            _ => String::new(),
        };
        if cap_text == t.caption.text.trim() {
            s.captions_exact += 1;
        }
        let mut want: Vec<(String, String)> = t.objects.iter().map(|o| (o.colour.clone(), o.label.clone())).collect();
        want.sort();
        if caption_objects(&cap_text) == want {
            s.captions_objects += 1;
        }

        let count = model.answer(&emb, &Task::parse(&t.count.prompt)?, &AnswerOptions { max_tokens: 4, ..Default::default() })?;
        let answer = count.generation.text.trim().to_string();
        if number(&answer) == Some(t.count.count) {
            s.counts_correct += 1;
        }
        if verbose {
            println!(
                "{}: {:?} -> {:?} | {:?} (truth {:?}) | {:?} -> {answer:?} (truth {})",
                t.image, t.detect.prompt, det.generation.text, cap_text, t.caption.text, t.count.prompt, t.count.count
            );
        }
    }
    Ok(s)
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let opts = ModelOptions { device: args.device.clone(), threads: args.threads, kv_type: KvType::F16, context: 0, ..Default::default() };
    let mut model = Model::load(&args.model, &opts)?;
    let s = evaluate(&mut model, &args.set, args.limit, args.verbose)?;
    if args.json {
        let v = serde_json::json!({
            "scores": s, "detection_recall_iou50": s.recall(), "detection_precision_iou50": s.precision(),
            "caption_exact": s.rate(s.captions_exact), "caption_objects": s.rate(s.captions_objects), "count_accuracy": s.rate(s.counts_correct),
            "detection_score_auc": s.score_auc(), "detections_right_wrong": [s.detections_correct, s.detections - s.detections_correct],
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("frames                      {}", s.frames);
        println!("detection recall @ IoU 0.5  {:.1}% ({} of {} boxes)", 100.0 * s.recall(), s.boxes_found, s.boxes);
        for (label, (n, found)) in &s.per_label {
            println!("  recall for {label:<9}       {:.1}% ({found} of {n})", 100.0 * *found as f64 / (*n).max(1) as f64);
        }
        println!("detection precision         {:.1}%", 100.0 * s.precision());
        match s.score_auc() {
            Some(auc) => println!("score ROC AUC, right/wrong  {auc:.3} ({} right, {} wrong boxes)", s.detections_correct, s.detections - s.detections_correct),
            None => println!("score ROC AUC, right/wrong  - (needs right and wrong boxes)"),
        }
        println!("captions exact              {:.1}%", 100.0 * s.rate(s.captions_exact));
        println!("captions right objects      {:.1}%", 100.0 * s.rate(s.captions_objects));
        println!("counting accuracy           {:.1}%", 100.0 * s.rate(s.counts_correct));
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
            vec![("blue".into(), "square".into()), ("blue".into(), "square".into()), ("red".into(), "circle".into())]
        );
        assert!((iou([0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]) - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(iou([0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]), 0.0);
    }

    #[test]
    fn score_auc_ranks_right_above_wrong() {
        let with = |scored: Vec<(f32, bool)>| Scores { scored, ..Default::default() }.score_auc();
        assert_eq!(with(vec![(0.9, true), (0.8, true), (0.2, false)]), Some(1.0));
        assert_eq!(with(vec![(0.1, true), (0.8, false)]), Some(0.0));
        assert_eq!(with(vec![(0.5, true), (0.5, false), (0.9, true), (0.1, false)]), Some(0.875));
        assert_eq!(with(vec![(0.5, true)]), None);
    }
}
