//! Frame sources: a GStreamer pipeline ending in an appsink (frames published on a
//! Zenoh key are decoded by `paligemma_stream::payload`).
use anyhow::{Context, Result, anyhow, bail};
use gst::prelude::*;
use paligemma::preprocess::{PixelFormat, RgbImage};

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
        bus.set_sync_handler(move |_, msg| {
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
