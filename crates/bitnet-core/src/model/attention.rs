//! Causal grouped-query attention over the paged KV cache.
//! Query head `h` reads kv head `h / (num_heads / num_kv_heads)`; scale `1/sqrt(head_dim)`
//! applied after the dot, softmax in f32, as transformers' eager attention.
//!
//! Work is split into items of (chunk, kv head, tile of up to `TILE` consecutive tokens): every K
//! and V row loaded from the cache serves all `gqa_group x TILE` query rows of the item (in
//! decode, the group's query heads share each load; in prefill, tokens do too). The threads take
//! even shares of the query heads of all items, so where a share ends inside an item (one
//! sequence decoding: 5 kv heads on 2 threads) its query heads are split over two. An item walks
//! its keys in chunks of 64: the chunk's K tiles (16 positions each, stored transposed by the
//! cache) or V rows go to the primitives (`bitnet_cpu::attn`) with up to 4 query rows at a time,
//! each call also naming what the item reads next, for prefetching. Each query row's arithmetic
//! is independent of which rows share its item or its call, so results depend neither on the
//! batch nor on the thread count.

use bitnet_cpu::attn::{AttnOps, KvElem, KEY_CHUNK, KEY_TILE, MAX_ROWS};
use bitnet_cpu::pool::SyncPtr;
use bitnet_cpu::{TernaryMatrix, ThreadPool};

use super::{Scratch, SeqChunk};
use crate::config::ModelConfig;
use crate::kv_cache::{KvRows, KvView, SeqCache};

/// The attention half of a layer's weights.
pub struct Attention {
    /// fused q|k|v `[q_dim + 2 kv_dim][hidden]`
    pub qkv: TernaryMatrix,
    /// `[hidden][q_dim]`
    pub o: TernaryMatrix,
    /// `[q_dim]`
    pub sub_norm: Vec<f32>,
}

/// How far ahead of the V row it reads `pv` prefetches (keys): from DRAM on the 2-vCPU Xeon, one
/// sequence's 1024 f16 V rows of one kv head (2 query rows) took 31 us with none, 20.9 / 19.8 /
/// 19.6 us with 4 / 8 / 12 (a throwaway harness, V copies cycled through 1 GiB).
const V_AHEAD: usize = 8;

/// Query tokens per work item: enough that an item has about 32 query rows.
pub fn tile_tokens(cfg: &ModelConfig) -> usize {
    (32 / cfg.gqa_group).max(1)
}

/// Score rows each pool thread needs: one per query row of an item.
pub fn score_rows(cfg: &ModelConfig) -> usize {
    cfg.gqa_group * tile_tokens(cfg)
}

/// Length of a score row for contexts up to `max_ctx`: whole K tiles (the primitives write all
/// 16 lanes of a tile).
pub fn score_stride(max_ctx: usize) -> usize {
    max_ctx.max(1).next_multiple_of(KEY_TILE)
}

/// One query row of an item: where its q is, where its output goes, its position.
#[derive(Clone, Copy, Default)]
pub(crate) struct QRow {
    q: usize,
    out: usize,
    pos: usize,
}

/// One work item: `rows` query rows (all of kv head `kv_head`, of one sequence), with this
/// thread's score block and the output.
pub(crate) struct Item<'a> {
    ops: AttnOps,
    layer: usize,
    seq: &'a SeqCache,
    kv_head: usize,
    hd: usize,
    rows: &'a [QRow],
    qkv: &'a [f32],
    /// `[rows][stride]`
    scores: &'a mut [f32],
    stride: usize,
    out: SyncPtr<f32>,
}

/// Runs of consecutive rows (at most [`MAX_ROWS`]) that need the same number of `unit`-key
/// pieces of the chunk at `j0` (at most `max`; row `r` sees keys `0..=pos_r`); rows that need
/// none are skipped. Yields `(first row, rows, pieces)`. Rows come in position order, so runs
/// are long.
fn runs(rows: &[QRow], j0: usize, unit: usize, max: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let need = move |r: &QRow| if r.pos < j0 { 0 } else { ((r.pos - j0) / unit + 1).min(max) };
    let mut r = 0;
    std::iter::from_fn(move || {
        while r < rows.len() && need(&rows[r]) == 0 {
            r += 1;
        }
        let (r0, k) = (r, need(rows.get(r)?));
        while r < rows.len() && r - r0 < MAX_ROWS && need(&rows[r]) == k {
            r += 1;
        }
        Some((r0, r - r0, k))
    })
}

impl Item<'_> {
    /// Scores, softmax and the V sum of the item, in chunks of [`KEY_CHUNK`] keys: each K tile
    /// or V row loaded serves up to [`MAX_ROWS`] query rows per call. Row `r` sees keys
    /// `0..=pos_r` only (its score lanes past that are computed and ignored). f16 rows are widened
    /// in registers by the primitives.
    fn run<T: KvElem>(&mut self, kv: &KvRows<'_, T>) {
        let (ops, hd, stride, rows) = (self.ops, self.hd, self.stride, self.rows);
        let (layer, seq, kv_head) = (self.layer, self.seq, self.kv_head);
        let scale = 1.0f32 / (hd as f32).sqrt();
        let last = rows.iter().map(|r| r.pos).max().unwrap_or(0);
        const TILES: usize = KEY_CHUNK / KEY_TILE;
        // The K tiles of the chunk from `j0` (up to TILES, as far as `last`).
        let tiles_at = |j0: usize| {
            let n = if j0 <= last { (last + 1 - j0).div_ceil(KEY_TILE).min(TILES) } else { 0 };
            let mut tiles: [&[T]; TILES] = [&[]; TILES];
            for (t, tile) in tiles[..n].iter_mut().enumerate() {
                *tile = kv.k_tile(layer, seq, j0 + t * KEY_TILE, kv_head);
            }
            (tiles, n)
        };
        // scores[r][j] = q_r . k_j * scale
        let (mut tiles, mut nt) = tiles_at(0);
        for j0 in (0..=last).step_by(KEY_CHUNK) {
            // the next chunk's tiles: prefetched by this chunk's first call, read by the next
            let (next, na) = tiles_at(j0 + KEY_CHUNK);
            let mut ahead = &next[..na];
            for (r0, n, k) in runs(rows, j0, KEY_TILE, nt) {
                let mut qs: [&[f32]; MAX_ROWS] = [&[]; MAX_ROWS];
                for (q, r) in qs.iter_mut().zip(&rows[r0..r0 + n]) {
                    *q = &self.qkv[r.q..r.q + hd];
                }
                let ah = std::mem::take(&mut ahead);
                ops.dots(
                    &qs[..n],
                    &tiles[..k],
                    &ah[..ah.len().min(k)],
                    scale,
                    &mut self.scores[r0 * stride + j0..],
                    stride,
                );
            }
            (tiles, nt) = (next, na);
        }
        for (r, qr) in rows.iter().enumerate() {
            ops.softmax(&mut self.scores[r * stride..r * stride + qr.pos + 1]);
            // SAFETY: this output slice belongs to this item only.
            unsafe { self.out.slice(qr.out, hd) }.fill(0.0);
        }
        // out_r = sum_j p_rj v_j
        for j0 in (0..=last).step_by(KEY_CHUNK) {
            let nk = (last + 1 - j0).min(KEY_CHUNK);
            // the chunk's V rows and the V_AHEAD after them: rows V_AHEAD.. are prefetched by the
            // chunk's first call
            let mut win: [&[T]; KEY_CHUNK + V_AHEAD] = [&[]; KEY_CHUNK + V_AHEAD];
            let nw = (last + 1 - j0).min(KEY_CHUNK + V_AHEAD);
            for (i, v) in win[..nw].iter_mut().enumerate() {
                *v = kv.v_row(layer, seq, j0 + i, kv_head);
            }
            let (vs, mut ahead) = (&win[..nk], &win[V_AHEAD.min(nw)..nw]);
            for (r0, n, k) in runs(rows, j0, 1, nk) {
                let mut outs: [&mut [f32]; MAX_ROWS] = Default::default();
                for (o, r) in outs.iter_mut().zip(&rows[r0..r0 + n]) {
                    // SAFETY: this output slice belongs to this item only (one per row).
                    *o = unsafe { self.out.slice(r.out, hd) };
                }
                let ah = std::mem::take(&mut ahead);
                ops.pv(&mut outs[..n], &vs[..k], &ah[..ah.len().min(k)], &self.scores[r0 * stride + j0..], stride);
            }
        }
    }
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
    let (g, qkv_stride, stride) = (cfg.gqa_group, cfg.q_dim + 2 * cfg.kv_dim, score_stride(s.max_ctx));
    // Units: for each chunk (in step order; token offsets contiguous), kv head, tile of up to
    // `tile_n` tokens, and query head of the kv head's group. Each thread takes an even,
    // contiguous share of the units and runs the units it holds of one (kv head, tile) as one item,
    // so every K/V row it loads serves all of their query rows: whole groups, except where a
    // share ends inside one. One-sequence decode on 2 threads (5 kv heads of 4 query heads): 4 +
    // 4 + 2 query rows on each thread. No row's arithmetic depends on the grouping. Kernel bench
    // (`-- attn avx512 dram`, 1024 f16 keys from DRAM, one core): one item of 4 rows 55 us, two of
    // 2 rows 46 + 16 (the second from L2); before, each kv head was split into two items of 2 rows
    // (10 items, 5 per thread) to balance the threads.
    let tile_n = tile_tokens(cfg);
    let tiles_total: usize = seqs.iter().map(|c| c.tokens.len().div_ceil(tile_n)).sum();
    let n_units = tiles_total * cfg.num_kv_heads * g;
    let (tok_pos, qkv) = (&s.tok_pos, &s.qkv);
    let out = SyncPtr::new(&mut s.attn);
    let sc_p = SyncPtr::new(&mut s.scores);
    let rows_p = SyncPtr::new(&mut s.q_rows);
    let n_rows = score_rows(cfg);
    let per_thread = n_rows * stride;
    let ops = s.attn_ops;
    pool.run(|tid, nt| {
        let range = bitnet_cpu::split_range(n_units, nt, tid, 1);
        if range.is_empty() {
            return;
        }
        // SAFETY: thread `tid` owns score block `tid` and its items' outputs.
        let scores = unsafe { sc_p.slice(tid * per_thread, per_thread) };
        let rows = unsafe { rows_p.slice(tid * n_rows, n_rows) };
        // Walk the chunks in order to find each unit's chunk, kv head and tile.
        let (mut base, mut tok_base) = (0, 0);
        for c in seqs {
            let n = c.tokens.len();
            let tiles = n.div_ceil(tile_n);
            let span = cfg.num_kv_heads * tiles * g;
            let (mut u, hi) = (range.start.max(base), range.end.min(base + span));
            while u < hi {
                // this (kv head, tile) group's query heads h..h_end, as far as the share goes
                let (group, h) = ((u - base) / g, (u - base) % g);
                let (kvh, tile) = (group / tiles, group % tiles);
                let h_end = g.min(h + (hi - u));
                let t0 = tile * tile_n;
                let t1 = (t0 + tile_n).min(n);
                let mut nr = 0;
                for t in t0..t1 {
                    let i = tok_base + t;
                    for h in kvh * g + h..kvh * g + h_end {
                        rows[nr] = QRow { q: i * qkv_stride + h * hd, out: i * cfg.q_dim + h * hd, pos: tok_pos[i] };
                        nr += 1;
                    }
                }
                let mut work = Item {
                    ops,
                    layer,
                    seq: c.seq,
                    kv_head: kvh,
                    hd,
                    rows: &rows[..nr],
                    qkv,
                    scores: &mut *scores,
                    stride,
                    out,
                };
                match &kv {
                    KvView::F32(rows) => work.run(rows),
                    KvView::F16(rows) => work.run(rows),
                    KvView::I8(rows) => work.run(rows),
                }
                u += h_end - h;
            }
            base += span;
            tok_base += n;
        }
    });
}
