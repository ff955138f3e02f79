//! RMSNorm, and RMSNorm fused with BitLinear's per-token int8 activation quantization.
//! transformers: `x * rsqrt(mean(x^2) + eps)`, then `* weight`, all f32.

/// `out = w * (x * rsqrt(mean(x^2) + eps))`. Inlined into the per-ISA versions below (it was a
/// baseline-SSE2 call there before).
#[inline(always)]
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    // f64 accumulation: closer to torch's cascade sum than a naive f32 loop. Squares of f32 are
    // exact in f64, and the 8 lane sums (a vector register; one sequential f64 chain was the
    // cost of the norm) differ from any other f64 order by far less than the f32 rounding below.
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += (c[i] as f64) * (c[i] as f64);
        }
    }
    let mut ss = acc.iter().sum::<f64>();
    for &v in rest {
        ss += (v as f64) * (v as f64);
    }
    let var = (ss / x.len() as f64) as f32;
    let r = 1.0f32 / (var + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * r);
    }
}

/// RMSNorm of `x` into `tmp`, then BitNet's ActQuant of it into `q`; returns `(scale, sum of q)`.
/// Compiled for the widest vector unit the CPU has (the crate's baseline is SSE2).
pub fn rms_norm_quant_into(x: &[f32], w: &[f32], eps: f32, tmp: &mut [f32], q: &mut [i8]) -> (f32, i32) {
    #[inline(always)]
    fn body(x: &[f32], w: &[f32], eps: f32, tmp: &mut [f32], q: &mut [i8]) -> (f32, i32) {
        rms_norm(x, w, eps, tmp);
        bitnet_cpu::kernels::quantize_into(tmp, bitnet_cpu::kernels::abs_max(tmp), 1.0, q)
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
