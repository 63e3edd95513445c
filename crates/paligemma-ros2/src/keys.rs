//! The `rmw_zenoh` wire format around a message: the key expression of a topic, the
//! attachment every sample carries, and the liveliness tokens by which ROS 2 tools
//! (`ros2 node list`, `ros2 topic list`, `ros2 topic echo`) discover nodes, publishers
//! and subscriptions. As in ros2/rmw_zenoh's design notes and its
//! `liveliness_utils.cpp` / `attachment_helpers.cpp`.
use crate::type_hash::rihs01;
use paligemma_stream::{Error, Result};

/// Which ROS 2 distributions the keys are for: Jazzy, Kilted and Rolling put the
/// type's RIHS01 hash in keys and tokens, Humble a fixed placeholder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distro {
    #[default]
    Jazzy,
    Humble,
}

/// `vision_msgs/msg/Detection2DArray` -> `vision_msgs::msg::dds_::Detection2DArray_`.
pub fn dds_type_name(ros_type: &str) -> String {
    let (package, name) = ros_type.split_once("/msg/").unwrap_or(("", ros_type));
    format!("{package}::msg::dds_::{name}_")
}

/// The type hash part of keys and tokens; none for a type the node does not describe.
pub fn type_hash(distro: Distro, ros_type: &str) -> Option<String> {
    match distro {
        Distro::Jazzy => rihs01(ros_type),
        Distro::Humble => Some("TypeHashNotSupported".into()),
    }
}

/// The key a topic's samples are put on: `<domain>/<topic>/<dds type>/<hash>`, the
/// topic without its leading and trailing `/` (the slashes inside stay).
pub fn topic_key(domain: u32, topic: &str, ros_type: &str, distro: Distro) -> Option<String> {
    let topic = topic.strip_prefix('/').unwrap_or(topic);
    let topic = topic.strip_suffix('/').unwrap_or(topic);
    Some(format!(
        "{domain}/{topic}/{}/{}",
        dds_type_name(ros_type),
        type_hash(distro, ros_type)?
    ))
}

/// A name as one chunk of a liveliness token: every `/` becomes `%` (so the root
/// namespace and the default enclave are both `%`).
pub fn mangle(name: &str) -> String {
    name.replace('/', "%")
}

/// The QoS chunk of a token for reliable, volatile, keep-last `depth` (the defaults
/// stay empty: `::,10:,:,:,,` for a depth of 10).
pub fn qos_reliable_volatile(depth: u32) -> String {
    format!("::,{depth}:,:,:,,")
}

/// What a liveliness token announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntityKind {
    Node,
    Publisher,
    Subscription,
}

impl EntityKind {
    fn code(self) -> &'static str {
        match self {
            EntityKind::Node => "NN",
            EntityKind::Publisher => "MP",
            EntityKind::Subscription => "MS",
        }
    }
}

/// A ROS 2 node as the graph sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeName {
    pub domain: u32,
    /// The Zenoh session's id as Zenoh prints it.
    pub zid: String,
    /// The node's entity id (a counter per process, shared with its entities).
    pub id: u64,
    /// `/` for the root namespace.
    pub namespace: String,
    pub name: String,
}

impl NodeName {
    fn prefix(&self, entity: u64, kind: EntityKind) -> String {
        format!(
            "@ros2_lv/{}/{}/{}/{entity}/{}/%/{}/{}",
            self.domain,
            self.zid,
            self.id,
            kind.code(),
            mangle(&self.namespace),
            self.name
        )
    }

    /// The node's own token.
    pub fn token(&self) -> String {
        self.prefix(self.id, EntityKind::Node)
    }

    /// The token of a publisher or subscription of this node (entity id `entity`).
    pub fn entity_token(
        &self,
        entity: u64,
        kind: EntityKind,
        topic: &str,
        ros_type: &str,
        distro: Distro,
        depth: u32,
    ) -> Option<String> {
        Some(format!(
            "{}/{}/{}/{}/{}",
            self.prefix(entity, kind),
            mangle(topic),
            dds_type_name(ros_type),
            type_hash(distro, ros_type)?,
            qos_reliable_volatile(depth)
        ))
    }
}

/// A publisher's global id: the XXH3-128 of its liveliness token, low half first.
pub fn gid(token: &str) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(token.as_bytes()).to_le_bytes()
}

/// The attachment of a sample: sequence number (from 1), source time (ns since the
/// Unix epoch), publisher gid, as Zenoh's serializer writes them: two i64 little-endian,
/// then the gid with its length (16) in front.
pub fn attachment(sequence: i64, source_timestamp_ns: i64, gid: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(33);
    out.extend(sequence.to_le_bytes());
    out.extend(source_timestamp_ns.to_le_bytes());
    out.push(16);
    out.extend(gid);
    out
}

/// Reads an attachment written by [`attachment`] (or by a ROS 2 publisher).
pub fn parse_attachment(bytes: &[u8]) -> Result<(i64, i64, [u8; 16])> {
    if bytes.len() != 33 || bytes[16] != 16 {
        return Err(Error::Frame(format!(
            "a ROS 2 sample attachment of {} bytes: expected 33 (sequence, timestamp, 16-byte gid)",
            bytes.len()
        )));
    }
    let i64_at = |i: usize| i64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    Ok((
        i64_at(0),
        i64_at(8),
        bytes[17..33].try_into().expect("16 bytes"),
    ))
}
