//! A pool of nodes sharing the network cameras. Nodes started with the same `pool` and
//! configuration find each other through Zenoh liveliness tokens
//! (`<prefix>/@pool/members/<node>/<capacity in thousandths>`), and each camera whose
//! frames come over the network (a Zenoh key, a ROS 2 topic, a `uri`) is served by
//! exactly one live member: the one with the highest weighted rendezvous score for it,
//! a rule every member computes alike from the same member list, so that a member that
//! comes or goes moves only the cameras it must. A camera on a local `pipeline` stays
//! with its node.
//!
//! A member that leaves (a clean stop, or Zenoh dropping its token when its link
//! breaks) is replaced at once; cameras move to a member that joins after
//! `pool_settle_ms`. Prompt updates are kept by every member, stamped with when they
//! were accepted, and a member that joins asks the others for theirs
//! (`<prefix>/@pool/prompts`), so a camera's prompts follow it. `<prefix>/@pool/status`
//! answers which member serves which camera; each move is logged and published on
//! `<prefix>/@pool/events`.
use crate::camera::{Camera, Node};
use crate::config::CameraConfig;
use anyhow::Result;
use paligemma_stream::PromptSet;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// Whether a camera is the pool's to share (its frames reach any node), rather than
/// its node's own (a local pipeline).
pub fn is_shared(cam: &CameraConfig) -> bool {
    cam.pipeline.is_none()
}

/// A live member and its capacity.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Member {
    pub node: String,
    pub capacity: f64,
}

/// FNV-1a, 64 bits: a hash every build and version of the node computes alike (the
/// standard library's may change between Rust releases, and members may differ).
/// The parts are joined with a 0 byte, which no name holds.
fn fnv1a(parts: &[&str]) -> u64 {
    let bytes = parts.join("\0");
    bytes.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64's finaliser, so that nearby names give unrelated scores.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The weighted rendezvous score of `member` for `camera`: `-capacity / ln(u)` with
/// `u` uniform in (0, 1) from the hash of both names, so that each member wins a share
/// of the cameras proportional to its capacity.
fn score(camera: &str, member: &Member) -> f64 {
    let h = mix(fnv1a(&[camera, &member.node]));
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -member.capacity / u.ln()
}

/// The member that serves `camera`: the highest score, ties to the smaller name.
pub fn owner<'a>(camera: &str, members: &'a [Member]) -> Option<&'a Member> {
    members.iter().max_by(|a, b| {
        score(camera, a)
            .total_cmp(&score(camera, b))
            .then_with(|| b.node.cmp(&a.node))
    })
}

/// How long a camera this member could not start waits before it is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// A member's token key, and back.
fn member_key(prefix: &str, node: &str, capacity: f64) -> String {
    format!(
        "{prefix}/@pool/members/{node}/{}",
        (capacity * 1000.0).round() as u64
    )
}

fn parse_member(prefix: &str, key: &str) -> Option<Member> {
    let rest = key.strip_prefix(&format!("{prefix}/@pool/members/"))?;
    let (node, capacity) = rest.split_once('/')?;
    let capacity = capacity.parse::<u64>().ok()? as f64 / 1000.0;
    (paligemma_stream::prompts::is_name(node) && capacity > 0.0).then(|| Member {
        node: node.into(),
        capacity,
    })
}

/// A camera's prompts as members exchange them.
#[derive(serde::Serialize, serde::Deserialize)]
struct StampedPrompts {
    prompts: serde_json::Value,
    updated_unix_ns: u64,
}

/// The node's part in the pool: the controller task and the cameras it serves.
pub struct Pool {
    task: tokio::task::JoinHandle<Controller>,
    stop: tokio::sync::oneshot::Sender<()>,
}

struct Controller {
    node: Node,
    name: String,
    prefix: String,
    me: Member,
    cameras: Vec<CameraConfig>,
    /// Live member tokens by key, each with when it was seen (a member that restarts
    /// with another capacity has two until the old one's session is gone: the newer
    /// counts).
    tokens: BTreeMap<String, (u64, Member)>,
    seen: u64,
    /// The cameras this node serves, and who served each when the rule last ran.
    serving: BTreeMap<String, Camera>,
    owners: BTreeMap<String, String>,
}

impl Pool {
    /// Joins the pool `name`: gathers the pool's prompts, declares this member, and
    /// serves its share of `cameras` from now on.
    pub async fn join(node: Node, name: &str, cameras: Vec<CameraConfig>) -> Result<Pool> {
        let cfg = node.cfg.clone();
        let prefix = cfg.prefix();
        // Its capacity as the others read it from its token (thousandths), so that every
        // member computes the rule with the same numbers.
        let my_key = member_key(&prefix, &cfg.node, cfg.capacity);
        let me = parse_member(&prefix, &my_key)
            .ok_or_else(|| anyhow::anyhow!("pool: {my_key} is not a member key"))?;
        let session = node.session.clone();
        let mut controller = Controller {
            node,
            name: name.into(),
            prefix: prefix.clone(),
            me: me.clone(),
            cameras,
            tokens: BTreeMap::new(),
            seen: 0,
            serving: BTreeMap::new(),
            owners: BTreeMap::new(),
        };
        controller.gather_prompts().await;
        let members_key = format!("{prefix}/@pool/members/**");
        let members_sub = session
            .liveliness()
            .declare_subscriber(members_key.as_str())
            .history(true)
            .await
            .map_err(|e| anyhow::anyhow!("pool members {members_key}: {e}"))?;
        let token = session
            .liveliness()
            .declare_token(my_key.as_str())
            .await
            .map_err(|e| anyhow::anyhow!("pool token: {e}"))?;
        let status = session
            .declare_queryable(format!("{prefix}/@pool/status"))
            .await
            .map_err(|e| anyhow::anyhow!("pool status: {e}"))?;
        let prompts = session
            .declare_queryable(format!("{prefix}/@pool/prompts"))
            .await
            .map_err(|e| anyhow::anyhow!("pool prompts: {e}"))?;
        let updates = session
            .declare_subscriber(format!("{prefix}/*/prompts"))
            .await
            .map_err(|e| anyhow::anyhow!("pool prompt updates: {e}"))?;
        let current = session
            .liveliness()
            .get(members_key.as_str())
            .timeout(Duration::from_secs(2))
            .await
            .map_err(|e| anyhow::anyhow!("pool members: {e}"))?;
        while let Ok(reply) = current.recv_async().await {
            if let Ok(sample) = reply.result() {
                controller.token(sample.key_expr().as_str());
            }
        }
        controller.token(&my_key);
        let members = controller.member_list();
        tracing::info!(
            "pool {name}: joined as {} (capacity {}) with {:?}",
            me.node,
            me.capacity,
            members.iter().map(|m| &m.node).collect::<Vec<_>>()
        );
        // Serve after the settling time, even when no other member answered: the
        // others hand over meanwhile, and a member whose token had not reached this one
        // yet (seen under load through a router) arrives through the subscription
        // instead of this member taking every camera and giving them back.
        let settle = Duration::from_millis(controller.node.cfg.pool_settle_ms);
        let first = Instant::now() + settle;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let subscriber = members_sub;
        let task = tokio::spawn(async move {
            let _token = token;
            controller
                .run(subscriber, status, prompts, updates, first, settle, stopped)
                .await;
            controller
        });
        Ok(Pool { task, stop })
    }

    /// Leaves the pool (its token goes first, so that the others take over at once) and
    /// stops the cameras this node served.
    pub async fn stop(self, finish: bool) {
        let _ = self.stop.send(());
        if let Ok(controller) = self.task.await {
            for (_, camera) in controller.serving {
                controller.node.stop_camera(camera, finish).await;
            }
        }
    }
}

type Queryable = zenoh::query::Queryable<zenoh::handlers::FifoChannelHandler<zenoh::query::Query>>;
type Subscriber =
    zenoh::pubsub::Subscriber<zenoh::handlers::FifoChannelHandler<zenoh::sample::Sample>>;

impl Controller {
    /// Records a member token; whether it names a member.
    fn token(&mut self, key: &str) -> bool {
        let Some(member) = parse_member(&self.prefix, key) else {
            return false;
        };
        self.seen += 1;
        self.tokens.insert(key.to_string(), (self.seen, member));
        true
    }

    /// The live members, one per node (its newest token), by name.
    fn member_list(&self) -> Vec<Member> {
        let mut newest: BTreeMap<&str, (u64, &Member)> = BTreeMap::new();
        for (seen, m) in self.tokens.values() {
            let entry = newest.entry(&m.node).or_insert((*seen, m));
            if *seen > entry.0 {
                *entry = (*seen, m);
            }
        }
        newest.into_values().map(|(_, m)| m.clone()).collect()
    }

    fn has(&self, node: &str) -> bool {
        self.tokens.values().any(|(_, m)| m.node == node)
    }

    /// Takes the newest prompts each other member knows (before serving anything).
    async fn gather_prompts(&mut self) {
        let Some(persisted) = self.node.persisted.clone() else {
            return;
        };
        let Ok(replies) = self
            .node
            .session
            .get(format!("{}/@pool/prompts", self.prefix))
            // Every member answers on the same key: keep every reply.
            .consolidation(zenoh::query::ConsolidationMode::None)
            .timeout(Duration::from_secs(2))
            .await
        else {
            return;
        };
        while let Ok(reply) = replies.recv_async().await {
            let Ok(sample) = reply.result() else { continue };
            let Ok(known) = serde_json::from_slice::<BTreeMap<String, StampedPrompts>>(
                &sample.payload().to_bytes(),
            ) else {
                continue;
            };
            for (camera, p) in known {
                // Only the pool's cameras: a member's own cameras are its business.
                if !self.cameras.iter().any(|c| c.name == camera) {
                    continue;
                }
                let Ok(set) = PromptSet::from_json(&p.prompts.to_string()) else {
                    continue;
                };
                if let Ok(true) = persisted.state.merge(&camera, &set, p.updated_unix_ns) {
                    tracing::info!(
                        "pool {}: prompts of camera {camera} from the pool",
                        self.name
                    );
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &mut self,
        members: Subscriber,
        status: Queryable,
        prompts: Queryable,
        updates: Subscriber,
        first: Instant,
        settle: Duration,
        mut stopped: tokio::sync::oneshot::Receiver<()>,
    ) {
        let mut due = Some(first);
        loop {
            let wake = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep_until(wake), if due.is_some() => {
                    due = (!self.apply().await).then(|| Instant::now() + RETRY);
                }
                Ok(sample) = members.recv_async() => {
                    let key = sample.key_expr().as_str();
                    let Some(m) = parse_member(&self.prefix, key) else {
                        continue;
                    };
                    if m.node == self.me.node {
                        continue;
                    }
                    let settled = Instant::now() + settle;
                    match sample.kind() {
                        zenoh::sample::SampleKind::Put => {
                            if self.tokens.contains_key(key) {
                                continue;
                            }
                            let joined = !self.has(&m.node);
                            self.token(key);
                            tracing::info!(
                                "pool {}: {} {} (capacity {})",
                                self.name,
                                m.node,
                                if joined { "joined" } else { "is back" },
                                m.capacity
                            );
                            // Cameras move to a newcomer (or follow a new capacity) once
                            // it has settled.
                            due = Some(due.map_or(settled, |d| d.min(settled)));
                        }
                        zenoh::sample::SampleKind::Delete => {
                            if self.tokens.remove(key).is_none() {
                                continue;
                            }
                            if self.has(&m.node) {
                                // An older token of a member still there.
                                due = Some(due.map_or(settled, |d| d.min(settled)));
                            } else {
                                tracing::warn!("pool {}: {} left", self.name, m.node);
                                if !self.apply().await {
                                    due = Some(Instant::now() + RETRY);
                                }
                            }
                        }
                    }
                }
                Ok(query) = status.recv_async() => {
                    let body = serde_json::json!({
                        "schema": "paligemma.pool/1",
                        "pool": self.name,
                        "node": self.me.node,
                        "members": self.member_list(),
                        "cameras": self.owners,
                        "serving": self.serving.keys().collect::<Vec<_>>(),
                    });
                    let _ = query.reply(query.key_expr().clone(), body.to_string()).await;
                }
                Ok(query) = prompts.recv_async() => {
                    if let Some(persisted) = &self.node.persisted {
                        let known: BTreeMap<String, StampedPrompts> = persisted
                            .state
                            .all()
                            .into_iter()
                            .filter_map(|(camera, (set, stamp))| {
                                Some((camera, StampedPrompts {
                                    prompts: serde_json::to_value(&set).ok()?,
                                    updated_unix_ns: stamp,
                                }))
                            })
                            .collect();
                        let body = serde_json::to_string(&known).unwrap_or_default();
                        let _ = query.reply(query.key_expr().clone(), body).await;
                    }
                }
                Ok(sample) = updates.recv_async() => self.remember(&sample),
            }
        }
    }

    /// Keeps an accepted prompt update of a pool camera this node does not serve (the
    /// serving member applies it), so that the prompts follow the camera if it moves here.
    fn remember(&self, sample: &zenoh::sample::Sample) {
        let (Some(persisted), true) = (&self.node.persisted, self.node.cfg.allow_prompt_updates)
        else {
            return;
        };
        let key = sample.key_expr().as_str();
        let Some(camera) = key
            .strip_prefix(&format!("{}/", self.prefix))
            .and_then(|k| k.strip_suffix("/prompts"))
        else {
            return;
        };
        if sample.kind() != zenoh::sample::SampleKind::Put
            || self.serving.contains_key(camera)
            || !self.cameras.iter().any(|c| c.name == camera)
        {
            return;
        }
        if let Ok(set) = paligemma_stream::payload::parse_prompts(&sample.payload().to_bytes()) {
            let _ = persisted.state.save(camera, &set);
        }
    }

    /// Runs the rule over the live members: starts the cameras that are now this
    /// node's, stops those that are another's, and says so. False when a camera of this
    /// node's could not start (tried again after [`RETRY`]).
    async fn apply(&mut self) -> bool {
        let members = self.member_list();
        let mut owners = BTreeMap::new();
        for cam in &self.cameras {
            if let Some(owner) = owner(&cam.name, &members) {
                owners.insert(cam.name.clone(), owner.node.clone());
            }
        }
        let leaving: Vec<String> = self
            .serving
            .keys()
            .filter(|c| owners.get(*c) != Some(&self.me.node))
            .cloned()
            .collect();
        for name in leaving {
            if let Some(camera) = self.serving.remove(&name) {
                let to = owners.get(&name).cloned().unwrap_or_default();
                self.node.stop_camera(camera, false).await;
                self.event(&name, &self.me.node.clone(), &to);
            }
        }
        let taking: Vec<CameraConfig> = self
            .cameras
            .iter()
            .filter(|c| {
                owners.get(&c.name) == Some(&self.me.node) && !self.serving.contains_key(&c.name)
            })
            .cloned()
            .collect();
        // Who served a camera before, as far as this member knows: the rule's owner at the
        // last run, or (on joining) the owner among the others.
        let others: Vec<Member> = members
            .iter()
            .filter(|m| m.node != self.me.node)
            .cloned()
            .collect();
        let mut started = true;
        for cam in taking {
            let from = self
                .owners
                .get(&cam.name)
                .cloned()
                .or_else(|| owner(&cam.name, &others).map(|m| m.node.clone()))
                .unwrap_or_default();
            match self.node.start_camera(&cam).await {
                Ok(camera) => {
                    self.serving.insert(cam.name.clone(), camera);
                    self.event(&cam.name, &from, &self.me.node.clone());
                }
                Err(e) => {
                    started = false;
                    tracing::error!(
                        "pool {}: camera {} could not start here, trying again in {RETRY:?}: {e:#}",
                        self.name,
                        cam.name
                    );
                }
            }
        }
        self.owners = owners;
        started
    }

    /// Logs and publishes a camera's move.
    fn event(&self, camera: &str, from: &str, to: &str) {
        tracing::info!(
            "pool {}: camera {camera} moves from {} to {to}",
            self.name,
            if from.is_empty() { "nobody" } else { from }
        );
        let body = serde_json::json!({
            "pool": self.name,
            "reported_by": self.me.node,
            "camera": camera,
            "from": from,
            "to": to,
            "members": self.member_list().iter().map(|m| m.node.clone()).collect::<Vec<_>>(),
            "unix_ns": paligemma_stream::message::unix_time_ns(),
        });
        let session = self.node.session.clone();
        let key = format!("{}/@pool/events", self.prefix);
        tokio::spawn(async move {
            let _ = session.put(key, body.to_string()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(spec: &[(&str, f64)]) -> Vec<Member> {
        spec.iter()
            .map(|&(node, capacity)| Member {
                node: node.into(),
                capacity,
            })
            .collect()
    }

    fn split(cameras: &[String], members: &[Member]) -> BTreeMap<String, String> {
        cameras
            .iter()
            .map(|c| (c.clone(), owner(c, members).unwrap().node.clone()))
            .collect()
    }

    #[test]
    fn the_rule_moves_only_what_it_must_and_follows_capacity() {
        let cameras: Vec<String> = (0..3000).map(|i| format!("cam{i}")).collect();
        let three = members(&[("a", 1.0), ("b", 1.0), ("c", 1.0)]);
        let before = split(&cameras, &three);
        // Each member gets about a third.
        for m in ["a", "b", "c"] {
            let n = before.values().filter(|o| *o == m).count();
            println!("{m}: {n} of 3000");
            assert!((900..1100).contains(&n), "{m}: {n}");
        }
        // b leaves: only b's cameras move, spread over a and c.
        let two = members(&[("a", 1.0), ("c", 1.0)]);
        let after = split(&cameras, &two);
        for c in &cameras {
            if before[c] != "b" {
                assert_eq!(before[c], after[c], "{c} moved though its member stayed");
            }
        }
        // A fourth joins: it takes about a quarter, from every member, and nothing
        // else moves.
        let four = members(&[("a", 1.0), ("b", 1.0), ("c", 1.0), ("d", 1.0)]);
        let joined = split(&cameras, &four);
        let moved: Vec<&String> = cameras
            .iter()
            .filter(|c| before[*c] != joined[*c])
            .collect();
        assert!(moved.iter().all(|c| joined[*c] == "d"));
        println!("a fourth member took {}", moved.len());
        assert!((650..850).contains(&moved.len()), "{}", moved.len());
        // Twice the capacity, about twice the cameras.
        let weighted = split(&cameras, &members(&[("a", 2.0), ("b", 1.0)]));
        let a = weighted.values().filter(|o| *o == "a").count();
        println!("capacity 2 against 1: {a} of 3000");
        assert!((1900..2100).contains(&a), "{a}");
        // The order members are listed in does not matter.
        let mut reversed = three.clone();
        reversed.reverse();
        assert_eq!(split(&cameras, &reversed), before);
    }

    #[test]
    fn member_keys_round_trip() {
        let key = member_key("paligemma/site", "jetson-2", 1.5);
        assert_eq!(key, "paligemma/site/@pool/members/jetson-2/1500");
        assert_eq!(
            parse_member("paligemma/site", &key),
            Some(Member {
                node: "jetson-2".into(),
                capacity: 1.5
            })
        );
        for bad in [
            "paligemma/site/@pool/members/x",
            "paligemma/site/@pool/members/x/0",
            "paligemma/site/@pool/members/a b/1000",
            "paligemma/other/@pool/members/x/1000",
        ] {
            assert_eq!(parse_member("paligemma/site", bad), None, "{bad}");
        }
    }
}
