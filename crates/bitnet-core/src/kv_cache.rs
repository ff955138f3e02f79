//! The KV cache: one preallocated pool of fixed-size blocks, written in place.
//!
//! Layout per layer: `[n_blocks][block_size][kv_dim]` for K and for V. A sequence owns a block
//! table ([`SeqCache`]); position `p` lives in block `table[p / block_size]` at row
//! `p % block_size`. The single-sequence CLI uses the same pool (one sequence, its table grows
//! as it goes), so there is one cache implementation, never grown by concatenation, and block
//! bookkeeping never allocates (the free list and every table are reserved up front).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::precision::KvPrecision;

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
}

/// The block pool.
pub struct KvCache {
    n_layers: usize,
    kv_dim: usize,
    block_size: usize,
    n_blocks: usize,
    kv: Store,
    free: Vec<u32>,
    max_blocks_per_seq: usize,
}

/// One sequence's view of the cache: its block table and how many positions are filled.
#[derive(Debug)]
pub struct SeqCache {
    blocks: Vec<u32>,
    len: usize,
}

impl KvCache {
    /// A pool of `n_blocks` blocks of `block_size` positions; `max_ctx` bounds one sequence.
    pub fn new(cfg: &ModelConfig, n_blocks: usize, block_size: usize, max_ctx: usize, dtype: KvPrecision) -> KvCache {
        let block_size = block_size.max(1);
        let elems = cfg.num_layers * n_blocks * block_size * cfg.kv_dim;
        let mk = || match dtype {
            KvPrecision::F32 => Store::F32 { k: vec![0.0; elems], v: vec![0.0; elems] },
            KvPrecision::F16 => Store::F16 { k: vec![0; elems], v: vec![0; elems] },
        };
        KvCache {
            n_layers: cfg.num_layers,
            kv_dim: cfg.kv_dim,
            block_size,
            n_blocks,
            kv: mk(),
            // Popped from the end: hand out low block ids first.
            free: (0..n_blocks as u32).rev().collect(),
            max_blocks_per_seq: max_ctx.div_ceil(block_size),
        }
    }

    /// Blocks needed for `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
    pub fn used_blocks(&self) -> usize {
        self.n_blocks - self.free.len()
    }
    /// Bytes held by K and V.
    pub fn nbytes(&self) -> usize {
        let per = match &self.kv {
            Store::F32 { .. } => 4,
            Store::F16 { .. } => 2,
        };
        2 * self.n_layers * self.n_blocks * self.block_size * self.kv_dim * per
    }

    /// An empty sequence whose table can hold the maximum context without reallocating.
    pub fn new_seq(&self) -> SeqCache {
        SeqCache { blocks: Vec::with_capacity(self.max_blocks_per_seq), len: 0 }
    }

    /// Makes sure `seq` has blocks for `new_len` positions. Fails (taking nothing) when the pool
    /// cannot supply them.
    pub fn reserve(&mut self, seq: &mut SeqCache, new_len: usize) -> Result<()> {
        let need = self.blocks_for(new_len);
        if need > self.max_blocks_per_seq {
            return Err(Error::input(format!(
                "sequence of {new_len} positions exceeds the context of {} positions",
                self.max_blocks_per_seq * self.block_size
            )));
        }
        let extra = need.saturating_sub(seq.blocks.len());
        if extra > self.free.len() {
            return Err(Error::input(format!("KV cache full: {extra} more blocks needed, {} free", self.free.len())));
        }
        for _ in 0..extra {
            let b = self.free.pop().expect("checked above");
            seq.blocks.push(b);
        }
        Ok(())
    }

    /// Returns all of `seq`'s blocks to the pool and empties it.
    pub fn release(&mut self, seq: &mut SeqCache) {
        self.free.extend(seq.blocks.drain(..));
        seq.len = 0;
    }

    #[inline]
    fn offset(&self, layer: usize, seq: &SeqCache, pos: usize) -> usize {
        let b = seq.blocks[pos / self.block_size] as usize;
        ((layer * self.n_blocks + b) * self.block_size + pos % self.block_size) * self.kv_dim
    }

    /// Writes K and V rows (`kv_dim` each) of `layer` at position `pos` of `seq` (in place).
    pub fn write(&mut self, layer: usize, seq: &SeqCache, pos: usize, k: &[f32], v: &[f32]) {
        let o = self.offset(layer, seq, pos);
        let d = self.kv_dim;
        match &mut self.kv {
            Store::F32 { k: ks, v: vs } => {
                ks[o..o + d].copy_from_slice(k);
                vs[o..o + d].copy_from_slice(v);
            }
            Store::F16 { k: ks, v: vs } => {
                for (store, src) in [(ks, k), (vs, v)] {
                    for (dst, &x) in store[o..o + d].iter_mut().zip(src) {
                        *dst = half::f16::from_f32(x).to_bits();
                    }
                }
            }
        }
    }

    /// Read access for attention, typed by the cache's element type.
    pub fn view(&self) -> KvView<'_> {
        match &self.kv {
            Store::F32 { k, v } => KvView::F32(KvRows { cache: self, k, v }),
            Store::F16 { k, v } => KvView::F16(KvRows { cache: self, k, v }),
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
}

/// The K and V stores of a cache as `T`.
#[derive(Clone, Copy)]
pub struct KvRows<'a, T> {
    cache: &'a KvCache,
    k: &'a [T],
    v: &'a [T],
}

impl<'a, T> KvRows<'a, T> {
    /// K (`is_v == false`) or V row of one kv head at `pos`: `head_dim` values starting at `head_off`.
    #[inline]
    pub fn row(
        &self,
        is_v: bool,
        layer: usize,
        seq: &SeqCache,
        pos: usize,
        head_off: usize,
        head_dim: usize,
    ) -> &'a [T] {
        let o = self.cache.offset(layer, seq, pos) + head_off;
        let store = if is_v { self.v } else { self.k };
        &store[o..o + head_dim]
    }
}

impl SeqCache {
    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Positions that fit in the blocks held.
    pub fn capacity(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size
    }
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }
    /// Marks `n` more positions as filled (called by the model after writing them).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
    /// Forgets positions past `len` (e.g. to re-run a prompt); blocks stay held.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}
