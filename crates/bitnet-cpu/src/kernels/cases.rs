//! The table of op cases shared by the kernel tests (`tests/kernels.rs`) and the kernel benchmark
//! (`benches/kernels.rs`), plus the random inputs both use.
//!
//! `test_toks` are the token counts the tests check bit for bit against the reference;
//! `bench_toks` the ones the benchmark times (empty: not benchmarked).

use super::generic::{epilogue, reference_matmul_i32};
use super::QuantActs;

/// One matmul shape: `rows x cols` ternary weights.
#[derive(Debug, Clone, Copy)]
pub struct OpCase {
    pub name: &'static str,
    pub rows: usize,
    pub cols: usize,
    pub test_toks: &'static [usize],
    pub bench_toks: &'static [usize],
}

/// The 2B-4T shapes (fused QKV, O, fused gate+up, down) and odd sizes.
pub const CASES: &[OpCase] = &[
    OpCase { name: "qkv", rows: 3840, cols: 2560, test_toks: &[1, 2, 3, 16], bench_toks: &[1, 128] },
    OpCase { name: "o", rows: 2560, cols: 2560, test_toks: &[1, 2, 3, 33], bench_toks: &[1, 128] },
    OpCase { name: "gate_up", rows: 13824, cols: 2560, test_toks: &[1, 2, 3, 8], bench_toks: &[1, 4, 5, 12, 32, 128] },
    OpCase { name: "down", rows: 2560, cols: 6912, test_toks: &[1, 2, 3, 40], bench_toks: &[1, 128] },
    OpCase { name: "1x1", rows: 1, cols: 1, test_toks: &[1, 2, 3, 5, 12, 17, 64], bench_toks: &[] },
    OpCase { name: "3x7", rows: 3, cols: 7, test_toks: &[1, 2, 3, 5, 12, 17, 64], bench_toks: &[] },
    OpCase { name: "5x129", rows: 5, cols: 129, test_toks: &[1, 2, 3, 5, 12, 17, 64], bench_toks: &[] },
    OpCase { name: "33x300", rows: 33, cols: 300, test_toks: &[1, 2, 3, 5, 12, 17, 64], bench_toks: &[] },
    OpCase { name: "64x2560", rows: 64, cols: 2560, test_toks: &[1, 2, 3, 5, 12, 17, 64], bench_toks: &[] },
    OpCase { name: "13x6912", rows: 13, cols: 6912, test_toks: &[1, 2, 3, 5, 12, 17, 64], bench_toks: &[] },
    OpCase { name: "100x4100", rows: 100, cols: 4100, test_toks: &[1, 2, 3, 9, 17], bench_toks: &[] },
    OpCase { name: "257x640", rows: 257, cols: 640, test_toks: &[1, 2, 3, 4, 16, 17, 64, 130], bench_toks: &[] },
];

/// A small deterministic generator (no dependency).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    /// 32 uniform bits: the state's high half (its best bits).
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 32) as u32
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u32) -> u32 {
        ((self.next_u32() as u64 * n as u64) >> 32) as u32
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
}

/// Row-major ternary codes, uniform over {-1, 0, 1}.
pub fn random_codes(rng: &mut Rng, rows: usize, cols: usize) -> Vec<i8> {
    (0..rows * cols).map(|_| rng.below(3) as i8 - 1).collect()
}

/// Positive per-row output scales.
pub fn random_scales(rng: &mut Rng, rows: usize) -> Vec<f32> {
    (0..rows).map(|_| 0.25 + 2.0 * rng.unit()).collect()
}

/// `n_tok` tokens of random int8 activations over the full range, about 1 in 16 at the extremes
/// -128 or 127, with `sum` filled in and random positive scales.
pub fn random_acts(rng: &mut Rng, n_tok: usize, cols: usize) -> QuantActs {
    let mut x = QuantActs::new(n_tok, cols);
    for t in 0..n_tok {
        let row = &mut x.q[t * x.stride..t * x.stride + cols];
        for v in row.iter_mut() {
            *v = match rng.below(32) {
                0 => -128,
                1 => 127,
                _ => (rng.below(256) as i32 - 128) as i8,
            };
        }
        x.sum[t] = row.iter().map(|&v| v as i32).sum();
        x.scale[t] = 0.5 + 300.0 * rng.unit();
    }
    x.set_n_tok(n_tok);
    x
}

/// The expected output `[n_tok][rows]` by the reference: exact i32 dots, then [`epilogue`].
pub fn expected(codes: &[i8], rows: usize, cols: usize, x: &QuantActs, scales: &[f32]) -> Vec<f32> {
    let dots = reference_matmul_i32(codes, rows, cols, &x.q, x.stride, x.n_tok);
    let mut out = vec![0f32; x.n_tok * rows];
    for t in 0..x.n_tok {
        for r in 0..rows {
            out[t * rows + r] = epilogue(dots[t * rows + r], x.scale[t], scales[r]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Rng;

    /// `below` and `unit` reach their whole ranges (a 31-bit `next_u32` once kept them in the
    /// lower half: ternary codes were never +1, `unit()` stayed below 0.5).
    #[test]
    fn rng_covers_its_ranges() {
        let mut r = Rng::new(1);
        let mut seen = [0usize; 3];
        let (mut lo, mut hi) = (1f32, 0f32);
        for _ in 0..3000 {
            seen[r.below(3) as usize] += 1;
            let u = r.unit();
            (lo, hi) = (lo.min(u), hi.max(u));
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
        assert!(lo < 0.01 && hi > 0.99 && hi < 1.0, "{lo} {hi}");
    }
}
