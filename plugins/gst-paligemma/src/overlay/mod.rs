//! The `paligemmaoverlay` element: draws the newest PaliGemma results (boxes,
//! labels, masks, captions) carried by `paligemma`'s region-of-interest metas.
use gst::glib;
use gst::prelude::*;

mod draw;
mod imp;

glib::wrapper! {
    pub struct PaliGemmaOverlay(ObjectSubclass<imp::PaliGemmaOverlay>) @extends gst_base::BaseTransform, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "paligemmaoverlay",
        gst::Rank::NONE,
        PaliGemmaOverlay::static_type(),
    )
}
