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
pub fn rms_norm_quant(x: &[f32], w: &[f32], eps: f32, tmp: &mut [f32], acts: &mut QuantActs, t: usize) {
    rms_norm(x, w, eps, tmp);
    acts.quantize_row(t, tmp);
}

/// BitNet's ActQuant of one row into `q` (zero padded past `x.len()`): returns the scale
/// `127 / max(|x|).max(1e-5)` and the sum of the quantized values. Same arithmetic as
/// `QuantActs::quantize_row`.
pub fn quantize_into(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let s = 127.0f32 / amax.max(1e-5);
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        let v = (v * s).round_ties_even().clamp(-128.0, 127.0) as i8;
        *o = v;
        sum += v as i32;
    }
    (s, sum)
}
