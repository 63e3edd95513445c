use super::draw::{Canvas, label_color};
use crate::result_meta::Region;
use gst::glib;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;
use gst_video::prelude::VideoFrameExt;
use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "paligemmaoverlay",
        gst::DebugColorFlags::empty(),
        Some("PaliGemma result overlay"),
    )
});

#[derive(Default)]
struct State {
    info: Option<gst_video::VideoInfo>,
    /// Newest regions per prompt id; replaced when a buffer brings new ones, dropped
    /// when a buffer's regions say their prompt is no longer in force.
    latest: BTreeMap<String, Vec<Region>>,
}

#[derive(Default)]
pub struct PaliGemmaOverlay {
    state: Mutex<State>,
}

#[glib::object_subclass]
impl ObjectSubclass for PaliGemmaOverlay {
    const NAME: &'static str = "GstPaliGemmaOverlay";
    type Type = super::PaliGemmaOverlay;
    type ParentType = gst_base::BaseTransform;
}

impl ObjectImpl for PaliGemmaOverlay {}
impl GstObjectImpl for PaliGemmaOverlay {}

impl ElementImpl for PaliGemmaOverlay {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "PaliGemma overlay",
                "Filter/Effect/Video",
                "Draws the newest PaliGemma results (boxes, labels and track ids, masks, captions) on the video; boxes the tracker predicts between two answers are drawn thin",
                "paligemma-rs developers",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = gst_video::VideoCapsBuilder::new()
                .format_list([
                    gst_video::VideoFormat::Rgb,
                    gst_video::VideoFormat::Rgba,
                    gst_video::VideoFormat::Bgrx,
                    gst_video::VideoFormat::Bgra,
                ])
                .build();
            vec![
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &caps,
                )
                .unwrap(),
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &caps,
                )
                .unwrap(),
            ]
        });
        TEMPLATES.as_ref()
    }
}

impl BaseTransformImpl for PaliGemmaOverlay {
    const MODE: gst_base::subclass::BaseTransformMode =
        gst_base::subclass::BaseTransformMode::AlwaysInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = false;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = false;

    fn set_caps(&self, incaps: &gst::Caps, _outcaps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let info = gst_video::VideoInfo::from_caps(incaps)
            .map_err(|_| gst::loggable_error!(CAT, "invalid caps {}", incaps))?;
        self.state.lock().unwrap().info = Some(info);
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        *self.state.lock().unwrap() = State::default();
        Ok(())
    }

    fn transform_ip(&self, buf: &mut gst::BufferRef) -> Result<gst::FlowSuccess, gst::FlowError> {
        let mut state = self.state.lock().unwrap();
        let Some(info) = state.info.clone() else {
            return Err(gst::FlowError::NotNegotiated);
        };
        let mut arrived: BTreeMap<String, Vec<Region>> = BTreeMap::new();
        for r in Region::from_buffer(buf) {
            arrived.entry(r.prompt_id.clone()).or_default().push(r);
        }
        // Objects of the analytics meta, for prompts the ROI metas did not bring (they
        // carry masks and texts too): ours with meta-kind=analytics, and other elements'.
        #[cfg(feature = "analytics")]
        {
            let from_roi: std::collections::BTreeSet<String> = arrived.keys().cloned().collect();
            for r in crate::analytics_meta::regions(buf, info.width(), info.height()) {
                if !from_roi.contains(&r.prompt_id) {
                    arrived.entry(r.prompt_id.clone()).or_default().push(r);
                }
            }
        }
        // Results attached with the list of prompts in force: forget the regions of
        // prompts that no longer exist (the newest list wins).
        if let Some(active) = arrived
            .values()
            .flatten()
            .map(|r| &r.active_prompts)
            .find(|a| !a.is_empty())
        {
            let active = active.clone();
            state.latest.retain(|id, _| active.contains(id));
        }
        state.latest.extend(arrived);
        let mut frame = gst_video::VideoFrameRef::from_buffer_ref_writable(buf, &info)
            .map_err(|_| gst::FlowError::Error)?;
        let stride = frame.plane_stride()[0] as usize;
        let rgb = match info.format() {
            gst_video::VideoFormat::Rgb | gst_video::VideoFormat::Rgba => [0, 1, 2],
            _ => [2, 1, 0],
        };
        let bpp = if info.format() == gst_video::VideoFormat::Rgb {
            3
        } else {
            4
        };
        let (width, height) = (info.width() as usize, info.height() as usize);
        let data = frame.plane_data_mut(0).map_err(|_| gst::FlowError::Error)?;
        let mut canvas = Canvas {
            data,
            width,
            height,
            stride,
            bpp,
            rgb,
        };
        let scale = if height >= 480 { 2 } else { 1 };
        let mut caption_y = 0;
        for regions in state.latest.values() {
            for r in regions {
                let color = label_color(if r.label.is_empty() {
                    &r.prompt_id
                } else {
                    &r.label
                });
                match r.kind {
                    kind if kind.has_boxes() => {
                        let px = |v: f64, size: usize| {
                            ((v.clamp(0.0, 1.0) * size as f64).round() as usize).min(size)
                        };
                        let (x1, y1, x2, y2) = (
                            px(r.x1, width),
                            px(r.y1, height),
                            px(r.x2, width),
                            px(r.y2, height),
                        );
                        if let Some((mx, my, mw, mh, rle)) = &r.mask {
                            // Masks are in the analysed frame's pixels: skip them if the size changed.
                            if r.frame == (width as u32, height as u32) {
                                canvas.mask(
                                    *mx as usize,
                                    *my as usize,
                                    *mw as usize,
                                    *mh as usize,
                                    rle,
                                    color,
                                );
                            }
                        }
                        // A predicted box (between two answers) is drawn thin; an answer's thick.
                        canvas.rect(
                            x1,
                            y1,
                            x2,
                            y2,
                            if r.predicted { 1 } else { scale + 1 },
                            color,
                        );
                        let label_y = y1.saturating_sub(8 * scale + 2);
                        let label = match r.track_id {
                            Some(id) => format!("{} #{id}", r.label),
                            None => r.label.clone(),
                        };
                        canvas.text(x1, label_y, &label, scale, color);
                    }
                    _ if !r.text.is_empty() => {
                        let line = format!("{}: {}", r.prompt_id, r.text);
                        caption_y += canvas.text(0, caption_y, &line, scale, [255, 255, 255]);
                    }
                    _ => {}
                }
            }
        }
        Ok(gst::FlowSuccess::Ok)
    }
}
