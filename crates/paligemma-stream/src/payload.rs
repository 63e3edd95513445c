//! Bytes from the network turned into frames and prompts: a frame payload (an
//! encoded image, a `PGRF` raw frame, or raw pixels described by a JSON attachment),
//! an `ask` payload, a standing-prompts update. Each is bounded and checked before
//! anything is allocated from it; every malformed input is an error, never a panic.
use crate::prompts::{DEFAULT_MAX_TOKENS, PromptSet, StandingPrompt};
use crate::{Error, Result};
use paligemma::Task;
use paligemma::preprocess::{PixelFormat, RgbImage, check_size};

/// Raw frame header: `PGRF`, then width, height and stride as little-endian u32,
/// then packed RGB rows.
pub const RAW_MAGIC: &[u8; 4] = b"PGRF";
pub const RAW_HEADER: usize = 16;

/// Description of a raw frame carried in a sample's attachment (JSON).
#[derive(serde::Deserialize)]
struct RawAttachment {
    width: usize,
    height: usize,
    stride: Option<usize>,
    #[serde(default = "rgb8")]
    format: String,
}

fn rgb8() -> String {
    "rgb8".into()
}

fn frame_err(detail: impl std::fmt::Display) -> Error {
    Error::Frame(detail.to_string())
}

/// Decodes a frame payload of at most `max_pixels`: raw pixels described by a JSON
/// attachment, a `PGRF` raw frame, or an encoded image (PNG, JPEG), whose size is
/// checked from its header before decoding.
pub fn decode_frame(
    payload: &[u8],
    attachment: Option<&[u8]>,
    max_pixels: usize,
) -> Result<RgbImage> {
    if let Some(raw) = attachment.and_then(|a| serde_json::from_slice::<RawAttachment>(a).ok()) {
        let format = match raw.format.to_ascii_lowercase().as_str() {
            "rgb8" | "rgb" => PixelFormat::Rgb,
            "bgr8" | "bgr" => PixelFormat::Bgr,
            "rgba8" | "rgba" => PixelFormat::Rgba,
            "bgra8" | "bgra" => PixelFormat::Bgra,
            other => {
                return Err(frame_err(format!(
                    "raw frame format {other:?} (expected rgb8, bgr8, rgba8 or bgra8)"
                )));
            }
        };
        check_size(raw.width, raw.height, max_pixels)?;
        let stride = raw.stride.unwrap_or(raw.width * format.bytes_per_pixel());
        return Ok(RgbImage::from_raw(
            payload, raw.width, raw.height, stride, format,
        )?);
    }
    if payload.len() >= RAW_HEADER && &payload[..4] == RAW_MAGIC {
        let u = |i: usize| {
            u32::from_le_bytes([payload[i], payload[i + 1], payload[i + 2], payload[i + 3]])
                as usize
        };
        let (w, h, stride) = (u(4), u(8), u(12));
        check_size(w, h, max_pixels).map_err(|e| frame_err(format!("raw PGRF frame: {e}")))?;
        return RgbImage::from_raw(&payload[RAW_HEADER..], w, h, stride, PixelFormat::Rgb)
            .map_err(|e| frame_err(format!("raw PGRF frame: {e}")));
    }
    Ok(RgbImage::decode_limited(payload, max_pixels)?)
}

/// An ask in its JSON form.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonAsk {
    prompt: String,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    min_score: Option<f32>,
    #[serde(default)]
    duplicate_iou: Option<f32>,
}

/// Parses an `ask` payload of at most `max_bytes`: plain text, or JSON
/// `{"prompt": ..., "max_tokens": ..., "min_score": ..., "duplicate_iou": ...}`.
pub fn parse_ask(payload: &[u8], max_bytes: usize) -> Result<StandingPrompt> {
    let bad = |detail: String| Error::Prompts(detail);
    if payload.len() > max_bytes {
        return Err(bad(format!(
            "prompt of {} bytes is longer than {max_bytes}",
            payload.len()
        )));
    }
    let text = std::str::from_utf8(payload)
        .map_err(|_| bad("prompt is not UTF-8".into()))?
        .trim();
    let ask = if text.starts_with('{') {
        serde_json::from_str::<JsonAsk>(text).map_err(|e| bad(format!("JSON ask: {e}")))?
    } else {
        JsonAsk {
            prompt: text.to_string(),
            max_tokens: None,
            min_score: None,
            duplicate_iou: None,
        }
    };
    let task = Task::parse(&ask.prompt)?;
    let p = StandingPrompt {
        max_tokens: ask.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        min_score: ask.min_score,
        duplicate_iou: ask.duplicate_iou,
        ..StandingPrompt::new(crate::prompts::ASK_ID, task)
    };
    p.validate()?;
    Ok(p)
}

/// Parses a standing-prompts update: TOML (`[[prompt]]`) or JSON.
pub fn parse_prompts(payload: &[u8]) -> Result<PromptSet> {
    let text =
        std::str::from_utf8(payload).map_err(|_| Error::Prompts("prompts are not UTF-8".into()))?;
    let start = text.trim_start();
    if start.starts_with(['[', '{']) && !start.starts_with("[[") {
        PromptSet::from_json(text)
    } else {
        PromptSet::from_toml(text)
    }
}
