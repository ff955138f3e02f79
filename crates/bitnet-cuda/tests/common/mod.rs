//! Shared helpers of the CUDA tests: the skip rule, fixture paths (also when the test binary
//! runs on another machine), golden files, the CPU reference model, random data.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One GPU test at a time in a process (they share the device and its memory).
pub static GPU_LOCK: Mutex<()> = Mutex::new(());

/// Takes the GPU lock, or returns None after printing the skip line when no device is usable.
pub fn gpu_or_skip() -> Option<std::sync::MutexGuard<'static, ()>> {
    if let Err(why) = bitnet_cuda::cuda_available() {
        println!("skipped: no CUDA device ({why})");
        return None;
    }
    if let Err(why) = bitnet_cuda::nvrtc_available() {
        // tools/gpu-check.sh fails loudly before this; here the test cannot run at all
        println!("skipped: CUDA device present but NVRTC missing ({why})");
        return None;
    }
    Some(GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The repo's fixtures: `$BITNET_FIXTURES`, else the source tree this binary was built from,
/// else `./fixtures` (tools/gpu-check.sh runs the binaries from the repository root).
pub fn fixture(name: &str) -> PathBuf {
    if let Some(d) = std::env::var_os("BITNET_FIXTURES") {
        return PathBuf::from(d).join(name);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name);
    if built.exists() {
        return built;
    }
    PathBuf::from("fixtures").join(name)
}

#[path = "../../../bitnet-core/tests/common/compare.rs"]
mod compare;
#[path = "../../../bitnet-core/tests/common/golden.rs"]
mod golden;
#[allow(unused_imports)] // only the GPU tests (feature `cuda`) compare logits
pub use compare::*;
#[allow(unused_imports)] // not every test binary reads golden files
pub use golden::Golden;

/// A small deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u32() as f64 / (1u64 << 31) as f64 - 1.0) as f32
    }
    /// Roughly normal (sum of uniforms).
    pub fn normal(&mut self) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum();
        s * 0.866
    }
    pub fn code(&mut self) -> i8 {
        (self.next_u32() % 3) as i8 - 1
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u32() as usize) % n.max(1)
    }
}
