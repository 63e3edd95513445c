//! Frame sources: a GStreamer pipeline ending in an appsink (frames published on a
//! Zenoh key are decoded by `paligemma_stream::payload`). `source.rs` supervises them.
use anyhow::{Context, Result, anyhow, bail};
use gst::prelude::*;
use paligemma::preprocess::{PixelFormat, RgbImage};
use std::sync::Arc;

/// What a pipeline's bus says that ends its stream.
#[derive(Debug)]
pub enum BusEvent {
    Eos,
    Error(String),
}

/// Where a GStreamer source's frames go.
pub type FrameSink = Arc<dyn Fn(RgbImage, Option<u64>) + Send + Sync>;

/// A GStreamer pipeline feeding frames to a callback from its streaming thread.
pub struct GstSource {
    pipeline: gst::Pipeline,
}

/// The pipeline description of a camera: `pipeline` as given (an appsink named `sink`
/// is added when it has none) or `uridecodebin` for a URI.
fn description(pipeline: Option<&str>, uri: Option<&str>) -> Result<String> {
    const TAIL: &str = "videoconvert ! video/x-raw,format=RGB ! appsink name=sink";
    Ok(match (pipeline, uri) {
        (Some(p), _) if p.contains("appsink") => p.to_string(),
        (Some(p), _) => format!("{p} ! {TAIL}"),
        (None, Some(u)) => format!("uridecodebin uri={u} ! {TAIL}"),
        (None, None) => bail!("no pipeline or uri"),
    })
}

fn parse(desc: &str) -> Result<gst::Pipeline> {
    gst::parse::launch(desc)
        .with_context(|| format!("invalid pipeline {desc:?}"))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow!("{desc:?} is not a pipeline"))
}

/// Whether the camera's pipeline can be built at all: a description that does not parse
/// (or names elements that are not installed) is a configuration error, not a fault to
/// ride out.
pub fn check(pipeline: Option<&str>, uri: Option<&str>) -> Result<()> {
    parse(&description(pipeline, uri)?).map(drop)
}

impl GstSource {
    /// Builds the pipeline and sets it playing; `on_bus` hears of its end (EOS or an
    /// error), once.
    pub fn start(
        pipeline: Option<&str>,
        uri: Option<&str>,
        on_frame: FrameSink,
        on_bus: impl Fn(BusEvent) + Send + Sync + 'static,
    ) -> Result<GstSource> {
        let desc = description(pipeline, uri)?;
        let pipeline = parse(&desc)?;
        let sink = pipeline
            .by_name("sink")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .ok_or_else(|| anyhow!("pipeline {desc:?} has no appsink named sink"))?;
        // Newest frame wins already at the sink: never queue old frames.
        sink.set_max_buffers(1);
        sink.set_drop(true);
        sink.set_sync(false);
        sink.set_caps(Some(
            &gst_video::VideoCapsBuilder::new()
                .format(gst_video::VideoFormat::Rgb)
                .build(),
        ));
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
                    if let Ok(img) = RgbImage::from_raw(
                        &map,
                        info.width() as usize,
                        info.height() as usize,
                        stride,
                        PixelFormat::Rgb,
                    ) {
                        on_frame(img, buffer.pts().map(|p| p.nseconds()));
                    }
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        let bus = pipeline.bus().context("pipeline without a bus")?;
        let ended = std::sync::atomic::AtomicBool::new(false);
        // Nothing pops the bus: every message is handled here and dropped.
        bus.set_sync_handler(move |_, msg| {
            let event = match msg.view() {
                gst::MessageView::Eos(_) => Some(BusEvent::Eos),
                gst::MessageView::Error(e) => Some(BusEvent::Error(format!(
                    "{} ({})",
                    e.error(),
                    e.debug().as_deref().unwrap_or("no details")
                ))),
                _ => None,
            };
            if let Some(event) =
                event.filter(|_| !ended.swap(true, std::sync::atomic::Ordering::SeqCst))
            {
                on_bus(event);
            }
            gst::BusSyncReply::Drop
        });
        if let Err(e) = pipeline.set_state(gst::State::Playing) {
            let _ = pipeline.set_state(gst::State::Null);
            bail!("cannot start the pipeline: {e}");
        }
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
