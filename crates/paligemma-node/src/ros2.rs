//! The node as a ROS 2 node on `rmw_zenoh`, speaking its wire format directly: a
//! liveliness token for the node and for each publisher (so that `ros2 node list`,
//! `ros2 topic list` and `ros2 topic echo` see them), and each standing prompt's
//! results as CDR samples with the `rmw_zenoh` attachment, on the topic's key.
use crate::config::Ros2Config;
use anyhow::{Result, anyhow};
use paligemma_ros2::keys::{EntityKind, NodeName, attachment, gid, topic_key};
use paligemma_ros2::msgs::{DiagnosticArray, to_cdr};
use paligemma_ros2::results::to_ros;
use paligemma_stream::ResultMessage;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use zenoh::Wait;
use zenoh::liveliness::LivelinessToken;

/// One topic this node publishes.
struct Publisher {
    key: String,
    gid: [u8; 16],
    /// Sequence number of the last sample (the first one is 1).
    sequence: i64,
    _token: LivelinessToken,
}

/// The ROS 2 side of the node.
pub struct Ros2 {
    session: zenoh::Session,
    cfg: Ros2Config,
    node: NodeName,
    _node_token: LivelinessToken,
    /// By topic and type, declared when they first publish.
    publishers: Mutex<HashMap<(String, &'static str), Publisher>>,
    /// Entity ids after the node's own (0).
    next_entity: AtomicU64,
}

/// A name as a ROS 2 name chunk (letters, digits and `_`).
fn ros_name(name: &str) -> String {
    name.replace('-', "_")
}

impl Ros2 {
    /// Declares the node on the graph.
    pub fn start(session: &zenoh::Session, cfg: &Ros2Config) -> Result<Ros2> {
        let namespace = if cfg.namespace.is_empty() {
            "/".to_string()
        } else {
            cfg.namespace.clone()
        };
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !s.starts_with(|c: char| c.is_ascii_digit())
        };
        if !valid(&cfg.node_name)
            || !namespace.starts_with('/')
            || !namespace
                .split('/')
                .skip(1)
                .all(|s| s.is_empty() || valid(s))
        {
            anyhow::bail!(
                "ros2: node {:?} in namespace {:?}: ROS 2 names are letters, digits and _, namespaces start with /",
                cfg.node_name,
                namespace
            );
        }
        let node = NodeName {
            domain: cfg.domain_id,
            zid: session.zid().to_string(),
            id: 0,
            namespace,
            name: cfg.node_name.clone(),
        };
        let token = session
            .liveliness()
            .declare_token(node.token())
            .wait()
            .map_err(|e| anyhow!("ros2 node token: {e}"))?;
        tracing::info!(
            "ROS 2 node {}/{} on domain {}",
            node.namespace.trim_end_matches('/'),
            node.name,
            cfg.domain_id
        );
        Ok(Ros2 {
            session: session.clone(),
            cfg: cfg.clone(),
            node,
            _node_token: token,
            publishers: Mutex::default(),
            next_entity: AtomicU64::new(1),
        })
    }

    /// Announces a publisher or subscription of `topic` on the graph: its data key, its
    /// liveliness token's key (a publisher's gid is taken from it) and the token.
    fn declare(
        &self,
        kind: EntityKind,
        topic: &str,
        ros_type: &str,
    ) -> Result<(String, String, LivelinessToken)> {
        let missing = || anyhow!("ros2: no type hash for {ros_type}");
        let key =
            topic_key(self.cfg.domain_id, topic, ros_type, self.cfg.distro).ok_or_else(missing)?;
        let id = self.next_entity.fetch_add(1, Ordering::Relaxed);
        let token_key = self
            .node
            .entity_token(id, kind, topic, ros_type, self.cfg.distro, self.cfg.depth)
            .ok_or_else(missing)?;
        let token = self
            .session
            .liveliness()
            .declare_token(token_key.as_str())
            .wait()
            .map_err(|e| anyhow!("ros2 {kind:?} token: {e}"))?;
        tracing::info!("ROS 2 {kind:?} {topic} ({ros_type})");
        Ok((key, token_key, token))
    }

    /// Announces a subscription of `topic` and returns the key its samples come on,
    /// with the token that keeps it announced.
    pub fn subscription(&self, topic: &str, ros_type: &str) -> Result<(String, LivelinessToken)> {
        let (key, _, token) = self.declare(EntityKind::Subscription, topic, ros_type)?;
        Ok((key, token))
    }

    /// `<namespace>/<node>/<camera>/<prompt id>`.
    pub fn topic(&self, camera: &str, prompt: &str) -> String {
        format!(
            "{}/{}/{}/{}",
            self.node.namespace.trim_end_matches('/'),
            self.node.name,
            ros_name(camera),
            ros_name(prompt)
        )
    }

    /// Publishes a result on its prompt's topic, and a segmentation's masks on
    /// `<topic>/mask` (errors stay on the node's own keys).
    pub fn publish(&self, camera: &str, frame_id: &str, msg: &ResultMessage) -> Result<()> {
        for ros in to_ros(msg, frame_id) {
            let topic = format!("{}{}", self.topic(camera, &msg.prompt.id), ros.subtopic());
            self.put(&topic, ros.ros_type(), ros.to_cdr())?;
        }
        Ok(())
    }

    /// Publishes the node's health on `/diagnostics`, where `rqt_robot_monitor` and the
    /// `diagnostic_aggregator` read every driver's.
    pub fn diagnostics(&self, array: &DiagnosticArray) -> Result<()> {
        self.put(
            "/diagnostics",
            "diagnostic_msgs/msg/DiagnosticArray",
            to_cdr(array),
        )
    }

    /// Puts a CDR sample on `topic`, declaring its publisher the first time.
    fn put(&self, topic: &str, ros_type: &'static str, cdr: Vec<u8>) -> Result<()> {
        let mut publishers = self.publishers.lock().unwrap_or_else(|e| e.into_inner());
        let publisher = match publishers.entry((topic.to_string(), ros_type)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let (key, token_key, token) =
                    self.declare(EntityKind::Publisher, topic, ros_type)?;
                e.insert(Publisher {
                    key,
                    gid: gid(&token_key),
                    sequence: 0,
                    _token: token,
                })
            }
        };
        publisher.sequence += 1;
        let now = paligemma_stream::message::unix_time_ns().unwrap_or(0) as i64;
        self.session
            .put(publisher.key.as_str(), cdr)
            .attachment(attachment(publisher.sequence, now, &publisher.gid))
            .wait()
            .map_err(|e| anyhow!("ros2 put on {}: {e}", publisher.key))
    }
}
