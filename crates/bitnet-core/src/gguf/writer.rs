//! A minimal GGUF (v3, or v2 on request) writer: enough to build test files (untied heads, Q8_0 or
//! F32 tensors, odd metadata) and small fixtures. Everything is built in memory.

use super::i2s;
use super::reader::{GgufArray, GgufDType, GgufValue, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ALIGNMENT};

/// Builds a GGUF file in memory. Tensors are laid out in insertion order, each at the next
/// multiple of the alignment (`general.alignment` when set as metadata to a power of two up
/// to 1 MiB, else 32; an invalid value is still written as metadata, for tests).
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, GgufDType, Vec<u8>)>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty version-3 file.
    pub fn new() -> Self {
        GgufWriter { version: 3, metadata: Vec::new(), tensors: Vec::new() }
    }

    /// Sets the version number written in the header (the layout is the v2/v3 one).
    pub fn set_version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Adds (or replaces) a metadata key.
    pub fn add_meta(&mut self, key: impl Into<String>, value: GgufValue) -> &mut Self {
        let key = key.into();
        self.metadata.retain(|(k, _)| *k != key);
        self.metadata.push((key, value));
        self
    }

    /// Adds a tensor with raw data bytes; `dims` in ggml `ne` order (`dims[0]` = columns).
    pub fn add_tensor(&mut self, name: impl Into<String>, dims: &[u64], dtype: GgufDType, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), dims.to_vec(), dtype, data));
        self
    }

    /// Adds an F32 tensor.
    pub fn add_f32(&mut self, name: impl Into<String>, dims: &[u64], values: &[f32]) -> &mut Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, dims, GgufDType::F32, data)
    }

    /// Adds an F16 or BF16 tensor from raw 16-bit element bits.
    pub fn add_u16_bits(&mut self, name: impl Into<String>, dims: &[u64], dtype: GgufDType, bits: &[u16]) -> &mut Self {
        let data = bits.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, dims, dtype, data)
    }

    /// Adds a Q8_0 tensor quantized from f32 as ggml's `quantize_row_q8_0_ref` does
    /// (`d = max|x| / 127` stored as f16, `q = round(x / d)`). `values.len()` must be a multiple
    /// of 32 (panics otherwise: this is a test helper).
    pub fn add_q8_0(&mut self, name: impl Into<String>, dims: &[u64], values: &[f32]) -> &mut Self {
        assert!(values.len() % 32 == 0, "Q8_0 needs a multiple of 32 values");
        let mut data = Vec::with_capacity(values.len() / 32 * 34);
        for blk in values.chunks_exact(32) {
            let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            data.extend_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
            data.extend(blk.iter().map(|&x| ((x * id).round() as i32).clamp(-128, 127) as i8 as u8));
        }
        self.add_tensor(name, dims, GgufDType::Q8_0, data)
    }

    /// Adds an I2_S tensor from row-major ternary codes and a scale (x86 layout, zero padding).
    pub fn add_i2s(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        codes: &[i8],
        scale: f32,
    ) -> Result<&mut Self, String> {
        let data = i2s::encode(codes, scale)?;
        Ok(self.add_tensor(name, dims, GgufDType::I2S, data))
    }

    fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find(|(k, _)| k == ALIGNMENT_KEY)
            .and_then(|(_, v)| v.as_u64())
            .filter(|a| a.is_power_of_two() && *a <= MAX_ALIGNMENT)
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment() as usize;
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_str(&mut out, k);
            out.extend_from_slice(&v.value_type().id().to_le_bytes());
            write_value(&mut out, v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for (name, dims, dtype, data) in &self.tensors {
            write_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&dtype.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len()).next_multiple_of(align);
        }
        out.resize(out.len().next_multiple_of(align), 0);
        let base = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(base + off, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => write_str(out, s),
        GgufValue::Array(a) => write_array(out, a),
    }
}

fn write_array(out: &mut Vec<u8>, a: &GgufArray) {
    out.extend_from_slice(&a.elem_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! le {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        GgufArray::U8(v) => out.extend_from_slice(v),
        GgufArray::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        GgufArray::U16(v) => le!(v),
        GgufArray::I16(v) => le!(v),
        GgufArray::U32(v) => le!(v),
        GgufArray::I32(v) => le!(v),
        GgufArray::U64(v) => le!(v),
        GgufArray::I64(v) => le!(v),
        GgufArray::F32(v) => le!(v),
        GgufArray::F64(v) => le!(v),
        GgufArray::Bool(v) => out.extend(v.iter().map(|&x| x as u8)),
        GgufArray::String(v) => v.iter().for_each(|s| write_str(out, s)),
        GgufArray::Array(v) => v.iter().for_each(|x| write_array(out, x)),
    }
}
