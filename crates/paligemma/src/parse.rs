//! The model's text parsed for its task: detections and segmentations from their
//! `<locNNNN>` and `<segNNN>` tokens and labels, everything else as trimmed text.
//! Whatever the model wrote, the result is a value with warnings, never a panic.
use crate::output::{DEFAULT_LOC_DIVISOR, Detection, Dropped, NormBox, TaskResult};
use crate::task::Task;

/// One piece of model output: a `<locNNNN>` or `<segNNN>` token, or plain text.
#[derive(Debug, PartialEq)]
enum Piece<'a> {
    Loc(u32),
    Seg(u32),
    Text(&'a str),
}

/// Splits text into loc/seg tokens and the text between them.
fn pieces(s: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = s;
    let mut text_start = 0usize;
    let mut offset = 0usize;
    while let Some(i) = rest.find('<') {
        let at = &rest[i..];
        let token = parse_token(at);
        match token {
            Some((piece, len)) => {
                let text = &s[text_start..offset + i];
                if !text.is_empty() {
                    out.push(Piece::Text(text));
                }
                out.push(piece);
                offset += i + len;
                rest = &s[offset..];
                text_start = offset;
            }
            None => {
                offset += i + 1;
                rest = &s[offset..];
            }
        }
    }
    if text_start < s.len() {
        out.push(Piece::Text(&s[text_start..]));
    }
    out
}

fn parse_token(at: &str) -> Option<(Piece<'static>, usize)> {
    let digits = |prefix: &str, n: usize| -> Option<u32> {
        let body = at.strip_prefix(prefix)?;
        let num = body.get(..n)?;
        if !num.bytes().all(|b| b.is_ascii_digit()) || body.as_bytes().get(n) != Some(&b'>') {
            return None;
        }
        num.parse().ok()
    };
    if let Some(v) = digits("<loc", 4) {
        return Some((Piece::Loc(v), 9));
    }
    digits("<seg", 3).map(|v| (Piece::Seg(v), 8))
}

/// Parses detection / segmentation output: objects separated by `;`, each four
/// loc tokens (y1 x1 y2 x2), optional sixteen seg tokens, then the label.
pub fn parse_detections(
    raw: &str,
    width: usize,
    height: usize,
    divisor: f32,
    segmentation: bool,
) -> TaskResult {
    let mut detections = Vec::new();
    let mut warnings = Vec::new();
    let divisor = if divisor > 0.0 && divisor.is_finite() {
        divisor
    } else {
        DEFAULT_LOC_DIVISOR
    };
    for (n, object) in raw.split(';').enumerate() {
        let object = object.trim();
        if object.is_empty() {
            continue;
        }
        let mut locs = Vec::new();
        let mut segs = Vec::new();
        let mut label = String::new();
        let mut out_of_place = false;
        for piece in pieces(object) {
            match piece {
                Piece::Loc(v) if label.is_empty() && segs.is_empty() => locs.push(v),
                Piece::Seg(v) if label.is_empty() => segs.push(v),
                Piece::Text(t) => {
                    if !label.is_empty() {
                        label.push(' ');
                    }
                    label.push_str(t.trim());
                }
                _ => out_of_place = true,
            }
        }
        let label = label.trim().to_string();
        if out_of_place {
            warnings.push(format!(
                "object {}: loc/seg tokens after its label in {object:?}",
                n + 1
            ));
        }
        if locs.len() != 4 {
            if locs.is_empty() {
                warnings.push(format!(
                    "object {}: label {label:?} with no box in {object:?}",
                    n + 1
                ));
            } else {
                warnings.push(format!(
                    "object {}: {} loc tokens (expected 4) in {object:?}",
                    n + 1,
                    locs.len()
                ));
            }
            continue;
        }
        let v = |bin: u32| (bin as f32 / divisor).clamp(0.0, 1.0);
        let (mut y1, mut x1, mut y2, mut x2) = (v(locs[0]), v(locs[1]), v(locs[2]), v(locs[3]));
        let mut loc_bins = [locs[0], locs[1], locs[2], locs[3]];
        if y2 < y1 || x2 < x1 {
            loc_bins = [
                locs[0].min(locs[2]),
                locs[1].min(locs[3]),
                locs[0].max(locs[2]),
                locs[1].max(locs[3]),
            ];
            warnings.push(format!(
                "object {}: corners out of order in {object:?} (swapped)",
                n + 1
            ));
            if y2 < y1 {
                std::mem::swap(&mut y1, &mut y2);
            }
            if x2 < x1 {
                std::mem::swap(&mut x1, &mut x2);
            }
        }
        if label.is_empty() {
            warnings.push(format!(
                "object {}: box without a label in {object:?}",
                n + 1
            ));
        }
        let seg_codes = match (segmentation, segs.len()) {
            (_, 0) => {
                if segmentation {
                    warnings.push(format!(
                        "object {}: no seg tokens (expected 16) in {object:?}",
                        n + 1
                    ));
                }
                None
            }
            (_, 16) => Some(segs),
            (_, k) => {
                warnings.push(format!(
                    "object {}: {k} seg tokens (expected 16) in {object:?}",
                    n + 1
                ));
                None
            }
        };
        let box_norm = NormBox { x1, y1, x2, y2 };
        let bbox = box_norm.to_pixels(width, height);
        detections.push(Detection {
            label,
            bbox,
            box_norm,
            loc_bins,
            loc_divisor: divisor,
            seg_codes,
            mask: None,
            score: None,
            min_token_prob: None,
            track_id: None,
            object: n,
        });
    }
    let dropped = Dropped::default();
    if segmentation {
        TaskResult::Segmentation {
            detections,
            warnings,
            dropped,
        }
    } else {
        TaskResult::Detections {
            detections,
            warnings,
            dropped,
        }
    }
}

/// Parses the model's text for `task` on a frame of `width` x `height` pixels.
/// Segmentation masks are filled in separately by the decoder.
pub fn parse(task: &Task, raw: &str, width: usize, height: usize, divisor: f32) -> TaskResult {
    let text = raw.trim().to_string();
    match task {
        Task::Caption { .. } | Task::Describe { .. } => TaskResult::Caption { text },
        Task::Answer { .. } => TaskResult::Answer { text },
        Task::Ocr => TaskResult::Ocr { text },
        Task::Question { .. } | Task::Text { .. } => TaskResult::Text { text },
        Task::Detect { .. } => parse_detections(raw, width, height, divisor, false),
        Task::Segment { .. } => parse_detections(raw, width, height, divisor, true),
    }
}
