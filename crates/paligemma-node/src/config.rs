//! The node's configuration: one TOML file (see `configs/node.toml`), overridable
//! from the command line.
use anyhow::{Context, Result, bail};
use paligemma::{ContextOptions, WeightOptions};
use paligemma_stream::tracker::TrackerConfig;
use paligemma_stream::{EngineOptions, PromptSet, StandingPrompt, usable_lanes};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Node name, used in the default key prefix and in messages.
    #[serde(default = "default_node")]
    pub node: String,
    /// Key prefix (default `paligemma/<node>`, or `paligemma/<pool>` in a pool, so that a
    /// camera's keys stay the same whichever node serves it).
    pub prefix: Option<String>,
    /// A pool of nodes sharing the network cameras (see `pool.rs`): every node started
    /// with the same pool name and configuration serves its share.
    pub pool: Option<String>,
    /// This node's share of the pool's cameras relative to the others (default 1).
    #[serde(default = "default_capacity")]
    pub capacity: f64,
    /// Milliseconds a node that joins the pool waits before cameras move to it, so that a
    /// node that comes and goes does not move cameras back and forth; a node that
    /// leaves is replaced at once.
    #[serde(default = "default_pool_settle")]
    pub pool_settle_ms: u64,
    /// Encoding of published messages.
    #[serde(default)]
    pub encoding: Encoding,
    /// Seconds between status messages (0: none).
    #[serde(default = "default_status")]
    pub status_interval_s: f64,
    /// Longest an `ask` may take before its reply is an error.
    #[serde(default = "default_ask_timeout")]
    pub ask_timeout_ms: u64,
    /// Longest accepted `ask` prompt, in bytes.
    #[serde(default = "default_max_prompt")]
    pub max_prompt_bytes: usize,
    /// Largest frame (width x height) accepted from a camera's Zenoh key; larger ones
    /// are refused from their header, before decoding.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: usize,
    /// On SIGINT/SIGTERM: finish the work in progress, or drop it.
    #[serde(default)]
    pub on_shutdown: OnShutdown,
    /// Whether a put on `<prefix>/<camera>/prompts` may replace a camera's standing
    /// prompts. Off unless asked for: whoever can reach the node could otherwise change
    /// what the robot looks for. Who may put is then up to Zenoh's access control.
    #[serde(default)]
    pub allow_prompt_updates: bool,
    /// Where accepted prompt updates are kept across restarts (see `state.rs`); relative
    /// to the configuration file. Default: `<config>.state.json` beside it (none for a
    /// node started from flags alone). Read and written only with `allow_prompt_updates`.
    pub state_file: Option<PathBuf>,
    /// Asks the whole node answers per second at most (each costs a prefill on the
    /// robot's cores); asks beyond it, and beyond `ask_burst` at once, get a "busy" reply.
    #[serde(default = "default_ask_rate")]
    pub ask_rate: f64,
    #[serde(default = "default_ask_burst")]
    pub ask_burst: u32,
    /// Refused input (bad frames, refused prompt updates, asks over the rate) is logged
    /// and published in full once per kind and source in this many seconds; repeats are
    /// counted and summed up when the window closes (see `refusals.rs`).
    #[serde(default = "default_refusal_window")]
    pub refusal_window_s: f64,
    /// Messages on a camera's `errors` key per second at most.
    #[serde(default = "default_errors_per_s")]
    pub errors_per_s: usize,
    pub model: ModelConfig,
    #[serde(default)]
    pub zenoh: ZenohConfig,
    #[serde(default)]
    pub ros2: Ros2Config,
    /// Prometheus metrics over HTTP; off without the section.
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(rename = "camera", default)]
    pub cameras: Vec<CameraConfig>,
}

/// `GET /metrics` in the Prometheus text format: each camera's frame and result
/// counters and source state, per-stage latencies, tokens, the node's Zenoh links, the
/// engine's KV cache and the process's memory.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// On when the `[metrics]` section is there; `enabled = false` turns it off.
    #[serde(default = "on_when_present")]
    pub enabled: bool,
    /// Where to listen: loopback by default, so that only this machine (and a
    /// Prometheus agent on it) can read the robot's counters.
    #[serde(default = "default_metrics_listen")]
    pub listen: std::net::SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: false,
            listen: default_metrics_listen(),
        }
    }
}

fn default_metrics_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 9464))
}

fn default_node() -> String {
    "node".into()
}
fn default_status() -> f64 {
    5.0
}
fn default_ask_timeout() -> u64 {
    60_000
}
fn default_max_prompt() -> usize {
    4096
}
fn default_ask_rate() -> f64 {
    4.0
}
fn default_capacity() -> f64 {
    1.0
}
fn default_pool_settle() -> u64 {
    1000
}
fn default_ask_burst() -> u32 {
    8
}
fn default_refusal_window() -> f64 {
    10.0
}
fn default_errors_per_s() -> usize {
    5
}
fn default_max_pixels() -> usize {
    paligemma::preprocess::DEFAULT_MAX_PIXELS
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Json,
    Cbor,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnShutdown {
    /// Abandon the analysis in progress.
    #[default]
    Drop,
    /// Let the analysis in progress finish and publish it (bounded by 30 s).
    Finish,
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub path: PathBuf,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default)]
    pub threads: usize,
    #[serde(default = "default_kv")]
    pub kv_type: String,
    /// Answers decoded together across all cameras (each a KV cache region); 0: the
    /// number of standing prompts of all cameras, at least 4, and with lanes at least
    /// enough for each lane to hold the camera of most prompts.
    #[serde(default)]
    pub max_sequences: usize,
    /// Batches run at once, sharing the threads (see `paligemma_stream::EngineOptions::lanes`);
    /// 0 or 1: one.
    #[serde(default)]
    pub lanes: usize,
}

fn default_device() -> String {
    "cpu".into()
}
fn default_kv() -> String {
    "f16".into()
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZenohConfig {
    /// A zenoh JSON5 configuration file; the fields below override it.
    pub config: Option<PathBuf>,
    /// `peer` or `client`.
    pub mode: Option<String>,
    #[serde(default)]
    pub listen: Vec<String>,
    #[serde(default)]
    pub connect: Vec<String>,
    /// Multicast scouting (off unless set here or in `config`).
    pub multicast_scouting: Option<bool>,
    /// Longest wait, in milliseconds, between tries to reach a router or peer of
    /// `connect` that went away: it bounds how long after a restarted router is back
    /// the node is back too. Default 1000 (tries 250 ms apart at first, then doubling)
    /// unless `config` is given; Zenoh's own default waits up to 4 s.
    pub reconnect_max_ms: Option<u64>,
}

/// [`ZenohConfig::reconnect_max_ms`] when neither it nor a Zenoh file says.
const DEFAULT_RECONNECT_MAX_MS: u64 = 1000;

/// Where the node listens when neither `listen` nor a Zenoh configuration file says:
/// loopback only, so that nothing off this machine reaches it by default (and not
/// 7447, the port of a ROS 2 `rmw_zenohd` router).
pub const DEFAULT_LISTEN: &str = "tcp/127.0.0.1:7448";

/// The node as a ROS 2 node on `rmw_zenoh`, beside its own keys: each standing prompt
/// publishes on `<namespace>/<node_name>/<camera>/<prompt id>` (`-` in names becomes
/// `_`, which ROS names require).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ros2Config {
    /// On when the `[ros2]` section is there (a section that silently did nothing
    /// would leave a robot without its topics); `enabled = false` keeps the settings
    /// and turns it off. Off without the section.
    #[serde(default = "on_when_present")]
    pub enabled: bool,
    /// `ROS_DOMAIN_ID` of the graph.
    #[serde(default)]
    pub domain_id: u32,
    /// The node's namespace (`/` for none).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The ROS 2 node's name (default: `paligemma`).
    #[serde(default = "default_ros_node")]
    pub node_name: String,
    /// `jazzy` (Jazzy, Kilted, Rolling: type hashes in keys) or `humble`.
    #[serde(default)]
    pub distro: paligemma_ros2::keys::Distro,
    /// Keep-last depth the publishers announce (reliable, volatile).
    #[serde(default = "default_depth")]
    pub depth: u32,
    /// Seconds between `diagnostic_msgs/msg/DiagnosticArray` samples on `/diagnostics`
    /// (one status per camera and one for the node); 0 turns them off.
    #[serde(default = "default_diagnostics_period")]
    pub diagnostics_period_s: f64,
}

impl Default for Ros2Config {
    fn default() -> Self {
        Ros2Config {
            enabled: false,
            domain_id: 0,
            namespace: default_namespace(),
            node_name: default_ros_node(),
            distro: Default::default(),
            depth: default_depth(),
            diagnostics_period_s: default_diagnostics_period(),
        }
    }
}

fn on_when_present() -> bool {
    true
}
fn default_namespace() -> String {
    "/".into()
}
fn default_ros_node() -> String {
    "paligemma".into()
}
fn default_depth() -> u32 {
    10
}
fn default_diagnostics_period() -> f64 {
    1.0
}

/// Where a camera's frames come from: exactly one of pipeline, uri, zenoh_key,
/// ros2_image and ros2_compressed_image.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    pub name: String,
    /// A GStreamer pipeline; it should end in `appsink name=sink` (one is appended otherwise).
    pub pipeline: Option<String>,
    /// A URI (file, RTSP, HTTP...) decoded with `uridecodebin`.
    pub uri: Option<String>,
    /// A Zenoh key on which another process publishes frames (JPEG, PNG or raw RGB).
    pub zenoh_key: Option<String>,
    /// A ROS 2 topic of `sensor_msgs/msg/Image` (rgb8, bgr8, rgba8, bgra8, mono8), e.g.
    /// `/camera/image_raw`; needs `[ros2]`.
    pub ros2_image: Option<String>,
    /// A ROS 2 topic of `sensor_msgs/msg/CompressedImage` (JPEG, PNG); needs `[ros2]`.
    pub ros2_compressed_image: Option<String>,
    /// Minimum milliseconds between analysed frames.
    #[serde(default)]
    pub interval_ms: u64,
    /// Skip frames whose mean change (0..255) to the last analysed one is below this.
    pub skip_unchanged_below: Option<f32>,
    #[serde(rename = "prompt", default)]
    pub prompts: Vec<StandingPrompt>,
    /// `frame_id` of the camera's ROS 2 messages (default: the camera's name).
    pub frame_id: Option<String>,
    /// A streaming source without a frame for this long is `stalled` (see `source.rs`).
    #[serde(default = "default_stall_after")]
    pub stall_after_ms: u64,
    /// A GStreamer source that ends or fails is started again after this, doubled at
    /// each failure (with ±20% jitter) up to `restart_backoff_max_ms`, and back to this
    /// once it has streamed for 10 s.
    #[serde(default = "default_backoff")]
    pub restart_backoff_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub restart_backoff_max_ms: u64,
    /// How detections of the camera's standing prompts get track ids
    /// (`[camera.tracking]`: enabled, confirm_frames, keep_lost_frames, min_iou,
    /// max_predict_ms).
    #[serde(default)]
    pub tracking: TrackerConfig,
}

pub(crate) fn default_stall_after() -> u64 {
    2000
}
pub(crate) fn default_backoff() -> u64 {
    500
}
pub(crate) fn default_backoff_max() -> u64 {
    30_000
}

impl CameraConfig {
    pub fn prompt_set(&self) -> Result<PromptSet> {
        PromptSet::new(self.prompts.clone()).with_context(|| format!("camera {:?}", self.name))
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: Config = toml::from_str(&text)
            .with_context(|| format!("{}: invalid configuration", path.display()))?;
        // Relative paths are relative to the configuration file.
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.state_file = Some(match cfg.state_file.take() {
            Some(state) if state.is_relative() => base.join(state),
            Some(state) => state,
            None => path.with_extension("state.json"),
        });
        if cfg.model.path.is_relative() && !cfg.model.path.exists() {
            cfg.model.path = base.join(&cfg.model.path);
        }
        if let Some(z) = &cfg.zenoh.config
            && z.is_relative()
            && !z.exists()
        {
            cfg.zenoh.config = Some(base.join(z));
        }
        Ok(cfg)
    }

    /// How every camera loads the model: the same options, so that they share one
    /// engine (see `paligemma_stream::Engine::shared`).
    pub fn engine_options(&self) -> Result<EngineOptions> {
        let m = &self.model;
        let weights = WeightOptions {
            device: paligemma::Device::find(&m.device)?,
            ..Default::default()
        };
        let mut context = ContextOptions {
            threads: m.threads,
            kv_type: m.kv_type.parse::<paligemma::KvType>()?,
            max_sequences: m.max_sequences,
            ..Default::default()
        };
        let lanes = m.lanes.max(1);
        if m.max_sequences == 0 {
            let prompts: usize = self.cameras.iter().map(|c| c.prompts.len()).sum();
            let widest = self
                .cameras
                .iter()
                .map(|c| c.prompts.len())
                .max()
                .unwrap_or(0);
            let lanes = usable_lanes(weights.device, context.threads_or_default(), lanes);
            context.max_sequences = prompts
                .max(widest * lanes)
                .clamp(4, paligemma::MAX_SEQUENCES);
        }
        Ok(EngineOptions {
            weights,
            context,
            lanes,
        })
    }

    pub fn prefix(&self) -> String {
        self.prefix.clone().unwrap_or_else(|| match &self.pool {
            Some(pool) => format!("paligemma/{pool}"),
            None => format!("paligemma/{}", self.node),
        })
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.refusal_window_s.is_finite() && self.refusal_window_s > 0.0) {
            bail!(
                "refusal_window_s must be a positive number of seconds, not {}",
                self.refusal_window_s
            );
        }
        if self.errors_per_s == 0 {
            bail!("errors_per_s must be at least 1");
        }
        let period = self.ros2.diagnostics_period_s;
        if !(period.is_finite() && period >= 0.0) {
            bail!(
                "[ros2] diagnostics_period_s must be 0 (off) or a positive number of seconds, not {period}"
            );
        }
        if let Some(pool) = &self.pool
            && !paligemma_stream::prompts::is_name(pool)
        {
            bail!("pool name {pool:?} must be 1 to 64 letters, digits, - or _");
        }
        if self.pool.is_some() && !paligemma_stream::prompts::is_name(&self.node) {
            bail!(
                "node name {:?} must be 1 to 64 letters, digits, - or _ in a pool",
                self.node
            );
        }
        if !(self.capacity.is_finite() && (0.001..=1e6).contains(&self.capacity)) {
            bail!(
                "capacity must be a number from 0.001 to 1000000 (thousandths count), not {}",
                self.capacity
            );
        }
        if self.zenoh.reconnect_max_ms == Some(0) {
            bail!("[zenoh] reconnect_max_ms must be at least 1 millisecond");
        }
        if self.cameras.is_empty() {
            bail!("no camera configured (add a [[camera]] section or --camera NAME=PIPELINE)");
        }
        let mut names = std::collections::HashSet::new();
        for c in &self.cameras {
            if !paligemma_stream::prompts::is_name(&c.name) {
                bail!(
                    "camera name {:?} must be 1 to 64 letters, digits, - or _",
                    c.name
                );
            }
            if !names.insert(&c.name) {
                bail!("camera {:?} appears twice", c.name);
            }
            let ros2 = [c.ros2_image.is_some(), c.ros2_compressed_image.is_some()];
            let sources = [
                c.pipeline.is_some(),
                c.uri.is_some(),
                c.zenoh_key.is_some(),
                ros2[0],
                ros2[1],
            ]
            .iter()
            .filter(|&&b| b)
            .count();
            if sources != 1 {
                bail!(
                    "camera {:?} needs exactly one of pipeline, uri, zenoh_key, ros2_image or ros2_compressed_image",
                    c.name
                );
            }
            if ros2.contains(&true) && !self.ros2.enabled {
                bail!(
                    "camera {:?} reads a ROS 2 topic, but ROS 2 is off: add a [ros2] section (without enabled = false)",
                    c.name
                );
            }
            c.prompt_set()?;
            if let Err(e) = c.tracking.validate() {
                bail!("camera {:?}: {e}", c.name);
            }
            if c.stall_after_ms == 0
                || c.restart_backoff_ms == 0
                || c.restart_backoff_max_ms < c.restart_backoff_ms
            {
                bail!(
                    "camera {:?}: stall_after_ms and restart_backoff_ms must be positive, restart_backoff_max_ms at least restart_backoff_ms",
                    c.name
                );
            }
        }
        Ok(())
    }

    /// The zenoh session configuration.
    pub fn zenoh_config(&self) -> Result<zenoh::Config> {
        let z = &self.zenoh;
        let mut config = match &z.config {
            Some(path) => zenoh::Config::from_file(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            None => zenoh::Config::default(),
        };
        let set = |config: &mut zenoh::Config, key: &str, value: String| {
            config
                .insert_json5(key, &value)
                .map_err(|e| anyhow::anyhow!("zenoh setting {key} = {value}: {e}"))
        };
        if let Some(mode) = &z.mode {
            set(&mut config, "mode", serde_json::to_string(mode)?)?;
        }
        if !z.listen.is_empty() {
            set(
                &mut config,
                "listen/endpoints",
                serde_json::to_string(&z.listen)?,
            )?;
        } else if z.config.is_none() && z.mode.as_deref() != Some("client") {
            // Reachable from this machine only unless the configuration says otherwise.
            // A client listens on nothing: it reaches others through its router, and
            // several clients on one machine would otherwise fight over the port.
            set(
                &mut config,
                "listen/endpoints",
                serde_json::to_string(&[DEFAULT_LISTEN])?,
            )?;
        }
        if !z.connect.is_empty() {
            set(
                &mut config,
                "connect/endpoints",
                serde_json::to_string(&z.connect)?,
            )?;
        }
        let reconnect = match (z.reconnect_max_ms, &z.config) {
            (Some(ms), _) => Some(ms),
            (None, None) => Some(DEFAULT_RECONNECT_MAX_MS),
            (None, Some(_)) => None,
        };
        if let Some(most) = reconnect {
            set(
                &mut config,
                "connect/retry",
                format!(
                    "{{period_init_ms: {}, period_max_ms: {most}, period_increase_factor: 2}}",
                    most.min(250)
                ),
            )?;
        }
        // Off unless asked for: in peer mode, multicast scouting connects to every peer
        // it finds on the network, and each of them could then put on the node's keys.
        match (z.multicast_scouting, &z.config) {
            (Some(on), _) => set(&mut config, "scouting/multicast/enabled", on.to_string())?,
            (None, None) => set(&mut config, "scouting/multicast/enabled", "false".into())?,
            (None, Some(_)) => {}
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cameras: &[usize], lanes: usize) -> Config {
        let mut text =
            format!("node = \"n\"\n[model]\npath = \"m.gguf\"\nthreads = 4\nlanes = {lanes}\n");
        for (c, &prompts) in cameras.iter().enumerate() {
            text += &format!("[[camera]]\nname = \"c{c}\"\nzenoh_key = \"k{c}\"\n");
            for p in 0..prompts {
                text += &format!("[[camera.prompt]]\nid = \"p{p}\"\ntask = \"caption en\"\n");
            }
        }
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn default_sequences_fit_every_prompt_and_a_camera_per_lane() {
        let sequences = |cameras: &[usize], lanes| {
            config(cameras, lanes)
                .engine_options()
                .unwrap()
                .context
                .max_sequences
        };
        assert_eq!(sequences(&[1], 1), 4, "at least 4");
        assert_eq!(sequences(&[2, 3, 2], 1), 7, "every standing prompt");
        // Two lanes each hold half the sequences: each must fit the camera of 5 prompts.
        assert_eq!(sequences(&[5, 1], 2), 10);
        assert_eq!(sequences(&[2, 2, 2, 2], 2), 8);
        assert_eq!(sequences(&[3], 8), 12, "no more lanes than the 4 threads");
    }

    /// The example configurations in configs/ load and validate (their model paths
    /// resolve against the folder, so they name the bundled demo model).
    #[test]
    fn example_configurations_are_valid() {
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        for name in ["node.toml", "node-ros2.toml", "node-secure.toml"] {
            let cfg = Config::load(&configs.join(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            cfg.validate().unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }

    /// A `[ros2]` section turns ROS 2 on unless it says `enabled = false`; none leaves it off.
    #[test]
    fn a_ros2_section_is_on_unless_it_says_otherwise() {
        let ros2 = |extra: &str| {
            toml::from_str::<Config>(&format!("[model]\npath = \"m.gguf\"\n{extra}"))
                .unwrap()
                .ros2
                .enabled
        };
        assert!(!ros2(""));
        assert!(ros2("[ros2]\ndomain_id = 3\n"));
        assert!(!ros2("[ros2]\nenabled = false\n"));
    }

    /// Metrics are off without a `[metrics]` section, and on loopback with one.
    #[test]
    fn metrics_are_off_by_default_and_on_loopback() {
        let metrics = |extra: &str| {
            toml::from_str::<Config>(&format!("[model]\npath = \"m.gguf\"\n{extra}"))
                .unwrap()
                .metrics
        };
        assert!(!metrics("").enabled);
        let on = metrics("[metrics]\n");
        assert!(on.enabled && on.listen.ip().is_loopback());
        assert_eq!(on.listen.port(), 9464);
        assert!(!metrics("[metrics]\nenabled = false\n").enabled);
        assert!(
            toml::from_str::<Config>("[model]\npath = \"m\"\n[metrics]\nlisten = \"nowhere\"\n")
                .is_err()
        );
    }
}
