//! The multi-token GEMM gives every (row, token) exactly the single-token GEMV's value, so a
//! sequence's logits do not depend on what else is in the batch (the server relies on this).

use bitnet_cpu::dense::{gemm_rows, gemv_rows, DenseRef};

#[test]
fn gemm_equals_gemv_bit_for_bit() {
    let (rows, cols) = (77usize, 2560usize);
    let mut seed = 12345u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let wf: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
    let wb: Vec<u16> = wf.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    let wh: Vec<u16> = wb.clone();
    let q: Vec<i8> = wf.iter().map(|v| (v * 250.0) as i8).collect();
    let sc: Vec<f32> = (0..rows).map(|r| 0.01 + r as f32 * 1e-4).collect();
    for n in [1usize, 2, 3, 4, 5, 8, 13, 32] {
        let x: Vec<f32> = (0..n * cols).map(|_| next()).collect();
        for w in [DenseRef::F32(&wf), DenseRef::BF16(&wb), DenseRef::F16(&wh), DenseRef::I8 { q: &q, scale: &sc }] {
            for range in [0..rows, 5..70, 16..48] {
                let mut g = vec![0f32; n * rows];
                gemm_rows(w, cols, &x, cols, n, range.clone(), &mut g, rows);
                for t in 0..n {
                    let mut v = vec![0f32; range.len()];
                    gemv_rows(w, cols, &x[t * cols..(t + 1) * cols], range.clone(), &mut v);
                    assert_eq!(&g[t * rows..t * rows + range.len()], &v[..], "n {n} token {t} range {range:?}");
                }
            }
        }
    }
}
