//! Structured results: the model's text parsed for its task (by [`crate::parse`]).
//! Detections carry boxes in pixels of the original frame; malformed outputs become
//! warnings with the raw text kept, never a panic.
/// Loc-bin convention: bins 0..=1023 encode round(v * 1023), so v = bin / 1023.
pub const DEFAULT_LOC_DIVISOR: f32 = 1023.0;

/// A box in pixels of the original frame.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PixelBox {
    /// Left edge in pixels (same as `x1`).
    pub x: f32,
    /// Top edge in pixels (same as `y1`).
    pub y: f32,
    /// Width in pixels (`x2 - x1`).
    pub w: f32,
    /// Height in pixels (`y2 - y1`).
    pub h: f32,
    /// Left edge in pixels.
    pub x1: f32,
    /// Top edge in pixels.
    pub y1: f32,
    /// Right edge in pixels.
    pub x2: f32,
    /// Bottom edge in pixels.
    pub y2: f32,
}

/// A box normalised to [0, 1] by the frame's width and height.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NormBox {
    /// Left edge, as a fraction of the frame's width.
    pub x1: f32,
    /// Top edge, as a fraction of the frame's height.
    pub y1: f32,
    /// Right edge, as a fraction of the frame's width.
    pub x2: f32,
    /// Bottom edge, as a fraction of the frame's height.
    pub y2: f32,
}

impl NormBox {
    /// The box in pixels of a `width` x `height` frame (not rounded).
    pub fn to_pixels(&self, width: usize, height: usize) -> PixelBox {
        let (w, h) = (width as f32, height as f32);
        let (x1, y1, x2, y2) = (self.x1 * w, self.y1 * h, self.x2 * w, self.y2 * h);
        PixelBox {
            x: x1,
            y: y1,
            w: x2 - x1,
            h: y2 - y1,
            x1,
            y1,
            x2,
            y2,
        }
    }
}

/// A binary mask over the pixels of an object's box.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Mask {
    /// Box size in pixels (box corners truncated to pixels).
    pub width: usize,
    /// Box height in pixels; the mask covers `width * height` pixels.
    pub height: usize,
    /// Offset of the mask's top-left pixel in the frame.
    pub x: usize,
    /// Row of the mask's top-left pixel in the frame (`x` is its column).
    pub y: usize,
    /// Row-major run lengths of alternating 0 and 1 pixels, starting with 0s.
    pub rle: Vec<u32>,
}

impl Mask {
    /// Run-length encodes a row-major bitmap of `width` x `height` pixels (true inside the
    /// object) whose top-left pixel is at (`x`, `y`) in the frame.
    pub fn from_bitmap(x: usize, y: usize, width: usize, height: usize, bits: &[bool]) -> Mask {
        let mut rle = Vec::new();
        let (mut current, mut run) = (false, 0u32);
        for &b in bits {
            if b != current {
                rle.push(run);
                current = b;
                run = 0;
            }
            run += 1;
        }
        rle.push(run);
        Mask {
            width,
            height,
            x,
            y,
            rle,
        }
    }

    /// Expands the run lengths into `width * height` row-major pixels, true inside the object.
    pub fn to_bitmap(&self) -> Vec<bool> {
        let mut bits = Vec::with_capacity(self.width * self.height);
        for (i, &run) in self.rle.iter().enumerate() {
            bits.extend(std::iter::repeat_n(i % 2 == 1, run as usize));
        }
        bits.resize(self.width * self.height, false);
        bits
    }
}

/// One detected (or segmented) object.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Detection {
    /// The object's name as the model wrote it after its loc (and seg) tokens.
    pub label: String,
    /// Box in pixels of the original frame (serialised as `box`).
    #[serde(rename = "box")]
    pub bbox: PixelBox,
    /// Box as fractions (0..1) of the frame's width and height.
    pub box_norm: NormBox,
    /// The loc bins as the model wrote them (y1, x1, y2, x2), and their divisor.
    #[serde(skip)]
    pub loc_bins: [u32; 4],
    /// What the loc bins were divided by (see [`DEFAULT_LOC_DIVISOR`]).
    #[serde(skip)]
    pub loc_divisor: f32,
    /// The 16 `<segNNN>` codes, when the output had them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seg_codes: Option<Vec<u32>>,
    /// The object's mask, when the seg codes were decoded (segmentation with a model file
    /// that has the mask decoder) and the box covers at least one pixel.
    pub mask: Option<Mask>,
    /// Confidence in 0..1: the model's probability that the box is right (IoU >= 0.5)
    /// and the label too, worked out from its distributions over the location bins and
    /// its label tokens ([`crate::confidence`]); filled in by [`crate::Model::answer`],
    /// none when parsed from text alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// The lowest probability the model gave one of the object's tokens (its loc, seg
    /// and label tokens): the engine's first score, which ranks boxes but is small even
    /// for right ones (each loc token spreads its probability over neighbouring bins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_token_prob: Option<f32>,
    /// The object's identity over time: the same id in the results of later frames is
    /// the same object (set by `paligemma-stream`'s tracker; none from the engine alone
    /// and for an object not confirmed yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_id: Option<u64>,
    /// Which `;`-separated object of the output this is (0-based).
    #[serde(skip)]
    pub object: usize,
}

/// How many detections a [`crate::DetectionFilter`] dropped from one result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dropped {
    /// Scored below `min_score`.
    pub below_min_score: usize,
    /// Suppressed as duplicates of a better-scoring box of the same label.
    pub duplicates: usize,
}

impl Dropped {
    /// Whether nothing was dropped (the field is then left out of serialised results).
    pub fn is_none(&self) -> bool {
        *self == Dropped::default()
    }

    /// Both counts.
    pub fn total(&self) -> usize {
        self.below_min_score + self.duplicates
    }
}

/// The parsed answer to a task.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TaskResult {
    /// The answer to [`crate::Task::Caption`] or [`crate::Task::Describe`].
    Caption {
        /// The generated text, trimmed.
        text: String,
    },
    /// The answer to [`crate::Task::Answer`] (a question about the image).
    Answer {
        /// The generated text, trimmed.
        text: String,
    },
    /// The answer to [`crate::Task::Ocr`]: the text read in the image.
    Ocr {
        /// The generated text, trimmed.
        text: String,
    },
    /// The answer to [`crate::Task::Question`] or to a free-text [`crate::Task::Text`] prompt.
    Text {
        /// The generated text, trimmed.
        text: String,
    },
    /// The answer to [`crate::Task::Detect`]: one box per object found.
    Detections {
        /// The objects with a box, in the order the model wrote them.
        detections: Vec<Detection>,
        /// What was wrong in the model's output (an object without a box or label, the wrong
        /// number of loc tokens, swapped corners...), one message each.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        warnings: Vec<String>,
        /// What [`crate::DetectionFilter`] dropped (absent when nothing).
        #[serde(default, skip_serializing_if = "Dropped::is_none")]
        dropped: Dropped,
    },
    /// The answer to [`crate::Task::Segment`]: boxes with a mask each when the model file has the
    /// mask decoder.
    Segmentation {
        /// The objects with a box, in the order the model wrote them.
        detections: Vec<Detection>,
        /// What was wrong in the model's output (missing or extra seg tokens, an object without a
        /// box...) or why no mask could be decoded, one message each.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        warnings: Vec<String>,
        /// What [`crate::DetectionFilter`] dropped (absent when nothing).
        #[serde(default, skip_serializing_if = "Dropped::is_none")]
        dropped: Dropped,
    },
    /// A task that failed. [`Model::answer`](crate::Model::answer) returns an error instead;
    /// this is for callers that report a failure in place of a result (as `paligemma-stream`
    /// does).
    Error {
        /// What went wrong.
        message: String,
    },
}

impl TaskResult {
    /// Which kind of result this is.
    pub fn kind(&self) -> ResultKind {
        match self {
            TaskResult::Caption { .. } => ResultKind::Caption,
            TaskResult::Answer { .. } => ResultKind::Answer,
            TaskResult::Ocr { .. } => ResultKind::Ocr,
            TaskResult::Text { .. } => ResultKind::Text,
            TaskResult::Detections { .. } => ResultKind::Detections,
            TaskResult::Segmentation { .. } => ResultKind::Segmentation,
            TaskResult::Error { .. } => ResultKind::Error,
        }
    }

    /// The text of a caption, answer, OCR or free-text result, or an error's message.
    pub fn text(&self) -> Option<&str> {
        match self {
            TaskResult::Caption { text }
            | TaskResult::Answer { text }
            | TaskResult::Ocr { text }
            | TaskResult::Text { text } => Some(text),
            TaskResult::Error { message } => Some(message),
            TaskResult::Detections { .. } | TaskResult::Segmentation { .. } => None,
        }
    }

    /// The objects of a detection or segmentation result; empty for the other kinds.
    pub fn detections(&self) -> &[Detection] {
        match self {
            TaskResult::Detections { detections, .. }
            | TaskResult::Segmentation { detections, .. } => detections,
            _ => &[],
        }
    }

    /// What the detection filter dropped from a detection or segmentation result;
    /// nothing for the other kinds.
    pub fn dropped(&self) -> Dropped {
        match self {
            TaskResult::Detections { dropped, .. } | TaskResult::Segmentation { dropped, .. } => {
                *dropped
            }
            _ => Dropped::default(),
        }
    }
}

/// The kind of a [`TaskResult`], as its `kind` field is written (`"detections"`...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultKind {
    /// A [`TaskResult::Caption`].
    Caption,
    /// A [`TaskResult::Answer`].
    Answer,
    /// A [`TaskResult::Ocr`].
    Ocr,
    /// A [`TaskResult::Text`].
    Text,
    /// A [`TaskResult::Detections`].
    Detections,
    /// A [`TaskResult::Segmentation`].
    Segmentation,
    /// A [`TaskResult::Error`].
    Error,
}

impl ResultKind {
    const ALL: [ResultKind; 7] = [
        ResultKind::Caption,
        ResultKind::Answer,
        ResultKind::Ocr,
        ResultKind::Text,
        ResultKind::Detections,
        ResultKind::Segmentation,
        ResultKind::Error,
    ];

    /// The name as a serialised result's `kind` field writes it (`caption`, `detections`...).
    pub fn as_str(self) -> &'static str {
        match self {
            ResultKind::Caption => "caption",
            ResultKind::Answer => "answer",
            ResultKind::Ocr => "ocr",
            ResultKind::Text => "text",
            ResultKind::Detections => "detections",
            ResultKind::Segmentation => "segmentation",
            ResultKind::Error => "error",
        }
    }

    /// Whether results of this kind carry boxes.
    pub fn has_boxes(self) -> bool {
        matches!(self, ResultKind::Detections | ResultKind::Segmentation)
    }
}

impl std::str::FromStr for ResultKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<ResultKind> {
        ResultKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| crate::Error::Invalid(format!("unknown result kind {s:?}")))
    }
}

impl std::fmt::Display for ResultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
