//! Causal grouped-query attention over the paged KV cache.
//! Query head `h` reads kv head `h / (num_heads / num_kv_heads)`; scale `1/sqrt(head_dim)`
//! applied after the dot, softmax in f32, as transformers' eager attention.
//!
//! Work is split into items of (chunk, kv head, tile of up to `TILE` consecutive tokens): every K
//! and V row loaded from the cache serves all `gqa_group x TILE` query rows of the item (in
//! decode, the group's query heads share each load; in prefill, tokens do too). Each query row's
//! arithmetic is independent of which rows share its item, so results do not depend on the batch.

use bitnet_cpu::pool::SyncPtr;
use bitnet_cpu::{TernaryMatrix, ThreadPool};

use super::{Scratch, SeqChunk};
use crate::config::ModelConfig;
use crate::kv_cache::{KvView, Row, SeqCache};

/// The attention half of a layer's weights.
pub struct Attention {
    /// fused q|k|v `[q_dim + 2 kv_dim][hidden]`
    pub qkv: TernaryMatrix,
    /// `[hidden][q_dim]`
    pub o: TernaryMatrix,
    /// `[q_dim]`
    pub sub_norm: Vec<f32>,
}

/// Query tokens per work item: enough that an item has about 32 query rows.
pub fn tile_tokens(cfg: &ModelConfig) -> usize {
    (32 / cfg.gqa_group).max(1)
}

/// Score rows each pool thread needs: one per query row of an item.
pub fn score_rows(cfg: &ModelConfig) -> usize {
    cfg.gqa_group * tile_tokens(cfg)
}

/// One query row of an item: where its q is, where its output goes, its position.
#[derive(Clone, Copy, Default)]
pub(crate) struct QRow {
    q: usize,
    out: usize,
    pos: usize,
}

#[inline(always)]
fn dot(q: &[f32], k: &[f32]) -> f32 {
    // 16 independent partial sums: one AVX-512 register, two AVX2 ones.
    let mut acc = [0f32; 16];
    let n = q.len() / 16 * 16;
    for (a, b) in q[..n].chunks_exact(16).zip(k[..n].chunks_exact(16)) {
        for i in 0..16 {
            acc[i] += a[i] * b[i];
        }
    }
    let mut s = 0f32;
    for i in n..q.len() {
        s += q[i] * k[i];
    }
    let mut w = 8;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0] + s
}

/// A K or V row as f32: the cache's own slice, or `tmp` filled from an f16 row.
#[inline(always)]
fn as_f32<'r>(row: Row<'r>, tmp: &'r mut [f32]) -> &'r [f32] {
    match row {
        Row::F32(r) => r,
        Row::F16(h) => {
            for (d, &x) in tmp.iter_mut().zip(h) {
                *d = half::f16::from_bits(x).to_f32();
            }
            &tmp[..h.len()]
        }
    }
}

/// One work item: `rows` query rows (all of one kv head, at offset `kv_off` of the cache rows,
/// of one sequence), with this thread's score block, K/V widening row and the output.
pub(crate) struct Item<'a, 'k> {
    kv: &'a KvView<'k>,
    layer: usize,
    seq: &'a SeqCache,
    kv_off: usize,
    hd: usize,
    rows: &'a [QRow],
    qkv: &'a [f32],
    scores: &'a mut [f32],
    max_ctx: usize,
    out: SyncPtr<f32>,
    tmp: &'a mut [f32],
}

#[inline(always)]
fn item_body(it: &mut Item<'_, '_>) {
    let Item { kv, layer, seq, kv_off, hd, rows, qkv, ref mut scores, max_ctx, out, ref mut tmp } = *it;
    let scale = 1.0f32 / (hd as f32).sqrt();
    let last = rows.iter().map(|r| r.pos).max().unwrap_or(0);
    // scores[r][j] = q_r . k_j * scale, for j <= pos_r
    for j in 0..=last {
        let k = as_f32(kv.row(false, layer, seq, j, kv_off, hd), &mut tmp[..hd]);
        for (r, qr) in rows.iter().enumerate() {
            if j <= qr.pos {
                scores[r * max_ctx + j] = dot(&qkv[qr.q..qr.q + hd], k) * scale;
            }
        }
    }
    // softmax per row (max-subtracted, f32)
    for (r, qr) in rows.iter().enumerate() {
        let sc = &mut scores[r * max_ctx..r * max_ctx + qr.pos + 1];
        let mx = sc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0f32;
        for v in sc.iter_mut() {
            *v = (*v - mx).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in sc.iter_mut() {
            *v *= inv;
        }
        // SAFETY: this output slice belongs to this item only.
        unsafe { out.slice(qr.out, hd) }.fill(0.0);
    }
    // out_r = sum_j p_rj v_j
    for j in 0..=last {
        let v = as_f32(kv.row(true, layer, seq, j, kv_off, hd), &mut tmp[..hd]);
        for (r, qr) in rows.iter().enumerate() {
            if j <= qr.pos {
                let p = scores[r * max_ctx + j];
                let o = unsafe { out.slice(qr.out, hd) };
                for (o, &x) in o.iter_mut().zip(v) {
                    *o += p * x;
                }
            }
        }
    }
}

type ItemFn = unsafe fn(&mut Item<'_, '_>);

/// The item loop compiled for each instruction set (same arithmetic in every version; Rust never
/// contracts a*b+c into an FMA implicitly, so results are identical).
macro_rules! item_versions {
    ($($name:ident: $feat:literal),*) => {$(
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        unsafe fn $name(it: &mut Item<'_, '_>) {
            item_body(it)
        }
    )*};
}
item_versions!(item_avx512: "avx512f,avx512bw,avx512vl,avx2,fma", item_avx2: "avx2,fma");

unsafe fn item_generic(it: &mut Item<'_, '_>) {
    item_body(it)
}

/// The widest version of the item loop this CPU runs.
fn item_fn() -> ItemFn {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            return item_avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return item_avx2;
        }
    }
    item_generic
}

/// For every token `i` of the step (position `s.tok_pos[i]` of sequence `seqs[s.tok_chunk[i]]`)
/// and every query head: softmax(q . K[0..=pos] * scale) . V, with q from `s.qkv` (RoPE applied)
/// and the result in `s.attn[i][head * head_dim..]`.
pub fn attend(
    pool: &ThreadPool,
    cfg: &ModelConfig,
    layer: usize,
    kv: KvView<'_>,
    seqs: &[SeqChunk<'_>],
    s: &mut Scratch,
) {
    let hd = cfg.head_dim;
    let (g, qkv_stride, max_ctx) = (cfg.gqa_group, cfg.q_dim + 2 * cfg.kv_dim, s.max_ctx);
    // Items: for each chunk, its tokens in tiles of TILE, times kv heads. Chunk token offsets are
    // contiguous in step order.
    let tile_n = tile_tokens(cfg);
    let n_items: usize = seqs.iter().map(|c| c.tokens.len().div_ceil(tile_n)).sum::<usize>() * cfg.num_kv_heads;
    let (tok_pos, qkv) = (&s.tok_pos, &s.qkv);
    let out = SyncPtr::new(&mut s.attn);
    let sc_p = SyncPtr::new(&mut s.scores);
    let tmp_p = SyncPtr::new(&mut s.kv_tmp);
    let rows_p = SyncPtr::new(&mut s.q_rows);
    let n_rows = score_rows(cfg);
    let per_thread = n_rows * max_ctx;
    let f = item_fn();
    pool.run(|tid, nt| {
        let range = bitnet_cpu::split_range(n_items, nt, tid, 1);
        if range.is_empty() {
            return;
        }
        // SAFETY: thread `tid` owns score block `tid`, tmp row `tid`, and its items' outputs.
        let scores = unsafe { sc_p.slice(tid * per_thread, per_thread) };
        let tmp = unsafe { tmp_p.slice(tid * hd, hd) };
        let rows = unsafe { rows_p.slice(tid * n_rows, n_rows) };
        // Walk items in order to find each one's chunk and tile.
        let mut item = 0;
        let mut tok_base = 0;
        for c in seqs {
            let n = c.tokens.len();
            let tiles = n.div_ceil(tile_n);
            let span = tiles * cfg.num_kv_heads;
            if item + span <= range.start || item >= range.end {
                item += span;
                tok_base += n;
                continue;
            }
            for local in 0..span {
                let it = item + local;
                if !range.contains(&it) {
                    continue;
                }
                let (kvh, tile) = (local / tiles, local % tiles);
                let t0 = tile * tile_n;
                let t1 = (t0 + tile_n).min(n);
                let mut nr = 0;
                for t in t0..t1 {
                    let i = tok_base + t;
                    for h in kvh * g..(kvh + 1) * g {
                        rows[nr] = QRow { q: i * qkv_stride + h * hd, out: i * cfg.q_dim + h * hd, pos: tok_pos[i] };
                        nr += 1;
                    }
                }
                // SAFETY: `f` was chosen for features this CPU has.
                unsafe {
                    f(&mut Item {
                        kv: &kv,
                        layer,
                        seq: c.seq,
                        kv_off: kvh * hd,
                        hd,
                        rows: &rows[..nr],
                        qkv,
                        scores: &mut *scores,
                        max_ctx,
                        out,
                        tmp: &mut *tmp,
                    })
                };
            }
            item += span;
            tok_base += n;
        }
    });
}
