//! RIHS01 type hashes (REP 2011), which ROS 2 Jazzy and later put in every topic's key
//! and liveliness token: the SHA-256 of a JSON type description of the message and of
//! every type it references, with the field type ids of `type_description_interfaces`.
use sha2::{Digest, Sha256};

/// How a field is typed, as far as the messages here need.
#[derive(Clone, Copy, Debug)]
pub enum FieldType {
    Int32,
    Uint8,
    /// `byte` (an octet, apart from `uint8` in the type description).
    Byte,
    Uint32,
    Float64,
    String,
    /// Another message.
    Nested(&'static str),
    /// An unbounded sequence of a message.
    Sequence(&'static str),
    /// `uint8[]`.
    Bytes,
    /// `float64[N]`.
    Float64Array(usize),
}

impl FieldType {
    /// (type id, capacity, nested type name) as `type_description_interfaces/FieldType`
    /// numbers them: primitives 1..=21, +48 for fixed arrays, +144 for unbounded
    /// sequences.
    fn id(self) -> (u32, usize, &'static str) {
        const NESTED: u32 = 1;
        const UINT8: u32 = 3;
        const INT32: u32 = 6;
        const UINT32: u32 = 7;
        const FLOAT64: u32 = 11;
        const BYTE: u32 = 16;
        const STRING: u32 = 17;
        const ARRAY: u32 = 48;
        const SEQUENCE: u32 = 144;
        match self {
            FieldType::Int32 => (INT32, 0, ""),
            FieldType::Uint8 => (UINT8, 0, ""),
            FieldType::Byte => (BYTE, 0, ""),
            FieldType::Uint32 => (UINT32, 0, ""),
            FieldType::Float64 => (FLOAT64, 0, ""),
            FieldType::String => (STRING, 0, ""),
            FieldType::Nested(t) => (NESTED, 0, t),
            FieldType::Sequence(t) => (SEQUENCE + NESTED, 0, t),
            FieldType::Bytes => (SEQUENCE + UINT8, 0, ""),
            FieldType::Float64Array(n) => (ARRAY + FLOAT64, n, ""),
        }
    }
}

/// A message type: its full name (`pkg/msg/Name`) and fields in order.
pub struct TypeDescription {
    pub name: &'static str,
    pub fields: &'static [(&'static str, FieldType)],
}

use FieldType::{Byte, Bytes, Float64, Float64Array, Int32, Nested, Sequence, Uint8, Uint32};

/// Every type the node's messages use.
pub const TYPES: &[TypeDescription] = &[
    TypeDescription {
        name: "builtin_interfaces/msg/Time",
        fields: &[("sec", Int32), ("nanosec", Uint32)],
    },
    TypeDescription {
        name: "std_msgs/msg/Header",
        fields: &[
            ("stamp", Nested("builtin_interfaces/msg/Time")),
            ("frame_id", FieldType::String),
        ],
    },
    TypeDescription {
        name: "std_msgs/msg/String",
        fields: &[("data", FieldType::String)],
    },
    TypeDescription {
        name: "geometry_msgs/msg/Point",
        fields: &[("x", Float64), ("y", Float64), ("z", Float64)],
    },
    TypeDescription {
        name: "geometry_msgs/msg/Quaternion",
        fields: &[
            ("x", Float64),
            ("y", Float64),
            ("z", Float64),
            ("w", Float64),
        ],
    },
    TypeDescription {
        name: "geometry_msgs/msg/Pose",
        fields: &[
            ("position", Nested("geometry_msgs/msg/Point")),
            ("orientation", Nested("geometry_msgs/msg/Quaternion")),
        ],
    },
    TypeDescription {
        name: "geometry_msgs/msg/PoseWithCovariance",
        fields: &[
            ("pose", Nested("geometry_msgs/msg/Pose")),
            ("covariance", Float64Array(36)),
        ],
    },
    TypeDescription {
        name: "vision_msgs/msg/Point2D",
        fields: &[("x", Float64), ("y", Float64)],
    },
    TypeDescription {
        name: "vision_msgs/msg/Pose2D",
        fields: &[
            ("position", Nested("vision_msgs/msg/Point2D")),
            ("theta", Float64),
        ],
    },
    TypeDescription {
        name: "vision_msgs/msg/BoundingBox2D",
        fields: &[
            ("center", Nested("vision_msgs/msg/Pose2D")),
            ("size_x", Float64),
            ("size_y", Float64),
        ],
    },
    TypeDescription {
        name: "vision_msgs/msg/ObjectHypothesis",
        fields: &[("class_id", FieldType::String), ("score", Float64)],
    },
    TypeDescription {
        name: "vision_msgs/msg/ObjectHypothesisWithPose",
        fields: &[
            ("hypothesis", Nested("vision_msgs/msg/ObjectHypothesis")),
            ("pose", Nested("geometry_msgs/msg/PoseWithCovariance")),
        ],
    },
    TypeDescription {
        name: "vision_msgs/msg/Detection2D",
        fields: &[
            ("header", Nested("std_msgs/msg/Header")),
            (
                "results",
                Sequence("vision_msgs/msg/ObjectHypothesisWithPose"),
            ),
            ("bbox", Nested("vision_msgs/msg/BoundingBox2D")),
            ("id", FieldType::String),
        ],
    },
    TypeDescription {
        name: "vision_msgs/msg/Detection2DArray",
        fields: &[
            ("header", Nested("std_msgs/msg/Header")),
            ("detections", Sequence("vision_msgs/msg/Detection2D")),
        ],
    },
    TypeDescription {
        name: "sensor_msgs/msg/Image",
        fields: &[
            ("header", Nested("std_msgs/msg/Header")),
            ("height", Uint32),
            ("width", Uint32),
            ("encoding", FieldType::String),
            ("is_bigendian", Uint8),
            ("step", Uint32),
            ("data", Bytes),
        ],
    },
    TypeDescription {
        name: "sensor_msgs/msg/CompressedImage",
        fields: &[
            ("header", Nested("std_msgs/msg/Header")),
            ("format", FieldType::String),
            ("data", Bytes),
        ],
    },
    TypeDescription {
        name: "diagnostic_msgs/msg/KeyValue",
        fields: &[("key", FieldType::String), ("value", FieldType::String)],
    },
    TypeDescription {
        name: "diagnostic_msgs/msg/DiagnosticStatus",
        fields: &[
            ("level", Byte),
            ("name", FieldType::String),
            ("message", FieldType::String),
            ("hardware_id", FieldType::String),
            ("values", Sequence("diagnostic_msgs/msg/KeyValue")),
        ],
    },
    TypeDescription {
        name: "diagnostic_msgs/msg/DiagnosticArray",
        fields: &[
            ("header", Nested("std_msgs/msg/Header")),
            ("status", Sequence("diagnostic_msgs/msg/DiagnosticStatus")),
        ],
    },
];

fn find(name: &str) -> Option<&'static TypeDescription> {
    TYPES.iter().find(|t| t.name == name)
}

/// `{"type_name": ..., "fields": [...]}` as Python's `json.dumps` writes it (`", "` and
/// `": "` separators), which is what the hash is taken over.
fn describe(t: &TypeDescription) -> String {
    let fields: Vec<String> = t
        .fields
        .iter()
        .map(|(name, ty)| {
            let (id, capacity, nested) = ty.id();
            format!(r#"{{"name": "{name}", "type": {{"type_id": {id}, "capacity": {capacity}, "string_capacity": 0, "nested_type_name": "{nested}"}}}}"#)
        })
        .collect();
    format!(
        r#"{{"type_name": "{}", "fields": [{}]}}"#,
        t.name,
        fields.join(", ")
    )
}

/// Every type `t` references, directly or not, sorted by name.
fn referenced(t: &'static TypeDescription) -> Option<Vec<&'static TypeDescription>> {
    let mut found: Vec<&'static TypeDescription> = Vec::new();
    let mut todo = vec![t];
    while let Some(t) = todo.pop() {
        for (_, ty) in t.fields {
            if let FieldType::Nested(n) | FieldType::Sequence(n) = ty
                && !found.iter().any(|f| f.name == *n)
            {
                let nested = find(n)?;
                found.push(nested);
                todo.push(nested);
            }
        }
    }
    found.sort_unstable_by_key(|t| t.name);
    Some(found)
}

/// The RIHS01 hash of one of the described types (`std_msgs/msg/String` gives
/// `RIHS01_df66...1a18`); none for a type not in [`TYPES`].
pub fn rihs01(name: &str) -> Option<String> {
    let t = find(name)?;
    let refs: Vec<String> = referenced(t)?
        .into_iter()
        .filter(|r| r.name != name)
        .map(describe)
        .collect();
    let json = format!(
        r#"{{"type_description": {}, "referenced_type_descriptions": [{}]}}"#,
        describe(t),
        refs.join(", ")
    );
    let digest = Sha256::digest(json.as_bytes());
    Some(format!(
        "RIHS01_{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}
