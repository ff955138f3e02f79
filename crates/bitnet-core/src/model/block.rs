//! One transformer layer, in the order of transformers' `BitNetDecoderLayer`.

use bitnet_cpu::kernels::matmul;
use bitnet_cpu::pool::SyncPtr;
use bitnet_cpu::{QuantActs, ThreadPool};

use super::attention::{attend, Attention};
use super::mlp::{relu2_mul, Mlp};
use super::norm::rms_norm_quant_into;
use super::SeqChunk;
use super::{Model, Scratch};
use crate::kv_cache::KvCache;

pub struct Block {
    /// `input_layernorm` `[hidden]`
    pub input_norm: Vec<f32>,
    pub attn: Attention,
    /// `post_attention_layernorm` `[hidden]`
    pub post_attn_norm: Vec<f32>,
    pub mlp: Mlp,
}

/// Below this many tokens the per-token elementwise work runs on the calling thread: a parallel
/// region costs more than normalizing one row.
const PAR_TOKENS: usize = 4;

/// RMSNorm each of the step's `n` token rows of `x` (width `w.len()`) and quantize them into
/// `acts`; `tmp` provides one scratch row per token. Tokens are split across the pool in prefill.
fn norm_quant(pool: &ThreadPool, x: &[f32], w: &[f32], eps: f32, tmp: &mut [f32], acts: &mut QuantActs, n: usize) {
    let d = w.len();
    if n < PAR_TOKENS {
        let stride = acts.stride;
        for t in 0..n {
            let q = &mut acts.q[t * stride..(t + 1) * stride];
            (acts.scale[t], acts.sum[t]) = rms_norm_quant_into(&x[t * d..(t + 1) * d], w, eps, &mut tmp[..d], q);
        }
    } else {
        let (q, scale, sum, stride) =
            (SyncPtr::new(&mut acts.q), SyncPtr::new(&mut acts.scale), SyncPtr::new(&mut acts.sum), acts.stride);
        let tmp_p = SyncPtr::new(tmp);
        pool.run(|tid, nt| {
            for t in bitnet_cpu::split_range(n, nt, tid, 1) {
                // SAFETY: token t's scratch row and activation row/scale/sum are touched by this thread only.
                let row = unsafe { tmp_p.slice(t * d, d) };
                let (qs, sc, su) = unsafe { (q.slice(t * stride, stride), scale.slice(t, 1), sum.slice(t, 1)) };
                (sc[0], su[0]) = rms_norm_quant_into(&x[t * d..(t + 1) * d], w, eps, row, qs);
            }
        });
    }
    acts.set_n_tok(n);
}

/// `mid[t] = relu(gate[t])^2 * up[t]` for every token, split across the pool in prefill.
fn relu2_mul_rows(pool: &ThreadPool, gate_up: &[f32], mid: &mut [f32], i: usize, n: usize) {
    if n < PAR_TOKENS {
        for t in 0..n {
            relu2_mul(&gate_up[t * 2 * i..(t + 1) * 2 * i], &mut mid[t * i..(t + 1) * i]);
        }
        return;
    }
    let mid_p = SyncPtr::new(mid);
    pool.run(|tid, nt| {
        for t in bitnet_cpu::split_range(n, nt, tid, 1) {
            // SAFETY: row t of `mid` belongs to this thread.
            relu2_mul(&gate_up[t * 2 * i..(t + 1) * 2 * i], unsafe { mid_p.slice(t * i, i) });
        }
    });
}

/// RoPE on each token's q and k (in `s.qkv`), then its k and v written into the cache at its
/// position. Split over the pool by tokens in batches and prefill: in a batch step each token's
/// K lands in a tile last touched a step ago, one cache line per dimension (the tiles are
/// transposed), so the writes wait on memory: RoPE and writes took 8.3 ms of a 214 ms step of 32
/// sequences (int8 plan, 2 threads) on the calling thread, 4.7-6.8 ms split (timers in a
/// throwaway test).
fn rope_and_store(
    pool: &ThreadPool,
    m: &Model,
    l: usize,
    cache: &mut KvCache,
    seqs: &[SeqChunk<'_>],
    s: &mut Scratch,
    n: usize,
) {
    let c = &m.cfg;
    let qkv_w = c.q_dim + 2 * c.kv_dim;
    let (tok_pos, tok_chunk) = (&s.tok_pos, &s.tok_chunk);
    let writer = cache.writer();
    let qkv = SyncPtr::new(&mut s.qkv);
    let one = |t: usize| {
        // SAFETY: token t's qkv row is touched by this thread only.
        let row = unsafe { qkv.slice(t * qkv_w, qkv_w) };
        let (q, kv) = row.split_at_mut(c.q_dim);
        let (k, v) = kv.split_at_mut(c.kv_dim);
        m.rope.apply(q, tok_pos[t]);
        m.rope.apply(k, tok_pos[t]);
        // SAFETY: the step's tokens are at distinct (sequence, position) pairs (a chunk per
        // sequence), each written once, at positions past the sequence's length: in blocks that
        // sequence alone holds (the block pool shares full blocks only, and copies on write).
        unsafe { writer.write(l, seqs[tok_chunk[t]].seq, tok_pos[t], k, v) };
    };
    if n < PAR_TOKENS {
        (0..n).for_each(one);
    } else {
        pool.run(|tid, nt| bitnet_cpu::split_range(n, nt, tid, 1).for_each(one));
    }
}

fn add_rows(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

impl Block {
    /// `x = x + attn(x); x = x + mlp(x)` for the step's `n` tokens (rows of `s.x`), reading and
    /// writing layer `l` of the KV cache.
    pub(crate) fn forward(&self, l: usize, m: &Model, s: &mut Scratch, cache: &mut KvCache, seqs: &[SeqChunk<'_>]) {
        let c = &m.cfg;
        let (pool, eps, n) = (&m.pool, c.rms_norm_eps, s.tok_pos.len());
        let qkv_w = c.q_dim + 2 * c.kv_dim;

        // h = input_layernorm(x); q|k|v = BitLinear(h)
        norm_quant(pool, &s.x, &self.input_norm, eps, &mut s.normed, &mut s.acts_h, n);
        matmul(pool, &self.attn.qkv, &s.acts_h, &mut s.qkv, qkv_w);
        // RoPE on q and k; k and v written in place at each token's position
        rope_and_store(pool, m, l, cache, seqs, s, n);
        // causal GQA attention over each sequence's cache
        attend(pool, c, l, cache.view(), seqs, s);
        // x += o_proj(attn_sub_norm(attn))
        norm_quant(pool, &s.attn, &self.attn.sub_norm, eps, &mut s.normed, &mut s.acts_q, n);
        matmul(pool, &self.attn.o, &s.acts_q, &mut s.proj_out, c.hidden_size);
        add_rows(&mut s.x[..n * c.hidden_size], &s.proj_out[..n * c.hidden_size]);

        // x += down_proj(ffn_sub_norm(relu(gate(h))^2 * up(h))), h = post_attention_layernorm(x)
        let i = c.intermediate_size;
        norm_quant(pool, &s.x, &self.post_attn_norm, eps, &mut s.normed, &mut s.acts_h, n);
        matmul(pool, &self.mlp.gate_up, &s.acts_h, &mut s.gate_up, 2 * i);
        relu2_mul_rows(pool, &s.gate_up, &mut s.mlp_mid, i, n);
        norm_quant(pool, &s.mlp_mid, &self.mlp.sub_norm, eps, &mut s.normed, &mut s.acts_i, n);
        matmul(pool, &self.mlp.down, &s.acts_i, &mut s.proj_out, c.hidden_size);
        add_rows(&mut s.x[..n * c.hidden_size], &s.proj_out[..n * c.hidden_size]);
    }
}
