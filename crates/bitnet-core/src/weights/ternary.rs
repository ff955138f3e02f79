//! Turning checkpoint tensors into ternary codes, exactly as the reference does.

use super::TernaryCodes;

/// Online quantization of a master weight `[rows][cols]` (microsoft/bitnet-b1.58-2B-4T-bf16),
/// as transformers' `WeightQuant` in f32:
/// `inv = 1 / max(mean|W|, 1e-5)`, `codes = round_half_even(W * inv).clamp(-1, 1)`, output scale `1 / inv`.
///
/// torch's own f32 sum order depends on the CPU's vector width and thread count, so no single
/// order matches every machine; an ulp of difference in the scale changes outputs by ~1e-7
/// relative (tests/gguf.rs shows the scale bitnet.cpp wrote equals torch's 8-lane sum exactly).
pub fn quantize_master(w: &[f32], rows: usize, cols: usize) -> TernaryCodes {
    debug_assert_eq!(w.len(), rows * cols);
    // torch's CPU `mean` is `sum(...) / numel` (ATen ReduceOps: sum_out then div_), the sum in f32
    // with a cascade that is practically correctly rounded: round the f64 sum to f32, then divide in f32.
    // (Dividing in f64 and rounding once differs by an ulp now and then, and that flips the codes
    // of weights sitting at W*inv = 0.5.)
    let sum: f64 = w.iter().map(|v| v.abs() as f64).sum();
    let mean = (sum as f32) / (w.len().max(1) as f32);
    let inv = 1.0f32 / mean.max(1e-5);
    let codes = w.iter().map(|&v| bitnet_cpu::kernels::round_ties_even(v * inv).clamp(-1.0, 1.0) as i8).collect();
    TernaryCodes { rows, cols, codes, scale: 1.0f32 / inv }
}

/// Unpacks the packed checkpoint layout (microsoft/bitnet-b1.58-2B-4T): `packed` is U8
/// `[rows/4][cols]`; with `R = rows/4`, bits `2i..2i+1` of `packed[r][c]` hold `W[i*R + r][c] + 1`.
/// Returns the row-major codes, or the index of the first byte holding the invalid code 3.
pub fn unpack_rows_blocked(packed: &[u8], rows: usize, cols: usize) -> Result<Vec<i8>, usize> {
    debug_assert_eq!(rows % 4, 0);
    debug_assert_eq!(packed.len(), rows / 4 * cols);
    let r4 = rows / 4;
    let mut codes = vec![0i8; rows * cols];
    // Branch-free per packed row, so it vectorizes (a test and an early return per code kept
    // it scalar: a quarter of loading 2B-4T); the bad byte is looked for only on failure.
    let mut bad = false;
    for (r, src) in packed.chunks_exact(cols.max(1)).take(r4).enumerate() {
        for i in 0..4 {
            let dst = &mut codes[(i * r4 + r) * cols..(i * r4 + r + 1) * cols];
            for (d, &b) in dst.iter_mut().zip(src) {
                let v = (b >> (2 * i)) & 3;
                bad |= v == 3;
                *d = v as i8 - 1;
            }
        }
    }
    if bad {
        let is_bad = |b: u8| (0..4).any(|i| (b >> (2 * i)) & 3 == 3);
        return Err(packed.iter().position(|&b| is_bad(b)).unwrap_or_default());
    }
    Ok(codes)
}

/// The inverse of [`unpack_rows_blocked`] (used by tests and the random model).
pub fn pack_rows_blocked(codes: &[i8], rows: usize, cols: usize) -> Vec<u8> {
    let r4 = rows / 4;
    let mut packed = vec![0u8; r4 * cols];
    for i in 0..4 {
        for r in 0..r4 {
            for c in 0..cols {
                packed[r * cols + c] |= ((codes[(i * r4 + r) * cols + c] + 1) as u8) << (2 * i);
            }
        }
    }
    packed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_roundtrip() {
        let rows = 8;
        let cols = 5;
        let codes: Vec<i8> = (0..rows * cols).map(|i| (i % 3) as i8 - 1).collect();
        let p = pack_rows_blocked(&codes, rows, cols);
        assert_eq!(unpack_rows_blocked(&p, rows, cols).unwrap(), codes);
        let mut bad = p.clone();
        bad[3] |= 3;
        assert_eq!(unpack_rows_blocked(&bad, rows, cols), Err(3));
        // the first bad byte, whichever field holds the 3
        bad[1] |= 0xc0;
        bad[9] |= 0x0c;
        assert_eq!(unpack_rows_blocked(&bad, rows, cols), Err(1));
        // larger, every code value in every field
        let (rows, cols) = (64, 131);
        let codes: Vec<i8> = (0..rows * cols).map(|i| ((i * 7 + i / 5) % 3) as i8 - 1).collect();
        let p = pack_rows_blocked(&codes, rows, cols);
        assert_eq!(unpack_rows_blocked(&p, rows, cols).unwrap(), codes);
    }

    #[test]
    fn quantize_matches_definition() {
        let w = [0.5f32, -1.5, 0.0, 2.5, -0.2, 0.1];
        let t = quantize_master(&w, 2, 3);
        let mean = (0.5 + 1.5 + 0.0 + 2.5 + 0.2 + 0.1) / 6.0f32;
        assert!((t.scale - mean).abs() < 1e-6);
        assert_eq!(t.codes, vec![1, -1, 0, 1, 0, 0]);
    }
}
