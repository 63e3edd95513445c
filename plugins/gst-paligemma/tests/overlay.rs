//! The overlay draws boxes where the results say, rendered to a PNG, and follows the
//! tracked ball between two answers.
mod common;
use gstpaligemma::result_meta::Region;
use paligemma::ResultKind;

#[test]
fn overlay_draws_boxes_where_results_say() {
    gst::init().unwrap();
    gstpaligemma::plugin_register_static().unwrap();
    let (w, h) = (160u32, 120u32);
    let mut harness = gst_check::Harness::new("paligemmaoverlay");
    let caps_bgrx = gst::Caps::builder("video/x-raw")
        .field("format", "BGRx")
        .field("width", w as i32)
        .field("height", h as i32)
        .field("framerate", gst::Fraction::new(30, 1))
        .build();
    harness.set_src_caps(caps_bgrx);
    let region = Region {
        prompt_id: "detect".into(),
        kind: ResultKind::Detections,
        label: "cat".into(),
        x1: 0.25,
        y1: 0.5,
        x2: 0.75,
        y2: 0.9,
        score: None,
        text: String::new(),
        mask: None,
        frame: (w, h),
        active_prompts: Vec::new(),
        track_id: None,
        predicted: false,
    };
    let caption = Region {
        prompt_id: "caption".into(),
        kind: ResultKind::Caption,
        label: String::new(),
        score: None,
        text: "a cat".into(),
        x1: 0.0,
        y1: 0.0,
        x2: 1.0,
        y2: 1.0,
        mask: None,
        frame: (w, h),
        active_prompts: Vec::new(),
        track_id: None,
        predicted: false,
    };
    let mut buf = gst::Buffer::from_mut_slice(vec![40u8; (w * h * 4) as usize]);
    region.attach(buf.get_mut().unwrap(), w, h);
    caption.attach(buf.get_mut().unwrap(), w, h);
    harness.push(buf).unwrap();
    let out = harness.pull().unwrap();
    let map = out.map_readable().unwrap();
    let px = |x: u32, y: u32| -> [u8; 3] {
        let i = ((y * w + x) * 4) as usize;
        [map[i + 2], map[i + 1], map[i]] // BGRx -> RGB
    };
    // The box edges (x 40..120, y 60..108) are drawn in the label's colour; inside
    // and outside stay untouched.
    let edge = px(40, 80);
    assert_ne!(edge, [40, 40, 40], "left edge drawn");
    assert_eq!(px(119, 80), edge, "right edge in the same colour");
    assert_eq!(px(80, 60), edge, "top edge");
    assert_eq!(px(80, 107), edge, "bottom edge");
    assert_eq!(px(80, 85), [40, 40, 40], "inside untouched");
    assert_eq!(px(10, 115), [40, 40, 40], "outside untouched");
    // Following frames without new metas still show the newest results.
    harness
        .push(gst::Buffer::from_mut_slice(vec![
            40u8;
            (w * h * 4) as usize
        ]))
        .unwrap();
    let again = harness.pull().unwrap();
    let m2 = again.map_readable().unwrap();
    assert_eq!(
        &m2[((80 * w + 40) * 4) as usize..][..3],
        &map[((80 * w + 40) * 4) as usize..][..3]
    );

    // Save the frame as a PNG (RGB) for a person to look at.
    let rgb: Vec<u8> = map
        .chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect();
    let dir = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join("overlay.png");
    image::RgbImage::from_raw(w, h, rgb)
        .unwrap()
        .save(&path)
        .unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() > 0);
}

/// Regions of prompts that were removed are no longer drawn: each result carries
/// the ids of the prompts in force, and the newest list wins.
#[test]
fn overlay_forgets_regions_of_removed_prompts() {
    gst::init().unwrap();
    gstpaligemma::plugin_register_static().unwrap();
    let (w, h) = (64u32, 64u32);
    let mut harness = gst_check::Harness::new("paligemmaoverlay");
    harness.set_src_caps(
        gst::Caps::builder("video/x-raw")
            .field("format", "RGBA")
            .field("width", w as i32)
            .field("height", h as i32)
            .field("framerate", gst::Fraction::new(30, 1))
            .build(),
    );
    let region = |id: &str, x1: f64, active: &[&str]| Region {
        prompt_id: id.into(),
        kind: ResultKind::Detections,
        label: id.into(),
        x1,
        y1: 0.5,
        x2: x1 + 0.25,
        y2: 0.9,
        score: None,
        text: String::new(),
        mask: None,
        frame: (w, h),
        active_prompts: active.iter().map(|s| s.to_string()).collect(),
        track_id: None,
        predicted: false,
    };
    let blank = || gst::Buffer::from_mut_slice(vec![0u8; (w * h * 4) as usize]);
    // Left edge pixel of a box starting at x1 (rows 32..57).
    let drawn = |buf: &gst::Buffer, x1: f64| {
        let map = buf.map_readable().unwrap();
        let x = (x1 * w as f64).round() as usize;
        map[(45 * w as usize + x) * 4..][..3] != [0, 0, 0]
    };
    let mut buf = blank();
    region("old", 0.0, &["old", "new"]).attach(buf.get_mut().unwrap(), w, h);
    region("new", 0.5, &["old", "new"]).attach(buf.get_mut().unwrap(), w, h);
    harness.push(buf).unwrap();
    let out = harness.pull().unwrap();
    assert!(drawn(&out, 0.0) && drawn(&out, 0.5), "both prompts drawn");
    // The prompts change to just "new": its next result says so.
    let mut buf = blank();
    region("new", 0.5, &["new"]).attach(buf.get_mut().unwrap(), w, h);
    harness.push(buf).unwrap();
    let out = harness.pull().unwrap();
    assert!(!drawn(&out, 0.0), "the removed prompt's box is gone");
    assert!(drawn(&out, 0.5));
    harness.push(blank()).unwrap();
    assert!(!drawn(&harness.pull().unwrap(), 0.0), "and stays gone");
}

/// `frames` frames of `videotestsrc pattern=ball` at 30 fps, paced by the clock, through
/// the element with the demo model (async, detect ball, an answer at most every
/// `interval` ms) and the overlay.
fn ball_pipeline(frames: u32, interval: u32, props: &str) -> Vec<gst::Buffer> {
    common::sink_buffers(&format!(
        "videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,format=RGBA,width=320,height=240,framerate=30/1 \
         ! paligemma model={} threads=1 prompts=\"detect ball\" max-tokens=12 interval={interval} {props} ! paligemmaoverlay ! appsink name=out sync=true",
        common::demo_model().display()
    ))
}

/// Between two answers, every frame carries the tracked ball where the tracker predicts
/// it (ROI meta with predicted=true and the track id), and the overlay draws it there:
/// the box's corner has the colour of the answered boxes' corners.
#[test]
fn predicted_boxes_follow_the_video_between_answers() {
    let buffers = ball_pipeline(60, 300, "");
    assert_eq!(buffers.len(), 60);
    let corner = |buffer: &gst::Buffer, r: &Region| {
        let (x, y, _, _) = r.pixel_box(320, 240);
        let map = buffer.map_readable().unwrap();
        let i = ((y * 320 + x) * 4) as usize;
        [map[i], map[i + 1], map[i + 2]]
    };
    let (mut answered, mut predicted, mut positions) = (0, 0, std::collections::BTreeSet::new());
    let mut colour = None;
    for (n, buffer) in buffers.iter().enumerate() {
        let regions: Vec<Region> = Region::from_buffer(buffer)
            .into_iter()
            .filter(|r| r.prompt_id == "ball" || r.label == "ball")
            .collect();
        if answered == 0 {
            answered += regions
                .iter()
                .filter(|r| !r.predicted && r.track_id.is_some())
                .count()
                .min(1);
            continue;
        }
        assert!(
            !regions.is_empty(),
            "frame {n}: after the first answer every frame has the ball, answered or predicted"
        );
        for r in &regions {
            assert!(r.track_id.is_some(), "frame {n}: {r:?}");
            let drawn = corner(buffer, r);
            assert_ne!(
                drawn,
                [0, 0, 0],
                "frame {n}: the overlay drew the box's corner"
            );
            assert_eq!(
                *colour.get_or_insert(drawn),
                drawn,
                "frame {n}: in the label's colour"
            );
            if r.predicted {
                predicted += 1;
                positions.insert((r.pixel_box(320, 240).0, r.pixel_box(320, 240).1));
            } else {
                answered += 1;
            }
        }
    }
    println!(
        "{answered} answered boxes, {predicted} predicted at {} positions",
        positions.len()
    );
    assert!(
        answered >= 2 && predicted >= 5,
        "{answered} answered, {predicted} predicted"
    );
    assert!(
        positions.len() >= 3,
        "the predicted box moves with the ball: {positions:?}"
    );
    // Off switch: answers only.
    let buffers = ball_pipeline(60, 300, "predict-boxes=false");
    assert!(
        buffers
            .iter()
            .flat_map(|b| Region::from_buffer(b))
            .all(|r| !r.predicted)
    );
}

/// Over 300 frames (10 s) with an answer at most every 100 ms, the ball keeps one track id.
#[test]
fn the_ball_keeps_one_track_id() {
    let buffers = ball_pipeline(300, 100, "predict-boxes=false");
    let answered: Vec<Region> = buffers
        .iter()
        .flat_map(|b| Region::from_buffer(b))
        .filter(|r| r.label == "ball")
        .collect();
    let ids: std::collections::BTreeSet<Option<u64>> =
        answered.iter().map(|r| r.track_id).collect();
    println!("{} answers, track ids {ids:?}", answered.len());
    assert!(answered.len() >= 20, "{} answers", answered.len());
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(ids.iter().all(Option::is_some));
}

/// `min-score=1` keeps no detection (no score reaches 1); the default keeps the ball.
#[test]
fn min_score_drops_detections() {
    let balls = |props: &str| {
        ball_pipeline(15, 0, props)
            .iter()
            .flat_map(|b| Region::from_buffer(b))
            .filter(|r| r.label == "ball")
            .count()
    };
    assert!(balls("") > 0);
    assert_eq!(balls("min-score=1"), 0);
}
