//! GGUF round trips and malformed files.
use ggml::Type;
use ggml::gguf::{GgufFile, GgufHeader, GgufWriter, Value};
use std::path::Path;

fn sample_metadata() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::String("test".into())),
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(1.5e-6)),
        ("t.bool", Value::Bool(true)),
        ("t.string", Value::String("héllo ▁ 猫".into())),
        (
            "t.array_u32",
            Value::Array(vec![Value::U32(1), Value::U32(2), Value::U32(3)]),
        ),
        (
            "t.array_str",
            Value::Array(vec![
                Value::String("a".into()),
                Value::String("<loc0001>".into()),
            ]),
        ),
        ("t.array_empty", Value::Array(vec![])),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f64", Value::F64(std::f64::consts::PI)),
    ]
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32
                / (1 << 24) as f32)
                - 0.5
        })
        .collect()
}

/// Writes a file with every metadata type and tensors of several types; returns
/// the tensors' (name, type, shape, bytes).
fn write_sample(path: &Path) -> Vec<(String, Type, Vec<usize>, Vec<u8>)> {
    let mut header = GgufHeader::new();
    for (k, v) in sample_metadata() {
        header.set(k, v);
    }
    let specs = [
        ("w.f32", Type::F32, vec![7, 3]),
        ("w.f16", Type::F16, vec![5]),
        ("w.bf16", Type::BF16, vec![4, 2, 2]),
        ("w.q8_0", Type::Q8_0, vec![64, 3]),
        ("w.q4_0", Type::Q4_0, vec![32, 2]),
        ("w.q4_k", Type::Q4_K, vec![256, 2]),
        ("w.q6_k", Type::Q6_K, vec![512, 1]),
    ];
    let mut tensors = Vec::new();
    for (i, (name, ty, shape)) in specs.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let data = ggml::quantize(ty, &values(n, i as u32), shape[0]).unwrap();
        header.add_tensor(name, ty, &shape).unwrap();
        tensors.push((name.to_string(), ty, shape, data));
    }
    let mut w = GgufWriter::create(path, header).unwrap();
    for (name, _, _, data) in &tensors {
        w.write_tensor(name, data).unwrap();
    }
    w.finish().unwrap();
    tensors
}

#[test]
fn round_trip_metadata_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sample.gguf");
    let tensors = write_sample(&path);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 3);
    let expected = sample_metadata();
    assert_eq!(
        f.keys,
        expected
            .iter()
            .map(|(k, _)| k.to_string())
            .collect::<Vec<_>>()
    );
    for (k, v) in &expected {
        assert_eq!(f.get(k), Some(v), "{k}");
    }
    assert_eq!(f.tensors.len(), tensors.len());
    for (name, ty, shape, data) in &tensors {
        let info = f.tensor(name).unwrap();
        assert_eq!((&info.ty, &info.shape), (ty, shape));
        assert_eq!(
            (f.data_offset + info.offset) % 32,
            0,
            "{name} is aligned for mmap use"
        );
        assert_eq!(f.tensor_data(info), data.as_slice(), "{name}");
    }
    let back = f.tensor_f32("w.f32").unwrap();
    assert_eq!(back, values(21, 0));
}

#[test]
fn writer_refuses_wrong_order_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.gguf");
    let mut header = GgufHeader::new();
    header.add_tensor("a", Type::F32, &[4]).unwrap();
    header.add_tensor("b", Type::F32, &[4]).unwrap();
    let mut w = GgufWriter::create(&path, header).unwrap();
    assert!(w.write_tensor("b", &[0; 16]).is_err());
    assert!(w.write_tensor("a", &[0; 12]).is_err(), "wrong size");
    w.write_tensor("a", &[0; 16]).unwrap();
    drop(w);
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temporary file removed"
    );

    let mut header = GgufHeader::new();
    header.add_tensor("a", Type::F32, &[4]).unwrap();
    let w = GgufWriter::create(&path, header).unwrap();
    assert!(
        w.finish()
            .unwrap_err()
            .to_string()
            .contains("never written")
    );
    assert!(!path.exists());
}

fn open_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    match GgufFile::open(&path) {
        Ok(_) => panic!("malformed file of {} bytes accepted", bytes.len()),
        Err(e) => e.to_string(),
    }
}

fn sample_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.gguf");
    write_sample(&path);
    std::fs::read(path).unwrap()
}

#[test]
fn wrong_magic() {
    let mut b = sample_bytes();
    b[..4].copy_from_slice(b"GGML");
    let e = open_err(&b);
    assert!(
        e.contains("not a GGUF file") && e.contains("bad.gguf"),
        "{e}"
    );
}

#[test]
fn truncated_everywhere() {
    let b = sample_bytes();
    // Every cut inside the header is an error that says it is truncated; cuts in the
    // data section say which tensor runs past the end.
    let f = {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.gguf");
        std::fs::write(&p, &b).unwrap();
        let f = GgufFile::open(&p).unwrap();
        (f.data_offset, f.tensors.last().unwrap().name.clone())
    };
    for cut in (0..f.0).step_by(7).chain([f.0 - 1]) {
        let e = open_err(&b[..cut]);
        assert!(
            e.contains("truncated") || e.contains("past the end"),
            "cut at {cut}: {e}"
        );
    }
    let e = open_err(&b[..b.len() - 40]); // past the last tensor's padding
    assert!(
        e.contains(&format!("{:?}", f.1)) && e.contains("runs past the end"),
        "{e}"
    );
}

#[test]
fn tensor_data_past_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    let mut header = GgufHeader::new();
    header.add_tensor("big", Type::F32, &[1000]).unwrap();
    let mut w = GgufWriter::create(&path, header).unwrap();
    w.write_tensor("big", &[0; 4000]).unwrap();
    w.finish().unwrap();
    let b = std::fs::read(&path).unwrap();
    let e = open_err(&b[..b.len() - 100]);
    assert!(
        e.contains("\"big\"") && e.contains("runs past the end of the file"),
        "{e}"
    );
}

#[test]
fn metadata_string_not_utf8() {
    let mut b = sample_bytes();
    let needle = "héllo".as_bytes();
    let at = b.windows(needle.len()).position(|w| w == needle).unwrap();
    b[at] = 0xff;
    let e = open_err(&b);
    assert!(e.contains("t.string") && e.contains("UTF-8"), "{e}");
}

#[test]
fn absurd_counts_and_types() {
    let mut b = sample_bytes();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(&b).contains("implausible"));
    let mut b = sample_bytes();
    // The first metadata value type follows the first key.
    let key = b"general.architecture";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    b[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    let e = open_err(&b);
    assert!(e.contains("unknown value type 77"), "{e}");
    assert!(open_err(b"").contains("truncated"));
}
