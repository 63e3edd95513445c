//! Identities over time: a tracker per stream and standing prompt gives each detected
//! object a `track_id` that stays the same from one analysed frame to the next, so a
//! robot can tell "the same cup, moved" from "a second cup".
//!
//! It is a small tracker of the SORT family, sized for a model that answers a few
//! times a second: each track keeps its last box and a constant-velocity estimate of
//! its centre; at each analysed frame every track is predicted to the frame's time and
//! matched to the detections of its label, greedily by IoU with the predicted box
//! (pairs at or above `min_iou` first, then pairs whose centres lie within the track's
//! size, the nearest first, for objects that moved further than their own size
//! between two answers). A detection left over starts a track, which gets its id
//! once it has been seen in `confirm_frames` analysed frames; a track left over is kept
//! for `keep_lost_frames` analysed frames (an object hidden for a moment comes back
//! under its old id), then forgotten.
use paligemma::output::{Detection, NormBox};

/// How a stream's trackers work (the node's `[camera.tracking]`; the element's
/// `track` property turns them off).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackerConfig {
    /// Give detections track ids.
    pub enabled: bool,
    /// Analysed frames a new object must be seen in before it gets an id (1: at once).
    pub confirm_frames: u32,
    /// Analysed frames a track is kept without being seen before it is forgotten.
    pub keep_lost_frames: u32,
    /// The IoU between a track's predicted box and a detection from which they are the
    /// same object.
    pub min_iou: f32,
    /// Boxes are predicted at most this far past the frame a track was last seen in;
    /// after that they stay where they were.
    pub max_predict_ms: u64,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            enabled: true,
            confirm_frames: 1,
            keep_lost_frames: 5,
            min_iou: 0.2,
            max_predict_ms: 1000,
        }
    }
}

impl TrackerConfig {
    /// Checks the values' ranges.
    pub fn validate(&self) -> Result<(), String> {
        if self.confirm_frames == 0 {
            return Err("tracking: confirm_frames must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.min_iou) {
            return Err(format!(
                "tracking: min_iou {} is not in [0, 1]",
                self.min_iou
            ));
        }
        Ok(())
    }
}

/// A box as centre and size, in fractions of the frame.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Centred {
    cx: f64,
    cy: f64,
    w: f64,
    h: f64,
}

impl Centred {
    fn of(b: &NormBox) -> Centred {
        let (x1, y1, x2, y2) = (
            f64::from(b.x1),
            f64::from(b.y1),
            f64::from(b.x2),
            f64::from(b.y2),
        );
        Centred {
            cx: (x1 + x2) / 2.0,
            cy: (y1 + y2) / 2.0,
            w: (x2 - x1).max(0.0),
            h: (y2 - y1).max(0.0),
        }
    }

    fn to_norm(self) -> NormBox {
        let f = |v: f64| v as f32;
        NormBox {
            x1: f(self.cx - self.w / 2.0),
            y1: f(self.cy - self.h / 2.0),
            x2: f(self.cx + self.w / 2.0),
            y2: f(self.cy + self.h / 2.0),
        }
    }

    fn iou(&self, o: &Centred) -> f64 {
        let w = ((self.cx + self.w / 2.0).min(o.cx + o.w / 2.0)
            - (self.cx - self.w / 2.0).max(o.cx - o.w / 2.0))
        .max(0.0);
        let h = ((self.cy + self.h / 2.0).min(o.cy + o.h / 2.0)
            - (self.cy - self.h / 2.0).max(o.cy - o.h / 2.0))
        .max(0.0);
        let union = self.w * self.h + o.w * o.h - w * h;
        if union > 0.0 { w * h / union } else { 0.0 }
    }

    /// The distance between the centres, in units of this box's larger side.
    fn distance(&self, o: &Centred) -> f64 {
        (self.cx - o.cx).hypot(self.cy - o.cy) / self.w.max(self.h).max(1e-6)
    }
}

/// One object followed over analysed frames.
#[derive(Clone, Debug)]
struct Track {
    /// Its id; 0 while it is not confirmed.
    id: u64,
    label: String,
    /// Where it was last seen, and when (seconds on the stream's clock).
    seen: Centred,
    time: f64,
    /// Its centre's velocity, in frames per second.
    vx: f64,
    vy: f64,
    /// Analysed frames it was seen in, and missed since it was last seen.
    hits: u32,
    misses: u32,
    score: Option<f32>,
}

impl Track {
    fn predict(&self, time: f64, max_ahead: f64) -> Centred {
        let dt = (time - self.time).clamp(0.0, max_ahead);
        Centred {
            cx: self.seen.cx + self.vx * dt,
            cy: self.seen.cy + self.vy * dt,
            ..self.seen
        }
    }
}

/// The tracker of one stream's standing prompt.
#[derive(Debug)]
pub struct Tracker {
    config: TrackerConfig,
    tracks: Vec<Track>,
    next_id: u64,
}

/// A box the tracker predicts for a frame between two analysed ones.
#[derive(Clone, Debug, PartialEq)]
pub struct Predicted {
    pub track_id: u64,
    pub label: String,
    pub box_norm: NormBox,
    /// The score of the detection the track was last seen as.
    pub score: Option<f32>,
}

impl Tracker {
    pub fn new(config: TrackerConfig) -> Tracker {
        Tracker {
            config,
            tracks: Vec::new(),
            next_id: 1,
        }
    }

    /// Follows the tracks to the detections of a frame analysed at `time` (seconds on
    /// the stream's clock) and sets each detection's `track_id` (none for an object not
    /// confirmed yet). Boxes with a NaN coordinate are left without an id.
    pub fn update(&mut self, detections: &mut [Detection], time: f64) {
        let max_ahead = self.config.max_predict_ms as f64 / 1e3;
        if self.tracks.iter().any(|t| time < t.time) {
            // The clock went back (a seek, a restarted source): the old tracks mean nothing now.
            self.tracks.clear();
        }
        let boxes: Vec<Option<Centred>> = detections
            .iter()
            .map(|d| {
                let c = Centred::of(&d.box_norm);
                [c.cx, c.cy, c.w, c.h]
                    .iter()
                    .all(|v| v.is_finite())
                    .then_some(c)
            })
            .collect();
        let predicted: Vec<Centred> = self
            .tracks
            .iter()
            .map(|t| t.predict(time, max_ahead))
            .collect();
        // Candidate pairs: overlapping ones ranked by IoU, then near ones by distance.
        let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
        for (t, track) in self.tracks.iter().enumerate() {
            for (d, b) in boxes.iter().enumerate() {
                let Some(b) = b else { continue };
                if detections[d].label != track.label {
                    continue;
                }
                let iou = predicted[t].iou(b);
                let distance = predicted[t].distance(b);
                if iou >= f64::from(self.config.min_iou) && iou > 0.0 {
                    pairs.push((1.0 + iou, t, d));
                } else if distance < 1.0 {
                    pairs.push((1.0 - distance, t, d));
                }
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut track_of: Vec<Option<usize>> = vec![None; detections.len()];
        let mut matched = vec![false; self.tracks.len()];
        for (_, t, d) in pairs {
            if !matched[t] && track_of[d].is_none() {
                matched[t] = true;
                track_of[d] = Some(t);
            }
        }
        for (d, detection) in detections.iter_mut().enumerate() {
            let Some(b) = boxes[d] else { continue };
            let t = match track_of[d] {
                Some(t) => {
                    let track = &mut self.tracks[t];
                    let dt = time - track.time;
                    if dt > 0.0 {
                        let (vx, vy) = ((b.cx - track.seen.cx) / dt, (b.cy - track.seen.cy) / dt);
                        // The first measured velocity as it is, later ones averaged in.
                        let keep = if track.hits > 1 { 0.5 } else { 0.0 };
                        track.vx = keep * track.vx + (1.0 - keep) * vx;
                        track.vy = keep * track.vy + (1.0 - keep) * vy;
                    }
                    track.seen = b;
                    track.time = time;
                    track.hits += 1;
                    track.misses = 0;
                    track.score = detection.score;
                    t
                }
                None => {
                    let track = Track {
                        id: 0,
                        label: detection.label.clone(),
                        seen: b,
                        time,
                        vx: 0.0,
                        vy: 0.0,
                        hits: 1,
                        misses: 0,
                        score: detection.score,
                    };
                    self.tracks.push(track);
                    matched.push(true);
                    self.tracks.len() - 1
                }
            };
            let track = &mut self.tracks[t];
            if track.id == 0 && track.hits >= self.config.confirm_frames {
                track.id = self.next_id;
                self.next_id += 1;
            }
            detection.track_id = (track.id != 0).then_some(track.id);
        }
        for (track, seen) in self.tracks.iter_mut().zip(&matched) {
            if !seen {
                track.misses += 1;
            }
        }
        let keep_lost = self.config.keep_lost_frames;
        // Unconfirmed tracks go at their first miss, confirmed ones after keep_lost_frames.
        self.tracks
            .retain(|t| t.misses == 0 || (t.id != 0 && t.misses <= keep_lost));
    }

    /// Where the confirmed tracks seen in the last analysed frame are at `time`, for
    /// drawing boxes that follow the video between two answers.
    pub fn predict(&self, time: f64) -> Vec<Predicted> {
        let max_ahead = self.config.max_predict_ms as f64 / 1e3;
        self.tracks
            .iter()
            .filter(|t| t.id != 0 && t.misses == 0)
            .map(|t| Predicted {
                track_id: t.id,
                label: t.label.clone(),
                box_norm: t.predict(time, max_ahead).to_norm(),
                score: t.score,
            })
            .collect()
    }

    /// Tracks followed now (confirmed or not, seen or lost).
    pub fn len(&self) -> usize {
        self.tracks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paligemma::parse::parse_detections;

    /// Detections of `label` at these centres, 0.1 x 0.1 of the frame each.
    fn at(label: &str, centres: &[(f32, f32)]) -> Vec<Detection> {
        let bin = |v: f32| (v * 1023.0).round().clamp(0.0, 1023.0) as u32;
        let text: Vec<String> = centres
            .iter()
            .map(|&(x, y)| {
                format!(
                    "<loc{:04}><loc{:04}><loc{:04}><loc{:04}> {label}",
                    bin(y - 0.05),
                    bin(x - 0.05),
                    bin(y + 0.05),
                    bin(x + 0.05)
                )
            })
            .collect();
        parse_detections(&text.join(" ; "), 100, 100, 1023.0, false)
            .detections()
            .to_vec()
    }

    fn ids(d: &[Detection]) -> Vec<Option<u64>> {
        d.iter().map(|d| d.track_id).collect()
    }

    #[test]
    fn objects_keep_their_ids_while_they_move_and_cross() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        // Two balls moving towards each other by 0.15 a frame (more than their size),
        // crossing at x = 0.5 on different rows... then passing.
        let mut first = None;
        for k in 0..10 {
            let x = 0.1 + 0.08 * k as f32;
            let mut d = at("ball", &[(x, 0.3), (0.9 - (x - 0.1), 0.45)]);
            tracker.update(&mut d, k as f64 * 0.3);
            let got = ids(&d);
            assert!(got.iter().all(Option::is_some), "frame {k}: {got:?}");
            assert_eq!(*first.get_or_insert(got.clone()), got, "frame {k}");
        }
        assert_eq!(tracker.len(), 2);
    }

    #[test]
    fn births_deaths_and_a_short_occlusion() {
        let config = TrackerConfig {
            confirm_frames: 2,
            keep_lost_frames: 2,
            ..Default::default()
        };
        let mut tracker = Tracker::new(config);
        let mut d = at("cup", &[(0.5, 0.5)]);
        tracker.update(&mut d, 0.0);
        assert_eq!(ids(&d), [None], "not confirmed after one frame");
        let mut d = at("cup", &[(0.52, 0.5)]);
        tracker.update(&mut d, 1.0);
        assert_eq!(ids(&d), [Some(1)]);
        // Hidden for two analysed frames, then back near where it was heading.
        tracker.update(&mut [], 2.0);
        tracker.update(&mut [], 3.0);
        let mut d = at("cup", &[(0.6, 0.5)]);
        tracker.update(&mut d, 4.0);
        assert_eq!(ids(&d), [Some(1)], "back after an occlusion");
        // Gone for longer than keep_lost_frames: a new object, a new id.
        for t in 5..8 {
            tracker.update(&mut [], t as f64);
        }
        assert!(tracker.is_empty());
        let mut d = at("cup", &[(0.6, 0.5)]);
        tracker.update(&mut d, 8.0);
        tracker.update(&mut d, 9.0);
        assert_eq!(ids(&d), [Some(2)]);
        // Another label is another object, even in the same place.
        let mut d = at("plate", &[(0.6, 0.5)]);
        tracker.update(&mut d, 10.0);
        assert_eq!(ids(&d), [None]);
    }

    #[test]
    fn predictions_follow_the_velocity_up_to_the_limit() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        tracker.update(&mut at("ball", &[(0.2, 0.5)]), 0.0);
        tracker.update(&mut at("ball", &[(0.3, 0.5)]), 0.5);
        let p = tracker.predict(0.75);
        assert_eq!(p.len(), 1);
        let cx = (p[0].box_norm.x1 + p[0].box_norm.x2) / 2.0;
        assert!((cx - 0.35).abs() < 0.002, "{p:?}");
        // Never more than max_predict_ms (1 s) ahead.
        let far = tracker.predict(10.0);
        let cx = (far[0].box_norm.x1 + far[0].box_norm.x2) / 2.0;
        assert!((cx - 0.5).abs() < 0.002, "{far:?}");
        // A clock that goes back starts afresh.
        let mut d = at("ball", &[(0.3, 0.5)]);
        tracker.update(&mut d, 0.1);
        assert_eq!(ids(&d), [Some(2)]);
    }

    /// A detection with any box at all, NaN and far outside the frame included.
    fn any_detection() -> impl proptest::strategy::Strategy<Value = Detection> {
        use proptest::prelude::*;
        let coordinate =
            prop_oneof![8 => -2.0f32..3.0, 1 => Just(f32::NAN), 1 => Just(f32::INFINITY)];
        (
            prop::sample::select(vec!["cup", "plate"]),
            [
                coordinate.clone(),
                coordinate.clone(),
                coordinate.clone(),
                coordinate,
            ],
        )
            .prop_map(|(label, [x1, y1, x2, y2])| {
                let mut d = at(label, &[(0.5, 0.5)]).remove(0);
                d.box_norm = NormBox { x1, y1, x2, y2 };
                d
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever the boxes (empty frames, NaN, off the frame, many at once) and the
        /// clock: no panic, ids unique within a frame, finite predictions, and no more
        /// tracks kept than there were boxes.
        #[test]
        fn any_input_is_handled(frames in proptest::collection::vec(proptest::collection::vec(any_detection(), 0..40), 1..12),
                                times in proptest::collection::vec(-1.0f64..100.0, 12),
                                confirm_frames in 1u32..3, keep_lost_frames in 0u32..4) {
            let mut tracker = Tracker::new(TrackerConfig { confirm_frames, keep_lost_frames, ..Default::default() });
            let mut boxes = 0;
            for (mut frame, time) in frames.into_iter().zip(times) {
                boxes += frame.len();
                tracker.update(&mut frame, time);
                let ids: Vec<u64> = frame.iter().filter_map(|d| d.track_id).collect();
                let unique: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
                proptest::prop_assert_eq!(ids.len(), unique.len());
                proptest::prop_assert!(tracker.len() <= boxes);
                for p in tracker.predict(time + 0.5) {
                    let b = p.box_norm;
                    proptest::prop_assert!([b.x1, b.y1, b.x2, b.y2].iter().all(|v| v.is_finite()), "{:?}", p);
                }
            }
        }
    }

    #[test]
    fn thousands_of_boxes_in_little_time() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let centres: Vec<(f32, f32)> = (0..2000)
            .map(|i| ((i % 50) as f32 / 50.0 + 0.01, (i / 50) as f32 / 40.0 + 0.01))
            .collect();
        let start = std::time::Instant::now();
        for t in 0..3 {
            let mut d = at("cup", &centres);
            tracker.update(&mut d, f64::from(t));
            assert!(d.iter().all(|d| d.track_id.is_some()));
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }
}
