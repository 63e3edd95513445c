//! What the plugin's pipeline tests share: the bundled demo model, and running a
//! pipeline to its end for the buffers its `appsink name=out` received.
use gst::prelude::*;
use std::path::PathBuf;

/// The bundled demo model.
pub fn demo_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo/paligemma2-demo-f16.gguf")
}

/// Runs the pipeline `desc` (with the plugin registered) until its `appsink name=out`
/// has seen the end of the stream, and returns every buffer it received.
pub fn sink_buffers(desc: &str) -> Vec<gst::Buffer> {
    gst::init().unwrap();
    gstpaligemma::plugin_register_static().unwrap();
    let pipeline = gst::parse::launch(desc)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
    let sink = pipeline
        .by_name("out")
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let buffers = std::iter::from_fn(|| sink.pull_sample().ok())
        .map(|s| s.buffer_owned().unwrap())
        .collect();
    pipeline.set_state(gst::State::Null).unwrap();
    buffers
}
