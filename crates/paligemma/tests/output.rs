//! Task prompts and output parsers on real and malformed strings.
use paligemma::output::{Mask, TaskResult};
use paligemma::parse::{parse, parse_detections};
use paligemma::task::Task;
use proptest::prelude::*;

#[test]
fn tasks_render_the_trained_prompts() {
    for p in [
        "caption en",
        "describe de",
        "ocr",
        "answer en what is this?",
        "question en a cat",
        "detect cat ; dog",
        "segment cat",
    ] {
        let task = Task::parse(p).unwrap();
        assert_eq!(task.prompt(), p);
        assert_eq!(Task::parse(&task.prompt()).unwrap(), task);
    }
    assert_eq!(
        Task::parse("detect cat;dog ;").unwrap(),
        Task::Detect {
            labels: vec!["cat".into(), "dog".into()]
        }
    );
    assert_eq!(
        Task::parse("what is in the image").unwrap().kind(),
        paligemma::TaskKind::Text
    );
    assert_eq!(
        serde_json::to_string(&Task::parse("detect a;b").unwrap()).unwrap(),
        r#""detect a ; b""#
    );
    assert!(
        serde_json::from_str::<Task>(r#""detect ;""#).is_err(),
        "a malformed prompt fails to load"
    );
    assert!(
        Task::parse("detect ; ;")
            .unwrap_err()
            .to_string()
            .contains("at least one object")
    );
    assert!(Task::parse("  ").is_err());
    assert!(Task::parse("caption en\ndetect cat").is_err());
}

#[test]
fn real_detection_output() {
    // From design.md: a real model's answer to "detect giraffe" on a 640x480 frame.
    let raw = "<loc0210><loc0125><loc0937><loc0641> giraffe ; <loc0157><loc0529><loc0933><loc0802> giraffe";
    let TaskResult::Detections {
        detections,
        warnings,
        ..
    } = parse(
        &Task::parse("detect giraffe").unwrap(),
        raw,
        640,
        480,
        1023.0,
    )
    else {
        panic!("not detections")
    };
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(detections.len(), 2);
    let d = &detections[0];
    assert_eq!(d.label, "giraffe");
    let close = |a: f32, b: f32| (a - b).abs() < 1e-3;
    assert!(close(d.box_norm.y1, 210.0 / 1023.0) && close(d.box_norm.x1, 125.0 / 1023.0));
    assert!(close(d.bbox.x1, 125.0 / 1023.0 * 640.0) && close(d.bbox.y2, 937.0 / 1023.0 * 480.0));
    assert!(
        close(d.bbox.w, (641.0 - 125.0) / 1023.0 * 640.0)
            && close(d.bbox.h, (937.0 - 210.0) / 1023.0 * 480.0)
    );
    assert_eq!(detections[1].box_norm.x2, 802.0 / 1023.0);
    // A 1024 divisor as some demos use.
    let r = parse_detections(raw, 640, 480, 1024.0, false);
    assert_eq!(r.detections()[0].box_norm.y1, 210.0 / 1024.0);
}

#[test]
fn segmentation_output_keeps_codes() {
    let codes: String = (0..16).map(|i| format!("<seg{:03}>", i * 7)).collect();
    let raw = format!("<loc0100><loc0200><loc0300><loc0400> {codes} cat");
    let r = parse_detections(&raw, 100, 50, 1023.0, true);
    let TaskResult::Segmentation {
        detections,
        warnings,
        ..
    } = r
    else {
        panic!()
    };
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(detections[0].label, "cat");
    assert_eq!(
        detections[0].seg_codes.as_deref(),
        Some(&(0..16).map(|i| i * 7).collect::<Vec<u32>>()[..])
    );
}

#[test]
fn malformed_outputs_become_warnings() {
    let cases = [
        ("<loc0100><loc0200><loc0300> cat", "3 loc tokens"),
        ("cat", "with no box"),
        ("<loc0500><loc0600><loc0100><loc0200> cat", "out of order"),
        ("<loc0100><loc0200><loc0300><loc0400>", "without a label"),
        (
            "<loc0100><loc0200><loc0300><loc0400> cat <loc0001>",
            "after its label",
        ),
    ];
    for (raw, warning) in cases {
        let r = parse_detections(raw, 320, 240, 1023.0, false);
        let TaskResult::Detections { warnings, .. } = &r else {
            panic!()
        };
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(warning) && w.contains(raw.trim())),
            "{raw:?}: {warnings:?}"
        );
    }
    // Out-of-order corners are swapped so the box is still usable.
    let r = parse_detections(
        "<loc0500><loc0600><loc0100><loc0200> cat",
        1023,
        1023,
        1023.0,
        false,
    );
    let b = &r.detections()[0].bbox;
    assert!((b.y1 - 100.0).abs() < 1e-3 && (b.x2 - 600.0).abs() < 1e-3);
    // Segmentation with a short code run keeps the box, not the mask.
    let r = parse_detections(
        "<loc0100><loc0200><loc0300><loc0400><seg001><seg002> cat",
        10,
        10,
        1023.0,
        true,
    );
    let TaskResult::Segmentation {
        detections,
        warnings,
        ..
    } = r
    else {
        panic!()
    };
    assert_eq!(detections.len(), 1);
    assert!(detections[0].seg_codes.is_none() && warnings[0].contains("2 seg tokens"));
    // Empty output: nothing, no warnings.
    assert_eq!(
        parse_detections("", 10, 10, 1023.0, false),
        TaskResult::Detections {
            detections: vec![],
            warnings: vec![],
            dropped: Default::default()
        }
    );
}

#[test]
fn rle_round_trip() {
    let bits: Vec<bool> = (0..37).map(|i| i % 5 == 0 || i > 30).collect();
    let m = Mask::from_bitmap(3, 4, 37, 1, &bits);
    assert_eq!(m.to_bitmap(), bits);
    assert_eq!(m.rle[0], 0, "runs start with zeros");
}

#[test]
fn results_serialise_like_the_message_schema() {
    let r = parse_detections(
        "<loc0000><loc0000><loc1023><loc1023> person",
        1280,
        720,
        1023.0,
        false,
    );
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["kind"], "detections");
    assert_eq!(v["detections"][0]["label"], "person");
    assert_eq!(v["detections"][0]["box"]["w"], 1280.0);
    assert_eq!(v["detections"][0]["box_norm"]["y2"], 1.0);
    assert!(v["detections"][0]["mask"].is_null());
    // What a subscriber reads back serialises to the same message.
    let back: TaskResult = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(serde_json::to_value(&back).unwrap(), v);
    assert_eq!(back.detections()[0].bbox, r.detections()[0].bbox);
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u32..1100).prop_map(|v| format!("<loc{v:04}>")),
        (0u32..140).prop_map(|v| format!("<seg{v:03}>")),
        Just(" ; ".to_string()),
        Just(";".to_string()),
        Just("<loc12>".to_string()),
        Just("<".to_string()),
        "[a-z ]{0,8}",
        "\\PC{0,4}",
    ]
}

proptest! {
    #[test]
    fn any_token_sequence_parses_without_panic(tokens in proptest::collection::vec(token(), 0..40), w in 1usize..4000, h in 1usize..4000, seg: bool) {
        let raw: String = tokens.concat();
        let r = parse_detections(&raw, w, h, 1023.0, seg);
        for d in r.detections() {
            let b = &d.bbox;
            prop_assert!(b.x1 >= 0.0 && b.y1 >= 0.0 && b.x2 <= w as f32 && b.y2 <= h as f32, "{b:?} outside {w}x{h}");
            prop_assert!(b.x1 <= b.x2 && b.y1 <= b.y2);
            prop_assert!(d.box_norm.x1 >= 0.0 && d.box_norm.x2 <= 1.0);
        }
    }
}
