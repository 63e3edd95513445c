//! Results as GStreamer analytics metadata (the `analytics` feature, GStreamer >= 1.24):
//! the demo model's detections of videotestsrc's ball as object-detection entries,
//! grouped by prompt, the same boxes as the ROI metas, and the overlay drawing the same
//! from either. Run by scripts/gst-analytics-check.sh on GStreamer 1.26.
#![cfg(feature = "analytics")]
use gst::prelude::*;
use gst_analytics::prelude::*;
use gst_analytics::{
    AnalyticsClassificationMtd, AnalyticsODMtd, AnalyticsRelationMeta, AnalyticsTrackingMtd,
    RelTypes,
};
use gstpaligemma::result_meta::Region;
use std::path::PathBuf;

mod common;

/// The buffers of `frames` ball frames (320x240) after `paligemma` in sync mode with
/// `prompts` and `meta-kind`, and the overlay when asked for.
fn run(prompts: &str, meta_kind: &str, overlay: bool, frames: u32) -> Vec<gst::Buffer> {
    common::sink_buffers(&format!(
        "videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,format=RGBA,width=320,height=240,framerate=30/1 \
         ! paligemma model={model} threads=1 mode=sync prompts=\"{prompts}\" max-tokens=12 meta-kind={meta_kind} \
         {overlay} ! appsink name=out sync=false",
        model = common::demo_model().display(),
        overlay = if overlay { "! paligemmaoverlay" } else { "" },
    ))
}

#[test]
fn detections_as_object_detection_entries_grouped_by_prompt() {
    let buffers = run("detect ball|caption en", "both", false, 4);
    assert_eq!(buffers.len(), 4);
    let (mut objects, mut track_ids) = (0, std::collections::BTreeSet::new());
    for (i, buffer) in buffers.iter().enumerate() {
        let meta = buffer
            .meta::<AnalyticsRelationMeta>()
            .expect("a relation meta on every analysed frame");
        // One classification entry for the detect prompt (captions add none), containing its objects.
        let prompts: Vec<_> = meta.iter::<AnalyticsClassificationMtd>().collect();
        assert_eq!(prompts.len(), 1, "frame {i}");
        assert_eq!(
            (prompts[0].quark(0).as_str().as_str(), prompts[0].level(0)),
            ("detect", 1.0)
        );
        let roi: Vec<Region> = Region::from_buffer(buffer)
            .into_iter()
            .filter(|r| r.prompt_id == "detect")
            .collect();
        let ods: Vec<_> = meta.iter::<AnalyticsODMtd>().collect();
        assert_eq!(
            ods.len(),
            roi.len(),
            "frame {i}: one entry per object of the ROI metas"
        );
        for (od, r) in ods.iter().zip(&roi) {
            let loc = od.location().unwrap();
            println!(
                "frame {i}: {:?} at {loc:?}, confidence {}",
                od.obj_type().map(|q| q.as_str().to_string()),
                od.confidence_level()
            );
            assert_eq!(od.obj_type().unwrap().as_str().as_str(), "ball");
            assert_eq!(od.obj_type().unwrap().as_str().as_str(), r.label);
            // The box in pixels of the frame, as the ROI meta's normalised box says.
            let px = |v: f64, size: f64| (v * size).round() as i32;
            assert_eq!(
                (loc.x, loc.y, loc.x + loc.w, loc.y + loc.h),
                (
                    px(r.x1, 320.0),
                    px(r.y1, 240.0),
                    px(r.x2, 320.0),
                    px(r.y2, 240.0)
                )
            );
            assert!(loc.w > 0 && loc.h > 0);
            // The engine's detection confidence.
            let score = r.score.expect("the engine scores detections");
            assert!(score > 0.0 && score <= 1.0 && (od.confidence_level() - score).abs() < 1e-6);
            assert!(meta.exist(prompts[0].id(), od.id(), 1, RelTypes::CONTAIN));
            assert!(meta.exist(od.id(), prompts[0].id(), 1, RelTypes::IS_PART_OF));
            // Its track, related to it, with the ROI meta's track id.
            let tracks: Vec<_> = meta
                .iter_direct_related::<AnalyticsTrackingMtd>(od.id(), RelTypes::RELATE_TO)
                .collect();
            let track_id = r.track_id.expect("the ball is tracked");
            assert_eq!(
                tracks.iter().map(|t| t.info().0).collect::<Vec<_>>(),
                [track_id],
                "frame {i}"
            );
            track_ids.insert(track_id);
            objects += 1;
        }
        // Read back as regions, as the overlay does.
        let back = gstpaligemma::analytics_meta::regions(buffer, 320, 240);
        assert!(
            back.iter()
                .all(|b| b.prompt_id == "detect" && b.label == "ball"),
            "{back:?}"
        );
    }
    assert!(objects > 0, "the demo model finds the ball");
    assert_eq!(
        track_ids.len(),
        1,
        "one ball, one track over the frames: {track_ids:?}"
    );
}

#[test]
fn meta_kind_selects_the_metas() {
    let roi = run("detect ball", "roi", false, 1);
    assert!(roi[0].meta::<AnalyticsRelationMeta>().is_none());
    assert!(!Region::from_buffer(&roi[0]).is_empty());
    let analytics = run("detect ball", "analytics", false, 1);
    assert!(analytics[0].meta::<AnalyticsRelationMeta>().is_some());
    assert!(Region::from_buffer(&analytics[0]).is_empty());
}

#[test]
fn the_overlay_draws_the_same_boxes_from_either_meta() {
    // A box prompt only: captions are drawn from the ROI metas alone.
    let frame = |kind: &str| {
        run("detect ball", kind, true, 1)
            .remove(0)
            .map_readable()
            .unwrap()
            .to_vec()
    };
    let plain = frame("roi");
    let from_analytics = frame("analytics");
    let untouched = common::sink_buffers(
        "videotestsrc num-buffers=1 pattern=ball ! video/x-raw,format=RGBA,width=320,height=240 ! appsink name=out",
    )
    .remove(0)
    .map_readable()
    .unwrap()
    .to_vec();
    assert_ne!(plain, untouched, "the overlay drew the ball's box");
    assert!(
        plain == from_analytics,
        "the same boxes from the analytics meta"
    );
}

/// gst-plugins-bad's `objectdetectionoverlay` draws our boxes: the outline's red pixels
/// lie on the detected box's edges. The frame is also written as a PNG, to the directory
/// in `PALIGEMMA_ANALYTICS_PNG_DIR` when set (scripts/gst-analytics-check.sh keeps it).
#[test]
fn objectdetectionoverlay_draws_our_boxes() {
    gst::init().unwrap();
    gstpaligemma::plugin_register_static().unwrap();
    assert!(
        gst::ElementFactory::find("objectdetectionoverlay").is_some(),
        "objectdetectionoverlay (gst-plugins-bad >= 1.24) is not installed"
    );
    let dir = tempfile::tempdir().unwrap();
    let png = std::env::var_os("PALIGEMMA_ANALYTICS_PNG_DIR")
        .map_or_else(|| dir.path().to_path_buf(), PathBuf::from)
        .join("objectdetectionoverlay.png");
    let desc = format!(
        "videotestsrc num-buffers=1 pattern=ball ! video/x-raw,format=RGBA,width=320,height=240 \
         ! paligemma model={model} threads=1 mode=sync prompts=\"detect ball\" max-tokens=12 meta-kind=analytics \
         ! objectdetectionoverlay object-detection-outline-color=0xffff0000 draw-labels=false \
         ! videoconvert ! video/x-raw,format=RGBA ! tee name=t ! queue ! appsink name=out sync=false \
         t. ! queue ! pngenc ! filesink location={png}",
        model = common::demo_model().display(),
        png = png.display(),
    );
    let pipeline = gst::parse::launch(&desc)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
    let sink = pipeline
        .by_name("out")
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap();
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let frame = sink
        .pull_sample()
        .unwrap()
        .buffer_owned()
        .unwrap()
        .map_readable()
        .unwrap()
        .to_vec();
    // Every message up to the end of the stream (a filtered pop would drop the results).
    let messages: Vec<gst::Message> =
        std::iter::from_fn(|| bus.timed_pop(gst::ClockTime::from_seconds(30)))
            .take_while(|m| {
                !matches!(
                    m.view(),
                    gst::MessageView::Eos(_) | gst::MessageView::Error(_)
                )
            })
            .collect();
    let boxes: Vec<(f64, f64, f64, f64)> = messages
        .iter()
        .filter_map(|m| match m.view() {
            gst::MessageView::Element(e) => e
                .structure()
                .filter(|s| s.name() == "paligemma-result")
                .map(|s| s.to_owned()),
            _ => None,
        })
        .flat_map(|s| {
            s.get::<gst::Array>("detections")
                .unwrap()
                .iter()
                .map(|d| d.get::<gst::Structure>().unwrap())
                .collect::<Vec<_>>()
        })
        .map(|d| {
            (
                d.get("x").unwrap(),
                d.get("y").unwrap(),
                d.get("width").unwrap(),
                d.get("height").unwrap(),
            )
        })
        .collect();
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(!boxes.is_empty(), "the demo model finds the ball");
    assert!(
        std::fs::metadata(&png).is_ok_and(|m| m.len() > 0),
        "{} written",
        png.display()
    );

    let red = |x: i64, y: i64| {
        let (x, y) = (x.clamp(0, 319) as usize, y.clamp(0, 239) as usize);
        let p = &frame[(y * 320 + x) * 4..][..3];
        p[0] > 200 && p[1] < 60 && p[2] < 60
    };
    // Red within 2 pixels of the middle of each edge.
    let near =
        |x: f64, y: f64| (-2..=2).any(|dy| (-2..=2).any(|dx| red(x as i64 + dx, y as i64 + dy)));
    for (x, y, w, h) in boxes {
        println!("box ({x:.1}, {y:.1}) {w:.1} x {h:.1}");
        let (cx, cy) = (x + w / 2.0, y + h / 2.0);
        assert!(
            near(cx, y) && near(cx, y + h) && near(x, cy) && near(x + w, cy),
            "an outline on the box's four edges"
        );
        assert!(!red(cx as i64, cy as i64), "the box's inside is left alone");
    }
}
