//! GStreamer plugin `paligemma`:
//!
//! - `paligemma`: video passes through untouched while a worker thread samples
//!   frames, answers standing prompts and attaches the results as
//!   `GstVideoRegionOfInterestMeta` (and, with the `analytics` feature,
//!   `GstAnalyticsRelationMeta`), bus messages and text buffers.
//! - `paligemmaoverlay`: draws the newest results (boxes, labels, masks, captions).
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
