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
    #[enum_value(
        name = "Async: never block, results are attached to a later frame",
        nick = "async"
    )]
    Async = 0,
    #[enum_value(name = "Sync: a sampled frame waits for its results", nick = "sync")]
    Sync = 1,
}

/// Which metas carry the results on buffers (with `attach-meta`).
#[derive(Debug, Eq, PartialEq, Hash, Clone, Copy, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstPaliGemmaMetaKind")]
pub enum MetaKind {
    /// `GstVideoRegionOfInterestMeta` with a `paligemma/result` structure per object,
    /// caption or answer (masks and texts included), for any GStreamer version.
    #[enum_value(
        name = "Region of interest: GstVideoRegionOfInterestMeta with paligemma/result parameters",
        nick = "roi"
    )]
    Roi = 0,
    /// `GstAnalyticsRelationMeta` (GStreamer >= 1.24): object-detection entries grouped
    /// by prompt (see `analytics_meta`).
    #[cfg(feature = "analytics")]
    #[enum_value(
        name = "Analytics: GstAnalyticsRelationMeta with object-detection entries",
        nick = "analytics"
    )]
    Analytics = 1,
    /// Both of them.
    #[cfg(feature = "analytics")]
    #[enum_value(
        name = "Both the region-of-interest and the analytics metas",
        nick = "both"
    )]
    Both = 2,
}

impl Default for MetaKind {
    /// Both where the analytics meta is built in: the ROI meta still carries what the
    /// analytics one cannot (masks, texts) to `paligemmaoverlay` and older readers.
    fn default() -> Self {
        #[cfg(feature = "analytics")]
        return MetaKind::Both;
        #[cfg(not(feature = "analytics"))]
        return MetaKind::Roi;
    }
}

impl MetaKind {
    pub fn roi(self) -> bool {
        #[cfg(feature = "analytics")]
        if self == MetaKind::Analytics {
            return false;
        }
        true
    }

    pub fn analytics(self) -> bool {
        self != MetaKind::Roi
    }
}

glib::wrapper! {
    pub struct PaliGemma(ObjectSubclass<imp::PaliGemma>) @extends gst_base::BaseTransform, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    Mode::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    MetaKind::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    gst::Element::register(
        Some(plugin),
        "paligemma",
        gst::Rank::NONE,
        PaliGemma::static_type(),
    )
}
