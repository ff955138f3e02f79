//! What a step of `n` tokens of one sequence costs against a one-token decode step, on 2B-4T's
//! shapes: the price of a prompt-lookup verification (`generate.rs`: the sampled token and its
//! draft, every position's logits) and of a short prefill chunk. Timing only, nothing asserted;
//! slow (builds a 2B model per kernel):
//! `cargo test --release -p bitnet-core --test step_cost -- --ignored --nocapture`.

use std::time::Instant;

use bitnet_core::engine::{Engine, EngineOptions};
use bitnet_core::model::{Logits, SeqChunk};
use bitnet_core::precision::PrecisionPlan;
use bitnet_cpu::kernels::Workload;
use bitnet_cpu::KernelLevel;

#[test]
#[ignore]
fn step_cost_by_token_count() {
    const REPS: usize = 30;
    let ns = [1usize, 2, 3, 5, 9, 17];
    let threads = 2;
    let mut kernels = vec![KernelLevel::default_for(Workload::Sequence, threads)];
    if KernelLevel::Avx512Vnni.is_available() && !kernels.contains(&KernelLevel::Avx512Vnni) {
        kernels.push(KernelLevel::Avx512Vnni);
    }
    for kernel in kernels {
        for plan in [PrecisionPlan::INT2, PrecisionPlan::EXACT] {
            let opts = EngineOptions { threads, kernel, plan, ..Default::default() };
            let m = Engine::load("random:2b-4t", &opts).unwrap().model;
            let mut cache = m.new_cache(1024, 1, 16);
            let mut seq = cache.new_seq();
            let mut s = m.new_scratch(32, 32, 1024);
            let toks: Vec<u32> = (0..32).map(|i| i * 977 + 5).collect();
            m.prefill(&mut cache, &mut s, &mut seq, &toks[..16], false).unwrap();
            // every n in turn each repetition (the VM's bandwidth swings fall on all alike);
            // the step's positions are forgotten after it, but one, so the context grows slowly
            let mut secs = vec![[0f64; 2]; ns.len()];
            for r in 0..REPS + 2 {
                for (i, &n) in ns.iter().enumerate() {
                    for (j, logits) in [Logits::Last, Logits::All].into_iter().enumerate() {
                        let base = seq.len();
                        let t = Instant::now();
                        let mut chunk = [SeqChunk { seq: &mut seq, tokens: &toks[..n], logits }];
                        m.forward(&mut cache, &mut s, &mut chunk).unwrap();
                        if r >= 2 {
                            secs[i][j] += t.elapsed().as_secs_f64();
                        }
                        cache.truncate(&mut seq, base + 1);
                    }
                }
            }
            let one = secs[0][0];
            for (&n, t) in ns.iter().zip(&secs) {
                println!(
                    "{} plan {:5} threads {threads}: {n:2} tokens {:6.2} ms ({:.2}x a decode step), every position's logits {:6.2} ms ({:.2}x)",
                    kernel.name(),
                    plan.name,
                    t[0] / REPS as f64 * 1e3,
                    t[0] / one,
                    t[1] / REPS as f64 * 1e3,
                    t[1] / one
                );
            }
        }
    }
}
