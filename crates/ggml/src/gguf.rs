//! GGUF files: a reader over a memory map (tensor data used in place) and a
//! streaming writer that never leaves a partial file behind.
//!
//! Implemented in Rust rather than through ggml's `gguf_*` functions so that every
//! malformed file yields an error naming the problem (ggml only logs and returns
//! NULL, and aborts on some inputs).
use crate::{Error, Result, Type};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: usize = 32;
/// Caps that keep a hostile header from asking for absurd allocations.
const MAX_ITEMS: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;

/// A metadata value of any GGUF type.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, whatever its integer width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64).or(match *self {
                Value::I8(v) => Some(v.into()),
                Value::I16(v) => Some(v.into()),
                Value::I32(v) => Some(v.into()),
                Value::I64(v) => Some(v as f64),
                _ => None,
            }),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }

    /// A short description of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"][self.type_id() as usize]
    }
}

/// Where a tensor's data is in a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: Type,
    /// ggml order (innermost first).
    pub shape: Vec<usize>,
    /// Offset from the start of the data section.
    pub offset: usize,
    pub nbytes: usize,
}

/// A GGUF file opened for reading; tensor data is used in place from the map.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    pub version: u32,
    pub alignment: usize,
    /// Absolute offset of the data section.
    pub data_offset: usize,
    pub metadata: BTreeMap<String, Value>,
    /// Metadata keys in file order.
    pub keys: Vec<String>,
    pub tensors: Vec<TensorInfo>,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io { path: path.clone(), source };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only; like every mmap user we assume the file is
        // not truncated underneath us while open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        parse(&path, map)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole mapped file (to build a zero-copy CPU buffer over it).
    pub fn mmap(&self) -> Arc<memmap2::Mmap> {
        self.map.clone()
    }

    pub fn file_size(&self) -> usize {
        self.map.len()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor, straight from the map.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_offset + info.offset;
        &self.map[start..start + info.nbytes]
    }

    /// A tensor converted to f32.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor(name).ok_or_else(|| self.err(format!("no tensor {name:?}")))?;
        crate::quant::to_f32(info.ty, self.tensor_data(info), info.shape.iter().product())
    }

    fn err(&self, detail: String) -> Error {
        Error::Gguf { path: self.path.clone(), detail }
    }
}

/// A byte cursor that reports what it was reading when the data ends.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, detail: String) -> Error {
        Error::Gguf { path: self.path.to_path_buf(), detail }
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(self.err(format!("truncated: file ends at byte {} while reading {}", self.data.len(), what())));
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(what)?;
        if len > (self.data.len() - self.pos) as u64 {
            return Err(self.err(format!("truncated: {} claims a string of {len} bytes past the end of the file", what())));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.err(format!("{} is not valid UTF-8: {e}", what())))
    }

    fn value(&mut self, ty: u32, what: &dyn Fn() -> String, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.take(1, what)?[0]),
            1 => Value::I8(self.take(1, what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.take(1, what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(format!("{} is a bool with byte value {b}", what()))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 0 {
                    return Err(self.err(format!("{} is a nested array deeper than GGUF allows", what())));
                }
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                if n > MAX_ITEMS || n > (self.data.len() - self.pos) as u64 {
                    return Err(self.err(format!("truncated: {} claims {n} array elements, more than the rest of the file holds", what())));
                }
                let mut items = Vec::with_capacity(n as usize);
                for i in 0..n {
                    let w = || format!("{} element {i}", what());
                    items.push(self.value(elem, &w, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            other => return Err(self.err(format!("{} has unknown value type {other}", what()))),
        })
    }
}

fn parse(path: &Path, map: memmap2::Mmap) -> Result<GgufFile> {
    let data: &[u8] = &map;
    let mut r = Reader { data, pos: 0, path };
    let magic = r.take(4, &|| "the magic".into())?;
    if magic != MAGIC {
        return Err(r.err(format!("not a GGUF file: magic is {magic:02x?}, expected \"GGUF\"")));
    }
    let version = r.u32(&|| "the version".into())?;
    if !(2..=3).contains(&version) {
        return Err(r.err(format!("unsupported GGUF version {version} (this reader knows 2 and 3)")));
    }
    let n_tensors = r.u64(&|| "the tensor count".into())?;
    let n_kv = r.u64(&|| "the metadata count".into())?;
    if n_tensors > MAX_ITEMS || n_kv > MAX_ITEMS {
        return Err(r.err(format!("implausible header: {n_tensors} tensors, {n_kv} metadata entries")));
    }
    let mut metadata = BTreeMap::new();
    let mut keys = Vec::new();
    for i in 0..n_kv {
        let key = r.string(&|| format!("metadata key #{i}"))?;
        let what = || format!("metadata {key:?}");
        let ty = r.u32(&what)?;
        let value = r.value(ty, &what, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.err(format!("metadata key {key:?} appears twice")));
        }
        keys.push(key);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a as usize,
            _ => {
                return Err(r.err(format!("general.alignment is {v:?}, expected a power of two")));
            }
        },
    };
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(&|| format!("the name of tensor #{i}"))?;
        let what = || format!("tensor {name:?}");
        let n_dims = r.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.err(format!("tensor {name:?} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = r.u64(&what)?;
            if d == 0 || d > i64::MAX as u64 {
                return Err(r.err(format!("tensor {name:?} has a dimension of {d}")));
            }
            shape.push(d as usize);
        }
        let raw_ty = r.u32(&what)?;
        let ty = Type::from_raw(raw_ty).map_err(|_| r.err(format!("tensor {name:?} has unknown type id {raw_ty}")))?;
        let offset = r.u64(&what)? as usize;
        if offset % alignment != 0 {
            return Err(r.err(format!("tensor {name:?} data offset {offset} is not aligned to {alignment}")));
        }
        let nbytes = ty.nbytes(&shape).map_err(|e| r.err(format!("tensor {name:?}: {e}")))?;
        if tensors.iter().any(|t| t.name == name) {
            return Err(r.err(format!("tensor {name:?} appears twice")));
        }
        tensors.push(TensorInfo { name, ty, shape, offset, nbytes });
    }
    let data_offset = r.pos.next_multiple_of(alignment);
    for t in &tensors {
        let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.nbytes));
        if end.is_none_or(|e| e > data.len()) {
            return Err(r.err(format!(
                "tensor {:?} data ({} bytes at offset {}) runs past the end of the file ({} bytes)",
                t.name,
                t.nbytes,
                data_offset + t.offset,
                data.len()
            )));
        }
    }
    Ok(GgufFile { path: path.to_path_buf(), map: Arc::new(map), version, alignment, data_offset, metadata, keys, tensors })
}

/// Writes a GGUF file: metadata and tensor infos first, then the tensor data one
/// tensor at a time in the declared order, so a converter never holds more than
/// one tensor in memory. The file appears under its name only on [`finish`]; a
/// writer dropped early (an error half-way) removes its temporary file.
///
/// [`finish`]: GgufWriter::finish
pub struct GgufWriter {
    path: PathBuf,
    tmp: Option<tempfile::NamedTempFile>,
    out: Option<BufWriter<File>>,
    pending: std::collections::VecDeque<TensorInfo>,
    written: u64,
    alignment: usize,
}

/// What goes into a GGUF file besides the tensor data.
#[derive(Default)]
pub struct GgufHeader {
    pub metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    next_offset: usize,
}

impl GgufHeader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        self.metadata.retain(|(k, _)| *k != key);
        self.metadata.push((key, value));
    }

    /// Declares a tensor (ggml order shape); its data is written later in this order.
    pub fn add_tensor(&mut self, name: impl Into<String>, ty: Type, shape: &[usize]) -> Result<()> {
        let name = name.into();
        if name.len() >= 64 {
            return Err(crate::error::shape("gguf", format!("tensor name {name:?} is longer than ggml's 63 bytes")));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(crate::error::shape("gguf", format!("tensor {name:?} declared twice")));
        }
        let nbytes = ty.nbytes(shape)?;
        let offset = self.next_offset;
        self.next_offset = (offset + nbytes).next_multiple_of(DEFAULT_ALIGNMENT);
        self.tensors.push(TensorInfo { name, ty, shape: shape.to_vec(), offset, nbytes });
        Ok(())
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Bytes the finished file will have.
    pub fn file_size(&self) -> usize {
        let mut buf = Vec::new();
        self.write_header(&mut buf).expect("writing to a Vec");
        buf.len().next_multiple_of(DEFAULT_ALIGNMENT) + self.next_offset
    }

    fn write_header(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(self.metadata.len() as u64).to_le_bytes())?;
        for (k, v) in &self.metadata {
            write_string(w, k)?;
            w.write_all(&v.type_id().to_le_bytes())?;
            write_value(w, v)?;
        }
        for t in &self.tensors {
            write_string(w, &t.name)?;
            w.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            for &d in &t.shape {
                w.write_all(&(d as u64).to_le_bytes())?;
            }
            w.write_all(&t.ty.raw().to_le_bytes())?;
            w.write_all(&(t.offset as u64).to_le_bytes())?;
        }
        Ok(())
    }
}

fn write_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&[*x as u8]),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::String(s) => write_string(w, s),
        Value::Array(items) => {
            let elem = items.first().map_or(4, Value::type_id);
            if items.iter().any(|i| i.type_id() != elem || matches!(i, Value::Array(_))) {
                return Err(std::io::Error::other("GGUF arrays hold values of one non-array type"));
            }
            w.write_all(&elem.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    /// Starts writing `header` to `path` (through a temporary file beside it).
    pub fn create(path: impl AsRef<Path>, header: GgufHeader) -> Result<GgufWriter> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io { path: path.clone(), source };
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new().prefix(".gguf-partial-").tempfile_in(dir).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, tmp.reopen().map_err(io)?);
        let mut head = Vec::new();
        header.write_header(&mut head).map_err(|e| Error::Gguf { path: path.clone(), detail: e.to_string() })?;
        head.resize(head.len().next_multiple_of(DEFAULT_ALIGNMENT), 0);
        out.write_all(&head).map_err(io)?;
        Ok(GgufWriter { path, tmp: Some(tmp), out: Some(out), pending: header.tensors.into(), written: 0, alignment: DEFAULT_ALIGNMENT })
    }

    /// Name of the next tensor whose data is expected.
    pub fn next_tensor(&self) -> Option<&TensorInfo> {
        self.pending.front()
    }

    /// Writes the data of the next declared tensor.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let err = |detail: String| Error::Gguf { path: self.path.clone(), detail };
        let Some(info) = self.pending.front() else {
            return Err(err(format!("tensor {name:?} was not declared")));
        };
        if info.name != name {
            return Err(err(format!("expected data of tensor {:?}, got {name:?}", info.name)));
        }
        if info.nbytes != data.len() {
            return Err(Error::DataSize { name: name.into(), got: data.len(), expected: info.nbytes });
        }
        let out = self.out.as_mut().expect("open until finish");
        let pad = (data.len()).next_multiple_of(self.alignment) - data.len();
        let io = |source| Error::Io { path: self.path.clone(), source };
        out.write_all(data).map_err(io)?;
        out.write_all(&vec![0u8; pad]).map_err(io)?;
        self.written += (data.len() + pad) as u64;
        self.pending.pop_front();
        Ok(())
    }

    /// Flushes and moves the file into place. Fails if tensors are missing.
    pub fn finish(mut self) -> Result<u64> {
        if let Some(t) = self.pending.front() {
            return Err(Error::Gguf { path: self.path.clone(), detail: format!("tensor {:?} was declared but never written", t.name) });
        }
        let io = |source| Error::Io { path: self.path.clone(), source };
        let out = self.out.take().expect("open until finish");
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let tmp = self.tmp.take().expect("open until finish");
        // Temporary files are private (0600); the result is an ordinary file.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(io)?;
        }
        tmp.persist(&self.path).map_err(|e| io(e.error))?;
        Ok(size)
    }
}
