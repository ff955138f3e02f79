//! int8 x ternary matmuls.
//!
//! Contract (checked by tests against [`generic::reference_matmul_i32`], bit for bit):
//! `out[t][r] = (sum_c codes[r][c] * q[t][c]) as f32 / act_scale[t] * row_scale[r]`
//! where the integer sum is exact in i32 and the float epilogue is done in exactly that order
//! (so every kernel level gives identical f32 results, not just identical integers).
//!
//! Weights are repacked once at load ([`TernaryMatrix::from_codes`]) into the layout of the
//! kernel level chosen at start-up ([`KernelLevel::detect`]).
//!
//! # Levels and layouts
//!
//! Every layout stores the *offset* code `u = code + 1` in {0, 1, 2} (2 bits, never 3), so the
//! kernels compute `sum_c u[c] * q[c]` with unsigned x signed byte products (`vpmaddubsw`,
//! `vpdpbusd`) and subtract `QuantActs::sum` (`sum_c q[c]`) at the end. Padding rows and columns
//! hold `u = 1` (code 0), and padded activation columns are 0, so padding never contributes.
//!
//! - [`KernelLevel::Generic`] (portable, [`generic`]): row-major; each row is `kcols / 64`
//!   chunks of 16 bytes, byte `b` of chunk `k` holds column `64k + 16p + b` in bits `2p..2p+1`.
//!   Unpacking is `(byte >> 2p) & 3` on 16 consecutive bytes, which lines up with 16 consecutive
//!   activations; the kernel unpacks 1024 columns of a row at a time and dots them with up to 8
//!   tokens in i16 lanes (NEON `smlal`, checked in the aarch64 assembly). `row_align` 1.
//! - x86 levels ([`KernelLevel::Avx2`], [`KernelLevel::AvxVnni`], [`KernelLevel::Avx512Vnni`],
//!   [`KernelLevel::Avx512Vbmi`]) share one layout (`x86.rs`; `Avx512Vbmi` packs its blocks at
//!   five codes per byte instead of four, described there): rows in groups of 16 and groups in tiles (2 groups = 32 rows
//!   for AVX-512 and AVX-VNNI, 1 for AVX2: what one pass of their kernels covers);
//!   each tile is one sequential stream of 64-byte blocks, column block `kb` of every group of
//!   the tile in turn. In the block of group `g`, column block `kb`, byte `4i + j` holds, in bits
//!   `2p..2p+1`, row `16g + i`, column `16kb + 4p + j`. So `(block >> 2p) & 3` (or
//!   `block & (3 << 2p)` = `u * 4^p`) is a vector of 16 rows x 4 consecutive columns (one dword
//!   per row), which `vpdpbusd` multiplies by a broadcast of the 4 activations
//!   `q[16kb + 4p .. +4]`: the lanes are output rows (no horizontal sums), one broadcast feeds
//!   every group of a tile and an unpacked weight vector feeds every token of a tile. AVX2 (and
//!   256-bit VNNI) read a block as two 32-byte halves (rows 0-7, 8-15). `row_align` 16.
//!
//! Kernel shapes (details in each file): one token (decode, bandwidth bound): whole tiles, AND-only
//! unpack with one accumulator per shift position (AVX-512: two tiles from the two halves of the
//! row range at once, i.e. two far-apart streams, which one core reads faster than one);
//! 2-3 tokens (batched decode): the same with shift unpack shared by the tokens and software
//! prefetch; more tokens (prefill, compute bound): tiles of 32 rows x 8 tokens (AVX-512), the
//! tile's weights unpacked once per 8 tokens and kept in L1/L2 across token blocks of 64.
//! The AMX levels (`amx`, `amxvbmi`: the same layouts) take 12 or more tokens to AMX-INT8 tiles
//! (`amx.rs`): a tile's blocks unpacked once per 128 tokens into B-tile rows, 32 tokens a step.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avxvnni;
pub mod cases;
pub mod generic;
#[cfg(target_arch = "x86_64")]
mod grouped;
pub mod int2;
mod int4;
mod int8;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use int2::Int2Matrix;
pub use int4::Int4Matrix;
pub use int8::Int8Matrix;

use std::ops::Range;
use std::sync::OnceLock;

use crate::pool::{SyncPtr, ThreadPool};

/// Activation columns are padded to a multiple of this (zeros), so kernels need no column tail.
pub const K_ALIGN: usize = 128;
/// Bytes [`QuantActs`] keeps after its last row: the T5 layout's last column block may read up
/// to 16 activation bytes past the padded width (into the next row, or here for the last one).
pub const ACT_SLACK: usize = 64;

/// The block packing of an x86 level's layout.
#[cfg(target_arch = "x86_64")]
fn x86_packing(level: KernelLevel) -> x86::Packing {
    match level {
        KernelLevel::Avx512Vbmi | KernelLevel::AmxVbmi => x86::Packing::T5,
        _ => x86::Packing::I2,
    }
}

/// Which kernel implementation runs. Ordered from most portable to fastest.
///
/// Every variant exists on every target (so names parse everywhere), but only
/// [`KernelLevel::available`] levels may be used: on non-x86 targets that is `Generic` alone,
/// and the x86 kernels are not compiled there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelLevel {
    /// Portable Rust, written so the compiler vectorizes it; also the test oracle.
    Generic,
    /// AVX2: `vpmaddubsw` products summed in i16, widened with `vpmaddwd` every 16 blocks.
    Avx2,
    /// 256-bit VNNI (`vpdpbusd ymm`): the VEX AVX-VNNI encoding where the CPU has it (Alder Lake,
    /// Zen 5, ...), else the EVEX AVX512-VNNI/VL encoding of the same instruction.
    AvxVnni,
    /// AVX-512 F/BW/VL + VNNI: `vpdpbusd zmm`, 16 rows per vector.
    Avx512Vnni,
    /// `Avx512Vnni`'s kernels on weights packed at 1.6 bits (five codes per byte in base 3, the
    /// T5 layout of `x86.rs`), unpacked with the VBMI byte permute (`vpermi2b`): a fifth fewer
    /// bytes per decoded token for a few more instructions per block. Same results.
    Avx512Vbmi,
    /// `Avx512Vnni` (same layout and kernels) with 8 or more tokens multiplied on Intel AMX-INT8
    /// tiles (`amx.rs`: `tdpbsud`, 16 x 16 x 64 products an instruction): prefill and batched
    /// decode. Needs AMX-TILE, AMX-INT8 and the OS's grant of tile state.
    Amx,
    /// `Avx512Vbmi` (the 1.6-bit T5 packing) with the AMX path of [`KernelLevel::Amx`].
    AmxVbmi,
}

fn detect_available() -> Vec<KernelLevel> {
    #[allow(unused_mut)]
    let mut v = vec![KernelLevel::Generic];
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2");
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        if avx2 {
            v.push(KernelLevel::Avx2);
            if is_x86_feature_detected!("avxvnni") || avx512 {
                v.push(KernelLevel::AvxVnni);
            }
        }
        if avx512 {
            let vbmi = is_x86_feature_detected!("avx512vbmi");
            v.push(KernelLevel::Avx512Vnni);
            if vbmi {
                v.push(KernelLevel::Avx512Vbmi);
            }
            if amx::available() {
                v.push(KernelLevel::Amx);
                if vbmi {
                    v.push(KernelLevel::AmxVbmi);
                }
            }
        }
    }
    v
}

fn available_levels() -> &'static [KernelLevel] {
    static LEVELS: OnceLock<Vec<KernelLevel>> = OnceLock::new();
    LEVELS.get_or_init(detect_available)
}

impl KernelLevel {
    /// Every level, most portable first (whether or not this CPU runs it).
    pub const ALL: [KernelLevel; 7] = [
        KernelLevel::Generic,
        KernelLevel::Avx2,
        KernelLevel::AvxVnni,
        KernelLevel::Avx512Vnni,
        KernelLevel::Avx512Vbmi,
        KernelLevel::Amx,
        KernelLevel::AmxVbmi,
    ];

    /// The best level this CPU supports (detected once, then cached).
    pub fn detect() -> KernelLevel {
        *available_levels().last().expect("generic is always available")
    }
    /// The default level for a workload on `threads` threads: [`KernelLevel::detect`], except
    /// where `avx512vbmi` does not pay. Its 1.6-bit weights trade compute for bandwidth: a fifth
    /// fewer bytes per decoded token for ~2x the unpacking work per weight (a Zen 4 core unpacks
    /// ~23 GB/s of them). That wins when each core's share of the memory bandwidth is below that,
    /// i.e. when several threads decode one sequence (2 threads on the 2-core Zen 4 it was
    /// measured on: decode 10-25% faster), and loses for one thread (~13% slower there) and for
    /// batches (compute bound: batch-32 decode 6-10% slower), which keep the 2-bit `avx512vnni`.
    /// Where AMX is present (Intel Xeons), `amxvbmi` is the default for everything: one core of
    /// the 2-vCPU Xeon measured reads only ~12 GB/s, so T5 wins one-thread decode too (exact
    /// 10.1 -> 11.8 tok/s, int2 16.4-17.0 -> 21.7-23.3 against `amx`), and batches, whose ternary
    /// products AMX makes cheap, gain from the fewer bytes too (batch-32 int8 279 -> 291 tok/s,
    /// exact within noise); prefill is equal.
    pub fn default_for(workload: Workload, threads: usize) -> KernelLevel {
        let best = KernelLevel::detect();
        let t5_pays = workload == Workload::Sequence && threads > 1;
        match best {
            KernelLevel::Avx512Vbmi if !t5_pays => KernelLevel::Avx512Vnni,
            l => l,
        }
    }
    /// The level whose SIMD kernels serve `self` where AMX is not involved (the few-token
    /// ternary kernels, the heads, attention): an AMX level's AVX-512 twin.
    pub fn simd(self) -> KernelLevel {
        match self {
            KernelLevel::Amx => KernelLevel::Avx512Vnni,
            KernelLevel::AmxVbmi => KernelLevel::Avx512Vbmi,
            l => l,
        }
    }
    /// Every level this CPU can run, most portable first.
    pub fn available() -> Vec<KernelLevel> {
        available_levels().to_vec()
    }
    /// Whether this CPU can run `self`.
    pub fn is_available(self) -> bool {
        available_levels().contains(&self)
    }
    /// Stable lower-case name (used by `--kernel` and printed by benchmarks).
    pub fn name(self) -> &'static str {
        match self {
            KernelLevel::Generic => "generic",
            KernelLevel::Avx2 => "avx2",
            KernelLevel::AvxVnni => "avxvnni",
            KernelLevel::Avx512Vnni => "avx512vnni",
            KernelLevel::Avx512Vbmi => "avx512vbmi",
            KernelLevel::Amx => "amx",
            KernelLevel::AmxVbmi => "amxvbmi",
        }
    }
    /// Parses a name as printed by [`KernelLevel::name`] (case-insensitive). The level may still
    /// be unavailable on this CPU: check [`KernelLevel::is_available`].
    pub fn from_name(s: &str) -> Option<KernelLevel> {
        let s = s.trim().to_ascii_lowercase();
        KernelLevel::ALL.into_iter().find(|l| l.name() == s)
    }
}

/// What a loaded model will mostly run, for [`KernelLevel::default_for`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workload {
    /// One sequence at a time (generate, chat, perplexity): decode is bandwidth bound.
    #[default]
    Sequence,
    /// Batched steps of many tokens (a server, `bench --batch`): compute bound.
    Batches,
}

/// Per-token int8 activations: `q[t]` is row `t` (stride `stride`, zero padded), with
/// `scale[t] = 127 / max|x_t|` and `sum[t] = sum_c q[t][c]` (used by offset-coded weight layouts).
/// Allocated once for the largest token count and reused.
#[derive(Debug, Clone)]
pub struct QuantActs {
    pub cols: usize,
    pub stride: usize,
    pub n_tok: usize,
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    pub sum: Vec<i32>,
    /// per token, the sums of `q` over each group of [`ACT_GROUP`] columns (the 4-bit head's
    /// scale groups), `[capacity][stride / ACT_GROUP]`; valid for the first `gsum_tok` tokens
    /// (filled by [`QuantActs::fill_group_sums`]; `store_row` and `set_n_tok` make them stale)
    gsum: Vec<i32>,
    gsum_tok: usize,
}

/// Columns per group of [`QuantActs::fill_group_sums`].
pub const ACT_GROUP: usize = 32;

impl QuantActs {
    /// Buffers for up to `max_tok` tokens of `cols` values.
    pub fn new(max_tok: usize, cols: usize) -> QuantActs {
        let stride = cols.div_ceil(K_ALIGN) * K_ALIGN;
        QuantActs {
            cols,
            stride,
            n_tok: 0,
            q: vec![0; max_tok.max(1) * stride + ACT_SLACK],
            scale: vec![0.0; max_tok.max(1)],
            sum: vec![0; max_tok.max(1)],
            gsum: vec![0; max_tok.max(1) * stride / ACT_GROUP],
            gsum_tok: 0,
        }
    }
    /// Capacity in tokens.
    pub fn capacity(&self) -> usize {
        self.scale.len()
    }
    /// Row `t` of quantized values (padded length `stride`).
    pub fn row(&self, t: usize) -> &[i8] {
        &self.q[t * self.stride..(t + 1) * self.stride]
    }
    /// Quantizes `x` (len `cols`) into row `t` exactly as BitNet's ActQuant:
    /// `s = 127 / max(|x|).max(1e-5)`, `q = round_half_even(x * s).clamp(-128, 127)`.
    pub fn quantize_row(&mut self, t: usize, x: &[f32]) {
        self.store_row(t, x, abs_max(x), 1.0)
    }
    /// As [`QuantActs::quantize_row`] of `x * mul` elementwise without materializing it
    /// (used when fusing a norm: the product is rounded to f32 before quantization, as the reference does).
    /// `amax` is `max |x * mul|` as the caller computed it.
    pub fn store_row(&mut self, t: usize, x: &[f32], amax: f32, mul: f32) {
        assert_eq!(x.len(), self.cols);
        let row = &mut self.q[t * self.stride..(t + 1) * self.stride];
        let (s, sum) = quantize_into(x, amax, mul, row);
        self.scale[t] = s;
        self.sum[t] = sum;
        self.gsum_tok = self.gsum_tok.min(t);
    }
    /// Computes the group sums ([`QuantActs::group_sums`]) of the first `n_tok` tokens.
    pub fn fill_group_sums(&mut self) {
        let per = self.stride / ACT_GROUP;
        for t in 0..self.n_tok {
            let row = &self.q[t * self.stride..(t + 1) * self.stride];
            for (o, g) in self.gsum[t * per..(t + 1) * per].iter_mut().zip(row.chunks_exact(ACT_GROUP)) {
                *o = g.iter().map(|&v| v as i32).sum();
            }
        }
        self.gsum_tok = self.n_tok;
    }
    /// Whether the group sums of the first `n_tok` tokens are current.
    pub fn group_sums_ready(&self) -> bool {
        self.gsum_tok >= self.n_tok
    }
    /// Token `t`'s sums of `q` per [`ACT_GROUP`] columns (after [`QuantActs::fill_group_sums`]).
    #[inline]
    pub fn group_sums(&self, t: usize) -> &[i32] {
        let per = self.stride / ACT_GROUP;
        &self.gsum[t * per..(t + 1) * per]
    }
    /// Sets the number of valid tokens (<= capacity).
    /// The group sums are stale from here until [`QuantActs::fill_group_sums`].
    pub fn set_n_tok(&mut self, n: usize) {
        assert!(n <= self.capacity(), "QuantActs capacity exceeded");
        self.n_tok = n;
        self.gsum_tok = 0;
    }
}

/// BitNet's ActQuant of `x * mul` into `q` (the first `x.len()` values; the rest is left as is):
/// `s = 127 / amax.max(1e-5)`, `q = round_half_even(x * mul * s).clamp(-128, 127)`, where `amax`
/// is `max |x * mul|` as the caller computed it. Returns `(s, sum of q)`.
#[inline]
pub fn quantize_into(x: &[f32], amax: f32, mul: f32, q: &mut [i8]) -> (f32, i32) {
    let s = 127.0f32 / amax.max(1e-5);
    let mut sum = 0i32;
    // round_half_even(y).clamp(-128, 127) == round_half_even(y.clamp(-128, 127)); for |c| <= 2^22,
    // c + 1.5 * 2^23 rounds c to the nearest-even integer exactly (default rounding mode), and
    // that integer is the difference of the bit patterns. NaN gives 0, like `NaN as i8`.
    // Bit-identical to the formula above (tested) and it vectorizes.
    const MAGIC: f32 = 12_582_912.0;
    for (o, &v) in q.iter_mut().zip(x) {
        let y = (v * mul) * s;
        let c = y.max(-128.0).min(127.0);
        let r = ((c + MAGIC).to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
        let v = if y.is_nan() { 0 } else { r } as i8;
        *o = v;
        sum += v as i32;
    }
    (s, sum)
}

/// `x.round_ties_even()`, without the libm call (`rintf`) that it is on x86-64 without SSE4.1
/// (the baseline this crate compiles for): most of the time of quantizing a head per weight.
/// Below 2^23 in magnitude, adding and subtracting 2^23 with `x`'s sign rounds half to even in
/// f32 arithmetic (the sum lands where the f32 spacing is 1, and 2^23 is even); from 2^23 on,
/// every f32 is an integer already (inf and NaN pass through). The only difference is a zero's
/// sign (-0.3 gives +0.0), which the quantizers casting the result to an integer never see. No
/// branch calls libm: a fallback to `f32::round_ties_even` for large values was still called
/// for every lane once the loops vectorized (12% of an `int8` load's samples in `rintf`).
#[inline(always)]
pub fn round_ties_even(x: f32) -> f32 {
    const TWO23: f32 = 8_388_608.0;
    if x.abs() < TWO23 {
        let m = TWO23.copysign(x);
        (x + m) - m
    } else {
        x
    }
}

/// `f(first_row, a_rows, b_rows)` over contiguous chunks of `rows` rows on every core, where
/// `a` holds `a_per_row` items per row and `b` `b_per_row`: load-time quantization of heads,
/// which takes seconds on one core for 2B-4T's 128256 rows.
pub fn par_rows<A: Send, B: Send>(
    rows: usize,
    (a, a_per_row): (&mut [A], usize),
    (b, b_per_row): (&mut [B], usize),
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    assert!(a.len() >= rows * a_per_row && b.len() >= rows * b_per_row, "par_rows: outputs too short");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows.div_ceil(256)).max(1);
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|sc| {
        let chunks = a[..rows * a_per_row].chunks_mut((per * a_per_row).max(1));
        for (i, (ac, bc)) in chunks.zip(b[..rows * b_per_row].chunks_mut((per * b_per_row).max(1))).enumerate() {
            let f = &f;
            sc.spawn(move || f(i * per, ac, bc));
        }
    });
}

/// `max |x|` (NaN ignored, as `f32::max` does), in 8 independent lanes so it vectorizes; the
/// result is the same as a sequential fold.
pub fn abs_max(x: &[f32]) -> f32 {
    let mut m = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            m[k] = m[k].max(c[k].abs());
        }
    }
    rest.iter().chain(&m).fold(0f32, |a, v| a.max(v.abs()))
}

pub(crate) use crate::mem::AlignedBytes;

/// Ternary weights repacked for one [`KernelLevel`] (layouts in the module docs).
#[derive(Debug, Clone)]
pub struct TernaryMatrix {
    rows: usize,
    cols: usize,
    kcols: usize,
    level: KernelLevel,
    data: AlignedBytes,
    /// Output multiplier per row (a fused matrix has one value per fused part).
    scales: Vec<f32>,
}

/// The first code outside {-1, 0, 1}, if any. A branch-free test per chunk, which vectorizes
/// (a byte-at-a-time search over 2B-4T's 2.1 G codes was 12% of loading it); the offending code
/// is looked for only on failure.
pub fn invalid_code(codes: &[i8]) -> Option<i8> {
    let ok = |c: &[i8]| c.iter().fold(true, |ok, &v| ok & (-1..=1).contains(&v));
    if codes.chunks(4096).all(ok) {
        return None;
    }
    codes.iter().find(|c| !(-1..=1).contains(*c)).copied()
}

impl TernaryMatrix {
    /// Repacks row-major `codes` (`rows * cols` values in {-1, 0, 1}) for `level`.
    /// Panics if a code is outside {-1, 0, 1} (loaders validate first), sizes disagree, or this
    /// CPU cannot run `level`.
    pub fn from_codes(codes: &[i8], rows: usize, cols: usize, scales: Vec<f32>, level: KernelLevel) -> TernaryMatrix {
        assert_eq!(codes.len(), rows * cols, "codes length");
        assert_eq!(scales.len(), rows, "one scale per row");
        assert!(level.is_available(), "kernel level {} is not supported by this CPU", level.name());
        if let Some(bad) = invalid_code(codes) {
            panic!("ternary code out of range: {bad}");
        }
        let kcols = cols.div_ceil(K_ALIGN) * K_ALIGN;
        let data = match level {
            KernelLevel::Generic => generic::pack(codes, rows, cols, kcols),
            #[cfg(target_arch = "x86_64")]
            KernelLevel::Avx2
            | KernelLevel::AvxVnni
            | KernelLevel::Avx512Vnni
            | KernelLevel::Avx512Vbmi
            | KernelLevel::Amx
            | KernelLevel::AmxVbmi => x86::pack(codes, rows, cols, kcols, x86::tile_groups(level), x86_packing(level)),
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("x86 levels are never available here"),
        };
        TernaryMatrix { rows, cols, kcols, level, data, scales }
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Columns after padding to [`K_ALIGN`].
    pub fn kcols(&self) -> usize {
        self.kcols
    }
    pub fn level(&self) -> KernelLevel {
        self.level
    }
    /// Bytes of packed weights (read once per decoded token).
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// Row ranges handed to threads start at multiples of this. (`matmul_rows` accepts any
    /// range; an unaligned start only wastes work on a row group computed twice.)
    pub fn row_align(&self) -> usize {
        match self.level {
            KernelLevel::Generic => 1,
            _ => 16,
        }
    }
    /// Unpacks back to codes (tests and debugging).
    pub fn to_codes(&self) -> Vec<i8> {
        match self.level {
            KernelLevel::Generic => generic::unpack(self.data.as_slice(), self.rows, self.cols, self.kcols),
            #[cfg(target_arch = "x86_64")]
            _ => {
                let (tile, packing) = (x86::tile_groups(self.level), x86_packing(self.level));
                x86::unpack(self.data.as_slice(), self.rows, self.cols, self.kcols, tile, packing)
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("x86 levels are never available here"),
        }
    }

    fn check_acts(&self, x: &QuantActs) {
        assert!(x.stride >= self.kcols && x.cols == self.cols, "activation width mismatch");
        assert!(x.q.len() >= x.n_tok * x.stride + ACT_SLACK && x.scale.len() >= x.n_tok && x.sum.len() >= x.n_tok);
    }

    pub(crate) fn data(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// Computes rows `rows` of the output for all `x.n_tok` tokens:
    /// `out[t * out_stride + r]` for `r in rows`. Single-threaded; see [`matmul`] for the pool.
    pub fn matmul_rows(&self, x: &QuantActs, out: &mut [f32], out_stride: usize, rows: Range<usize>) {
        rows_checked(self, x, out, out_stride, rows)
    }

    /// As [`TernaryMatrix::matmul_rows`] through a raw output pointer (so that pool threads never
    /// hold overlapping `&mut` slices).
    ///
    /// # Safety
    /// `out` must be valid for writes of `out.ptr[t * out.stride + r]` for `t < x.n_tok`,
    /// `r in rows`, not accessed concurrently at those places; the other checks of `matmul_rows`
    /// must hold.
    unsafe fn matmul_rows_raw(&self, x: &QuantActs, out: OutPtr, rows: Range<usize>) {
        debug_assert!(x.stride >= self.kcols && x.cols == self.cols && rows.end <= self.rows);
        if x.n_tok == 0 || rows.is_empty() {
            return;
        }
        match self.level {
            KernelLevel::Generic => generic::matmul_rows(self, x, out, rows),
            // SAFETY: `from_codes` checked that the CPU supports the level.
            #[cfg(target_arch = "x86_64")]
            KernelLevel::Avx2 => avx2::matmul_rows(self, x, out, rows),
            #[cfg(target_arch = "x86_64")]
            KernelLevel::AvxVnni => avxvnni::matmul_rows(self, x, out, rows),
            #[cfg(target_arch = "x86_64")]
            KernelLevel::Avx512Vnni => avx512::matmul_rows_i2(self, x, out, rows, false),
            #[cfg(target_arch = "x86_64")]
            KernelLevel::Avx512Vbmi => avx512::matmul_rows_t5(self, x, out, rows, false),
            #[cfg(target_arch = "x86_64")]
            KernelLevel::Amx => avx512::matmul_rows_i2(self, x, out, rows, true),
            #[cfg(target_arch = "x86_64")]
            KernelLevel::AmxVbmi => avx512::matmul_rows_t5(self, x, out, rows, true),
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("x86 levels are never available here"),
        }
    }
}

/// Where a kernel writes: `ptr[t * stride + r]` is the output of token `t`, row `r`.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr {
    pub(crate) ptr: *mut f32,
    pub(crate) stride: usize,
}

impl OutPtr {
    /// Pointer to token `t`, row `r`.
    #[inline(always)]
    pub(crate) unsafe fn at(self, t: usize, r: usize) -> *mut f32 {
        self.ptr.add(t * self.stride + r)
    }
}

/// `out[t][0..rows] = w * x[t]` for every token, rows split across the pool's threads.
pub fn matmul(pool: &ThreadPool, w: &TernaryMatrix, x: &QuantActs, out: &mut [f32], out_stride: usize) {
    pooled(w, pool, x, out, out_stride)
}

/// What the packed weight types (ternary, int8 and 4-bit) share, so that checking the
/// arguments and splitting rows across the pool's threads are written once
/// ([`rows_checked`], [`pooled`]).
pub(crate) trait RowKernel: Sync {
    fn n_rows(&self) -> usize;
    /// Row ranges handed to threads start at multiples of this.
    fn align(&self) -> usize;
    /// Panics unless `x` fits the matrix.
    fn check(&self, x: &QuantActs);
    /// Rows `rows` of every token's output.
    ///
    /// # Safety
    /// `out` valid for writes at `out.ptr[t * out.stride + r]` for `t < x.n_tok`, `r in rows`,
    /// not accessed concurrently there; `check(x)` passed; `rows.end <= n_rows()`.
    unsafe fn rows_raw(&self, x: &QuantActs, out: OutPtr, rows: Range<usize>);
}

/// [`RowKernel`] for a matrix type with fields `rows` and methods `row_align`, `check_acts`
/// and `matmul_rows_raw` (every matrix type names them so). `head T` (the LM-head matrices) also
/// gives `T` its `matmul_rows` (one thread) and `matmul` (the pool).
macro_rules! row_kernel {
    (head $t:ty) => {
        impl $t {
            /// Rows `rows` of the output for all `x.n_tok` tokens: `out[t * out_stride + r]`.
            pub fn matmul_rows(
                &self,
                x: &$crate::kernels::QuantActs,
                out: &mut [f32],
                out_stride: usize,
                rows: std::ops::Range<usize>,
            ) {
                $crate::kernels::rows_checked(self, x, out, out_stride, rows)
            }

            /// `out[t][0..rows] = w * x[t]` for every token, rows split across the pool's threads.
            pub fn matmul(
                &self,
                pool: &$crate::pool::ThreadPool,
                x: &$crate::kernels::QuantActs,
                out: &mut [f32],
                out_stride: usize,
            ) {
                $crate::kernels::pooled(self, pool, x, out, out_stride)
            }
        }
        $crate::kernels::row_kernel!($t);
    };
    ($t:ty) => {
        impl $crate::kernels::RowKernel for $t {
            fn n_rows(&self) -> usize {
                self.rows
            }
            fn align(&self) -> usize {
                self.row_align()
            }
            fn check(&self, x: &$crate::kernels::QuantActs) {
                self.check_acts(x)
            }
            unsafe fn rows_raw(
                &self,
                x: &$crate::kernels::QuantActs,
                out: $crate::kernels::OutPtr,
                rows: std::ops::Range<usize>,
            ) {
                self.matmul_rows_raw(x, out, rows)
            }
        }
    };
}
pub(crate) use row_kernel;

/// The level whose layout and kernel serve `level` for the grouped heads (4-bit, 2-bit): their
/// AVX2 kernel (which also serves AVX-VNNI) converts its scales with F16C, present on every AVX2
/// CPU we know of; without it the portable kernel runs.
pub(crate) fn grouped_layout_level(level: KernelLevel) -> KernelLevel {
    match level.simd() {
        #[cfg(target_arch = "x86_64")]
        KernelLevel::Avx2 | KernelLevel::AvxVnni if !is_x86_feature_detected!("f16c") => KernelLevel::Generic,
        l => l,
    }
}

/// Rows a grouped head's thread ranges start at multiples of: 16-row blocks on x86, any row
/// in the portable layout.
pub(crate) fn grouped_row_align(layout: KernelLevel) -> usize {
    match layout {
        KernelLevel::Generic => 1,
        _ => 16,
    }
}

/// Bytes of a grouped head `[rows][cols]` at `bits` per weight plus an f16 scale per
/// [`ACT_GROUP`], packed for `level` (x86 layouts pad the rows to blocks of 16).
pub(crate) fn grouped_packed_bytes(rows: usize, cols: usize, level: KernelLevel, bits: usize) -> usize {
    let kcols = cols.div_ceil(K_ALIGN) * K_ALIGN;
    let align = grouped_row_align(grouped_layout_level(level));
    let rows = rows.div_ceil(align) * align;
    rows * kcols * bits / 8 + 2 * rows * kcols / ACT_GROUP
}

/// Quantizes a dense `[rows][cols]` matrix per row and group of [`ACT_GROUP`] columns for the
/// grouped heads (4-bit, 2-bit): `group(w, q)` fills one group's codes and returns its f16 scale.
/// Returns `q` `[rows][kcols]` (padding `pad`) and scales `[rows][kcols / 32]` (padding 0). Rows
/// are independent, so they are split across the machine's cores (scoped threads, at load time
/// only: 2B-4T's head is 328M weights).
pub(crate) fn quantize_groups(
    w: crate::dense::DenseRef<'_>,
    rows: usize,
    cols: usize,
    pad: u8,
    group: impl Fn(&[f32], &mut [u8]) -> u16 + Sync,
) -> (Vec<u8>, Vec<u16>) {
    assert!(w.len() >= rows * cols, "dense matrix too short");
    let kcols = cols.div_ceil(K_ALIGN) * K_ALIGN;
    let ng = kcols / ACT_GROUP;
    let mut q = vec![pad; rows * kcols];
    let mut d = vec![0u16; rows * ng];
    par_rows(rows, (&mut q, kcols), (&mut d, ng), |r0, qc, dc| {
        let mut row = vec![0f32; cols];
        for (j, (qr, dr)) in qc.chunks_mut(kcols).zip(dc.chunks_mut(ng)).enumerate() {
            w.row_to_f32(r0 + j, cols, &mut row);
            for (g, chunk) in row.chunks(ACT_GROUP).enumerate() {
                dr[g] = group(chunk, &mut qr[g * ACT_GROUP..g * ACT_GROUP + chunk.len()]);
            }
        }
    });
    (q, d)
}

/// `out[t * out_stride + r]` for `r in rows` and every token, on this thread, arguments checked.
pub(crate) fn rows_checked<K: RowKernel>(k: &K, x: &QuantActs, out: &mut [f32], out_stride: usize, rows: Range<usize>) {
    k.check(x);
    assert!(rows.start <= rows.end && rows.end <= k.n_rows());
    if x.n_tok == 0 || rows.is_empty() {
        return;
    }
    assert!(out.len() >= (x.n_tok - 1) * out_stride + rows.end, "output too short");
    // SAFETY: bounds checked above; `out` is uniquely borrowed.
    unsafe { k.rows_raw(x, OutPtr { ptr: out.as_mut_ptr(), stride: out_stride }, rows) }
}

/// Up to this many tokens a matmul is bandwidth bound and its rows are handed out by
/// [`ThreadPool::run_balanced`] (a thread done early takes over the end of a slower one's share:
/// for cores of unequal speed, such as a shared VM's vCPUs or hybrid CPUs; `int2` decode at 2
/// threads against the static split, alternated: +1%, +11%, +35% while one vCPU lagged, equal
/// within noise in 4 more pairs); past it, compute bound, each thread keeps one static share
/// (chunking measured 6% slower at 32 tokens).
pub const BALANCED_MAX_TOKENS: usize = 4;

/// Every row for every token, the rows split across the pool's threads (each owns a contiguous,
/// `align`-aligned range, balanced for few tokens: [`BALANCED_MAX_TOKENS`]).
pub(crate) fn pooled<K: RowKernel>(k: &K, pool: &ThreadPool, x: &QuantActs, out: &mut [f32], out_stride: usize) {
    if x.n_tok == 0 {
        return;
    }
    k.check(x);
    assert!(out.len() >= (x.n_tok - 1) * out_stride + k.n_rows(), "output too short");
    let p = SyncPtr::new(out);
    // rows in units of `align`
    let (n_rows, align) = (k.n_rows(), k.align());
    let units = n_rows.div_ceil(align);
    let body = |u: Range<usize>| {
        let r = u.start * align..(u.end * align).min(n_rows);
        if r.is_empty() {
            return;
        }
        let p: SyncPtr<f32> = p; // capture the whole (Sync) wrapper, not its raw field
                                 // SAFETY: bounds checked above; the ranges are disjoint rows of each token's row.
        unsafe { k.rows_raw(x, OutPtr { ptr: p.0, stride: out_stride }, r) };
    };
    if x.n_tok <= BALANCED_MAX_TOKENS {
        pool.run_balanced(units, body);
    } else {
        pool.run(|tid, nt| body(crate::split_range(units, nt, tid, 1)));
    }
}

row_kernel!(TernaryMatrix);
