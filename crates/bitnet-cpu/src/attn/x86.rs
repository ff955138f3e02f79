//! AVX-512F and AVX2 versions of the attention primitives, written once over a 16-lane unit
//! ([`V16`]: one zmm register, or two ymm registers holding lanes 0-7 and 8-15). Each performs
//! exactly the IEEE operations of `generic.rs` (the same fused multiply-adds, multiplies and
//! adds; the same 16 lane sums and tree), so results are bit-identical (tested in `mod.rs`).

use core::arch::x86_64::*;

use super::exp_consts::*;
use super::{generic, KvElem, KEY_TILE, KV_QBLOCK};

/// Loading K/V elements as f32 vectors: f32 as is, f16 bits through F16C, int8 codes
/// sign-extended and converted (all exact; int8's scales are applied by the callers). Public in a
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

impl Load for i8 {
    #[inline(always)]
    unsafe fn ld16(p: *const i8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
    #[inline(always)]
    unsafe fn ld8(p: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
}

/// 16 f32 lanes. `max`/`min` are x86's (`a > b ? a : b`, `a < b ? a : b`: the second operand on
/// NaN), as `generic` writes them.
trait V16: Copy {
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

/// Scores of `R` query rows against `NT` K tiles: `R x NT` independent accumulator chains (16
/// keys each; at least four chains keep the FMA units busy), each K load serving `R` rows. Every
/// lane's operations are `generic::dot_tile`'s, in its order. Caller checks the lengths.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indexed loops over const-size arrays: see below
unsafe fn dots_block<V: V16, T: KvElem, const R: usize, const NT: usize>(
    qs: &[&[f32]],
    kts: &[&[T]],
    ahead: &[&[T]],
    scale: f32,
    out: *mut f32,
    stride: usize,
) {
    // Plain loops over arrays, no closures: this function has no target features of its own
    // (it is inlined into functions that do), a closure in it gets none either, and the
    // intrinsics in one were left as calls (4x slower, measured).
    let hd = qs[0].len();
    let mut qp = [std::ptr::null::<f32>(); R];
    for r in 0..R {
        qp[r] = qs[r].as_ptr();
    }
    let mut kp = [std::ptr::null::<T>(); NT];
    for t in 0..NT {
        kp[t] = kts[t].as_ptr();
    }
    let mut ap = [std::ptr::null::<T>(); NT];
    for t in 0..NT.min(ahead.len()) {
        ap[t] = ahead[t].as_ptr();
    }
    // `d` steps per cache line of a tile (16 keys of 1, 2 or 4 bytes a step)
    let line_steps = (64 / (KEY_TILE * std::mem::size_of::<T>())).max(1);
    let mut acc = [[V::zero(); NT]; R];
    // int8: the tiles' scales of the current block (16 keys: one vector, one cache line)
    let mut ks = [V::zero(); NT];
    for d in 0..hd {
        if T::SCALED && d % KV_QBLOCK == 0 {
            for t in 0..NT {
                let at = hd * KEY_TILE + 4 * (d / KV_QBLOCK * KEY_TILE);
                ks[t] = V::load(kp[t].add(at) as *const f32);
                if !ap[t].is_null() {
                    _mm_prefetch::<_MM_HINT_T0>(ap[t].add(at) as *const i8);
                }
            }
        }
        let mut k = [V::zero(); NT];
        for t in 0..NT {
            if d % line_steps == 0 && !ap[t].is_null() {
                _mm_prefetch::<_MM_HINT_T0>(ap[t].add(d * KEY_TILE) as *const i8);
            }
            k[t] = V::load_kv(kp[t].add(d * KEY_TILE));
            if T::SCALED {
                k[t] = k[t].mul(ks[t]);
            }
        }
        for r in 0..R {
            let qb = V::splat(*qp[r].add(d));
            for t in 0..NT {
                acc[r][t] = qb.fmadd(k[t], acc[r][t]);
            }
        }
    }
    let sc = V::splat(scale);
    for r in 0..R {
        for t in 0..NT {
            acc[r][t].mul(sc).store(out.add(r * stride + t * KEY_TILE));
        }
    }
}

/// `R` rows against all tiles: four chains or more where the tiles allow, eight where the level
/// has the registers for them (`PAIRS4`: 4 rows x 2 tiles. A chain per row alone leaves 4 FMA
/// chains in flight, latency bound: AVX-512, one kv head's 1024 f32 keys against 4 rows, from
/// cache 35 -> 28 us, from DRAM 99 -> 92; a 32-row prefill tile 199 -> 156 and 264 -> 230).
#[inline(always)]
unsafe fn dots_rows<V: V16, T: KvElem, const R: usize, const PAIRS4: bool>(
    qs: &[&[f32]],
    kts: &[&[T]],
    ahead: &[&[T]],
    scale: f32,
    out: *mut f32,
    stride: usize,
) {
    let mut t = 0;
    let ah = |t: usize| &ahead[t.min(ahead.len())..];
    if R == 1 {
        while t + 4 <= kts.len() {
            dots_block::<V, T, 1, 4>(qs, &kts[t..], ah(t), scale, out.add(t * KEY_TILE), stride);
            t += 4;
        }
    }
    if R <= 2 || PAIRS4 {
        while t + 2 <= kts.len() {
            dots_block::<V, T, R, 2>(qs, &kts[t..], ah(t), scale, out.add(t * KEY_TILE), stride);
            t += 2;
        }
    }
    while t < kts.len() {
        dots_block::<V, T, R, 1>(qs, &kts[t..], ah(t), scale, out.add(t * KEY_TILE), stride);
        t += 1;
    }
}

/// Caller checks: `qs.len() <= MAX_ROWS`, all of one length `hd`, tiles at least `hd * 16`
/// long, `out` holds `qs.len()` rows of `stride >= 16 * kts.len()`.
#[inline(always)]
unsafe fn dots<V: V16, T: KvElem, const PAIRS4: bool>(
    qs: &[&[f32]],
    kts: &[&[T]],
    ahead: &[&[T]],
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    let o = out.as_mut_ptr();
    match qs.len() {
        4 => dots_rows::<V, T, 4, PAIRS4>(qs, kts, ahead, scale, o, stride),
        3 => {
            dots_rows::<V, T, 2, PAIRS4>(qs, kts, ahead, scale, o, stride);
            dots_rows::<V, T, 1, PAIRS4>(&qs[2..], kts, &[], scale, o.add(2 * stride), stride);
        }
        2 => dots_rows::<V, T, 2, PAIRS4>(qs, kts, ahead, scale, o, stride),
        1 => dots_rows::<V, T, 1, PAIRS4>(qs, kts, ahead, scale, o, stride),
        _ => {}
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

#[inline(always)]
unsafe fn sum_exp<V: V16>(s: &[f32], max: f32) -> f32 {
    let n = s.len() / 16 * 16;
    let (p, vmx) = (s.as_ptr(), V::splat(max));
    // two accumulator sets would change the order; one chain of adds is the contract
    let mut acc = V::zero();
    let mut i = 0;
    while i < n {
        acc = acc.add(exp(V::load(p.add(i)).sub(vmx)));
        i += 16;
    }
    let mut sum = acc.tree();
    for &v in &s[n..] {
        sum = sum + generic::exp(v - max);
    }
    sum
}

/// Output elements `d..d + 16 U` of `R` rows held in registers over all keys: each V load
/// serves `R` rows. Caller checks the lengths.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // plain indexed loops, as in `dots_block`
unsafe fn pv_block<V: V16, T: KvElem, const R: usize, const U: usize>(
    o: &[*mut f32; R],
    vs: &[&[T]],
    ahead: &[&[T]],
    hd: usize,
    p: &[*const f32; R],
    d: usize,
) {
    let row_bytes = T::row_len(hd) * std::mem::size_of::<T>();
    let mut acc = [[V::zero(); U]; R];
    for r in 0..R {
        for u in 0..U {
            acc[r][u] = V::load(o[r].add(d + 16 * u));
        }
    }
    for (c, v) in vs.iter().enumerate() {
        if let Some(a) = ahead.get(c) {
            let a = a.as_ptr() as *const i8;
            let mut b = 0;
            while b < row_bytes {
                _mm_prefetch::<_MM_HINT_T0>(a.add(b));
                b += 64;
            }
        }
        let vp = v.as_ptr().add(d);
        let mut x = [V::zero(); U];
        for u in 0..U {
            x[u] = V::load_kv(vp.add(16 * u));
            if T::SCALED {
                // int8: the block's scale after the row's codes (a 16-lane unit lies in one block)
                let sp = v.as_ptr().add(hd + 4 * ((d + 16 * u) / KV_QBLOCK)) as *const f32;
                x[u] = x[u].mul(V::splat(sp.read_unaligned()));
            }
        }
        for r in 0..R {
            let pb = V::splat(*p[r].add(c));
            for u in 0..U {
                acc[r][u] = pb.fmadd(x[u], acc[r][u]);
            }
        }
    }
    for r in 0..R {
        for u in 0..U {
            acc[r][u].store(o[r].add(d + 16 * u));
        }
    }
}

/// `R` rows over all output elements, `U` units at a time, then single units, then the tail
/// (under 16 elements) by `generic`.
#[inline(always)]
unsafe fn pv_rows<V: V16, T: KvElem, const R: usize, const U: usize>(
    outs: &mut [&mut [f32]],
    vs: &[&[T]],
    ahead: &[&[T]],
    p: &[f32],
    stride: usize,
) {
    let len = outs[0].len();
    let mut o = [std::ptr::null_mut::<f32>(); R];
    let mut pp = [std::ptr::null::<f32>(); R];
    for r in 0..R {
        o[r] = outs[r].as_mut_ptr();
        pp[r] = p.as_ptr().add(r * stride);
    }
    // the rows ahead are fetched whole by the first pass over the keys
    let ah = |d: usize| if d == 0 { ahead } else { &[] };
    let mut d = 0;
    while d + 16 * U <= len {
        pv_block::<V, T, R, U>(&o, vs, ah(d), len, &pp, d);
        d += 16 * U;
    }
    while d + 16 <= len {
        pv_block::<V, T, R, 1>(&o, vs, ah(d), len, &pp, d);
        d += 16;
    }
    if d < len {
        for (r, out) in outs[..R].iter_mut().enumerate() {
            generic::pv_row_from(out, vs, &p[r * stride..], d);
        }
    }
}

/// Caller checks: `outs.len() <= MAX_ROWS`, all of one length, every V row at least that long,
/// `p` holds `outs.len()` rows of `stride >= vs.len()`. `U4`, `U2`, `U1`: the units each pass
/// keeps in registers with 4, 2 and 1 rows (the level's register file decides).
#[inline(always)]
unsafe fn pv<V: V16, T: KvElem, const U4: usize, const U2: usize, const U1: usize>(
    outs: &mut [&mut [f32]],
    vs: &[&[T]],
    ahead: &[&[T]],
    p: &[f32],
    stride: usize,
) {
    match outs.len() {
        4 => pv_rows::<V, T, 4, U4>(outs, vs, ahead, p, stride),
        3 => {
            pv_rows::<V, T, 2, U2>(outs, vs, ahead, p, stride);
            pv_rows::<V, T, 1, U1>(&mut outs[2..], vs, &[], &p[2 * stride..], stride);
        }
        2 => pv_rows::<V, T, 2, U2>(outs, vs, ahead, p, stride),
        1 => pv_rows::<V, T, 1, U1>(outs, vs, ahead, p, stride),
        _ => {}
    }
}

/// The entry points of one instruction set: the generic bodies above instantiated for its unit.
macro_rules! level {
    ($m:ident, $feat:literal, $v:ty, dots pairs4 $p4:literal, pv units $u4:literal $u2:literal $u1:literal) => {
        pub(super) mod $m {
            use super::*;

            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn dots<T: KvElem>(
                qs: &[&[f32]],
                kts: &[&[T]],
                ahead: &[&[T]],
                scale: f32,
                out: &mut [f32],
                stride: usize,
            ) {
                super::dots::<$v, T, $p4>(qs, kts, ahead, scale, out, stride)
            }
            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn softmax(s: &mut [f32]) {
                super::softmax::<$v>(s)
            }
            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn sum_exp(s: &[f32], max: f32) -> f32 {
                super::sum_exp::<$v>(s, max)
            }
            #[target_feature(enable = $feat)]
            pub(crate) unsafe fn pv<T: KvElem>(
                outs: &mut [&mut [f32]],
                vs: &[&[T]],
                ahead: &[&[T]],
                p: &[f32],
                stride: usize,
            ) {
                super::pv::<$v, T, $u4, $u2, $u1>(outs, vs, ahead, p, stride)
            }
        }
    };
}

// Accumulators in registers: 16 zmm of 32, 8 ymm of 16 (a unit is two ymm); the dots of 4 rows
// x 2 tiles take 8 units, 16 ymm, all AVX2 has.
level!(avx512, "avx512f", __m512, dots pairs4 true, pv units 4 8 8);
level!(avx2, "avx2,fma,f16c", Y2, dots pairs4 false, pv units 1 2 4);
