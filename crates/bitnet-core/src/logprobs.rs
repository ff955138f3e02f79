//! Log-probabilities of generated tokens, as the OpenAI API reports them (`logprobs`,
//! `top_logprobs`): the model's own distribution, the log-softmax of the raw logits, before any
//! penalty, temperature or truncation (vLLM's default, so the numbers do not depend on how the
//! token was drawn). Computed on request only: two passes over the vocabulary per token (a max,
//! then SIMD exponentials), on the scheduler's thread.

use bitnet_cpu::attn::AttnOps;
use bitnet_cpu::dense::DenseLevel;

/// Most alternatives reported per token (OpenAI's limit for `top_logprobs`, vLLM's default).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One generated token's log-probability and the most likely alternatives at its position.
/// Fixed size: no heap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    top: [(u32, f32); MAX_TOP_LOGPROBS],
    n_top: usize,
}

impl TokenLogprobs {
    /// `token`'s log-probability under `logits` (one row, NaN counted as -inf) and the `n_top`
    /// (at most [`MAX_TOP_LOGPROBS`]) most likely tokens, most likely first, ties to the lower
    /// id. Ids outside the row get -inf. The normalizer is summed in f64. Degenerate rows: with
    /// +inf logits the mass is shared among them; with no finite logit it is uniform.
    pub fn new(logits: &[f32], token: u32, n_top: usize) -> TokenLogprobs {
        let clean = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| if clean(v) > m { v } else { m });
        // log sum exp(l - max), once: the SIMD exponentials of softmax over pieces of 1024 (short
        // f32 sums), the pieces added in f64 (NaN and -inf count as exp(-88), nothing next to the
        // max's 1)
        let lse = if max.is_finite() {
            let ops = AttnOps::new(DenseLevel::detect());
            let s: f64 = logits.chunks(1024).map(|c| ops.sum_exp(c, max) as f64).sum();
            s.ln() as f32
        } else {
            0.0
        };
        let n_inf = if max == f32::INFINITY { logits.iter().filter(|&&x| x == f32::INFINITY).count() } else { 0 };
        let lp = |v: f32| -> f32 {
            let v = clean(v);
            if max.is_finite() {
                v - max - lse
            } else if max == f32::INFINITY {
                if v == f32::INFINITY {
                    -(n_inf as f32).ln()
                } else {
                    f32::NEG_INFINITY
                }
            } else {
                -(logits.len() as f32).ln()
            }
        };

        // Top n: an insertion-sorted list; ids ascend, so an equal later value never displaces
        // an earlier one.
        let n_top = n_top.min(MAX_TOP_LOGPROBS).min(logits.len());
        let mut top = [(0u32, f32::NEG_INFINITY); MAX_TOP_LOGPROBS];
        let mut n = 0;
        for (id, &v) in logits.iter().enumerate() {
            let v = clean(v);
            if n_top == 0 || (n == n_top && v <= top[n - 1].1) {
                continue;
            }
            let mut i = n.min(n_top - 1);
            while i > 0 && top[i - 1].1 < v {
                top[i] = top[i - 1];
                i -= 1;
            }
            top[i] = (id as u32, v);
            n = (n + 1).min(n_top);
        }
        for e in top[..n].iter_mut() {
            e.1 = lp(e.1);
        }
        let logprob = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&v| lp(v));
        TokenLogprobs { token, logprob, top, n_top: n }
    }

    /// The most likely tokens and their log-probabilities, most likely first.
    pub fn top(&self) -> &[(u32, f32)] {
        &self.top[..self.n_top]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// log-softmax in f64, the reference.
    fn reference(l: &[f32]) -> Vec<f64> {
        let m = l.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let s: f64 = l.iter().map(|&v| (v as f64 - m).exp()).sum();
        l.iter().map(|&v| v as f64 - m - s.ln()).collect()
    }

    #[test]
    fn log_softmax_and_top_tokens() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let l: Vec<f32> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 30.0 - 15.0
            })
            .collect();
        let want = reference(&l);
        for tok in [0u32, 17, 4999] {
            let t = TokenLogprobs::new(&l, tok, 5);
            assert!((t.logprob as f64 - want[tok as usize]).abs() < 1e-5, "{} vs {}", t.logprob, want[tok as usize]);
        }
        // The top 20 are the 20 largest, in order, with their log-probabilities.
        let t = TokenLogprobs::new(&l, 3, 25);
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        assert_eq!(t.top().len(), MAX_TOP_LOGPROBS);
        for (&(id, lp), &want_id) in t.top().iter().zip(&order) {
            assert_eq!(id as usize, want_id);
            assert!((lp as f64 - want[want_id]).abs() < 1e-5);
        }
        let p: f64 = t.top().iter().map(|&(_, lp)| (lp as f64).exp()).sum();
        assert!(p > 0.0 && p < 1.0);
        assert!(TokenLogprobs::new(&l, 3, 0).top().is_empty());
    }

    #[test]
    fn ties_nan_and_degenerate_rows() {
        // Ties go to the lower id; NaN is -inf; an id outside the row is -inf.
        let t = TokenLogprobs::new(&[1.0, f32::NAN, 2.0, 2.0, 1.0], 1, 3);
        assert_eq!(t.top().iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 3, 0]);
        assert_eq!(t.logprob, f32::NEG_INFINITY);
        assert!((t.top()[0].1 - t.top()[1].1).abs() == 0.0);
        assert_eq!(TokenLogprobs::new(&[0.0, 1.0], 7, 1).logprob, f32::NEG_INFINITY);
        // Two +inf logits share the mass; no finite logit: uniform.
        let t = TokenLogprobs::new(&[f32::INFINITY, 0.0, f32::INFINITY], 2, 2);
        assert!((t.logprob - 0.5f32.ln()).abs() < 1e-7);
        assert_eq!(TokenLogprobs::new(&[f32::INFINITY, 0.0, f32::INFINITY], 1, 0).logprob, f32::NEG_INFINITY);
        let t = TokenLogprobs::new(&[f32::NAN, f32::NEG_INFINITY], 0, 2);
        assert!((t.logprob - 0.5f32.ln()).abs() < 1e-7);
        assert_eq!(TokenLogprobs::new(&[], 0, 3).top().len(), 0);
    }
}
