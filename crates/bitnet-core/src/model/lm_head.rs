//! The LM head: `logits = W_head . norm(x)` for the rows that want logits, vocabulary split
//! across threads. The precision plan picks the stored dtype (exact) or int8 with per-row scales.

use bitnet_cpu::dense::{gemm_rows, DenseRef};
use bitnet_cpu::kernels::{Int4Matrix, Int8Matrix};
use bitnet_cpu::pool::SyncPtr;
use bitnet_cpu::{KernelLevel, QuantActs, ThreadPool};

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
        let mut q = vec![0i8; rows * cols];
        let mut scale = vec![0f32; rows];
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            w.row_to_f32(r, &mut row);
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            scale[r] = s;
            for (o, &v) in q[r * cols..(r + 1) * cols].iter_mut().zip(&row) {
                *o = (v / s).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
        }
        Int8Head { rows, q, scale }
    }
}

pub enum LmHead {
    /// The tied embedding (read from `Model::embed`) in its stored dtype.
    Tied,
    /// A separate `lm_head.weight` in its stored dtype.
    Dense(DenseMatrix),
    Int8(Int8Head),
    /// int8 weights x int8 activations (per-token scale), packed for the kernel level.
    Int8Int8(Int8Matrix),
    /// 4-bit weights (f16 scale per 32) x int8 activations, packed for the kernel level.
    Int4Int8(Int4Matrix),
}

/// A dense matrix as the kernels see it.
fn dense_ref(d: &DenseMatrix) -> DenseRef<'_> {
    match d {
        DenseMatrix::F32 { data, .. } => DenseRef::F32(data),
        DenseMatrix::F16 { data, .. } => DenseRef::F16(data),
        DenseMatrix::BF16 { data, .. } => DenseRef::BF16(data),
    }
}

impl LmHead {
    /// `w` quantized to int8 per row and packed for `level`'s int8 x int8 kernel.
    pub fn int8_int8(w: &DenseMatrix, level: KernelLevel) -> LmHead {
        LmHead::Int8Int8(Int8Matrix::from_dense(dense_ref(w), w.rows(), w.cols(), level))
    }

    /// `w` quantized to 4 bits per group of 32 and packed for `level`'s 4-bit x int8 kernel.
    pub fn int4_int8(w: &DenseMatrix, level: KernelLevel) -> LmHead {
        LmHead::Int4Int8(Int4Matrix::from_dense(dense_ref(w), w.rows(), w.cols(), level))
    }

    /// Bytes read per decoded token.
    pub fn nbytes(&self, embed: &DenseMatrix) -> usize {
        match self {
            LmHead::Tied => embed.nbytes(),
            LmHead::Dense(d) => d.nbytes(),
            LmHead::Int8(h) => h.q.len() + 4 * h.scale.len(),
            LmHead::Int8Int8(m) => m.nbytes() + 4 * m.rows(),
            LmHead::Int4Int8(m) => m.nbytes(),
        }
    }

    /// The weights as the dense kernels see them (`None` for the int8 x int8 head).
    fn weights<'a>(&'a self, embed: &'a DenseMatrix) -> Option<(DenseRef<'a>, usize)> {
        let d = match self {
            LmHead::Tied => embed,
            LmHead::Dense(d) => d,
            // int8 weights x f32 activations: half the bytes of bf16 (decode is bandwidth bound)
            // without quantizing the final hidden state, which would cost more accuracy.
            LmHead::Int8(h) => return Some((DenseRef::I8 { q: &h.q, scale: &h.scale }, h.rows)),
            LmHead::Int8Int8(_) | LmHead::Int4Int8(_) => return None,
        };
        Some((dense_ref(d), d.rows()))
    }

    /// `out[i][v] = W[v] . x[i]` for `n` rows of `x` (`[n][hidden]`), the vocabulary split across
    /// threads. One GEMM over all rows: each weight tile is read once for the whole batch (the 656 MB
    /// head of 2B-4T is read once per step, not once per sequence), and each (row, token) value is
    /// the same as a single-token GEMV's, so a sequence's logits do not depend on the batch.
    /// `acts` (capacity >= n, `hidden` columns) receives the int8 rows for `Int8Int8`.
    pub fn forward(
        &self,
        pool: &ThreadPool,
        embed: &DenseMatrix,
        x: &[f32],
        n: usize,
        acts: &mut QuantActs,
        out: &mut [f32],
    ) {
        let hidden = embed.cols();
        if let LmHead::Int8Int8(_) | LmHead::Int4Int8(_) = self {
            // The rows quantized as a BitLinear input is, then the integer GEMM (rows split
            // across threads; each (row, token) value is independent of the batch, as below).
            for t in 0..n {
                acts.quantize_row(t, &x[t * hidden..(t + 1) * hidden]);
            }
            acts.set_n_tok(n);
            match self {
                LmHead::Int8Int8(m) => m.matmul(pool, acts, out, m.rows()),
                LmHead::Int4Int8(m) => {
                    acts.fill_group_sums();
                    m.matmul(pool, acts, out, m.rows());
                }
                _ => {}
            }
            return;
        }
        let Some((w, vocab)) = self.weights(embed) else { return };
        let out_p = SyncPtr::new(out);
        let len = n * vocab;
        pool.run(|tid, nt| {
            // Contiguous vocabulary chunks, 16-row aligned so threads never share a cache line of output.
            let rows = bitnet_cpu::split_range(vocab, nt, tid, 16);
            if rows.is_empty() || n == 0 {
                return;
            }
            // SAFETY: each thread writes only its own vocabulary range of each output row.
            let o = unsafe { out_p.slice(rows.start, len - rows.start) };
            gemm_rows(w, hidden, x, hidden, n, rows, o, vocab);
        });
    }
}
