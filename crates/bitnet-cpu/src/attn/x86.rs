//! AVX-512F and AVX2 versions of the attention primitives. Each performs exactly the IEEE
//! operations of `generic.rs` (multiply, then add; the same lane sums and tree), 16 or 8 lanes
//! at a time, so results are bit-identical (tested in `mod.rs`).

use core::arch::x86_64::*;

use super::exp_consts::*;
use super::{generic, KvElem};

/// Loading K/V elements as f32 vectors: f32 as is, f16 bits through F16C (exact). Public in a
/// private module: a supertrait of the sealed `KvElem`.
pub trait Load: Copy {
    unsafe fn ld16(p: *const Self) -> __m512;
    unsafe fn ld8(p: *const Self) -> __m256;
}

impl Load for f32 {
    #[inline(always)]
    unsafe fn ld16(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn ld8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
}

impl Load for u16 {
    #[inline(always)]
    unsafe fn ld16(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn ld8(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// The exp of `generic::exp`, op for op, on `$w` lanes.
macro_rules! exp_vec {
    ($x:expr, $ps:ident, $epi:ident, $floor:expr) => {{
        paste_ops!($ps, $epi);
        let x = max_ps($x, set1(EXP_LO));
        let x = min_ps(x, set1(EXP_HI));
        let fx = $floor(add_ps(mul_ps(x, set1(LOG2E)), set1(0.5)));
        let r = sub_ps(x, mul_ps(fx, set1(LN2_HI)));
        let r = sub_ps(r, mul_ps(fx, set1(LN2_LO)));
        let z = mul_ps(r, r);
        let mut y = set1(P[0]);
        for &p in &P[1..] {
            y = add_ps(mul_ps(y, r), set1(p));
        }
        let y = add_ps(add_ps(mul_ps(y, z), r), set1(1.0));
        let e = max_epi32(add_epi32(cvtt(fx), set1_epi32(127)), set1_epi32(0));
        mul_ps(y, cast_ps(slli::<23>(e)))
    }};
}

/// Local short names for one vector width (so `exp_vec!` reads like the scalar code).
macro_rules! paste_ops {
    (m512, epi512) => {
        use _mm512_add_epi32 as add_epi32;
        use _mm512_add_ps as add_ps;
        use _mm512_castsi512_ps as cast_ps;
        use _mm512_cvttps_epi32 as cvtt;
        use _mm512_max_epi32 as max_epi32;
        use _mm512_max_ps as max_ps;
        use _mm512_min_ps as min_ps;
        use _mm512_mul_ps as mul_ps;
        use _mm512_set1_epi32 as set1_epi32;
        use _mm512_set1_ps as set1;
        use _mm512_slli_epi32 as slli;
        use _mm512_sub_ps as sub_ps;
    };
    (m256, epi256) => {
        use _mm256_add_epi32 as add_epi32;
        use _mm256_add_ps as add_ps;
        use _mm256_castsi256_ps as cast_ps;
        use _mm256_cvttps_epi32 as cvtt;
        use _mm256_max_epi32 as max_epi32;
        use _mm256_max_ps as max_ps;
        use _mm256_min_ps as min_ps;
        use _mm256_mul_ps as mul_ps;
        use _mm256_set1_epi32 as set1_epi32;
        use _mm256_set1_ps as set1;
        use _mm256_slli_epi32 as slli;
        use _mm256_sub_ps as sub_ps;
    };
}

/// Lanes 0..4 + 4..8, then 0..2 + 2..4, then 0 + 1: the last three levels of `generic::tree16`.
#[inline(always)]
unsafe fn tree8(s8: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
}

pub(super) mod avx512 {
    use super::*;

    #[inline(always)]
    unsafe fn tree16(v: __m512) -> f32 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        tree8(_mm256_add_ps(_mm512_castps512_ps256(v), hi))
    }

    #[inline(always)]
    unsafe fn floor(v: __m512) -> __m512 {
        _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(v)
    }

    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        exp_vec!(x, m512, epi512, floor)
    }

    #[inline(always)]
    unsafe fn dot<T: KvElem>(q: &[f32], k: &[T]) -> f32 {
        let n = q.len() / 16 * 16;
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(qp.add(i)), T::ld16(kp.add(i))));
            i += 16;
        }
        let mut s = tree16(acc);
        for i in n..q.len() {
            s = s + q[i] * k[i].to_f32();
        }
        s
    }

    /// Caller checks: every `ks[c].len() >= q.len()`, `out.len() >= ks.len()`.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn dots<T: KvElem>(q: &[f32], ks: &[&[T]], scale: f32, out: &mut [f32]) {
        for (o, k) in out.iter_mut().zip(ks) {
            *o = dot(q, k) * scale;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn softmax(s: &mut [f32]) {
        let n = s.len() / 16 * 16;
        let p = s.as_mut_ptr();
        let mut vm = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < n {
            vm = _mm512_max_ps(_mm512_loadu_ps(p.add(i)), vm);
            i += 16;
        }
        let mut mx = _mm512_reduce_max_ps(vm);
        for &v in &s[n..] {
            mx = if v > mx { v } else { mx };
        }
        let (vmx, mut acc) = (_mm512_set1_ps(mx), _mm512_setzero_ps());
        let mut i = 0;
        while i < n {
            let e = exp(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vmx));
            _mm512_storeu_ps(p.add(i), e);
            acc = _mm512_add_ps(acc, e);
            i += 16;
        }
        let mut sum = tree16(acc);
        for v in s[n..].iter_mut() {
            *v = generic::exp(*v - mx);
            sum = sum + *v;
        }
        let inv = 1.0 / sum;
        let vinv = _mm512_set1_ps(inv);
        let mut i = 0;
        while i < n {
            _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), vinv));
            i += 16;
        }
        for v in s[n..].iter_mut() {
            *v = *v * inv;
        }
    }

    /// Caller checks: every `vs[c].len() >= out.len()`, `p.len() >= vs.len()`.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn pv<T: KvElem>(out: &mut [f32], vs: &[&[T]], p: &[f32]) {
        const B: usize = 8; // vectors held in registers per pass: 128 values
        let len = out.len();
        let o = out.as_mut_ptr();
        let mut d = 0;
        while d + 16 <= len {
            let nv = ((len - d) / 16).min(B);
            let mut acc = [_mm512_setzero_ps(); B];
            for (j, a) in acc.iter_mut().enumerate().take(nv) {
                *a = _mm512_loadu_ps(o.add(d + 16 * j));
            }
            for (v, &pc) in vs.iter().zip(p) {
                let (pb, vp) = (_mm512_set1_ps(pc), v.as_ptr().add(d));
                for (j, a) in acc.iter_mut().enumerate().take(nv) {
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(pb, T::ld16(vp.add(16 * j))));
                }
            }
            for (j, a) in acc.iter().enumerate().take(nv) {
                _mm512_storeu_ps(o.add(d + 16 * j), *a);
            }
            d += 16 * nv;
        }
        if d < len {
            generic::pv(&mut out[d..], &vs_tail(vs, d), p);
        }
    }
}

pub(super) mod avx2 {
    use super::*;

    #[inline(always)]
    unsafe fn floor(v: __m256) -> __m256 {
        _mm256_round_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(v)
    }

    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        exp_vec!(x, m256, epi256, floor)
    }

    /// Lanes 0..8 and 8..16 of the 16 generic lane sums.
    #[inline(always)]
    unsafe fn dot<T: KvElem>(q: &[f32], k: &[T]) -> f32 {
        let n = q.len() / 16 * 16;
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i < n {
            lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(qp.add(i)), T::ld8(kp.add(i))));
            hi = _mm256_add_ps(hi, _mm256_mul_ps(_mm256_loadu_ps(qp.add(i + 8)), T::ld8(kp.add(i + 8))));
            i += 16;
        }
        let mut s = tree8(_mm256_add_ps(lo, hi));
        for i in n..q.len() {
            s = s + q[i] * k[i].to_f32();
        }
        s
    }

    /// Caller checks: every `ks[c].len() >= q.len()`, `out.len() >= ks.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn dots<T: KvElem>(q: &[f32], ks: &[&[T]], scale: f32, out: &mut [f32]) {
        for (o, k) in out.iter_mut().zip(ks) {
            *o = dot(q, k) * scale;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn softmax(s: &mut [f32]) {
        let n = s.len() / 16 * 16;
        let p = s.as_mut_ptr();
        let mut vm = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < n {
            vm = _mm256_max_ps(_mm256_loadu_ps(p.add(i)), vm);
            vm = _mm256_max_ps(_mm256_loadu_ps(p.add(i + 8)), vm);
            i += 16;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), vm);
        let mut mx = f32::NEG_INFINITY;
        for &v in lanes.iter().chain(&s[n..]) {
            mx = if v > mx { v } else { mx };
        }
        let vmx = _mm256_set1_ps(mx);
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i < n {
            let e0 = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vmx));
            let e1 = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(i + 8)), vmx));
            _mm256_storeu_ps(p.add(i), e0);
            _mm256_storeu_ps(p.add(i + 8), e1);
            lo = _mm256_add_ps(lo, e0);
            hi = _mm256_add_ps(hi, e1);
            i += 16;
        }
        let mut sum = tree8(_mm256_add_ps(lo, hi));
        for v in s[n..].iter_mut() {
            *v = generic::exp(*v - mx);
            sum = sum + *v;
        }
        let inv = 1.0 / sum;
        let vinv = _mm256_set1_ps(inv);
        let mut i = 0;
        while i < n {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vinv));
            _mm256_storeu_ps(p.add(i + 8), _mm256_mul_ps(_mm256_loadu_ps(p.add(i + 8)), vinv));
            i += 16;
        }
        for v in s[n..].iter_mut() {
            *v = *v * inv;
        }
    }

    /// Caller checks: every `vs[c].len() >= out.len()`, `p.len() >= vs.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn pv<T: KvElem>(out: &mut [f32], vs: &[&[T]], p: &[f32]) {
        const B: usize = 8; // vectors held in registers per pass: 64 values (16 ymm registers)
        let len = out.len();
        let o = out.as_mut_ptr();
        let mut d = 0;
        while d + 8 <= len {
            let nv = ((len - d) / 8).min(B);
            let mut acc = [_mm256_setzero_ps(); B];
            for (j, a) in acc.iter_mut().enumerate().take(nv) {
                *a = _mm256_loadu_ps(o.add(d + 8 * j));
            }
            for (v, &pc) in vs.iter().zip(p) {
                let (pb, vp) = (_mm256_set1_ps(pc), v.as_ptr().add(d));
                for (j, a) in acc.iter_mut().enumerate().take(nv) {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(pb, T::ld8(vp.add(8 * j))));
                }
            }
            for (j, a) in acc.iter().enumerate().take(nv) {
                _mm256_storeu_ps(o.add(d + 8 * j), *a);
            }
            d += 8 * nv;
        }
        if d < len {
            generic::pv(&mut out[d..], &vs_tail(vs, d), p);
        }
    }
}

/// `vs` with every row advanced by `d` (at most 16 rows: the primitives' key block), on the stack.
#[inline(always)]
fn vs_tail<'a, T: KvElem>(vs: &[&'a [T]], d: usize) -> super::KeyRows<'a, T> {
    let mut t = super::KeyRows::default();
    for v in vs {
        t.push(&v[d..]);
    }
    t
}
