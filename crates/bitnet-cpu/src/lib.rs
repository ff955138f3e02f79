//! bitnet-cpu: the CPU compute layer of bitnet-rs.
//!
//! - [`kernels`]: int8 x ternary matmuls. A scalar `generic` reference (also the test oracle) beside
//!   per-ISA files, one picked once at start-up by runtime feature detection.
//! - [`dense`]: float GEMV/GEMM for the (never quantized) LM head; [`packed_bf16`]: its lossless
//!   12-bit storage.
//! - [`attn`]: attention primitives (scores, softmax, V sums over blocks of keys), bit-identical
//!   across levels.
//! - [`pool`]: a persistent thread pool; each thread owns a contiguous range of weight rows.
//!
//! Nothing here knows about the model; `bitnet-core` drives these primitives.

pub mod attn;
pub mod dense;
pub mod kernels;
pub mod mem;
pub mod packed_bf16;
pub mod pool;

pub use kernels::{KernelLevel, QuantActs, TernaryMatrix, Workload};
pub use pool::ThreadPool;

/// Splits `0..n` into `parts` contiguous chunks whose starts are multiples of `align`
/// (except that the last chunk ends at `n`); returns chunk `i`.
pub fn split_range(n: usize, parts: usize, i: usize, align: usize) -> std::ops::Range<usize> {
    let align = align.max(1);
    let units = n.div_ceil(align);
    let per = units / parts;
    let extra = units % parts;
    let start_u = i * per + i.min(extra);
    let end_u = start_u + per + usize::from(i < extra);
    (start_u * align).min(n)..(end_u * align).min(n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn split_covers() {
        for n in [0usize, 1, 7, 64, 100, 2560, 6913] {
            for parts in 1..5 {
                for align in [1usize, 4, 16] {
                    let mut next = 0;
                    for i in 0..parts {
                        let r = super::split_range(n, parts, i, align);
                        assert_eq!(r.start, next);
                        next = r.end;
                    }
                    assert_eq!(next, n);
                }
            }
        }
    }
}
