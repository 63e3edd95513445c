//! Seeded mutants of model files through `paligemma run`, each in a child process so
//! that an abort or a crash is caught: every mutant must load and answer, or fail
//! with an error; never a signal, a panic or a hang.
//!
//! The mutations are those that found crashes in the past: bit flips and overwrites
//! with boundary values in the header, truncations, and rewritten files whose
//! tensor types, shapes or metadata values were changed.
//!
//! `PALIGEMMA_MUTANTS=N` sets the number per model (default 150) and
//! `PALIGEMMA_MUTANT_MODELS=demo,fixture` which models; `PALIGEMMA_MUTANT_KEEP=DIR`
//! keeps the failing mutants there. `scripts/mutate.sh` runs a large campaign. Peak
//! memory (through GNU time, when installed) may exceed the unmutated model's by at
//! most twice the file's size (plus 1 MiB of measurement noise).
use ggml::Type;
use ggml::gguf::{GgufFile, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const U64S: [u64; 12] = [
    0,
    1,
    2,
    3,
    31,
    32,
    255,
    1 << 24,
    u32::MAX as u64,
    1 << 32,
    1 << 63,
    u64::MAX,
];
const F32S: [f32; 8] = [
    0.0,
    -1.0,
    -1e-6,
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    1e30,
    1e-30,
];

/// A metadata value of the same type with a boundary value.
fn boundary(v: &Value, rng: &mut Rng) -> Option<Value> {
    let u = *rng.pick(&U64S);
    Some(match v {
        Value::U8(_) => Value::U8(u as u8),
        Value::U16(_) => Value::U16(u as u16),
        Value::U32(_) => Value::U32(u as u32),
        Value::U64(_) => Value::U64(u),
        Value::I32(_) => Value::I32(u as i32),
        Value::I64(_) => Value::I64(u as i64),
        Value::F32(_) => Value::F32(*rng.pick(&F32S)),
        Value::F64(_) => Value::F64(*rng.pick(&F32S) as f64),
        Value::Bool(b) => Value::Bool(!b),
        Value::Array(items) if !items.is_empty() => {
            let mut items = items.clone();
            match rng.below(3) {
                0 => drop(items.pop()),
                1 => items.push(items[0].clone()),
                _ => {
                    let i = rng.below(items.len());
                    items[i] = boundary(&items[i], rng)?;
                }
            }
            Value::Array(items)
        }
        _ => return None,
    })
}

/// Rewrites a GGUF with one structural change: a tensor's type or shape, or a
/// metadata value. None when the change cannot be written.
fn rewrite(file: &GgufFile, rng: &mut Rng, out: &Path) -> Option<()> {
    let mut feasible = true;
    let written = file.rewrite(out, |metadata, tensors| match rng.below(3) {
        0 => {
            // Any type ggml knows, including ones no kernel of ours takes.
            let t = rng.below(tensors.len());
            match (0..64u32)
                .filter_map(|raw| Type::from_raw(raw).ok())
                .nth(rng.below(40))
            {
                Some(ty) => tensors[t].1 = ty,
                None => feasible = false,
            }
        }
        1 => {
            let t = rng.below(tensors.len());
            let d = rng.below(tensors[t].2.len());
            let dim = tensors[t].2[d];
            tensors[t].2[d] = *rng.pick(&[dim * 2, (dim / 2).max(1), 1]);
        }
        _ => {
            let numeric: Vec<usize> = (0..metadata.len())
                .filter(|&i| !matches!(metadata[i].1, Value::String(_)))
                .collect();
            let i = *rng.pick(&numeric);
            match boundary(&metadata[i].1, rng) {
                Some(v) => metadata[i].1 = v,
                None => feasible = false,
            }
        }
    });
    (feasible && written.is_ok()).then_some(())
}

/// Writes mutant number `seed` of `original` to `out`.
fn mutate(original: &[u8], file: &GgufFile, seed: u64, out: &Path) {
    let mut rng = Rng(seed);
    loop {
        let mut data = original.to_vec();
        let header = file.data_offset;
        match rng.below(6) {
            0 => {
                for _ in 0..1 + rng.below(8) {
                    let bit = rng.below(header * 8);
                    data[bit / 8] ^= 1 << (bit % 8);
                }
            }
            1 => {
                let at = rng.below(header - 8);
                data[at..at + 4].copy_from_slice(&(*rng.pick(&U64S) as u32).to_le_bytes());
            }
            2 => {
                let at = rng.below(header - 8);
                data[at..at + 8].copy_from_slice(&rng.pick(&U64S).to_le_bytes());
            }
            3 => data.truncate(rng.below(data.len())),
            4 => {
                let bit = rng.below(data.len() * 8);
                data[bit / 8] ^= 1 << (bit % 8);
            }
            _ => {
                if rewrite(file, &mut rng, out).is_some() {
                    return;
                }
                continue;
            }
        }
        std::fs::write(out, data).unwrap();
        return;
    }
}

#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    errors: usize,
    /// Mutants that died of a signal, panicked, hung or used too much memory.
    failures: Vec<String>,
    /// Peak RSS in KiB of each child, when GNU time is there to tell.
    peak_kib: Vec<u64>,
}

const TIME: &str = "/usr/bin/time";

/// Runs `paligemma run` on a model; returns (exit code or None for a signal, stderr,
/// peak RSS in KiB), or None after a hang.
fn run(model: &Path, rss: &Path) -> Option<(Option<i32>, String, Option<u64>)> {
    let exe = env!("CARGO_BIN_EXE_paligemma");
    let args = [
        "run",
        "-m",
        model.to_str().unwrap(),
        "-i",
        "tests/fixtures/images/rgb.png",
        "-p",
        "caption en",
        "--max-tokens",
        "4",
        "--threads",
        "1",
    ];
    let timed = Path::new(TIME).exists();
    let mut cmd = if timed {
        let mut c = Command::new(TIME);
        c.args(["-f", "%M", "-o", rss.to_str().unwrap(), exe]);
        c
    } else {
        Command::new(exe)
    };
    let mut child = cmd
        .args(args)
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            let report = if timed {
                std::fs::read_to_string(rss).unwrap_or_default()
            } else {
                String::new()
            };
            let peak = report.lines().last().and_then(|l| l.trim().parse().ok());
            // GNU time reports a child killed by a signal as "Command terminated by signal N".
            let code = if report.contains("terminated by signal") {
                None
            } else {
                status.code()
            };
            return Some((code, stderr, peak));
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn campaign(name: &str, model: &Path, count: u64) -> Tally {
    let original = std::fs::read(model).unwrap();
    let file = GgufFile::open(model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut tally = Tally::default();
    let base = run(model, &dir.path().join("base.rss")).expect("the original model runs");
    assert_eq!(
        base.0,
        Some(0),
        "the unmutated {name} model runs: {}",
        base.1
    );
    let results = std::sync::Mutex::new(Vec::new());
    // Two children at a time (this machine has two cores).
    std::thread::scope(|s| {
        for lane in 0..2u64 {
            let (original, file, results, dir) = (&original, &file, &results, dir.path());
            s.spawn(move || {
                for seed in (lane..count).step_by(2) {
                    let path = dir.join(format!("mutant-{lane}.gguf"));
                    mutate(original, file, mutant_seed(name, seed), &path);
                    let outcome = run(&path, &dir.join(format!("mutant-{lane}.rss")));
                    results.lock().unwrap().push((seed, outcome));
                }
            });
        }
    });
    // What a mutant may add to the process's memory: twice the file, plus 1 MiB for the
    // run-to-run noise of a process's resident size (the unmutated model is run once).
    let allowed = base.2.map(|b| b + 2 * original.len() as u64 / 1024 + 1024);
    let keep = std::env::var_os("PALIGEMMA_MUTANT_KEEP").map(PathBuf::from);
    let (mut signals, mut panics, mut hangs, mut heavy) = (0, 0, 0, 0);
    for (seed, outcome) in results.into_inner().unwrap() {
        let what = format!("{name} mutant {seed}");
        let failure = match outcome {
            None => {
                hangs += 1;
                Some(format!("{what}: hung"))
            }
            Some((code, stderr, peak)) => {
                tally.peak_kib.extend(peak);
                let last = stderr.lines().last().unwrap_or("").to_string();
                match code {
                    Some(0) => tally.ok += 1,
                    Some(1) => tally.errors += 1,
                    _ => {}
                }
                if stderr.contains("panicked") {
                    panics += 1;
                    Some(format!("{what}: panicked: {stderr}"))
                } else if !matches!(code, Some(0 | 1)) {
                    signals += 1;
                    Some(format!("{what}: exit {code:?}: {last}"))
                } else if let (Some(peak), Some(allowed)) = (peak, allowed)
                    && peak > allowed
                {
                    heavy += 1;
                    Some(format!(
                        "{what}: peaked at {peak} KiB, more than {allowed} KiB ({last})"
                    ))
                } else {
                    None
                }
            }
        };
        if let Some(f) = failure {
            if let Some(keep) = &keep {
                // Regenerate the mutant to keep it for a regression test.
                std::fs::create_dir_all(keep).unwrap();
                mutate(
                    &original,
                    &file,
                    mutant_seed(name, seed),
                    &keep.join(format!("{name}-{seed}.gguf")),
                );
            }
            tally.failures.push(f);
        }
    }
    println!(
        "{name}: {count} mutants: {} ran, {} refused with an error, {signals} signals, {panics} panics, {hangs} hangs, {heavy} over the memory bound; peak RSS {:?} KiB (unmutated {:?} KiB, file {} KiB)",
        tally.ok,
        tally.errors,
        tally.peak_kib.iter().max(),
        base.2,
        original.len() / 1024
    );
    tally
}

/// The seed of mutant number `n` of the model `name`.
fn mutant_seed(name: &str, n: u64) -> u64 {
    n.wrapping_mul(0x51_7CC1_B727_220A) ^ name.len() as u64
}

/// The models to mutate: the bundled demo and a fixture converted with quantized
/// matrices (q4_0 decoder, q8_0 vision), so that repacked weights are covered too.
fn models(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let wanted = std::env::var("PALIGEMMA_MUTANT_MODELS").unwrap_or_else(|_| "demo,fixture".into());
    let mut out = Vec::new();
    if wanted.contains("demo") {
        out.push(("demo", root().join("models/demo/paligemma2-demo-f16.gguf")));
    }
    if wanted.contains("fixture") {
        let path = dir.join("fixture.gguf");
        let status = Command::new(env!("CARGO_BIN_EXE_paligemma"))
            .args([
                "convert",
                "tests/fixtures/pg2_gqa/hf",
                "-o",
                path.to_str().unwrap(),
                "--type",
                "q4_0",
                "--vision-type",
                "q8_0",
            ])
            .current_dir(root())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        out.push(("fixture", path));
    }
    out
}

#[test]
fn mutated_models_fail_cleanly_in_a_child_process() {
    let count: u64 = std::env::var("PALIGEMMA_MUTANTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(150);
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (name, model) in models(dir.path()) {
        let t = campaign(name, &model, count);
        assert!(t.ok + t.errors > 0);
        failures.extend(t.failures);
    }
    assert!(
        failures.is_empty(),
        "{} mutants crashed, panicked or hung:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
