//! Result messages as ROS 2 messages: detections and segmentations as a
//! `vision_msgs/msg/Detection2DArray`, every other answer as a `std_msgs/msg/String`,
//! and a segmentation's masks as one `sensor_msgs/msg/Image` on a sibling topic.
use crate::msgs::{
    BoundingBox2D, Detection2D, Detection2DArray, Header, Image, ObjectHypothesis,
    ObjectHypothesisWithPose, Point2D, Pose2D, StringMsg, Time,
};
use paligemma::TaskResult;
use paligemma::output::Detection;
use paligemma_stream::message::ResultMessage;

/// The ROS 2 form of a result.
#[derive(Clone, Debug, PartialEq)]
pub enum RosResult {
    Detections(Detection2DArray),
    Text(StringMsg),
    /// The masks of a segmentation (see [`mask_image`]).
    Masks(Image),
}

impl RosResult {
    /// The ROS 2 type of the message.
    pub fn ros_type(&self) -> &'static str {
        match self {
            RosResult::Detections(_) => "vision_msgs/msg/Detection2DArray",
            RosResult::Text(_) => "std_msgs/msg/String",
            RosResult::Masks(_) => "sensor_msgs/msg/Image",
        }
    }

    /// What the message's topic adds to the prompt's topic: masks go on `<topic>/mask`,
    /// so that a subscriber of the detections is not sent frame-sized images.
    pub fn subtopic(&self) -> &'static str {
        match self {
            RosResult::Masks(_) => "/mask",
            RosResult::Detections(_) | RosResult::Text(_) => "",
        }
    }

    /// Its CDR bytes.
    pub fn to_cdr(&self) -> Vec<u8> {
        match self {
            RosResult::Detections(m) => crate::msgs::to_cdr(m),
            RosResult::Text(m) => crate::msgs::to_cdr(m),
            RosResult::Masks(m) => crate::msgs::to_cdr(m),
        }
    }
}

/// The ROS 2 messages for a result (none for an error, which stays on the node's
/// `errors` key). The header carries the frame's capture time and its `frame_id` (the
/// source image's, else `frame_id`). Each detection has its box's centre and size in
/// pixels of the frame, one hypothesis (the label and the engine's confidence, 0 when it
/// has none) and the prompt id as `id`. A segmentation with at least one decoded mask
/// also gives its [`mask_image`].
pub fn to_ros(msg: &ResultMessage, frame_id: &str) -> Vec<RosResult> {
    let frame_id = msg.frame.frame_id.as_deref().unwrap_or(frame_id);
    let header = Header {
        stamp: Time::from_unix_ns(msg.frame.capture_unix_ns.unwrap_or(0)),
        frame_id: frame_id.into(),
    };
    match &msg.result {
        TaskResult::Error { .. } => Vec::new(),
        TaskResult::Detections { detections, .. } | TaskResult::Segmentation { detections, .. } => {
            let array = Detection2DArray {
                header: header.clone(),
                detections: detections
                    .iter()
                    .map(|d| detection(d, &header, &msg.prompt.id))
                    .collect(),
            };
            let masks = mask_image(detections, msg.frame.width, msg.frame.height, header);
            std::iter::once(RosResult::Detections(array))
                .chain(masks.map(RosResult::Masks))
                .collect()
        }
        other => vec![RosResult::Text(StringMsg {
            data: other.text().unwrap_or_default().to_string(),
        })],
    }
}

fn detection(d: &Detection, header: &Header, prompt_id: &str) -> Detection2D {
    let b = &d.bbox;
    Detection2D {
        header: header.clone(),
        results: vec![ObjectHypothesisWithPose {
            hypothesis: ObjectHypothesis {
                class_id: d.label.clone(),
                score: f64::from(d.score.unwrap_or(0.0)),
            },
            pose: Default::default(),
        }],
        bbox: BoundingBox2D {
            center: Pose2D {
                position: Point2D {
                    x: f64::from(b.x1 + b.x2) / 2.0,
                    y: f64::from(b.y1 + b.y2) / 2.0,
                },
                theta: 0.0,
            },
            size_x: f64::from(b.w),
            size_y: f64::from(b.h),
        },
        // vision_msgs: "a unique ID of the object (e.g. a tracking id)"; untracked
        // detections (asks, tracking off, an object not confirmed yet) name their prompt.
        id: d
            .track_id
            .map_or_else(|| prompt_id.to_string(), |t| t.to_string()),
    }
}

/// The masks of a segmentation as one `mono8` image of the frame's size, an instance
/// label image: a pixel is `i + 1` where the `i`-th detection of the array covers it (a
/// later one wins where two overlap; objects after the 255th are left out) and 0
/// elsewhere. None when no detection has a mask (a model file without the mask
/// decoder, or nothing found).
pub fn mask_image(
    detections: &[Detection],
    width: usize,
    height: usize,
    header: Header,
) -> Option<Image> {
    if detections.iter().all(|d| d.mask.is_none()) {
        return None;
    }
    let mut data = vec![0u8; width * height];
    for (label, mask) in (1..=u8::MAX)
        .zip(detections)
        .filter_map(|(l, d)| Some((l, d.mask.as_ref().filter(|m| m.x < width)?)))
    {
        let bits = mask.to_bitmap();
        for (row, bits) in bits
            .chunks(mask.width.max(1))
            .enumerate()
            .take(height.saturating_sub(mask.y))
        {
            let start = (mask.y + row) * width + mask.x;
            let inside = bits.len().min(width.saturating_sub(mask.x));
            for (pixel, _) in data[start..start + inside]
                .iter_mut()
                .zip(&bits[..inside])
                .filter(|(_, b)| **b)
            {
                *pixel = label;
            }
        }
    }
    let (width, height) = (u32::try_from(width).ok()?, u32::try_from(height).ok()?);
    Some(Image {
        header,
        height,
        width,
        encoding: "mono8".into(),
        is_bigendian: 0,
        step: width,
        data,
    })
}
