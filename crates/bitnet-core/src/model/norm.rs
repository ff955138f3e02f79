//! RMSNorm, and RMSNorm fused with BitLinear's per-token int8 activation quantization.
//! transformers: `x * rsqrt(mean(x^2) + eps)`, then `* weight`, all f32.

use bitnet_cpu::QuantActs;

/// `out = w * (x * rsqrt(mean(x^2) + eps))`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    // f64 accumulation: closer to torch's cascade sum than a naive f32 loop.
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let var = (ss / x.len() as f64) as f32;
    let r = 1.0f32 / (var + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * r);
    }
}

/// RMSNorm of token row `x` into `tmp`, then quantized into row `t` of `acts`.
/// One pass over the normed row for the absmax; `tmp` is a scratch row of the same length.
pub fn rms_norm_quant(
    x: &[f32],
    w: &[f32],
    eps: f32,
    tmp: &mut [f32],
    acts: &mut QuantActs,
    t: usize,
) {
    rms_norm(x, w, eps, tmp);
    acts.quantize_row(t, tmp);
}
