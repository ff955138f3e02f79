//! Causal grouped-query attention over the paged KV cache.
//! Query head `h` reads kv head `h / (num_heads / num_kv_heads)`; scale `1/sqrt(head_dim)`
//! applied after the dot, softmax in f32, as transformers' eager attention.

use bitnet_cpu::pool::SyncPtr;
use bitnet_cpu::{TernaryMatrix, ThreadPool};

use super::SeqChunk;
use crate::config::ModelConfig;
use crate::kv_cache::{KvView, Row};

/// The attention half of a layer's weights.
pub struct Attention {
    /// fused q|k|v `[q_dim + 2 kv_dim][hidden]`
    pub qkv: TernaryMatrix,
    /// `[hidden][q_dim]`
    pub o: TernaryMatrix,
    /// `[q_dim]`
    pub sub_norm: Vec<f32>,
}

#[inline]
fn dot_row(q: &[f32], k: Row<'_>) -> f32 {
    match k {
        Row::F32(k) => {
            let mut acc = [0f32; 8];
            let n8 = q.len() / 8 * 8;
            for (a, b) in q[..n8].chunks_exact(8).zip(k[..n8].chunks_exact(8)) {
                for i in 0..8 {
                    acc[i] += a[i] * b[i];
                }
            }
            let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for i in n8..q.len() {
                s += q[i] * k[i];
            }
            s
        }
        Row::F16(k) => q.iter().zip(k).map(|(a, &b)| a * bitnet_cpu::dense::f16_to_f32(b)).sum(),
    }
}

#[inline]
fn axpy(out: &mut [f32], a: f32, v: Row<'_>) {
    match v {
        Row::F32(v) => {
            for (o, &x) in out.iter_mut().zip(v) {
                *o += a * x;
            }
        }
        Row::F16(v) => {
            for (o, &x) in out.iter_mut().zip(v) {
                *o += a * bitnet_cpu::dense::f16_to_f32(x);
            }
        }
    }
}

/// For every token `i` of the step (position `tok_pos[i]` of sequence `seqs[tok_chunk[i]]`) and
/// every query head: softmax(q . K[0..=pos] * scale) . V. `q` rows are `qkv_stride` apart; the
/// result goes to `out[i][head * head_dim..]`. Work items (token, head) are split across threads.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    pool: &ThreadPool,
    cfg: &ModelConfig,
    layer: usize,
    kv: KvView<'_>,
    seqs: &[SeqChunk<'_>],
    tok_pos: &[usize],
    tok_chunk: &[usize],
    qkv: &[f32],
    qkv_stride: usize,
    scores: &mut [f32],
    max_ctx: usize,
    out: &mut [f32],
) {
    let n_tok = tok_pos.len();
    let hd = cfg.head_dim;
    let scale = 1.0f32 / (hd as f32).sqrt();
    let items = n_tok * cfg.num_heads;
    let out_p = SyncPtr::new(out);
    let sc_p = SyncPtr::new(scores);
    pool.run(|tid, nt| {
        let range = bitnet_cpu::split_range(items, nt, tid, 1);
        // SAFETY: thread `tid` owns scores row `tid` and the (token, head) output slices of its items.
        let sc = unsafe { sc_p.slice(tid * max_ctx, max_ctx) };
        for item in range {
            let (i, h) = (item / cfg.num_heads, item % cfg.num_heads);
            let pos = tok_pos[i];
            let seq: &crate::kv_cache::SeqCache = seqs[tok_chunk[i]].seq;
            let kvh = h / cfg.gqa_group;
            let q = &qkv[i * qkv_stride + h * hd..i * qkv_stride + (h + 1) * hd];
            let n = pos + 1;
            let mut mx = f32::NEG_INFINITY;
            for (j, s) in sc[..n].iter_mut().enumerate() {
                *s = dot_row(q, kv.row(false, layer, seq, j, kvh * hd, hd)) * scale;
                mx = mx.max(*s);
            }
            let mut sum = 0f32;
            for s in sc[..n].iter_mut() {
                *s = (*s - mx).exp();
                sum += *s;
            }
            let o = unsafe { out_p.slice(i * cfg.q_dim + h * hd, hd) };
            o.fill(0.0);
            let inv = 1.0 / sum;
            for (j, &s) in sc[..n].iter().enumerate() {
                axpy(o, s * inv, kv.row(true, layer, seq, j, kvh * hd, hd));
            }
        }
    });
}
