//! What the `fast`, `int8` and `int4` precision plans cost in accuracy on the golden fixtures (printed, and bounded
//! so a regression shows): max |logit diff| against transformers float32 and top-1 agreement.
//! `cargo test --release -p bitnet-core --test precision -- --nocapture` prints the table that the
//! README quotes.

mod common;
use common::*;

use bitnet_core::model::{LoadOptions, Model};
use bitnet_core::precision::PrecisionPlan;

/// A model's every-position logits against transformers float32 over the fixture's prompts:
/// (max |dlogit|, mean |dlogit|, positions whose top-1 agrees, positions).
fn against_fp32(m: &Model, fp32: &Golden) -> (f64, f64, usize, usize) {
    let v = m.cfg.vocab_size;
    let (mut maxd, mut agree, mut total, mut sumd, mut n) = (0f64, 0, 0, 0f64, 0usize);
    for p in fp32.prompts() {
        let ids = fp32.ids(&format!("{p}.input_ids"));
        let got = all_logits(m, &ids);
        let want = &fp32.get(&format!("{p}.prefill_logits")).1;
        maxd = maxd.max(max_abs_diff(&got, want));
        sumd += got.iter().zip(want.iter()).map(|(&g, &w)| (g as f64 - w).abs()).sum::<f64>();
        n += got.len();
        for t in 0..ids.len() {
            let w = &want[t * v..(t + 1) * v];
            let best = w.iter().enumerate().fold(0, |b, (i, &x)| if x > w[b] { i } else { b });
            agree += usize::from(argmax(&got[t * v..(t + 1) * v]) as usize == best);
            total += 1;
        }
    }
    (maxd, sumd / n as f64, agree, total)
}

#[test]
fn fast_plan_accuracy() {
    for name in ["tiny-gqa4-master", "tiny-gqa4-packed", "tiny-untied-odd-master", "tiny-untied-odd-packed"] {
        let dir = repo_fixture(name);
        let fp32 = Golden::open(&dir.join("golden.safetensors"));
        for plan in PrecisionPlan::PRESETS {
            let m = load_dir(&dir, &LoadOptions { threads: 2, plan, ..Default::default() });
            let (maxd, mean, agree, total) = against_fp32(&m, &fp32);
            let rate = agree as f64 / total as f64;
            println!(
                "{name:24} plan {:5}: max|dlogit| {maxd:.4}, mean {mean:.4}, top-1 agreement {agree}/{total} ({:.1}%)",
                plan.name,
                100.0 * rate
            );
            match plan.name {
                "exact" => assert!(maxd < 0.3 && rate > 0.97, "{name} exact: {maxd} {rate}"),
                // 4 bits per weight: the largest logit error of the presets (README)
                "int4" => assert!(maxd < 3.0 && rate > 0.75, "{name} int4: {maxd} {rate}"),
                // 2 bits: only the recomputed top logits are accurate, the rest are a ranking
                "int2" => assert!(maxd < 12.0 && rate > 0.75, "{name} int2: {maxd} {rate}"),
                _ => assert!(maxd < 1.0 && rate > 0.85, "{name} {}: {maxd} {rate}", plan.name),
            }
        }
    }
}

/// What the KV cache's element type alone costs: the exact plan (stored-dtype head) with an f32,
/// f16 and int8 cache, against transformers float32 (printed: the README's table).
#[test]
fn kv_cache_accuracy() {
    use bitnet_core::precision::KvPrecision;
    for name in ["tiny-gqa4-master", "tiny-gqa4-packed", "tiny-untied-odd-master", "tiny-untied-odd-packed"] {
        let dir = repo_fixture(name);
        let fp32 = Golden::open(&dir.join("golden.safetensors"));
        for kv in [KvPrecision::F32, KvPrecision::F16, KvPrecision::Int8] {
            let plan = PrecisionPlan { name: "exact-kv", kv_cache: kv, ..PrecisionPlan::EXACT };
            let m = load_dir(&dir, &LoadOptions { threads: 2, plan, ..Default::default() });
            let (maxd, mean, agree, total) = against_fp32(&m, &fp32);
            let rate = agree as f64 / total as f64;
            println!("{name:24} kv {kv:?}: max|dlogit| {maxd:.4}, mean {mean:.4}, top-1 agreement {agree}/{total}");
            match kv {
                KvPrecision::F32 => assert!(maxd < 0.3 && rate > 0.97, "{name} f32 KV: {maxd} {rate}"),
                KvPrecision::F16 => assert!(maxd < 1.0 && rate > 0.9, "{name} f16 KV: {maxd} {rate}"),
                // measured 0.66-1.40 (f16: 0.36-0.69): these tiny models turn any perturbation into
                // int8 activation flips, so both are far above the caches' own rounding
                KvPrecision::Int8 => assert!(maxd < 2.5 && rate > 0.85, "{name} int8 KV: {maxd} {rate}"),
            }
        }
    }
}

/// The rank (0 = first) of `id` in `row` by the rescoring order: larger logit, ties to the lower id.
fn rank_of(row: &[f32], id: usize) -> usize {
    let v = row[id];
    row.iter().enumerate().filter(|&(i, &x)| x.total_cmp(&v).is_gt() || (x.total_cmp(&v).is_eq() && i < id)).count()
}

/// With the KV cache in f32 the hidden states of every plan are the exact plan's (the ternary
/// matmuls are exact in all of them), so a quantized head's rescored logits must equal the
/// exact plan's bit for bit: every id among the quantized head's top `k` of a row (its preset's), at
/// every position, for 1 and 3 threads. Prints how far down the quantized head ranks the exact
/// top-1 (the README's figure for choosing `RESCORE_TOP`; the 2-bit head's 256 cover half of
/// these tiny vocabularies, so its figure here says little).
#[test]
fn rescored_logits_are_the_exact_ones() {
    use bitnet_core::precision::{KvPrecision, LmHeadPrecision, RESCORE_TOP, RESCORE_TOP_INT2};
    let mut worst = 0;
    for name in ["tiny-gqa4-master", "tiny-untied-odd-packed"] {
        let dir = repo_fixture(name);
        let fp32 = Golden::open(&dir.join("golden.safetensors"));
        let exact = load_dir(&dir, &LoadOptions { threads: 2, ..Default::default() });
        let v = exact.cfg.vocab_size;
        for head in
            [LmHeadPrecision::Int8, LmHeadPrecision::Int8Int8, LmHeadPrecision::Int4Int8, LmHeadPrecision::Int2Int8]
        {
            let plan =
                |k| PrecisionPlan { name: "test", lm_head: head, lm_head_rescore: k, kv_cache: KvPrecision::F32 };
            let k = if head == LmHeadPrecision::Int2Int8 { RESCORE_TOP_INT2 } else { RESCORE_TOP };
            let raw = load_dir(&dir, &LoadOptions { threads: 2, plan: plan(0), ..Default::default() });
            let (mut max_rank, mut positions) = (0, 0);
            for p in fp32.prompts() {
                let ids = fp32.ids(&format!("{p}.input_ids"));
                let want = all_logits(&exact, &ids);
                let approx = all_logits(&raw, &ids);
                for threads in [1, 3] {
                    let m = load_dir(&dir, &LoadOptions { threads, plan: plan(k), ..Default::default() });
                    let got = all_logits(&m, &ids);
                    for t in 0..ids.len() {
                        let (w, a, g) =
                            (&want[t * v..(t + 1) * v], &approx[t * v..(t + 1) * v], &got[t * v..(t + 1) * v]);
                        for id in (0..v).filter(|&id| rank_of(a, id) < k) {
                            assert_eq!(
                                g[id].to_bits(),
                                w[id].to_bits(),
                                "{name} {head:?} {p} t{t} id {id} threads {threads}"
                            );
                        }
                        let best = argmax(w) as usize;
                        assert_eq!(argmax(g) as usize, best, "{name} {head:?} {p} t{t}: top-1 differs from exact");
                        if threads == 1 {
                            max_rank = max_rank.max(rank_of(a, best));
                            positions += 1;
                        }
                    }
                }
            }
            println!(
                "{name:24} {head:?}: exact top-1 ranked at most {} (1 = first) by the quantized head over {positions} positions",
                max_rank + 1
            );
            if head != LmHeadPrecision::Int2Int8 {
                worst = worst.max(max_rank);
            }
        }
    }
    assert!(worst < RESCORE_TOP / 4, "exact top-1 ranked {} by a quantized head: RESCORE_TOP too small?", worst + 1);
}

/// The same ranking on 2B-4T's shapes (128,256-entry vocabulary; random weights, so logits
/// closer together than a trained model's): how far down each quantized head ranks the exact
/// top-1 over 64 positions of a prefill, which must lie within the preset's rescored count. Slow
/// (builds five 2B models):
/// `cargo test --release -p bitnet-core --test precision -- --ignored --nocapture`.
#[test]
#[ignore]
fn exact_top1_rank_on_2b_4t_shapes() {
    use bitnet_core::engine::{Engine, EngineOptions};
    use bitnet_core::precision::{KvPrecision, LmHeadPrecision, RESCORE_TOP, RESCORE_TOP_INT2};
    let load = |plan| Engine::load("random:2b-4t", &EngineOptions { threads: 2, plan, ..Default::default() }).unwrap();
    let ids: Vec<u32> = (0..64u32).map(|i| (i * 7919 + 13) % 128_256).collect();
    let want = all_logits(&load(PrecisionPlan::EXACT).model, &ids);
    let v = want.len() / ids.len();
    for head in [LmHeadPrecision::Int8, LmHeadPrecision::Int8Int8, LmHeadPrecision::Int4Int8, LmHeadPrecision::Int2Int8]
    {
        let plan = PrecisionPlan { name: "test", lm_head: head, lm_head_rescore: 0, kv_cache: KvPrecision::F32 };
        let got = all_logits(&load(plan).model, &ids);
        let mut ranks: Vec<usize> = (0..ids.len())
            .map(|t| {
                let (w, g) = (&want[t * v..(t + 1) * v], &got[t * v..(t + 1) * v]);
                rank_of(g, argmax(w) as usize) + 1
            })
            .collect();
        ranks.sort_unstable();
        let k = if head == LmHeadPrecision::Int2Int8 { RESCORE_TOP_INT2 } else { RESCORE_TOP };
        assert!(ranks[ranks.len() - 1] <= k, "{head:?}: the exact top-1 fell outside the preset's {k} rescored");
        println!(
            "random:2b-4t {head:?}: exact top-1 ranked first at {} of {} positions, median {}, at most {}",
            ranks.iter().filter(|&&r| r == 1).count(),
            ranks.len(),
            ranks[ranks.len() / 2],
            ranks[ranks.len() - 1]
        );
    }
}
