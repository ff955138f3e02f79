//! The KV cache: one preallocated pool of fixed-size blocks, written in place.
//!
//! A sequence owns a block table ([`SeqCache`]; the bookkeeping is `block_pool.rs`, shared with
//! the CUDA backend); position `p` lives in block `table[p / block_size]` at row
//! `p % block_size`. Layout per layer, kv head and block (`[layer][kv head][block]`, each
//! store):
//! - V: `[block_size][head_dim]`, a row per position (attention sums whole V rows);
//! - K: `[block_size / 16][head_dim][16]`, tiles of 16 positions stored transposed, so one kv
//!   head's keys `16i..16i + 16` are one contiguous `[head_dim][16]` tile whose scores come out
//!   as the 16 lanes of a vector (`bitnet_cpu::attn`). Hence block sizes are multiples of
//!   [`BLOCK_MULTIPLE`].
//!
//! An int8 cache keeps each row's scales beside its codes (`bitnet_cpu::attn::KV_QBLOCK`): a row
//! is `row_len(head_dim)` bytes, a tile 16 of those, in the same places.
//!
//! Attention walks one kv head of one layer over all positions, so a head's blocks are
//! contiguous in block order: a sequence whose blocks came in order (the pool hands them out
//! ascending) reads its keys and its values as two sequential streams. (With the heads
//! interleaved per position, a head's K was 4 KB pieces 20 KB apart and its V 256 B pieces 1280
//! B apart for 2B-4T at f16, which the hardware prefetchers did not follow: `int2` decode at 2048
//! positions ran at 25.9 tok/s against ~50 at short contexts, ~18 ms a step for its 157 MB of
//! K/V. Head-major: 33.4 tok/s, `bitnet bench --prompt 2048 --gen 32` on two threads.)
//!
//! The single-sequence CLI uses the same pool (one sequence, its table grows as it goes), so
//! there is one cache implementation, never grown by concatenation, and block bookkeeping never
//! allocates (the free list and every table are reserved up front).

use bitnet_cpu::attn::{quantize_kv_row, quantize_kv_tile_lane, KvElem, KEY_TILE};

use crate::block_pool::BlockPool;
pub use crate::block_pool::SeqCache;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::precision::KvPrecision;

/// Block sizes are multiples of this: the positions of one transposed K tile.
pub const BLOCK_MULTIPLE: usize = KEY_TILE;

/// Storage of K and V for all layers, in one element type.
enum Store {
    F32 {
        k: Vec<f32>,
        v: Vec<f32>,
    },
    /// raw f16 bits
    F16 {
        k: Vec<u16>,
        v: Vec<u16>,
    },
    /// int8 codes and their scales (`bitnet_cpu::attn::KV_QBLOCK`)
    I8 {
        k: Vec<i8>,
        v: Vec<i8>,
    },
}

/// The block pool: K/V storage for every block, and the bookkeeping of who holds which
/// ([`BlockPool`]).
pub struct KvCache {
    n_layers: usize,
    geo: Geometry,
    pool: BlockPool,
    kv: Store,
}

/// Where a position's K and V live in the stores, in elements of the store's type.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    head_dim: usize,
    /// elements one row of `head_dim` values takes (`KvElem::row_len`: `head_dim`, or codes and
    /// scales for int8)
    row: usize,
    kv_heads: usize,
    block_size: usize,
    n_blocks: usize,
}

impl Geometry {
    /// Elements of one kv head in one block (per store).
    #[inline]
    fn per_head_block(self) -> usize {
        self.block_size * self.row
    }

    /// Start of block `b` of kv head `head` of `layer` (the same offset in the K and the V store).
    #[inline]
    fn base(self, layer: usize, head: usize, b: usize) -> usize {
        ((layer * self.kv_heads + head) * self.n_blocks + b) * self.per_head_block()
    }

    /// Start of the block holding `pos`, for one kv head of one layer.
    #[inline]
    fn block_base(self, layer: usize, head: usize, seq: &SeqCache, pos: usize) -> usize {
        self.base(layer, head, seq.blocks[pos / self.block_size] as usize)
    }

    /// Offset of kv head `head`'s V row at `pos` (`head_dim` values).
    #[inline]
    fn v_offset(self, layer: usize, head: usize, seq: &SeqCache, pos: usize) -> usize {
        self.block_base(layer, head, seq, pos) + pos % self.block_size * self.row
    }

    /// Offset of kv head `head`'s K tile holding `pos` (`[head_dim][16]`, `16 * row` elements);
    /// `pos`'s lane is `pos % 16`.
    #[inline]
    fn k_tile_offset(self, layer: usize, head: usize, seq: &SeqCache, pos: usize) -> usize {
        self.block_base(layer, head, seq, pos) + pos % self.block_size / KEY_TILE * (KEY_TILE * self.row)
    }
}

impl KvCache {
    /// A pool of `n_blocks` blocks of `block_size` positions; `max_ctx` bounds one sequence.
    /// Panics unless `block_size` is a positive multiple of [`BLOCK_MULTIPLE`] (callers validate
    /// user input first).
    // `usize::is_multiple_of` needs Rust 1.87; the workspace's rust-version is 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn new(cfg: &ModelConfig, n_blocks: usize, block_size: usize, max_ctx: usize, dtype: KvPrecision) -> KvCache {
        assert!(
            block_size > 0 && block_size % BLOCK_MULTIPLE == 0,
            "KV block size {block_size} is not a positive multiple of {BLOCK_MULTIPLE}"
        );
        let row = match dtype {
            KvPrecision::F32 | KvPrecision::F16 => cfg.head_dim,
            KvPrecision::Int8 => <i8 as KvElem>::row_len(cfg.head_dim),
        };
        let geo = Geometry { head_dim: cfg.head_dim, row, kv_heads: cfg.num_kv_heads, block_size, n_blocks };
        let elems = cfg.num_layers * cfg.num_kv_heads * n_blocks * geo.per_head_block();
        // huge pages as positions are first written (`bitnet_cpu::mem::advised`)
        use bitnet_cpu::mem::advised as huge;
        let kv = match dtype {
            KvPrecision::F32 => Store::F32 { k: huge(vec![0.0; elems]), v: huge(vec![0.0; elems]) },
            KvPrecision::F16 => Store::F16 { k: huge(vec![0; elems]), v: huge(vec![0; elems]) },
            KvPrecision::Int8 => Store::I8 { k: huge(vec![0; elems]), v: huge(vec![0; elems]) },
        };
        KvCache { n_layers: cfg.num_layers, geo, pool: BlockPool::new(n_blocks, block_size, max_ctx), kv }
    }

    /// Turns the prefix cache on ([`BlockPool::enable_prefix_cache`]).
    pub fn enable_prefix_cache(&mut self) {
        self.pool.enable_prefix_cache();
    }
    pub fn prefix_cache_enabled(&self) -> bool {
        self.pool.prefix_cache_enabled()
    }
    /// Blocks no sequence holds that are kept findable by the prefix cache (counted as free).
    pub fn cached_blocks(&self) -> usize {
        self.pool.cached_blocks()
    }
    /// Blocks needed for `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        self.pool.blocks_for(positions)
    }
    pub fn block_size(&self) -> usize {
        self.pool.block_size()
    }
    pub fn n_blocks(&self) -> usize {
        self.pool.n_blocks()
    }
    /// Blocks a sequence can get (free, and cached ones nobody holds).
    pub fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
    }
    /// Blocks held by sequences.
    pub fn used_blocks(&self) -> usize {
        self.pool.used_blocks()
    }
    /// Bytes held by K and V.
    pub fn nbytes(&self) -> usize {
        let per = match &self.kv {
            Store::F32 { .. } => 4,
            Store::F16 { .. } => 2,
            Store::I8 { .. } => 1,
        };
        2 * self.n_layers * self.n_blocks() * self.geo.kv_heads * self.geo.per_head_block() * per
    }

    /// An empty sequence whose table can hold the maximum context without reallocating.
    pub fn new_seq(&self) -> SeqCache {
        self.pool.new_seq()
    }
    /// [`BlockPool::reserve`].
    pub fn reserve(&mut self, seq: &mut SeqCache, new_len: usize) -> Result<()> {
        self.pool.reserve(seq, new_len)
    }
    /// [`BlockPool::release`].
    pub fn release(&mut self, seq: &mut SeqCache) {
        self.pool.release(seq)
    }
    /// [`BlockPool::attach_prefix`].
    pub fn attach_prefix(&mut self, seq: &mut SeqCache, tokens: &[u32]) -> usize {
        self.pool.attach_prefix(seq, tokens)
    }
    /// [`BlockPool::publish`].
    pub fn publish(&mut self, seq: &mut SeqCache, tokens: &[u32]) {
        self.pool.publish(seq, tokens)
    }
    /// [`BlockPool::truncate`], copying a shared block's K/V here when it must.
    pub fn truncate(&mut self, seq: &mut SeqCache, len: usize) -> usize {
        let (geo, n_layers, kv) = (self.geo, self.n_layers, &mut self.kv);
        self.pool.truncate(seq, len, |from, to| copy_block(kv, geo, n_layers, from, to))
    }

    /// Writes K and V rows (`kv_dim` each) of `layer` at position `pos` of `seq` (in place; K
    /// into its tile's lane).
    pub fn write(&mut self, layer: usize, seq: &SeqCache, pos: usize, k: &[f32], v: &[f32]) {
        // SAFETY: `&mut self`: no other access to the stores while the writer lives.
        unsafe { self.writer().write(layer, seq, pos, k, v) }
    }

    /// Writes from several threads at once (a step's tokens split over the pool), for as long as
    /// the writer lives.
    pub fn writer(&mut self) -> KvWriter<'_> {
        let store = match &mut self.kv {
            Store::F32 { k, v } => RawStore::F32 { k: k.as_mut_ptr(), v: v.as_mut_ptr(), len: k.len().min(v.len()) },
            Store::F16 { k, v } => RawStore::F16 { k: k.as_mut_ptr(), v: v.as_mut_ptr(), len: k.len().min(v.len()) },
            Store::I8 { k, v } => RawStore::I8 { k: k.as_mut_ptr(), v: v.as_mut_ptr(), len: k.len().min(v.len()) },
        };
        KvWriter { geo: self.geo, store, _cache: std::marker::PhantomData }
    }

    /// Read access for attention, typed by the cache's element type.
    pub fn view(&self) -> KvView<'_> {
        match &self.kv {
            Store::F32 { k, v } => KvView::F32(KvRows { cache: self, k, v }),
            Store::F16 { k, v } => KvView::F16(KvRows { cache: self, k, v }),
            Store::I8 { k, v } => KvView::I8(KvRows { cache: self, k, v }),
        }
    }
}

/// Shared read access to the cache (attention threads read concurrently), by element type, so
/// attention is compiled once per type and never matches per row.
#[derive(Clone, Copy)]
pub enum KvView<'a> {
    F32(KvRows<'a, f32>),
    /// raw f16 bits
    F16(KvRows<'a, u16>),
    /// int8 codes with their scales
    I8(KvRows<'a, i8>),
}

/// The K and V stores of a cache as `T`.
#[derive(Clone, Copy)]
pub struct KvRows<'a, T> {
    cache: &'a KvCache,
    k: &'a [T],
    v: &'a [T],
}

impl<'a, T> KvRows<'a, T> {
    /// The K tile of kv head `head` for positions `j0..j0 + 16` (`j0` a multiple of 16):
    /// `[head_dim][16]` values, element `d` of position `j0 + c` at `d * 16 + c` (int8: then the
    /// scales; `KvElem::k_at` reads one). Lanes of positions not yet written hold whatever the
    /// block held before.
    #[inline]
    pub fn k_tile(&self, layer: usize, seq: &SeqCache, j0: usize, head: usize) -> &'a [T] {
        debug_assert_eq!(j0 % KEY_TILE, 0);
        let g = self.cache.geo;
        let o = g.k_tile_offset(layer, head, seq, j0);
        &self.k[o..o + g.row * KEY_TILE]
    }

    /// V row of kv head `head` at `pos`: `head_dim` values (int8: then the scales;
    /// `KvElem::v_at` reads one).
    #[inline]
    pub fn v_row(&self, layer: usize, seq: &SeqCache, pos: usize, head: usize) -> &'a [T] {
        let g = self.cache.geo;
        let o = g.v_offset(layer, head, seq, pos);
        &self.v[o..o + g.row]
    }
}

/// Raw pointers to the K and V stores (both `len` elements).
#[derive(Clone, Copy)]
enum RawStore {
    F32 {
        k: *mut f32,
        v: *mut f32,
        len: usize,
    },
    /// raw f16 bits
    F16 {
        k: *mut u16,
        v: *mut u16,
        len: usize,
    },
    I8 {
        k: *mut i8,
        v: *mut i8,
        len: usize,
    },
}

/// Writes K/V rows into the cache from several threads at once ([`KvCache::writer`]). A call
/// writes the elements of its own `(layer, sequence, position)` only: calls for distinct
/// positions touch disjoint elements (a K tile's positions share cache lines, not elements).
pub struct KvWriter<'a> {
    geo: Geometry,
    store: RawStore,
    _cache: std::marker::PhantomData<&'a mut KvCache>,
}

// SAFETY: the writer is a `&mut KvCache` whose writes callers keep disjoint (`write`'s contract).
unsafe impl Send for KvWriter<'_> {}
unsafe impl Sync for KvWriter<'_> {}

impl KvWriter<'_> {
    /// Writes K and V rows (`kv_dim` each) of `layer` at position `pos` of `seq` (in place; K
    /// into its tile's lane). Panics if `seq` holds no block for `pos` or `layer` is out of range.
    ///
    /// # Safety
    /// No other call writes the same `(layer, seq, pos)` at the same time.
    pub unsafe fn write(&self, layer: usize, seq: &SeqCache, pos: usize, k: &[f32], v: &[f32]) {
        let g = self.geo;
        let (d, lane) = (g.head_dim, pos % KEY_TILE);
        for head in 0..g.kv_heads {
            let (kt, vo) = (g.k_tile_offset(layer, head, seq, pos), g.v_offset(layer, head, seq, pos));
            let (k, v) = (&k[head * d..(head + 1) * d], &v[head * d..(head + 1) * d]);
            match self.store {
                RawStore::F32 { k: ks, v: vs, len } => {
                    assert!(kt + d * KEY_TILE <= len && vo + d <= len, "KV write out of the store");
                    for (i, &x) in k.iter().enumerate() {
                        *ks.add(kt + i * KEY_TILE + lane) = x;
                    }
                    std::ptr::copy_nonoverlapping(v.as_ptr(), vs.add(vo), d);
                }
                RawStore::F16 { k: ks, v: vs, len } => {
                    assert!(kt + d * KEY_TILE <= len && vo + d <= len, "KV write out of the store");
                    let h = |x: f32| half::f16::from_f32(x).to_bits();
                    for (i, &x) in k.iter().enumerate() {
                        *ks.add(kt + i * KEY_TILE + lane) = h(x);
                    }
                    for (i, &x) in v.iter().enumerate() {
                        *vs.add(vo + i) = h(x);
                    }
                }
                RawStore::I8 { k: ks, v: vs, len } => {
                    let row = g.row;
                    assert!(kt + row * KEY_TILE <= len && vo + row <= len, "KV write out of the store");
                    // SAFETY: in the store (checked); this position's lane and row only (the
                    // contract), the other lanes of the tile are not touched through the slice's
                    // writes (`quantize_kv_tile_lane` writes lane `lane` only).
                    let tile = std::slice::from_raw_parts_mut(ks.add(kt), row * KEY_TILE);
                    quantize_kv_tile_lane(k, tile, lane);
                    quantize_kv_row(v, std::slice::from_raw_parts_mut(vs.add(vo), row));
                }
            }
        }
    }
}

/// Copies block `from`'s K and V (every layer and kv head) into block `to`.
fn copy_block(kv: &mut Store, g: Geometry, n_layers: usize, from: u32, to: u32) {
    let per = g.per_head_block();
    for l in 0..n_layers {
        for h in 0..g.kv_heads {
            let (src, dst) = (g.base(l, h, from as usize), g.base(l, h, to as usize));
            match kv {
                Store::F32 { k, v } => {
                    k.copy_within(src..src + per, dst);
                    v.copy_within(src..src + per, dst);
                }
                Store::F16 { k, v } => {
                    k.copy_within(src..src + per, dst);
                    v.copy_within(src..src + per, dst);
                }
                Store::I8 { k, v } => {
                    k.copy_within(src..src + per, dst);
                    v.copy_within(src..src + per, dst);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::random::preset_config;

    /// Every position written lands where `k_tile` and `v_row` read it back, across blocks of
    /// 32 positions (two tiles each) taken out of order, in both element types, and writing one
    /// position disturbs no other.
    #[test]
    fn rows_written_are_read_back_from_tiles_and_rows() {
        let cfg = preset_config("tiny").unwrap().resolve().unwrap();
        let kvd = cfg.kv_dim;
        let val = |l: usize, p: usize, c: usize, v: bool| (l * 10_000 + p * 50 + c) as f32 * if v { -1.0 } else { 1.0 };
        for dtype in [KvPrecision::F32, KvPrecision::F16, KvPrecision::Int8] {
            let mut cache = KvCache::new(&cfg, 8, 32, 128, dtype);
            let mut other = cache.new_seq();
            cache.reserve(&mut other, 40).unwrap(); // blocks 0 and 1: the sequence gets 2, 3, 4
            let mut seq = cache.new_seq();
            cache.reserve(&mut seq, 70).unwrap();
            for l in 0..cfg.num_layers {
                for p in 0..70 {
                    let k: Vec<f32> = (0..kvd).map(|c| val(l, p, c, false)).collect();
                    let v: Vec<f32> = (0..kvd).map(|c| val(l, p, c, true)).collect();
                    cache.write(l, &seq, p, &k, &v);
                }
            }
            let hd = cfg.head_dim;
            // the value as the cache stores it: int8 quantizes the kv head's row in blocks
            let stored = |l: usize, p: usize, c: usize, v: bool| match dtype {
                KvPrecision::F32 => val(l, p, c, v),
                KvPrecision::F16 => half::f16::from_f32(val(l, p, c, v)).to_f32(),
                KvPrecision::Int8 => {
                    let h0 = c / hd * hd;
                    let x: Vec<f32> = (h0..h0 + hd).map(|c| val(l, p, c, v)).collect();
                    let mut q = vec![0i8; <i8 as KvElem>::row_len(hd)];
                    quantize_kv_row(&x, &mut q);
                    i8::v_at(&q, hd, c - h0)
                }
            };
            /// Reads every tile and row back through `rows` and compares with `want` (the value
            /// written at (layer, position, column, is V), as the cache stores it).
            fn check<T: bitnet_cpu::attn::KvElem>(
                rows: KvRows<'_, T>,
                seq: &SeqCache,
                cfg: &ModelConfig,
                want: &dyn Fn(usize, usize, usize, bool) -> f32,
            ) {
                let hd = cfg.head_dim;
                for l in 0..cfg.num_layers {
                    for h in 0..cfg.kv_dim / hd {
                        for j0 in (0..70).step_by(KEY_TILE) {
                            let t = rows.k_tile(l, seq, j0, h);
                            for d in 0..hd {
                                for c in 0..KEY_TILE.min(70 - j0) {
                                    assert_eq!(T::k_at(t, hd, d, c), want(l, j0 + c, h * hd + d, false));
                                }
                            }
                        }
                        for p in 0..70 {
                            let r = rows.v_row(l, seq, p, h);
                            for d in 0..hd {
                                assert_eq!(T::v_at(r, hd, d), want(l, p, h * hd + d, true));
                            }
                        }
                    }
                }
            }
            match cache.view() {
                KvView::F32(rows) => check(rows, &seq, &cfg, &stored),
                KvView::F16(rows) => check(rows, &seq, &cfg, &stored),
                KvView::I8(rows) => check(rows, &seq, &cfg, &stored),
            }
        }
    }

    /// A cache of `n` blocks of 16 with the prefix cache on, and `seq` filled with `tokens`
    /// (K/V rows written as `pos * 10 + column`, so blocks can be told apart).
    fn filled(cache: &mut KvCache, tokens: &[u32]) -> SeqCache {
        let mut seq = cache.new_seq();
        let start = cache.attach_prefix(&mut seq, tokens);
        cache.reserve(&mut seq, tokens.len()).unwrap();
        let kvd = cache.geo.kv_heads * cache.geo.head_dim;
        for (p, &t) in tokens.iter().enumerate().skip(start) {
            let row: Vec<f32> = (0..kvd).map(|c| (t as usize * 10 + c) as f32).collect();
            for l in 0..cache.n_layers {
                cache.write(l, &seq, p, &row, &row);
            }
        }
        seq.advance(tokens.len() - start);
        cache.publish(&mut seq, tokens);
        seq
    }

    #[test]
    fn prefix_blocks_are_shared_parked_and_evicted() {
        let cfg = preset_config("tiny").unwrap().resolve().unwrap();
        let mut cache = KvCache::new(&cfg, 8, 16, 128, KvPrecision::F32);
        let mut seq = cache.new_seq();
        assert_eq!(cache.attach_prefix(&mut seq, &[1; 40]), 0, "off by default");
        cache.enable_prefix_cache();
        let a_toks: Vec<u32> = (0..40).collect();
        let mut a = filled(&mut cache, &a_toks);
        assert_eq!(cache.used_blocks(), 3);
        // Same first 32 tokens: two blocks shared; the last token is always left to compute.
        let mut b = cache.new_seq();
        assert_eq!(cache.attach_prefix(&mut b, &a_toks[..40]), 32);
        assert_eq!(b.blocks[..], a.blocks[..2]);
        assert_eq!(cache.used_blocks(), 3);
        for (toks, want) in [(&a_toks[..33], 32), (&a_toks[..32], 16), (&a_toks[..16], 0)] {
            let mut c = cache.new_seq();
            assert_eq!(cache.attach_prefix(&mut c, toks), want);
            cache.release(&mut c);
        }
        // A block matches only after the same prefix: a different first block hides the second.
        let mut other: Vec<u32> = a_toks.clone();
        other[3] = 999;
        let mut c = cache.new_seq();
        assert_eq!(cache.attach_prefix(&mut c, &other), 0);
        // Releasing: shared blocks stay with B; A's third block is free again.
        cache.release(&mut a);
        assert_eq!((cache.used_blocks(), cache.cached_blocks()), (2, 0));
        cache.release(&mut b);
        assert_eq!((cache.used_blocks(), cache.cached_blocks(), cache.free_blocks()), (0, 2, 8));
        // Parked blocks come back on a hit ...
        let mut c = cache.new_seq();
        assert_eq!(cache.attach_prefix(&mut c, &a_toks), 32);
        assert_eq!((cache.used_blocks(), cache.cached_blocks()), (2, 0));
        cache.release(&mut c);
        // ... and are evicted, least recently released first, only when the pool needs them.
        let mut d = cache.new_seq();
        cache.reserve(&mut d, 6 * 16).unwrap();
        assert_eq!(cache.cached_blocks(), 2, "free blocks go first");
        cache.reserve(&mut d, 7 * 16).unwrap();
        assert_eq!(cache.cached_blocks(), 1);
        let mut e = cache.new_seq();
        assert_eq!(cache.attach_prefix(&mut e, &a_toks), 0, "the first block was evicted");
        cache.release(&mut d);
        cache.release(&mut e);
        assert_eq!(cache.free_blocks(), 8);
    }

    #[test]
    fn truncating_into_a_shared_block_copies_it() {
        /// Every layer's and kv head's V rows of positions 16..32 and K tile at 16 are the same
        /// for both.
        fn same_block_1<T: PartialEq + std::fmt::Debug>(
            rows: KvRows<'_, T>,
            a: &SeqCache,
            b: &SeqCache,
            cfg: &ModelConfig,
        ) {
            for l in 0..cfg.num_layers {
                for h in 0..cfg.num_kv_heads {
                    for p in 16..32 {
                        assert_eq!(rows.v_row(l, b, p, h), rows.v_row(l, a, p, h));
                    }
                    assert_eq!(rows.k_tile(l, b, 16, h), rows.k_tile(l, a, 16, h));
                }
            }
        }
        let cfg = preset_config("tiny").unwrap().resolve().unwrap();
        for dtype in [KvPrecision::F32, KvPrecision::F16, KvPrecision::Int8] {
            let mut cache = KvCache::new(&cfg, 7, 16, 96, dtype);
            cache.enable_prefix_cache();
            let toks: Vec<u32> = (100..150).collect();
            let a = filled(&mut cache, &toks);
            let mut b = cache.new_seq();
            assert_eq!(cache.attach_prefix(&mut b, &toks), 48);
            // B keeps 20 positions: block 1 (shared, holds 16..20) becomes B's own copy; block 2
            // (shared, all past 20) is swapped for a fresh one; block 0 stays shared.
            assert_eq!(cache.truncate(&mut b, 20), 20);
            assert_eq!(b.blocks[0], a.blocks[0]);
            assert!(b.blocks[1] != a.blocks[1] && b.blocks[2] != a.blocks[2]);
            match cache.view() {
                KvView::F32(rows) => same_block_1(rows, &a, &b, &cfg),
                KvView::F16(rows) => same_block_1(rows, &a, &b, &cfg),
                KvView::I8(rows) => same_block_1(rows, &a, &b, &cfg),
            }
            // A's blocks are still findable; B's copy is not (its positions 20.. will change).
            let mut c = cache.new_seq();
            assert_eq!(cache.attach_prefix(&mut c, &toks), 48);
            cache.release(&mut c);
            // No block left for a copy: the sequence keeps the positions before the shared block.
            let mut d = cache.new_seq();
            assert_eq!(cache.attach_prefix(&mut d, &toks), 48);
            let mut fill = cache.new_seq();
            cache.reserve(&mut fill, cache.free_blocks() * 16).unwrap();
            assert_eq!(cache.truncate(&mut d, 40), 32);
            assert_eq!(d.n_blocks(), 2);
        }
    }
}
