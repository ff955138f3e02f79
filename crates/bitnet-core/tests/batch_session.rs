//! The generation loop over a `BatchModel` (what the CLI and the server drive, on the CPU or
//! the GPU) produces exactly what the CPU `Session` produces, and serves several sequences
//! from one pool without their results depending on each other.

mod common;

use bitnet_core::batch::{BatchModel, CpuBatch, StepChunk};
use bitnet_core::generate::{BatchSession, GenOptions, Session};
use bitnet_core::model::LoadOptions;
use bitnet_core::precision::PrecisionPlan;
use bitnet_core::sampler::SamplingParams;
use common::{load_dir, repo_fixture};

fn options(sampling: SamplingParams) -> GenOptions {
    GenOptions { max_new_tokens: 24, sampling, eos_ids: vec![], ignore_eos: true, json: None, prompt_lookup: 0 }
}

#[test]
fn batch_session_equals_session() {
    let dir = repo_fixture("tiny-gqa4-packed");
    let prompt: Vec<u32> = (0..37).map(|i| (i * 37 + 11) % 600).collect();
    let sampled = SamplingParams { temperature: 0.9, top_k: 40, top_p: 0.95, seed: 7, ..Default::default() };
    for params in [SamplingParams::greedy(), sampled] {
        let m = load_dir(&dir, &LoadOptions::default());
        let mut s = Session::new(&m, 128, 16).unwrap();
        let mut want = Vec::new();
        s.generate(&prompt, &options(params), |t| {
            want.push(t);
            true
        })
        .unwrap();
        // second turn: reuses the prefix
        let mut turn2 = prompt.clone();
        turn2.extend_from_slice(&want[..5]);
        let mut want2 = Vec::new();
        s.generate(&turn2, &options(params), |t| {
            want2.push(t);
            true
        })
        .unwrap();

        let m = load_dir(&dir, &LoadOptions::default());
        let mut b = CpuBatch::new(m, 8, 16, 128, 1, 16);
        let mut bs = BatchSession::new(&mut b, 128, 16).unwrap();
        let mut got = Vec::new();
        bs.generate(&prompt, &options(params), |t| {
            got.push(t);
            true
        })
        .unwrap();
        let mut got2 = Vec::new();
        let st = bs
            .generate(&turn2, &options(params), |t| {
                got2.push(t);
                true
            })
            .unwrap();
        assert_eq!(got, want);
        assert_eq!(got2, want2);
        assert_eq!(st.prefilled_tokens, turn2.len() - (prompt.len() + 24 - 1).min(turn2.len() - 1));
    }
}

#[test]
fn cpu_batch_steps_sequences_independently() {
    for plan in PrecisionPlan::PRESETS {
        steps_independently(plan);
    }
    steps_independently(PrecisionPlan::INT8.with_kv_cache(bitnet_core::precision::KvPrecision::Int8));
}

fn steps_independently(plan: PrecisionPlan) {
    let dir = repo_fixture("tiny-untied-odd-packed");
    let m = load_dir(&dir, &LoadOptions { plan, ..Default::default() });
    let mut b = CpuBatch::new(m, 40, 16, 128, 4, 64);
    let prompts: Vec<Vec<u32>> =
        (0..3).map(|k| (0..(5 + 9 * k)).map(|i| ((i * 13 + k * 101) % 500) as u32).collect()).collect();
    // alone
    let mut alone = Vec::new();
    for p in &prompts {
        let id = b.new_seq().unwrap();
        b.reserve(id, p.len()).unwrap();
        b.forward(&[StepChunk { seq: id, tokens: p, logits: true, all_logits: false }]).unwrap();
        alone.push(b.logits(0).to_vec());
        b.release(id);
    }
    // together, in one step
    let ids: Vec<_> = (0..3).map(|_| b.new_seq().unwrap()).collect();
    for (id, p) in ids.iter().zip(&prompts) {
        b.reserve(*id, p.len()).unwrap();
    }
    let chunks: Vec<StepChunk<'_>> = ids
        .iter()
        .zip(&prompts)
        .map(|(&seq, p)| StepChunk { seq, tokens: p, logits: true, all_logits: false })
        .collect();
    b.forward(&chunks).unwrap();
    for k in 0..3 {
        // Every row's arithmetic is independent of the rest of the batch: equal bit for bit.
        assert_eq!(b.logits(k), &alone[k][..], "plan {}: sequence {k}: batched logits differ from alone", plan.name);
        assert_eq!(b.seq_len(ids[k]), prompts[k].len());
    }
    // a sequence fed twice in one step is refused, and nothing is lost
    let twice = [chunks[0], chunks[0]];
    assert!(b.forward(&twice).is_err());
    assert_eq!(b.seq_len(ids[0]), prompts[0].len());
    let used = b.used_blocks();
    for id in ids {
        b.release(id);
    }
    assert!(b.used_blocks() < used);
    assert_eq!(b.used_blocks(), 0);
}
