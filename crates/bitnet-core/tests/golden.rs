//! Golden tests against transformers (float32) and an independent float64 reference, on the
//! repo's own fixtures (tools/make_fixtures.py): two shapes x two checkpoint formats.
//! - prefill logits of every position within tolerance;
//! - greedy continuation with the KV cache equal to transformers' greedy tokens;
//! - KV-cache decode logits equal to a full recompute of the same sequence.

mod common;
use common::*;

use bitnet_core::model::LoadOptions;

/// DESIGN.md: ~1e-4 where no int8 activation sits on a rounding boundary. The fixture prompts were
/// chosen so that transformers float32 and the float64 reference agree (no boundary flip between
/// them), but our f32 arithmetic rounds differently again (summation order), and one activation in
/// ~10^5 lands on the other side of a rounding boundary, moving later logits by ~0.1-0.2
/// (DESIGN.md, correctness contract). So: positions before a flip must agree within TOL; after a
/// flip within FLIP_TOL with the same argmax wherever transformers' top1-top2 margin exceeds
/// FLIP_TOL; and at most one prompt per fixture may contain a flip.
const TOL: f64 = 2e-4;
const FLIP_TOL: f64 = 0.3;

fn check_fixture(name: &str, threads: usize) {
    let dir = repo_fixture(name);
    let m = load_dir(&dir, &LoadOptions { threads, ..Default::default() });
    let fp32 = Golden::open(&dir.join("golden.safetensors"));
    let exact = Golden::open(&dir.join("golden_exact.safetensors"));
    let prompts = fp32.prompts();
    let v = m.cfg.vocab_size;
    assert!(prompts.len() >= 3, "{name}: expected 3 prompts");
    let mut flipped_prompts = 0;
    for p in prompts {
        let ids = fp32.ids(&format!("{p}.input_ids"));
        let got = all_logits(&m, &ids);
        let want = &fp32.get(&format!("{p}.prefill_logits")).1;
        let d32 = max_abs_diff(&got, want);
        let d64 = max_abs_diff(&got, &exact.get(&format!("{p}.prefill_logits")).1);
        println!("{name} {p}: {} tokens, prefill max|dlogit| vs fp32 {d32:.2e}, vs float64 {d64:.2e}", ids.len());
        let mut flip_at = None;
        for t in 0..ids.len() {
            let (g, w) = (&got[t * v..(t + 1) * v], &want[t * v..(t + 1) * v]);
            let d = max_abs_diff(g, w);
            if d > TOL && flip_at.is_none() {
                flip_at = Some(t);
                println!("  int8 rounding-boundary flip: position {t} differs by {d:.3}");
            }
            assert!(d < FLIP_TOL, "{name} {p}: position {t} differs by {d}");
            if margin(w) > FLIP_TOL {
                assert_eq!(argmax(g) as usize, argmax64(w), "{name} {p}: argmax differs at position {t}");
            }
        }
        let want_toks = fp32.ids(&format!("{p}.greedy_tokens"));
        let (toks, steps) = greedy(&m, &ids, want_toks.len());
        let step_want = &fp32.get(&format!("{p}.greedy_step_logits")).1;
        let mut agree = 0;
        for (i, (&a, &b)) in toks.iter().zip(&want_toks).enumerate() {
            let w = &step_want[i * v..(i + 1) * v];
            if a != b {
                assert!(
                    flip_at.is_some() && margin(w) < FLIP_TOL,
                    "{name} {p}: greedy step {i}: got {a}, transformers {b} (margin {:.3})",
                    margin(w)
                );
                println!("  greedy diverges at step {i} after the flip (transformers margin {:.3})", margin(w));
                break;
            }
            agree += 1;
            let d = max_abs_diff(&steps[i], w);
            if d > TOL && flip_at.is_none() {
                println!("  int8 rounding-boundary flip: greedy step {i} differs by {d:.3}");
                flip_at = Some(ids.len() + i);
            }
            assert!(d < FLIP_TOL, "{name} {p}: step {i} logits differ by {d}");
        }
        println!("{name} {p}: greedy {agree}/{} tokens equal", want_toks.len());

        if flip_at.is_some() {
            flipped_prompts += 1;
        }

        // KV-cache decode == full recompute of the whole sequence.
        let mut full_ids = ids.clone();
        full_ids.extend_from_slice(&toks[..toks.len() - 1]);
        let full = all_logits(&m, &full_ids);
        for (i, step) in steps.iter().enumerate() {
            let row = ids.len() - 1 + i;
            let d = step.iter().zip(&full[row * v..(row + 1) * v]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d < 1e-4, "{name} {p}: decode step {i} differs from recompute by {d}");
        }
    }
    assert!(flipped_prompts <= 1, "{name}: {flipped_prompts} prompts hit rounding-boundary flips");
}

#[test]
fn tiny_gqa4_master() {
    check_fixture("tiny-gqa4-master", 1);
}

#[test]
fn tiny_gqa4_packed() {
    check_fixture("tiny-gqa4-packed", 2);
}

#[test]
fn tiny_untied_odd_master() {
    check_fixture("tiny-untied-odd-master", 2);
}

#[test]
fn tiny_untied_odd_packed() {
    check_fixture("tiny-untied-odd-packed", 3);
}
