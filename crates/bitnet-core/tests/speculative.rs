//! Prompt lookup (`GenOptions::prompt_lookup`) leaves the output unchanged: a step that feeds a
//! token and its draft keeps per position the logits, bit for bit, that decoding the tokens one
//! by one gives, and generation with drafts emits the same tokens as without, greedy or
//! sampled, every plan, through the CPU `Session` and a `BatchSession` over `CpuBatch`.

mod common;

use bitnet_core::batch::CpuBatch;
use bitnet_core::generate::{lookup_draft, BatchSession, GenOptions, GenStats, Session};
use bitnet_core::model::LoadOptions;
use bitnet_core::precision::PrecisionPlan;
use bitnet_core::sampler::SamplingParams;
use common::{load_dir, repo_fixture};

#[test]
fn lookup_finds_the_latest_longest_match() {
    let mut out = Vec::new();
    // ... 1 2 3 [9 9] ... 1 2 3 [7 8] ... 2 3 + last: the latest "2 3" is followed by 7 8
    let ctx = [5, 1, 2, 3, 9, 9, 4, 1, 2, 3, 7, 8, 6, 2];
    lookup_draft(&ctx, 3, 4, &mut out);
    assert_eq!(out, [7, 8, 6, 2]);
    // a longer n-gram wins over a later shorter one: "1 2 3" occurs at 1 and 7; "4 1 2 3" at 6
    let ctx = [4, 1, 2, 3, 10, 11, 0, 1, 2, 3, 12, 4, 1, 2];
    lookup_draft(&ctx, 3, 2, &mut out);
    assert_eq!(out, [10, 11]);
    // the draft stops at the end of the context
    lookup_draft(&[1, 2, 1], 2, 8, &mut out);
    assert_eq!(out, [1, 2]);
    // one token alone does not draft; nothing matches; k = 0
    lookup_draft(&[1, 2, 3], 1, 4, &mut out);
    assert!(out.is_empty());
    lookup_draft(&[], 1, 4, &mut out);
    assert!(out.is_empty());
    lookup_draft(&[1, 2, 1], 2, 0, &mut out);
    assert!(out.is_empty());
}

/// A prompt that repeats itself, so that drafts are found from the first steps.
fn prompt() -> Vec<u32> {
    (0..60).map(|i| [17u32, 250, 31, 480, 9, 77][i % 6] + (i / 30) as u32).collect()
}

fn options(sampling: SamplingParams, n: usize, k: usize) -> GenOptions {
    GenOptions { max_new_tokens: n, sampling, eos_ids: vec![], ignore_eos: true, json: None, prompt_lookup: k }
}

fn collect(run: impl FnOnce(&mut dyn FnMut(u32) -> bool) -> GenStats) -> (Vec<u32>, GenStats) {
    let mut out = Vec::new();
    let st = run(&mut |t| {
        out.push(t);
        true
    });
    (out, st)
}

#[test]
fn drafted_generation_emits_the_same_tokens() {
    let sampled = SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, seed: 11, ..Default::default() };
    let penalized = SamplingParams { repetition_penalty: 1.3, presence_penalty: 0.5, ..SamplingParams::greedy() };
    let (mut drafted, mut accepted) = (0, 0);
    for plan in PrecisionPlan::PRESETS {
        for fixture in ["tiny-gqa4-packed", "tiny-untied-odd-master"] {
            let dir = repo_fixture(fixture);
            for params in [SamplingParams::greedy(), sampled, penalized] {
                let m = load_dir(&dir, &LoadOptions { plan, ..Default::default() });
                let p = prompt();
                let mut s = Session::new(&m, 128, 16).unwrap();
                let (want, _) = collect(|f| s.generate(&p, &options(params, 40, 0), f).unwrap());
                for k in [1, 5, 16] {
                    s.reset();
                    let (got, st) = collect(|f| s.generate(&p, &options(params, 40, k), f).unwrap());
                    assert_eq!(got, want, "{} {fixture} {params:?} k {k}: Session", plan.name);
                    assert!(st.accepted_tokens <= st.drafted_tokens);
                    drafted += st.drafted_tokens;
                    accepted += st.accepted_tokens;
                    // a second turn after a drafted one: the cache holds what the history says
                    let mut turn2 = p.clone();
                    turn2.extend_from_slice(&got[..7]);
                    let (a, _) = collect(|f| s.generate(&turn2, &options(params, 12, k), f).unwrap());
                    let mut fresh = Session::new(&m, 128, 16).unwrap();
                    let (b, _) = collect(|f| fresh.generate(&turn2, &options(params, 12, 0), f).unwrap());
                    assert_eq!(a, b, "{} {fixture} k {k}: second turn", plan.name);
                }
                // the CLI's path: a BatchSession over the CPU batch model
                let m = load_dir(&dir, &LoadOptions { plan, ..Default::default() });
                let mut b = CpuBatch::new(m, 16, 16, 128, 1, 32);
                let mut bs = BatchSession::new(&mut b, 128, 32).unwrap();
                let (got, st) = collect(|f| bs.generate(&p, &options(params, 40, 8), f).unwrap());
                assert_eq!(got, want, "{} {fixture} {params:?}: BatchSession", plan.name);
                drafted += st.drafted_tokens;
                accepted += st.accepted_tokens;
            }
        }
    }
    // both paths were taken: drafts fed, some accepted, some dropped
    assert!(accepted > 0 && accepted < drafted, "drafted {drafted}, accepted {accepted}");
    eprintln!("drafted {drafted}, accepted {accepted}");
}

#[test]
fn too_long_a_draft_is_refused() {
    let m = load_dir(&repo_fixture("tiny-gqa4-packed"), &LoadOptions::default());
    let mut s = Session::new(&m, 128, 16).unwrap();
    let e = s.generate(&prompt(), &options(SamplingParams::greedy(), 4, 17), |_| true).unwrap_err();
    assert!(e.to_string().contains("at most 16"), "{e}");
}
