//! GGUF support: a memory-mapped, fully bounds-checked reader of GGUF v2/v3 files
//! ([`GgufFile`]), bitnet.cpp's I2_S ternary tensors ([`i2s`]), a BitNet [`GgufSource`] that
//! converts a file to the canonical in-memory form of [`crate::weights`], and a small
//! [`GgufWriter`] for tests.
//!
//! ```no_run
//! use bitnet_core::gguf::GgufSource;
//! use bitnet_core::weights::{Proj, WeightSource};
//! let src = GgufSource::open("ggml-model-i2_s.gguf")?;
//! let cfg = src.hf_config()?.resolve()?;
//! let q = src.ternary(0, Proj::Q)?;
//! assert_eq!((q.rows, q.cols), cfg.proj_shape(Proj::Q));
//! # Ok::<(), bitnet_core::Error>(())
//! ```

// `u64::is_multiple_of` needs Rust 1.87; the workspace's rust-version is 1.85.
#![allow(clippy::manual_is_multiple_of)]

pub mod i2s;
mod reader;
mod source;
mod writer;

pub use reader::{
    dequantize_q8_0, GgufArray, GgufDType, GgufFile, GgufHeader, GgufTensorInfo, GgufValue, GgufValueType,
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS,
};
pub use source::{
    keys, norm_tensor_name, ternary_tensor_name, GgufSource, OUTPUT, OUTPUT_NORM, SUPPORTED_ARCHITECTURES, TOKEN_EMBD,
};
pub use writer::GgufWriter;
