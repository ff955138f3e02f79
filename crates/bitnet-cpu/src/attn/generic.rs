//! Scalar definitions of the attention primitives: the reference every SIMD version equals bit
//! for bit. The dot products and V sums accumulate with fused multiply-adds (`f32::mul_add`, one
//! rounding: the FMA instruction every SIMD level has; half the instructions of a multiply then
//! an add, and no less accurate); every other `a * b + c` is a rounded multiply then a rounded add
//! (Rust never fuses), and every sum has the fixed order written in `mod.rs`. The SIMD files
//! perform the same IEEE operations on the same operands, only several lanes at a time. (Where
//! this file is the running level, a CPU without FMA, `mul_add` is a slower software fma.)

use super::exp_consts::*;
use super::{KvElem, KEY_TILE};

/// The 16-lane tree (softmax's sum): `acc[i] += acc[i + w]` for w = 8, 4, 2, 1; returns lane 0.
#[inline(always)]
pub(crate) fn tree16(mut acc: [f32; 16]) -> f32 {
    let mut w = 8;
    while w > 0 {
        for i in 0..w {
            acc[i] = acc[i] + acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}

/// `q . k` for the 16 keys of one K tile (`kt[d * 16 + c]` is element `d` of key `c`): each key's
/// sum runs over `d = 0, 1, ...` in order, `s = fma(q[d], k[d], s)` from 0.
#[inline(always)]
pub fn dot_tile<T: KvElem>(q: &[f32], kt: &[T]) -> [f32; KEY_TILE] {
    let (mut s, hd) = ([0f32; KEY_TILE], q.len());
    for (d, &qd) in q.iter().enumerate() {
        for (c, sc) in s.iter_mut().enumerate() {
            *sc = qd.mul_add(T::k_at(kt, hd, d, c), *sc);
        }
    }
    s
}

/// `out[r * stride + 16 t + c] = dot(qs[r], key c of kts[t]) * scale`.
pub fn dots<T: KvElem>(qs: &[&[f32]], kts: &[&[T]], scale: f32, out: &mut [f32], stride: usize) {
    for (r, q) in qs.iter().enumerate() {
        for (t, kt) in kts.iter().enumerate() {
            let s = dot_tile(q, kt);
            for (o, v) in out[r * stride + t * KEY_TILE..][..KEY_TILE].iter_mut().zip(s) {
                *o = v * scale;
            }
        }
    }
}

/// e^x for softmax: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial,
/// scale by 2^n built in the exponent bits), with x clamped to [-88, 88]; results below 2^-126
/// come out as 0. Within 2 ulp of e^x elsewhere; NaN gives 0 (the clamp drops it).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // `if x > lo { x } else { lo }` is what x86 `max(x, lo)` computes, NaN included.
    let x = if x > EXP_LO { x } else { EXP_LO };
    let x = if x < EXP_HI { x } else { EXP_HI };
    let fx = (x * LOG2E + 0.5).floor();
    let r = x - fx * LN2_HI;
    let r = r - fx * LN2_LO;
    let z = r * r;
    let mut y = P[0];
    for p in &P[1..] {
        y = y * r + p;
    }
    let y = y * z + r + 1.0;
    let n = fx as i32;
    y * f32::from_bits(((n + 127).max(0) as u32) << 23)
}

/// In place: `s = exp(s - max s) / sum`. The max is exact in any order (`v > m` keeps `m` on
/// NaN); the sum: 16 lane sums (lane `i` takes `i, i + 16, ...`), the tree, then the rest in
/// order; then one reciprocal and a multiply per value.
pub fn softmax(s: &mut [f32]) {
    let mut mx = f32::NEG_INFINITY;
    for &v in s.iter() {
        mx = if v > mx { v } else { mx };
    }
    let n = s.len() / 16 * 16;
    let mut acc = [0f32; 16];
    for c in s[..n].chunks_exact_mut(16) {
        for i in 0..16 {
            c[i] = exp(c[i] - mx);
            acc[i] = acc[i] + c[i];
        }
    }
    let mut sum = tree16(acc);
    for v in s[n..].iter_mut() {
        *v = exp(*v - mx);
        sum = sum + *v;
    }
    let inv = 1.0 / sum;
    for v in s.iter_mut() {
        *v = *v * inv;
    }
}

/// `sum exp(s - max)` in the softmax sum's order (16 lane sums, the tree, the rest in order), the
/// exponentials not kept: a log-softmax normalizer.
pub fn sum_exp(s: &[f32], max: f32) -> f32 {
    let n = s.len() / 16 * 16;
    let mut acc = [0f32; 16];
    for c in s[..n].chunks_exact(16) {
        for i in 0..16 {
            acc[i] = acc[i] + exp(c[i] - max);
        }
    }
    let mut sum = tree16(acc);
    for &v in &s[n..] {
        sum = sum + exp(v - max);
    }
    sum
}

/// `out[d] = fma(p[c], vs[c][d], out[d])` for c = 0, 1, ... in order (each element a running sum
/// over keys), for the elements `d0..` of the row (`out` is the whole row: `hd` values).
pub fn pv_row_from<T: KvElem>(out: &mut [f32], vs: &[&[T]], p: &[f32], d0: usize) {
    let hd = out.len();
    for (v, &pc) in vs.iter().zip(p) {
        for (d, o) in out.iter_mut().enumerate().skip(d0) {
            *o = pc.mul_add(T::v_at(v, hd, d), *o);
        }
    }
}

/// [`pv_row_from`] the first element for each output row `r`, with probabilities `p[r * stride..]`.
pub fn pv<T: KvElem>(outs: &mut [&mut [f32]], vs: &[&[T]], p: &[f32], stride: usize) {
    for (r, out) in outs.iter_mut().enumerate() {
        pv_row_from(out, vs, &p[r * stride..], 0);
    }
}
