//! Once warmed up, a decode step (forward + LM head + sampling + bookkeeping) performs zero heap
//! allocations, prompt-lookup steps included: counted with a global allocator wrapper.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bitnet_core::engine::{Engine, EngineOptions};
use bitnet_core::generate::{GenOptions, Session};
use bitnet_core::sampler::SamplingParams;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn decode_allocs(
    spec: &str,
    threads: usize,
    sampling: SamplingParams,
    plan: bitnet_core::precision::PrecisionPlan,
    prompt_lookup: usize,
) -> usize {
    let opts = EngineOptions { threads, plan, ..Default::default() };
    let engine = Engine::load(spec, &opts).unwrap();
    let mut session = Session::new(&engine.model, 256, 64).unwrap();
    // with prompt lookup, a prompt that repeats itself (drafts from the first steps)
    let prompt: Vec<u32> = if prompt_lookup > 0 {
        (0..40).map(|i| [17, 250, 31, 480, 9][i % 5]).collect()
    } else {
        (0..20).map(|i| (i * 7 % 600) as u32).collect()
    };
    let opts =
        GenOptions { max_new_tokens: 64, sampling, eos_ids: vec![], ignore_eos: true, json: None, prompt_lookup };
    let mut at_warm = 0;
    let mut n = 0;
    let st = session
        .generate(&prompt, &opts, |_| {
            n += 1;
            if n == 8 {
                at_warm = ALLOCS.load(Ordering::SeqCst);
            }
            true
        })
        .unwrap();
    let after = ALLOCS.load(Ordering::SeqCst);
    assert_eq!(n, 64);
    // (the fixture's greedy run below drafts 31 tokens and accepts 3: both ways a draft ends)
    assert!(prompt_lookup == 0 || st.accepted_tokens > 0, "{spec}: no draft was accepted");
    after - at_warm
}

#[test]
fn decode_loop_allocates_nothing() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/tiny-gqa4-master");
    let sampled = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.01,
        repetition_penalty: 1.1,
        frequency_penalty: 0.3,
        presence_penalty: 0.2,
        seed: 3,
    };
    for (spec, threads, sp, plan, lookup) in [
        (fixture, 1, SamplingParams::greedy(), bitnet_core::precision::PrecisionPlan::EXACT, 0),
        (fixture, 2, sampled, bitnet_core::precision::PrecisionPlan::EXACT, 0),
        (fixture, 2, SamplingParams::greedy(), bitnet_core::precision::PrecisionPlan::EXACT, 8),
        ("random:tiny", 2, sampled, bitnet_core::precision::PrecisionPlan::FAST, 0),
        ("random:tiny", 2, sampled, bitnet_core::precision::PrecisionPlan::INT8, 0),
        ("random:tiny", 2, sampled, bitnet_core::precision::PrecisionPlan::INT4, 0),
        ("random:tiny", 2, sampled, bitnet_core::precision::PrecisionPlan::INT2, 0),
        (
            "random:tiny",
            2,
            sampled,
            bitnet_core::precision::PrecisionPlan::INT2.with_kv_cache(bitnet_core::precision::KvPrecision::Int8),
            0,
        ),
    ] {
        let n = decode_allocs(spec, threads, sp, plan, lookup);
        assert_eq!(n, 0, "{spec} threads {threads}: {n} heap allocations in 56 warmed-up decode steps");
    }
}
