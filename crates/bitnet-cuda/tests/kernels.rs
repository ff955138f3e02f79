//! Every CUDA kernel against the CPU reference (bitnet-cpu / bitnet-core) on random inputs:
//! integer dots and everything computed in the same order bit for bit, attention and the LM head
//! (different summation order) within float tolerance, sampling by its exact set semantics.
//! Where no CUDA device is usable each test prints "skipped: no CUDA device (...)" and passes.

mod common;

#[cfg(not(feature = "_cuda"))]
#[test]
fn kernels_skipped() {
    println!("skipped: no CUDA device (built without the cuda feature)");
}

#[cfg(feature = "_cuda")]
mod gpu {
    use super::common::*;
    use bitnet_core::weights::DenseMatrix;
    use bitnet_cpu::{KernelLevel, QuantActs, TernaryMatrix};
    use bitnet_cuda::gpu::DeviceSampleParam;
    use bitnet_cuda::testing::{f32_to_f16_bits, Kernels, KvCase};

    fn kernels(kv_f16: bool) -> Kernels {
        Kernels::new(kv_f16).unwrap_or_else(|e| panic!("CUDA kernels: {e}"))
    }

    /// Random activations for `n` tokens, some rows with outliers, quantized by the CPU.
    fn random_acts(rng: &mut Rng, n: usize, cols: usize) -> QuantActs {
        let mut x = QuantActs::new(n, cols);
        for t in 0..n {
            let row: Vec<f32> = (0..cols)
                .map(|c| {
                    let v = rng.normal();
                    if (c + t) % 97 == 0 {
                        v * 40.0
                    } else {
                        v
                    }
                })
                .collect();
            x.quantize_row(t, &row);
        }
        x.set_n_tok(n);
        x
    }

    fn cpu_matmul(codes: &[i8], rows: usize, cols: usize, scales: &[f32], x: &QuantActs) -> Vec<f32> {
        let m = TernaryMatrix::from_codes(codes, rows, cols, scales.to_vec(), KernelLevel::detect());
        let mut out = vec![0f32; x.n_tok * rows];
        m.matmul_rows(x, &mut out, rows, 0..rows);
        out
    }

    fn assert_bits_eq(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: gpu {g} cpu {w}");
        }
    }

    #[test]
    fn ternary_matmul_is_bit_exact() {
        let Some(_g) = gpu_or_skip() else { return };
        let k = kernels(false);
        let mut rng = Rng(11);
        let cases: &[(usize, usize, &[usize])] = &[
            (3840, 2560, &[1, 9, 32]),
            (2560, 2560, &[1, 4]),
            (13824, 2560, &[1, 17, 200]), // 200: 64-token blocks of ternary_mm_wide (108 x 4 blocks)
            (2560, 6912, &[1, 64]),
            (480, 288, &[1, 2, 8, 16, 33, 64, 100]),
            (37, 300, &[1, 5, 65]),
            (16, 128, &[1, 8]),
            (17, 129, &[3]),
            (1, 1, &[1, 2]),
        ];
        for &(rows, cols, toks) in cases {
            let codes: Vec<i8> = (0..rows * cols).map(|_| rng.code()).collect();
            // fused matrices carry one scale per part: vary them by row
            let scales: Vec<f32> = (0..rows).map(|r| 0.5 + (r % 7) as f32 * 0.25).collect();
            for &n in toks {
                let x = random_acts(&mut rng, n, cols);
                let want = cpu_matmul(&codes, rows, cols, &scales, &x);
                let got = k.ternary_matmul(&codes, rows, cols, &scales, &x, None).unwrap();
                assert_bits_eq(&got, &want, &format!("{rows}x{cols}, {n} tokens"));
                println!("{rows}x{cols} x {n} tokens: bit-exact");
            }
        }
        // the residual-add epilogue: x + y exactly as the CPU's add_rows
        let (rows, cols, n) = (96, 256, 3);
        let codes: Vec<i8> = (0..rows * cols).map(|_| rng.code()).collect();
        let scales = vec![1.25f32; rows];
        let x = random_acts(&mut rng, n, cols);
        let init: Vec<f32> = (0..n * rows).map(|_| rng.normal()).collect();
        let y = cpu_matmul(&codes, rows, cols, &scales, &x);
        let want: Vec<f32> = init.iter().zip(&y).map(|(a, b)| a + b).collect();
        let got = k.ternary_matmul(&codes, rows, cols, &scales, &x, Some(&init)).unwrap();
        assert_bits_eq(&got, &want, "accumulate");
    }

    #[test]
    fn ternary_matmul_extremes() {
        let Some(_g) = gpu_or_skip() else { return };
        let k = kernels(false);
        // every code +-1 against activations at the int8 bounds: the largest sums there are
        for (code, act) in [(1i8, -128i8), (-1, -128), (1, 127), (-1, 127)] {
            let (rows, cols) = (32, 6912);
            let codes = vec![code; rows * cols];
            let mut x = QuantActs::new(2, cols);
            for t in 0..2 {
                x.q[t * x.stride..t * x.stride + cols].fill(act);
                x.sum[t] = act as i32 * cols as i32;
                x.scale[t] = 1.0;
            }
            x.set_n_tok(2);
            let got = k.ternary_matmul(&codes, rows, cols, &vec![1.0; rows], &x, None).unwrap();
            let want = (code as i32 * act as i32 * cols as i32) as f32;
            assert!(got.iter().all(|&v| v == want), "{code} x {act}: {:?}", &got[..4]);
        }
    }

    fn cpu_norm_quant(x: &[f32], w: &[f32], eps: f32, stride_cols: usize) -> QuantActs {
        let d = w.len();
        let n = x.len() / d;
        let mut acts = QuantActs::new(n, stride_cols);
        let mut tmp = vec![0f32; d];
        let stride = acts.stride;
        for t in 0..n {
            let q = &mut acts.q[t * stride..(t + 1) * stride];
            (acts.scale[t], acts.sum[t]) =
                bitnet_core::model::norm::rms_norm_quant_into(&x[t * d..(t + 1) * d], w, eps, &mut tmp, q);
        }
        acts.set_n_tok(n);
        acts
    }

    #[test]
    fn rmsnorm_quant_is_bit_exact() {
        let Some(_g) = gpu_or_skip() else { return };
        let k = kernels(false);
        let mut rng = Rng(5);
        for &(d, n) in &[(2560usize, 3usize), (6912, 2), (288, 5), (100, 1), (2560, 40)] {
            let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.1 * rng.normal()).collect();
            let mut x: Vec<f32> = (0..n * d).map(|_| rng.normal() * 3.0).collect();
            x[1] = 250.0; // an outlier row element
            if n > 1 {
                // an all-zero row: amax clamps to 1e-5
                x[d..2 * d].fill(0.0);
            }
            let want = cpu_norm_quant(&x, &w, 1e-5, d);
            let got = k.rmsnorm_quant(&x, d, n, &w, d, 1e-5, false).unwrap();
            for t in 0..n {
                assert_eq!(got.scale[t].to_bits(), want.scale[t].to_bits(), "d {d} token {t}: scale");
                assert_eq!(got.sum[t], want.sum[t], "d {d} token {t}: sum");
                assert_eq!(&got.q[t * got.stride..t * got.stride + d], &want.row(t)[..d], "d {d} token {t}: q");
                assert!(got.q[t * got.stride + d..(t + 1) * got.stride].iter().all(|&v| v == 0), "padding not zeroed");
            }
            println!("rmsnorm+quant d {d} x {n}: bit-exact");
        }
    }

    #[test]
    fn relu2_norm_quant_is_bit_exact() {
        let Some(_g) = gpu_or_skip() else { return };
        let k = kernels(false);
        let mut rng = Rng(6);
        for &(d, n) in &[(6912usize, 2usize), (480, 3), (768, 1)] {
            let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.1 * rng.normal()).collect();
            let gate_up: Vec<f32> = (0..n * 2 * d).map(|_| rng.normal() * 2.0).collect();
            let mut mid = vec![0f32; n * d];
            for t in 0..n {
                bitnet_core::model::mlp::relu2_mul(&gate_up[t * 2 * d..(t + 1) * 2 * d], &mut mid[t * d..(t + 1) * d]);
            }
            let want = cpu_norm_quant(&mid, &w, 1e-6, d);
            let got = k.rmsnorm_quant(&gate_up, 2 * d, n, &w, d, 1e-6, true).unwrap();
            for t in 0..n {
                assert_eq!(got.scale[t].to_bits(), want.scale[t].to_bits(), "scale");
                assert_eq!(got.sum[t], want.sum[t], "sum");
                assert_eq!(&got.q[t * got.stride..t * got.stride + d], &want.row(t)[..d]);
            }
        }
    }

    #[test]
    fn final_norm_matches_cpu() {
        let Some(_g) = gpu_or_skip() else { return };
        let k = kernels(false);
        let mut rng = Rng(7);
        let (d, n) = (2560, 6);
        let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.1 * rng.normal()).collect();
        let x: Vec<f32> = (0..n * d).map(|_| rng.normal() * 5.0).collect();
        let got = k.rmsnorm_f32(&x, 2, 3, &w, d, 1e-5).unwrap();
        let mut want = vec![0f32; d];
        for i in 0..3 {
            bitnet_core::model::norm::rms_norm(&x[(2 + i) * d..(3 + i) * d], &w, 1e-5, &mut want);
            assert_bits_eq(&got[i * d..(i + 1) * d], &want, "final norm");
        }
    }

    #[test]
    fn embedding_is_exact() {
        let Some(_g) = gpu_or_skip() else { return };
        let k = kernels(false);
        let mut rng = Rng(8);
        let (rows, cols) = (50, 72);
        let f: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
        let mats = [
            DenseMatrix::F32 { rows, cols, data: f.clone() },
            DenseMatrix::F16 { rows, cols, data: f.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect() },
            DenseMatrix::BF16 { rows, cols, data: f.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect() },
        ];
        let toks = [0u32, 49, 7, 7, 13];
        for m in &mats {
            let got = k.embed(m, &toks).unwrap();
            let mut want = vec![0f32; cols];
            for (i, &t) in toks.iter().enumerate() {
                m.row_to_f32(t as usize, &mut want);
                assert_bits_eq(&got[i * cols..(i + 1) * cols], &want, "embedding");
            }
        }
    }

    /// A cache with a shuffled block table: `n_slots` sequences of up to `max_blocks` blocks.
    fn kv_case(
        rng: &mut Rng,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        n_slots: usize,
        max_blocks: usize,
    ) -> KvCase {
        let n_blocks = n_slots * max_blocks + 1;
        let mut ids: Vec<i32> = (0..n_blocks as i32).collect();
        for i in (1..ids.len()).rev() {
            let j = rng.below(i + 1);
            ids.swap(i, j);
        }
        let block_table = ids[..n_slots * max_blocks].to_vec();
        let kv_dim = n_kv_heads * head_dim;
        let n = n_blocks * block_size * kv_dim;
        KvCase {
            n_heads,
            n_kv_heads,
            head_dim,
            block_size,
            n_blocks,
            block_table,
            max_blocks,
            k: (0..n).map(|_| rng.normal()).collect(),
            v: (0..n).map(|_| rng.normal()).collect(),
        }
    }

    fn kv_at(c: &KvCase, which: &[f32], slot: usize, p: usize, kvh: usize, f16: bool) -> Vec<f64> {
        let kv_dim = c.n_kv_heads * c.head_dim;
        let b = c.block_table[slot * c.max_blocks + p / c.block_size] as usize;
        let off = (b * c.block_size + p % c.block_size) * kv_dim + kvh * c.head_dim;
        which[off..off + c.head_dim]
            .iter()
            .map(|&v| if f16 { bitnet_cpu::dense::f16_to_f32(f32_to_f16_bits(v)) as f64 } else { v as f64 })
            .collect()
    }

    /// float64 causal attention of one token.
    fn ref_attention(c: &KvCase, q: &[f32], slot: usize, pos: usize, f16: bool) -> Vec<f64> {
        let hd = c.head_dim;
        let g = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0f64; c.n_heads * hd];
        for h in 0..c.n_heads {
            let kvh = h / g;
            let qh = &q[h * hd..(h + 1) * hd];
            let scores: Vec<f64> = (0..=pos)
                .map(|p| {
                    let k = kv_at(c, &c.k, slot, p, kvh, f16);
                    qh.iter().zip(&k).map(|(&a, &b)| a as f64 * b).sum::<f64>() * scale
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            for (p, ep) in e.iter().enumerate() {
                let v = kv_at(c, &c.v, slot, p, kvh, f16);
                for d in 0..hd {
                    out[h * hd + d] += ep / z * v[d];
                }
            }
        }
        out
    }

    fn check_attention(kv_f16: bool) {
        let k = kernels(kv_f16);
        let mut rng = Rng(21 + kv_f16 as u64);
        // (heads, kv heads, head_dim, block size)
        for &(nh, nkv, hd, bs) in &[(8usize, 2usize, 32usize, 16usize), (20, 5, 128, 16), (9, 3, 32, 7), (4, 4, 64, 32)]
        {
            let max_ctx: usize = 700;
            let max_blocks = max_ctx.div_ceil(bs);
            let n_slots = 3;
            let case = kv_case(&mut rng, nh, nkv, hd, bs, n_slots, max_blocks);
            let q_dim = nh * hd;
            let stride = q_dim + 2 * nkv * hd;
            // decode: tokens of different sequences at different positions (split edges too),
            // with the smallest split and a bigger one
            let toks: Vec<(i32, i32)> =
                vec![(0, 0), (1, 16), (2, 255), (0, 256), (1, 257), (2, 699), (0, 511), (1, 63), (2, 64)];
            let qkv: Vec<f32> = (0..toks.len() * stride).map(|_| rng.normal()).collect();
            let pos: Vec<i32> = toks.iter().map(|t| t.1).collect();
            let slot: Vec<i32> = toks.iter().map(|t| t.0).collect();
            for split in [bitnet_cuda::testing::ATT_SPLIT, 256] {
                let got = k.attention(&case, &qkv, &pos, &slot, false, split).unwrap();
                for (i, &(s, p)) in toks.iter().enumerate() {
                    let want =
                        ref_attention(&case, &qkv[i * stride..i * stride + q_dim], s as usize, p as usize, kv_f16);
                    let d = max_abs_diff(&got[i * q_dim..(i + 1) * q_dim], &want);
                    assert!(
                        d < 2e-5,
                        "decode {nh}/{nkv}x{hd} bs {bs} split {split}: token {i} (pos {p}) differs by {d}"
                    );
                }
            }
            // prefill: one sequence, consecutive positions continuing at p0
            for &(p0, n) in &[(0usize, 1usize), (0, 17), (5, 16), (300, 40), (640, 60), (0, 130), (100, 200)] {
                let qkv: Vec<f32> = (0..n * stride).map(|_| rng.normal()).collect();
                let pos: Vec<i32> = (0..n).map(|i| (p0 + i) as i32).collect();
                let slot = vec![1i32; n];
                let got = k.attention(&case, &qkv, &pos, &slot, true, bitnet_cuda::testing::ATT_SPLIT).unwrap();
                for i in 0..n {
                    let want = ref_attention(&case, &qkv[i * stride..i * stride + q_dim], 1, p0 + i, kv_f16);
                    let d = max_abs_diff(&got[i * q_dim..(i + 1) * q_dim], &want);
                    assert!(d < 2e-5, "prefill {nh}/{nkv}x{hd}: p0 {p0} token {i} differs by {d}");
                }
            }
            println!("attention {nh}/{nkv} heads x {hd}, block {bs}, kv_f16 {kv_f16}: ok");
        }
    }

    #[test]
    fn attention_matches_reference() {
        let Some(_g) = gpu_or_skip() else { return };
        check_attention(false);
    }

    #[test]
    fn attention_f16_cache_matches_reference() {
        let Some(_g) = gpu_or_skip() else { return };
        check_attention(true);
    }

    #[test]
    fn rope_and_kv_write_are_exact() {
        let Some(_g) = gpu_or_skip() else { return };
        for kv_f16 in [false, true] {
            let k = kernels(kv_f16);
            let mut rng = Rng(31);
            let (nh, nkv, hd, bs) = (20, 5, 128, 16);
            let max_pos: usize = 300;
            let case = kv_case(&mut rng, nh, nkv, hd, bs, 2, max_pos.div_ceil(bs));
            let rope = bitnet_core::model::rope::Rope::new(hd, 500000.0, max_pos);
            let half = hd / 2;
            let (mut cos, mut sin) = (vec![0f32; max_pos * half], vec![0f32; max_pos * half]);
            let mut v = vec![0f32; hd];
            for p in 0..max_pos {
                v[..half].fill(1.0);
                v[half..].fill(0.0);
                rope.apply(&mut v, p);
                cos[p * half..(p + 1) * half].copy_from_slice(&v[..half]);
                sin[p * half..(p + 1) * half].copy_from_slice(&v[half..]);
            }
            let q_dim = nh * hd;
            let kv_dim = nkv * hd;
            let stride = q_dim + 2 * kv_dim;
            let toks = [(0i32, 0i32), (1, 5), (0, 17), (1, 299)];
            let qkv: Vec<f32> = (0..toks.len() * stride).map(|_| rng.normal()).collect();
            let pos: Vec<i32> = toks.iter().map(|t| t.1).collect();
            let slot: Vec<i32> = toks.iter().map(|t| t.0).collect();
            let (got, kc, vc) = k.rope_kv(&case, &qkv, &pos, &slot, &cos, &sin).unwrap();
            for (i, &(s, p)) in toks.iter().enumerate() {
                let mut want = qkv[i * stride..(i + 1) * stride].to_vec();
                let (q, rest) = want.split_at_mut(q_dim);
                rope.apply(q, p as usize);
                rope.apply(&mut rest[..kv_dim], p as usize);
                assert_bits_eq(&got[i * stride..(i + 1) * stride], &want, "rope");
                let b = case.block_table[s as usize * case.max_blocks + p as usize / bs] as usize;
                let off = (b * bs + p as usize % bs) * kv_dim;
                for j in 0..kv_dim {
                    let (kw, vw) = (want[q_dim + j], want[q_dim + kv_dim + j]);
                    let (kw, vw) = if kv_f16 {
                        (half::f16::from_f32(kw).to_f32(), half::f16::from_f32(vw).to_f32())
                    } else {
                        (kw, vw)
                    };
                    assert_eq!(kc[off + j].to_bits(), kw.to_bits(), "k cache");
                    assert_eq!(vc[off + j].to_bits(), vw.to_bits(), "v cache");
                }
            }
        }
    }

    #[test]
    fn lm_head_matches_cpu() {
        let Some(_g) = gpu_or_skip() else { return };
        let k = kernels(false);
        let mut rng = Rng(41);
        for &(vocab, hidden) in &[(3001usize, 256usize), (515, 288), (100, 100), (128, 2560)] {
            let f: Vec<f32> = (0..vocab * hidden).map(|_| rng.normal() * 0.05).collect();
            let mats = [
                DenseMatrix::F32 { rows: vocab, cols: hidden, data: f.clone() },
                DenseMatrix::F16 {
                    rows: vocab,
                    cols: hidden,
                    data: f.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect(),
                },
                DenseMatrix::BF16 {
                    rows: vocab,
                    cols: hidden,
                    data: f.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect(),
                },
            ];
            for m in &mats {
                for &n in &[1usize, 3, 8, 11, 33, 64] {
                    let x: Vec<f32> = (0..n * hidden).map(|_| rng.normal()).collect();
                    let got = k.lm_head(m, &x, n).unwrap();
                    let mut row = vec![0f32; hidden];
                    for t in 0..n {
                        for v in 0..vocab {
                            m.row_to_f32(v, &mut row);
                            let xt = &x[t * hidden..(t + 1) * hidden];
                            let want: f64 = row.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                            let mag: f64 = row.iter().zip(xt).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                            let g = got[t * vocab + v] as f64;
                            assert!(
                                (g - want).abs() <= 1e-5 * mag + 1e-6,
                                "{:?} {vocab}x{hidden} row {t} vocab {v}: {g} vs {want}",
                                m.dtype()
                            );
                        }
                    }
                }
            }
        }
    }

    fn sp(temperature: f32, top_k: i32, top_p: f32, u: f32) -> DeviceSampleParam {
        DeviceSampleParam { temperature, top_k, top_p, u }
    }

    #[test]
    fn greedy_sampling_is_the_cpu_argmax() {
        let Some(_g) = gpu_or_skip() else { return };
        let k = kernels(false);
        let mut rng = Rng(51);
        let vocab = 128256;
        let mut rows: Vec<Vec<f32>> = Vec::new();
        for _ in 0..4 {
            rows.push((0..vocab).map(|_| rng.normal() * 3.0).collect());
        }
        // ties: the lowest id wins
        let mut r = vec![0f32; vocab];
        r[77] = 5.0;
        r[70000] = 5.0;
        r[76] = 4.0;
        rows.push(r);
        // NaN never wins
        let mut r: Vec<f32> = (0..vocab).map(|_| rng.normal()).collect();
        r[3] = f32::NAN;
        r[9] = 100.0;
        r[10] = f32::NAN;
        rows.push(r);
        // everything -inf: 0
        rows.push(vec![f32::NEG_INFINITY; vocab]);
        let logits: Vec<f32> = rows.concat();
        let params: Vec<DeviceSampleParam> =
            (0..rows.len()).map(|i| if i % 2 == 0 { sp(0.0, 0, 1.0, 0.5) } else { sp(0.8, 1, 0.9, 0.3) }).collect();
        let got = k.sample(&logits, vocab, &params).unwrap();
        let want: Vec<u32> = rows
            .iter()
            .map(|r| {
                let mut best = 0usize;
                let mut bv = f32::NEG_INFINITY;
                for (i, &v) in r.iter().enumerate() {
                    if v > bv {
                        bv = v;
                        best = i;
                    }
                }
                best as u32
            })
            .collect();
        assert_eq!(got, want);
        assert_eq!(got[4], 77);
        assert_eq!(got[5], 9);
        assert_eq!(got[6], 0);
    }

    /// The ids a top-k / top-p draw may return, by the definition in kernels.cu: logits >= the
    /// k-th largest; then the largest threshold whose set keeps `slack * top_p` of the mass
    /// (the kernel sums in f32: a slack of 1 +- 1e-4 gives the smallest and largest set it may
    /// settle on).
    fn allowed_set(row: &[f32], t: f32, top_k: usize, top_p: f32, slack: f64) -> Vec<usize> {
        let mut sorted: Vec<f32> = row.iter().cloned().filter(|v| !v.is_nan()).collect();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let mut th = f32::NEG_INFINITY;
        if top_k > 0 && top_k < sorted.len() {
            th = sorted[top_k - 1];
        }
        let mx = sorted[0] as f64;
        let w = |v: f32| ((v as f64 - mx) / t as f64).exp();
        if top_p < 1.0 {
            let z: f64 = sorted.iter().filter(|&&v| v >= th).map(|&v| w(v)).sum();
            let mut acc = 0.0;
            for &v in &sorted {
                if v < th {
                    break;
                }
                acc += w(v);
                if acc >= top_p as f64 * z * slack {
                    th = v;
                    break;
                }
            }
        }
        (0..row.len()).filter(|&i| row[i] >= th).collect()
    }

    #[test]
    fn topk_topp_sampling_draws_from_the_right_set() {
        let Some(_g) = gpu_or_skip() else { return };
        let k = kernels(false);
        let mut rng = Rng(61);
        let vocab = 5000;
        let row: Vec<f32> = (0..vocab).map(|_| rng.normal() * 2.0).collect();
        for &(t, top_k, top_p) in
            &[(1.0f32, 50usize, 1.0f32), (0.7, 0, 0.9), (1.3, 200, 0.5), (1.0, 3, 1.0), (0.5, 0, 1.0)]
        {
            let small = allowed_set(&row, t, top_k, top_p, 1.0 - 1e-4);
            let set = allowed_set(&row, t, top_k, top_p, 1.0 + 1e-4);
            // u = 0 draws the smallest id of the set, u -> 1 the largest
            let n = 400;
            let us: Vec<f32> = (0..n).map(|i| (i as f32 + 0.5) / n as f32).chain([0.0, 0.999_999]).collect();
            let logits: Vec<f32> = us.iter().flat_map(|_| row.iter().cloned()).collect();
            let params: Vec<DeviceSampleParam> = us.iter().map(|&u| sp(t, top_k as i32, top_p, u)).collect();
            let got = k.sample(&logits, vocab, &params).unwrap();
            for &id in &got {
                assert!(
                    set.binary_search(&(id as usize)).is_ok(),
                    "T {t} k {top_k} p {top_p}: id {id} outside the set"
                );
            }
            let (lo, hi) = (got[n] as usize, got[n + 1] as usize);
            assert!(lo == set[0] || lo == small[0], "u = 0 drew {lo}");
            assert!(hi == *set.last().unwrap() || hi == *small.last().unwrap(), "u -> 1 drew {hi}");
            // draws ordered by u are non-decreasing ids (inverse CDF in id order)
            assert!(got[..n].windows(2).all(|w| w[0] <= w[1]));
            // the empirical mass of the most likely token is close to its probability
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let top = row.iter().position(|&v| v == mx).unwrap();
            let z: f64 = set.iter().map(|&i| ((row[i] - mx) as f64 / t as f64).exp()).sum();
            let p_top = 1.0 / z;
            let emp = got[..n].iter().filter(|&&id| id as usize == top).count() as f64 / n as f64;
            assert!((emp - p_top).abs() < 0.01 + 2.0 / n as f64, "p(top) {p_top} vs {emp}");
            println!("T {t} top_k {top_k} top_p {top_p}: set of {} ids, p(top) {p_top:.3} drawn {emp:.3}", set.len());
        }
    }
}
