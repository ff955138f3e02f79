//! AVX-512 VNNI kernels (`vpdpbusd zmm`) on the shared x86 layout (see `x86.rs`), for both of
//! its block packings: I2 (2 bits per code; [`matmul_rows_i2`], level `avx512vnni`) and T5 (five
//! codes per byte; [`matmul_rows_t5`], level `avx512vbmi`). One body serves both: the `kernels!`
//! macro compiles it once per packing with that packing's target features (T5 needs VBMI's
//! `vpermi2b`, which the I2 level must never emit). Helpers are `#[inline]` functions with the
//! same target features as their callers: intrinsics called from `#[inline(always)]` helpers
//! without them were left as out-of-line calls (measured 13x slower).
//!
//! - One token (decode, bandwidth bound): two layout tiles at a time (2 row groups each), taken
//!   from the two halves of the row range, so the weights are read as two sequential streams far
//!   apart (on the Zen 4 this was tuned on, one core reads ~19 GB/s from one stream and ~31 GB/s
//!   from two; adjacent streams do not help). The activation broadcasts of a column block feed
//!   all 4 groups. I2 blocks are unpacked by a single AND per 64 codes: `block & (3 << 2p)` is
//!   `u * 4^p`, so each shift position `p` gets its own accumulator and the four are combined
//!   exactly at the end (`a0 + a1>>2 + a2>>4 + a3>>6`; each `a_p` is an exact multiple of `4^p`).
//!   Per 64-byte I2 block: one load, four ANDs, four `vpdpbusd` (the bound: ~16 B/cycle), and a
//!   software prefetch [`PF_DIST`] blocks ahead in each stream. A T5
//!   block `v` gives `r = v mod 81` (two subtractions, two minimums), which one `vpermi2b` turns
//!   into the I2 byte of digits 0-3; then the same ANDs, and a fifth `vpdpbusd` on `v - r =
//!   81 u4` (divided out exactly at the end): 320 codes per 64 bytes for 6 more instructions,
//!   with software prefetch (~2x the compute per code of I2: it pays where a core's share of
//!   the memory bandwidth is below ~25 GB/s, i.e. most machines with several cores busy).
//! - 2-3 tokens (batched decode): the same two streams, shift unpack (`(block >> 2p) & 3`, shared
//!   by the tokens), software prefetch.
//! - More tokens (prefill, compute bound): tiles of 2 row groups x 8 tokens, positions outer
//!   and tokens inner; tokens taken in cache blocks (`T_OUTER`) so their activations stay in
//!   cache while a tile's weights (reused by every token block) stay in L1/L2. I2 unpacks each
//!   block once per 8 tokens inside the loop (the shifts and ANDs run beside the `vpdpbusd`s);
//!   T5 unpacks a whole tile once per token block into a per-thread buffer first.
//!
//! Overflow: a lane adds at most `kcols / 4` products of `|u * 4^p| <= 128` by `|q| <= 128`, far
//! below 2^31 for any realistic width (up to ~500k columns).

use core::arch::x86_64::*;
use std::ops::Range;

use super::amx;
use super::x86::{lane_mask, spans, tile_span, Packing, Span, BLOCK, GROUP, T5_TO_I2};
use super::{OutPtr, QuantActs, TernaryMatrix};

/// Groups per layout tile (see `x86.rs`).
pub(super) const TILE: usize = 2;

/// From this many tokens the AMX levels multiply on tiles (`amx.rs`). Below it a tile's
/// unpacking is shared by too few tokens: gate_up (13824 x 2560) on 2 threads of the Xeon
/// measured, weights from DRAM, `amxvbmi` against `avx512vbmi`: 5 tokens 825 against 593 us, 8
/// tokens 826 against 565, 12 tokens 889 against 951, 32 tokens 1121 against 2207.
const AMX_MIN_TOKENS: usize = 12;
/// Tokens per cache block of the AMX path: each layout tile's weights are unpacked once per
/// block, and the block's activations stay in L2 while every tile of the range runs over them.
const AMX_T_OUTER: usize = 128;

/// The inverse of 81 modulo 2^32.
const INV81: u32 = 0x781948b1;
const _: () = assert!(INV81.wrapping_mul(81) == 1);

/// Up to this many tokens, the two-stream few-token kernel.
const TN_SMALL: usize = 3;
/// Column blocks between a software prefetch and its use (few-token kernel).
const PF_DIST: usize = 16;

/// `match (groups in stream a, in stream b, tokens)` onto `$f::<GA, GB, T>($args)` for the few-token
/// tile shapes (T = 2, 3).
macro_rules! small_shapes {
    ($f:ident, $args:tt, $key:expr; $($ga:literal, $gb:literal);*) => {
        match $key {
            $(
                ($ga, $gb, 2) => $f::<$ga, $gb, 2> $args,
                ($ga, $gb, 3) => $f::<$ga, $gb, 3> $args,
            )*
            _ => unreachable!(),
        }
    };
}

/// `match (groups, tokens)` onto `$f::<G, T>($args)` for every prefill tile shape.
macro_rules! prefill_shapes {
    ($f:ident, $args:tt, $g:expr, $t:expr; [$($gs:literal),*] $ts:tt) => {
        match $g {
            $( $gs => prefill_shapes!(@t $f, $args, $gs, $t, $ts), )*
            _ => unreachable!(),
        }
    };
    (@t $f:ident, $args:tt, $gl:literal, $t:expr, [$($ts:literal),*]) => {
        match $t {
            $( $ts => $f::<$gl, $ts> $args, )*
            _ => unreachable!(),
        }
    };
}

thread_local! {
    /// This thread's buffer for a tile's unpacked codes (T5 prefill, and the B rows of the AMX
    /// levels): grown to the widest tile once, then reused (pool threads live as long as the pool).
    static UNPACKED: std::cell::RefCell<Vec<__m512i>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// This thread's [`UNPACKED`] buffer, at least `n` vectors long. Valid until the next call on
/// this thread (kernels do not nest).
fn unpacked_buffer(n: usize) -> *mut __m512i {
    UNPACKED.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < n {
            // SAFETY: an all-zero bit pattern is a valid __m512i.
            b.resize(n, unsafe { std::mem::zeroed() });
        }
        b.as_mut_ptr()
    })
}

/// The kernels for one packing, compiled with the target features it needs (`$feat`; the T5
/// permute needs VBMI, which the I2 level must never emit).
macro_rules! kernels {
    ($m:ident, $feat:literal, $t5:literal, prefill: $groups:tt x $toks:tt) => {
        pub(super) mod $m {
        use super::*;

        const T5: bool = $t5;
        /// Code positions per 64-byte block (per dword lane: 4 columns each).
        const NP: usize = if T5 { 5 } else { 4 };
        const PACKING: Packing = if T5 { Packing::T5 } else { Packing::I2 };
        /// Tokens per prefill tile.
        const PREFILL_TOKENS: usize = 8;
        /// Tokens per cache block: their activations stay in L2 while every tile of the row
        /// range runs over them. T5 takes more, as each block unpacks every tile again.
        const T_OUTER: usize = if T5 { 512 } else { 64 };

        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn bcast4(p: *const i8) -> __m512i {
            _mm512_set1_epi32((p as *const i32).read_unaligned())
        }

        /// Constants for unpacking blocks, made once per call.
        #[derive(Clone, Copy)]
        struct Unpack {
            /// `3 << 2p`: position `p` of an I2 byte.
            m: [__m512i; 4],
            c81: __m512i,
            c162: __m512i,
            one: __m512i,
            /// [`T5_TO_I2`], entries 0..64 and 64..128.
            lo: __m512i,
            hi: __m512i,
        }

        impl Unpack {
            #[inline]
        #[target_feature(enable = $feat)]
            unsafe fn new() -> Unpack {
                let m = [_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0c), _mm512_set1_epi8(0x30), _mm512_set1_epi8(0xc0u8 as i8)];
                Unpack {
                    m,
                    c81: _mm512_set1_epi8(81),
                    c162: _mm512_set1_epi8(162u8 as i8),
                    one: _mm512_set1_epi8(1),
                    lo: _mm512_loadu_si512(T5_TO_I2.as_ptr() as *const _),
                    hi: _mm512_loadu_si512(T5_TO_I2.as_ptr().add(64) as *const _),
                }
            }

            /// A T5 block `v` (bytes `r + 81 u4`, `r` < 81): `r` (a 7-bit permute index) and the
            /// masks `[u4 >= 1]`, `[u4 == 2]`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn t5_top(&self, v: __m512i) -> (__m512i, __mmask64, __mmask64) {
                let k1 = _mm512_cmpge_epu8_mask(v, self.c81);
                let k2 = _mm512_cmpge_epu8_mask(v, self.c162);
                let r = _mm512_mask_sub_epi8(v, k1, v, self.c81);
                (_mm512_mask_sub_epi8(r, k2, r, self.c81), k1, k2)
            }

            /// Position `p`'s codes times `4^p` for `p < 4` (one AND each of the I2 form), then
            /// (T5) `81 u4 = v - r`, whose products [`combine`] divides out exactly: one
            /// instruction instead of three for `u4` itself. Here `r` is the smallest of `v`,
            /// `v - 81`, `v - 162` (wrapping bytes; no mask registers needed, and measured as fast
            /// as [`Unpack::t5_top`]'s compares and masked subtractions).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn scaled(&self, v: __m512i) -> [__m512i; 5] {
                let (b, top) = if T5 {
                    let r = _mm512_min_epu8(
                        v,
                        _mm512_min_epu8(_mm512_sub_epi8(v, self.c81), _mm512_sub_epi8(v, self.c162)),
                    );
                    (_mm512_permutex2var_epi8(self.lo, r, self.hi), _mm512_sub_epi8(v, r))
                } else {
                    (v, _mm512_setzero_si512())
                };
                [
                    _mm512_and_si512(b, self.m[0]),
                    _mm512_and_si512(b, self.m[1]),
                    _mm512_and_si512(b, self.m[2]),
                    _mm512_and_si512(b, self.m[3]),
                    top,
                ]
            }

            /// The I2 form of a block and (T5) its fifth position's codes `u4`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn split(&self, v: __m512i) -> (__m512i, __m512i) {
                if T5 {
                    let (r, k1, k2) = self.t5_top(v);
                    let u4 = _mm512_maskz_mov_epi8(k1, self.one);
                    (_mm512_permutex2var_epi8(self.lo, r, self.hi), _mm512_mask_add_epi8(u4, k2, u4, self.one))
                } else {
                    (v, _mm512_setzero_si512())
                }
            }

            /// Position `p`'s codes `u` in {0, 1, 2} from [`Unpack::split`]'s pair.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn position(&self, (b, u4): (__m512i, __m512i), p: usize) -> __m512i {
                let m = self.m[0];
                match p {
                    0 => _mm512_and_si512(b, m),
                    1 => _mm512_and_si512(_mm512_srli_epi16::<2>(b), m),
                    2 => _mm512_and_si512(_mm512_srli_epi16::<4>(b), m),
                    3 => _mm512_and_si512(_mm512_srli_epi16::<6>(b), m),
                    _ => u4,
                }
            }

            /// Every position's codes `u` in {0, 1, 2}.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn plain(&self, v: __m512i) -> [__m512i; 5] {
                let s = self.split(v);
                std::array::from_fn(|p| self.position(s, p))
            }
        }

        /// The activation broadcasts of one column block: position `p` multiplies columns
        /// `block_cols * kb + 4p .. + 4`.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn bcasts(xo: *const i8) -> [__m512i; 5] {
            std::array::from_fn(|p| if p < NP { bcast4(xo.add(4 * p)) } else { _mm512_setzero_si512() })
        }

        /// Two weight streams, `a` and `b`: group `g`, column block `kb` of a stream at
        /// `w + g * 64 + kb * kbstride`.
        #[derive(Clone, Copy)]
        struct Streams {
            wa: *const u8,
            ksa: usize,
            wb: *const u8,
            ksb: usize,
        }

        impl Streams {
            /// Spans `sa` and `sb` of the packed weights at `d`.
            fn new(d: *const u8, sa: Span, sb: Span) -> Streams {
                Streams { wa: d.wrapping_add(sa.off), ksa: sa.kbstride, wb: d.wrapping_add(sb.off), ksb: sb.kbstride }
            }
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn a(self, g: usize, kb: usize) -> __m512i {
                _mm512_load_si512(self.wa.add(g * BLOCK + kb * self.ksa) as *const _)
            }
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn b(self, g: usize, kb: usize) -> __m512i {
                _mm512_load_si512(self.wb.add(g * BLOCK + kb * self.ksb) as *const _)
            }
            /// Software prefetch of both streams' groups [`PF_DIST`] blocks after `kb`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn prefetch<const GA: usize, const GB: usize>(self, kb: usize) {
                for g in 0..GA {
                    _mm_prefetch::<_MM_HINT_T0>(self.wa.wrapping_add(g * BLOCK + (kb + PF_DIST) * self.ksa) as *const i8);
                }
                for g in 0..GB {
                    _mm_prefetch::<_MM_HINT_T0>(self.wb.wrapping_add(g * BLOCK + (kb + PF_DIST) * self.ksb) as *const i8);
                }
            }
        }

        /// One token, two streams: `GA` groups of stream `a`, `GB` of `b` (`GB` may be 0).
        /// Returns `sum_c u * q` per row (not yet offset-corrected). Both packings prefetch
        /// [`PF_DIST`] blocks ahead: T5's compute time is close to the memory time, and the
        /// hardware prefetchers alone fall behind; I2 was left to them (enough on the Zen 4 it was
        /// tuned on), but on the AMX Xeon the kernel then read 66-75% of the probe's bandwidth
        /// from DRAM, 81-95% with the prefetches (README, "The 2-bit kernels prefetch too").
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn tile1<const GA: usize, const GB: usize>(
            un: &Unpack,
            w: Streams,
            nkb: usize,
            x: *const i8,
        ) -> ([__m512i; GA], [__m512i; GB]) {
            let np = NP;
            let bc = PACKING.block_cols();
            let mut a = [[_mm512_setzero_si512(); 5]; GA];
            let mut b = [[_mm512_setzero_si512(); 5]; GB];
            for kb in 0..nkb {
                w.prefetch::<GA, GB>(kb);
                let xb = bcasts(x.add(kb * bc));
                for g in 0..GA {
                    let u = un.scaled(w.a(g, kb));
                    for p in 0..np {
                        a[g][p] = _mm512_dpbusd_epi32(a[g][p], u[p], xb[p]);
                    }
                }
                for g in 0..GB {
                    let u = un.scaled(w.b(g, kb));
                    for p in 0..np {
                        b[g][p] = _mm512_dpbusd_epi32(b[g][p], u[p], xb[p]);
                    }
                }
            }
            (a.map(|v| combine(v)), b.map(|v| combine(v)))
        }

        /// `a0 + a1/4 + a2/16 + a3/64` (+ `a4/81`) for accumulators of `u * 4^p` (and `81 u4`)
        /// products. Each is an exact multiple of its divisor; dividing by 81 is multiplying by
        /// its inverse mod 2^32, exact for exact multiples (two's complement included).
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn combine(a: [__m512i; 5]) -> __m512i {
            let hi = _mm512_add_epi32(_mm512_srai_epi32::<4>(a[2]), _mm512_srai_epi32::<6>(a[3]));
            let lo = _mm512_add_epi32(a[0], _mm512_srai_epi32::<2>(a[1]));
            let s = _mm512_add_epi32(lo, hi);
            if T5 {
                _mm512_add_epi32(s, _mm512_mullo_epi32(a[4], _mm512_set1_epi32(INV81 as i32)))
            } else {
                s
            }
        }

        /// `T` tokens (rows of `x`, `xstride` apart), `G` groups. I2 unpacks each block here
        /// (once per `T` tokens); T5 reads the tile as [`unpack_tile`] left it in `pre`, or,
        /// with `pre` null (few tokens, little to share the unpacking with), unpacks here too.
        #[inline]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn tilen<const G: usize, const T: usize>(
            un: &Unpack,
            w: *const u8,
            kbstride: usize,
            nkb: usize,
            pre: *const __m512i,
            x: *const i8,
            xstride: usize,
        ) -> [[__m512i; T]; G] {
            let np = NP;
            let bc = PACKING.block_cols();
            let mut a = [[_mm512_setzero_si512(); T]; G];
            let inline = !T5 || pre.is_null();
            for kb in 0..nkb {
                if inline {
                    // few tokens read the tile from memory at close to the rate they compute it:
                    // fetch ahead (past the span's end is the next span; prefetches never fault)
                    for g in 0..G {
                        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(g * BLOCK + (kb + PF_DIST) * kbstride) as *const i8);
                    }
                }
                let parts: [(__m512i, __m512i); G] = std::array::from_fn(|g| {
                    if inline {
                        un.split(_mm512_load_si512(w.add(g * BLOCK + kb * kbstride) as *const _))
                    } else {
                        (_mm512_setzero_si512(), _mm512_setzero_si512())
                    }
                });
                // Positions outer, tokens inner: consecutive `vpdpbusd`s feed different
                // accumulators, and one position's vectors are live at a time.
                for p in 0..np {
                    let u: [__m512i; G] = std::array::from_fn(|g| {
                        if inline {
                            un.position(parts[g], p)
                        } else {
                            _mm512_load_si512(pre.add((kb * G + g) * NP + p) as *const _)
                        }
                    });
                    for t in 0..T {
                        let b = bcast4(x.add(t * xstride + kb * bc + 4 * p));
                        for g in 0..G {
                            a[g][t] = _mm512_dpbusd_epi32(a[g][t], u[g], b);
                        }
                    }
                }
            }
            a
        }

        /// Unpacks the `g`-group tile at `w` (`nkb` blocks, `kbstride` apart) into `out`:
        /// vector `(kb * g + i) * NP + p` holds group `i`'s position-`p` codes `u`. T5 prefill
        /// does this once per tile and token block, so its token loops cost what I2's do (the
        /// T5 unpack inside them measured ~20% slower: it competes with `vpdpbusd` for ports).
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn unpack_tile(un: &Unpack, w: *const u8, kbstride: usize, nkb: usize, g: usize, out: *mut __m512i) {
            for kb in 0..nkb {
                for i in 0..g {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(i * BLOCK + (kb + PF_DIST) * kbstride) as *const i8);
                    let parts = un.split(_mm512_load_si512(w.add(i * BLOCK + kb * kbstride) as *const _));
                    for p in 0..NP {
                        _mm512_store_si512(out.add((kb * g + i) * NP + p) as *mut _, un.position(parts, p));
                    }
                }
            }
        }

        /// Unpacks the `n`-group span at `w` (`nkb` blocks, `kbstride` apart) into AMX B-tile
        /// rows (`amx.rs`): vector `i * nkg_pad + NP * kb + p` holds group `i`'s position-`p`
        /// codes `u` (16 rows x columns `NP*4*kb + 4p .. + 4`, 4 bytes a row). Rows from
        /// `NP * nkb` to `nkg_pad`, and the whole second group when `n == 1`, are zeros (they
        /// multiply whatever activation bytes the A tiles read there by 0).
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn unpack_amx(un: &Unpack, w: *const u8, kbstride: usize, nkb: usize, n: usize, out: *mut __m512i, nkg_pad: usize) {
            for kb in 0..nkb {
                for i in 0..n {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(i * BLOCK + (kb + PF_DIST) * kbstride) as *const i8);
                    let parts = un.split(_mm512_load_si512(w.add(i * BLOCK + kb * kbstride) as *const _));
                    for p in 0..NP {
                        _mm512_store_si512(out.add(i * nkg_pad + kb * NP + p) as *mut _, un.position(parts, p));
                    }
                }
            }
            for i in 0..TILE {
                let from = if i < n { nkb * NP } else { 0 };
                for kg in from..nkg_pad {
                    _mm512_store_si512(out.add(i * nkg_pad + kg) as *mut _, _mm512_setzero_si512());
                }
            }
        }

        /// Many tokens on AMX tiles (`amx.rs`): per layout tile of the range, its weights are
        /// unpacked once per block of [`AMX_T_OUTER`] tokens, then multiplied by 32 tokens at a
        /// time; the epilogue is [`store`]'s, as for every other shape.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn run_amx(j: &Job, ngroups: usize, g0: usize, g1: usize) {
            let (w, x) = (j.w, j.x);
            let chunks = (j.nkb * NP).div_ceil(amx::KG_PER_CHUNK);
            let nkg_pad = chunks * amx::KG_PER_CHUNK;
            // A tiles read `chunks * 64` bytes of each token's row: at most 64 past `kcols`
            // (T5, whose blocks reach up to 16 columns past it), within `ACT_SLACK` for the last.
            debug_assert!(chunks * amx::KCHUNK <= w.kcols() + super::super::ACT_SLACK);
            let buf = unpacked_buffer(TILE * nkg_pad);
            #[repr(C, align(64))]
            struct Acc([[i32; amx::TOKS]; amx::TOKS]);
            let mut acc = Acc([[0; amx::TOKS]; amx::TOKS]);
            let mut tb = 0;
            while tb < x.n_tok {
                let tb_end = (tb + AMX_T_OUTER).min(x.n_tok);
                let mut spans = spans(TILE, ngroups, j.nkb, g0, g1).peekable();
                while let Some(s) = spans.next() {
                    unpack_amx(&j.un, w.data().as_ptr().add(s.off), s.kbstride, j.nkb, s.n, buf, nkg_pad);
                    // the next tile's weights (one contiguous run), fetched during this tile's
                    // first pass of tokens
                    let pf = match spans.peek() {
                        Some(nx) => {
                            let bytes = j.nkb * nx.kbstride;
                            (w.data().as_ptr().wrapping_add(nx.off), bytes.div_ceil(64).div_ceil(chunks))
                        }
                        _ => (std::ptr::null(), 0),
                    };
                    let mut t = tb;
                    while t < tb_end {
                        let n = (tb_end - t).min(amx::TOKS);
                        amx::dot(
                            x.q.as_ptr().add(t * x.stride),
                            x.stride,
                            n,
                            buf as *const u8,
                            nkg_pad * amx::BROW,
                            chunks,
                            acc.0.as_mut_ptr() as *mut i32,
                            if t == tb { pf } else { (std::ptr::null(), 0) },
                        );
                        for (tt, row) in acc.0[..n].iter().enumerate() {
                            for i in 0..s.n {
                                let v = _mm512_load_si512(row.as_ptr().add(i * GROUP) as *const _);
                                store(v, t + tt, s.g + i, j.rows, w, x, j.out);
                            }
                        }
                        t += n;
                    }
                }
                tb = tb_end;
            }
        }

        /// `T` tokens (2 or 3: batched decode), two streams as in [`tile1`], both prefetched
        /// [`PF_DIST`] blocks ahead (compute and memory time are close here, and the hardware
        /// prefetcher alone does not run far enough ahead).
        #[inline]
        #[target_feature(enable = $feat)]
        #[allow(clippy::type_complexity)]
        unsafe fn tile_small<const GA: usize, const GB: usize, const T: usize>(
            un: &Unpack,
            w: Streams,
            nkb: usize,
            x: *const i8,
            xstride: usize,
        ) -> ([[__m512i; T]; GA], [[__m512i; T]; GB]) {
            let np = NP;
            let bc = PACKING.block_cols();
            let mut a = [[_mm512_setzero_si512(); T]; GA];
            let mut b = [[_mm512_setzero_si512(); T]; GB];
            for kb in 0..nkb {
                w.prefetch::<GA, GB>(kb);
                let ua: [[__m512i; 5]; GA] = std::array::from_fn(|g| un.plain(w.a(g, kb)));
                let ub: [[__m512i; 5]; GB] = std::array::from_fn(|g| un.plain(w.b(g, kb)));
                for t in 0..T {
                    let xo = x.add(t * xstride + kb * bc);
                    for p in 0..np {
                        let bc = bcast4(xo.add(4 * p));
                        for g in 0..GA {
                            a[g][t] = _mm512_dpbusd_epi32(a[g][t], ua[g][p], bc);
                        }
                        for g in 0..GB {
                            b[g][t] = _mm512_dpbusd_epi32(b[g][t], ub[g][p], bc);
                        }
                    }
                }
            }
            (a, b)
        }

        /// Epilogue for one group and token: `(acc - sum_q) as f32 / act_scale * row_scale`, stored for
        /// the rows of the group inside `rows`.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn store(acc: __m512i, t: usize, g: usize, rows: &Range<usize>, w: &TernaryMatrix, x: &QuantActs, out: OutPtr) {
            let r0 = g * GROUP;
            let k = lane_mask(r0, GROUP, rows) as __mmask16;
            let dot = _mm512_sub_epi32(acc, _mm512_set1_epi32(*x.sum.get_unchecked(t)));
            let f = _mm512_div_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(*x.scale.get_unchecked(t)));
            let rs = _mm512_maskz_loadu_ps(k, w.scales().as_ptr().add(r0));
            _mm512_mask_storeu_ps(out.at(t, r0), k, _mm512_mul_ps(f, rs));
        }

        /// What every tile runner needs.
        struct Job<'a> {
            w: &'a TernaryMatrix,
            x: &'a QuantActs,
            out: OutPtr,
            rows: &'a Range<usize>,
            nkb: usize,
            un: Unpack,
        }

        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn run1<const GA: usize, const GB: usize>(j: &Job, sa: Span, sb: Span) {
            let d = j.w.data().as_ptr();
            let (a, b) = tile1::<GA, GB>(&j.un, Streams::new(d, sa, sb), j.nkb, j.x.q.as_ptr());
            for (i, &acc) in a.iter().enumerate() {
                store(acc, 0, sa.g + i, j.rows, j.w, j.x, j.out);
            }
            for (i, &acc) in b.iter().enumerate() {
                store(acc, 0, sb.g + i, j.rows, j.w, j.x, j.out);
            }
        }

        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn runn<const G: usize, const T: usize>(j: &Job, s: Span, t0: usize, pre: *const __m512i) {
            let xp = j.x.q.as_ptr().add(t0 * j.x.stride);
            let w = j.w.data().as_ptr().add(s.off);
            let a = tilen::<G, T>(&j.un, w, s.kbstride, j.nkb, pre, xp, j.x.stride);
            for (i, accs) in a.iter().enumerate() {
                for (t, &acc) in accs.iter().enumerate() {
                    store(acc, t0 + t, s.g + i, j.rows, j.w, j.x, j.out);
                }
            }
        }

        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn run_small<const GA: usize, const GB: usize, const T: usize>(j: &Job, sa: Span, sb: Span) {
            let d = j.w.data().as_ptr();
            let (xp, xs) = (j.x.q.as_ptr(), j.x.stride);
            let (a, b) =
                tile_small::<GA, GB, T>(&j.un, Streams::new(d, sa, sb), j.nkb, xp, xs);
            for (i, accs) in a.iter().enumerate() {
                for (t, &acc) in accs.iter().enumerate() {
                    store(acc, t, sa.g + i, j.rows, j.w, j.x, j.out);
                }
            }
            for (i, accs) in b.iter().enumerate() {
                for (t, &acc) in accs.iter().enumerate() {
                    store(acc, t, sb.g + i, j.rows, j.w, j.x, j.out);
                }
            }
        }

        #[inline]
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn matmul_rows(w: &TernaryMatrix, x: &QuantActs, out: OutPtr, rows: Range<usize>, amx: bool) {
            let (g0, g1) = (rows.start / GROUP, rows.end.div_ceil(GROUP));
            let ngroups = w.rows().div_ceil(GROUP);
            let nkb = PACKING.nkb(w.cols(), w.kcols());
            let j = Job { w, x, out, rows: &rows, nkb, un: Unpack::new() };
            if amx && x.n_tok >= AMX_MIN_TOKENS {
                debug_assert!(amx::available());
                run_amx(&j, ngroups, g0, g1);
                return;
            }
            if x.n_tok == 1 {
                // Two sequential streams far apart (tile i of each half of the range): one stream does
                // not reach the memory bandwidth of a core.
                let (t0, t1) = (g0 / TILE, (g1 - 1) / TILE + 1);
                let half = (t1 - t0).div_ceil(2);
                for i in 0..half {
                    let sa = tile_span(TILE, ngroups, nkb, g0, g1, t0 + i);
                    if t0 + i + half < t1 {
                        let sb = tile_span(TILE, ngroups, nkb, g0, g1, t0 + i + half);
                        match (sa.n, sb.n) {
                            (2, 2) => run1::<2, 2>(&j, sa, sb),
                            (2, _) => run1::<2, 1>(&j, sa, sb),
                            (_, 2) => run1::<1, 2>(&j, sa, sb),
                            (_, _) => run1::<1, 1>(&j, sa, sb),
                        }
                    } else if sa.n == 2 {
                        run1::<2, 0>(&j, sa, sa);
                    } else {
                        run1::<1, 0>(&j, sa, sa);
                    }
                }
                return;
            }
            if x.n_tok <= TN_SMALL {
                // Few tokens (batched decode): tile pairs in two streams, as for one token.
                let (t0, t1) = (g0 / TILE, (g1 - 1) / TILE + 1);
                let half = (t1 - t0).div_ceil(2);
                for i in 0..half {
                    let sa = tile_span(TILE, ngroups, nkb, g0, g1, t0 + i);
                    let sb = if t0 + i + half < t1 {
                        tile_span(TILE, ngroups, nkb, g0, g1, t0 + i + half)
                    } else {
                        Span { n: 0, ..sa }
                    };
                    small_shapes!(run_small, (&j, sa, sb), (sa.n, sb.n, x.n_tok); 2, 2; 2, 1; 1, 2; 1, 1; 2, 0; 1, 0);
                }
                return;
            }
            let mut tb = 0;
            while tb < x.n_tok {
                let tb_end = (tb + T_OUTER).min(x.n_tok);
                for s in spans(TILE, ngroups, nkb, g0, g1) {
                    // T5 unpacks a tile once for all passes of tokens; for one or two passes (up to
                    // 16 tokens: batches, prompt-lookup steps) in each pass, which costs less than
                    // storing and reloading it (`tests/step_cost.rs`, 2 threads, int2 plan, last
                    // position's logits: 5 tokens 55.9 -> 41.6 ms a step, 9 tokens 78.6 -> 69.6)
                    let pre = if T5 && tb_end - tb > 2 * PREFILL_TOKENS {
                        let pre = unpacked_buffer(nkb * s.n * NP);
                        unpack_tile(&j.un, w.data().as_ptr().add(s.off), s.kbstride, nkb, s.n, pre);
                        pre
                    } else {
                        std::ptr::null_mut()
                    };
                    let mut t = tb;
                    while t < tb_end {
                        // even passes (9 tokens: 5 + 4, not 8 + 1): a pass of few tokens has
                        // too few accumulators to hide `vpdpbusd`'s latency
                        let left = tb_end - t;
                        let tn = left.div_ceil(left.div_ceil(PREFILL_TOKENS));
                        prefill_shapes!(runn, (&j, s, t, pre), s.n, tn; $groups $toks);
                        t += tn;
                    }
                }
                tb = tb_end;
            }
        }
        }
    };
}

kernels!(i2, "avx512f,avx512bw,avx512vl,avx512vnni", false, prefill: [1, 2] x [1, 2, 3, 4, 5, 6, 7, 8]);
kernels!(
    t5,
    "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi",
    true,
    prefill: [1, 2] x [1, 2, 3, 4, 5, 6, 7, 8]
);

/// # Safety
/// The CPU supports AVX-512 F/BW/VL/VNNI (and AMX-INT8, granted, if `amx`); `w` uses the x86
/// layout, I2 packing; `x` matches `w` and `out` is writable at every `(t, r)`, `t < x.n_tok`,
/// `r in rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn matmul_rows_i2(w: &TernaryMatrix, x: &QuantActs, out: OutPtr, rows: Range<usize>, amx: bool) {
    i2::matmul_rows(w, x, out, rows, amx)
}

/// # Safety
/// As [`matmul_rows_i2`], plus AVX-512 VBMI, for the T5 packing.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(super) unsafe fn matmul_rows_t5(w: &TernaryMatrix, x: &QuantActs, out: OutPtr, rows: Range<usize>, amx: bool) {
    t5::matmul_rows(w, x, out, rows, amx)
}
