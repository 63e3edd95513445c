//! ROS 2 messages and type hashes against tests/fixtures/ros2/reference.json, which
//! rosbags (an independent implementation of ROS 2's CDR and REP 2011 hashing) wrote
//! for the same messages (tests/reference/ros2_reference.py).
use paligemma_ros2::msgs::*;
use paligemma_ros2::type_hash::{TYPES, rihs01};

fn reference() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/ros2/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn header() -> Header {
    Header {
        stamp: Time {
            sec: 1_795_000_000,
            nanosec: 123_456_789,
        },
        frame_id: "front_camera".into(),
    }
}

fn detection(label: &str, score: f64, (cx, cy, w, h): (f64, f64, f64, f64)) -> Detection2D {
    Detection2D {
        header: header(),
        results: vec![ObjectHypothesisWithPose {
            hypothesis: ObjectHypothesis {
                class_id: label.into(),
                score,
            },
            pose: Default::default(),
        }],
        bbox: BoundingBox2D {
            center: Pose2D {
                position: Point2D { x: cx, y: cy },
                theta: 0.0,
            },
            size_x: w,
            size_y: h,
        },
        id: "objects".into(),
    }
}

#[test]
fn type_hashes_match_the_reference() {
    let want = reference();
    // The value ROS 2 Jazzy itself gives std_msgs/msg/String.
    assert_eq!(
        rihs01("std_msgs/msg/String").unwrap(),
        "RIHS01_df668c740482bbd48fb39d76a70dfd4bd59db1288021743503259e948f6b1a18"
    );
    let hashes = want["hashes"].as_object().unwrap();
    for (name, hash) in hashes {
        assert_eq!(rihs01(name).as_deref(), hash.as_str(), "{name}");
    }
    assert!(TYPES.iter().all(|t| hashes.contains_key(t.name)
        || t.name.starts_with("geometry_msgs/msg/P")
        || t.name.ends_with("Quaternion")));
    assert_eq!(rihs01("nav_msgs/msg/Odometry"), None);
}

#[test]
fn cdr_bytes_match_the_reference_and_decode_back() {
    let want = reference();
    let cdr = |k: &str| bytes(want["cdr"][k].as_str().unwrap());
    let string = StringMsg {
        data: "a red ball on grass".into(),
    };
    let detections = Detection2DArray {
        header: header(),
        detections: vec![
            detection("ball", 0.83, (320.5, 240.25, 64.0, 48.0)),
            detection("cup", 0.125, (10.0, 20.0, 4.0, 6.0)),
        ],
    };
    let empty = Detection2DArray::default();
    let image = Image {
        header: header(),
        height: 2,
        width: 3,
        encoding: "rgb8".into(),
        is_bigendian: 0,
        step: 9,
        data: (0..18).collect(),
    };
    let compressed = CompressedImage {
        header: header(),
        format: "jpeg".into(),
        data: vec![0xff, 0xd8, 0xff, 0xe0, 1],
    };

    assert_eq!(to_cdr(&string), cdr("std_msgs/msg/String"));
    assert_eq!(to_cdr(&detections), cdr("vision_msgs/msg/Detection2DArray"));
    assert_eq!(
        to_cdr(&empty),
        cdr("vision_msgs/msg/Detection2DArray#empty")
    );
    assert_eq!(to_cdr(&image), cdr("sensor_msgs/msg/Image"));
    assert_eq!(to_cdr(&compressed), cdr("sensor_msgs/msg/CompressedImage"));
    // The encapsulation header: CDR, little-endian.
    assert_eq!(&to_cdr(&string)[..4], &[0, 1, 0, 0]);

    let limit = 1 << 20;
    assert_eq!(
        from_cdr::<StringMsg>(&cdr("std_msgs/msg/String"), limit).unwrap(),
        string
    );
    assert_eq!(
        from_cdr::<Detection2DArray>(&cdr("vision_msgs/msg/Detection2DArray"), limit).unwrap(),
        detections
    );
    assert_eq!(
        from_cdr::<Image>(&cdr("sensor_msgs/msg/Image"), limit).unwrap(),
        image
    );
    assert_eq!(
        from_cdr::<CompressedImage>(&cdr("sensor_msgs/msg/CompressedImage"), limit).unwrap(),
        compressed
    );
}

#[test]
fn diagnostics_match_the_reference() {
    let want = reference();
    let kv = |k: &str, v: &str| KeyValue {
        key: k.into(),
        value: v.into(),
    };
    let array = DiagnosticArray {
        header: Header {
            stamp: Time {
                sec: 1_795_000_000,
                nanosec: 5,
            },
            frame_id: String::new(),
        },
        status: vec![
            DiagnosticStatus {
                level: DiagnosticStatus::WARN,
                name: "paligemma: camera front".into(),
                message: "stalled: no frame for 2.0 s".into(),
                hardware_id: "front".into(),
                values: vec![kv("state", "stalled"), kv("restarts", "3")],
            },
            DiagnosticStatus {
                name: "paligemma: node".into(),
                ..Default::default()
            },
        ],
    };
    let cdr = bytes(
        want["cdr"]["diagnostic_msgs/msg/DiagnosticArray"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(to_cdr(&array), cdr);
    assert_eq!(from_cdr::<DiagnosticArray>(&cdr, 1 << 20).unwrap(), array);
}

#[test]
fn bad_cdr_is_an_error() {
    let image = to_cdr(&Image {
        header: header(),
        height: 2,
        width: 3,
        encoding: "rgb8".into(),
        step: 9,
        data: vec![7; 18],
        ..Default::default()
    });
    for cut in [0, 3, 4, 10, image.len() - 1] {
        assert!(
            from_cdr::<Image>(&image[..cut], 1 << 20).is_err(),
            "truncated at {cut}"
        );
    }
    // A sequence that claims 4 GB, and a message over the limit.
    let mut huge = image.clone();
    let len_at = image.len() - 18 - 4;
    huge[len_at..len_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(from_cdr::<Image>(&huge, 1 << 20).is_err());
    assert!(from_cdr::<Image>(&image, 16).is_err());
    // An encapsulation this reader does not know.
    let mut unknown = image;
    unknown[1] = 0x07;
    assert!(from_cdr::<Image>(&unknown, 1 << 20).is_err());
}

use paligemma_ros2::keys::*;

/// Keys and tokens as rmw_zenoh writes them (ros2/rmw_zenoh `liveliness_utils.cpp`).
#[test]
fn keys_tokens_and_attachments() {
    let ty = "vision_msgs/msg/Detection2DArray";
    let hash = rihs01(ty).unwrap();
    let topic = "/robot1/paligemma/front/detections";
    assert_eq!(
        dds_type_name(ty),
        "vision_msgs::msg::dds_::Detection2DArray_"
    );
    assert_eq!(
        topic_key(0, topic, ty, Distro::Jazzy).unwrap(),
        format!(
            "0/robot1/paligemma/front/detections/vision_msgs::msg::dds_::Detection2DArray_/{hash}"
        )
    );
    assert_eq!(
        topic_key(7, "chatter/", "std_msgs/msg/String", Distro::Humble).unwrap(),
        "7/chatter/std_msgs::msg::dds_::String_/TypeHashNotSupported"
    );
    let node = NodeName {
        domain: 0,
        zid: "8f2d0e1c".into(),
        id: 0,
        namespace: "/robot1".into(),
        name: "paligemma".into(),
    };
    assert_eq!(
        node.token(),
        "@ros2_lv/0/8f2d0e1c/0/0/NN/%/%robot1/paligemma"
    );
    assert_eq!(
        node.entity_token(1, EntityKind::Publisher, topic, ty, Distro::Jazzy, 10)
            .unwrap(),
        format!(
            "@ros2_lv/0/8f2d0e1c/0/1/MP/%/%robot1/paligemma/%robot1%paligemma%front%detections/vision_msgs::msg::dds_::Detection2DArray_/{hash}/::,10:,:,:,,"
        )
    );
    let root = NodeName {
        namespace: "/".into(),
        ..node.clone()
    };
    assert_eq!(
        root.entity_token(
            2,
            EntityKind::Subscription,
            "/camera/image_raw",
            "sensor_msgs/msg/Image",
            Distro::Humble,
            5
        )
        .unwrap(),
        "@ros2_lv/0/8f2d0e1c/0/2/MS/%/%/paligemma/%camera%image_raw/sensor_msgs::msg::dds_::Image_/TypeHashNotSupported/::,5:,:,:,,"
    );
    assert_eq!(
        node.entity_token(
            1,
            EntityKind::Publisher,
            topic,
            "nav_msgs/msg/Odometry",
            Distro::Jazzy,
            10
        ),
        None
    );

    // The gid is XXH3-128 (low half first): the hash of "" is 99aa06d3014798d8 6001c324468d497f.
    assert_eq!(
        gid(""),
        0x99aa_06d3_0147_98d8_6001_c324_468d_497f_u128.to_le_bytes()
    );
    let g: [u8; 16] = std::array::from_fn(|i| 0xa0 + i as u8);
    let a = attachment(1, 1_700_000_000_000_000_000, &g);
    let mut want = vec![
        1, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x2a, 0x36, 0xfe, 0x9c, 0x97, 0x17, 16,
    ];
    want.extend(g);
    assert_eq!(a, want);
    assert_eq!(
        parse_attachment(&a).unwrap(),
        (1, 1_700_000_000_000_000_000, g)
    );
    assert!(parse_attachment(&a[..32]).is_err() && parse_attachment(&[0; 33]).is_err());
}

use paligemma::output::Mask;
use paligemma::parse::parse_detections;
use paligemma_ros2::results::{RosResult, to_ros};
use paligemma_stream::message::{FrameInfo, PromptInfo, ResultMessage};

/// A result message of a frame of 8 x 6 pixels taken at `header()`'s time.
fn result_message(result: paligemma::TaskResult) -> ResultMessage {
    ResultMessage {
        schema: "paligemma.result/1".into(),
        source: Default::default(),
        frame: FrameInfo {
            capture_unix_ns: Some(1_795_000_000_123_456_789),
            width: 8,
            height: 6,
            ..Default::default()
        },
        prompt: PromptInfo {
            id: "objects".into(),
            ..Default::default()
        },
        model: Default::default(),
        result,
        raw: String::new(),
        tokens: Default::default(),
        mean_logprob: None,
        latency_ms: Default::default(),
        frames_dropped: 0,
    }
}

#[test]
fn results_as_ros_messages() {
    // Two boxes (loc bins of 1024 over 8 x 6 pixels): (0,0)-(4,3) and (2,1)-(8,6).
    let raw =
        "<loc0000><loc0000><loc0512><loc0512> ball ; <loc0171><loc0256><loc1023><loc1023> cup";
    let mut result = parse_detections(raw, 8, 6, 1024.0, false);
    if let paligemma::TaskResult::Detections { detections, .. } = &mut result {
        detections[1].track_id = Some(7);
    }
    let msgs = to_ros(&result_message(result.clone()), "front_camera");
    let [RosResult::Detections(array)] = msgs.as_slice() else {
        panic!("one Detection2DArray, no masks: {msgs:?}")
    };
    assert_eq!(array.header, header());
    let [ball, cup] = array.detections.as_slice() else {
        panic!("{array:?}")
    };
    assert_eq!(
        (
            ball.results[0].hypothesis.class_id.as_str(),
            ball.id.as_str()
        ),
        ("ball", "objects")
    );
    assert_eq!(
        (
            ball.bbox.center.position.x,
            ball.bbox.center.position.y,
            ball.bbox.size_x,
            ball.bbox.size_y
        ),
        (2.0, 1.5, 4.0, 3.0)
    );
    assert_eq!(
        (cup.results[0].hypothesis.class_id.as_str(), cup.id.as_str()),
        ("cup", "7"),
        "a tracked object's id is its track id"
    );

    // Masks: the ball fills its box, the cup only its top-left pixel, which the ball's
    // box covers too (the later object wins); one more mask hangs off the frame's edge.
    let paligemma::TaskResult::Detections { detections, .. } = &mut result else {
        unreachable!()
    };
    detections[0].mask = Some(Mask::from_bitmap(0, 0, 4, 3, &[true; 12]));
    let mut cup_bits = vec![false; 6 * 5];
    cup_bits[0] = true;
    detections[1].mask = Some(Mask::from_bitmap(2, 1, 6, 5, &cup_bits));
    let mut edge = detections[1].clone();
    edge.mask = Some(Mask::from_bitmap(7, 5, 3, 3, &[true; 9]));
    detections.push(edge);
    let result = paligemma::TaskResult::Segmentation {
        detections: detections.clone(),
        warnings: Vec::new(),
        dropped: Default::default(),
    };
    let mut message = result_message(result);
    message.frame.frame_id = Some("arm_camera".into());
    let msgs = to_ros(&message, "front_camera");
    let [
        RosResult::Detections(array),
        masks @ RosResult::Masks(image),
    ] = msgs.as_slice()
    else {
        panic!("{msgs:?}")
    };
    assert_eq!(array.detections.len(), 3);
    assert_eq!(
        (masks.subtopic(), masks.ros_type()),
        ("/mask", "sensor_msgs/msg/Image")
    );
    assert_eq!(
        (
            image.width,
            image.height,
            image.step,
            image.encoding.as_str()
        ),
        (8, 6, 8, "mono8")
    );
    assert_eq!(
        image.header.frame_id, "arm_camera",
        "the source image's frame_id wins"
    );
    #[rustfmt::skip]
    let expected = [
        1, 1, 1, 1, 0, 0, 0, 0,
        1, 1, 2, 1, 0, 0, 0, 0,
        1, 1, 1, 1, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 3,
    ];
    assert_eq!(image.data, expected);
    let back: Image = from_cdr(&masks.to_cdr(), 1 << 20).unwrap();
    assert_eq!(&back, image);

    // An error publishes nothing on ROS 2 (it stays on the node's errors key); a caption is a String.
    assert!(
        to_ros(
            &result_message(paligemma::TaskResult::Error {
                message: "x".into()
            }),
            "f"
        )
        .is_empty()
    );
    let msgs = to_ros(
        &result_message(paligemma::TaskResult::Caption {
            text: "a ball".into(),
        }),
        "f",
    );
    assert_eq!(
        msgs,
        [RosResult::Text(StringMsg {
            data: "a ball".into()
        })]
    );
}
