//! The prefix cache's index: full KV blocks findable by the tokens that produced them, so a new
//! sequence whose prompt starts with the same tokens (a shared system prompt, the earlier turns
//! of a chat) reuses their K/V instead of computing them again (vLLM's automatic prefix
//! caching).
//!
//! A block is identified by a chain hash: `h_i = hash(h_{i-1}, tokens of block i)`, from
//! [`ROOT`], so it matches only at the same position after the same prefix. A hit is verified
//! against the block's stored tokens and parent hash (a 64-bit collision cannot hand out wrong
//! K/V). Reusing K/V is exact: the model's per-token math does not depend on the batch or on how
//! a prompt was cut into chunks (the batch-invariance tests), so a cached block holds the same
//! bits the sequence would compute.
//!
//! Findable blocks that no sequence holds are "parked" in least-recently-released order; the
//! pool hands out never-cached blocks first and evicts parked ones only when it has to. All
//! storage is sized at creation (the map's capacity is the pool size: it never holds more
//! entries than blocks), so registering a block does not allocate.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

/// The hash before the first block.
pub const ROOT: u64 = 0x6a09_e667_f3bc_c908;

/// `hash(parent, tokens)` (SipHash with fixed keys: the same on every run).
pub fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug)]
pub(crate) struct PrefixIndex {
    block_size: usize,
    /// chain hash -> block
    map: HashMap<u64, u32>,
    /// per block: (its hash, its parent's hash) while findable
    key: Vec<Option<(u64, u64)>>,
    /// per block: the `block_size` tokens it holds
    tokens: Vec<u32>,
    /// findable blocks no sequence holds, least recently released first
    parked: VecDeque<u32>,
}

impl PrefixIndex {
    pub fn new(n_blocks: usize, block_size: usize) -> PrefixIndex {
        PrefixIndex {
            block_size,
            map: HashMap::with_capacity(n_blocks),
            key: vec![None; n_blocks],
            tokens: vec![0; n_blocks * block_size],
            parked: VecDeque::with_capacity(n_blocks),
        }
    }

    fn block_tokens(&self, b: u32) -> &[u32] {
        &self.tokens[b as usize * self.block_size..][..self.block_size]
    }

    /// The block holding `tokens` (one block's worth) after the prefix hashed `parent`, if any.
    pub fn find(&self, parent: u64, hash: u64, tokens: &[u32]) -> Option<u32> {
        let &b = self.map.get(&hash)?;
        (self.key[b as usize] == Some((hash, parent)) && self.block_tokens(b) == tokens).then_some(b)
    }

    pub fn is_findable(&self, b: u32) -> bool {
        self.key[b as usize].is_some()
    }

    /// Makes block `b` (full, holding `tokens` after `parent`) findable, unless an equal block
    /// already is (two sequences computed the same prefix at once: the first one stays).
    pub fn insert(&mut self, b: u32, parent: u64, hash: u64, tokens: &[u32]) {
        if self.key[b as usize].is_some() || self.map.contains_key(&hash) {
            return;
        }
        self.map.insert(hash, b);
        self.key[b as usize] = Some((hash, parent));
        let bs = self.block_size;
        self.tokens[b as usize * bs..][..bs].copy_from_slice(tokens);
    }

    /// `b` is findable and no sequence holds it any more.
    pub fn park(&mut self, b: u32) {
        self.parked.push_back(b);
    }

    /// A parked block is taken again (a prefix hit).
    pub fn unpark(&mut self, b: u32) {
        if let Some(i) = self.parked.iter().position(|&x| x == b) {
            self.parked.remove(i);
        }
    }

    /// Forgets the least recently parked block and returns it for reuse.
    pub fn evict(&mut self) -> Option<u32> {
        let b = self.parked.pop_front()?;
        self.forget(b);
        Some(b)
    }

    /// Forgets block `b` (its content is about to change while a sequence holds it).
    pub fn forget(&mut self, b: u32) {
        if let Some((hash, _)) = self.key[b as usize].take() {
            self.map.remove(&hash);
        }
    }

    pub fn parked(&self) -> usize {
        self.parked.len()
    }
}
