//! GStreamer plugin `paligemma`:
//!
//! - `paligemma`: video passes through untouched; the element hands frames to a stream
//!   of a shared engine (`paligemma_stream`), whose threads answer the standing prompts
//!   on sampled frames; the results come back as `GstVideoRegionOfInterestMeta` (and,
//!   with the `analytics` feature, `GstAnalyticsRelationMeta`), bus messages and text
//!   buffers, with tracked boxes predicted on the frames between two answers.
//! - `paligemmaoverlay`: draws the newest results (boxes, labels and track ids, masks,
//!   captions).
use gst::glib;

#[cfg(feature = "analytics")]
pub mod analytics_meta;
mod overlay;
mod paligemma;
pub mod result_meta;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    paligemma::register(plugin)?;
    overlay::register(plugin)?;
    Ok(())
}

gst::plugin_define!(
    paligemma,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MIT/X11",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY"),
    env!("BUILD_REL_DATE")
);
