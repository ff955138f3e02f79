//! Portable kernels and the scalar reference that every other level is tested against.
//!
//! Layout (see the module docs of `kernels`): row-major, `kcols / 4` bytes per row, in chunks of
//! 16 bytes covering 64 columns; byte `b` of chunk `k` holds `code + 1` of column `64k + 16p + b`
//! in bits `2p..2p+1`. Unpacking a chunk is `(byte >> 2p) & 3` over 16 consecutive bytes, lined
//! up with 16 consecutive activations. The kernel unpacks a window of 1024 columns of a row into
//! bytes once (shifts / ANDs on 64-bit words), then takes its dot product with each token of a block of up
//! to 8 in i16 lanes: plain lane-wise loops the compiler turns into SIMD on any target (checked:
//! NEON `ushr`/`and` for the unpack, `smlal`/`smlal2` for the dot on aarch64).

use std::ops::Range;

use super::{AlignedBytes, OutPtr, QuantActs, TernaryMatrix};

/// The plain definition: `out[t][r] = sum_c codes[r][c] * q[t][c]` in i32. The test oracle.
pub fn reference_matmul_i32(
    codes: &[i8],
    rows: usize,
    cols: usize,
    q: &[i8],
    q_stride: usize,
    n_tok: usize,
) -> Vec<i32> {
    let mut out = vec![0i32; n_tok * rows];
    for t in 0..n_tok {
        let x = &q[t * q_stride..t * q_stride + cols];
        for r in 0..rows {
            let w = &codes[r * cols..(r + 1) * cols];
            out[t * rows + r] = w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum();
        }
    }
    out
}

/// The float epilogue shared by every level, in this exact order (see the module contract).
#[inline(always)]
pub fn epilogue(dot: i32, act_scale: f32, row_scale: f32) -> f32 {
    dot as f32 / act_scale * row_scale
}

/// Columns per 16-byte chunk.
const CHUNK_COLS: usize = 64;
/// Columns unpacked at a time. A lane of the i16 accumulators of [`dot_codes`] adds
/// `WINDOW / 16 = 64` products `u * x` in [-256, 254], so it stays within [-16384, 16256].
const WINDOW: usize = 1024;
/// Tokens sharing one unpacked window.
const TOK_BLOCK: usize = 8;

pub(super) fn pack(codes: &[i8], rows: usize, cols: usize, kcols: usize) -> AlignedBytes {
    let bpr = kcols / 4;
    let mut data = AlignedBytes::filled(rows * bpr, 0x55); // 0b01 everywhere = code 0
    let d = data.as_mut_slice();
    for r in 0..rows {
        let src = &codes[r * cols..(r + 1) * cols];
        let dst = &mut d[r * bpr..(r + 1) * bpr];
        for (c, &v) in src.iter().enumerate() {
            let (k, within) = (c / CHUNK_COLS, c % CHUNK_COLS);
            let (p, b) = (within / 16, within % 16);
            let byte = &mut dst[k * 16 + b];
            let sh = 2 * p;
            *byte = (*byte & !(3 << sh)) | (((v + 1) as u8) << sh);
        }
    }
    data
}

pub(super) fn unpack(data: &[u8], rows: usize, cols: usize, kcols: usize) -> Vec<i8> {
    let bpr = kcols / 4;
    let mut out = vec![0i8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let (k, within) = (c / CHUNK_COLS, c % CHUNK_COLS);
            let (p, b) = (within / 16, within % 16);
            out[r * cols + c] = ((data[r * bpr + k * 16 + b] >> (2 * p)) & 3) as i8 - 1;
        }
    }
    out
}

/// Unpacks 16-byte chunks into `u = code + 1` bytes in column order: per shift position, a shift
/// and an AND on two 64-bit words (SWAR; the compiler also turns it into vector ops, but even
/// scalar it costs under half an instruction per code).
#[inline(always)]
fn unpack_codes(src: &[u8], dst: &mut [i8]) {
    const M: u64 = 0x0303_0303_0303_0303;
    for (ch, d) in src.chunks_exact(16).zip(dst.chunks_exact_mut(CHUNK_COLS)) {
        let lo = u64::from_le_bytes(ch[..8].try_into().unwrap());
        let hi = u64::from_le_bytes(ch[8..].try_into().unwrap());
        for p in 0..4 {
            let (a, b) = ((lo >> (2 * p)) & M, (hi >> (2 * p)) & M);
            d[16 * p..16 * p + 8].copy_from_slice(&a.to_le_bytes().map(|v| v as i8));
            d[16 * p + 8..16 * p + 16].copy_from_slice(&b.to_le_bytes().map(|v| v as i8));
        }
    }
}

/// `sum_c u[c] * x[c]` over at most [`WINDOW`] columns: i16 lanes (NEON `smlal`, SSE2 `pmullw`),
/// widened once at the end.
#[inline(always)]
fn dot_codes(u: &[i8], x: &[i8]) -> i32 {
    let mut acc = [0i16; 16];
    for (cu, cx) in u.chunks_exact(16).zip(x.chunks_exact(16)) {
        for j in 0..16 {
            acc[j] = acc[j].wrapping_add((cu[j] as i16).wrapping_mul(cx[j] as i16));
        }
    }
    acc.iter().map(|&v| v as i32).sum()
}

/// Tokens `t0..t0 + nt` (`nt <= TOK_BLOCK`), rows `rows`.
fn rows_block(w: &TernaryMatrix, x: &QuantActs, t0: usize, nt: usize, out: OutPtr, rows: Range<usize>) {
    let bpr = w.kcols / 4;
    let data = w.data();
    let mut u = [0i8; WINDOW];
    for r in rows {
        let row = &data[r * bpr..(r + 1) * bpr];
        let mut dots = [0i32; TOK_BLOCK];
        for (wi, win) in row.chunks(WINDOW / 4).enumerate() {
            let n = win.len() * 4;
            let c0 = wi * WINDOW;
            unpack_codes(win, &mut u[..n]);
            for (k, d) in dots[..nt].iter_mut().enumerate() {
                *d += dot_codes(&u[..n], &x.row(t0 + k)[c0..c0 + n]);
            }
        }
        for (k, &d) in dots[..nt].iter().enumerate() {
            let t = t0 + k;
            let v = epilogue(d - x.sum[t], x.scale[t], w.scales[r]);
            // SAFETY: the caller guarantees `out` covers token `t`, row `r`.
            unsafe { *out.at(t, r) = v };
        }
    }
}

/// # Safety
/// `out` must be writable at every `(t, r)` for `t < x.n_tok`, `r in rows`.
pub(super) unsafe fn matmul_rows(w: &TernaryMatrix, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
    let mut t0 = 0;
    while t0 < x.n_tok {
        let n = (x.n_tok - t0).min(TOK_BLOCK);
        rows_block(w, x, t0, n, out, rows.clone());
        t0 += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{KernelLevel, K_ALIGN};

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    #[test]
    fn generic_equals_reference() {
        let mut seed = 7u64;
        for &(rows, cols, n_tok) in &[(5usize, 7usize, 1usize), (64, 256, 3), (33, 300, 2), (8, 128, 1), (3, 4100, 6)] {
            let codes: Vec<i8> = (0..rows * cols).map(|_| (lcg(&mut seed) % 3) as i8 - 1).collect();
            let m = TernaryMatrix::from_codes(&codes, rows, cols, vec![1.0; rows], KernelLevel::Generic);
            assert_eq!(m.to_codes(), codes);
            let mut x = QuantActs::new(n_tok, cols);
            for t in 0..n_tok {
                let xf: Vec<f32> = (0..cols).map(|_| (lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0).collect();
                x.quantize_row(t, &xf);
            }
            x.set_n_tok(n_tok);
            let want = reference_matmul_i32(&codes, rows, cols, &x.q, x.stride, n_tok);
            let mut out = vec![0f32; n_tok * rows];
            m.matmul_rows(&x, &mut out, rows, 0..rows);
            for t in 0..n_tok {
                for r in 0..rows {
                    assert_eq!(out[t * rows + r], epilogue(want[t * rows + r], x.scale[t], 1.0));
                }
            }
            assert_eq!(x.stride % K_ALIGN, 0);
        }
    }

    #[test]
    fn extreme_activations_do_not_overflow() {
        // Every code +1 (u = 2) against every activation -128, and every code -1 against 127:
        // the i16 windows sit exactly at their bounds.
        for (code, act) in [(1i8, -128i8), (-1, -128), (1, 127), (-1, 127)] {
            let (rows, cols) = (2, 6912);
            let codes = vec![code; rows * cols];
            let m = TernaryMatrix::from_codes(&codes, rows, cols, vec![1.0; rows], KernelLevel::Generic);
            let mut x = QuantActs::new(1, cols);
            x.q[..cols].fill(act);
            x.sum[0] = act as i32 * cols as i32;
            x.scale[0] = 1.0;
            x.set_n_tok(1);
            let mut out = vec![0f32; rows];
            m.matmul_rows(&x, &mut out, rows, 0..rows);
            assert_eq!(out[0], (code as i32 * act as i32 * cols as i32) as f32);
        }
    }
}
