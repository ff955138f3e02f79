//! RMSNorm, and RMSNorm fused with BitLinear's per-token int8 activation quantization.
//! transformers: `x * rsqrt(mean(x^2) + eps)`, then `* weight`, all f32.

/// `1 / sqrt(mean(x^2) + eps)`.
#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    // f64 accumulation: closer to torch's cascade sum than a naive f32 loop. Squares of f32 are
    // exact in f64, and the 32 lane sums (four AVX-512 registers, four independent add chains:
    // one chain was the cost of the norm) differ from any other f64 order by far less than the
    // f32 rounding below.
    const L: usize = 32;
    let mut acc = [0f64; L];
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            acc[i] += (c[i] as f64) * (c[i] as f64);
        }
    }
    let mut ss = acc.iter().sum::<f64>();
    for &v in rest {
        ss += (v as f64) * (v as f64);
    }
    let var = (ss / x.len() as f64) as f32;
    1.0f32 / (var + eps).sqrt()
}

/// `out = w * (x * rsqrt(mean(x^2) + eps))` (the final norm; the maximum it also takes costs
/// next to nothing there).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm_amax(x, w, eps, out);
}

/// [`rms_norm`], returning `max |out|` (NaN ignored, as `f32::max` does), in 64
/// independent lanes (four AVX-512 registers: `f32::max` is three dependent instructions, so
/// one register's chain was the cost of the loop) so that it vectorizes: the quantizer's scale
/// without a second pass over `out`. The maximum does not depend on the order, so it equals
/// `abs_max(out)`.
#[inline(always)]
fn rms_norm_amax(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> f32 {
    const L: usize = 64;
    let r = inv_rms(x, eps);
    let n = x.len().min(w.len()).min(out.len());
    let (x, w, out) = (&x[..n], &w[..n], &mut out[..n]);
    let mut m = [0f32; L];
    let split = n - n % L;
    for ((o, xc), wc) in out[..split].chunks_exact_mut(L).zip(x.chunks_exact(L)).zip(w.chunks_exact(L)) {
        for k in 0..L {
            let y = wc[k] * (xc[k] * r);
            o[k] = y;
            m[k] = m[k].max(y.abs());
        }
    }
    let mut amax = m.iter().fold(0f32, |a, &v| a.max(v));
    for ((o, &v), &g) in out[split..].iter_mut().zip(&x[split..]).zip(&w[split..]) {
        *o = g * (v * r);
        amax = amax.max(o.abs());
    }
    amax
}

/// RMSNorm of `x` into `tmp`, then BitNet's ActQuant of it into `q`; returns `(scale, sum of q)`.
/// Compiled for the widest vector unit the CPU has (the crate's baseline is SSE2).
pub fn rms_norm_quant_into(x: &[f32], w: &[f32], eps: f32, tmp: &mut [f32], q: &mut [i8]) -> (f32, i32) {
    #[inline(always)]
    fn body(x: &[f32], w: &[f32], eps: f32, tmp: &mut [f32], q: &mut [i8]) -> (f32, i32) {
        let amax = rms_norm_amax(x, w, eps, tmp);
        bitnet_cpu::kernels::quantize_into(&tmp[..x.len()], amax, 1.0, q)
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        unsafe fn avx512(x: &[f32], w: &[f32], eps: f32, tmp: &mut [f32], q: &mut [i8]) -> (f32, i32) {
            body(x, w, eps, tmp, q)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32], w: &[f32], eps: f32, tmp: &mut [f32], q: &mut [i8]) -> (f32, i32) {
            body(x, w, eps, tmp, q)
        }
        if std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vl") {
            // SAFETY: features checked.
            return unsafe { avx512(x, w, eps, tmp, q) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: features checked.
            return unsafe { avx2(x, w, eps, tmp, q) };
        }
    }
    body(x, w, eps, tmp, q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_cpu::kernels::{abs_max, quantize_into};

    /// The fused norm + quantization equals the unfused steps bit for bit (the maximum taken
    /// while normalizing, in lanes, is the maximum of the normalized row), odd lengths included.
    #[test]
    fn fused_amax_matches_separate_passes() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for n in [1usize, 7, 15, 16, 17, 100, 2560, 6912, 6913] {
            for scale in [1e-3f32, 1.0, 40.0] {
                let x: Vec<f32> = (0..n).map(|_| next() * scale).collect();
                let w: Vec<f32> = (0..n).map(|_| next() * 2.0).collect();
                let mut tmp_ref = vec![0f32; n];
                rms_norm(&x, &w, 1e-5, &mut tmp_ref);
                let mut q_ref = vec![0i8; n];
                let want = quantize_into(&tmp_ref, abs_max(&tmp_ref), 1.0, &mut q_ref);
                let (mut tmp, mut q) = (vec![0f32; n], vec![0i8; n]);
                let got = rms_norm_quant_into(&x, &w, 1e-5, &mut tmp, &mut q);
                assert_eq!(got.0.to_bits(), want.0.to_bits(), "scale, n {n}");
                assert_eq!(got.1, want.1, "sum, n {n}");
                assert_eq!(q, q_ref, "codes, n {n}");
            }
        }
    }
}
