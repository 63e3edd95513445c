//! Standing prompts: asked again and again on sampled frames.
//!
//! The TOML form (shared by the element's `prompts-file` and the node's cameras):
//!
//! ```toml
//! [[prompt]]
//! id = "people"               # names the result topic; letters, digits, - and _
//! task = "detect person ; car"
//! every_ms = 2000             # at most this often (0: every analysed frame)
//! every_frames = 0            # and/or every N-th frame (0: no frame condition)
//! max_tokens = 32
//! min_score = 0.5             # detections scoring below are dropped (default: the stream's)
//! duplicate_iou = 0.5         # same-label boxes overlapping more are one (default: the stream's)
//! ```
//!
//! The short form (the element's `prompts` property) separates tasks with `|`:
//! `caption en|detect person ; car`; ids are then derived from the task.
use crate::{Error, Result};
use paligemma::{DetectionFilter, Task};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const MAX_ID_LEN: usize = 64;
/// The prompt id of an ad-hoc question (an ask), which its result message carries.
pub const ASK_ID: &str = "ask";
/// Ids a standing prompt may not have: the node's own keys beside the result keys
/// (`<camera>/<prompt-id>`), and the id of ad-hoc questions.
pub const RESERVED_IDS: [&str; 4] = ["status", "prompts", "errors", ASK_ID];

/// Standing prompts answer at most this many tokens unless they say otherwise.
pub const DEFAULT_MAX_TOKENS: usize = 32;

/// A prompt asked again and again on sampled frames (or once, for an ask).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandingPrompt {
    pub id: String,
    /// The task, written as its prompt text (`caption en`, `detect person ; car`) and
    /// parsed when the prompt is read, so a malformed one never reaches the engine.
    pub task: Task,
    /// Minimum milliseconds between two answers (0: every analysed frame).
    #[serde(default)]
    pub every_ms: u64,
    /// Answer every N-th analysed frame (0 or 1: every one).
    #[serde(default)]
    pub every_frames: u64,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// Detections scoring below this are dropped; none: the stream's
    /// ([`crate::StreamConfig::filter`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_score: Option<f32>,
    /// Same-label boxes overlapping with an IoU above this are one object; none: the stream's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_iou: Option<f32>,
}

fn default_max_tokens() -> usize {
    DEFAULT_MAX_TOKENS
}

impl StandingPrompt {
    pub fn new(id: impl Into<String>, task: Task) -> StandingPrompt {
        StandingPrompt {
            id: id.into(),
            task,
            every_ms: 0,
            every_frames: 0,
            max_tokens: DEFAULT_MAX_TOKENS,
            min_score: None,
            duplicate_iou: None,
        }
    }

    /// The detection filter of this prompt: its own values where it sets them, the
    /// stream's `defaults` elsewhere.
    pub fn filter(&self, defaults: &DetectionFilter) -> DetectionFilter {
        DetectionFilter {
            min_score: self.min_score.unwrap_or(defaults.min_score),
            duplicate_iou: self.duplicate_iou.unwrap_or(defaults.duplicate_iou),
        }
    }

    /// Checks the id's characters and the token limit.
    pub fn validate(&self) -> Result<()> {
        if !is_name(&self.id) {
            return Err(Error::Prompts(format!(
                "prompt id {:?} must be 1 to {MAX_ID_LEN} letters, digits, - or _",
                self.id
            )));
        }
        if self.max_tokens == 0 || self.max_tokens > 4096 {
            return Err(Error::Prompts(format!(
                "prompt {:?}: max_tokens {} is not in 1..=4096",
                self.id, self.max_tokens
            )));
        }
        self.filter(&DetectionFilter::default())
            .validate()
            .map_err(|e| Error::Prompts(format!("prompt {:?}: {e}", self.id)))?;
        Ok(())
    }
}

/// A validated list of standing prompts with unique ids.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptSet {
    #[serde(rename = "prompt", default)]
    pub prompts: Vec<StandingPrompt>,
}

impl PromptSet {
    pub fn new(prompts: Vec<StandingPrompt>) -> Result<PromptSet> {
        let set = PromptSet { prompts };
        set.validate()?;
        Ok(set)
    }

    fn validate(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for p in &self.prompts {
            p.validate()?;
            if RESERVED_IDS.contains(&p.id.as_str()) {
                return Err(Error::Prompts(format!(
                    "prompt id {:?} is reserved (the node publishes {} on keys of those names)",
                    p.id,
                    RESERVED_IDS.join(", ")
                )));
            }
            if !seen.insert(&p.id) {
                return Err(Error::Prompts(format!(
                    "prompt id {:?} appears twice",
                    p.id
                )));
            }
        }
        Ok(())
    }

    /// Parses the TOML form.
    pub fn from_toml(text: &str) -> Result<PromptSet> {
        let set: PromptSet = toml::from_str(text)
            .map_err(|e| Error::Prompts(format!("invalid prompts TOML: {e}")))?;
        set.validate()?;
        Ok(set)
    }

    pub fn from_file(path: &std::path::Path) -> Result<PromptSet> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Prompts(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| Error::Prompts(format!("{}: {e}", path.display())))
    }

    /// Parses the JSON form (a list of prompts, or an object with a `prompt` list).
    pub fn from_json(text: &str) -> Result<PromptSet> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::Prompts(format!("invalid prompts JSON: {e}")))?;
        let list = match value {
            serde_json::Value::Array(_) => value,
            serde_json::Value::Object(mut o) => o
                .remove("prompt")
                .or_else(|| o.remove("prompts"))
                .unwrap_or_default(),
            _ => serde_json::Value::Null,
        };
        let prompts: Vec<StandingPrompt> = serde_json::from_value(list)
            .map_err(|e| Error::Prompts(format!("invalid prompts JSON: {e}")))?;
        Self::new(prompts)
    }

    /// Parses the short form `task|task|...` with common settings.
    pub fn from_short(text: &str, every_ms: u64, max_tokens: usize) -> Result<PromptSet> {
        let mut prompts: Vec<StandingPrompt> = Vec::new();
        for text in text.split('|').map(str::trim).filter(|t| !t.is_empty()) {
            let task = Task::parse(text).map_err(|e| Error::Prompts(format!("{text:?}: {e}")))?;
            let kind = task.kind();
            let mut id = kind.to_string();
            let mut n = 1;
            while prompts.iter().any(|p| p.id == id) {
                n += 1;
                id = format!("{kind}{n}");
            }
            prompts.push(StandingPrompt {
                every_ms,
                max_tokens,
                ..StandingPrompt::new(id, task)
            });
        }
        Self::new(prompts)
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }
}

/// Whether `s` may name a prompt, a camera or a node: 1 to 64 ASCII letters, digits,
/// `-` or `_` (it becomes one chunk of a Zenoh key or a GStreamer field).
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Decides which standing prompts are due on an analysed frame.
#[derive(Default)]
pub struct Schedule {
    last: HashMap<String, (Instant, u64)>,
}

impl Schedule {
    /// Prompts due on the `frame_index`-th analysed frame at `now`; marks them run.
    pub fn due<'p>(
        &mut self,
        prompts: &'p PromptSet,
        frame_index: u64,
        now: Instant,
    ) -> Vec<&'p StandingPrompt> {
        let mut due = Vec::new();
        for p in &prompts.prompts {
            let ok = match self.last.get(&p.id) {
                None => true,
                Some(&(at, index)) => {
                    let time_ok = p.every_ms == 0
                        || now.duration_since(at) >= Duration::from_millis(p.every_ms);
                    let frames_ok = p.every_frames <= 1 || frame_index >= index + p.every_frames;
                    time_ok && frames_ok
                }
            };
            if ok {
                self.last.insert(p.id.clone(), (now, frame_index));
                due.push(p);
            }
        }
        due
    }

    /// Forgets history (after a prompt change or a flush).
    pub fn reset(&mut self) {
        self.last.clear();
    }
}
