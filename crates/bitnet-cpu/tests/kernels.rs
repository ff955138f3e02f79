//! Every available kernel level against the scalar reference, bit for bit, on the shared op-case
//! table (`bitnet_cpu::kernels::cases`): whole matrices, row sub-ranges, and the thread pool.

use bitnet_cpu::dense::DenseRef;
use bitnet_cpu::kernels::cases::{expected, random_acts, random_codes, random_scales, Rng, CASES};
use bitnet_cpu::kernels::{self, generic, Int2Matrix, Int4Matrix, Int8Matrix, KernelLevel, QuantActs, TernaryMatrix};
use bitnet_cpu::ThreadPool;

/// A value no kernel produces from these inputs: marks output places that must stay untouched.
const SENTINEL: f32 = -7.77e30;

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{what}: index {i}: got {g:e}, want {w:e}");
    }
}

#[test]
fn levels_detect_and_names() {
    let avail = KernelLevel::available();
    assert_eq!(avail[0], KernelLevel::Generic);
    assert!(avail.contains(&KernelLevel::detect()));
    assert_eq!(*avail.last().unwrap(), KernelLevel::detect());
    for l in KernelLevel::ALL {
        assert_eq!(KernelLevel::from_name(l.name()), Some(l));
        assert_eq!(l.is_available(), avail.contains(&l));
    }
    assert_eq!(KernelLevel::from_name("AVX2"), Some(KernelLevel::Avx2));
    assert_eq!(KernelLevel::from_name("nope"), None);
    #[cfg(target_arch = "x86_64")]
    {
        assert_eq!(KernelLevel::Avx2.is_available(), is_x86_feature_detected!("avx2"));
        if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bw") {
            let vbmi = is_x86_feature_detected!("avx512vbmi");
            let best = match (KernelLevel::Amx.is_available(), vbmi) {
                (true, true) => KernelLevel::AmxVbmi,
                (true, false) => KernelLevel::Amx,
                (false, true) => KernelLevel::Avx512Vbmi,
                (false, false) => KernelLevel::Avx512Vnni,
            };
            assert_eq!(KernelLevel::detect(), best);
            // Linux lists `amx_int8` only where it can hand out tile state: the AMX levels must be
            // offered there (a failed permission request would hide them).
            #[cfg(target_os = "linux")]
            if std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" amx_int8")) {
                assert!(KernelLevel::Amx.is_available(), "AMX-INT8 listed by the kernel but not offered");
            }
        }
        assert_eq!(
            KernelLevel::AmxVbmi.is_available(),
            KernelLevel::Amx.is_available() && KernelLevel::Avx512Vbmi.is_available()
        );
        if KernelLevel::Amx.is_available() {
            assert!(KernelLevel::Avx512Vnni.is_available());
        }
        if is_x86_feature_detected!("avxvnni") {
            assert!(KernelLevel::AvxVnni.is_available());
        }
    }
    // Workload defaults: always available; without AMX the 1.6-bit level only for several threads
    // decoding one sequence, in place of which the others get the 2-bit AVX-512 level; with AMX
    // the 1.6-bit AMX level for everything.
    use bitnet_cpu::Workload;
    assert_eq!(KernelLevel::default_for(Workload::Sequence, 2), KernelLevel::detect());
    for (w, t) in [(Workload::Sequence, 1), (Workload::Batches, 1), (Workload::Batches, 8)] {
        let l = KernelLevel::default_for(w, t);
        assert!(l.is_available());
        let want = match KernelLevel::detect() {
            KernelLevel::Avx512Vbmi => KernelLevel::Avx512Vnni,
            l => l,
        };
        assert_eq!(l, want, "{w:?} x {t}");
    }
    eprintln!("available: {:?}", avail.iter().map(|l| l.name()).collect::<Vec<_>>());
}

/// Row sub-ranges with aligned starts and odd ends (plus one unaligned start, which is allowed).
/// Checks a row kernel's outputs against `want` (`[n_tok][rows]`, bit for bit): the whole
/// matrix (output stride == rows), sub-ranges of rows with a padded output stride (places
/// outside them stay untouched) and every pool (1..3 threads).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn check_row_outputs(
    what: &str,
    want: &[f32],
    rows: usize,
    n_tok: usize,
    align: usize,
    pools: &[ThreadPool],
    rows_fn: &dyn Fn(&mut [f32], usize, std::ops::Range<usize>),
    pool_fn: &dyn Fn(&ThreadPool, &mut [f32], usize),
) {
    let mut out = vec![SENTINEL; n_tok * rows];
    rows_fn(&mut out, rows, 0..rows);
    assert_bits(&out, want, what);
    let stride = rows + 3;
    for r in sub_ranges(rows, align) {
        let mut out = vec![SENTINEL; n_tok * stride];
        rows_fn(&mut out, stride, r.clone());
        for t in 0..n_tok {
            for i in 0..stride {
                let (got, w) = (out[t * stride + i], if r.contains(&i) { want[t * rows + i] } else { SENTINEL });
                assert!(got.to_bits() == w.to_bits(), "{what} rows {r:?}: t {t} row {i}: got {got:e}, want {w:e}");
            }
        }
    }
    for pool in pools {
        let mut out = vec![SENTINEL; n_tok * stride];
        pool_fn(pool, &mut out, stride);
        for t in 0..n_tok {
            assert_bits(&out[t * stride..t * stride + rows], &want[t * rows..(t + 1) * rows], what);
            assert!(out[t * stride + rows..(t + 1) * stride].iter().all(|&v| v == SENTINEL));
        }
    }
}

fn sub_ranges(rows: usize, align: usize) -> Vec<std::ops::Range<usize>> {
    let mut v = vec![0..rows, 0..rows.min(1), 0..rows.min(align + 1)];
    if rows > align {
        v.push(align..rows);
        v.push(align..rows.min(3 * align + 5));
    }
    if rows > 2 * align + 3 {
        v.push(2 * align..rows - 3);
    }
    if rows > 10 {
        v.push(3..rows - 1); // unaligned start: still correct
    }
    v.push(rows..rows);
    v
}

#[test]
fn every_level_matches_reference_on_op_cases() {
    let levels = KernelLevel::available();
    let pools: Vec<ThreadPool> = (1..=3).map(ThreadPool::new).collect();
    let mut rng = Rng::new(1);
    for case in CASES {
        let (rows, cols) = (case.rows, case.cols);
        let codes = random_codes(&mut rng, rows, cols);
        let scales = random_scales(&mut rng, rows);
        let mats: Vec<TernaryMatrix> =
            levels.iter().map(|&l| TernaryMatrix::from_codes(&codes, rows, cols, scales.clone(), l)).collect();
        for m in &mats {
            assert_eq!(m.to_codes(), codes, "{} {}: repack round trip", case.name, m.level().name());
            assert_eq!(m.rows(), rows);
            assert_eq!(m.cols(), cols);
            assert_eq!(m.scales(), &scales[..]);
            // 2 bits per code, or 1.6 (five codes per byte) for the T5 packing.
            let per_byte = if matches!(m.level(), KernelLevel::Avx512Vbmi | KernelLevel::AmxVbmi) { 5 } else { 4 };
            assert!(m.nbytes() >= rows * cols / per_byte);
        }
        for &n_tok in case.test_toks {
            let x = random_acts(&mut rng, n_tok, cols);
            let want = expected(&codes, rows, cols, &x, &scales);
            for m in &mats {
                let what = format!("{} n_tok={n_tok} {}", case.name, m.level().name());
                check_row_outputs(
                    &what,
                    &want,
                    rows,
                    n_tok,
                    m.row_align(),
                    &pools,
                    &|o, st, r| m.matmul_rows(&x, o, st, r),
                    &|pool, o, st| kernels::matmul(pool, m, &x, o, st),
                );
            }
        }
    }
}

/// Activations from `quantize_row` (the path the model takes), for every level.
#[test]
fn quantized_float_inputs() {
    let mut rng = Rng::new(2);
    let (rows, cols, n_tok) = (50, 2560, 5);
    let codes = random_codes(&mut rng, rows, cols);
    let scales = random_scales(&mut rng, rows);
    let mut x = QuantActs::new(8, cols);
    for t in 0..n_tok {
        let xf: Vec<f32> = (0..cols).map(|_| (rng.unit() - 0.5) * (t as f32 + 1.0)).collect();
        x.quantize_row(t, &xf);
    }
    x.set_n_tok(n_tok);
    let want = expected(&codes, rows, cols, &x, &scales);
    for l in KernelLevel::available() {
        let m = TernaryMatrix::from_codes(&codes, rows, cols, scales.clone(), l);
        let mut out = vec![0f32; n_tok * rows];
        m.matmul_rows(&x, &mut out, rows, 0..rows);
        assert_bits(&out, &want, l.name());
    }
}

/// Constant extreme inputs sit exactly on the i16 / i32 accumulation bounds of the kernels.
#[test]
fn extreme_inputs() {
    for cols in [6912usize, 13824] {
        for (code, act) in [(1i8, -128i8), (-1, -128), (1, 127), (-1, 127), (0, -128)] {
            let rows = 20;
            let codes = vec![code; rows * cols];
            let scales = vec![1.0f32; rows];
            for n_tok in [1usize, 2, 5, 9, 33] {
                let mut x = QuantActs::new(n_tok, cols);
                for t in 0..n_tok {
                    x.q[t * x.stride..t * x.stride + cols].fill(act);
                    x.sum[t] = act as i32 * cols as i32;
                    x.scale[t] = 1.0;
                }
                x.set_n_tok(n_tok);
                let want = (code as i32 * act as i32 * cols as i32) as f32;
                for l in KernelLevel::available() {
                    let m = TernaryMatrix::from_codes(&codes, rows, cols, scales.clone(), l);
                    let mut out = vec![0f32; n_tok * rows];
                    m.matmul_rows(&x, &mut out, rows, 0..rows);
                    assert!(out.iter().all(|&v| v == want), "{} cols {cols} code {code} act {act}", l.name());
                }
            }
        }
    }
}

/// `quantize_row` / `store_row` follow `round_half_even(x * s).clamp(-128, 127)` exactly,
/// including ties, and fill `sum`.
#[test]
fn activation_quantization() {
    let mut rng = Rng::new(3);
    let cols = 300;
    let mut x = QuantActs::new(3, cols);
    assert_eq!(x.stride % kernels::K_ALIGN, 0);
    // amax = 127 makes s = 1, so k + 0.5 values are exact ties.
    let mut xf: Vec<f32> = (0..cols).map(|i| (i as f32 - 150.0) * 0.5).collect();
    xf[0] = 127.0;
    xf[1] = -127.0;
    x.quantize_row(0, &xf);
    let xr: Vec<f32> = (0..cols).map(|_| (rng.unit() - 0.5) * 3.0).collect();
    x.quantize_row(1, &xr);
    let amax = xr.iter().fold(0f32, |m, v| m.max((v * 0.7).abs()));
    x.store_row(2, &xr, amax, 0.7);
    for (t, (src, mul)) in [(&xf, 1.0f32), (&xr, 1.0), (&xr, 0.7)].into_iter().enumerate() {
        let amax = src.iter().fold(0f32, |m, v| m.max((v * mul).abs()));
        let s = 127.0f32 / amax.max(1e-5);
        assert_eq!(x.scale[t], s);
        let want: Vec<i8> = src.iter().map(|v| ((v * mul) * s).round_ties_even().clamp(-128.0, 127.0) as i8).collect();
        assert_eq!(&x.row(t)[..cols], &want[..], "token {t}");
        assert!(x.row(t)[cols..].iter().all(|&v| v == 0));
        assert_eq!(x.sum[t], want.iter().map(|&v| v as i32).sum::<i32>());
    }
    // Ties: -73.5 -> -74, 0.5 -> 0, 1.5 -> 2 (index 2 is exactly -74).
    assert_eq!(x.row(0)[2], -74);
    assert_eq!(x.row(0)[3], -74);
    assert_eq!(x.row(0)[151], 0);
    assert_eq!(x.row(0)[153], 2);
    // Special values through store_row with s = 1 (amax = 127): NaN -> 0, infinities and huge
    // values clamp, ties round to even, -0.0 -> 0, every value at and around the clamp bounds.
    let mut sp: Vec<f32> =
        vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, -0.0, 0.0, 127.0, 127.4, 127.5, 128.0];
    sp.extend([-127.5, -128.0, -128.4, -128.5, -128.6, -129.0, 2.5, -2.5, 3.5, 1e-30, f32::MIN_POSITIVE]);
    for k in -68..68 {
        sp.push(k as f32 * 0.5);
        sp.push(k as f32 * 0.5 + 0.25);
    }
    sp.resize(cols.max(sp.len()), 0.0);
    let sp = &sp[..cols];
    x.store_row(1, sp, 127.0, 1.0);
    let want: Vec<i8> = sp.iter().map(|v| v.round_ties_even().clamp(-128.0, 127.0) as i8).collect();
    assert_eq!(&x.row(1)[..cols], &want[..]);
    assert_eq!(x.sum[1], want.iter().map(|&v| v as i32).sum::<i32>());
    assert_eq!(kernels::abs_max(&[1.0, f32::NAN, -3.0, 2.0]), 3.0);
    // All zeros: scale from the 1e-5 floor, every q 0.
    x.quantize_row(0, &vec![0.0; cols]);
    assert!(x.row(0).iter().all(|&v| v == 0));
    assert_eq!(x.scale[0], 127.0 / 1e-5);
}

#[test]
fn generic_oracle_self_check() {
    // The reference itself, on a hand-computed case.
    let codes = [1i8, -1, 0, 1, 1, 1];
    let q = [3i8, -128, 127];
    let d = generic::reference_matmul_i32(&codes, 2, 3, &q, 3, 1);
    assert_eq!(d, vec![3 + 128, 3 - 128 + 127]);
    assert_eq!(generic::epilogue(254, 2.0, 0.5), 63.5);
}

/// The int8 x int8 path (fast LM head) on the same op cases: exact i32 dots, same epilogue,
/// bit-identical across levels; whole matrix, sub-ranges and the pool.
#[test]
fn int8_every_level_matches_reference_on_op_cases() {
    let levels = KernelLevel::available();
    let pools: Vec<ThreadPool> = (1..=3).map(ThreadPool::new).collect();
    let mut rng = Rng::new(11);
    for case in CASES {
        let (rows, cols) = (case.rows, case.cols);
        let q: Vec<i8> = (0..rows * cols)
            .map(|_| match rng.below(16) {
                0 => -127,
                1 => 127,
                _ => (rng.below(255) as i32 - 127) as i8,
            })
            .collect();
        let scales = random_scales(&mut rng, rows);
        let mats: Vec<Int8Matrix> =
            levels.iter().map(|&l| Int8Matrix::from_i8(&q, rows, cols, scales.clone(), l)).collect();
        for m in &mats {
            assert_eq!(m.to_i8(), q, "{} {}: int8 repack round trip", case.name, m.level().name());
        }
        for &n_tok in case.test_toks {
            let x = random_acts(&mut rng, n_tok, cols);
            let dots = generic::reference_matmul_i32(&q, rows, cols, &x.q, x.stride, n_tok);
            let want: Vec<f32> =
                (0..n_tok * rows).map(|i| generic::epilogue(dots[i], x.scale[i / rows], scales[i % rows])).collect();
            for m in &mats {
                let what = format!("int8 {} n_tok={n_tok} {}", case.name, m.level().name());
                check_row_outputs(
                    &what,
                    &want,
                    rows,
                    n_tok,
                    m.row_align(),
                    &pools,
                    &|o, st, r| m.matmul_rows(&x, o, st, r),
                    &|pool, o, st| m.matmul(pool, &x, o, st),
                );
            }
        }
    }
}

/// Per-row quantization of a dense matrix for the int8 head.
#[test]
fn int8_from_dense_quantizes_per_row() {
    let (rows, cols) = (5, 300);
    let mut rng = Rng::new(12);
    let mut w: Vec<f32> = (0..rows * cols).map(|_| (rng.unit() - 0.5) * 0.1).collect();
    w[2 * cols..3 * cols].fill(0.0); // an all-zero row
    let bf: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    for l in KernelLevel::available() {
        let m = Int8Matrix::from_dense(DenseRef::F32(&w), rows, cols, l);
        let q = m.to_i8();
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            if amax == 0.0 {
                assert_eq!(m.scales()[r], 0.0);
                assert!(q[r * cols..(r + 1) * cols].iter().all(|&v| v == 0));
                continue;
            }
            assert_eq!(m.scales()[r], amax / 127.0);
            for c in 0..cols {
                let want = (row[c] * (127.0 / amax)).round_ties_even().clamp(-127.0, 127.0) as i8;
                assert_eq!(q[r * cols + c], want);
            }
            // Reconstruction error at most half a step.
            for c in 0..cols {
                assert!((q[r * cols + c] as f32 * m.scales()[r] - row[c]).abs() <= 0.5001 * m.scales()[r]);
            }
        }
        let mb = Int8Matrix::from_dense(DenseRef::BF16(&bf), rows, cols, l);
        assert_eq!(mb.rows(), rows);
        assert_eq!(mb.cols(), cols);
    }
}

/// A grouped head (`$t`, packed by `$from`, read back by `$to`) on the op cases: every level
/// equals the scalar contract (`$t::reference`) bit for bit; whole matrix, sub-ranges and the
/// pool; weights uniform over their `$nq` values with extra weight on the extremes (padding
/// `$pad`), scales including zero, negative and subnormal f16 values.
macro_rules! grouped_head_matches_reference {
    ($t:ident, $from:ident, $to:ident, $nq:expr, $pad:expr, $seed:expr, $label:expr) => {{
        let levels = KernelLevel::available();
        let pools: Vec<ThreadPool> = (1..=3).map(ThreadPool::new).collect();
        let mut rng = Rng::new($seed);
        for case in CASES {
            let (rows, cols) = (case.rows, case.cols);
            let kcols = cols.div_ceil(kernels::K_ALIGN) * kernels::K_ALIGN;
            let ng = kcols / 32;
            let mut q = vec![$pad; rows * kcols];
            for r in 0..rows {
                for c in 0..cols {
                    q[r * kcols + c] = match rng.below(16) {
                        0 => 0,
                        1 => $nq - 1,
                        _ => rng.below($nq) as u8,
                    };
                }
            }
            let d: Vec<u16> = (0..rows * ng)
                .map(|_| match rng.below(16) {
                    0 => 0,
                    1 => 0x8001, // the smallest negative subnormal
                    _ => half::f16::from_f32((rng.unit() - 0.5) * 0.05).to_bits(),
                })
                .collect();
            let mats: Vec<$t> = levels.iter().map(|&l| $t::$from(&q, &d, rows, cols, l)).collect();
            for m in &mats {
                let what = format!("{} {} {}: repack round trip", $label, case.name, m.level().name());
                assert_eq!(m.$to(), (q.clone(), d.clone()), "{what}");
            }
            for &n_tok in case.test_toks {
                let mut x = random_acts(&mut rng, n_tok, cols);
                x.fill_group_sums();
                let want = $t::reference(&q, &d, rows, kcols, &x);
                for m in &mats {
                    let what = format!("{} {} n_tok={n_tok} {}", $label, case.name, m.level().name());
                    check_row_outputs(
                        &what,
                        &want,
                        rows,
                        n_tok,
                        m.row_align(),
                        &pools,
                        &|o, st, r| m.matmul_rows(&x, o, st, r),
                        &|pool, o, st| m.matmul(pool, &x, o, st),
                    );
                }
            }
        }
    }};
}

/// The 4-bit head (`int4` plan).
#[test]
fn int4_every_level_matches_reference_on_op_cases() {
    grouped_head_matches_reference!(Int4Matrix, from_q4, to_q4, 16, 8u8, 13, "int4");
}

/// The 2-bit head (`int2` plan).
#[test]
fn int2_every_level_matches_reference_on_op_cases() {
    grouped_head_matches_reference!(Int2Matrix, from_q2, to_q2, 4, 0u8, 15, "int2");
}

/// Q4_0-style quantization: per row and group of 32, `d = m / -8` (m the value of largest
/// magnitude, sign kept) stored as f16, `q = round(w / d) + 8` in [0, 15]; the largest value
/// comes back exactly (up to d's f16 rounding), every value within half a step; zero groups
/// give `d = 0`, `q = 8`.
#[test]
fn int4_from_dense_quantizes_per_group() {
    let (rows, cols) = (5, 300);
    let mut rng = Rng::new(14);
    let mut w: Vec<f32> = (0..rows * cols).map(|_| (rng.unit() - 0.5) * 0.1).collect();
    w[2 * cols..3 * cols].fill(0.0); // an all-zero row
    w[3 * cols + 40..3 * cols + 64].fill(0.0); // a zero group but for a few values
    for l in KernelLevel::available() {
        let m = Int4Matrix::from_dense(DenseRef::F32(&w), rows, cols, l);
        let (q, d) = m.to_q4();
        let kcols = cols.div_ceil(kernels::K_ALIGN) * kernels::K_ALIGN;
        let ng = kcols / 32;
        for r in 0..rows {
            for g in 0..ng {
                let lo = g * 32;
                let group: Vec<f32> = (lo..(lo + 32).min(cols)).map(|c| w[r * cols + c]).collect();
                let m_ = group.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let dv = half::f16::from_bits(d[r * ng + g]).to_f32();
                let want_d = if m_ == 0.0 { 0 } else { half::f16::from_f32(m_ / -8.0).to_bits() };
                assert_eq!(d[r * ng + g], want_d, "row {r} group {g}");
                for (i, &v) in group.iter().enumerate() {
                    let qv = q[r * kcols + lo + i];
                    if dv == 0.0 {
                        assert_eq!(qv, 8);
                        continue;
                    }
                    assert_eq!(qv, ((v / dv).round_ties_even() + 8.0).clamp(0.0, 15.0) as u8);
                    // within half a step, except that +8 steps (the group's extreme with the
                    // other sign: `d = m / -8`) clamps to +7, as Q4_0 does
                    let bound = if (v / dv).round_ties_even() > 7.0 { 1.0001 } else { 0.5001 };
                    assert!(((qv as f32 - 8.0) * dv - v).abs() <= bound * dv.abs() + 1e-7, "row {r} col {}", lo + i);
                }
                // padding columns are zeros
                for c in (lo + group.len())..(lo + 32) {
                    assert_eq!(q[r * kcols + c], 8);
                }
            }
        }
    }
}

/// 2-bit quantization: per row and group of 32, `d` is the f16 scale among the candidate
/// fractions of `absmax / 3` with the least squared error, each `q` the nearest of the four
/// levels `d (2q - 3)`; zero groups and padding give `d = 0`, `q = 0`.
#[test]
fn int2_from_dense_picks_the_best_scale_per_group() {
    use bitnet_cpu::kernels::int2::SCALE_FRACTIONS;
    let (rows, cols) = (5, 300);
    let mut rng = Rng::new(16);
    let mut w: Vec<f32> = (0..rows * cols).map(|_| (rng.unit() - 0.5) * 0.1).collect();
    w[2 * cols..3 * cols].fill(0.0); // an all-zero row
    w[3 * cols + 40..3 * cols + 64].fill(0.0); // a zero group but for a few values
    w[4 * cols + 7] = 0.4; // an outlier: a smaller scale wins
    let levels_of = |v: f32, d: f32| ((v / d + 3.0) / 2.0).round_ties_even().clamp(0.0, 3.0) as u8;
    let err =
        |g: &[f32], d: f32| g.iter().map(|&v| (d * (2.0 * levels_of(v, d) as f32 - 3.0) - v).powi(2)).sum::<f32>();
    for l in KernelLevel::available() {
        let m = Int2Matrix::from_dense(DenseRef::F32(&w), rows, cols, l);
        let (q, d) = m.to_q2();
        let kcols = cols.div_ceil(kernels::K_ALIGN) * kernels::K_ALIGN;
        let ng = kcols / 32;
        for r in 0..rows {
            for g in 0..ng {
                let lo = g * 32;
                let group: Vec<f32> = (lo..(lo + 32).min(cols)).map(|c| w[r * cols + c]).collect();
                let amax = group.iter().fold(0f32, |m, &v| m.max(v.abs()));
                let dv = half::f16::from_bits(d[r * ng + g]).to_f32();
                if amax == 0.0 {
                    assert_eq!(d[r * ng + g], 0, "row {r} group {g}");
                } else {
                    let cands: Vec<f32> =
                        SCALE_FRACTIONS.iter().map(|f| half::f16::from_f32(amax * f / 3.0).to_f32()).collect();
                    assert!(cands.contains(&dv), "row {r} group {g}: scale {dv} not a candidate");
                    assert!(cands.iter().all(|&c| err(&group, dv) <= err(&group, c)), "row {r} group {g}");
                }
                for (i, &v) in group.iter().enumerate() {
                    let want = if dv == 0.0 { 0 } else { levels_of(v, dv) };
                    assert_eq!(q[r * kcols + lo + i], want, "row {r} col {}", lo + i);
                }
                for c in (lo + group.len())..(lo + 32) {
                    assert_eq!(q[r * kcols + c], 0, "padding");
                }
            }
        }
        // the outlier's group took a scale below absmax / 3
        let g = 7 / 32;
        assert!(half::f16::from_bits(d[4 * ng + g]).to_f32() < 0.4 / 3.0 * 0.95);
    }
}

/// The quantizers' rounding equals `f32::round_ties_even` up to a zero's sign: ties, both
/// signs, the 2^22 boundary and beyond, infinities and NaN.
#[test]
fn round_ties_even_matches_std() {
    let same = |x: f32| {
        let (got, want) = (kernels::round_ties_even(x), x.round_ties_even());
        assert!(got == want || (got.is_nan() && want.is_nan()), "x {x}: {got} against {want}");
    };
    let mut rng = Rng::new(99);
    for i in -2000..2000 {
        same(i as f32 * 0.25); // every quarter: ties at .5
        same(i as f32 * 0.1);
        same((rng.unit() - 0.5) * 1e3);
    }
    for e in 18..30 {
        let p = (1u32 << e) as f32;
        for x in [p - 1.5, p - 0.5, p, p + 0.5, p + 1.0, p + 1.5] {
            same(x);
            same(-x);
        }
    }
    for x in [0.0, -0.0, 0.5, -0.5, 1.5, -2.5, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        same(x);
    }
}
