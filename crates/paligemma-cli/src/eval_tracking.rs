//! `paligemma eval --tracking`: the stream crate's tracker on the demo model's answers
//! over moving sequences (`tests/reference/track_sequence.py`), scored as multi-object
//! trackers are (CLEAR MOT, IDF1).
//!
//! Every `analyse_every`-th frame is answered (`detect` with every label of the
//! sequence, the default detection filter) and its detections go through a
//! [`Tracker`] at the frame's time (30 fps). Detections and true objects are matched per
//! analysed frame: same label, IoU >= 0.5, the best pairs first. Objects less than half
//! visible (hidden by another) count neither as missed nor, when found, as false.
use crate::eval::{corners, iou};
use anyhow::{Context, Result};
use paligemma::output::Detection;
use paligemma::preprocess::RgbImage;
use paligemma::{AnswerOptions, Model, Task};
use paligemma_stream::tracker::{Tracker, TrackerConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Frames a second of the generated sequences.
const FPS: f64 = 30.0;
/// Objects less visible than this are "don't care".
const MIN_VISIBLE: f64 = 0.5;

#[derive(serde::Deserialize)]
struct FrameTruth {
    sequence: u32,
    frame: u32,
    image: String,
    objects: Vec<ObjectTruth>,
}

#[derive(serde::Deserialize)]
struct ObjectTruth {
    id: u32,
    label: String,
    #[serde(rename = "box")]
    bbox: [f32; 4],
    visible: f64,
}

/// The figures of a tracking evaluation.
#[derive(Debug, Default, serde::Serialize)]
pub struct TrackingScores {
    pub sequences: usize,
    pub frames: usize,
    pub analysed_frames: usize,
    /// Visible true objects over the analysed frames, and those matched.
    pub objects: usize,
    pub matched: usize,
    pub false_positives: usize,
    /// A true object matched to another track id than at its last match.
    pub id_switches: usize,
    /// Of those, switches while the object overlapped no other object (in this analysed
    /// frame or the one before): the tracker's own mistakes rather than a crossing.
    pub id_switches_apart: usize,
    /// A true object's track interrupted (matched, then missed, then matched again).
    pub fragmentations: usize,
    /// Object-frames: true objects times frames of their sequences (the denominator of
    /// switches per 100 frames per object).
    pub object_frames: usize,
    pub mota: f64,
    /// IDF1 with each true object given the track id it shared most frames with (a
    /// greedy assignment, largest overlaps first).
    pub idf1: f64,
}

impl TrackingScores {
    /// Switches per 100 frames per object.
    pub fn per_100(&self, switches: usize) -> f64 {
        100.0 * switches as f64 / self.object_frames.max(1) as f64
    }
}

/// Pairs (true object, detection) of the same label at IoU >= 0.5, best first.
fn match_frame(truth: &[ObjectTruth], found: &[Detection]) -> Vec<(usize, usize)> {
    let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
    for (t, o) in truth.iter().enumerate() {
        for (d, det) in found.iter().enumerate() {
            let v = iou(o.bbox, corners(det));
            if det.label == o.label && v >= 0.5 {
                pairs.push((v, t, d));
            }
        }
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut used_t, mut used_d, mut out) = (BTreeSet::new(), BTreeSet::new(), Vec::new());
    for (_, t, d) in pairs {
        if !used_t.contains(&t) && !used_d.contains(&d) {
            used_t.insert(t);
            used_d.insert(d);
            out.push((t, d));
        }
    }
    out
}

/// Whether a true object overlaps another one of the frame.
fn overlaps_another(truth: &[ObjectTruth], id: u32) -> bool {
    let Some(me) = truth.iter().find(|o| o.id == id) else {
        return false;
    };
    truth
        .iter()
        .any(|o| o.id != id && iou(o.bbox, me.bbox) > 0.0)
}

/// Per true object of a sequence: its last matched track id and whether it was matched
/// at its last visible analysed frame.
#[derive(Default)]
struct ObjectHistory {
    last_track: Option<u64>,
    matched_last: bool,
}

/// Scores one source of detections over the sequences.
#[derive(Default)]
struct Scorer {
    scores: TrackingScores,
    /// Identity overlaps for IDF1: (sequence, true id, track id) -> frames matched.
    shared: BTreeMap<(u32, u32, u64), usize>,
    /// Detections with a track id, over all analysed frames.
    tracked: usize,
    history: BTreeMap<u32, ObjectHistory>,
    tracker: Option<Tracker>,
}

impl Scorer {
    fn start_sequence(&mut self, config: &TrackerConfig) {
        self.history.clear();
        self.tracker = Some(Tracker::new(config.clone()));
    }

    /// Tracks the detections of one analysed frame and scores them against its truth;
    /// `previous` is the sequence's analysed frame before it.
    fn frame(
        &mut self,
        seq: u32,
        frame: &FrameTruth,
        previous: Option<&FrameTruth>,
        found: &mut [Detection],
    ) {
        let s = &mut self.scores;
        self.tracker
            .as_mut()
            .expect("a sequence was started")
            .update(found, f64::from(frame.frame) / FPS);
        s.analysed_frames += 1;
        let pairs = match_frame(&frame.objects, found);
        let matched_det: BTreeSet<usize> = pairs.iter().map(|p| p.1).collect();
        let visible = |o: &ObjectTruth| o.visible >= MIN_VISIBLE;
        let on_hidden = |det: &Detection| {
            frame
                .objects
                .iter()
                .any(|o| !visible(o) && o.label == det.label && iou(o.bbox, corners(det)) >= 0.5)
        };
        // Unmatched detections are false unless they sit on a hidden object.
        s.false_positives += found
            .iter()
            .enumerate()
            .filter(|(d, det)| !matched_det.contains(d) && !on_hidden(det))
            .count();
        self.tracked += found.iter().filter(|d| d.track_id.is_some()).count();
        for (t, o) in frame.objects.iter().enumerate() {
            let pair = pairs.iter().find(|p| p.0 == t);
            if !visible(o) && pair.is_none() {
                continue;
            }
            s.objects += 1;
            let h = self.history.entry(o.id).or_default();
            match pair.and_then(|&(_, d)| found[d].track_id) {
                Some(track) => {
                    s.matched += 1;
                    *self.shared.entry((seq, o.id, track)).or_default() += 1;
                    if h.last_track.is_some_and(|last| last != track) {
                        s.id_switches += 1;
                        let crossing = overlaps_another(&frame.objects, o.id)
                            || previous.is_some_and(|p| overlaps_another(&p.objects, o.id));
                        s.id_switches_apart += usize::from(!crossing);
                    }
                    if h.last_track.is_some() && !h.matched_last {
                        s.fragmentations += 1;
                    }
                    h.last_track = Some(track);
                    h.matched_last = true;
                }
                None => h.matched_last = false,
            }
        }
    }

    /// MOTA and IDF1 from the counts.
    fn finish(mut self) -> TrackingScores {
        let s = &mut self.scores;
        let missed = s.objects - s.matched;
        s.mota =
            1.0 - (missed + s.false_positives + s.id_switches) as f64 / s.objects.max(1) as f64;
        // Greedy identity assignment: largest overlaps first, each true id and track id once.
        let mut overlaps: Vec<((u32, u32, u64), usize)> =
            std::mem::take(&mut self.shared).into_iter().collect();
        overlaps.sort_by_key(|o| std::cmp::Reverse(o.1));
        let (mut truths, mut tracks, mut idtp) = (BTreeSet::new(), BTreeSet::new(), 0usize);
        for ((seq, id, track), n) in overlaps {
            if !truths.contains(&(seq, id)) && !tracks.contains(&(seq, track)) {
                truths.insert((seq, id));
                tracks.insert((seq, track));
                idtp += n;
            }
        }
        s.idf1 = 2.0 * idtp as f64 / (s.objects + self.tracked).max(1) as f64;
        self.scores
    }
}

/// The true boxes of the frame's visible objects as detections without identities: what
/// a perfect detector would give the tracker.
fn oracle(frame: &FrameTruth, width: usize, height: usize) -> Vec<Detection> {
    let bin = |v: f32, size: usize| (v / size as f32 * 1023.0).round().clamp(0.0, 1023.0) as u32;
    let text: Vec<String> = frame
        .objects
        .iter()
        .filter(|o| o.visible >= MIN_VISIBLE)
        .map(|o| {
            let [x1, y1, x2, y2] = o.bbox;
            format!(
                "<loc{:04}><loc{:04}><loc{:04}><loc{:04}> {}",
                bin(y1, height),
                bin(x1, width),
                bin(y2, height),
                bin(x2, width),
                o.label
            )
        })
        .collect();
    paligemma::parse::parse_detections(&text.join(" ; "), width, height, 1023.0, false)
        .detections()
        .to_vec()
}

/// The tracker on the model's detections, and on the true boxes (its own share of the mistakes).
pub struct Evaluation {
    pub model: TrackingScores,
    pub oracle: TrackingScores,
}

pub fn evaluate(
    model: &mut Model,
    set: &Path,
    analyse_every: usize,
    limit: usize,
    config: &TrackerConfig,
) -> Result<Evaluation> {
    let truth_path = set.join("truth.jsonl");
    let text =
        std::fs::read_to_string(&truth_path).with_context(|| truth_path.display().to_string())?;
    let mut sequences: BTreeMap<u32, Vec<FrameTruth>> = BTreeMap::new();
    for (n, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let f: FrameTruth = serde_json::from_str(line)
            .with_context(|| format!("{}: line {}", truth_path.display(), n + 1))?;
        sequences.entry(f.sequence).or_default().push(f);
    }
    let opts = AnswerOptions {
        max_tokens: 64,
        ..Default::default()
    };
    let (mut by_model, mut by_oracle) = (Scorer::default(), Scorer::default());
    for (&seq, frames) in &sequences {
        // One prompt per label, as the demo model was trained (one or two classes a prompt).
        let labels: BTreeSet<&str> = frames
            .iter()
            .flat_map(|f| f.objects.iter().map(|o| o.label.as_str()))
            .collect();
        let tasks = labels
            .iter()
            .map(|l| Task::parse(&format!("detect {l}")))
            .collect::<paligemma::Result<Vec<_>>>()?;
        let ids: BTreeSet<u32> = frames
            .iter()
            .flat_map(|f| f.objects.iter().map(|o| o.id))
            .collect();
        for scorer in [&mut by_model, &mut by_oracle] {
            scorer.start_sequence(config);
            scorer.scores.sequences += 1;
            scorer.scores.frames += frames.len();
            scorer.scores.object_frames += ids.len() * frames.len();
        }
        let mut previous: Option<&FrameTruth> = None;
        for frame in frames
            .iter()
            .filter(|f| (f.frame as usize).is_multiple_of(analyse_every.max(1)))
        {
            if limit > 0 && by_model.scores.analysed_frames >= limit {
                break;
            }
            let image = RgbImage::open(&set.join(&frame.image))?;
            let embedding = model.encode_image(&image)?;
            let answers = model.answer_batch(&embedding, &tasks, &opts, &mut |_| true)?;
            let mut found: Vec<Detection> = answers
                .iter()
                .flat_map(|a| a.result.detections().iter().cloned())
                .collect();
            by_model.frame(seq, frame, previous, &mut found);
            by_oracle.frame(
                seq,
                frame,
                previous,
                &mut oracle(frame, image.width, image.height),
            );
            previous = Some(frame);
        }
    }
    Ok(Evaluation {
        model: by_model.finish(),
        oracle: by_oracle.finish(),
    })
}

pub fn print(e: &Evaluation, analyse_every: usize) {
    let (m, o) = (&e.model, &e.oracle);
    println!(
        "sequences                   {} ({} frames, one in {analyse_every} analysed: {})",
        m.sequences, m.frames, m.analysed_frames
    );
    println!("                            model's boxes      true boxes");
    let row = |name: &str, f: &dyn Fn(&TrackingScores) -> String| {
        println!("{name:<28}{:<19}{}", f(m), f(o))
    };
    row("objects matched", &|s| {
        format!(
            "{:.1}% of {}",
            100.0 * s.matched as f64 / s.objects.max(1) as f64,
            s.objects
        )
    });
    row("false positives", &|s| s.false_positives.to_string());
    row("ID switches", &|s| {
        format!("{} ({:.2})", s.id_switches, s.per_100(s.id_switches))
    });
    row("  apart from crossings", &|s| {
        format!(
            "{} ({:.2})",
            s.id_switches_apart,
            s.per_100(s.id_switches_apart)
        )
    });
    row("fragmentations", &|s| {
        format!("{} ({:.2})", s.fragmentations, s.per_100(s.fragmentations))
    });
    row("MOTA", &|s| format!("{:.3}", s.mota));
    row("IDF1", &|s| format!("{:.3}", s.idf1));
    println!("(in brackets: per 100 frames per object)");
}

#[cfg(test)]
mod tests {
    use super::*;
    use paligemma::parse::parse_detections;

    fn truth(id: u32, label: &str, bbox: [f32; 4]) -> ObjectTruth {
        ObjectTruth {
            id,
            label: label.into(),
            bbox,
            visible: 1.0,
        }
    }

    #[test]
    fn matching_pairs_the_best_overlaps_of_the_same_label() {
        // Boxes in a 1023 x 1023 frame, so that bins are pixels.
        let found = parse_detections(
            "<loc0000><loc0000><loc0100><loc0100> cup ; <loc0000><loc0010><loc0100><loc0110> cup ; <loc0500><loc0500><loc0600><loc0600> cup",
            1023,
            1023,
            1023.0,
            false,
        )
        .detections()
        .to_vec();
        let objects = [
            truth(1, "cup", [0.0, 0.0, 100.0, 100.0]),
            truth(2, "cup", [500.0, 500.0, 600.0, 600.0]),
            truth(3, "plate", [0.0, 0.0, 100.0, 100.0]),
        ];
        let mut pairs = match_frame(&objects, &found);
        pairs.sort();
        assert_eq!(pairs, [(0, 0), (1, 2)]);
        assert!(!overlaps_another(&objects[..2], 1) && overlaps_another(&objects, 1));
    }
}
