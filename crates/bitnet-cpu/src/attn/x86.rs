//! AVX-512F and AVX2 versions of the attention primitives, written once over a 16-lane unit
//! ([`V16`]: one zmm register, or two ymm registers holding lanes 0-7 and 8-15). Each performs
//! exactly the IEEE operations of `generic.rs` (the same fused multiply-adds, multiplies and
//! adds; the same 16 lane sums and tree), so results are bit-identical (tested in `mod.rs`).

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

/// 16 f32 lanes. `max`/`min` are x86's (`a > b ? a : b`, `a < b ? a : b`: the second operand on
/// NaN), as `generic` writes them.
trait V16: Copy {
    /// Units `pv` keeps in registers per pass.
    const UNITS: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn load_kv<T: KvElem>(p: *const T) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    /// `self * b + c` with one rounding (FMA), as `f32::mul_add`.
    unsafe fn fmadd(self, b: Self, c: Self) -> Self;
    unsafe fn max(self, o: Self) -> Self;
    unsafe fn min(self, o: Self) -> Self;
    unsafe fn floor(self) -> Self;
    /// `2^n` for the integral values `n` in [-127, 127] (0 for -127), built in the exponent bits.
    unsafe fn pow2(self) -> Self;
    /// `generic::tree16` of the lanes.
    unsafe fn tree(self) -> f32;
    /// The largest lane (exact in any order).
    unsafe fn hmax(self) -> f32;
}

/// Lanes 0..4 + 4..8, then 0..2 + 2..4, then 0 + 1: the last three levels of `generic::tree16`.
#[inline(always)]
unsafe fn tree8(s8: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
}

impl V16 for __m512 {
    const UNITS: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_kv<T: KvElem>(p: *const T) -> Self {
        T::ld16(p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm512_storeu_ps(p, self)
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        _mm512_add_ps(self, o)
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        _mm512_sub_ps(self, o)
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        _mm512_mul_ps(self, o)
    }
    #[inline(always)]
    unsafe fn fmadd(self, b: Self, c: Self) -> Self {
        _mm512_fmadd_ps(self, b, c)
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        _mm512_max_ps(self, o)
    }
    #[inline(always)]
    unsafe fn min(self, o: Self) -> Self {
        _mm512_min_ps(self, o)
    }
    #[inline(always)]
    unsafe fn floor(self) -> Self {
        _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(self)
    }
    #[inline(always)]
    unsafe fn pow2(self) -> Self {
        let e = _mm512_max_epi32(
            _mm512_add_epi32(_mm512_cvttps_epi32(self), _mm512_set1_epi32(127)),
            _mm512_setzero_si512(),
        );
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
    }
    #[inline(always)]
    unsafe fn tree(self) -> f32 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self)));
        tree8(_mm256_add_ps(_mm512_castps512_ps256(self), hi))
    }
    #[inline(always)]
    unsafe fn hmax(self) -> f32 {
        _mm512_reduce_max_ps(self)
    }
}

/// Lanes 0-7 and 8-15.
#[derive(Clone, Copy)]
struct Y2(__m256, __m256);

impl V16 for Y2 {
    const UNITS: usize = 4;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Y2(_mm256_setzero_ps(), _mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Y2(_mm256_set1_ps(x), _mm256_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Y2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
    }
    #[inline(always)]
    unsafe fn load_kv<T: KvElem>(p: *const T) -> Self {
        Y2(T::ld8(p), T::ld8(p.add(8)))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self.0);
        _mm256_storeu_ps(p.add(8), self.1);
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        Y2(_mm256_add_ps(self.0, o.0), _mm256_add_ps(self.1, o.1))
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        Y2(_mm256_sub_ps(self.0, o.0), _mm256_sub_ps(self.1, o.1))
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Y2(_mm256_mul_ps(self.0, o.0), _mm256_mul_ps(self.1, o.1))
    }
    #[inline(always)]
    unsafe fn fmadd(self, b: Self, c: Self) -> Self {
        Y2(_mm256_fmadd_ps(self.0, b.0, c.0), _mm256_fmadd_ps(self.1, b.1, c.1))
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        Y2(_mm256_max_ps(self.0, o.0), _mm256_max_ps(self.1, o.1))
    }
    #[inline(always)]
    unsafe fn min(self, o: Self) -> Self {
        Y2(_mm256_min_ps(self.0, o.0), _mm256_min_ps(self.1, o.1))
    }
    #[inline(always)]
    unsafe fn floor(self) -> Self {
        const F: i32 = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
        Y2(_mm256_round_ps::<F>(self.0), _mm256_round_ps::<F>(self.1))
    }
    #[inline(always)]
    unsafe fn pow2(self) -> Self {
        let p = |v: __m256| {
            let e = _mm256_max_epi32(
                _mm256_add_epi32(_mm256_cvttps_epi32(v), _mm256_set1_epi32(127)),
                _mm256_setzero_si256(),
            );
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e))
        };
        Y2(p(self.0), p(self.1))
    }
    #[inline(always)]
    unsafe fn tree(self) -> f32 {
        tree8(_mm256_add_ps(self.0, self.1))
    }
    #[inline(always)]
    unsafe fn hmax(self) -> f32 {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_max_ps(self.0, self.1));
        lanes.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
    }
}

/// `generic::exp`, op for op.
#[inline(always)]
unsafe fn exp<V: V16>(x: V) -> V {
    let x = x.max(V::splat(EXP_LO)).min(V::splat(EXP_HI));
    let fx = x.mul(V::splat(LOG2E)).add(V::splat(0.5)).floor();
    let r = x.sub(fx.mul(V::splat(LN2_HI)));
    let r = r.sub(fx.mul(V::splat(LN2_LO)));
    let z = r.mul(r);
    let mut y = V::splat(P[0]);
    for &p in &P[1..] {
        y = y.mul(r).add(V::splat(p));
    }
    let y = y.mul(z).add(r).add(V::splat(1.0));
    y.mul(fx.pow2())
}

/// `generic::dot` of `N` keys at once: `N` independent accumulator chains (one key's eight
/// dependent adds would leave the adders idle), each key's operations in exactly that order, so
/// the results are the same bits.
#[inline(always)]
unsafe fn dots_n<V: V16, T: KvElem, const N: usize>(q: &[f32], k: &[&[T]]) -> [f32; N] {
    let n = q.len() / 16 * 16;
    let qp = q.as_ptr();
    // Plain loops, no closures: this function has no target features of its own (it is inlined
    // into functions that do), a closure in it gets none either, and the intrinsics in one were
    // left as calls (4x slower, measured).
    let mut kp = [std::ptr::null::<T>(); N];
    for j in 0..N {
        kp[j] = k[j].as_ptr();
    }
    let mut acc = [V::zero(); N];
    let mut i = 0;
    while i < n {
        let qv = V::load(qp.add(i));
        for j in 0..N {
            acc[j] = qv.fmadd(V::load_kv(kp[j].add(i)), acc[j]);
        }
        i += 16;
    }
    let mut s = [0f32; N];
    for j in 0..N {
        s[j] = acc[j].tree();
        for i in n..q.len() {
            s[j] = q[i].mul_add(k[j][i].to_f32(), s[j]);
        }
    }
    s
}

/// Caller checks: every `ks[c].len() >= q.len()`, `out.len() >= ks.len()`.
#[inline(always)]
unsafe fn dots<V: V16, T: KvElem>(q: &[f32], ks: &[&[T]], scale: f32, out: &mut [f32]) {
    let n4 = ks.len() / 4 * 4;
    for (o, k) in out[..n4].chunks_exact_mut(4).zip(ks[..n4].chunks_exact(4)) {
        let d = dots_n::<V, T, 4>(q, k);
        for j in 0..4 {
            o[j] = d[j] * scale;
        }
    }
    for (o, k) in out[n4..].iter_mut().zip(&ks[n4..]) {
        *o = dots_n::<V, T, 1>(q, std::slice::from_ref(k))[0] * scale;
    }
}

#[inline(always)]
unsafe fn softmax<V: V16>(s: &mut [f32]) {
    let n = s.len() / 16 * 16;
    let p = s.as_mut_ptr();
    let mut vm = V::splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i < n {
        vm = V::load(p.add(i)).max(vm);
        i += 16;
    }
    let mut mx = vm.hmax();
    for &v in &s[n..] {
        mx = if v > mx { v } else { mx };
    }
    let (vmx, mut acc) = (V::splat(mx), V::zero());
    let mut i = 0;
    while i < n {
        let e = exp(V::load(p.add(i)).sub(vmx));
        e.store(p.add(i));
        acc = acc.add(e);
        i += 16;
    }
    let mut sum = acc.tree();
    for v in s[n..].iter_mut() {
        *v = generic::exp(*v - mx);
        sum = sum + *v;
    }
    let inv = 1.0 / sum;
    let vinv = V::splat(inv);
    let mut i = 0;
    while i < n {
        V::load(p.add(i)).mul(vinv).store(p.add(i));
        i += 16;
    }
    for v in s[n..].iter_mut() {
        *v = *v * inv;
    }
}

/// `U` units of `out` from `d` held in registers over all keys.
#[inline(always)]
unsafe fn pv_block<V: V16, T: KvElem, const U: usize>(o: *mut f32, vs: &[&[T]], p: &[f32], d: usize) {
    let mut acc = [V::zero(); U];
    for (j, a) in acc.iter_mut().enumerate() {
        *a = V::load(o.add(d + 16 * j));
    }
    for (v, &pc) in vs.iter().zip(p) {
        let (pb, vp) = (V::splat(pc), v.as_ptr().add(d));
        for (j, a) in acc.iter_mut().enumerate() {
            *a = pb.fmadd(V::load_kv(vp.add(16 * j)), *a);
        }
    }
    for (j, a) in acc.iter().enumerate() {
        a.store(o.add(d + 16 * j));
    }
}

/// Caller checks: every `vs[c].len() >= out.len()`, `p.len() >= vs.len()`.
#[inline(always)]
unsafe fn pv<V: V16, T: KvElem, const U: usize>(out: &mut [f32], vs: &[&[T]], p: &[f32]) {
    let len = out.len();
    let o = out.as_mut_ptr();
    let mut d = 0;
    while d + 16 * U <= len {
        pv_block::<V, T, U>(o, vs, p, d);
        d += 16 * U;
    }
    while d + 16 <= len {
        pv_block::<V, T, 1>(o, vs, p, d);
        d += 16;
    }
    if d < len {
        generic::pv(&mut out[d..], &vs_tail(vs, d), p);
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

/// The entry points of one instruction set: the generic bodies above instantiated for its unit.
macro_rules! level {
    ($m:ident, $feat:literal, $v:ty) => {
        pub(super) mod $m {
            use super::*;

            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn dots<T: KvElem>(q: &[f32], ks: &[&[T]], scale: f32, out: &mut [f32]) {
                super::dots::<$v, T>(q, ks, scale, out)
            }
            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn softmax(s: &mut [f32]) {
                super::softmax::<$v>(s)
            }
            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn pv<T: KvElem>(out: &mut [f32], vs: &[&[T]], p: &[f32]) {
                super::pv::<$v, T, { <$v as V16>::UNITS }>(out, vs, p)
            }
        }
    };
}

level!(avx512, "avx512f", __m512);
level!(avx2, "avx2,fma,f16c", Y2);
