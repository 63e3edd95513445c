//! Frame sources: a GStreamer pipeline ending in an appsink, or frames published
//! on a Zenoh key (JPEG, PNG, or raw RGB with a small header or an attachment).
use anyhow::{Context, Result, anyhow, bail};
use gst::prelude::*;
use paligemma::preprocess::{PixelFormat, RgbImage};
use std::time::{SystemTime, UNIX_EPOCH};

/// Raw frame header: `PGRF`, then width, height and stride as little-endian u32,
/// then packed RGB rows.
pub const RAW_MAGIC: &[u8; 4] = b"PGRF";
pub const RAW_HEADER: usize = 16;

pub fn unix_ns() -> Option<u64> {
    SystemTime::now().duration_since(UNIX_EPOCH).ok().map(|d| d.as_nanos() as u64)
}

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

/// Decodes a frame payload: an encoded image, a `PGRF` raw frame, or raw pixels
/// described by a JSON attachment.
pub fn decode_payload(payload: &[u8], attachment: Option<&[u8]>) -> Result<RgbImage> {
    if let Some(att) = attachment {
        if let Ok(raw) = serde_json::from_slice::<RawAttachment>(att) {
            let format = match raw.format.to_ascii_lowercase().as_str() {
                "rgb8" | "rgb" => PixelFormat::Rgb,
                "bgr8" | "bgr" => PixelFormat::Bgr,
                "rgba8" | "rgba" => PixelFormat::Rgba,
                "bgra8" | "bgra" => PixelFormat::Bgra,
                other => bail!("raw frame format {other:?} (expected rgb8, bgr8, rgba8 or bgra8)"),
            };
            let stride = raw.stride.unwrap_or(raw.width * format.bytes_per_pixel());
            return Ok(RgbImage::from_raw(payload, raw.width, raw.height, stride, format)?);
        }
    }
    if payload.len() >= RAW_HEADER && &payload[..4] == RAW_MAGIC {
        let u = |i: usize| u32::from_le_bytes(payload[i..i + 4].try_into().unwrap()) as usize;
        let (w, h, stride) = (u(4), u(8), u(12));
        return RgbImage::from_raw(&payload[RAW_HEADER..], w, h, stride, PixelFormat::Rgb).context("raw PGRF frame");
    }
    Ok(RgbImage::decode(payload)?)
}

/// A GStreamer pipeline feeding frames to a callback from its streaming thread.
pub struct GstSource {
    pipeline: gst::Pipeline,
}

impl GstSource {
    /// Builds the pipeline: `pipeline` as given (an appsink named `sink` is added
    /// when it has none) or `uridecodebin` for a URI.
    pub fn start(
        pipeline: Option<&str>,
        uri: Option<&str>,
        on_frame: impl Fn(RgbImage, Option<u64>) + Send + 'static,
        on_error: impl Fn(String) + Send + Sync + 'static,
    ) -> Result<GstSource> {
        const TAIL: &str = "videoconvert ! video/x-raw,format=RGB ! appsink name=sink";
        let desc = match (pipeline, uri) {
            (Some(p), _) if p.contains("appsink") => p.to_string(),
            (Some(p), _) => format!("{p} ! {TAIL}"),
            (None, Some(u)) => format!("uridecodebin uri={u} ! {TAIL}"),
            (None, None) => bail!("no pipeline or uri"),
        };
        let pipeline = gst::parse::launch(&desc)
            .with_context(|| format!("invalid pipeline {desc:?}"))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| anyhow!("{desc:?} is not a pipeline"))?;
        let sink = pipeline
            .by_name("sink")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .ok_or_else(|| anyhow!("pipeline {desc:?} has no appsink named sink"))?;
        // Newest frame wins already at the sink: never queue old frames.
        sink.set_max_buffers(1);
        sink.set_drop(true);
        sink.set_sync(false);
        sink.set_caps(Some(&gst_video::VideoCapsBuilder::new().format(gst_video::VideoFormat::Rgb).build()));
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let (Some(buffer), Some(caps)) = (sample.buffer(), sample.caps()) else {
                        return Ok(gst::FlowSuccess::Ok);
                    };
                    let Ok(info) = gst_video::VideoInfo::from_caps(caps) else {
                        return Ok(gst::FlowSuccess::Ok);
                    };
                    let Ok(map) = buffer.map_readable() else {
                        return Ok(gst::FlowSuccess::Ok);
                    };
                    let stride = info.stride()[0] as usize;
                    if let Ok(img) = RgbImage::from_raw(&map, info.width() as usize, info.height() as usize, stride, PixelFormat::Rgb) {
                        on_frame(img, buffer.pts().map(|p| p.nseconds()));
                    }
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        let bus = pipeline.bus().context("pipeline without a bus")?;
        let on_error = std::sync::Arc::new(on_error);
        let handler = on_error.clone();
        let _ = bus.set_sync_handler(move |_, msg| {
            if let gst::MessageView::Error(e) = msg.view() {
                handler(format!("frame source: {} ({:?})", e.error(), e.debug()));
            }
            gst::BusSyncReply::Pass
        });
        pipeline.set_state(gst::State::Playing).with_context(|| format!("cannot start {desc:?}"))?;
        Ok(GstSource { pipeline })
    }

    pub fn stop(&self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

impl Drop for GstSource {
    fn drop(&mut self) {
        self.stop();
    }
}
