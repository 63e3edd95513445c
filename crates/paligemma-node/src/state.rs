//! Standing prompts that survive a restart. A robot whose prompts were changed at run
//! time (with `allow_prompt_updates`) must not reboot into the old ones, so every accepted
//! update is written to the state file (`state_file`, by default `<config>.state.json`
//! beside the configuration) and read back at start.
//!
//! The file is replaced atomically (a temporary file beside it, fsync, rename, fsync of
//! the directory), so a power cut leaves the old state or the new one, never half of
//! either. A state file that cannot be read, does not parse or holds prompts that do not
//! validate is reported and ignored: the cameras start with the configuration's prompts,
//! and the next accepted update writes a good file again.
use anyhow::{Context, Result, bail};
use paligemma_stream::PromptSet;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const SCHEMA: &str = "paligemma.state/1";

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    schema: String,
    /// Each camera's standing prompts, in the JSON form `<camera>/prompts` takes.
    cameras: BTreeMap<String, serde_json::Value>,
    /// When each camera's prompts were accepted (Unix nanoseconds): in a pool, the
    /// newest a node knows wins (added within version 1; absent in older files).
    #[serde(default)]
    updated_unix_ns: BTreeMap<String, u64>,
}

/// A camera's prompts and when they were accepted (Unix nanoseconds).
pub type Stamped = (PromptSet, u64);

/// The node's persisted prompts: what was restored, and what to write on an update.
pub struct PromptState {
    path: PathBuf,
    cameras: Mutex<BTreeMap<String, Stamped>>,
}

impl PromptState {
    /// Reads `path`. A missing file restores nothing; any other failure is returned
    /// beside an empty state, for the caller to report.
    pub fn open(path: PathBuf) -> (PromptState, Option<anyhow::Error>) {
        let (cameras, error) = match read(&path) {
            Ok(cameras) => (cameras, None),
            Err(e) => (
                BTreeMap::new(),
                Some(e.context(format!(
                    "state file {}: ignored, the configuration's prompts apply",
                    path.display()
                ))),
            ),
        };
        (
            PromptState {
                path,
                cameras: Mutex::new(cameras),
            },
            error,
        )
    }

    /// The prompts saved for `camera`, if any.
    pub fn restored(&self, camera: &str) -> Option<PromptSet> {
        self.cameras
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(camera)
            .map(|(set, _)| set.clone())
    }

    /// Every camera's prompts with when they were accepted.
    pub fn all(&self) -> BTreeMap<String, Stamped> {
        self.cameras
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records `set` as `camera`'s prompts, accepted now, and rewrites the file.
    pub fn save(&self, camera: &str, set: &PromptSet) -> Result<()> {
        let now = paligemma_stream::message::unix_time_ns().unwrap_or(0);
        self.merge(camera, set, now).map(|_| ())
    }

    /// Records `set` as `camera`'s prompts if they are newer than those known (accepted
    /// at `stamp`), and rewrites the file; whether they were.
    pub fn merge(&self, camera: &str, set: &PromptSet, stamp: u64) -> Result<bool> {
        let mut cameras = self.cameras.lock().unwrap_or_else(|e| e.into_inner());
        if cameras
            .get(camera)
            .is_some_and(|(_, known)| *known >= stamp)
        {
            return Ok(false);
        }
        cameras.insert(camera.to_string(), (set.clone(), stamp));
        let file = StateFile {
            schema: SCHEMA.into(),
            cameras: cameras
                .iter()
                .map(|(k, (v, _))| Ok((k.clone(), serde_json::to_value(v)?)))
                .collect::<Result<_>>()?,
            updated_unix_ns: cameras.iter().map(|(k, (_, t))| (k.clone(), *t)).collect(),
        };
        write_atomically(&self.path, &serde_json::to_vec_pretty(&file)?)
            .with_context(|| format!("writing the state file {}", self.path.display()))?;
        Ok(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read(path: &Path) -> Result<BTreeMap<String, Stamped>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e.into()),
    };
    let file: StateFile = serde_json::from_slice(&bytes)
        .context("not a state file (JSON with `schema` and `cameras`)")?;
    if file.schema != SCHEMA {
        bail!("schema {:?}, expected {SCHEMA:?}", file.schema);
    }
    file.cameras
        .into_iter()
        .map(|(camera, prompts)| {
            let set = PromptSet::from_json(&prompts.to_string())
                .with_context(|| format!("camera {camera:?}"))?;
            let stamp = file.updated_unix_ns.get(&camera).copied().unwrap_or(0);
            Ok((camera, (set, stamp)))
        })
        .collect()
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(json: &str) -> PromptSet {
        PromptSet::from_json(json).unwrap()
    }

    #[test]
    fn saved_prompts_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.state.json");
        let (state, error) = PromptState::open(path.clone());
        assert!(
            error.is_none() && state.restored("cam").is_none(),
            "a missing file restores nothing"
        );
        let counting =
            set(r#"[{"id":"counting","task":"answer en how many cats?","max_tokens":3}]"#);
        state.save("cam", &counting).unwrap();
        state
            .save("other", &set(r#"[{"id":"scene","task":"caption en"}]"#))
            .unwrap();
        let (again, error) = PromptState::open(path);
        assert!(error.is_none());
        assert_eq!(again.restored("cam"), Some(counting));
        assert_eq!(again.restored("other").unwrap().prompts[0].id, "scene");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
        // Older prompts than those known are not taken; newer ones are, and kept.
        let scene = set(r#"[{"id":"scene","task":"caption en"}]"#);
        assert!(!again.merge("cam", &scene, 1).unwrap());
        assert!(again.merge("cam", &scene, u64::MAX - 1).unwrap());
        let (third, _) = PromptState::open(dir.path().join("node.state.json"));
        assert_eq!(third.all()["cam"], (scene, u64::MAX - 1));
    }

    #[test]
    fn a_bad_file_is_an_error_and_restores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        for (bytes, why) in [
            (&b"{\"schema\": \"paligemma.state/1\", \"cameras\": {\"cam\": [{\"id\": \"x\"#"[..], "not a state file"),
            (b"\xff\xfe", "not a state file"),
            (br#"{"schema": "paligemma.state/9", "cameras": {}}"#, "expected \"paligemma.state/1\""),
            (br#"{"schema": "paligemma.state/1", "cameras": {"cam": [{"id": "status", "task": "ocr"}]}}"#, "is reserved"),
        ] {
            std::fs::write(&path, bytes).unwrap();
            let (state, error) = PromptState::open(path.clone());
            let error = format!("{:#}", error.expect("an error"));
            assert!(error.contains(why) && error.contains("the configuration's prompts apply"), "{error}");
            assert!(state.restored("cam").is_none());
            // The next update writes a good file.
            state.save("cam", &set(r#"[{"id":"scene","task":"caption en"}]"#)).unwrap();
            assert!(PromptState::open(path.clone()).1.is_none());
        }
    }
}
