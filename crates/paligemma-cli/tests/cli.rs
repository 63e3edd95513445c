//! The `paligemma` binary end to end on a fixture model.
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn paligemma(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn convert(dir: &Path) -> String {
    let out = dir.join("pg2.gguf");
    let (ok, stdout, stderr) = paligemma(&[
        "convert",
        "tests/fixtures/pg2_gqa/hf",
        "-o",
        out.to_str().unwrap(),
        "--type",
        "q8_0",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("tensors") && stdout.contains("q8_0") && stdout.contains("f32"),
        "summary: {stdout}"
    );
    out.to_str().unwrap().to_string()
}

#[test]
fn convert_info_run_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path());
    let (ok, stdout, stderr) = paligemma(&["info", &model]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("gemma2")
            && stdout.contains("blk.3.ffn_down.weight")
            && stdout.contains("tokenizer: 1841 tokens"),
        "{stdout}"
    );
    // A quantized decoder keeps SigLIP in f16 unless told otherwise.
    assert!(
        stdout.contains("weights: decoder layers q8_0, vision layers f16"),
        "{stdout}"
    );

    for prompt in ["detect cat ; dog", "segment cat", "caption en"] {
        let logits = dir.path().join("logits.npy");
        let (ok, stdout, stderr) = paligemma(&[
            "run",
            "-m",
            &model,
            "-i",
            "tests/fixtures/images/rgb.png",
            "-p",
            prompt,
            "--max-tokens",
            "12",
            "--json",
            "--logits-out",
            logits.to_str().unwrap(),
        ]);
        assert!(ok, "{stderr}");
        let v: serde_json::Value =
            serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        let kind = v["result"]["kind"].as_str().unwrap();
        let expected = match prompt {
            "caption en" => "caption",
            "segment cat" => "segmentation",
            _ => "detections",
        };
        assert_eq!(kind, expected, "{v}");
        assert!(v["tokens"].as_array().unwrap().len() <= 12);
        assert!(v["timings_ms"]["vision"].as_f64().unwrap() > 0.0);
        let npy = std::fs::read(&logits).unwrap();
        assert_eq!(&npy[1..6], b"NUMPY");
        assert!(npy.len() > 1856 * 4, "vocab-sized logits");
    }
}

/// `--type f32` means f32 throughout (SigLIP included) unless `--vision-type` says
/// otherwise; `info` shows what the layers really hold.
#[test]
fn float_types_apply_to_the_vision_tower() {
    let dir = tempfile::tempdir().unwrap();
    for (args, want) in [
        (
            &["--type", "f32"][..],
            "decoder layers f32, vision layers f32",
        ),
        (
            &["--type", "bf16"][..],
            "decoder layers bf16, vision layers bf16",
        ),
        (
            &["--type", "f32", "--vision-type", "q8_0"][..],
            "decoder layers f32, vision layers q8_0",
        ),
    ] {
        let out = dir.path().join("m.gguf");
        let mut command = vec![
            "convert",
            "tests/fixtures/pg2_gqa/hf",
            "-o",
            out.to_str().unwrap(),
        ];
        command.extend_from_slice(args);
        let (ok, _, stderr) = paligemma(&command);
        assert!(ok, "{args:?}: {stderr}");
        let (ok, stdout, stderr) = paligemma(&["info", out.to_str().unwrap()]);
        assert!(ok && stdout.contains(want), "{args:?}: {stdout}{stderr}");
    }
}

#[test]
fn errors_are_one_line_and_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = paligemma(&[
        "convert",
        "tests/fixtures/pg2_gqa/hf",
        "-o",
        dir.path().join("x.gguf").to_str().unwrap(),
        "--type",
        "q3",
    ]);
    assert!(
        !ok && stderr.trim().lines().count() == 1 && stderr.contains("q3"),
        "{stderr}"
    );
    let (ok, _, stderr) = paligemma(&[
        "run",
        "-m",
        "tests/fixtures/images/rgb.png",
        "-i",
        "tests/fixtures/images/rgb.png",
        "-p",
        "ocr",
    ]);
    assert!(!ok && stderr.contains("not a GGUF file"), "{stderr}");
    let model = convert(dir.path());
    let (ok, _, stderr) = paligemma(&["run", "-m", &model, "-i", "Cargo.toml", "-p", "ocr"]);
    assert!(!ok && stderr.contains("cannot decode"), "{stderr}");
    let (ok, _, stderr) = paligemma(&[
        "decode-mask",
        "-m",
        &model,
        "--codes",
        "1,2,3",
        "--out",
        "/dev/null",
    ]);
    assert!(
        !ok && stderr.contains("no segmentation decoder"),
        "{stderr}"
    );
}

#[test]
fn devices_lists_a_working_cpu() {
    let (ok, stdout, stderr) = paligemma(&["devices"]);
    assert!(ok, "{stderr}");
    let cpu = stdout
        .lines()
        .find(|l| l.starts_with("cpu "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(cpu.ends_with(" ok"), "{cpu}");
    let kernels = match ggml::packed::kernels() {
        Some(set) => format!("our packed {} kernels ({})", set.name(), set.description()),
        None => "ggml's kernels".to_string(),
    };
    assert!(
        stdout.contains(&format!(
            "f16, bf16, q4_0, q8_0 and q4_K matrices run on {kernels}"
        )),
        "{stdout}"
    );
    // What ggml's kernels use: at least the baseline SIMD of the architecture it was built for.
    let baseline = if cfg!(target_arch = "aarch64") {
        "NEON"
    } else {
        "SSE3"
    };
    let features = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("ggml's CPU features: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(features.split(' ').any(|f| f == baseline), "{features}");
}

/// `paligemma eval --json` of the demo model on the committed `set`, printed.
fn eval_demo(set: &str, extra: &[&str]) -> serde_json::Value {
    let args = [
        "eval",
        "-m",
        "models/demo/paligemma2-demo-f16.gguf",
        "--set",
        set,
        "--threads",
        "2",
        "--json",
    ];
    let (ok, stdout, stderr) = paligemma(&[&args[..], extra].concat());
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    println!("{v}");
    v
}

/// `PALIGEMMA_CPU_KERNELS` forces each instruction set this CPU runs, and `ggml` for
/// ggml's own kernels: `devices` says which is used, the demo model's evaluation
/// comes out alike on every one, and a set the CPU lacks or a misspelt value is a
/// one-line error.
#[test]
fn forced_kernel_sets() {
    let with = |value: &str, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_paligemma"))
            .args(args)
            .env(ggml::packed::KERNELS_VAR, value)
            .current_dir(root())
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let eval = [
        "eval",
        "-m",
        "models/demo/paligemma2-demo-f16.gguf",
        "--set",
        "tests/fixtures/demo_eval",
        "--threads",
        "2",
        "--json",
    ];
    let figures = |stdout: &str| {
        let v: serde_json::Value = serde_json::from_str(stdout).unwrap();
        [
            "detection_recall_iou50",
            "detection_precision_iou50",
            "caption_objects",
        ]
        .map(|k| v[k].as_f64().unwrap())
    };
    let (ok, stdout, stderr) = paligemma(&eval);
    assert!(ok, "{stderr}");
    let best = figures(&stdout);
    for set in ggml::packed::Kernels::ALL {
        let (ok, stdout, stderr) = with(set.name(), &["devices"]);
        if !set.runs_here() {
            assert!(!ok && stderr.contains("this CPU lacks"), "{stderr}");
            continue;
        }
        assert!(ok, "{stderr}");
        assert!(
            stdout.contains(&format!("run on our packed {} kernels", set.name())),
            "{stdout}"
        );
        let (ok, stdout, stderr) = with(set.name(), &eval);
        assert!(ok, "{stderr}");
        let got = figures(&stdout);
        for (g, b) in got.iter().zip(best) {
            assert!((g - b).abs() <= 0.05, "{set:?}: {got:?} against {best:?}");
        }
    }
    let (ok, stdout, stderr) = with("ggml", &["devices"]);
    assert!(
        ok && stdout.contains("run on ggml's kernels"),
        "{stdout}{stderr}"
    );
    let (ok, _, stderr) = with("avx9", &eval);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("PALIGEMMA_CPU_KERNELS=avx9: expected avx512bf16, avx512, avx2 or ggml")
            && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
}

/// The bundled demo model on the committed held-out frames, through the engine and
/// the parsers. On them it finds every box and names the objects of 23 of the 24 captions
/// (tests/reference/README.md has the 200-frame figures); these floors, a little under
/// that, catch a regression anywhere from pixels to parsed boxes.
#[test]
fn demo_model_evaluation() {
    let v = eval_demo("tests/fixtures/demo_eval", &[]);
    for (label, found) in v["scores"]["per_label"].as_object().unwrap() {
        let recall = found[1].as_f64().unwrap() / found[0].as_f64().unwrap();
        assert!(recall >= 0.8, "{label} recall {recall}");
    }
    assert!(v["detection_recall_iou50"].as_f64().unwrap() >= 0.9);
    assert!(v["detection_precision_iou50"].as_f64().unwrap() >= 0.9);
    assert!(v["caption_objects"].as_f64().unwrap() >= 0.85);
    assert!(v["count_accuracy"].as_f64().unwrap() >= 0.75);
    // The score means what it says: right boxes score high (0.87 median, the old
    // least-certain-token score 0.025), so a threshold of 0.5 keeps almost all of them.
    assert!(v["score"]["median_right"].as_f64().unwrap() >= 0.7, "{v}");
    assert!(v["score"]["recall_at_0_5"].as_f64().unwrap() >= 0.9, "{v}");
    assert_eq!(v["scores"]["duplicate_pairs_kept"], 0, "{v}");
}

/// The tracker over a committed moving sequence (tests/reference/track_sequence.py: three
/// shapes, 90 frames, every third answered). On the true boxes it makes no mistake; on the
/// demo model's (which finds 59% of the objects here) it keeps identities apart from
/// crossings to at most about one switch per 100 frames per object.
#[test]
fn tracking_evaluation() {
    let v = eval_demo("tests/fixtures/track_seq", &["--tracking"]);
    let (model, truth) = (&v["model"], &v["true_boxes"]);
    assert_eq!(model["analysed_frames"], 30);
    assert_eq!(
        (
            truth["id_switches"].as_u64(),
            truth["fragmentations"].as_u64()
        ),
        (Some(0), Some(0)),
        "{truth}"
    );
    assert!(truth["mota"].as_f64().unwrap() > 0.99, "{truth}");
    assert!(
        model["matched"].as_f64().unwrap() / model["objects"].as_f64().unwrap() >= 0.5,
        "{model}"
    );
    let apart = model["id_switches_apart"].as_f64().unwrap() * 100.0
        / model["object_frames"].as_f64().unwrap();
    assert!(
        apart <= 1.0,
        "{apart} switches per 100 frames per object: {model}"
    );
}

/// `paligemma run --json` with the demo model on its first held-out frame.
fn run_demo_frame(prompt: &str, extra: &[&str]) -> serde_json::Value {
    let args = [
        "run",
        "-m",
        "models/demo/paligemma2-demo-f16.gguf",
        "-i",
        "tests/fixtures/demo_eval/frame_0000.png",
        "-p",
        prompt,
        "--threads",
        "1",
        "--json",
    ];
    let (ok, stdout, stderr) = paligemma(&[&args[..], extra].concat());
    assert!(ok, "{stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

/// Every detection of the demo model carries a confidence score, and an answer its
/// mean token log-probability.
#[test]
fn demo_model_scores() {
    let v = run_demo_frame("detect circle", &[]);
    let detections = v["result"]["detections"].as_array().unwrap();
    assert!(!detections.is_empty(), "{v}");
    for d in detections {
        let score = d["score"]
            .as_f64()
            .unwrap_or_else(|| panic!("no score: {d}"));
        assert!(score > 0.0 && score <= 1.0, "{d}");
    }
    let lp = v["mean_logprob"].as_f64().unwrap();
    assert!(lp <= 0.0 && lp.is_finite(), "{v}");
}

/// `--min-score` drops the detections scoring below it and says how many it dropped.
#[test]
fn min_score_drops_and_counts() {
    let run = |min_score: &str| {
        run_demo_frame(
            "detect ball ; circle ; square ; triangle",
            &["--min-score", min_score],
        )["result"]
            .clone()
    };
    let all = run("0");
    let scores: Vec<f64> = all["detections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["score"].as_f64().unwrap())
        .collect();
    assert!(all.get("dropped").is_none(), "{all}");
    assert!(!scores.is_empty(), "{all}");
    // Above the best score: every detection is dropped, and counted.
    let cut = (scores.iter().copied().fold(0.0, f64::max) + 1.0) / 2.0;
    let none = run(&format!("{cut}"));
    assert_eq!(none["detections"].as_array().unwrap().len(), 0, "{none}");
    assert_eq!(none["dropped"]["below_min_score"], scores.len(), "{none}");
    let (ok, _, stderr) = paligemma(&[
        "run",
        "-m",
        "models/demo/paligemma2-demo-f16.gguf",
        "-i",
        "x.png",
        "-p",
        "detect a",
        "--min-score",
        "2",
    ]);
    assert!(
        !ok && stderr.contains("min_score 2: expected a number from 0 to 1"),
        "{stderr}"
    );
}

/// `bench --vs-llama-bench`: the decoder is written as a llama.cpp `gemma2` GGUF, byte
/// for byte, and our runs alternate with llama-bench's (here a stand-in that logs its
/// arguments and prints llama-bench's JSON), whose figures are read back.
#[test]
fn bench_against_llama_bench() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path());
    let (log, fake) = (dir.path().join("args.log"), dir.path().join("llama-bench"));
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$@\" >> '{}'\necho '[{{\"avg_ts\": 2.5}}]'\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let args = [
        "bench",
        "-m",
        &model,
        "--threads",
        "1",
        "--reps",
        "2",
        "--warmup",
        "0",
        "--decode-tokens",
        "4",
        "--json",
        "--vs-llama-bench",
    ];
    let (ok, stdout, stderr) = paligemma(&[&args[..], &[fake.to_str().unwrap()]].concat());
    assert!(ok, "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let n = r["prefix_tokens"].as_u64().unwrap();
    assert_eq!(
        (r["llama_prefill"].as_f64(), r["llama_decode"].as_f64()),
        (Some(2.5), Some(2.5))
    );
    let ratio = r["ours_prefill"].as_f64().unwrap() / 2.5;
    assert!(
        ratio > 0.0 && (r["prefill_ratio"].as_f64().unwrap() - ratio).abs() < 1e-9 * ratio,
        "{r}"
    );
    let gemma2 = Path::new(&model).with_extension("gemma2.gguf");
    let g = gemma2.to_str().unwrap();
    let calls: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(calls.len(), 4, "{calls:?}");
    for (i, call) in calls.iter().enumerate() {
        assert!(
            call.starts_with(&format!("-m {g} -t 1 -fa 1 -r 1 -o json")),
            "{call}"
        );
        let test = if i % 2 == 0 {
            format!("-p {n} -n 0")
        } else {
            format!("-p 0 -n 4 -d {n}")
        };
        assert!(call.ends_with(&test), "call {i}: {call}");
    }
    // The file llama.cpp loads: its architecture's keys, a vocabulary of the model's
    // size, and exactly the decoder's tensors with our bytes.
    let (ours, theirs) = (
        ggml::gguf::GgufFile::open(&model).unwrap(),
        ggml::gguf::GgufFile::open(&gemma2).unwrap(),
    );
    assert_eq!(
        theirs.get("general.architecture").and_then(|v| v.as_str()),
        Some("gemma2")
    );
    let key = |f: &ggml::gguf::GgufFile, k: &str| f.get(k).and_then(|v| v.as_u64()).unwrap();
    assert_eq!(
        key(&theirs, "gemma2.block_count"),
        key(&ours, "paligemma.text.block_count")
    );
    assert_eq!(
        key(&theirs, "gemma2.attention.head_count_kv"),
        key(&ours, "paligemma.text.attention.head_count_kv")
    );
    let vocab = theirs
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .unwrap()
        .len() as u64;
    assert_eq!(vocab, key(&ours, "paligemma.text.vocab_size"));
    let decoder =
        |n: &str| n.starts_with("blk.") || n == "token_embd.weight" || n == "output_norm.weight";
    assert_eq!(
        theirs.tensors.len(),
        ours.tensors.iter().filter(|t| decoder(&t.name)).count()
    );
    for t in &theirs.tensors {
        let o = ours
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("{} is not ours", t.name));
        assert_eq!((t.ty, &t.shape), (o.ty, &o.shape), "{}", t.name);
        assert!(
            theirs.tensor_data(t) == ours.tensor_data(o),
            "{}: other bytes",
            t.name
        );
    }
}
