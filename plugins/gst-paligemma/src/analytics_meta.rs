//! Results as GStreamer analytics metadata (`GstAnalyticsRelationMeta`, GStreamer >= 1.24):
//! the form that `objectdetectionoverlay`, `relationmeta2onvifmeta` and the other
//! analytics elements read. One relation meta per buffer holds, for each detect or
//! segment prompt answered on the frame:
//!
//! - an object-detection entry per object: the label as its type, the box in pixels of
//!   the buffer, the engine's detection confidence (0 when it has none);
//! - a classification entry whose one class is the prompt id, with confidence 1: it
//!   CONTAINs the prompt's objects and each IS_PART_OF it, so that a consumer can tell
//!   prompts apart (and sees that a prompt ran even when it found nothing).
//!
//! - a tracking entry per tracked object (`GstAnalyticsTrackingMtd`, its track id), related
//!   to the object's entry both ways (RELATE_TO), as `bytetracker`-style trackers do. Its
//!   first- and last-seen times are the analysed frame's timestamp: the result message
//!   does not carry when the track began.
//!
//! Captions, answers and OCR add no entry. A class is a GQuark, which lives as long as
//! the process, so free text that changes with every frame would leak a quark per
//! answer; their text stays on the ROI meta, the bus messages and the text pad. Masks
//! neither: GStreamer 1.26's segmentation entry has no binding in gstreamer-analytics
//! 0.25, so they too stay on the ROI meta.
use crate::result_meta::{self, Region};
use gst::glib;
use gst_analytics::prelude::*;
use gst_analytics::{
    AnalyticsClassificationMtd, AnalyticsODMtd, AnalyticsRelationMeta, AnalyticsTrackingMtd,
    RelTypes,
};
use paligemma::ResultKind;
use paligemma_stream::ResultMessage;

/// Adds the entries of one result (nothing unless it is a detection or segmentation)
/// to the buffer's relation meta, adding the meta if the buffer has none yet.
pub fn attach(
    buffer: &mut gst::BufferRef,
    msg: &ResultMessage,
    width: u32,
    height: u32,
) -> Result<(), glib::BoolError> {
    if !msg.result.kind().has_boxes() {
        return Ok(());
    }
    if buffer.meta::<AnalyticsRelationMeta>().is_none() {
        AnalyticsRelationMeta::add(buffer);
    }
    let mut meta = buffer
        .meta_mut::<AnalyticsRelationMeta>()
        .expect("added above");
    let prompt = meta
        .add_one_cls_mtd(1.0, glib::Quark::from_str(&msg.prompt.id))?
        .id();
    // The same boxes, in the same whole pixels, as the ROI metas.
    for r in result_meta::regions(msg, &[]) {
        let (x, y, w, h) = r.pixel_box(width, height);
        let object = meta
            .add_od_mtd(
                glib::Quark::from_str(&r.label),
                x as i32,
                y as i32,
                w as i32,
                h as i32,
                r.score.unwrap_or(0.0),
            )?
            .id();
        meta.set_relation(RelTypes::CONTAIN, prompt, object)?;
        meta.set_relation(RelTypes::IS_PART_OF, object, prompt)?;
        if let Some(track_id) = r.track_id {
            let seen = gst::ClockTime::from_nseconds(msg.frame.pts_ns.unwrap_or(0));
            let track = meta.add_tracking_mtd(track_id, seen)?.id();
            meta.set_relation(RelTypes::RELATE_TO, object, track)?;
            meta.set_relation(RelTypes::RELATE_TO, track, object)?;
        }
    }
    Ok(())
}

/// The objects of a buffer's relation meta as regions of a `width` x `height` frame,
/// whoever attached them: the prompt id is the class of the classification entry an
/// object is part of (empty for another element's objects), the track id that of a
/// tracking entry it relates to.
pub fn regions(buffer: &gst::BufferRef, width: u32, height: u32) -> Vec<Region> {
    let Some(meta) = buffer.meta::<AnalyticsRelationMeta>() else {
        return Vec::new();
    };
    let (w, h) = (f64::from(width.max(1)), f64::from(height.max(1)));
    meta.iter::<AnalyticsODMtd>()
        .filter_map(|od| {
            let loc = od.location().ok()?;
            let prompt_id = meta
                .iter_direct_related::<AnalyticsClassificationMtd>(od.id(), RelTypes::IS_PART_OF)
                .find(|c| !c.is_empty())
                .map(|c| c.quark(0).as_str().to_string())
                .unwrap_or_default();
            Some(Region {
                prompt_id,
                kind: ResultKind::Detections,
                label: od
                    .obj_type()
                    .map(|q| q.as_str().to_string())
                    .unwrap_or_default(),
                x1: f64::from(loc.x) / w,
                y1: f64::from(loc.y) / h,
                x2: f64::from(loc.x + loc.w) / w,
                y2: f64::from(loc.y + loc.h) / h,
                score: Some(od.confidence_level()),
                text: String::new(),
                mask: None,
                frame: (width, height),
                active_prompts: Vec::new(),
                track_id: meta
                    .iter_direct_related::<AnalyticsTrackingMtd>(od.id(), RelTypes::RELATE_TO)
                    .next()
                    .map(|t| t.info().0),
                predicted: false,
            })
        })
        .collect()
}
