//! Block bookkeeping of a paged KV cache, apart from where the blocks' K/V live: the CPU cache
//! (`kv_cache.rs`, host memory) and the CUDA backend (device memory) share it, so both get the
//! same allocation, sharing and prefix-cache rules.
//!
//! A sequence owns a block table ([`SeqCache`]); position `p` lives in block
//! `table[p / block_size]` at row `p % block_size`. Blocks are handed out from a free list; with
//! the prefix cache on (`prefix_cache.rs`) a full block can be found again by the tokens that
//! produced it, held by several sequences at once (reference counts), and kept findable after
//! its last holder releases it ("parked") until the pool needs its space. Nothing here allocates
//! after creation: the free list, the index and every table are reserved up front.

use crate::error::{Error, Result};
use crate::prefix_cache::{self, PrefixIndex};

/// The pool's bookkeeping: which block is free, held (by how many), or parked.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    n_blocks: usize,
    /// blocks nobody holds and nobody can find
    free: Vec<u32>,
    /// per block: sequences holding it (more than one only through the prefix cache)
    refs: Vec<u32>,
    /// the prefix cache, when on ([`BlockPool::enable_prefix_cache`])
    prefix: Option<PrefixIndex>,
    max_blocks_per_seq: usize,
}

/// One sequence's view of the cache: its block table and how many positions are filled.
#[derive(Debug)]
pub struct SeqCache {
    pub(crate) blocks: Vec<u32>,
    len: usize,
    /// chain hashes of its first blocks, as far as they were offered to the prefix cache
    hashes: Vec<u64>,
}

impl BlockPool {
    /// `n_blocks` blocks of `block_size` positions; `max_ctx` bounds one sequence.
    pub fn new(n_blocks: usize, block_size: usize, max_ctx: usize) -> BlockPool {
        assert!(block_size > 0, "KV block size 0");
        BlockPool {
            block_size,
            n_blocks,
            // Popped from the end: hand out low block ids first.
            free: (0..n_blocks as u32).rev().collect(),
            refs: vec![0; n_blocks],
            prefix: None,
            max_blocks_per_seq: max_ctx.div_ceil(block_size),
        }
    }

    /// Turns the prefix cache on (see `prefix_cache.rs`): [`BlockPool::publish`] makes full
    /// blocks findable, [`BlockPool::attach_prefix`] reuses them, released ones stay findable
    /// until the pool needs their space. Off by default (one-sequence use gains nothing).
    pub fn enable_prefix_cache(&mut self) {
        if self.prefix.is_none() {
            self.prefix = Some(PrefixIndex::new(self.n_blocks, self.block_size));
        }
    }

    pub fn prefix_cache_enabled(&self) -> bool {
        self.prefix.is_some()
    }

    /// Blocks no sequence holds that are kept findable by the prefix cache (counted as free).
    pub fn cached_blocks(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.parked())
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
    /// The most blocks one sequence can hold (its context).
    pub fn max_blocks_per_seq(&self) -> usize {
        self.max_blocks_per_seq
    }
    /// Blocks a sequence can get: never used or released ones, and cached ones nobody holds.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.cached_blocks()
    }
    /// Blocks held by sequences.
    pub fn used_blocks(&self) -> usize {
        self.n_blocks - self.free_blocks()
    }

    /// An empty sequence whose table can hold the maximum context without reallocating.
    pub fn new_seq(&self) -> SeqCache {
        SeqCache {
            blocks: Vec::with_capacity(self.max_blocks_per_seq),
            len: 0,
            hashes: Vec::with_capacity(self.max_blocks_per_seq),
        }
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
        if extra > self.free_blocks() {
            return Err(Error::input(format!(
                "KV cache full: {extra} more blocks needed, {} free",
                self.free_blocks()
            )));
        }
        for _ in 0..extra {
            let b = self.take_block().expect("checked above");
            seq.blocks.push(b);
        }
        Ok(())
    }

    /// A block for one sequence: a free one, else the least recently released cached one.
    fn take_block(&mut self) -> Option<u32> {
        let b = self.free.pop().or_else(|| self.prefix.as_mut().and_then(|p| p.evict()))?;
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// One holder less for block `b`: when none is left it goes back to the pool, kept findable
    /// if the prefix cache knows it.
    fn drop_block(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        *r = r.saturating_sub(1);
        if *r == 0 {
            match self.prefix.as_mut() {
                Some(p) if p.is_findable(b) => p.park(b),
                _ => self.free.push(b),
            }
        }
    }

    /// Returns all of `seq`'s blocks to the pool and empties it.
    pub fn release(&mut self, seq: &mut SeqCache) {
        for i in 0..seq.blocks.len() {
            self.drop_block(seq.blocks[i]);
        }
        seq.blocks.clear();
        seq.hashes.clear();
        seq.len = 0;
    }

    /// Gives the fresh sequence `seq` the cached blocks that hold a prefix of `tokens`, at most
    /// all but the last token (whose logits the caller needs computed); returns the positions
    /// they hold (a multiple of the block size; 0 with the prefix cache off or a non-empty `seq`).
    pub fn attach_prefix(&mut self, seq: &mut SeqCache, tokens: &[u32]) -> usize {
        let bs = self.block_size;
        let Some(p) = self.prefix.as_mut() else { return 0 };
        if !seq.blocks.is_empty() {
            return 0;
        }
        let most = (tokens.len().saturating_sub(1) / bs).min(self.max_blocks_per_seq);
        let mut parent = prefix_cache::ROOT;
        for i in 0..most {
            let t = &tokens[i * bs..(i + 1) * bs];
            let h = prefix_cache::chain(parent, t);
            let Some(b) = p.find(parent, h, t) else { break };
            if self.refs[b as usize] == 0 {
                p.unpark(b);
            }
            self.refs[b as usize] += 1;
            seq.blocks.push(b);
            seq.hashes.push(h);
            parent = h;
        }
        seq.len = seq.blocks.len() * bs;
        seq.len
    }

    /// Makes `seq`'s full blocks findable; `tokens` are the tokens at its positions (at least
    /// `seq.len()` of them). Cheap when no block filled up since the last call.
    pub fn publish(&mut self, seq: &mut SeqCache, tokens: &[u32]) {
        let bs = self.block_size;
        let Some(p) = self.prefix.as_mut() else { return };
        let full = seq.len.min(tokens.len()) / bs;
        while seq.hashes.len() < full {
            let i = seq.hashes.len();
            let parent = if i == 0 { prefix_cache::ROOT } else { seq.hashes[i - 1] };
            let t = &tokens[i * bs..(i + 1) * bs];
            let h = prefix_cache::chain(parent, t);
            p.insert(seq.blocks[i], parent, h, t);
            seq.hashes.push(h);
        }
    }

    /// Keeps the first `len` positions of `seq` (its blocks stay with it). With the prefix
    /// cache, positions from `len` on will be written again, so the blocks holding them stop
    /// being findable, and a block another sequence also holds is replaced by a fresh one
    /// (`copy(from, to)` copies its content when it still holds kept positions: copy on write);
    /// when the pool has no block for that, the sequence keeps only the positions before that
    /// block. Returns the positions kept.
    pub fn truncate(&mut self, seq: &mut SeqCache, len: usize, mut copy: impl FnMut(u32, u32)) -> usize {
        seq.len = seq.len.min(len);
        let bs = self.block_size;
        let first = seq.len / bs;
        if self.prefix.is_none() || first >= seq.hashes.len() {
            seq.hashes.truncate(first);
            return seq.len;
        }
        for i in first..seq.hashes.len() {
            let b = seq.blocks[i];
            if self.refs[b as usize] > 1 {
                match self.take_block() {
                    Some(nb) => {
                        // only a block that still holds kept positions needs its content
                        if i * bs < seq.len {
                            copy(b, nb);
                        }
                        self.refs[b as usize] -= 1;
                        seq.blocks[i] = nb;
                    }
                    None => {
                        // no block to copy into: drop this block and everything after it
                        for j in i..seq.blocks.len() {
                            self.drop_block(seq.blocks[j]);
                        }
                        seq.blocks.truncate(i);
                        seq.len = seq.len.min(i * bs);
                        break;
                    }
                }
            } else if let Some(p) = self.prefix.as_mut() {
                p.forget(b);
            }
        }
        seq.hashes.truncate(first.min(seq.blocks.len()));
        seq.len
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
    /// The block table: block `i` holds positions `i * block_size..(i + 1) * block_size`.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
    /// Marks `n` more positions as filled (called by the model after writing them, within the
    /// blocks held).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
    /// Forgets positions past `len` (e.g. to re-run a prompt); blocks stay held. Only for a
    /// pool without the prefix cache ([`BlockPool::truncate`] handles shared blocks).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        debug_assert!(self.hashes.is_empty(), "SeqCache::truncate with the prefix cache: use BlockPool::truncate");
    }
}
