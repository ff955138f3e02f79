//! Decode speed of the precision plans on 2B-4T's shapes, measured interleaved: one model per
//! plan, and every step runs each plan's decode in turn, so a shared machine's bandwidth swings
//! (28-58 GB/s between runs on the development VM) fall on every plan alike and the ratios hold
//! where separate `bitnet bench` runs do not. Timing only, nothing asserted; slow (builds five 2B
//! models per thread count):
//! `cargo test --release -p bitnet-core --test plan_speed -- --ignored --nocapture`.

use std::time::Instant;

use bitnet_core::engine::{Engine, EngineOptions};
use bitnet_core::precision::PrecisionPlan;
use bitnet_cpu::kernels::Workload;
use bitnet_cpu::KernelLevel;

#[test]
#[ignore]
fn plans_decode_interleaved() {
    const WARM: usize = 20;
    const STEPS: usize = 300;
    for threads in [2, 1] {
        // the kernel `bitnet bench` picks for one sequence on this many threads
        let kernel = KernelLevel::default_for(Workload::Sequence, threads);
        let models: Vec<_> = PrecisionPlan::PRESETS
            .iter()
            .map(|&plan| {
                let opts = EngineOptions { threads, kernel, plan, ..Default::default() };
                Engine::load("random:2b-4t", &opts).unwrap().model
            })
            .collect();
        let mut state: Vec<_> = models
            .iter()
            .map(|m| {
                let cache = m.new_cache(WARM + STEPS + 1, 1, 16);
                let seq = cache.new_seq();
                (cache, m.new_scratch(1, 1, WARM + STEPS + 1), seq)
            })
            .collect();
        let mut secs = vec![0f64; models.len()];
        for step in 0..WARM + STEPS {
            for (i, m) in models.iter().enumerate() {
                let (cache, s, seq) = &mut state[i];
                let t = Instant::now();
                m.decode(cache, s, seq, (step * 31 % 1000) as u32).unwrap();
                if step >= WARM {
                    secs[i] += t.elapsed().as_secs_f64();
                }
            }
        }
        for (m, s) in models.iter().zip(&secs) {
            let step = s / STEPS as f64;
            let gb = m.bytes_per_token() as f64 / 1e9;
            println!(
                "threads {threads} kernel {} plan {:5}: {:.2} ms/token, {:.1} tok/s, {gb:.3} GB/token, {:.1} GB/s",
                kernel.name(),
                m.plan.name,
                step * 1e3,
                1.0 / step,
                gb / step
            );
        }
    }
}
