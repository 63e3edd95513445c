//! The overlay draws boxes where the results say, rendered to a PNG.
use gstpaligemma::result_meta::Region;

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
        kind: "detections".into(),
        label: "cat".into(),
        x1: 0.25,
        y1: 0.5,
        x2: 0.75,
        y2: 0.9,
        text: String::new(),
        mask: None,
        frame: (w, h),
    };
    let caption = Region {
        prompt_id: "caption".into(),
        kind: "caption".into(),
        label: String::new(),
        text: "a cat".into(),
        x1: 0.0,
        y1: 0.0,
        x2: 1.0,
        y2: 1.0,
        mask: None,
        frame: (w, h),
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
    harness.push(gst::Buffer::from_mut_slice(vec![40u8; (w * h * 4) as usize])).unwrap();
    let again = harness.pull().unwrap();
    let m2 = again.map_readable().unwrap();
    assert_eq!(&m2[((80 * w + 40) * 4) as usize..][..3], &map[((80 * w + 40) * 4) as usize..][..3]);

    // Save the frame as a PNG (RGB) for a person to look at.
    let rgb: Vec<u8> = map.chunks_exact(4).flat_map(|p| [p[2], p[1], p[0]]).collect();
    let dir = std::env::var_os("CARGO_TARGET_TMPDIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let path = dir.join("overlay.png");
    image::RgbImage::from_raw(w, h, rgb).unwrap().save(&path).unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() > 0);
}
