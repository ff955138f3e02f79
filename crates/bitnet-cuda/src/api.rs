//! The types of the public API that do not depend on the `cuda` feature: options and sequence
//! handles. [`crate::CudaModel`] has the same methods with and without the feature (without it,
//! loading fails with [`crate::Error::Unavailable`]), so callers need no `cfg` of their own.

use bitnet_core::block_pool::SeqCache;
use bitnet_core::precision::PrecisionPlan;

/// How a [`crate::CudaModel`] is built and how much it preallocates. Everything the decode step
/// touches is allocated at load: a step allocates nothing, on the device or in graphs.
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Sequences alive at once (decode batch capacity), at most 64.
    pub max_seqs: usize,
    /// Positions per sequence (clamped to max_position_embeddings).
    pub max_ctx: usize,
    /// Positions per KV-cache block.
    pub block_size: usize,
    /// KV-cache blocks shared by all sequences; None: every sequence can reach `max_ctx`.
    pub kv_blocks: Option<usize>,
    /// Largest number of tokens in one prefill step (longer prompts run in chunks).
    pub prefill_chunk: usize,
    /// Largest number of logit rows one call can return (all-position prefill logits).
    pub max_logit_rows: usize,
    /// The precision plan: `kv_cache` f32 or f16; the LM head in its stored dtype (`exact`).
    pub plan: PrecisionPlan,
    /// Capture each decode batch size once as a CUDA graph and replay it.
    pub graphs: bool,
    /// Programmatic dependent launch between consecutive kernels (sm_90 and later; ignored
    /// before): each kernel's launch overlaps the end of the previous one.
    pub pdl: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            max_seqs: 8,
            max_ctx: 4096,
            block_size: 16,
            kv_blocks: None,
            prefill_chunk: 512,
            max_logit_rows: 64,
            plan: PrecisionPlan::EXACT,
            graphs: true,
            pdl: true,
        }
    }
}

/// One kernel launch timed by [`crate::CudaModel::profile_take`].
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    pub name: String,
    pub grid: (u32, u32, u32),
    /// device time between the events around the launch
    pub ms: f64,
}

/// Largest decode batch (the biggest graph bucket).
pub const MAX_BATCH: usize = 64;

/// Decode batch sizes captured as graphs; a batch runs in the smallest bucket that holds it.
pub const BUCKETS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// The bucket of a batch of `n` sequences.
pub fn bucket_of(n: usize) -> Option<usize> {
    BUCKETS.iter().copied().find(|&b| b >= n)
}

/// One sequence of a [`crate::CudaModel`]: a slot of the device block table, its KV blocks and
/// its length (bitnet-core's block bookkeeping, mirrored into the slot's row of the device
/// table), plus the random generator of device sampling. Made by
/// [`crate::CudaModel::new_seq`], given back with [`crate::CudaModel::release`].
#[derive(Debug)]
pub struct CudaSeq {
    pub(crate) slot: u32,
    pub(crate) cache: SeqCache,
    pub(crate) rng: u64,
    #[cfg_attr(not(feature = "_cuda"), allow(dead_code))]
    pub(crate) owner: u64,
}

impl CudaSeq {
    /// Positions filled.
    pub fn len(&self) -> usize {
        self.cache.len()
    }
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
    /// The block-table row this sequence owns.
    pub fn slot(&self) -> usize {
        self.slot as usize
    }
    /// KV blocks held.
    pub fn n_blocks(&self) -> usize {
        self.cache.n_blocks()
    }
    /// Restarts the random numbers of device sampling (the `u` of each draw) from `seed`.
    pub fn set_seed(&mut self, seed: u64) {
        self.rng = seed;
    }
    /// Moves the device draws `n` draws ahead, as if `n` tokens had been sampled since
    /// [`CudaSeq::set_seed`] (a sequence resumed after preemption continues its stream).
    pub fn skip_draws(&mut self, n: u64) {
        self.rng = self.rng.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
    /// Uniform in [0, 1) with 24 random bits (splitmix64).
    #[cfg_attr(not(feature = "_cuda"), allow(dead_code))]
    pub(crate) fn next_uniform(&mut self) -> f32 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}

/// What the host hands the device sampler for one row: checks that `p` can be done there
/// (temperature, top-k, top-p; not min-p nor the repetition penalty, which need the logits).
pub fn check_device_sampling(p: &bitnet_core::sampler::SamplingParams) -> crate::Result<()> {
    p.validate()?;
    if p.min_p != 0.0 || p.uses_history() {
        return Err(crate::Error::Unsupported(
            "min_p and the repetition, frequency and presence penalties are not sampled on the \
             device: use the logits (decode_batch_logits / prefill) with the CPU sampler"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_core::block_pool::BlockPool;

    #[test]
    fn buckets() {
        assert_eq!(bucket_of(1), Some(1));
        assert_eq!(bucket_of(3), Some(4));
        assert_eq!(bucket_of(33), Some(64));
        assert_eq!(bucket_of(65), None);
    }

    #[test]
    fn uniform_in_range() {
        let mut s = CudaSeq { slot: 0, cache: BlockPool::new(1, 16, 16).new_seq(), rng: 7, owner: 0 };
        let mut sum = 0.0f64;
        for _ in 0..10000 {
            let u = s.next_uniform();
            assert!((0.0..1.0).contains(&u));
            sum += u as f64;
        }
        assert!((sum / 10000.0 - 0.5).abs() < 0.02);
    }
}
