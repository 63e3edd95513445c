//! The `paligemma` element: PaliGemma on sampled frames of a passing video stream.
//!
//! ```text
//! gst-launch-1.0 v4l2src ! videoconvert ! paligemma model=pg2.gguf prompts="caption en|detect person ; car" \
//!     ! paligemmaoverlay ! videoconvert ! autovideosink
//! ```
use gst::glib;
use gst::prelude::*;

mod imp;

/// `async`: never block the stream, results arrive later (live sources);
/// `sync`: a sampled frame waits for its own results (files).
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstPaliGemmaMode")]
pub enum Mode {
    #[default]
    #[enum_value(name = "Async: never block, results are attached to a later frame", nick = "async")]
    Async = 0,
    #[enum_value(name = "Sync: a sampled frame waits for its results", nick = "sync")]
    Sync = 1,
}

glib::wrapper! {
    pub struct PaliGemma(ObjectSubclass<imp::PaliGemma>) @extends gst_base::BaseTransform, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    Mode::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    gst::Element::register(Some(plugin), "paligemma", gst::Rank::NONE, PaliGemma::static_type())
}
