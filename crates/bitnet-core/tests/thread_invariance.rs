//! Logits do not depend on the number of compute threads: every thread count splits the
//! matmul rows and the attention work differently (in one-sequence decode, attention's shares
//! cut kv heads' query-head groups apart at different places), and each row's arithmetic is
//! the same however it is split, so the logits must agree bit for bit.

mod common;

use bitnet_core::model::{LoadOptions, Model};
use bitnet_core::precision::PrecisionPlan;
use common::{argmax, load_dir, repo_fixture};

/// Every position's logits of a 40-token prefill, then 8 greedy decode steps' logits.
fn run(m: &Model) -> Vec<u32> {
    let prompt: Vec<u32> = (0..40).map(|i| (i * 53 + 7) % 600).collect();
    let mut cache = m.new_cache(64, 1, 16);
    let mut s = m.new_scratch(prompt.len(), prompt.len(), 64);
    let mut seq = cache.new_seq();
    m.prefill(&mut cache, &mut s, &mut seq, &prompt, true).unwrap();
    let mut bits: Vec<u32> = (0..prompt.len()).flat_map(|i| s.logits(i).iter().map(|v| v.to_bits())).collect();
    let mut next = argmax(s.logits(prompt.len() - 1));
    for _ in 0..8 {
        m.decode(&mut cache, &mut s, &mut seq, next).unwrap();
        bits.extend(s.logits(0).iter().map(|v| v.to_bits()));
        next = argmax(s.logits(0));
    }
    bits
}

#[test]
fn logits_equal_on_any_number_of_threads() {
    // tiny-gqa4: 2 kv heads of 4 query heads; `fast` keeps an f16 cache, `exact` an f32 one
    let dir = repo_fixture("tiny-gqa4-packed");
    let int8_kv = PrecisionPlan::FAST.with_kv_cache(bitnet_core::precision::KvPrecision::Int8);
    for plan in [PrecisionPlan::EXACT, PrecisionPlan::FAST, int8_kv] {
        let want = run(&load_dir(&dir, &LoadOptions { threads: 1, plan, ..Default::default() }));
        for threads in [2, 3, 5] {
            let got = run(&load_dir(&dir, &LoadOptions { threads, plan, ..Default::default() }));
            let first = got.iter().zip(&want).position(|(a, b)| a != b);
            assert!(first.is_none(), "{} threads, plan {}: first difference at logit {first:?}", threads, plan.name);
        }
    }
}
