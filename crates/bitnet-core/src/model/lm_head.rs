//! The LM head: `logits = W_head . norm(x)` for the rows that want logits, vocabulary split
//! across threads. The precision plan picks the stored dtype (exact) or a quantized head (int8
//! per row, 4-bit per 32) whose largest logits are then recomputed from the stored weights.

use std::cmp::Ordering;

use bitnet_cpu::dense::{gemm_rows, gemv_picked, DenseRef};
use bitnet_cpu::kernels::{Int2Matrix, Int4Matrix, Int8Matrix};
use bitnet_cpu::pool::SyncPtr;
use bitnet_cpu::{KernelLevel, QuantActs, ThreadPool};

use crate::precision::{LmHeadPrecision, PrecisionPlan};
use crate::weights::DenseMatrix;

/// int8 weights, one f32 scale per vocabulary row: `w ~= q * scale`; activations stay f32.
pub struct Int8Head {
    rows: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
}

impl Int8Head {
    /// Symmetric per-row quantization: `scale = max|w_r| / 127`, `q = round_half_even(w / scale)`.
    pub fn quantize(w: &DenseMatrix) -> Int8Head {
        let (rows, cols) = (w.rows(), w.cols());
        let mut q = bitnet_cpu::mem::advised(vec![0i8; rows * cols]); // streamed per token
        let mut scale = vec![0f32; rows];
        bitnet_cpu::kernels::par_rows(rows, (&mut q, cols), (&mut scale, 1), |r0, qc, sc| {
            let mut row = vec![0f32; cols];
            for (j, (qr, s_r)) in qc.chunks_mut(cols.max(1)).zip(sc).enumerate() {
                w.row_to_f32(r0 + j, &mut row);
                let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                *s_r = s;
                for (o, &v) in qr.iter_mut().zip(&row) {
                    *o = bitnet_cpu::kernels::round_ties_even(v / s).clamp(-127.0, 127.0) as i8;
                }
            }
        });
        Int8Head { rows, q, scale }
    }
}

/// A quantized head: what a decode step reads instead of the stored weights.
enum Quantized {
    Int8(Int8Head),
    /// int8 weights x int8 activations (per-token scale), packed for the kernel level.
    Int8Int8(Int8Matrix),
    /// 4-bit weights (f16 scale per 32) x int8 activations, packed for the kernel level.
    Int4Int8(Int4Matrix),
    /// 2-bit weights (f16 scale per 32) x int8 activations: ranks for the rescoring pass.
    Int2Int8(Int2Matrix),
}

pub struct LmHead {
    /// A separate `lm_head.weight` in its stored dtype; `None`: the tied embedding (read from
    /// `Model::embed`). Kept beside a quantized head only to rescore with.
    stored: Option<DenseMatrix>,
    /// `None`: the plan's head is the stored one.
    quantized: Option<Quantized>,
    /// Logits per row recomputed from the stored weights (`PrecisionPlan::lm_head_rescore`).
    rescore: usize,
}

/// A dense matrix as the kernels see it.
fn dense_ref(d: &DenseMatrix) -> DenseRef<'_> {
    match d {
        DenseMatrix::F32 { data, .. } => DenseRef::F32(data),
        DenseMatrix::F16 { data, .. } => DenseRef::F16(data),
        DenseMatrix::BF16 { data, .. } => DenseRef::BF16(data),
        DenseMatrix::BF16Packed(p) => DenseRef::PackedBf16(p),
    }
}

impl LmHead {
    /// The head the plan asks for, from the untied `lm_head.weight` if the checkpoint has one,
    /// else the tied embedding; quantized once here and packed for `level`.
    pub fn new(plan: &PrecisionPlan, untied: Option<DenseMatrix>, embed: &DenseMatrix, level: KernelLevel) -> LmHead {
        let w = untied.as_ref().unwrap_or(embed);
        let quantized = match plan.lm_head {
            LmHeadPrecision::Stored => None,
            LmHeadPrecision::Int8 => Some(Quantized::Int8(Int8Head::quantize(w))),
            LmHeadPrecision::Int8Int8 => {
                Some(Quantized::Int8Int8(Int8Matrix::from_dense(dense_ref(w), w.rows(), w.cols(), level)))
            }
            LmHeadPrecision::Int4Int8 => {
                Some(Quantized::Int4Int8(Int4Matrix::from_dense(dense_ref(w), w.rows(), w.cols(), level)))
            }
            LmHeadPrecision::Int2Int8 => {
                Some(Quantized::Int2Int8(Int2Matrix::from_dense(dense_ref(w), w.rows(), w.cols(), level)))
            }
        };
        if quantized.is_none() {
            // streamed once per decoded token
            w.collapse_huge_pages();
        }
        let rescore = if quantized.is_some() { plan.lm_head_rescore.min(w.rows()) } else { 0 };
        // a quantized untied head keeps its stored weights only to rescore from
        let stored = if quantized.is_none() || rescore > 0 { untied } else { None };
        LmHead { stored, quantized, rescore }
    }

    /// How a decode step reads the head: the stored matrix's storage ("bf16", "bf16 (12-bit
    /// lossless packing)", ...), or the plan's quantized form and what it rescores from ("2-bit
    /// x int8, rescoring from bf16 (12-bit lossless packing)").
    pub fn storage(&self, embed: &DenseMatrix) -> String {
        let stored = self.stored.as_ref().unwrap_or(embed).storage();
        let q = match &self.quantized {
            None => return stored.to_string(),
            Some(Quantized::Int8(_)) => "int8 x f32",
            Some(Quantized::Int8Int8(_)) => "int8 x int8",
            Some(Quantized::Int4Int8(_)) => "4-bit x int8",
            Some(Quantized::Int2Int8(_)) => "2-bit x int8",
        };
        if self.rescore > 0 {
            format!("{q}, rescoring from {stored}")
        } else {
            q.to_string()
        }
    }

    /// Logits per row that [`LmHead::forward`] recomputes from the stored weights.
    pub fn rescore_top(&self) -> usize {
        self.rescore
    }

    /// Bytes read per decoded token (one logit row): the head, and the rows rescored.
    pub fn nbytes(&self, embed: &DenseMatrix) -> usize {
        let stored = self.stored.as_ref().unwrap_or(embed);
        match &self.quantized {
            None => stored.nbytes(),
            Some(q) => {
                let rescored = stored.nbytes() / stored.rows() * self.rescore;
                rescored
                    + match q {
                        Quantized::Int8(h) => h.q.len() + 4 * h.scale.len(),
                        Quantized::Int8Int8(m) => m.nbytes() + 4 * m.rows(),
                        Quantized::Int4Int8(m) => m.nbytes(),
                        Quantized::Int2Int8(m) => m.nbytes(),
                    }
            }
        }
    }

    /// `out[i][v] = W[v] . x[i]` for `n` rows of `x` (`[n][hidden]`), the vocabulary split across
    /// threads. One GEMM over all rows: each weight tile is read once for the whole batch (the 656 MB
    /// head of 2B-4T is read once per step, not once per sequence), and each (row, token) value is
    /// the same as a single-token GEMV's, so a sequence's logits do not depend on the batch.
    /// `acts` (capacity >= n, `hidden` columns) receives the int8 rows for the integer heads;
    /// `bufs` serves the rescoring pass.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        pool: &ThreadPool,
        embed: &DenseMatrix,
        x: &[f32],
        n: usize,
        acts: &mut QuantActs,
        bufs: &mut RescoreBufs,
        out: &mut [f32],
    ) {
        let stored = self.stored.as_ref().unwrap_or(embed);
        let hidden = stored.cols();
        let (w, vocab) = match &self.quantized {
            None => (dense_ref(stored), stored.rows()),
            // int8 weights x f32 activations: half the bytes of bf16 (decode is bandwidth bound)
            // without quantizing the final hidden state, which would cost more accuracy.
            Some(Quantized::Int8(h)) => (DenseRef::I8 { q: &h.q, scale: &h.scale }, h.rows),
            // the integer heads: the rows quantized to int8 as a BitLinear input is, then their
            // GEMM on the int8 dot units (the grouped ones also need per-group activation sums)
            Some(q) => {
                Self::quantize_rows(x, hidden, n, acts);
                match q {
                    Quantized::Int8Int8(m) => m.matmul(pool, acts, out, m.rows()),
                    Quantized::Int4Int8(m) => {
                        acts.fill_group_sums();
                        m.matmul(pool, acts, out, m.rows())
                    }
                    Quantized::Int2Int8(m) => {
                        acts.fill_group_sums();
                        m.matmul(pool, acts, out, m.rows())
                    }
                    Quantized::Int8(_) => unreachable!("the f32-activation head is matched above"),
                }
                return self.rescore(pool, stored, x, n, bufs, out);
            }
        };
        let out_p = SyncPtr::new(out);
        let len = n * vocab;
        // Contiguous vocabulary chunks, 16-row aligned so threads never share a cache line of
        // output; balanced between the threads for few rows, as the integer matmuls are
        // (`bitnet_cpu::kernels::BALANCED_MAX_TOKENS`).
        let body = |u: std::ops::Range<usize>| {
            let rows = 16 * u.start..(16 * u.end).min(vocab);
            if rows.is_empty() || n == 0 {
                return;
            }
            // SAFETY: the ranges are disjoint vocabulary rows of each output row.
            let o = unsafe { out_p.slice(rows.start, len - rows.start) };
            gemm_rows(w, hidden, x, hidden, n, rows, o, vocab);
        };
        let units = vocab.div_ceil(16);
        if n <= bitnet_cpu::kernels::BALANCED_MAX_TOKENS {
            pool.run_balanced(units, body);
        } else {
            pool.run(|tid, nt| body(bitnet_cpu::split_range(units, nt, tid, 1)));
        }
        if self.quantized.is_some() {
            self.rescore(pool, stored, x, n, bufs, out);
        }
    }

    /// The rows quantized as a BitLinear input is (per-token absmax int8), for the integer heads;
    /// each (row, token) value is independent of the batch, as in the float GEMM.
    fn quantize_rows(x: &[f32], hidden: usize, n: usize, acts: &mut QuantActs) {
        for t in 0..n {
            acts.quantize_row(t, &x[t * hidden..(t + 1) * hidden]);
        }
        acts.set_n_tok(n);
    }

    /// Replaces each row's `self.rescore` largest logits (as the quantized head ranked them) by
    /// the stored head's, computed by the same GEMM as the exact plan's (per (row, token) the same
    /// summation whatever the tile), so they equal the exact plan's logits for the same `x`.
    /// Three passes, no allocation: each thread ranks its vocabulary chunk of every row; the
    /// caller merges the chunks' lists (the ranking is a total order, so the set does not depend
    /// on the thread count); the threads recompute their share of the picked (row, id) pairs.
    fn rescore(
        &self,
        pool: &ThreadPool,
        stored: &DenseMatrix,
        x: &[f32],
        n: usize,
        b: &mut RescoreBufs,
        out: &mut [f32],
    ) {
        let (k, vocab, hidden) = (self.rescore, stored.rows(), stored.cols());
        if k == 0 || n == 0 {
            return;
        }
        assert!(k <= b.k && n <= b.max_rows && pool.n_threads() <= b.n_threads, "rescore buffers too small");
        let (max_rows, logits) = (b.max_rows, &*out);
        let top = SyncPtr::new(&mut b.top);
        let lens = SyncPtr::new(&mut b.lens);
        pool.run(|tid, nt| {
            let ids = bitnet_cpu::split_range(vocab, nt, tid, 1);
            for r in 0..n {
                let slot = tid * max_rows + r;
                // SAFETY: slot `(tid, r)` is this thread's alone.
                let (h, len) = unsafe { (top.slice(slot * b.k, k), lens.slice(slot, 1)) };
                let mut best = Best { h, len: 0 };
                best.scan(&logits[r * vocab + ids.start..r * vocab + ids.end], ids.start);
                len[0] = best.len;
            }
        });
        b.picks.clear();
        for r in 0..n {
            let mut best = Best { h: &mut b.merged[..k], len: 0 };
            for tid in 0..pool.n_threads() {
                let slot = tid * max_rows + r;
                for &e in &b.top[slot * b.k..slot * b.k + b.lens[slot]] {
                    best.push(e);
                }
            }
            // ids in address order: the stored rows are read front to back
            let picked = &mut best.h[..best.len];
            picked.sort_unstable_by_key(|e| e.1);
            b.picks.extend(picked.iter().map(|e| (r as u32, e.1)));
        }
        let (w, picks) = (dense_ref(stored), &b.picks);
        let (out_p, vals) = (SyncPtr::new(out), SyncPtr::new(&mut b.vals));
        pool.run(|tid, nt| {
            let share = bitnet_cpu::split_range(picks.len(), nt, tid, 1);
            // SAFETY: this thread's share of `vals` is its alone.
            let v = unsafe { vals.slice(share.start, share.len()) };
            gemv_picked(w, hidden, x, hidden, &picks[share.clone()], v);
            for (&(r, id), &v) in picks[share].iter().zip(&*v) {
                // SAFETY: every (row, id) pair is picked once, so each output element has one writer.
                let o = unsafe { out_p.slice(r as usize * vocab + id as usize, 1) };
                o[0] = v;
            }
        });
    }
}

/// Buffers of the rescoring pass, sized once for a scratch (a warmed-up step allocates nothing).
pub struct RescoreBufs {
    k: usize,
    max_rows: usize,
    n_threads: usize,
    /// per (thread, row): the top `k` of the thread's vocabulary chunk, `lens` of them valid
    top: Vec<(f32, u32)>,
    lens: Vec<usize>,
    /// one row's merged top `k`
    merged: Vec<(f32, u32)>,
    /// (row, id) pairs to recompute
    picks: Vec<(u32, u32)>,
    /// their recomputed logits
    vals: Vec<f32>,
}

impl RescoreBufs {
    pub fn new(k: usize, max_rows: usize, n_threads: usize) -> RescoreBufs {
        let (max_rows, n_threads) = (max_rows.max(1), n_threads.max(1));
        RescoreBufs {
            k,
            max_rows,
            n_threads,
            top: vec![(0.0, 0); n_threads * max_rows * k],
            lens: vec![0; n_threads * max_rows],
            merged: vec![(0.0, 0); k],
            picks: Vec::with_capacity(max_rows * k),
            vals: vec![0.0; max_rows * k],
        }
    }
}

/// Ranks `a` above `b`: the larger logit (IEEE total order, so NaNs rank too), ties to the lower
/// id. A total order: a row's top k is one set however the vocabulary is split.
#[inline]
fn above(a: (f32, u32), b: (f32, u32)) -> bool {
    match a.0.total_cmp(&b.0) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => a.1 < b.1,
    }
}

/// The best `h.len()` entries pushed so far: a heap whose root ranks lowest.
struct Best<'a> {
    h: &'a mut [(f32, u32)],
    len: usize,
}

/// `v`'s place in the IEEE total order (`f32::total_cmp`) as an integer.
#[inline]
fn order_key(v: f32) -> i32 {
    let b = v.to_bits() as i32;
    b ^ (((b >> 31) as u32) >> 1) as i32
}

impl Best<'_> {
    /// [`order_key`] of the lowest entry kept, `i32::MIN` until the heap is full: an entry whose
    /// key is below it cannot enter.
    #[inline]
    fn floor(&self) -> i32 {
        if self.len < self.h.len() || self.h.is_empty() {
            i32::MIN
        } else {
            order_key(self.h[0].0)
        }
    }

    /// Pushes `row[i]` with id `first_id + i` for every `i`.
    fn scan(&mut self, row: &[f32], first_id: usize) {
        for (c, chunk) in row.chunks(16).enumerate() {
            // most chunks hold nothing that ranks at or above the lowest entry kept: one
            // vectorized test skips them
            let floor = self.floor();
            if chunk.iter().fold(false, |any, &v| any | (order_key(v) >= floor)) {
                for (i, &v) in chunk.iter().enumerate() {
                    self.push((v, (first_id + 16 * c + i) as u32));
                }
            }
        }
    }

    #[inline]
    fn push(&mut self, e: (f32, u32)) {
        let h = &mut *self.h;
        if self.len < h.len() {
            let mut i = self.len;
            h[i] = e;
            self.len += 1;
            while i > 0 {
                let p = (i - 1) / 2;
                if !above(h[p], h[i]) {
                    break;
                }
                h.swap(p, i);
                i = p;
            }
        } else if !h.is_empty() && above(e, h[0]) {
            h[0] = e;
            let (mut i, n) = (0, self.len);
            loop {
                let (l, r) = (2 * i + 1, 2 * i + 2);
                let mut m = i;
                if l < n && above(h[m], h[l]) {
                    m = l;
                }
                if r < n && above(h[m], h[r]) {
                    m = r;
                }
                if m == i {
                    break;
                }
                h.swap(i, m);
                i = m;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The heap, pushed to or scanning a row, keeps the same set as a full sort by the same
    /// order, for every k, with ties, infinities and NaNs of both signs.
    #[test]
    fn best_matches_a_sort() {
        let mut seed = 0x9e37_79b9_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for case in 0..200 {
            let n = 1 + (next() % 300) as usize;
            let v: Vec<(f32, u32)> = (0..n as u32)
                .map(|i| {
                    let r = next();
                    // few distinct values (ties), and now and then an infinity or a NaN
                    let x = match r % 50 {
                        0 => f32::NAN,
                        1 => -f32::NAN,
                        2 => f32::NEG_INFINITY,
                        _ => ((r >> 8) % 23) as f32 - 11.0,
                    };
                    (x, i)
                })
                .collect();
            let mut sorted = v.clone();
            sorted.sort_by(|a, b| if above(*a, *b) { Ordering::Less } else { Ordering::Greater });
            for k in [0, 1, 2, 7, 64, n, n + 3] {
                let mut buf = vec![(0.0, 0); k];
                let mut want: Vec<u32> = sorted[..k.min(n)].iter().map(|e| e.1).collect();
                want.sort_unstable();
                let mut best = Best { h: &mut buf, len: 0 };
                for &e in &v {
                    best.push(e);
                }
                let mut got: Vec<u32> = best.h[..best.len].iter().map(|e| e.1).collect();
                got.sort_unstable();
                assert_eq!(got, want, "push: case {case}, n {n}, k {k}");
                // the scan over a row (ids from 5) keeps the same set
                let row: Vec<f32> = v.iter().map(|e| e.0).collect();
                let mut best = Best { h: &mut buf, len: 0 };
                best.scan(&row, 5);
                let mut got: Vec<u32> = best.h[..best.len].iter().map(|e| e.1 - 5).collect();
                got.sort_unstable();
                assert_eq!(got, want, "scan: case {case}, n {n}, k {k}");
            }
        }
    }
}
