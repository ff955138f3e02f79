//! What the `fast`, `int8` and `int4` precision plans cost in accuracy on the golden fixtures (printed, and bounded
//! so a regression shows): max |logit diff| against transformers float32 and top-1 agreement.
//! `cargo test --release -p bitnet-core --test precision -- --nocapture` prints the table that the
//! README quotes.

mod common;
use common::*;

use bitnet_core::model::LoadOptions;
use bitnet_core::precision::PrecisionPlan;

#[test]
fn fast_plan_accuracy() {
    for name in ["tiny-gqa4-master", "tiny-gqa4-packed", "tiny-untied-odd-master", "tiny-untied-odd-packed"] {
        let dir = repo_fixture(name);
        let fp32 = Golden::open(&dir.join("golden.safetensors"));
        for plan in PrecisionPlan::PRESETS {
            let m = load_dir(&dir, &LoadOptions { threads: 2, plan, ..Default::default() });
            let v = m.cfg.vocab_size;
            let (mut maxd, mut agree, mut total, mut sumd, mut n) = (0f64, 0, 0, 0f64, 0usize);
            for p in fp32.prompts() {
                let ids = fp32.ids(&format!("{p}.input_ids"));
                let got = all_logits(&m, &ids);
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
            let rate = agree as f64 / total as f64;
            println!(
                "{name:24} plan {:5}: max|dlogit| {maxd:.4}, mean {:.4}, top-1 agreement {agree}/{total} ({:.1}%)",
                plan.name,
                sumd / n as f64,
                100.0 * rate
            );
            match plan.name {
                "exact" => assert!(maxd < 0.3 && rate > 0.97, "{name} exact: {maxd} {rate}"),
                // 4 bits per weight: the largest logit error of the presets (README)
                "int4" => assert!(maxd < 3.0 && rate > 0.75, "{name} int4: {maxd} {rate}"),
                _ => assert!(maxd < 1.0 && rate > 0.85, "{name} {}: {maxd} {rate}", plan.name),
            }
        }
    }
}
