//! The LM head: `logits = W_head . norm(x)` for the rows that want logits, vocabulary split
//! across threads. The precision plan picks the stored dtype (exact) or int8 with per-row scales.

use bitnet_cpu::dense::{gemv_rows, DenseRef};
use bitnet_cpu::pool::SyncPtr;
use bitnet_cpu::ThreadPool;

use crate::weights::DenseMatrix;

/// int8 weights, one f32 scale per vocabulary row: `w ~= q * scale`; activations stay f32.
pub struct Int8Head {
    rows: usize,
    cols: usize,
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
        Int8Head { rows, cols, q, scale }
    }

    /// int8 weights x f32 activations: halves the bytes read (the decode step is bandwidth bound)
    /// without quantizing the final hidden state, which costs more accuracy than the weights do.
    fn rows_into(&self, x: &[f32], rows: std::ops::Range<usize>, out: &mut [f32]) {
        let c = self.cols;
        for (o, r) in out.iter_mut().zip(rows) {
            let w = &self.q[r * c..(r + 1) * c];
            let mut acc = [0f32; 16];
            let n16 = c / 16 * 16;
            for (wc, xc) in w[..n16].chunks_exact(16).zip(x[..n16].chunks_exact(16)) {
                for k in 0..16 {
                    acc[k] += wc[k] as f32 * xc[k];
                }
            }
            let mut dot: f32 = acc.iter().sum();
            for k in n16..c {
                dot += w[k] as f32 * x[k];
            }
            *o = dot * self.scale[r];
        }
    }
}

pub enum LmHead {
    /// The tied embedding (read from `Model::embed`) in its stored dtype.
    Tied,
    /// A separate `lm_head.weight` in its stored dtype.
    Dense(DenseMatrix),
    Int8(Int8Head),
}

impl LmHead {
    /// Bytes read per decoded token.
    pub fn nbytes(&self, embed: &DenseMatrix) -> usize {
        match self {
            LmHead::Tied => embed.nbytes(),
            LmHead::Dense(d) => d.nbytes(),
            LmHead::Int8(h) => h.q.len() + 4 * h.scale.len(),
        }
    }

    /// `out[i][v] = W[v] . x[i]` for `n` rows of `x` (`[n][hidden]`).
    pub fn forward(&self, pool: &ThreadPool, embed: &DenseMatrix, x: &[f32], n: usize, out: &mut [f32]) {
        let dense = match self {
            LmHead::Tied => Some(embed),
            LmHead::Dense(d) => Some(d),
            LmHead::Int8(_) => None,
        };
        let hidden = embed.cols();
        let vocab = match (dense, self) {
            (Some(d), _) => d.rows(),
            (None, LmHead::Int8(h)) => h.rows,
            _ => unreachable!(),
        };
        let out_p = SyncPtr::new(out);
        pool.run(|tid, nt| {
            // Contiguous vocabulary chunks, 16-row aligned so threads never share a cache line of output.
            let rows = bitnet_cpu::split_range(vocab, nt, tid, 16);
            if rows.is_empty() {
                return;
            }
            for t in 0..n {
                // SAFETY: each thread writes its own vocabulary range of each output row.
                let o = unsafe { out_p.slice(t * vocab + rows.start, rows.len()) };
                match (dense, self) {
                    (Some(d), _) => {
                        let w = match d {
                            DenseMatrix::F32 { data, .. } => DenseRef::F32(data),
                            DenseMatrix::F16 { data, .. } => DenseRef::F16(data),
                            DenseMatrix::BF16 { data, .. } => DenseRef::BF16(data),
                        };
                        gemv_rows(w, hidden, &x[t * hidden..(t + 1) * hidden], rows.clone(), o);
                    }
                    (None, LmHead::Int8(h)) => h.rows_into(&x[t * hidden..(t + 1) * hidden], rows.clone(), o),
                    _ => unreachable!(),
                }
            }
        });
    }
}
