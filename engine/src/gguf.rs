//! GGUF v2/v3 reader: a memory-mapped file, its metadata and its tensor table.
//!
//! The format: a header (`GGUF`, version, tensor count, metadata count), the
//! metadata key/value pairs, the tensor infos (name, dims, type, offset), then
//! padding up to `general.alignment` (32 by default) and the tensor data. All
//! integers are little-endian. Every read is bounds-checked, so a truncated or
//! corrupt file is an error that names what was wrong, never a panic.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

/// Errors from opening or reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a GGUF file (magic bytes {0:?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("file truncated: {what} at byte {offset} needs {needed} bytes but the file has {len}")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
        len: usize,
    },
    #[error("corrupt file: {0}")]
    Corrupt(String),
    #[error("tensor {tensor} has unknown type id {type_id}")]
    UnknownTensorType { tensor: String, type_id: u32 },
    #[error("missing metadata key {0}")]
    MissingKey(String),
    #[error("metadata key {key} has type {found}, expected {expected}")]
    WrongType {
        key: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("missing tensor {0}")]
    MissingTensor(String),
}

/// Element types of GGUF tensors that the engine can compute with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    /// Maps a ggml type id to a type, or `None` for types this engine does not support.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// Elements per quantization block.
    pub fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
        }
    }

    /// Bytes per quantization block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// Bytes of a row of `n` elements, or `None` if `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_elems())
            .then(|| n / self.block_elems() * self.block_bytes())
    }

    /// The name ggml uses for this type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
            Self::BF16 => "BF16",
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F32(_) => "f32",
            Self::F64(_) => "f64",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous (row) length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset of the data from the start of the file.
    pub offset: usize,
    /// Byte length of the data.
    pub n_bytes: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elems(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    alignment: usize,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    by_name: BTreeMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

// Guards against absurd counts in a corrupt header before allocating for them.
const MAX_COUNT: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(GgufError::Truncated {
                what,
                offset: self.pos,
                needed: n,
                len: self.buf.len(),
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn count(&mut self, what: &'static str) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        if n > MAX_COUNT {
            return Err(GgufError::Corrupt(format!(
                "{what} is {n}, which is implausibly large"
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).map_err(|_| GgufError::Corrupt(format!("{what} length {n}")))?;
        let bytes = self.take(n, what)?;
        // Some tokenizers store vocab pieces that are not valid UTF-8; keep them lossily
        // rather than refusing the file.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, type_id: u32, depth: u32) -> Result<MetaValue, GgufError> {
        Ok(match type_id {
            0 => MetaValue::U8(self.array::<1>("u8 value")?[0]),
            1 => MetaValue::I8(self.array::<1>("i8 value")?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array("u16 value")?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array("i16 value")?)),
            4 => MetaValue::U32(self.u32("u32 value")?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array("i32 value")?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array("f32 value")?)),
            7 => {
                let b = self.array::<1>("bool value")?[0];
                if b > 1 {
                    return Err(GgufError::Corrupt(format!("bool value {b}")));
                }
                MetaValue::Bool(b == 1)
            }
            8 => MetaValue::String(self.string("string value")?),
            9 => {
                if depth > 2 {
                    return Err(GgufError::Corrupt("arrays nested too deeply".into()));
                }
                let elem_type = self.u32("array element type")?;
                let n = self.count("array length")?;
                let mut items = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(elem_type, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64("u64 value")?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array("i64 value")?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array("f64 value")?)),
            other => {
                return Err(GgufError::Corrupt(format!(
                    "unknown metadata value type {other}"
                )));
            }
        })
    }
}

impl GgufFile {
    /// Opens and parses a GGUF file, checking every tensor lies inside it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| GgufError::Open {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only; a file truncated underneath us by another
        // process is outside what any mmap-based loader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| GgufError::Open {
            path: path.clone(),
            source,
        })?;
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<Self, GgufError> {
        let mut c = Cursor { buf: &mmap, pos: 0 };
        let magic = c.array::<4>("magic")?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = c.count("tensor count")?;
        let n_kv = c.count("metadata count")?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata value type")?;
            let value = c.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => return Err(GgufError::Corrupt(format!("general.alignment {v:?}"))),
            },
        };

        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Corrupt(format!(
                    "tensor {name} has {n_dims} dimensions"
                )));
            }
            let dims = (0..n_dims)
                .map(|_| c.u64("tensor dimension"))
                .collect::<Result<Vec<_>, _>>()?;
            let type_id = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            raw.push((name, dims, type_id, offset));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut by_name = BTreeMap::new();
        for (name, dims, type_id, offset) in raw {
            let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
                tensor: name.clone(),
                type_id,
            })?;
            let n_elems = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    GgufError::Corrupt(format!("tensor {name} dims {dims:?} overflow"))
                })?;
            let row = dims[0] as usize;
            let n_bytes = ty
                .row_bytes(row)
                .and_then(|rb| rb.checked_mul((n_elems / dims[0].max(1)) as usize))
                .ok_or_else(|| {
                    GgufError::Corrupt(format!(
                        "tensor {name}: row length {row} is not a multiple of the {} block size {}",
                        ty.name(),
                        ty.block_elems()
                    ))
                })?;
            if !(offset as usize).is_multiple_of(alignment) {
                return Err(GgufError::Corrupt(format!(
                    "tensor {name} offset {offset} is not aligned to {alignment}"
                )));
            }
            let start = data_start
                .checked_add(offset as usize)
                .ok_or_else(|| GgufError::Corrupt(format!("tensor {name} offset {offset}")))?;
            if start
                .checked_add(n_bytes)
                .is_none_or(|end| end > mmap.len())
            {
                return Err(GgufError::Truncated {
                    what: "tensor data",
                    offset: start,
                    needed: n_bytes,
                    len: mmap.len(),
                });
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Corrupt(format!("tensor {name} appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset: start,
                n_bytes,
            });
        }

        Ok(Self {
            path,
            mmap,
            version,
            alignment,
            metadata,
            tensors,
            by_name,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment in bytes.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// All metadata.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A required unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.into()))?;
        v.as_u64().ok_or_else(|| GgufError::WrongType {
            key: key.into(),
            found: v.type_name(),
            expected: "unsigned integer",
        })
    }

    /// A required float.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.into()))?;
        v.as_f64().ok_or_else(|| GgufError::WrongType {
            key: key.into(),
            found: v.type_name(),
            expected: "number",
        })
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key) {
            None => Err(GgufError::MissingKey(key.into())),
            Some(MetaValue::String(s)) => Ok(s),
            Some(v) => Err(GgufError::WrongType {
                key: key.into(),
                found: v.type_name(),
                expected: "string",
            }),
        }
    }

    /// A required array.
    pub fn get_array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        match self.get(key) {
            None => Err(GgufError::MissingKey(key.into())),
            Some(MetaValue::Array(a)) => Ok(a),
            Some(v) => Err(GgufError::WrongType {
                key: key.into(),
                found: v.type_name(),
                expected: "array",
            }),
        }
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor's info by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor from this file's table.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.offset..info.offset + info.n_bytes]
    }

    /// A tensor's raw bytes by name.
    pub fn tensor_data(&self, name: &str) -> Result<(&TensorInfo, &[u8]), GgufError> {
        let info = self
            .tensor(name)
            .ok_or_else(|| GgufError::MissingTensor(name.into()))?;
        Ok((info, &self.mmap[info.offset..info.offset + info.n_bytes]))
    }
}

/// Writes a GGUF v3 file front to back: the header, metadata and tensor table
/// first (so every tensor's shape and type is declared up front), then each
/// tensor's bytes in table order, streamed in pieces of any size. Each tensor's
/// data is padded to the alignment, as ggml writes it. Nothing is held in
/// memory beyond what the caller passes in.
pub struct GgufWriter<W: std::io::Write> {
    out: W,
    /// (name, bytes) of every declared tensor, in order.
    sizes: Vec<(String, usize)>,
    /// The tensor being written and the bytes of it written so far.
    current: usize,
    written: usize,
    alignment: usize,
}

/// A tensor the writer will hold: its name, ggml-order dims and type.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorSpec {
    /// Bytes of the tensor's data, or `None` if its rows are not whole blocks.
    pub fn n_bytes(&self) -> Option<usize> {
        let row = *self.dims.first()? as usize;
        let rows: u64 = self.dims[1..].iter().product();
        self.ty.row_bytes(row)?.checked_mul(rows as usize)
    }
}

impl GgmlType {
    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::BF16 => 30,
        }
    }
}

impl MetaValue {
    /// The GGUF metadata value type id.
    fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::String(_) => 8,
            Self::Array(_) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }

    fn write_to(&self, out: &mut Vec<u8>) -> std::io::Result<()> {
        match self {
            Self::U8(v) => out.push(*v),
            Self::I8(v) => out.extend(v.to_le_bytes()),
            Self::U16(v) => out.extend(v.to_le_bytes()),
            Self::I16(v) => out.extend(v.to_le_bytes()),
            Self::U32(v) => out.extend(v.to_le_bytes()),
            Self::I32(v) => out.extend(v.to_le_bytes()),
            Self::F32(v) => out.extend(v.to_le_bytes()),
            Self::U64(v) => out.extend(v.to_le_bytes()),
            Self::I64(v) => out.extend(v.to_le_bytes()),
            Self::F64(v) => out.extend(v.to_le_bytes()),
            Self::Bool(v) => out.push(u8::from(*v)),
            Self::String(v) => write_str(out, v),
            Self::Array(items) => {
                // An empty array's element type is arbitrary; u32 as good as any.
                let elem = items.first().map_or(4, MetaValue::type_id);
                if items.iter().any(|i| i.type_id() != elem) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "a GGUF array's items must all have one type",
                    ));
                }
                out.extend(elem.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    i.write_to(out)?;
                }
            }
        }
        Ok(())
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

const ZEROS: [u8; 64] = [0; 64];

fn pad(out: &mut impl std::io::Write, n: usize) -> std::io::Result<()> {
    let mut left = n;
    while left > 0 {
        let k = left.min(ZEROS.len());
        out.write_all(&ZEROS[..k])?;
        left -= k;
    }
    Ok(())
}

impl<W: std::io::Write> GgufWriter<W> {
    /// Writes the header, metadata and tensor table. `general.alignment`, if
    /// present in `meta`, sets the alignment (32 otherwise).
    pub fn new(
        mut out: W,
        meta: &[(String, MetaValue)],
        tensors: &[TensorSpec],
    ) -> std::io::Result<Self> {
        let alignment = match meta.iter().find(|(k, _)| k == "general.alignment") {
            None => 32,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => return Err(invalid(format!("general.alignment {v:?}"))),
            },
        };
        let mut head = b"GGUF".to_vec();
        head.extend(3u32.to_le_bytes());
        head.extend((tensors.len() as u64).to_le_bytes());
        head.extend((meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            write_str(&mut head, k);
            head.extend(v.type_id().to_le_bytes());
            v.write_to(&mut head)?;
        }
        let mut sizes = Vec::with_capacity(tensors.len());
        let mut offset = 0usize;
        for t in tensors {
            if t.dims.is_empty() || t.dims.len() > MAX_DIMS as usize {
                return Err(invalid(format!(
                    "tensor {} has {} dimensions",
                    t.name,
                    t.dims.len()
                )));
            }
            let n = t.n_bytes().ok_or_else(|| {
                invalid(format!(
                    "tensor {}: row length {} is not a multiple of the {} block size {}",
                    t.name,
                    t.dims[0],
                    t.ty.name(),
                    t.ty.block_elems()
                ))
            })?;
            write_str(&mut head, &t.name);
            head.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend(d.to_le_bytes());
            }
            head.extend(t.ty.id().to_le_bytes());
            head.extend((offset as u64).to_le_bytes());
            offset += n.div_ceil(alignment) * alignment;
            sizes.push((t.name.clone(), n));
        }
        let padded = head.len().div_ceil(alignment) * alignment;
        head.resize(padded, 0);
        out.write_all(&head)?;
        let mut w = Self {
            out,
            sizes,
            current: 0,
            written: 0,
            alignment,
        };
        w.skip_empty()?;
        Ok(w)
    }

    /// Pads after tensors that are complete (including empty ones) and moves on.
    fn skip_empty(&mut self) -> std::io::Result<()> {
        while let Some(&(_, n)) = self.sizes.get(self.current) {
            if self.written < n {
                break;
            }
            pad(
                &mut self.out,
                n.div_ceil(self.alignment) * self.alignment - n,
            )?;
            self.current += 1;
            self.written = 0;
        }
        Ok(())
    }

    /// Appends bytes of tensor data, continuing in table order; a piece may
    /// span the end of one tensor and the start of the next.
    pub fn write_data(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let Some(&(_, n)) = self.sizes.get(self.current) else {
                return Err(invalid(format!(
                    "{} bytes of tensor data beyond the last tensor",
                    data.len()
                )));
            };
            let k = (n - self.written).min(data.len());
            self.out.write_all(&data[..k])?;
            self.written += k;
            data = &data[k..];
            self.skip_empty()?;
        }
        Ok(())
    }

    /// Checks every tensor was written in full and returns the output, flushed.
    pub fn finish(mut self) -> std::io::Result<W> {
        if let Some((name, n)) = self.sizes.get(self.current) {
            return Err(invalid(format!(
                "tensor {name} has {} of its {n} bytes",
                self.written
            )));
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a small GGUF v3 file: metadata pairs and F32 tensors.
    pub(crate) fn write_gguf(
        meta: &[(&str, MetaValue)],
        tensors: &[(&str, Vec<u64>, Vec<f32>)],
    ) -> Vec<u8> {
        let meta: Vec<(String, MetaValue)> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let specs: Vec<TensorSpec> = tensors
            .iter()
            .map(|(name, dims, _)| TensorSpec {
                name: name.to_string(),
                dims: dims.clone(),
                ty: GgmlType::F32,
            })
            .collect();
        let mut w = GgufWriter::new(Vec::new(), &meta, &specs).expect("test setup");
        for (_, _, data) in tensors {
            let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            w.write_data(&bytes).expect("test setup");
        }
        w.finish().expect("test setup")
    }

    fn parse_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
        let dir = std::env::temp_dir().join(format!(
            "tandem-gguf-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).expect("test setup");
        let path = dir.join(format!("{}.gguf", bytes.len()));
        std::fs::write(&path, bytes).expect("test setup");
        let r = GgufFile::open(&path);
        std::fs::remove_file(&path).expect("test setup");
        r
    }

    fn sample() -> Vec<u8> {
        write_gguf(
            &[
                ("general.architecture", MetaValue::String("llama".into())),
                ("llama.block_count", MetaValue::U32(2)),
                (
                    "list",
                    MetaValue::Array(vec![
                        MetaValue::String("a".into()),
                        MetaValue::String("b".into()),
                    ]),
                ),
            ],
            &[
                (
                    "w",
                    vec![4, 2],
                    vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                ),
                ("n", vec![3], vec![0.5, -0.5, 2.0]),
            ],
        )
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let f = parse_bytes(&sample()).expect("test setup");
        assert_eq!(f.version(), 3);
        assert_eq!(
            f.get_str("general.architecture").expect("test setup"),
            "llama"
        );
        assert_eq!(f.get_u64("llama.block_count").expect("test setup"), 2);
        assert_eq!(f.get_array("list").expect("test setup").len(), 2);
        let (info, data) = f.tensor_data("n").expect("test setup");
        assert_eq!(info.dims, vec![3]);
        let vals: Vec<f32> = data
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("test setup")))
            .collect();
        assert_eq!(vals, vec![0.5, -0.5, 2.0]);
        assert_eq!(f.tensor_data("w").expect("test setup").0.n_bytes, 32);
    }

    #[test]
    fn writer_round_trips_every_value_type_and_streams_across_tensors() {
        let meta: Vec<(String, MetaValue)> = [
            ("u8", MetaValue::U8(7)),
            ("i8", MetaValue::I8(-7)),
            ("u16", MetaValue::U16(700)),
            ("i16", MetaValue::I16(-700)),
            ("u32", MetaValue::U32(70_000)),
            ("i32", MetaValue::I32(-70_000)),
            ("u64", MetaValue::U64(1 << 40)),
            ("i64", MetaValue::I64(-(1 << 40))),
            ("f32", MetaValue::F32(0.25)),
            ("f64", MetaValue::F64(-0.125)),
            ("bool", MetaValue::Bool(true)),
            ("str", MetaValue::String("héllo".into())),
            ("empty", MetaValue::Array(vec![])),
            (
                "nested",
                MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::I32(1)])]),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let specs = vec![
            TensorSpec {
                name: "a".into(),
                dims: vec![32, 2],
                ty: GgmlType::Q8_0,
            },
            TensorSpec {
                name: "b".into(),
                dims: vec![3],
                ty: GgmlType::F32,
            },
        ];
        let data: Vec<u8> = (0..2 * 34 + 12).map(|i| i as u8).collect();
        let mut w = GgufWriter::new(Vec::new(), &meta, &specs).expect("test setup");
        // Pieces of 5 bytes: one spans the end of "a" and the start of "b".
        for piece in data.chunks(5) {
            w.write_data(piece).expect("test setup");
        }
        assert!(w.write_data(&[0]).is_err(), "a byte past the last tensor");
        let f = parse_bytes(&w.finish().expect("test setup")).expect("reads back");
        for (k, v) in &meta {
            assert_eq!(f.get(k), Some(v), "{k}");
        }
        let (a, a_bytes) = f.tensor_data("a").expect("test setup");
        assert_eq!((a.ty, a_bytes), (GgmlType::Q8_0, &data[..68]));
        assert_eq!(f.tensor_data("b").expect("test setup").1, &data[68..]);

        // A short write and a row that is not whole blocks are errors.
        let mut w = GgufWriter::new(Vec::new(), &meta, &specs).expect("test setup");
        w.write_data(&data[..10]).expect("test setup");
        let err = w.finish().expect_err("short");
        assert!(
            err.to_string().contains("tensor a has 10 of its 68 bytes"),
            "{err}"
        );
        let bad = [TensorSpec {
            name: "c".into(),
            dims: vec![31],
            ty: GgmlType::Q4_1,
        }];
        assert!(GgufWriter::new(Vec::new(), &[], &bad).is_err());
        let mixed = [(
            "m".to_string(),
            MetaValue::Array(vec![MetaValue::U32(1), MetaValue::F32(1.0)]),
        )];
        assert!(GgufWriter::new(Vec::new(), &mixed, &[]).is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        // The last 20 bytes are padding after the final 12-byte tensor.
        for len in 0..bytes.len() - 20 {
            let err = parse_bytes(&bytes[..len]).expect_err("truncated file must fail");
            let msg = err.to_string();
            assert!(
                msg.contains("truncated") || msg.contains("magic") || msg.contains("corrupt"),
                "len {len}: {msg}"
            );
        }
    }

    #[test]
    fn bad_magic_version_and_type_are_named() {
        let mut b = sample();
        b[0] = b'X';
        assert!(matches!(parse_bytes(&b), Err(GgufError::BadMagic(_))));
        let mut b = sample();
        b[4] = 9;
        assert!(matches!(
            parse_bytes(&b),
            Err(GgufError::UnsupportedVersion(9))
        ));
        // Patch the first tensor's type id (it follows the name and dims) to 99.
        let mut b = sample();
        let pos = b
            .windows(1 + 8 + 4 + 16)
            .position(|w| w[0] == b'w' && w[1..5] == 2u32.to_le_bytes())
            .expect("test setup");
        let type_pos = pos + 1 + 4 + 16;
        b[type_pos..type_pos + 4].copy_from_slice(&99u32.to_le_bytes());
        let err = parse_bytes(&b).unwrap_err();
        assert!(
            matches!(err, GgufError::UnknownTensorType { type_id: 99, .. }),
            "{err}"
        );
    }
}
