//! End to end: `CudaModel` on the repo's golden fixtures (transformers float32 goldens, as
//! bitnet-core's tests/golden.rs reads them) and against the CPU model; batched decode equal to
//! single-sequence decode; CUDA-graph replay equal to the uncaptured step; KV-cache decode equal
//! to a full recompute; device sampling consistent with the logits.
//! Where no CUDA device is usable each test prints "skipped: no CUDA device (...)" and passes.

mod common;

#[cfg(not(feature = "_cuda"))]
#[test]
fn model_skipped() {
    println!("skipped: no CUDA device (built without the cuda feature)");
}

#[cfg(feature = "_cuda")]
mod gpu {
    use super::common::*;
    use bitnet_core::config::{HfConfig, ModelConfig};
    use bitnet_core::model::{LoadOptions, Model};
    use bitnet_core::precision::{KvPrecision, LmHeadPrecision, PrecisionPlan};
    use bitnet_core::sampler::SamplingParams;
    use bitnet_core::weights::random::{preset_config, RandomSource};
    use bitnet_core::weights::safetensors::SafetensorsSource;
    use bitnet_cuda::{CudaModel, CudaOptions, Error};

    /// DESIGN.md / bitnet-core's golden test: ~1e-4 where no int8 activation sits on a rounding
    /// boundary; a flip (the attention output is summed in another order than on the CPU) moves
    /// later logits by ~0.1-0.3.
    const TOL: f64 = 2e-4;
    const FLIP_TOL: f64 = 0.3;

    fn load_fixture(name: &str, opts: &CudaOptions) -> (CudaModel, Model, ModelConfig) {
        let dir = fixture(name);
        let cfg = HfConfig::from_file(&dir.join("config.json")).unwrap().resolve().unwrap();
        let src = SafetensorsSource::open(&dir, &cfg).unwrap();
        let gpu = CudaModel::load(&src, cfg.clone(), opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let cpu =
            Model::load(&src, cfg.clone(), &LoadOptions { threads: 2, plan: opts.plan, ..Default::default() }).unwrap();
        (gpu, cpu, cfg)
    }

    fn cpu_all_logits(m: &Model, ids: &[u32]) -> Vec<f32> {
        let mut cache = m.new_cache(ids.len() + 1, 1, 16);
        let mut s = m.new_scratch(ids.len(), ids.len(), ids.len() + 1);
        let mut seq = cache.new_seq();
        let rows = m.prefill(&mut cache, &mut s, &mut seq, ids, true).unwrap();
        (0..rows).flat_map(|r| s.logits(r).to_vec()).collect()
    }

    fn opts() -> CudaOptions {
        CudaOptions { max_seqs: 8, max_ctx: 192, prefill_chunk: 64, max_logit_rows: 64, ..Default::default() }
    }

    /// Compares logit rows `[T][v]` position by position: within TOL before the first flip,
    /// within FLIP_TOL after, argmax equal wherever the reference margin exceeds FLIP_TOL.
    /// Returns the first flipped position.
    fn compare_rows(what: &str, got: &[f32], want: &[f64], v: usize) -> Option<usize> {
        let t_n = want.len() / v;
        let mut flip = None;
        for t in 0..t_n {
            let (g, w) = (&got[t * v..(t + 1) * v], &want[t * v..(t + 1) * v]);
            let d = max_abs_diff(g, w);
            if d > TOL && flip.is_none() {
                flip = Some(t);
                println!("  {what}: int8 rounding-boundary flip at position {t} ({d:.3})");
            }
            assert!(d < FLIP_TOL, "{what}: position {t} differs by {d}");
            if margin(w) > FLIP_TOL {
                assert_eq!(argmax(g) as usize, argmax64(w), "{what}: argmax at position {t}");
            }
        }
        flip
    }

    fn check_fixture(name: &str) {
        let (mut m, cpu, cfg) = load_fixture(name, &opts());
        println!("{name}: {} | {}", m.device_name(), m.kernel_note());
        let dir = fixture(name);
        let fp32 = Golden::open(&dir.join("golden.safetensors"));
        let v = cfg.vocab_size;
        let greedy = SamplingParams::greedy();
        let mut flipped = 0;
        for p in fp32.prompts() {
            let ids = fp32.ids(&format!("{p}.input_ids"));
            let want = &fp32.get(&format!("{p}.prefill_logits")).1;
            let mut s = m.new_seq().unwrap();
            let got = m.prefill_all_logits(&mut s, &ids).unwrap();
            let flip = compare_rows(&format!("{name} {p} vs transformers"), &got, want, v);
            let cpu_l: Vec<f64> = cpu_all_logits(&cpu, &ids).iter().map(|&x| x as f64).collect();
            let flip_cpu = compare_rows(&format!("{name} {p} vs CPU"), &got, &cpu_l, v);
            println!(
                "{name} {p}: {} tokens, max|dlogit| vs fp32 {:.2e}, vs CPU {:.2e}",
                ids.len(),
                max_abs_diff(&got, want),
                max_abs_diff(&got, &cpu_l)
            );
            // The ceiling below counts prompts with a flip against transformers (in the prefill
            // or, detected below, in a decode step), as bitnet-core's test does.
            let mut flip_tf = flip;
            let flip = flip.or(flip_cpu);

            // greedy with the KV cache: seq a returns logits, seq b samples greedily on the
            // device; both see the same history, so b's ids are a's argmax exactly.
            let want_toks = fp32.ids(&format!("{p}.greedy_tokens"));
            let step_want = &fp32.get(&format!("{p}.greedy_step_logits")).1;
            m.reset_seq(&mut s);
            let mut b = m.new_seq().unwrap();
            let mut logits = m.prefill(&mut s, &ids).unwrap();
            let mut tok = m.prefill_sample(&mut b, &ids, &greedy).unwrap();
            let mut toks = Vec::new();
            let mut steps = Vec::new();
            for i in 0..want_toks.len() {
                assert_eq!(tok, argmax(&logits), "{name} {p}: device greedy id at step {i}");
                toks.push(tok);
                steps.push(logits.clone());
                if i + 1 < want_toks.len() {
                    logits = m.decode_batch_logits(&mut [&mut s], &[tok]).unwrap();
                    tok = m.decode(&mut b, tok, &greedy).unwrap();
                }
            }
            let mut agree = 0;
            let mut flip = flip;
            for (i, (&a, &w)) in toks.iter().zip(&want_toks).enumerate() {
                let wrow = &step_want[i * v..(i + 1) * v];
                let d = max_abs_diff(&steps[i], wrow);
                if d > TOL && flip_tf.is_none() {
                    println!("  {name} {p}: int8 rounding-boundary flip at decode step {i} ({d:.3})");
                    flip_tf = Some(ids.len() + i);
                    flip = flip.or(flip_tf);
                }
                assert!(d < FLIP_TOL, "{name} {p}: step {i} logits differ by {d}");
                if a != w {
                    assert!(
                        flip.is_some() && margin(wrow) < FLIP_TOL,
                        "{name} {p}: greedy step {i}: got {a}, transformers {w} (margin {:.3})",
                        margin(wrow)
                    );
                    println!("  greedy diverges at step {i} after a flip");
                    break;
                }
                agree += 1;
            }
            if flip_tf.is_some() {
                flipped += 1;
            }
            println!("{name} {p}: greedy {agree}/{} tokens equal to transformers", want_toks.len());

            // KV-cache decode == a full recompute of the same sequence, within TOL (the decode
            // and prefill attention kernels sum in different orders, so an int8 activation may
            // round the other way once: then within FLIP_TOL, argmax kept)
            let mut full = ids.clone();
            full.extend_from_slice(&toks[..toks.len() - 1]);
            let mut f = m.new_seq().unwrap();
            let all = m.prefill_all_logits(&mut f, &full).unwrap();
            let first = (ids.len() - 1) * v;
            let recompute: Vec<f64> = all[first..first + steps.len() * v].iter().map(|&x| x as f64).collect();
            compare_rows(&format!("{name} {p} decode vs recompute"), &steps.concat(), &recompute, v);
            m.release(f);
            m.release(b);
            m.release(s);
        }
        assert!(flipped <= 1, "{name}: {flipped} prompts hit rounding-boundary flips");
    }

    #[test]
    fn golden_tiny_gqa4_packed() {
        let Some(_g) = gpu_or_skip() else { return };
        check_fixture("tiny-gqa4-packed");
    }

    #[test]
    fn golden_tiny_gqa4_master() {
        let Some(_g) = gpu_or_skip() else { return };
        check_fixture("tiny-gqa4-master");
    }

    #[test]
    fn golden_tiny_untied_odd_packed() {
        let Some(_g) = gpu_or_skip() else { return };
        check_fixture("tiny-untied-odd-packed");
    }

    #[test]
    fn golden_tiny_untied_odd_master() {
        let Some(_g) = gpu_or_skip() else { return };
        check_fixture("tiny-untied-odd-master");
    }

    fn prompt(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
        let mut r = Rng(seed);
        (0..n).map(|_| r.below(vocab) as u32).collect()
    }

    fn bits_equal(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn batched_decode_equals_single_decode() {
        let Some(_g) = gpu_or_skip() else { return };
        let (mut m, _cpu, cfg) = load_fixture("tiny-gqa4-packed", &opts());
        let v = cfg.vocab_size;
        let prompts: Vec<Vec<u32>> = (0..3).map(|i| prompt(100 + i, 5 + 7 * i as usize, v)).collect();
        let mut batched: Vec<_> = (0..3).map(|_| m.new_seq().unwrap()).collect();
        let mut single: Vec<_> = (0..3).map(|_| m.new_seq().unwrap()).collect();
        let mut next = Vec::new();
        for i in 0..3 {
            let a = m.prefill(&mut batched[i], &prompts[i]).unwrap();
            let b = m.prefill(&mut single[i], &prompts[i]).unwrap();
            assert!(bits_equal(&a, &b));
            next.push(argmax(&a));
        }
        for step in 0..6 {
            let mut refs: Vec<_> = batched.iter_mut().collect();
            let lb = m.decode_batch_logits(&mut refs, &next).unwrap();
            for i in 0..3 {
                let ls = m.decode_batch_logits(&mut [&mut single[i]], &[next[i]]).unwrap();
                assert!(
                    bits_equal(&lb[i * v..(i + 1) * v], &ls),
                    "step {step} sequence {i}: batched logits differ from single"
                );
            }
            next = (0..3).map(|i| argmax(&lb[i * v..(i + 1) * v])).collect();
        }
        assert!(m.captured_buckets().contains(&1) && m.captured_buckets().contains(&4));
    }

    /// Programmatic dependent launch only lets a kernel start early; each still waits for its
    /// predecessor before reading: the results must not change by a bit.
    #[test]
    fn dependent_launch_equals_serialized_launches() {
        let Some(_g) = gpu_or_skip() else { return };
        let run = |pdl: bool| -> (Vec<f32>, Vec<f32>, bool) {
            let (mut m, _cpu, cfg) = load_fixture("tiny-untied-odd-packed", &CudaOptions { pdl, ..opts() });
            let v = cfg.vocab_size;
            let mut out = Vec::new();
            let mut seqs: Vec<_> = (0..3).map(|_| m.new_seq().unwrap()).collect();
            let mut next = Vec::new();
            for (i, s) in seqs.iter_mut().enumerate() {
                let l = m.prefill_all_logits(s, &prompt(300 + i as u64, 9 + 13 * i, v)).unwrap();
                next.push(argmax(&l[l.len() - v..]));
                out.extend_from_slice(&l);
            }
            let mut steps = Vec::new();
            for _ in 0..8 {
                let mut refs: Vec<_> = seqs.iter_mut().collect();
                let l = m.decode_batch_logits(&mut refs, &next).unwrap();
                next = (0..3).map(|i| argmax(&l[i * v..(i + 1) * v])).collect();
                steps.extend_from_slice(&l);
            }
            (out, steps, m.uses_pdl())
        };
        let (pa, da, on) = run(true);
        let (pb, db, off) = run(false);
        assert!(!off);
        println!("pdl available: {on}");
        assert!(bits_equal(&pa, &pb), "prefill logits differ with dependent launch");
        assert!(bits_equal(&da, &db), "decode logits differ with dependent launch");
    }

    #[test]
    fn graph_replay_equals_uncaptured_step() {
        let Some(_g) = gpu_or_skip() else { return };
        let (mut m, _cpu, cfg) = load_fixture("tiny-untied-odd-packed", &opts());
        let v = cfg.vocab_size;
        let sampled = SamplingParams { temperature: 0.8, top_k: 20, top_p: 0.9, ..Default::default() };
        for batch in [1usize, 2, 3, 4] {
            let prompts: Vec<Vec<u32>> = (0..batch).map(|i| prompt(7 + i as u64, 3 + 5 * i, v)).collect();
            let mut eager: Vec<_> = (0..batch).map(|_| m.new_seq().unwrap()).collect();
            let mut graph: Vec<_> = (0..batch).map(|_| m.new_seq().unwrap()).collect();
            let mut next = Vec::new();
            for i in 0..batch {
                let a = m.prefill(&mut eager[i], &prompts[i]).unwrap();
                let b = m.prefill(&mut graph[i], &prompts[i]).unwrap();
                assert!(bits_equal(&a, &b));
                next.push(argmax(&a));
                eager[i].set_seed(40 + i as u64);
                graph[i].set_seed(40 + i as u64);
            }
            for step in 0..5 {
                m.set_use_graphs(false);
                let le = {
                    let mut r: Vec<_> = eager.iter_mut().collect();
                    m.decode_batch_logits(&mut r, &next).unwrap()
                };
                m.set_use_graphs(true);
                let lg = {
                    let mut r: Vec<_> = graph.iter_mut().collect();
                    m.decode_batch_logits(&mut r, &next).unwrap()
                };
                assert!(
                    bits_equal(&le, &lg),
                    "batch {batch} step {step}: graph replay differs from the uncaptured step"
                );
                next = (0..batch).map(|i| argmax(&lg[i * v..(i + 1) * v])).collect();
            }
            // device sampling: same seeds, same draws
            let params = vec![sampled; batch];
            for _ in 0..3 {
                m.set_use_graphs(false);
                let te = {
                    let mut r: Vec<_> = eager.iter_mut().collect();
                    m.decode_batch(&mut r, &next, &params).unwrap()
                };
                m.set_use_graphs(true);
                let tg = {
                    let mut r: Vec<_> = graph.iter_mut().collect();
                    m.decode_batch(&mut r, &next, &params).unwrap()
                };
                assert_eq!(te, tg, "batch {batch}: sampled ids differ");
                next = tg;
            }
            for s in eager.into_iter().chain(graph) {
                m.release(s);
            }
        }
        let caps = m.captured_buckets();
        assert!(caps.contains(&1) && caps.contains(&2) && caps.contains(&4), "{caps:?}");
    }

    /// Chunked prefill of long prompts and a decode batch of 20 (the 32-bucket, 4 token tiles
    /// per matmul) on a random model of the `tiny` preset, against the CPU model.
    #[test]
    fn random_model_matches_cpu() {
        let Some(_g) = gpu_or_skip() else { return };
        let cfg = preset_config("tiny").unwrap().resolve().unwrap();
        let src = RandomSource::new(cfg.clone(), 3);
        let o = CudaOptions { max_seqs: 20, max_ctx: 256, prefill_chunk: 48, max_logit_rows: 32, ..Default::default() };
        let mut m = CudaModel::load(&src, cfg.clone(), &o).unwrap();
        let cpu = Model::load(&src, cfg.clone(), &LoadOptions { threads: 2, ..Default::default() }).unwrap();
        let v = cfg.vocab_size;
        let n = 20;
        let prompts: Vec<Vec<u32>> = (0..n).map(|i| prompt(900 + i as u64, 30 + 7 * i, v)).collect();
        let mut seqs: Vec<_> = (0..n).map(|_| m.new_seq().unwrap()).collect();
        let mut cache = cpu.new_cache(256, n, 16);
        let mut scratch = cpu.new_scratch(64, n, 256);
        let mut cseqs: Vec<_> = (0..n).map(|_| cache.new_seq()).collect();
        let mut next = Vec::new();
        let mut flips = 0;
        for i in 0..n {
            let g = m.prefill(&mut seqs[i], &prompts[i]).unwrap();
            cpu.prefill(&mut cache, &mut scratch, &mut cseqs[i], &prompts[i], false).unwrap();
            let c: Vec<f64> = scratch.logits(0).iter().map(|&x| x as f64).collect();
            if compare_rows(&format!("prefill {i}"), &g, &c, v).is_some() {
                flips += 1;
            }
            next.push(argmax(scratch.logits(0)));
        }
        for step in 0..4 {
            let lg = {
                let mut r: Vec<_> = seqs.iter_mut().collect();
                m.decode_batch_logits(&mut r, &next).unwrap()
            };
            let mut chunks: Vec<bitnet_core::model::SeqChunk> = cseqs
                .iter_mut()
                .zip(&next)
                .map(|(seq, t)| bitnet_core::model::SeqChunk {
                    seq,
                    tokens: std::slice::from_ref(t),
                    logits: bitnet_core::model::Logits::Last,
                })
                .collect();
            cpu.forward(&mut cache, &mut scratch, &mut chunks).unwrap();
            drop(chunks);
            for i in 0..n {
                let c: Vec<f64> = scratch.logits(i).iter().map(|&x| x as f64).collect();
                if compare_rows(&format!("step {step} seq {i}"), &lg[i * v..(i + 1) * v], &c, v).is_some() {
                    flips += 1;
                }
            }
            next = (0..n).map(|i| argmax(scratch.logits(i))).collect();
        }
        // Attention sums in another order than on the CPU, so an int8 activation of the
        // attention output can land on the other side of a rounding boundary (then the rest of
        // that sequence differs by more than TOL, within FLIP_TOL): reported, not bounded.
        println!("{flips} of {} compared rows saw a rounding-boundary flip", n * 5);
    }

    #[test]
    fn f16_kv_cache_matches_cpu() {
        let Some(_g) = gpu_or_skip() else { return };
        let plan = PrecisionPlan {
            name: "f16-kv",
            lm_head: LmHeadPrecision::Stored,
            lm_head_rescore: 0,
            kv_cache: KvPrecision::F16,
        };
        let o = CudaOptions { plan, ..opts() };
        let (mut m, cpu, cfg) = load_fixture("tiny-gqa4-master", &o);
        let v = cfg.vocab_size;
        let ids = prompt(5, 30, v);
        let mut s = m.new_seq().unwrap();
        let got = m.prefill_all_logits(&mut s, &ids).unwrap();
        let want: Vec<f64> = cpu_all_logits(&cpu, &ids).iter().map(|&x| x as f64).collect();
        compare_rows("f16 kv", &got, &want, v);
    }

    #[test]
    fn device_sampling_respects_top_k() {
        let Some(_g) = gpu_or_skip() else { return };
        let (mut m, _cpu, cfg) = load_fixture("tiny-gqa4-packed", &opts());
        let v = cfg.vocab_size;
        let ids = prompt(77, 9, v);
        let mut a = m.new_seq().unwrap();
        let logits = m.prefill(&mut a, &ids).unwrap();
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&x, &y| logits[y].partial_cmp(&logits[x]).unwrap());
        let top5 = &order[..5];
        let p = SamplingParams { temperature: 5.0, top_k: 5, ..Default::default() };
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..40 {
            let mut b = m.new_seq().unwrap();
            b.set_seed(seed);
            let t = m.prefill_sample(&mut b, &ids, &p).unwrap();
            assert!(top5.contains(&(t as usize)), "sampled {t} outside the top 5 {top5:?}");
            seen.insert(t);
            m.release(b);
        }
        assert!(seen.len() >= 2, "40 draws at temperature 5 gave one token");
    }

    #[test]
    fn bad_requests_are_errors() {
        let Some(_g) = gpu_or_skip() else { return };
        let o = CudaOptions { max_seqs: 2, ..opts() };
        let (mut m, _cpu, cfg) = load_fixture("tiny-gqa4-packed", &o);
        let mut a = m.new_seq().unwrap();
        let b = m.new_seq().unwrap();
        assert!(matches!(m.new_seq(), Err(Error::InvalidInput(_))));
        let bad = cfg.vocab_size as u32;
        assert!(matches!(m.prefill(&mut a, &[1, bad]), Err(Error::InvalidInput(_))));
        assert!(matches!(m.prefill(&mut a, &[]), Err(Error::InvalidInput(_))));
        let long = vec![1u32; m.options().max_ctx + 1];
        assert!(matches!(m.prefill(&mut a, &long), Err(Error::InvalidInput(_))));
        let p = SamplingParams { repetition_penalty: 1.2, ..Default::default() };
        assert!(matches!(m.prefill_sample(&mut a, &[1, 2], &p), Err(Error::Unsupported(_))));
        // nothing was consumed by the failed calls
        assert_eq!(a.len(), 0);
        m.prefill(&mut a, &[1, 2, 3]).unwrap();
        assert_eq!(a.len(), 3);
        m.release(a);
        m.release(b);
    }

    /// The prefix cache and every-token logits through `CudaBatch` (the server's view): a
    /// second sequence with the same prompt takes the first one's full blocks and computes only
    /// the rest; truncating into a shared block copies it on the device (the first sequence's
    /// K/V stay as they were); every-token logits come in pieces of `max_logit_rows`.
    #[test]
    fn prefix_cache_and_all_logits_through_the_batch_model() {
        use bitnet_core::batch::{BatchModel, StepChunk};
        use bitnet_cuda::batch::CudaBatch;
        let Some(_g) = gpu_or_skip() else { return };
        let o = CudaOptions { max_logit_rows: 16, kv_blocks: Some(24), ..opts() };
        let (m, cpu, cfg) = load_fixture("tiny-gqa4-packed", &o);
        let v = cfg.vocab_size;
        let mut b = CudaBatch::new(m);
        assert!(b.enable_prefix_cache());
        fn feed(b: &mut CudaBatch, s: usize, t: &[u32]) -> Vec<f32> {
            let len = b.seq_len(s) + t.len();
            b.reserve(s, len).unwrap();
            b.forward(&[StepChunk { seq: s, tokens: t, logits: true, all_logits: false }]).unwrap();
            b.logits(0).to_vec()
        }
        let close = |what: &str, got: &[f32], want: &[f32]| {
            let w: Vec<f64> = want.iter().map(|&x| x as f64).collect();
            println!("{what}: max|d| {:.2e}", max_abs_diff32(got, want));
            compare_rows(what, got, &w, v);
        };
        let toks = prompt(11, 40, v);
        let a = b.new_seq().unwrap();
        let la = feed(&mut b, a, &toks);
        b.publish_prefix(a, &toks);
        assert_eq!(b.used_blocks(), 3);
        // same prompt: two full blocks from A (the last token is always computed)
        let s2 = b.new_seq().unwrap();
        assert_eq!(b.attach_prefix(s2, &toks), 32);
        assert_eq!((b.seq_len(s2), b.used_blocks()), (32, 3));
        let lb = feed(&mut b, s2, &toks[32..]);
        close("prefix hit vs full prefill", &lb, &la);
        // copy on write: B keeps 20 positions (its block 1, shared, is copied), then diverges
        b.truncate(s2, 20);
        assert_eq!(b.seq_len(s2), 20);
        let alt = prompt(12, 12, v);
        let lb2 = feed(&mut b, s2, &alt);
        let fresh: Vec<u32> = toks[..20].iter().chain(&alt).copied().collect();
        let r = b.new_seq().unwrap();
        let lr = feed(&mut b, r, &fresh);
        close("after copy on write vs fresh", &lb2, &lr);
        b.release(r);
        // A's blocks were not touched by B's writes
        let next = argmax(&la);
        let la2 = feed(&mut b, a, &[next]);
        let with_next: Vec<u32> = toks.iter().copied().chain([next]).collect();
        let r = b.new_seq().unwrap();
        let lr2 = feed(&mut b, r, &with_next);
        close("shared sequence after the other's truncation", &la2, &lr2);
        b.release(r);
        b.release(a);
        b.release(s2);
        assert_eq!(b.used_blocks(), 0, "released blocks are free (or parked, counted free)");
        // every-token logits of 40 tokens in pieces of 16, against the CPU model
        let s3 = b.new_seq().unwrap();
        b.reserve(s3, toks.len()).unwrap();
        b.forward(&[StepChunk { seq: s3, tokens: &toks, logits: true, all_logits: true }]).unwrap();
        let got: Vec<f32> = (0..toks.len()).flat_map(|r| b.logits(r).to_vec()).collect();
        let want: Vec<f64> = cpu_all_logits(&cpu, &toks).iter().map(|&x| x as f64).collect();
        println!("all logits vs CPU: max|d| {:.2e}", max_abs_diff(&got, &want));
        compare_rows("all logits vs CPU", &got, &want, v);
        b.release(s3);
    }
}
