//! Precision as data: a small plan saying, per op group, which number format is used. Named
//! presets; every benchmark and accuracy figure prints the plan it ran with (`Display`).
//!
//! The ternary matmuls are exact in every preset (int8 activations x ternary weights, i32 sums);
//! what a plan trades is the LM head and the KV cache. A quantized head's largest logits are
//! recomputed from the stored weights (`lm_head_rescore`): the head still reads its few bytes per
//! token, and the logits that sampling and greedy decoding pick from are the exact ones.

use std::fmt;

use crate::error::{Error, Result};

/// Logits per row that the quantized presets recompute exactly: enough that the exact top-1 was
/// always among them in the measurements (the 4-bit head ranked it at most 7th on the fixtures,
/// 3rd on 2B-4T's shapes: `tests/precision.rs`), and above the 20 `top_logprobs` the OpenAI API
/// can ask for.
pub const RESCORE_TOP: usize = 64;

/// The same for the 2-bit head, whose ranking is coarser (it ranked the exact top-1 at most 17th
/// on 2B-4T's shapes and 72nd on a 515-entry fixture in the same measurements).
pub const RESCORE_TOP_INT2: usize = 256;

/// How the LM head (`[vocab][hidden]`, the largest single read of a decode step) is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmHeadPrecision {
    /// Stored dtype (bf16 for 2B-4T) widened exactly, f32 activations, f32 accumulation.
    Stored,
    /// int8 weights with one f32 scale per vocabulary row, f32 activations: half the bytes.
    Int8,
    /// int8 weights with per-row scales x the final hidden state quantized to int8 per token (as
    /// every BitLinear does): the int8 dot units instead of f32 FMAs, so a batch's head costs a
    /// third (prefill logits, batched decode); same bytes as `Int8`.
    Int8Int8,
    /// 4-bit weights with an f16 scale per 32 (llama.cpp's Q4_0 rule) x int8 activations per
    /// token: 4.5 bits per weight, a little over half of `Int8`'s bytes (bitnet-cpu's `int4.rs`).
    Int4Int8,
    /// 2-bit weights (four levels, no zero) with an f16 scale per 32 x int8 activations: 2.5
    /// bits per weight, too coarse for logits by itself: it ranks the vocabulary for the exact
    /// recomputation of the top logits (bitnet-cpu's `int2.rs`).
    Int2Int8,
}

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvPrecision {
    F32,
    F16,
    /// int8 codes, one f32 scale per 32 values of a position's kv head (`bitnet_cpu::attn::KV_QBLOCK`):
    /// 9 bits a value, ~56% of f16's bytes. CPU only.
    Int8,
}

impl KvPrecision {
    pub const ALL: [KvPrecision; 3] = [KvPrecision::F32, KvPrecision::F16, KvPrecision::Int8];

    /// `f32`, `f16` or `int8`.
    pub fn name(self) -> &'static str {
        match self {
            KvPrecision::F32 => "f32",
            KvPrecision::F16 => "f16",
            KvPrecision::Int8 => "int8",
        }
    }

    /// Looks a KV element type up by [`KvPrecision::name`].
    pub fn from_name(name: &str) -> Result<KvPrecision> {
        KvPrecision::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| Error::input(format!("unknown KV cache type {name:?} (known: f32, f16, int8)")))
    }

    /// Bytes one position's K or V row of `head_dim` values takes.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        match self {
            KvPrecision::F32 => 4 * head_dim,
            KvPrecision::F16 => 2 * head_dim,
            KvPrecision::Int8 => <i8 as bitnet_cpu::attn::KvElem>::row_len(head_dim),
        }
    }
}

/// One precision plan. Phases (prefill/decode) share it today; the plan is the one place to split them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrecisionPlan {
    pub name: &'static str,
    pub lm_head: LmHeadPrecision,
    /// With a quantized head: per logit row, the `k` largest logits (ranked by the quantized
    /// head; ties to the lower id) are recomputed from the head in its stored dtype, exactly as
    /// the `exact` plan computes them (same kernel, same summation order). Costs `k` stored rows
    /// per row (64 x 5 KB for 2B-4T: 0.05% of a decode step's bytes) and a pass over the logits.
    /// 0: off. Ignored for the stored head.
    pub lm_head_rescore: usize,
    pub kv_cache: KvPrecision,
}

impl PrecisionPlan {
    /// Matches transformers float32: exact ternary matmuls, f32 attention and KV cache, LM head in
    /// its stored dtype with f32 accumulation. The default.
    pub const EXACT: PrecisionPlan = PrecisionPlan {
        name: "exact",
        lm_head: LmHeadPrecision::Stored,
        lm_head_rescore: 0,
        kv_cache: KvPrecision::F32,
    };
    /// Fewer bytes per token: int8 LM head with per-row scales (its top logits recomputed
    /// exactly), f16 KV cache.
    pub const FAST: PrecisionPlan = PrecisionPlan {
        name: "fast",
        lm_head: LmHeadPrecision::Int8,
        lm_head_rescore: RESCORE_TOP,
        kv_cache: KvPrecision::F16,
    };

    /// `fast` with the LM head on the int8 dot units too (final hidden state quantized per token,
    /// as BitLinear inputs are): same bytes as `fast`, a third of its head compute, which is what
    /// batched decode and prefill logits pay; a little less top-1 agreement (README).
    pub const INT8: PrecisionPlan = PrecisionPlan {
        name: "int8",
        lm_head: LmHeadPrecision::Int8Int8,
        lm_head_rescore: RESCORE_TOP,
        kv_cache: KvPrecision::F16,
    };

    /// The fewest bytes per decoded token: the LM head at 4.5 bits per weight on the int8 dot
    /// units, f16 KV cache; the largest accuracy cost of the presets (README).
    pub const INT4: PrecisionPlan = PrecisionPlan {
        name: "int4",
        lm_head: LmHeadPrecision::Int4Int8,
        lm_head_rescore: RESCORE_TOP,
        kv_cache: KvPrecision::F16,
    };

    /// The fewest bytes per decoded token: a 2-bit head that only ranks the vocabulary, its top
    /// [`RESCORE_TOP_INT2`] logits recomputed exactly; f16 KV cache. The other logits (what
    /// sampling's tail sees) carry the largest error of the presets (README).
    pub const INT2: PrecisionPlan = PrecisionPlan {
        name: "int2",
        lm_head: LmHeadPrecision::Int2Int8,
        lm_head_rescore: RESCORE_TOP_INT2,
        kv_cache: KvPrecision::F16,
    };

    pub const PRESETS: [PrecisionPlan; 5] =
        [PrecisionPlan::EXACT, PrecisionPlan::FAST, PrecisionPlan::INT8, PrecisionPlan::INT4, PrecisionPlan::INT2];

    /// This plan with the KV cache in `kv`; the name says so where that differs from the preset
    /// (`int2+kv-int8`), since benchmarks and accuracy figures report plans by name. (The name
    /// is `'static`: a plan is made once per process, and the few bytes are kept for good.)
    pub fn with_kv_cache(self, kv: KvPrecision) -> PrecisionPlan {
        if kv == self.kv_cache {
            return self;
        }
        let name: &'static str = Box::leak(format!("{}+kv-{}", self.name, kv.name()).into_boxed_str());
        PrecisionPlan { name, kv_cache: kv, ..self }
    }

    /// Looks a preset up by name.
    pub fn from_name(name: &str) -> Result<PrecisionPlan> {
        PrecisionPlan::PRESETS.iter().copied().find(|p| p.name == name).ok_or_else(|| {
            Error::input(format!("unknown precision plan {name:?} (known: exact, fast, int8, int4, int2)"))
        })
    }
}

impl Default for PrecisionPlan {
    fn default() -> Self {
        PrecisionPlan::EXACT
    }
}

impl fmt::Display for PrecisionPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head = match self.lm_head {
            LmHeadPrecision::Stored => "stored dtype/f32 acc",
            LmHeadPrecision::Int8 => "int8 per-row",
            LmHeadPrecision::Int8Int8 => "int8 per-row x int8 acts",
            LmHeadPrecision::Int4Int8 => "4-bit, f16 scale per 32 x int8 acts",
            LmHeadPrecision::Int2Int8 => "2-bit, f16 scale per 32 x int8 acts",
        };
        let rescore = match self.lm_head {
            LmHeadPrecision::Stored => String::new(),
            _ if self.lm_head_rescore == 0 => String::new(),
            _ => format!(", top {} recomputed in stored dtype", self.lm_head_rescore),
        };
        let kv = match self.kv_cache {
            KvPrecision::Int8 => "int8, f32 scale per 32",
            k => k.name(),
        };
        write!(
            f,
            "{} (ternary: int8 x ternary exact, packing per kernel; lm_head: {head}{rescore}; kv: {kv}; attention: f32)",
            self.name
        )
    }
}
