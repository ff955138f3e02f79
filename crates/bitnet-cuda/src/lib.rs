//! bitnet-cuda: the CUDA backend of bitnet-rs.
//!
//! Behind the cargo feature `cuda` (CUDA 13.0 driver bindings; `cuda-12` for 12.8): cudarc with
//! dynamic loading, so the crate builds on machines with no CUDA toolkit and no GPU, and
//! finds libcuda and NVRTC at run time. Without the feature the same API exists and every
//! constructor fails with [`Error::Unavailable`], so callers need no `cfg`.
//!
//! - [`pack`]: the 2-bit device layout (16 x 128 tiles, one 16-byte load per lane, the A
//!   fragment of `mma.m16n8k32` after a shift and a mask), built from the canonical form.
//! - `kernels.cu`: CUDA C compiled at run time by NVRTC to a cubin for the device (`sm_90`
//!   on H100/H200), cached on disk: RMSNorm fused with int8 quantization (exactly the CPU's
//!   rounding), int8 x ternary GEMV/GEMM on the tensor cores (integer exact), RoPE + in-place
//!   paged KV writes, flash-decode attention with GQA (split over the sequence) and a causal
//!   prefill attention, relu^2*up fused into the following norm, the LM head in the stored
//!   dtype, and greedy / top-k / top-p sampling on the device.
//! - [`CudaModel`]: load from any `WeightSource`, `prefill`, `decode_batch` (a CUDA graph per
//!   batch-size bucket, replayed with inputs updated in place; copies on a second stream).
//! - [`bench`]: the table `tools/gpu-check.sh` prints.

pub mod api;
pub mod batch;
pub mod bench;
pub mod error;
pub mod pack;

#[cfg(feature = "_cuda")]
mod driver;
#[cfg(feature = "_cuda")]
pub mod gpu;
#[cfg(feature = "_cuda")]
mod model;
#[cfg(feature = "_cuda")]
pub mod nvrtc;
#[cfg(feature = "_cuda")]
#[doc(hidden)]
pub mod testing;

#[cfg(not(feature = "_cuda"))]
mod stub;

pub use api::{bucket_of, CudaOptions, CudaSeq, KernelTime, BUCKETS, MAX_BATCH};
pub use error::{Error, Result};
#[cfg(feature = "_cuda")]
pub use model::CudaModel;
#[cfg(not(feature = "_cuda"))]
pub use stub::CudaModel;

/// Whether this build has the CUDA backend compiled in (the `cuda` or `cuda-12` feature).
pub const COMPILED: bool = cfg!(feature = "_cuda");

/// Checks that the CUDA backend can run here: built with the feature, libcuda loadable, the
/// driver initializes and reports at least one device. Never aborts (cudarc would, were the
/// library missing: we probe it first). NVRTC is checked later, when kernels are compiled.
pub fn cuda_available() -> std::result::Result<(), String> {
    #[cfg(feature = "_cuda")]
    {
        driver::probe()
    }
    #[cfg(not(feature = "_cuda"))]
    {
        Err("bitnet-cuda was built without the `cuda` feature".into())
    }
}

/// Whether NVRTC can be loaded (searched as described in `nvrtc`); no device needed.
pub fn nvrtc_available() -> std::result::Result<(), String> {
    #[cfg(feature = "_cuda")]
    {
        nvrtc::ensure_loaded()
    }
    #[cfg(not(feature = "_cuda"))]
    {
        Err("bitnet-cuda was built without the `cuda` feature".into())
    }
}

#[cfg(test)]
mod tests {
    /// The server moves a model to its worker thread.
    #[test]
    fn model_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<crate::CudaModel>();
        assert_send::<crate::CudaSeq>();
    }

    #[test]
    fn unavailable_without_a_device_or_feature() {
        if let Err(why) = crate::cuda_available() {
            println!("skipped: no CUDA device ({why})");
            let cfg = bitnet_core::weights::random::preset_config("tiny").unwrap().resolve().unwrap();
            let src = bitnet_core::weights::random::RandomSource::new(cfg.clone(), 0);
            let r = crate::CudaModel::load(&src, cfg, &crate::CudaOptions::default());
            assert!(matches!(r, Err(crate::Error::Unavailable(_))));
        }
    }
}
