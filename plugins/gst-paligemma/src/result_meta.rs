//! How results travel on buffers: one `GstVideoRegionOfInterestMeta` per object
//! (or one frame-sized region for a caption / answer), with a `paligemma/result`
//! parameter structure. The overlay reads them back; any other element can too.
//!
//! Parameter fields: `prompt-id` (string), `kind` (`detections`, `segmentation`,
//! `caption`, `answer`, `ocr`, `text`, `error`), `label` (string), `x1 y1 x2 y2`
//! (f64, normalised box), `score` (f64, the detection's confidence, when the engine
//! gave one), `text` (string, captions and answers), and for masks
//! `mask-x mask-y mask-width mask-height` (u32, frame pixels) and `mask-rle`
//! (string: run lengths of alternating 0/1 pixels, row-major, starting with 0s), and
//! `active-prompts` (array of strings: the ids of the standing prompts in force when
//! the result was attached, so that a reader can forget the results of removed prompts),
//! `track-id` (u64, the object's identity over frames, when tracked) and `predicted`
//! (boolean: true for a box the tracker predicts on a frame between two answers).
use paligemma::{ResultKind, TaskResult};
use paligemma_stream::ResultMessage;
use paligemma_stream::tracker::Predicted;

pub const PARAM_NAME: &str = "paligemma/result";

/// One thing to draw or report, decoded from a result message or a meta.
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    pub prompt_id: String,
    pub kind: ResultKind,
    pub label: String,
    /// Normalised box.
    pub x1: f64,
    pub y1: f64,
    pub x2: f64,
    pub y2: f64,
    /// The detection's confidence (0..1), when the engine gave one.
    pub score: Option<f32>,
    pub text: String,
    pub mask: Option<(u32, u32, u32, u32, Vec<u32>)>,
    /// Frame size the mask refers to.
    pub frame: (u32, u32),
    /// Ids of the standing prompts in force when the region was attached.
    pub active_prompts: Vec<String>,
    /// The object's track id, when tracked.
    pub track_id: Option<u64>,
    /// Whether the box is the tracker's prediction for this frame rather than an answer.
    pub predicted: bool,
}

/// The regions of a result message, attached while the prompts `active` are in force.
pub fn regions(msg: &ResultMessage, active: &[String]) -> Vec<Region> {
    let base = Region {
        active_prompts: active.to_vec(),
        prompt_id: msg.prompt.id.clone(),
        kind: msg.result.kind(),
        label: String::new(),
        x1: 0.0,
        y1: 0.0,
        x2: 1.0,
        y2: 1.0,
        score: None,
        text: String::new(),
        mask: None,
        frame: (msg.frame.width as u32, msg.frame.height as u32),
        track_id: None,
        predicted: false,
    };
    match &msg.result {
        TaskResult::Detections { detections, .. } | TaskResult::Segmentation { detections, .. } => {
            detections
                .iter()
                .map(|d| Region {
                    label: d.label.clone(),
                    x1: d.box_norm.x1 as f64,
                    y1: d.box_norm.y1 as f64,
                    x2: d.box_norm.x2 as f64,
                    y2: d.box_norm.y2 as f64,
                    score: d.score,
                    mask: d.mask.as_ref().map(|m| {
                        (
                            m.x as u32,
                            m.y as u32,
                            m.width as u32,
                            m.height as u32,
                            m.rle.clone(),
                        )
                    }),
                    track_id: d.track_id,
                    ..base.clone()
                })
                .collect()
        }
        other => vec![Region {
            text: other.text().unwrap_or_default().to_string(),
            ..base
        }],
    }
}

impl Region {
    pub fn to_structure(&self) -> gst::Structure {
        let mut s = gst::Structure::builder(PARAM_NAME)
            .field("prompt-id", &self.prompt_id)
            .field("kind", self.kind.as_str())
            .field("label", &self.label)
            .field("x1", self.x1)
            .field("y1", self.y1)
            .field("x2", self.x2)
            .field("y2", self.y2)
            .field("text", &self.text)
            .field("frame-width", self.frame.0)
            .field("frame-height", self.frame.1)
            .field("active-prompts", gst::Array::new(&self.active_prompts))
            .field("predicted", self.predicted)
            .build();
        if let Some(id) = self.track_id {
            s.set("track-id", id);
        }
        if let Some(score) = self.score {
            s.set("score", f64::from(score));
        }
        if let Some((x, y, w, h, rle)) = &self.mask {
            s.set("mask-x", *x);
            s.set("mask-y", *y);
            s.set("mask-width", *w);
            s.set("mask-height", *h);
            s.set(
                "mask-rle",
                rle.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
            );
        }
        s
    }

    pub fn from_structure(s: &gst::StructureRef) -> Option<Region> {
        if s.name() != PARAM_NAME {
            return None;
        }
        let mask = match (
            s.get::<u32>("mask-x"),
            s.get::<u32>("mask-y"),
            s.get::<u32>("mask-width"),
            s.get::<u32>("mask-height"),
            s.get::<String>("mask-rle"),
        ) {
            (Ok(x), Ok(y), Ok(w), Ok(h), Ok(rle)) => Some((
                x,
                y,
                w,
                h,
                rle.split(',').filter_map(|v| v.parse().ok()).collect(),
            )),
            _ => None,
        };
        Some(Region {
            prompt_id: s.get("prompt-id").ok()?,
            kind: s.get::<&str>("kind").ok()?.parse().ok()?,
            label: s.get("label").unwrap_or_default(),
            x1: s.get("x1").ok()?,
            y1: s.get("y1").ok()?,
            x2: s.get("x2").ok()?,
            y2: s.get("y2").ok()?,
            score: s.get::<f64>("score").ok().map(|v| v as f32),
            text: s.get("text").unwrap_or_default(),
            mask,
            frame: (
                s.get("frame-width").unwrap_or(0),
                s.get("frame-height").unwrap_or(0),
            ),
            active_prompts: s
                .get::<gst::Array>("active-prompts")
                .map(|a| a.iter().filter_map(|v| v.get::<String>().ok()).collect())
                .unwrap_or_default(),
            track_id: s.get("track-id").ok(),
            predicted: s.get("predicted").unwrap_or(false),
        })
    }

    /// The box in whole pixels of a `width` x `height` frame: (x, y, width, height),
    /// clamped to the frame.
    pub fn pixel_box(&self, width: u32, height: u32) -> (u32, u32, u32, u32) {
        let px = |v: f64, size: u32| (v.clamp(0.0, 1.0) * size as f64).round() as u32;
        let (x, y) = (px(self.x1, width), px(self.y1, height));
        (
            x,
            y,
            px(self.x2, width).saturating_sub(x),
            px(self.y2, height).saturating_sub(y),
        )
    }

    /// Attaches the region to a buffer of `width` x `height` pixels.
    pub fn attach(&self, buffer: &mut gst::BufferRef, width: u32, height: u32) {
        let (x, y, w, h) = self.pixel_box(width, height);
        let roi_type = if self.label.is_empty() {
            self.kind.as_str()
        } else {
            self.label.as_str()
        };
        let mut meta = gst_video::VideoRegionOfInterestMeta::add(buffer, roi_type, (x, y, w, h));
        meta.add_param(self.to_structure());
    }

    /// The regions of the boxes a tracker predicts for prompt `prompt_id` on a frame of
    /// `frame` pixels, while the prompts `active` are in force.
    pub fn predicted(
        prompt_id: &str,
        boxes: &[Predicted],
        frame: (u32, u32),
        active: &[String],
    ) -> Vec<Region> {
        boxes
            .iter()
            .map(|p| Region {
                prompt_id: prompt_id.to_string(),
                kind: ResultKind::Detections,
                label: p.label.clone(),
                x1: f64::from(p.box_norm.x1),
                y1: f64::from(p.box_norm.y1),
                x2: f64::from(p.box_norm.x2),
                y2: f64::from(p.box_norm.y2),
                score: p.score,
                text: String::new(),
                mask: None,
                frame,
                active_prompts: active.to_vec(),
                track_id: Some(p.track_id),
                predicted: true,
            })
            .collect()
    }

    /// Regions carried by a buffer's metas.
    pub fn from_buffer(buffer: &gst::BufferRef) -> Vec<Region> {
        buffer
            .iter_meta::<gst_video::VideoRegionOfInterestMeta>()
            .filter_map(|m| m.params().find_map(Region::from_structure))
            .collect()
    }
}
