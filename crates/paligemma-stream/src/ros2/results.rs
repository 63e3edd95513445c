//! Result messages as ROS 2 messages: detections and segmentations as a
//! `vision_msgs/msg/Detection2DArray`, every other answer as a `std_msgs/msg/String`.
use crate::message::ResultMessage;
use crate::ros2::msgs::{BoundingBox2D, Detection2D, Detection2DArray, Header, ObjectHypothesis, ObjectHypothesisWithPose, Point2D, Pose2D, StringMsg, Time};
use paligemma::TaskResult;

/// The ROS 2 form of a result.
#[derive(Clone, Debug, PartialEq)]
pub enum RosResult {
    Detections(Detection2DArray),
    Text(StringMsg),
}

impl RosResult {
    /// The ROS 2 type of the message.
    pub fn ros_type(&self) -> &'static str {
        match self {
            RosResult::Detections(_) => "vision_msgs/msg/Detection2DArray",
            RosResult::Text(_) => "std_msgs/msg/String",
        }
    }

    /// Its CDR bytes.
    pub fn to_cdr(&self) -> Vec<u8> {
        match self {
            RosResult::Detections(m) => crate::ros2::msgs::to_cdr(m),
            RosResult::Text(m) => crate::ros2::msgs::to_cdr(m),
        }
    }
}

/// The ROS 2 message for a result (none for an error, which stays on the node's
/// `errors` key): the header carries the frame's capture time and its `frame_id` (the
/// source image's, else `frame_id`); each
/// detection its box's centre and size in pixels of the frame, one hypothesis (the
/// label and the engine's confidence, 0 when it has none) and the prompt id as `id`.
pub fn to_ros(msg: &ResultMessage, frame_id: &str) -> Option<RosResult> {
    let frame_id = msg.frame.frame_id.as_deref().unwrap_or(frame_id);
    let header = Header { stamp: Time::from_unix_ns(msg.frame.capture_unix_ns.unwrap_or(0)), frame_id: frame_id.into() };
    match &msg.result {
        TaskResult::Error { .. } => None,
        TaskResult::Detections { detections, .. } | TaskResult::Segmentation { detections, .. } => {
            let detections = detections
                .iter()
                .map(|d| {
                    let b = &d.bbox;
                    Detection2D {
                        header: header.clone(),
                        results: vec![ObjectHypothesisWithPose {
                            hypothesis: ObjectHypothesis { class_id: d.label.clone(), score: f64::from(d.score.unwrap_or(0.0)) },
                            pose: Default::default(),
                        }],
                        bbox: BoundingBox2D {
                            center: Pose2D { position: Point2D { x: f64::from(b.x1 + b.x2) / 2.0, y: f64::from(b.y1 + b.y2) / 2.0 }, theta: 0.0 },
                            size_x: f64::from(b.w),
                            size_y: f64::from(b.h),
                        },
                        id: msg.prompt.id.clone(),
                    }
                })
                .collect();
            Some(RosResult::Detections(Detection2DArray { header, detections }))
        }
        other => Some(RosResult::Text(StringMsg { data: other.text().unwrap_or_default().to_string() })),
    }
}
