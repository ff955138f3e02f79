//! Dense (LM head) GEMV / GEMM: every SIMD level against an f64 reference, within f32
//! accumulation error, for f32 / f16 / bf16 / int8-with-row-scales weights.

use bitnet_cpu::dense::{self, bf16_to_f32, f16_to_f32, DenseLevel, DenseRef};
use bitnet_cpu::kernels::cases::Rng;

fn weights(rng: &mut Rng, n: usize) -> (Vec<f32>, Vec<u16>, Vec<u16>) {
    let f: Vec<f32> = (0..n).map(|_| (rng.unit() - 0.5) * 4.0).collect();
    // f16 bits of values exactly representable in f16 (10-bit mantissa, moderate range).
    let h: Vec<u16> = (0..n).map(|_| (rng.below(0x7800) as u16) | ((rng.below(2) as u16) << 15)).collect();
    let b: Vec<u16> = f.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    (f, h, b)
}

fn widen(w: DenseRef<'_>, i: usize, cols: usize) -> f64 {
    match w {
        DenseRef::F32(d) => d[i] as f64,
        DenseRef::F16(d) => f16_to_f32(d[i]) as f64,
        DenseRef::BF16(d) => bf16_to_f32(d[i]) as f64,
        DenseRef::I8 { q, scale } => q[i] as f64 * scale[i / cols] as f64,
        DenseRef::PackedBf16(_) => unreachable!("compared with bf16 bit for bit below"),
    }
}

/// `(dot, sum |w x|)` in f64.
fn reference(w: DenseRef<'_>, r: usize, cols: usize, x: &[f32]) -> (f64, f64) {
    let mut s = 0f64;
    let mut a = 0f64;
    for c in 0..cols {
        let p = widen(w, r * cols + c, cols) * x[c] as f64;
        s += p;
        a += p.abs();
    }
    (s, a)
}

fn check(got: f32, (want, mag): (f64, f64), what: &str) {
    let err = (got as f64 - want).abs();
    assert!(err <= 1e-6 * mag + 1e-30, "{what}: got {got}, want {want}, err {err:e}, scale {mag:e}");
}

#[test]
fn gemv_and_gemm_match_f64_reference() {
    let mut rng = Rng::new(5);
    for &(rows, cols) in &[(1usize, 1usize), (3, 7), (5, 16), (9, 37), (33, 64), (17, 100), (6, 2560), (7, 6913)] {
        let (f, h, b) = weights(&mut rng, rows * cols);
        let q: Vec<i8> = (0..rows * cols).map(|_| (rng.below(255) as i32 - 127) as i8).collect();
        let scale: Vec<f32> = (0..rows).map(|_| rng.unit() * 0.01 + 1e-4).collect();
        let n_tok = 6;
        let x_stride = cols + 3;
        let x: Vec<f32> = (0..n_tok * x_stride).map(|_| rng.unit() * 2.0 - 1.0).collect();
        for w in [DenseRef::F32(&f), DenseRef::F16(&h), DenseRef::BF16(&b), DenseRef::I8 { q: &q, scale: &scale }] {
            for level in DenseLevel::available() {
                let what = format!("{} {rows}x{cols}", level.name());
                let refs: Vec<Vec<(f64, f64)>> = (0..n_tok)
                    .map(|t| (0..rows).map(|r| reference(w, r, cols, &x[t * x_stride..])).collect())
                    .collect();
                // GEMV over sub-ranges.
                for rr in [0..rows, rows / 2..rows, 0..rows.div_ceil(2)] {
                    let mut out = vec![f32::NAN; rr.len()];
                    dense::gemv_rows_with(level, w, cols, &x, rr.clone(), &mut out);
                    for (i, r) in rr.clone().enumerate() {
                        check(out[i], refs[0][r], &what);
                    }
                }
                // GEMM, every token count up to 6, padded output stride.
                for nt in 1..=n_tok {
                    let os = rows + 1;
                    let mut out = vec![f32::NAN; nt * os];
                    dense::gemm_rows_with(level, w, cols, &x, x_stride, nt, 0..rows, &mut out, os);
                    for t in 0..nt {
                        for r in 0..rows {
                            check(out[t * os + r], refs[t][r], &format!("{what} gemm t={t}"));
                        }
                        assert!(out[t * os + rows].is_nan());
                    }
                }
                // The default entry points.
                let mut out = vec![0f32; rows];
                dense::gemv_rows(w, cols, &x, 0..rows, &mut out);
                for r in 0..rows {
                    check(out[r], refs[0][r], &what);
                }
            }
        }
    }
}

#[test]
fn f16_conversion_is_exact_for_every_value() {
    for h in 0..=u16::MAX {
        let v = f16_to_f32(h);
        let exp = (h >> 10) & 0x1f;
        let man = (h & 0x3ff) as f64;
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let want = match exp {
            0 => sign * man * 2f64.powi(-24),
            31 if man == 0.0 => sign * f64::INFINITY,
            31 => f64::NAN,
            e => sign * (1.0 + man / 1024.0) * 2f64.powi(e as i32 - 15),
        };
        if want.is_nan() {
            assert!(v.is_nan(), "{h:#x}");
        } else {
            assert_eq!(v as f64, want, "{h:#x}");
            assert_eq!(v.is_sign_negative(), sign < 0.0, "{h:#x}");
        }
    }
}

/// Activations are used at full f32 precision (never rounded to bf16): a weight of 1 against an
/// activation that bf16 cannot represent gives the activation back exactly.
#[test]
fn activations_stay_f32() {
    let cols = 64;
    let w: Vec<u16> = (0..cols).map(|c| if c == 5 { 0x3f80 } else { 0 }).collect(); // bf16 1.0
    let mut x = vec![0f32; cols];
    x[5] = 1.0 + f32::EPSILON;
    for level in DenseLevel::available() {
        let mut out = [0f32];
        dense::gemv_rows_with(level, DenseRef::BF16(&w), cols, &x, 0..1, &mut out);
        assert_eq!(out[0], x[5], "{}", level.name());
    }
}

/// The lossless 12-bit bf16 layout gives the bf16 kernels' results bit for bit at every level
/// (AVX-512 and AVX2: the packed kernels; portable: strips unpacked to bf16), for the GEMV and
/// the GEMM, exception blocks included.
#[test]
fn packed_bf16_equals_bf16_bit_for_bit() {
    let mut rng = Rng::new(11);
    for &(rows, cols) in &[(3usize, 2560usize), (64, 256), (37, 384), (101, 2560)] {
        // 16 high bytes (both signs, |w| in [2^-15, 2)), any low byte: the table is full
        let mut b: Vec<u16> = (0..rows * cols)
            .map(|_| ((0x38 + rng.below(8) as u16) | (rng.below(2) as u16) << 7) << 8 | rng.below(256) as u16)
            .collect();
        // exceptions, in up to four blocks: tiny and huge values, a zero, an infinity
        for (i, v) in [(0usize, 1e-30f32), (rows * cols / 2, 3e9), (rows * cols - 1, 0.0), (cols + 5, f32::INFINITY)] {
            b[i] = (v.to_bits() >> 16) as u16;
        }
        let p = dense::PackedBf16::pack(&b, rows, cols).expect("packs");
        assert!(p.exception_blocks() >= 1 && p.exception_blocks() <= 4, "{p:?}");
        let x_stride = cols + 16;
        for n_tok in [1usize, 2, 3, 5, 33] {
            let x: Vec<f32> = (0..n_tok * x_stride).map(|_| rng.unit() * 2.0 - 1.0).collect();
            for level in DenseLevel::available() {
                for rr in [0..rows, rows / 2..rows, 0..rows.div_ceil(2)] {
                    let n = rr.len();
                    let (mut want, mut got) = (vec![f32::NAN; n_tok * n], vec![f32::NAN; n_tok * n]);
                    if n_tok == 1 {
                        dense::gemv_rows_with(level, DenseRef::BF16(&b), cols, &x, rr.clone(), &mut want);
                        dense::gemv_rows_with(level, DenseRef::PackedBf16(&p), cols, &x, rr.clone(), &mut got);
                    } else {
                        dense::gemm_rows_with(
                            level,
                            DenseRef::BF16(&b),
                            cols,
                            &x,
                            x_stride,
                            n_tok,
                            rr.clone(),
                            &mut want,
                            n,
                        );
                        let w = DenseRef::PackedBf16(&p);
                        dense::gemm_rows_with(level, w, cols, &x, x_stride, n_tok, rr.clone(), &mut got, n);
                    }
                    let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{} {rows}x{cols} rows {rr:?} n_tok {n_tok}", level.name());
                }
            }
        }
        let mut row = vec![0f32; cols];
        DenseRef::PackedBf16(&p).row_to_f32(rows - 1, cols, &mut row);
        assert!(row.iter().zip(&b[(rows - 1) * cols..]).all(|(v, &h)| v.to_bits() == (h as u32) << 16));
    }
}

/// Picked rows (the LM head's rescoring) are the GEMM's values for those rows and tokens, bit
/// for bit, at every level and for every weight type (packed bf16 with exception blocks
/// included), whatever the order of the picks (repeated rows, rows of several tokens).
#[test]
fn picked_rows_equal_the_gemm_bit_for_bit() {
    let mut rng = Rng::new(17);
    for &(rows, cols) in &[(7usize, 37usize), (40, 256), (101, 2560)] {
        let (f, h, _) = weights(&mut rng, rows * cols);
        // bf16 that packs (as in the packed test), with an exception block
        let mut b: Vec<u16> = (0..rows * cols)
            .map(|_| ((0x38 + rng.below(8) as u16) | (rng.below(2) as u16) << 7) << 8 | rng.below(256) as u16)
            .collect();
        b[rows * cols / 2] = (3e9f32.to_bits() >> 16) as u16;
        let packed = (cols % 128 == 0).then(|| dense::PackedBf16::pack(&b, rows, cols).expect("packs"));
        let q: Vec<i8> = (0..rows * cols).map(|_| (rng.below(255) as i32 - 127) as i8).collect();
        let scale: Vec<f32> = (0..rows).map(|_| rng.unit() * 0.01 + 1e-4).collect();
        let (n_tok, x_stride) = (3usize, cols + 5);
        let x: Vec<f32> = (0..n_tok * x_stride).map(|_| rng.unit() * 2.0 - 1.0).collect();
        // ascending ids per token (as the head picks them), a repeat, a jump back, the last row
        let mut picks: Vec<(u32, u32)> = Vec::new();
        for t in 0..n_tok as u32 {
            let mut ids: Vec<u32> = (0..rows.min(9)).map(|_| rng.below(rows as u32)).collect();
            ids.sort_unstable();
            picks.extend(ids.into_iter().map(|id| (t, id)));
        }
        picks.extend([(0, rows as u32 - 1), (2, 0), (2, 0)]);
        let mut ws =
            vec![DenseRef::F32(&f), DenseRef::F16(&h), DenseRef::BF16(&b), DenseRef::I8 { q: &q, scale: &scale }];
        if let Some(p) = &packed {
            ws.push(DenseRef::PackedBf16(p));
        }
        for w in ws {
            for level in DenseLevel::available() {
                let mut all = vec![f32::NAN; n_tok * rows];
                dense::gemm_rows_with(level, w, cols, &x, x_stride, n_tok, 0..rows, &mut all, rows);
                let mut got = vec![f32::NAN; picks.len()];
                dense::gemv_picked_with(level, w, cols, &x, x_stride, &picks, &mut got);
                for (&(t, id), g) in picks.iter().zip(&got) {
                    let want = all[t as usize * rows + id as usize];
                    assert_eq!(g.to_bits(), want.to_bits(), "{} {rows}x{cols} pick ({t}, {id})", level.name());
                }
            }
        }
    }
}
