//! Rotary position embedding, rotate-half layout (dimension j pairs with j + d/2), as
//! transformers' Llama/BitNet: `inv_freq[j] = 1 / theta^(2j/d)` in f32, angle = `pos * inv_freq`
//! as one f32 multiply, tables precomputed once for the whole context.

/// cos/sin tables `[max_pos][d/2]`.
pub struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32, max_pos: usize) -> Rope {
        let half = head_dim / 2;
        // torch: 1.0 / (base ** (arange(0, d, 2).float() / d)), all f32; pow computed in f64 and
        // rounded is the correctly rounded f32 value torch's pow also gives in practice.
        let inv_freq: Vec<f32> = (0..half)
            .map(|j| {
                let e = (2 * j) as f32 / head_dim as f32;
                1.0f32 / ((theta as f64).powf(e as f64) as f32)
            })
            .collect();
        let mut cos = vec![0f32; max_pos * half];
        let mut sin = vec![0f32; max_pos * half];
        for p in 0..max_pos {
            for j in 0..half {
                let a = p as f32 * inv_freq[j];
                cos[p * half + j] = (a as f64).cos() as f32;
                sin[p * half + j] = (a as f64).sin() as f32;
            }
        }
        Rope { half, cos, sin }
    }

    /// Rotates every head of `x` (`n_heads * head_dim` values) in place for position `pos`:
    /// `x1' = x1*cos - x2*sin`, `x2' = x2*cos + x1*sin` (q*cos + rotate_half(q)*sin).
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let h = self.half;
        let cos = &self.cos[pos * h..(pos + 1) * h];
        let sin = &self.sin[pos * h..(pos + 1) * h];
        for head in x.chunks_exact_mut(2 * h) {
            let (a, b) = head.split_at_mut(h);
            for j in 0..h {
                let (x1, x2) = (a[j], b[j]);
                a[j] = x1 * cos[j] - x2 * sin[j];
                b[j] = x2 * cos[j] + x1 * sin[j];
            }
        }
    }

    pub fn max_pos(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }
}
