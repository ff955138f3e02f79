//! bitnet-core: exact BitNet b1.58 inference.
//!
//! config (HF names verbatim) -> weights (any format, one canonical form) -> model (one file per
//! component) over a preallocated KV cache -> sampler -> generation. Kernels live in `bitnet-cpu`.

pub mod batch;
pub mod block_pool;
pub mod chat;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod generation_config;
pub mod gguf;
pub mod hub;
pub mod json_mode;
pub mod json_schema;
pub mod kv_cache;
pub mod logprobs;
pub mod model;
pub mod perplexity;
pub mod precision;
pub mod prefix_cache;
pub mod sampler;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
