//! [`CudaModel`] of a build without the `cuda` feature: the same methods, and `load` fails with
//! [`Error::Unavailable`], so no value of this type ever exists.

use bitnet_core::config::ModelConfig;
use bitnet_core::sampler::SamplingParams;
use bitnet_core::weights::WeightSource;

use crate::api::{CudaOptions, CudaSeq, KernelTime};
use crate::error::{Error, Result};

enum Never {}

/// The CUDA model (unavailable in this build).
pub struct CudaModel {
    pub cfg: ModelConfig,
    never: Never,
}

impl CudaModel {
    pub fn load(_src: &dyn WeightSource, _cfg: ModelConfig, _opts: &CudaOptions) -> Result<CudaModel> {
        Err(Error::Unavailable("bitnet-cuda was built without the `cuda` feature".into()))
    }
    pub fn device_name(&self) -> String {
        match self.never {}
    }
    pub fn kernel_note(&self) -> String {
        match self.never {}
    }
    pub fn format(&self) -> &str {
        match self.never {}
    }
    pub fn options(&self) -> &CudaOptions {
        match self.never {}
    }
    pub fn bytes_per_token(&self) -> usize {
        match self.never {}
    }
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        match self.never {}
    }
    pub fn set_use_graphs(&mut self, _on: bool) {
        match self.never {}
    }
    pub fn uses_graphs(&self) -> bool {
        match self.never {}
    }
    pub fn uses_pdl(&self) -> bool {
        match self.never {}
    }
    pub fn profile_start(&mut self) {
        match self.never {}
    }
    pub fn profile_take(&mut self) -> Result<Vec<KernelTime>> {
        match self.never {}
    }
    pub fn captured_buckets(&self) -> Vec<usize> {
        match self.never {}
    }
    pub fn max_batch(&self) -> usize {
        match self.never {}
    }
    pub fn max_all_logits_tokens(&self) -> usize {
        match self.never {}
    }
    pub fn enable_prefix_cache(&mut self) {
        match self.never {}
    }
    pub fn cached_blocks(&self) -> usize {
        match self.never {}
    }
    pub fn attach_prefix(&mut self, _seq: &mut CudaSeq, _tokens: &[u32]) -> usize {
        match self.never {}
    }
    pub fn publish_prefix(&mut self, _seq: &mut CudaSeq, _tokens: &[u32]) {
        match self.never {}
    }
    pub fn truncate(&mut self, _seq: &mut CudaSeq, _len: usize) -> Result<usize> {
        match self.never {}
    }
    pub fn new_seq(&mut self) -> Result<CudaSeq> {
        match self.never {}
    }
    pub fn release(&mut self, _seq: CudaSeq) {
        match self.never {}
    }
    pub fn reset_seq(&mut self, _seq: &mut CudaSeq) {
        match self.never {}
    }
    pub fn reserve(&mut self, _seq: &mut CudaSeq, _new_len: usize) -> Result<()> {
        match self.never {}
    }
    pub fn total_blocks(&self) -> usize {
        match self.never {}
    }
    pub fn free_blocks(&self) -> usize {
        match self.never {}
    }
    pub fn prefill(&mut self, _seq: &mut CudaSeq, _tokens: &[u32]) -> Result<Vec<f32>> {
        match self.never {}
    }
    pub fn prefill_all_logits(&mut self, _seq: &mut CudaSeq, _tokens: &[u32]) -> Result<Vec<f32>> {
        match self.never {}
    }
    pub fn prefill_only(&mut self, _seq: &mut CudaSeq, _tokens: &[u32]) -> Result<()> {
        match self.never {}
    }
    pub fn prefill_sample(&mut self, _seq: &mut CudaSeq, _tokens: &[u32], _params: &SamplingParams) -> Result<u32> {
        match self.never {}
    }
    pub fn decode_batch(
        &mut self,
        _seqs: &mut [&mut CudaSeq],
        _tokens: &[u32],
        _params: &[SamplingParams],
    ) -> Result<Vec<u32>> {
        match self.never {}
    }
    pub fn decode_batch_logits(&mut self, _seqs: &mut [&mut CudaSeq], _tokens: &[u32]) -> Result<Vec<f32>> {
        match self.never {}
    }
    pub fn decode(&mut self, _seq: &mut CudaSeq, _token: u32, _params: &SamplingParams) -> Result<u32> {
        match self.never {}
    }
    pub fn capture_all(&mut self) -> Result<()> {
        match self.never {}
    }
    pub fn copy_bandwidth_probe(&self, _bytes: usize, _reps: usize) -> Result<f64> {
        match self.never {}
    }
}
