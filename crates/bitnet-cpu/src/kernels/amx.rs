//! Intel AMX-INT8 tiles (Sapphire Rapids and later Xeons) for the many-token ternary matmuls of
//! levels `amx` and `amxvbmi` (prefill, batched decode); their one-to-few-token kernels are
//! AVX-512's (`avx512.rs`), on the same packed layout.
//!
//! `tdpbsud` adds to each int32 of a 16 x 16 accumulator tile the 64 products of a row of a
//! signed-byte A tile (16 tokens x 64 activation columns) by a column of an unsigned-byte B tile
//! (16 output rows x 64 columns, stored as 16 rows of "4 consecutive columns for each of the 16
//! output rows"): 16,384 multiply-adds per instruction, against `vpdpbusd zmm`'s 64. That B row
//! is exactly what unpacking one position `p` of an x86-layout block gives (`(block >> 2p) & 3`:
//! 16 rows x 4 columns as dwords), so the weights are unpacked once per tile and token block
//! into a buffer of such rows (`avx512.rs`, `unpack_amx`), and the activations are read as A
//! tiles straight from [`super::QuantActs`] (a tile row is a token's 64 bytes; the stride is the
//! activation stride). The products are the same unsigned offset codes `u = code + 1` times the
//! same int8 activations as every other level, summed exactly in int32, so the integers and the
//! float epilogue after them are those of the scalar reference, bit for bit.
//!
//! The tile registers hold 2 x 2 accumulators (32 tokens x 32 rows: two 16-row groups, a layout
//! tile), two A and two B tiles. Rust has no intrinsics for AMX on stable, so each call is one
//! `asm!` block that configures the tiles, runs the whole column loop, stores the accumulators
//! and releases the tiles (no tile state lives between calls, so nothing the compiler or another
//! kernel does can disturb it).
//!
//! Linux grants a process the 8 KB of tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`): [`available`] asks once; without it (or on other systems) the levels
//! are not offered.

use std::arch::asm;
use std::sync::OnceLock;

/// Tokens per accumulator tile (rows of an A tile).
pub(super) const TOK_TILE: usize = 16;
/// Tokens per call of [`dot`]: two token tiles.
pub(super) const TOKS: usize = 2 * TOK_TILE;
/// Columns per tile step: 64 activation bytes, i.e. 16 "k-groups" of 4 columns.
pub(super) const KCHUNK: usize = 64;
/// Bytes of one B tile row (one k-group for 16 output rows).
pub(super) const BROW: usize = 64;
/// B rows (k-groups) per tile step.
pub(super) const KG_PER_CHUNK: usize = KCHUNK / 4;

/// Whether this CPU has AMX-TILE and AMX-INT8 and the OS let this process use them.
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(target_os = "linux")]
fn detect() -> bool {
    use core::arch::x86_64::{__cpuid_count, __get_cpuid_max};
    // `cpuid` exists on every x86-64 CPU; leaf 7 is read only if the CPU has it.
    let has = __get_cpuid_max(0).0 >= 7 && (__cpuid_count(7, 0).edx >> 24) & 3 == 3;
    if !has {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this request only extends this process's permitted XSAVE features; it fails
    // (non-zero) where the kernel or the hypervisor does not enable AMX state.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn detect() -> bool {
    false
}

/// A `ldtilecfg` operand (palette 1): tmm0-3 the accumulators (token tile 0 x group 0, 0 x 1,
/// 1 x 0, 1 x 1), tmm4-5 the A tiles of token tiles 0 and 1, tmm6-7 the B tiles of groups 0 and 1.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(toks: usize) -> TileConfig {
        let lo = toks.min(TOK_TILE) as u8;
        let hi = toks.saturating_sub(TOK_TILE) as u8;
        let rows = [lo, lo, hi, hi, lo, hi, 16, 16];
        let mut c = [0u8; 64];
        c[0] = 1;
        for (t, &r) in rows.iter().enumerate() {
            if r > 0 {
                // bytes per row (u16 at 16 + 2t), rows (u8 at 48 + t); unused tiles stay 0
                c[16 + 2 * t] = 64;
                c[48 + t] = r;
            }
        }
        TileConfig(c)
    }
}

/// `c[t][16 g + i] = sum over columns of a[t][col] * u(group g, row i, col)` for tokens
/// `t < toks` (1..=32) and both groups of a tile, over `chunks` steps of 64 columns.
///
/// - `a`: token `t`'s activations at `a + t * a_stride` (`chunks * 64` bytes are read per token).
/// - `b`: B rows of group 0, `chunks * 16` rows of 64 bytes (row `kg` = columns `4kg..4kg+4`
///   of the 16 output rows, as bytes `4i + j`); group 1's start `b_group` bytes after it.
/// - `c`: `toks` rows of 32 int32 (128 bytes each); rows past `toks` are not written.
/// - `pf`: `pf_lines` cache lines from `pf` on are prefetched (into L2) in each step, so that the
///   next tile's packed weights arrive while this one computes (a batch step reads every weight
///   from memory once; its unpacking would otherwise wait for them).
///
/// # Safety
/// [`available`] returned true; every byte named above is readable (and `c` writable);
/// `1 <= toks <= 32`, `chunks >= 1`; the sums fit in i32. (`pf` may point anywhere: prefetches
/// never fault.)
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dot(
    a: *const i8,
    a_stride: usize,
    toks: usize,
    b: *const u8,
    b_group: usize,
    chunks: usize,
    c: *mut i32,
    (pf, pf_lines): (*const u8, usize),
) {
    debug_assert!((1..=TOKS).contains(&toks) && chunks >= 1);
    let cfg = TileConfig::new(toks);
    let b1 = b.add(b_group);
    // One body for both shapes: per step, prefetch `pf_lines` lines, load both B tiles and the
    // first A tile, two products, then `$second` (the second token tile's load and products, or
    // nothing); after the loop the accumulators go to `c` and the tiles are released.
    macro_rules! tile_loop {
        ([$($zero:literal),*], [$($second:literal),*], [$($store:literal),*] $(, $op:ident = $val:expr)*) => {
            asm!(
                "ldtilecfg [{cfg}]",
                "tilezero tmm0",
                "tilezero tmm1",
                $($zero,)*
                "2:",
                "mov {k}, {pfn}",
                "test {k}, {k}",
                "jz 4f",
                "3:",
                "prefetcht1 [{pf}]",
                "add {pf}, 64",
                "dec {k}",
                "jnz 3b",
                "4:",
                "tileloadd tmm6, [{b0} + {brow}*1]",
                "tileloadd tmm7, [{b1} + {brow}*1]",
                "tileloadd tmm4, [{a0} + {astr}*1]",
                "tdpbsud tmm0, tmm4, tmm6",
                "tdpbsud tmm1, tmm4, tmm7",
                $($second,)*
                "add {a0}, 64",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {n}",
                "jnz 2b",
                "tilestored [{c} + {cstr}*1], tmm0",
                "tilestored [{c} + {cstr}*1 + 64], tmm1",
                $($store,)*
                "tilerelease",
                cfg = in(reg) cfg.0.as_ptr(),
                a0 = inout(reg) a => _,
                astr = in(reg) a_stride,
                b0 = inout(reg) b => _,
                b1 = inout(reg) b1 => _,
                brow = in(reg) BROW,
                n = inout(reg) chunks => _,
                pf = inout(reg) pf => _,
                pfn = in(reg) pf_lines,
                k = out(reg) _,
                c = in(reg) c,
                cstr = in(reg) 128usize,
                $($op = inout(reg) $val => _,)*
                options(nostack),
            )
        };
    }
    if toks > TOK_TILE {
        tile_loop!(
            ["tilezero tmm2", "tilezero tmm3"],
            [
                "tileloadd tmm5, [{a1} + {astr}*1]",
                "tdpbsud tmm2, tmm5, tmm6",
                "tdpbsud tmm3, tmm5, tmm7",
                "add {a1}, 64"
            ],
            ["tilestored [{c} + {cstr}*1 + 2048], tmm2", "tilestored [{c} + {cstr}*1 + 2112], tmm3"],
            a1 = a.add(TOK_TILE * a_stride)
        );
    } else {
        tile_loop!([], [], []);
    }
}
