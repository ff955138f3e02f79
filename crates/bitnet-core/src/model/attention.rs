//! Causal grouped-query attention over the paged KV cache.
//! Query head `h` reads kv head `h / (num_heads / num_kv_heads)`; scale `1/sqrt(head_dim)`
//! applied after the dot, softmax in f32, as transformers' eager attention.
//!
//! Work is split into items of (chunk, kv head, tile of up to `TILE` consecutive tokens): every K
//! and V row loaded from the cache serves all `gqa_group x TILE` query rows of the item (in
//! decode, the group's query heads share each load; in prefill, tokens do too). The threads take
//! even shares of the query heads of all items; where a share ends inside an item (one sequence
//! decoding: 5 kv heads on 2 threads), the two threads split it by pass (one the K pass, the
//! other the V pass: [`attend`]). An item walks
//! its keys in chunks of 64: the chunk's K tiles (16 positions each, stored transposed by the
//! cache) or V rows go to the primitives (`bitnet_cpu::attn`) with up to 4 query rows at a time,
//! each call also naming what the item reads next, for prefetching. Each query row's arithmetic
//! is independent of which rows share its item or its call, so results depend neither on the
//! batch nor on the thread count.

use std::sync::atomic::Ordering;

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
        self.scores_pass(kv);
        self.values_pass(kv);
    }

    /// The K half of [`Item::run`]: each row's softmaxed scores into `self.scores`.
    fn scores_pass<T: KvElem>(&mut self, kv: &KvRows<'_, T>) {
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
        }
    }

    /// The V half of [`Item::run`], from the scores [`Item::scores_pass`] left in `self.scores`.
    fn values_pass<T: KvElem>(&mut self, kv: &KvRows<'_, T>) {
        let (ops, hd, stride, rows) = (self.ops, self.hd, self.stride, self.rows);
        let (layer, seq, kv_head) = (self.layer, self.seq, self.kv_head);
        let last = rows.iter().map(|r| r.pos).max().unwrap_or(0);
        for qr in rows {
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

/// Which passes of an item a thread runs (see [`attend`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Whole,
    /// K and softmax only, into the thread's handoff score block, then its flag is raised.
    Scores,
    /// V only, from the handoff block of the thread before, once its flag is up.
    Values,
}

impl Item<'_> {
    fn pass<T: KvElem>(&mut self, kv: &KvRows<'_, T>, pass: Pass) {
        match pass {
            Pass::Whole => self.run(kv),
            Pass::Scores => self.scores_pass(kv),
            Pass::Values => self.values_pass(kv),
        }
    }
}

/// One (chunk, kv head, tile) group of query rows, as a thread's walk over its units meets it.
struct Group {
    /// chunk index, and the offsets of its units and tokens in the step
    chunk: usize,
    base: usize,
    tok_base: usize,
    /// (kv head, tile) index within the chunk, and the query heads of the group this thread holds
    index: usize,
    h: usize,
    h_end: usize,
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
    // share ends inside one. There, if the group spans just two threads, they split it by pass
    // instead of by rows, so its K and V are each read once: the first runs the K pass and
    // softmax of all its rows (before anything else), the second the V pass (after everything
    // else, by then long ready). One-sequence decode on 2 threads (5 kv heads of 4 query heads):
    // 2 whole groups and half of the third on each, where a split by rows had both threads read
    // the third's K and V (6 kv heads' bytes read for 5). A group spread over more threads (more
    // threads than groups) stays split by rows. No row's arithmetic depends on the split.
    let tile_n = tile_tokens(cfg);
    let tiles_total: usize = seqs.iter().map(|c| c.tokens.len().div_ceil(tile_n)).sum();
    let n_units = tiles_total * cfg.num_kv_heads * g;
    let (tok_pos, qkv) = (&s.tok_pos, &s.qkv);
    let out = SyncPtr::new(&mut s.attn);
    let sc_p = SyncPtr::new(&mut s.scores);
    let rows_p = SyncPtr::new(&mut s.q_rows);
    s.handoff.iter_mut().for_each(|f| *f.get_mut() = false);
    let ready = &s.handoff;
    let n_rows = score_rows(cfg);
    let per_thread = n_rows * stride;
    let ops = s.attn_ops;
    pool.run(|tid, nt| {
        let range = bitnet_cpu::split_range(n_units, nt, tid, 1);
        if range.is_empty() {
            return;
        }
        let owner = |u: usize| (0..nt).find(|&t| bitnet_cpu::split_range(n_units, nt, t, 1).contains(&u));
        // For a group cut by a share boundary that spans just two threads: those two (the first
        // runs its K pass, the second its V pass); whole groups and wider spreads: None.
        let handed = |grp: &Group| {
            let gs = grp.base + grp.index * g;
            match (owner(gs), owner(gs + g - 1)) {
                (Some(a), Some(b)) if b == a + 1 && (grp.h > 0 || grp.h_end < g) => Some((a, b)),
                _ => None,
            }
        };
        // Calls `f` on each group overlapping units `lo..hi`, with the query heads held there.
        let for_groups = |lo: usize, hi: usize, f: &mut dyn FnMut(Group)| {
            let (mut base, mut tok_base) = (0, 0);
            for (chunk, c) in seqs.iter().enumerate() {
                let span = cfg.num_kv_heads * c.tokens.len().div_ceil(tile_n) * g;
                let (mut u, end) = (lo.max(base), hi.min(base + span));
                while u < end {
                    let (index, h) = ((u - base) / g, (u - base) % g);
                    let h_end = g.min(h + (end - u));
                    f(Group { chunk, base, tok_base, index, h, h_end });
                    u += h_end - h;
                }
                base += span;
                tok_base += c.tokens.len();
            }
        };
        // SAFETY: thread `tid` owns score blocks `tid` and `nt + tid` (the latter is read by
        // thread `tid + 1` only after `ready[tid]` is raised, and not written again this call),
        // and the outputs of the rows it runs whole or the V pass of.
        let (own_scores, own_rows) =
            unsafe { (sc_p.slice(tid * per_thread, per_thread), rows_p.slice(tid * n_rows, n_rows)) };
        let mut run = |grp: &Group, pass: Pass| {
            let c = &seqs[grp.chunk];
            let n = c.tokens.len();
            let tiles = n.div_ceil(tile_n);
            let (kvh, tile) = (grp.index / tiles, grp.index % tiles);
            let (h0, h1) = if pass == Pass::Whole { (grp.h, grp.h_end) } else { (0, g) };
            let (t0, t1) = (tile * tile_n, (tile * tile_n + tile_n).min(n));
            let mut nr = 0;
            for t in t0..t1 {
                let i = grp.tok_base + t;
                for h in kvh * g + h0..kvh * g + h1 {
                    own_rows[nr] = QRow { q: i * qkv_stride + h * hd, out: i * cfg.q_dim + h * hd, pos: tok_pos[i] };
                    nr += 1;
                }
            }
            let scores: &mut [f32] = match pass {
                Pass::Whole => &mut *own_scores,
                // SAFETY: see above; block `nt + tid` is this thread's to write.
                Pass::Scores => unsafe { sc_p.slice((nt + tid) * per_thread, per_thread) },
                Pass::Values => {
                    let a = tid - 1;
                    let mut spins = 0u32;
                    while !ready[a].load(Ordering::Acquire) {
                        spins = spins.saturating_add(1);
                        if spins < 1 << 12 {
                            std::hint::spin_loop();
                        } else {
                            std::thread::yield_now();
                        }
                    }
                    // SAFETY: thread `a` wrote this block before raising its flag and is done with it.
                    unsafe { sc_p.slice((nt + a) * per_thread, per_thread) }
                }
            };
            let mut work =
                Item { ops, layer, seq: c.seq, kv_head: kvh, hd, rows: &own_rows[..nr], qkv, scores, stride, out };
            match &kv {
                KvView::F32(rows) => work.pass(rows, pass),
                KvView::F16(rows) => work.pass(rows, pass),
                KvView::I8(rows) => work.pass(rows, pass),
            }
            if pass == Pass::Scores {
                ready[tid].store(true, Ordering::Release);
            }
        };
        // The group this thread's share ends in, if handed on: its K pass first.
        for_groups(range.end - 1, range.end, &mut |grp| {
            if matches!(handed(&grp), Some((a, _)) if a == tid) {
                run(&grp, Pass::Scores);
            }
        });
        // Whole groups, and groups split by rows; the one handed over is kept for last.
        let mut first_taken = None;
        for_groups(range.start, range.end, &mut |grp| match handed(&grp) {
            Some((_, b)) if b == tid => first_taken = Some(grp),
            Some(_) => {} // handed on: its K pass ran above
            None => run(&grp, Pass::Whole),
        });
        // The group this thread's share starts in, if handed over: its V pass last.
        if let Some(grp) = first_taken {
            run(&grp, Pass::Values);
        }
    });
}
