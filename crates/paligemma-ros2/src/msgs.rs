//! The ROS 2 messages the node speaks, as serde structs laid out field for field like
//! their IDL (so that CDR, which is positional, reads them as ROS does), with their
//! CDR encoding: little-endian, the 4-byte encapsulation header, each primitive
//! aligned to its size from the start of the payload (the `cdr` crate).
use paligemma_stream::{Error, Result};
use serde::{Deserialize, Serialize};

/// `builtin_interfaces/msg/Time`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Time {
    pub sec: i32,
    pub nanosec: u32,
}

impl Time {
    /// The time `ns` nanoseconds after the Unix epoch (saturating at the range of `sec`).
    pub fn from_unix_ns(ns: u64) -> Time {
        Time {
            sec: (ns / 1_000_000_000).min(i32::MAX as u64) as i32,
            nanosec: (ns % 1_000_000_000) as u32,
        }
    }

    pub fn to_unix_ns(self) -> Option<u64> {
        u64::try_from(self.sec)
            .ok()
            .map(|s| s * 1_000_000_000 + u64::from(self.nanosec))
    }
}

/// `std_msgs/msg/Header`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub stamp: Time,
    pub frame_id: String,
}

/// `std_msgs/msg/String`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StringMsg {
    pub data: String,
}

/// `geometry_msgs/msg/Point`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub z: f64,
}

/// `geometry_msgs/msg/Quaternion` (the identity by default, as in ROS).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quaternion {
    pub x: f64,
    pub y: f64,
    pub z: f64,
    pub w: f64,
}

impl Default for Quaternion {
    fn default() -> Self {
        Quaternion {
            x: 0.0,
            y: 0.0,
            z: 0.0,
            w: 1.0,
        }
    }
}

/// `geometry_msgs/msg/Pose`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pose {
    pub position: Point,
    pub orientation: Quaternion,
}

/// `float64[36]`: a fixed array, written without a length (serde's arrays stop at 32).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Covariance(pub [f64; 36]);

impl Default for Covariance {
    fn default() -> Self {
        Covariance([0.0; 36])
    }
}

impl Serialize for Covariance {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut t = s.serialize_tuple(36)?;
        for v in &self.0 {
            t.serialize_element(v)?;
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for Covariance {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Covariance;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("36 float64 values")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Covariance, A::Error> {
                let mut out = [0.0; 36];
                for (i, v) in out.iter_mut().enumerate() {
                    *v = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                Ok(Covariance(out))
            }
        }
        d.deserialize_tuple(36, Visitor)
    }
}

/// `geometry_msgs/msg/PoseWithCovariance`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PoseWithCovariance {
    pub pose: Pose,
    pub covariance: Covariance,
}

/// `vision_msgs/msg/Point2D`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Point2D {
    pub x: f64,
    pub y: f64,
}

/// `vision_msgs/msg/Pose2D`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pose2D {
    pub position: Point2D,
    pub theta: f64,
}

/// `vision_msgs/msg/BoundingBox2D`: centre and size in pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BoundingBox2D {
    pub center: Pose2D,
    pub size_x: f64,
    pub size_y: f64,
}

/// `vision_msgs/msg/ObjectHypothesis`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectHypothesis {
    pub class_id: String,
    pub score: f64,
}

/// `vision_msgs/msg/ObjectHypothesisWithPose`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectHypothesisWithPose {
    pub hypothesis: ObjectHypothesis,
    pub pose: PoseWithCovariance,
}

/// `vision_msgs/msg/Detection2D`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Detection2D {
    pub header: Header,
    pub results: Vec<ObjectHypothesisWithPose>,
    pub bbox: BoundingBox2D,
    pub id: String,
}

/// `vision_msgs/msg/Detection2DArray`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Detection2DArray {
    pub header: Header,
    pub detections: Vec<Detection2D>,
}

/// `sensor_msgs/msg/Image`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub header: Header,
    pub height: u32,
    pub width: u32,
    pub encoding: String,
    pub is_bigendian: u8,
    pub step: u32,
    #[serde(with = "serde_bytes_as_seq")]
    pub data: Vec<u8>,
}

/// `sensor_msgs/msg/CompressedImage`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompressedImage {
    pub header: Header,
    pub format: String,
    #[serde(with = "serde_bytes_as_seq")]
    pub data: Vec<u8>,
}

/// `diagnostic_msgs/msg/KeyValue`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

/// `diagnostic_msgs/msg/DiagnosticStatus`: one component's health, as
/// `rqt_robot_monitor` and the `diagnostic_aggregator` read it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiagnosticStatus {
    /// One of [`DiagnosticStatus::OK`], `WARN`, `ERROR`, `STALE`.
    pub level: u8,
    pub name: String,
    pub message: String,
    pub hardware_id: String,
    pub values: Vec<KeyValue>,
}

impl DiagnosticStatus {
    pub const OK: u8 = 0;
    pub const WARN: u8 = 1;
    pub const ERROR: u8 = 2;
    pub const STALE: u8 = 3;
}

/// `diagnostic_msgs/msg/DiagnosticArray`, published on `/diagnostics`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiagnosticArray {
    pub header: Header,
    pub status: Vec<DiagnosticStatus>,
}

/// `uint8[]` as CDR writes it: a u32 count and the bytes, read and written in one go
/// rather than element by element.
mod serde_bytes_as_seq {
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte sequence")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(Visitor)
    }
}

/// The CDR (little-endian) encoding of a message, encapsulation header included.
pub fn to_cdr<T: Serialize>(msg: &T) -> Vec<u8> {
    cdr::serialize::<_, _, cdr::CdrLe>(msg, cdr::Infinite)
        .expect("the node's messages always serialise")
}

/// A message from CDR bytes (either byte order, as the encapsulation header says), of
/// at most `max_bytes`; every length in it is checked against the bytes it has.
pub fn from_cdr<T: serde::de::DeserializeOwned>(bytes: &[u8], max_bytes: u64) -> Result<T> {
    if bytes.len() as u64 > max_bytes {
        return Err(Error::Frame(format!(
            "a CDR message of {} bytes is larger than the limit of {max_bytes}",
            bytes.len()
        )));
    }
    let mut reader = crate::cdr_read::Reader::new(bytes)
        .map_err(|e| Error::Frame(format!("not a valid CDR message: {e}")))?;
    T::deserialize(&mut reader).map_err(|e| Error::Frame(format!("not a valid CDR message: {e}")))
}
