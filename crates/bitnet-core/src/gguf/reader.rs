//! The GGUF container: header, metadata key/values, tensor infos, tensor data.
//!
//! Format (little-endian, versions 2 and 3, which share one layout):
//! ```text
//! "GGUF" | u32 version | u64 tensor_count | u64 kv_count
//! kv_count x { string key | u32 value_type | value }
//! tensor_count x { string name | u32 n_dims | n_dims x u64 ne | u32 ggml_type | u64 offset }
//! padding to `general.alignment` (default 32)
//! tensor data; each tensor at data_offset + offset (offset a multiple of the alignment)
//! ```
//! A string is `u64 len | len bytes` (UTF-8). An array is `u32 elem_type | u64 count | count
//! values`. `ne` lists dimensions innermost first: `ne[0]` is the number of columns.
//!
//! Robustness: the parser only reads through a bounds-checked cursor; every count, length, size
//! and offset is checked (with checked arithmetic) against the bytes that are actually there
//! before anything is allocated for it, so a corrupt or hostile file yields an
//! [`Error::Format`] naming the file and the key or tensor at fault, never a panic, an
//! out-of-bounds read or an allocation larger than the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

use super::i2s;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// GGML's limit on tensor dimensions.
pub const MAX_DIMS: u32 = 4;
/// How deeply metadata arrays may nest (arrays of arrays); real files use 1.
const MAX_ARRAY_DEPTH: u32 = 4;
/// Largest `general.alignment` accepted (1 MiB).
pub(super) const MAX_ALIGNMENT: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// metadata values
// ---------------------------------------------------------------------------------------------

/// The type tag of a metadata value (`gguf_type` in ggml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    /// 0
    U8,
    /// 1
    I8,
    /// 2
    U16,
    /// 3
    I16,
    /// 4
    U32,
    /// 5
    I32,
    /// 6
    F32,
    /// 7 (one byte, 0 or 1)
    Bool,
    /// 8
    String,
    /// 9
    Array,
    /// 10
    U64,
    /// 11
    I64,
    /// 12
    F64,
}

impl GgufValueType {
    /// The type for a numeric tag, or None for an unknown tag.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The numeric tag written in the file.
    pub fn id(self) -> u32 {
        use GgufValueType::*;
        match self {
            U8 => 0,
            I8 => 1,
            U16 => 2,
            I16 => 3,
            U32 => 4,
            I32 => 5,
            F32 => 6,
            Bool => 7,
            String => 8,
            Array => 9,
            U64 => 10,
            I64 => 11,
            F64 => 12,
        }
    }

    /// The fewest bytes one value of this type occupies in a file (used to bound counts).
    fn min_size(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            String => 8,
            Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `u8`
    U8(u8),
    /// `i8`
    I8(i8),
    /// `u16`
    U16(u16),
    /// `i16`
    I16(i16),
    /// `u32`
    U32(u32),
    /// `i32`
    I32(i32),
    /// `u64`
    U64(u64),
    /// `i64`
    I64(i64),
    /// `f32`
    F32(f32),
    /// `f64`
    F64(f64),
    /// `bool`
    Bool(bool),
    /// a UTF-8 string
    String(String),
    /// an array of one element type
    Array(GgufArray),
}

/// A metadata array: all elements share one type, kept unboxed.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    /// `u8[]`
    U8(Vec<u8>),
    /// `i8[]`
    I8(Vec<i8>),
    /// `u16[]`
    U16(Vec<u16>),
    /// `i16[]`
    I16(Vec<i16>),
    /// `u32[]`
    U32(Vec<u32>),
    /// `i32[]`
    I32(Vec<i32>),
    /// `u64[]`
    U64(Vec<u64>),
    /// `i64[]`
    I64(Vec<i64>),
    /// `f32[]`
    F32(Vec<f32>),
    /// `f64[]`
    F64(Vec<f64>),
    /// `bool[]`
    Bool(Vec<bool>),
    /// `string[]` (e.g. `tokenizer.ggml.tokens`)
    String(Vec<String>),
    /// nested arrays
    Array(Vec<GgufArray>),
}

impl GgufArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::F64(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
        }
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn elem_type(&self) -> GgufValueType {
        use GgufValueType as T;
        match self {
            GgufArray::U8(_) => T::U8,
            GgufArray::I8(_) => T::I8,
            GgufArray::U16(_) => T::U16,
            GgufArray::I16(_) => T::I16,
            GgufArray::U32(_) => T::U32,
            GgufArray::I32(_) => T::I32,
            GgufArray::U64(_) => T::U64,
            GgufArray::I64(_) => T::I64,
            GgufArray::F32(_) => T::F32,
            GgufArray::F64(_) => T::F64,
            GgufArray::Bool(_) => T::Bool,
            GgufArray::String(_) => T::String,
            GgufArray::Array(_) => T::Array,
        }
    }

    /// Every element as i64 when the element type is an integer type (u64 values above
    /// `i64::MAX` give None).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        Some(match self {
            GgufArray::U8(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I8(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::U16(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I16(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::U32(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I32(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I64(v) => v.clone(),
            GgufArray::U64(v) => {
                let mut out = Vec::with_capacity(v.len());
                for &x in v {
                    out.push(i64::try_from(x).ok()?);
                }
                out
            }
            _ => return None,
        })
    }
}

impl GgufValue {
    /// The type tag of this value.
    pub fn value_type(&self) -> GgufValueType {
        use GgufValueType as T;
        match self {
            GgufValue::U8(_) => T::U8,
            GgufValue::I8(_) => T::I8,
            GgufValue::U16(_) => T::U16,
            GgufValue::I16(_) => T::I16,
            GgufValue::U32(_) => T::U32,
            GgufValue::I32(_) => T::I32,
            GgufValue::U64(_) => T::U64,
            GgufValue::I64(_) => T::I64,
            GgufValue::F32(_) => T::F32,
            GgufValue::F64(_) => T::F64,
            GgufValue::Bool(_) => T::Bool,
            GgufValue::String(_) => T::String,
            GgufValue::Array(_) => T::Array,
        }
    }

    /// A non-negative integer of any integer type, as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// An integer of any integer type that fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(v as i64),
            GgufValue::U16(v) => Some(v as i64),
            GgufValue::U32(v) => Some(v as i64),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// A float (F32 or F64), or an integer converted to f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The string, when this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The bool, when this is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The array, when this is an array.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short description of the type for error messages, e.g. `u32` or `array of string`.
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::Array(a) => format!("array of {:?}", a.elem_type()).to_lowercase(),
            v => format!("{:?}", v.value_type()).to_lowercase(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tensor types
// ---------------------------------------------------------------------------------------------

/// The tensor element types this reader decodes (`ggml_type` ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufDType {
    /// 0: little-endian f32
    F32,
    /// 1: IEEE half
    F16,
    /// 30: bfloat16
    BF16,
    /// 8: blocks of 32 values: f16 scale `d` + 32 x i8 `q`; value = `q * d`
    Q8_0,
    /// 36: bitnet.cpp's ternary I2_S (see [`super::i2s`]); not mainline ggml's type 36
    I2S,
}

impl GgufDType {
    /// The dtype for a `ggml_type` id, or an error message naming the id (and the type when it
    /// is a known ggml type this reader does not decode).
    pub fn from_id(id: u32) -> std::result::Result<Self, String> {
        Ok(match id {
            0 => GgufDType::F32,
            1 => GgufDType::F16,
            8 => GgufDType::Q8_0,
            30 => GgufDType::BF16,
            36 => GgufDType::I2S,
            other => {
                let known = match other {
                    2 => Some("Q4_0"),
                    3 => Some("Q4_1"),
                    6 => Some("Q5_0"),
                    7 => Some("Q5_1"),
                    9 => Some("Q8_1"),
                    10 => Some("Q2_K"),
                    11 => Some("Q3_K"),
                    12 => Some("Q4_K"),
                    13 => Some("Q5_K"),
                    14 => Some("Q6_K"),
                    15 => Some("Q8_K"),
                    16..=23 | 29 => Some("an IQ quant"),
                    24 => Some("I8"),
                    25 => Some("I16"),
                    26 => Some("I32"),
                    27 => Some("I64"),
                    28 => Some("F64"),
                    34 => Some("TQ1_0"),
                    35 => Some("TQ2_0"),
                    38 | 39 => Some("bitnet.cpp TL1/TL2 (machine-specific; use an I2_S file)"),
                    _ => None,
                };
                return Err(match known {
                    Some(name) => {
                        format!("unsupported tensor type {other} ({name}); supported: F32, F16, BF16, Q8_0, I2_S")
                    }
                    None => format!(
                        "unknown tensor type id {other}; supported: F32 (0), F16 (1), Q8_0 (8), BF16 (30), I2_S (36)"
                    ),
                });
            }
        })
    }

    /// The `ggml_type` id written in the file.
    pub fn id(self) -> u32 {
        match self {
            GgufDType::F32 => 0,
            GgufDType::F16 => 1,
            GgufDType::Q8_0 => 8,
            GgufDType::BF16 => 30,
            GgufDType::I2S => 36,
        }
    }

    /// Bytes of a tensor with `n` elements whose innermost dimension is `ne0`, or an error
    /// message when the element count does not fit the type's blocks.
    pub fn nbytes(self, n: u64, ne0: u64) -> std::result::Result<u64, String> {
        let overflow = || format!("{n} elements overflow the byte size");
        match self {
            GgufDType::F32 => n.checked_mul(4).ok_or_else(overflow),
            GgufDType::F16 | GgufDType::BF16 => n.checked_mul(2).ok_or_else(overflow),
            GgufDType::Q8_0 => {
                if ne0 % 32 != 0 {
                    return Err(format!("Q8_0 needs rows (ne[0] = {ne0}) that are a multiple of 32"));
                }
                (n / 32).checked_mul(34).ok_or_else(overflow)
            }
            GgufDType::I2S => {
                if n % i2s::BLOCK_VALUES as u64 != 0 {
                    return Err(format!(
                        "I2_S needs an element count that is a multiple of {} ({n} is not)",
                        i2s::BLOCK_VALUES
                    ));
                }
                (n / 4).checked_add(i2s::TRAILER_BYTES as u64).ok_or_else(overflow)
            }
        }
    }

    /// Name as ggml prints it.
    pub fn name(self) -> &'static str {
        match self {
            GgufDType::F32 => "F32",
            GgufDType::F16 => "F16",
            GgufDType::BF16 => "BF16",
            GgufDType::Q8_0 => "Q8_0",
            GgufDType::I2S => "I2_S",
        }
    }
}

/// Where one tensor lives and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml `ne` order: `dims[0]` is the innermost (columns).
    pub dims: Vec<u64>,
    /// Element type.
    pub dtype: GgufDType,
    /// Offset of the data from the start of the data section (a multiple of the alignment).
    pub offset: u64,
    /// Product of the dimensions.
    pub n_elements: u64,
    /// Bytes of data, as the type defines them.
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// `(rows, cols)` of a 2-D tensor in row-major terms (`rows = ne[1]`, `cols = ne[0]`); a 1-D
    /// tensor is one row. Higher dimensions fold into rows.
    pub fn rows_cols(&self) -> (u64, u64) {
        let cols = self.dims.first().copied().unwrap_or(1);
        let rows = self.dims.iter().skip(1).product::<u64>();
        (rows, cols)
    }
}

// ---------------------------------------------------------------------------------------------
// the parsed header
// ---------------------------------------------------------------------------------------------

/// Everything before the tensor data, parsed and validated against the length of the file.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<GgufTensorInfo>,
    alignment: u64,
    data_offset: u64,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

/// Why a low-level read failed; turned into an [`Error::Format`] with context by the caller.
enum ReadErr {
    /// Needed `need` bytes at `pos`, but the file ends at `len`.
    Eof { pos: usize, need: u64, len: usize },
    /// Anything else.
    Bad(String),
}

impl ReadErr {
    fn describe(self) -> String {
        match self {
            ReadErr::Eof { pos, need, len } => {
                format!("truncated: needs {need} bytes at offset {pos}, but the file is {len} bytes")
            }
            ReadErr::Bad(m) => m,
        }
    }
}

type RResult<T> = std::result::Result<T, ReadErr>;

/// A bounds-checked little-endian reader over a byte slice.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64) -> RResult<&'a [u8]> {
        let eof = ReadErr::Eof { pos: self.pos, need: n, len: self.buf.len() };
        if n > self.remaining() {
            return Err(eof);
        }
        let n = n as usize; // n <= remaining, which is a usize
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> RResult<[u8; N]> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self) -> RResult<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> RResult<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> RResult<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> RResult<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A GGUF string: u64 length then that many UTF-8 bytes.
    fn string(&mut self) -> RResult<String> {
        let at = self.pos;
        let len = self.u64()?;
        if len > self.remaining() {
            return Err(ReadErr::Bad(format!(
                "string length {len} at offset {at} exceeds the {} bytes left in the file",
                self.remaining()
            )));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| ReadErr::Bad(format!("string at offset {at} is not valid UTF-8 ({e})")))
    }

    /// Checks that `count` elements of at least `min_size` bytes each can be present.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> RResult<()> {
        let fits = count.checked_mul(min_size).is_some_and(|b| b <= self.remaining());
        if fits {
            Ok(())
        } else {
            Err(ReadErr::Bad(format!(
                "{what} count {count} is impossible: only {} bytes are left in the file",
                self.remaining()
            )))
        }
    }

    fn value(&mut self, ty: GgufValueType, depth: u32) -> RResult<GgufValue> {
        use GgufValueType as T;
        Ok(match ty {
            T::U8 => GgufValue::U8(self.u8()?),
            T::I8 => GgufValue::I8(self.u8()? as i8),
            T::U16 => GgufValue::U16(self.u16()?),
            T::I16 => GgufValue::I16(self.u16()? as i16),
            T::U32 => GgufValue::U32(self.u32()?),
            T::I32 => GgufValue::I32(self.u32()? as i32),
            T::U64 => GgufValue::U64(self.u64()?),
            T::I64 => GgufValue::I64(self.u64()? as i64),
            T::F32 => GgufValue::F32(f32::from_bits(self.u32()?)),
            T::F64 => GgufValue::F64(f64::from_bits(self.u64()?)),
            T::Bool => GgufValue::Bool(self.bool()?),
            T::String => GgufValue::String(self.string()?),
            T::Array => GgufValue::Array(self.array_value(depth)?),
        })
    }

    fn bool(&mut self) -> RResult<bool> {
        let at = self.pos;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(ReadErr::Bad(format!("bool at offset {at} has value {b} (expected 0 or 1)"))),
        }
    }

    fn array_value(&mut self, depth: u32) -> RResult<GgufArray> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(ReadErr::Bad(format!("arrays nested more than {MAX_ARRAY_DEPTH} deep")));
        }
        let at = self.pos;
        let tid = self.u32()?;
        let ty = GgufValueType::from_id(tid)
            .ok_or_else(|| ReadErr::Bad(format!("array at offset {at} has unknown element type {tid}")))?;
        let count = self.u64()?;
        self.check_count(count, ty.min_size(), "array element")?;
        // `count` elements fit in the file, so this is bounded by the file size; cap the
        // initial reservation anyway so a large claimed count costs nothing until read.
        let cap = count.min(1 << 16) as usize;
        macro_rules! read_vec {
            ($variant:ident, $read:expr) => {{
                let mut v = Vec::with_capacity(cap);
                for _ in 0..count {
                    v.push($read(&mut *self)?);
                }
                GgufArray::$variant(v)
            }};
        }
        Ok(match ty {
            GgufValueType::U8 => GgufArray::U8(self.take(count)?.to_vec()),
            GgufValueType::I8 => GgufArray::I8(self.take(count)?.iter().map(|&b| b as i8).collect()),
            GgufValueType::U16 => read_vec!(U16, |c: &mut Self| c.u16()),
            GgufValueType::I16 => read_vec!(I16, |c: &mut Self| c.u16().map(|x| x as i16)),
            GgufValueType::U32 => read_vec!(U32, |c: &mut Self| c.u32()),
            GgufValueType::I32 => read_vec!(I32, |c: &mut Self| c.u32().map(|x| x as i32)),
            GgufValueType::U64 => read_vec!(U64, |c: &mut Self| c.u64()),
            GgufValueType::I64 => read_vec!(I64, |c: &mut Self| c.u64().map(|x| x as i64)),
            GgufValueType::F32 => read_vec!(F32, |c: &mut Self| c.u32().map(f32::from_bits)),
            GgufValueType::F64 => read_vec!(F64, |c: &mut Self| c.u64().map(f64::from_bits)),
            GgufValueType::Bool => read_vec!(Bool, |c: &mut Self| c.bool()),
            GgufValueType::String => read_vec!(String, |c: &mut Self| c.string()),
            GgufValueType::Array => read_vec!(Array, |c: &mut Self| c.array_value(depth + 1)),
        })
    }
}

impl GgufHeader {
    /// Parses and validates the header of `bytes` (the whole file). `path` only names the file
    /// in errors. Validates: magic, version (2 or 3), every count and length against the bytes
    /// left, value types, UTF-8, duplicate keys and tensor names, `general.alignment`, tensor
    /// ranks, dimensions, types, byte sizes, offset alignment, and that every tensor's data lies
    /// inside the file without overlapping another.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<GgufHeader> {
        let fmt = |msg: String| Error::format(path, msg);
        let len = bytes.len();
        if len < 4 {
            return Err(fmt(format!("not a GGUF file: only {len} bytes")));
        }
        if bytes[..4] != GGUF_MAGIC {
            return Err(fmt(format!(
                "not a GGUF file: magic {:02x?} (expected \"GGUF\" = {:02x?})",
                &bytes[..4],
                GGUF_MAGIC
            )));
        }
        let mut c = Cursor { buf: bytes, pos: 4 };
        let hdr = |e: ReadErr| fmt(format!("header: {}", e.describe()));
        let version = c.u32().map_err(hdr)?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(fmt(
                    "unsupported GGUF version 1 (32-bit counts, 2023); re-convert the model (versions 2 and 3 are supported)".into(),
                ))
            }
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(fmt(format!(
                    "big-endian GGUF (version {} byte-swapped) is not supported",
                    v.swap_bytes()
                )))
            }
            v => return Err(fmt(format!("unsupported GGUF version {v} (supported: 2, 3)"))),
        }
        let tensor_count = c.u64().map_err(hdr)?;
        let kv_count = c.u64().map_err(hdr)?;
        // minimal sizes: kv = key length (8) + type (4) + a 1-byte value; tensor info = name
        // length (8) + n_dims (4) + one dim (8) + type (4) + offset (8)
        c.check_count(kv_count, 13, "metadata key/value").map_err(hdr)?;
        c.check_count(tensor_count, 32, "tensor").map_err(hdr)?;

        // The counts are bounded by the file size; reserve at most a little up front anyway, so a
        // corrupt count costs nothing until its entries actually parse.
        let kv_cap = kv_count.min(1024) as usize;
        let mut metadata = Vec::with_capacity(kv_cap);
        let mut meta_index = HashMap::with_capacity(kv_cap);
        for i in 0..kv_count {
            let key = c.string().map_err(|e| fmt(format!("metadata key #{i}: {}", e.describe())))?;
            let kerr = |e: ReadErr| fmt(format!("metadata key {key:?}: {}", e.describe()));
            let at = c.pos;
            let tid = c.u32().map_err(kerr)?;
            let ty = GgufValueType::from_id(tid)
                .ok_or_else(|| fmt(format!("metadata key {key:?}: unknown value type {tid} at offset {at}")))?;
            let value = c.value(ty, 0).map_err(kerr)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(fmt(format!("metadata key {key:?} appears twice")));
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get(ALIGNMENT_KEY).map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => a,
                _ => {
                    return Err(fmt(format!(
                        "metadata key {ALIGNMENT_KEY:?}: {v:?} is not a power of two <= {MAX_ALIGNMENT}"
                    )))
                }
            },
        };

        let t_cap = tensor_count.min(4096) as usize;
        let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(t_cap);
        let mut tensor_index = HashMap::with_capacity(t_cap);
        for i in 0..tensor_count {
            let name = c.string().map_err(|e| fmt(format!("tensor info #{i}: {}", e.describe())))?;
            let terr = |msg: String| fmt(format!("tensor {name:?}: {msg}"));
            let rerr = |e: ReadErr| terr(e.describe());
            let n_dims = c.u32().map_err(rerr)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(terr(format!("{n_dims} dimensions (expected 1..={MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64().map_err(rerr)?);
            }
            let tid = c.u32().map_err(rerr)?;
            let offset = c.u64().map_err(rerr)?;
            let dtype = GgufDType::from_id(tid).map_err(&terr)?;
            if dims.contains(&0) {
                return Err(terr(format!("has a zero dimension: ne = {dims:?}")));
            }
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| terr(format!("dimensions {dims:?} overflow the element count")))?;
            let n_bytes =
                dtype.nbytes(n_elements, dims[0]).map_err(|m| terr(format!("{} ne = {dims:?}: {m}", dtype.name())))?;
            if offset % alignment != 0 {
                return Err(terr(format!("data offset {offset} is not a multiple of the alignment {alignment}")));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(terr("appears twice".into()));
            }
            tensors.push(GgufTensorInfo { name, dims, dtype, offset, n_elements, n_bytes });
        }

        let info_end = c.pos as u64;
        let data_offset =
            info_end.checked_next_multiple_of(alignment).ok_or_else(|| fmt("data offset overflows".into()))?;

        // Every tensor inside the file, none overlapping.
        let mut spans: Vec<(u64, u64, usize)> = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes));
            match (start, end) {
                (Some(s), Some(e)) if e <= len as u64 => spans.push((s, e, i)),
                _ => {
                    return Err(fmt(format!(
                        "tensor {:?}: data at offset {} + {} ({} bytes of {}, ne = {:?}) extends past the end of the file ({len} bytes)",
                        t.name,
                        data_offset,
                        t.offset,
                        t.n_bytes,
                        t.dtype.name(),
                        t.dims
                    )))
                }
            }
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(fmt(format!(
                    "tensors {:?} and {:?} overlap in the data section",
                    tensors[w[0].2].name, tensors[w[1].2].name
                )));
            }
        }

        Ok(GgufHeader { version, metadata, tensors, alignment, data_offset, meta_index, tensor_index })
    }

    /// File format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// Alignment of the data section and of every tensor offset.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The info of a tensor.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
}

// ---------------------------------------------------------------------------------------------
// the file
// ---------------------------------------------------------------------------------------------

/// The bytes of a file: memory-mapped, or owned (tests, in-memory files).
enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// An open GGUF file: the validated header plus the (memory-mapped) bytes.
///
/// Metadata getters come in two kinds: [`GgufFile::get`] returns the raw value; the typed
/// `meta_*` getters return `Ok(None)` when a key is absent and an error naming the key when it
/// has the wrong type.
pub struct GgufFile {
    path: PathBuf,
    backing: Backing,
    header: GgufHeader,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("n_metadata", &self.header.metadata.len())
            .field("n_tensors", &self.header.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and memory-maps `path` and validates its header.
    ///
    /// The map is read-only; as with every memory-mapped reader, the file must not be truncated
    /// or rewritten by another process while this value lives.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let backing = if len == 0 {
            Backing::Owned(Vec::new()) // mapping 0 bytes fails on some systems
        } else {
            // SAFETY: read-only map of a file we opened; the documented contract is that the
            // file is not modified while mapped. All reads go through bounds-checked slices.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            Backing::Mmap(map)
        };
        Self::from_backing(path.to_path_buf(), backing)
    }

    /// Parses an in-memory GGUF file; `path` only names it in errors.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile> {
        Self::from_backing(path.into(), Backing::Owned(bytes))
    }

    fn from_backing(path: PathBuf, backing: Backing) -> Result<GgufFile> {
        let header = GgufHeader::parse(&path, backing.bytes())?;
        Ok(GgufFile { path, backing, header })
    }

    /// The path given at open (used in every error).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header.
    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    /// File format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// Data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.header.alignment
    }

    /// Absolute offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.header.data_offset
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.header.metadata
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.header.tensors
    }

    /// The raw value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.header.get(key)
    }

    /// The info of a tensor, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.header.tensor_info(name)
    }

    /// The info of a tensor, or an error naming it when absent.
    pub fn require_tensor(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name).ok_or_else(|| Error::format(&self.path, format!("tensor {name:?} not found")))
    }

    /// The raw data bytes of a tensor (validated to lie inside the file at open).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.require_tensor(name)?;
        Ok(self.bytes_of(t))
    }

    fn bytes_of(&self, t: &GgufTensorInfo) -> &[u8] {
        // Validated in GgufHeader::parse: data_offset + offset + n_bytes <= file length.
        let start = (self.header.data_offset + t.offset) as usize;
        &self.backing.bytes()[start..start + t.n_bytes as usize]
    }

    fn key_err(&self, key: &str, want: &str, v: &GgufValue) -> Error {
        Error::format(&self.path, format!("metadata key {key:?}: expected {want}, found {}", v.type_name()))
    }

    /// A non-negative integer of any integer type.
    pub fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|v| v.as_u64().ok_or_else(|| self.key_err(key, "a non-negative integer", v))).transpose()
    }

    /// A non-negative integer that fits in usize.
    pub fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.meta_u64(key)? {
            None => Ok(None),
            Some(v) => usize::try_from(v)
                .map(Some)
                .map_err(|_| Error::format(&self.path, format!("metadata key {key:?}: {v} is too large"))),
        }
    }

    /// A float (F32 or F64; integers are accepted too).
    pub fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.key_err(key, "a number", v))).transpose()
    }

    /// A string.
    pub fn meta_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| self.key_err(key, "a string", v))).transpose()
    }

    /// A bool.
    pub fn meta_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.key_err(key, "a bool", v))).transpose()
    }

    /// An array of strings.
    pub fn meta_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(GgufArray::String(v))) => Ok(Some(v)),
            Some(v) => Err(self.key_err(key, "an array of strings", v)),
        }
    }

    /// An array of any integer type, as i64.
    pub fn meta_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .and_then(GgufArray::to_i64_vec)
                .map(Some)
                .ok_or_else(|| self.key_err(key, "an array of integers", v)),
        }
    }

    /// An array of f32.
    pub fn meta_f32_array(&self, key: &str) -> Result<Option<&[f32]>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(GgufArray::F32(v))) => Ok(Some(v)),
            Some(v) => Err(self.key_err(key, "an array of f32", v)),
        }
    }

    /// A dense tensor (F32, F16, BF16 or Q8_0) widened to f32, in row-major order.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.require_tensor(name)?;
        let b = self.bytes_of(t);
        Ok(match t.dtype {
            GgufDType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            GgufDType::F16 => {
                b.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
            }
            GgufDType::BF16 => {
                b.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
            }
            GgufDType::Q8_0 => dequantize_q8_0(b),
            GgufDType::I2S => {
                return Err(Error::format(
                    &self.path,
                    format!("tensor {name:?} is I2_S (ternary), not a dense float tensor"),
                ))
            }
        })
    }

    /// A 16-bit tensor's raw element bits (F16 or BF16), row-major, with its dtype.
    pub fn read_u16_bits(&self, name: &str) -> Result<(GgufDType, Vec<u16>)> {
        let t = self.require_tensor(name)?;
        match t.dtype {
            GgufDType::F16 | GgufDType::BF16 => {
                let b = self.bytes_of(t);
                Ok((t.dtype, crate::weights::u16s_le(b)))
            }
            other => Err(Error::format(
                &self.path,
                format!("tensor {name:?} is {}, not a 16-bit float tensor", other.name()),
            )),
        }
    }

    /// An I2_S tensor decoded to ternary codes (row-major, in {-1, 0, +1}) and its f32 scale.
    /// Errors name the tensor when it is not I2_S or holds the invalid code 3.
    pub fn read_i2s(&self, name: &str) -> Result<(Vec<i8>, f32)> {
        let t = self.require_tensor(name)?;
        if t.dtype != GgufDType::I2S {
            return Err(Error::format(&self.path, format!("tensor {name:?} is {}, not I2_S", t.dtype.name())));
        }
        // n_elements fits in usize: its n/4 bytes lie inside a mapped file.
        i2s::decode(self.bytes_of(t), t.n_elements as usize)
            .map_err(|m| Error::format(&self.path, format!("tensor {name:?}: {m}")))
    }
}

/// Q8_0 blocks (f16 `d`, 32 x i8 `q`) to f32 `q * d`, as ggml's `dequantize_row_q8_0`.
/// `bytes.len()` must be a multiple of 34.
pub fn dequantize_q8_0(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() / 34 * 32);
    for blk in bytes.chunks_exact(34) {
        let d = half::f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
        out.extend(blk[2..].iter().map(|&q| (q as i8) as f32 * d));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufWriter;

    fn parse(b: &[u8]) -> Result<GgufHeader> {
        GgufHeader::parse(Path::new("x.gguf"), b)
    }

    fn err(b: &[u8]) -> String {
        match parse(b) {
            Ok(_) => panic!("expected an error"),
            Err(e) => {
                let s = e.to_string();
                assert!(s.starts_with("x.gguf: "), "{s}");
                s
            }
        }
    }

    /// One key "a" = u32 1 and one F32 tensor "t" of 4 values. Positions: key at 24, tensor
    /// info name at 41, n_dims 50, ne0 54, type 62, offset 66; data at 96.
    fn small() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.add_meta("a", GgufValue::U32(1));
        w.add_f32("t", &[4], &[1.0, -2.0, 3.5, 0.25]);
        w.to_bytes()
    }

    fn put_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn small_file_layout() {
        let b = small();
        let h = parse(&b).unwrap();
        assert_eq!((h.version(), h.alignment(), h.data_offset()), (3, 32, 96));
        assert_eq!(b.len(), 96 + 16);
        let t = h.tensor_info("t").unwrap();
        assert_eq!((t.n_elements, t.n_bytes, t.offset), (4, 16, 0));
        assert_eq!(&b[50..54], &1u32.to_le_bytes());
        let f = GgufFile::from_bytes("x.gguf", b).unwrap();
        assert_eq!(f.read_f32("t").unwrap(), vec![1.0, -2.0, 3.5, 0.25]);
        let e = f.read_i2s("t").unwrap_err().to_string();
        assert!(e.contains("\"t\" is F32, not I2_S"), "{e}");
        let e = f.read_f32("nope").unwrap_err().to_string();
        assert!(e.contains("tensor \"nope\" not found"), "{e}");
    }

    #[test]
    fn every_value_type_roundtrips() {
        let vals = vec![
            ("u8", GgufValue::U8(200)),
            ("i8", GgufValue::I8(-5)),
            ("u16", GgufValue::U16(60000)),
            ("i16", GgufValue::I16(-300)),
            ("u32", GgufValue::U32(4_000_000_000)),
            ("i32", GgufValue::I32(-7)),
            ("u64", GgufValue::U64(u64::MAX)),
            ("i64", GgufValue::I64(i64::MIN)),
            ("f32", GgufValue::F32(1e-5)),
            ("f64", GgufValue::F64(0.1)),
            ("bool", GgufValue::Bool(true)),
            ("str", GgufValue::String("héllo".into())),
            ("a_u8", GgufValue::Array(GgufArray::U8(vec![1, 2]))),
            ("a_i8", GgufValue::Array(GgufArray::I8(vec![-1]))),
            ("a_u16", GgufValue::Array(GgufArray::U16(vec![1, 65535]))),
            ("a_i16", GgufValue::Array(GgufArray::I16(vec![-2]))),
            ("a_u32", GgufValue::Array(GgufArray::U32(vec![3]))),
            ("a_i32", GgufValue::Array(GgufArray::I32(vec![-4, 5]))),
            ("a_u64", GgufValue::Array(GgufArray::U64(vec![6]))),
            ("a_i64", GgufValue::Array(GgufArray::I64(vec![-7]))),
            ("a_f32", GgufValue::Array(GgufArray::F32(vec![0.5]))),
            ("a_f64", GgufValue::Array(GgufArray::F64(vec![0.25]))),
            ("a_bool", GgufValue::Array(GgufArray::Bool(vec![true, false]))),
            ("a_str", GgufValue::Array(GgufArray::String(vec!["x".into(), String::new()]))),
            ("a_empty", GgufValue::Array(GgufArray::U32(vec![]))),
            (
                "a_nested",
                GgufValue::Array(GgufArray::Array(vec![
                    GgufArray::String(vec!["p q".into()]),
                    GgufArray::I32(vec![1, 2, 3]),
                ])),
            ),
        ];
        for version in [2, 3] {
            let mut w = GgufWriter::new();
            w.set_version(version);
            for (k, v) in &vals {
                w.add_meta(*k, v.clone());
            }
            let f = GgufFile::from_bytes("x.gguf", w.to_bytes()).unwrap();
            assert_eq!(f.version(), version);
            assert_eq!(f.metadata().len(), vals.len());
            for ((k, v), (k2, v2)) in vals.iter().zip(f.metadata()) {
                assert_eq!(k, k2);
                assert_eq!(v, v2, "{k}");
            }
            assert!(f.tensors().is_empty());
            assert_eq!(f.meta_u64("u32").unwrap(), Some(4_000_000_000));
            assert_eq!(f.meta_u64("nope").unwrap(), None);
            assert!(f
                .meta_u64("i8")
                .unwrap_err()
                .to_string()
                .contains("\"i8\": expected a non-negative integer, found i8"));
            assert_eq!(f.meta_f64("f32").unwrap(), Some(1e-5f32 as f64));
            assert_eq!(f.meta_str("str").unwrap(), Some("héllo"));
            assert_eq!(f.meta_bool("bool").unwrap(), Some(true));
            assert_eq!(f.meta_int_array("a_u16").unwrap(), Some(vec![1, 65535]));
            assert_eq!(f.meta_int_array("a_u64").unwrap(), Some(vec![6]));
            assert!(f.meta_int_array("a_str").is_err());
            assert!(f.meta_str_array("a_i32").unwrap_err().to_string().contains("found array of i32"));
            assert_eq!(f.meta_f32_array("a_f32").unwrap(), Some(&[0.5f32][..]));
        }
    }

    #[test]
    fn alignment_key() {
        let mut w = GgufWriter::new();
        w.add_meta(ALIGNMENT_KEY, GgufValue::U32(64));
        w.add_f32("t0", &[3], &[1.0, 2.0, 3.0]);
        w.add_f32("t1", &[2], &[4.0, 5.0]);
        let b = w.to_bytes();
        let f = GgufFile::from_bytes("x.gguf", b.clone()).unwrap();
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.data_offset() % 64, 0);
        assert_eq!(f.tensor_info("t1").unwrap().offset, 64);
        assert_eq!(f.read_f32("t1").unwrap(), vec![4.0, 5.0]);

        for bad in [GgufValue::U32(0), GgufValue::U32(48), GgufValue::U64(1 << 40), GgufValue::String("64".into())] {
            let mut w = GgufWriter::new();
            w.add_meta(ALIGNMENT_KEY, bad);
            let e = err(&w.to_bytes());
            assert!(e.contains("general.alignment"), "{e}");
        }
        // an offset that is a multiple of 32 but not of 64
        let mut b = b;
        let name_end = b.windows(2).rposition(|w| w == b"t1").unwrap() + 2;
        put_u64(&mut b, name_end + 4 + 8 + 4, 32);
        assert!(err(&b).contains("not a multiple of the alignment 64"));
    }

    #[test]
    fn header_errors() {
        assert!(err(&[]).contains("only 0 bytes"));
        assert!(err(b"GGU").contains("only 3 bytes"));
        assert!(err(b"GGUF").contains("truncated"));
        assert!(err(b"GGML\x03\0\0\0").contains("magic"));
        let b = small();
        let mut m = b.clone();
        put_u32(&mut m, 4, 1);
        assert!(err(&m).contains("version 1"));
        put_u32(&mut m, 4, 4);
        assert!(err(&m).contains("version 4"));
        // key string length 2^60 / a key that is not UTF-8
        let mut m = b.clone();
        put_u64(&mut m, 24, 1 << 60);
        assert!(err(&m).contains("metadata key #0: string length 1152921504606846976"));
        let mut m = b.clone();
        m[32] = 0xFF;
        assert!(err(&m).contains("not valid UTF-8"));
        // unknown value type; bool that is not 0/1
        let mut m = b.clone();
        put_u32(&mut m, 33, 99);
        assert!(err(&m).contains("metadata key \"a\": unknown value type 99"));
        let mut w = GgufWriter::new();
        w.add_meta("flag", GgufValue::Bool(true));
        let mut m = w.to_bytes();
        m[24 + 8 + 4 + 4] = 2; // header, key "flag", type, then the bool
        assert!(err(&m).contains("\"flag\": bool at offset"));
        // tensor info: rank, dims, type, offset
        let mut m = b.clone();
        put_u32(&mut m, 50, 0);
        assert!(err(&m).contains("tensor \"t\": 0 dimensions"));
        let mut m = b.clone();
        put_u32(&mut m, 62, 1000);
        assert!(err(&m).contains("tensor \"t\": unknown tensor type id 1000"));
        let mut m = b.clone();
        put_u32(&mut m, 62, 8);
        assert!(err(&m).contains("Q8_0 needs rows"));
        let mut m = b.clone();
        put_u64(&mut m, 54, u64::MAX / 2);
        assert!(err(&m).contains("overflow"));
        let mut m = b.clone();
        put_u64(&mut m, 54, 5);
        assert!(err(&m).contains("tensor \"t\": data at offset 96 + 0 (20 bytes of F32"));
        let mut m = b.clone();
        put_u64(&mut m, 66, u64::MAX - 31);
        assert!(err(&m).contains("past the end"));
        // absurd counts
        let mut m = b.clone();
        put_u64(&mut m, 8, u64::MAX);
        assert!(err(&m).contains("tensor count 18446744073709551615 is impossible"));
        let mut m = b.clone();
        put_u64(&mut m, 16, 1 << 40);
        assert!(err(&m).contains("impossible"));
        let mut w = GgufWriter::new();
        w.add_meta("arr", GgufValue::Array(GgufArray::U64(vec![1])));
        let mut m = w.to_bytes();
        let at = m.len() - 16; // count of the array
        put_u64(&mut m, at, u64::MAX / 4);
        assert!(err(&m).contains("\"arr\": array element count"));
    }

    #[test]
    fn duplicates_overlap_and_nesting() {
        let mut w = GgufWriter::new();
        w.add_meta("k", GgufValue::U8(1));
        let mut b = w.to_bytes();
        // duplicate the key/value pair (8 + 1 + 4 + 1 bytes) by hand
        b.truncate(24 + 14);
        let kv = b[24..].to_vec();
        b.extend_from_slice(&kv);
        put_u64(&mut b, 16, 2);
        assert!(err(&b).contains("\"k\" appears twice"));

        let mut w = GgufWriter::new();
        w.add_f32("a", &[8], &[0.0; 8]);
        w.add_f32("b", &[8], &[0.0; 8]);
        let mut b = w.to_bytes();
        let name_end = b.windows(1).rposition(|w| w == b"b").unwrap() + 1;
        put_u64(&mut b, name_end + 4 + 8 + 4, 0);
        assert!(err(&b).contains("tensors \"a\" and \"b\" overlap"));

        let mut deep = GgufArray::U8(vec![1]);
        for _ in 0..MAX_ARRAY_DEPTH {
            deep = GgufArray::Array(vec![deep]);
        }
        let mut w = GgufWriter::new();
        w.add_meta("deep", GgufValue::Array(deep));
        assert!(err(&w.to_bytes()).contains("nested more than"));
    }

    #[test]
    fn dense_decoding() {
        let vals: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) * 0.1).collect();
        let mut w = GgufWriter::new();
        w.add_q8_0("q", &[32, 2], &vals);
        let f16: Vec<u16> = vals.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
        let bf16: Vec<u16> = vals.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        w.add_u16_bits("h", &[64], GgufDType::F16, &f16);
        w.add_u16_bits("b", &[64], GgufDType::BF16, &bf16);
        let f = GgufFile::from_bytes("x.gguf", w.to_bytes()).unwrap();
        let q = f.read_f32("q").unwrap();
        // Q8_0: |err| <= d/2 per block, d = max|x| / 127
        for (blk, (a, b)) in vals.chunks(32).zip(q.chunks(32)).enumerate() {
            let d = blk_max(a) / 127.0;
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= d * 0.5 + 1e-3, "block {blk}: {x} vs {y}");
            }
        }
        let h = f.read_f32("h").unwrap();
        assert!(h.iter().zip(&f16).all(|(x, &b)| *x == half::f16::from_bits(b).to_f32()));
        let bb = f.read_f32("b").unwrap();
        assert!(bb.iter().zip(&bf16).all(|(x, &b)| *x == half::bf16::from_bits(b).to_f32()));
        assert_eq!(f.read_u16_bits("h").unwrap(), (GgufDType::F16, f16));
        assert!(f.read_u16_bits("q").is_err());
        assert_eq!(f.tensor_info("q").unwrap().rows_cols(), (2, 32));
    }

    fn blk_max(v: &[f32]) -> f32 {
        v.iter().fold(0f32, |m, x| m.max(x.abs()))
    }

    #[test]
    fn open_reports_io_and_empty_files() {
        let e = GgufFile::open("/nonexistent/x.gguf").unwrap_err();
        assert!(matches!(e, Error::Io { .. }));
        let dir = std::env::temp_dir().join(format!("bitnet-gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("empty.gguf");
        std::fs::write(&p, b"").unwrap();
        assert!(GgufFile::open(&p).unwrap_err().to_string().contains("only 0 bytes"));
        let p2 = dir.join("small.gguf");
        std::fs::write(&p2, small()).unwrap();
        let f = GgufFile::open(&p2).unwrap();
        assert_eq!(f.read_f32("t").unwrap().len(), 4);
        drop(f);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
