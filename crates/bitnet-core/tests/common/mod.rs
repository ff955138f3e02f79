//! Shared helpers for the golden tests: fixture paths, golden files, model loading.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bitnet_core::config::HfConfig;
use bitnet_core::model::{LoadOptions, Model};
use bitnet_core::weights::safetensors::SafetensorsSource;

/// The repo's own fixtures (made by tools/make_fixtures.py).
pub fn repo_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

/// A fixture in ../shared (the sibling of the repo); None (and a printed skip line) when absent.
pub fn shared_fixture(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures").join(name);
    if p.exists() {
        Some(p)
    } else {
        println!("skipped: needs ../shared/fixtures/{name}, which is absent here");
        None
    }
}

mod compare;
mod golden;
pub use compare::*;
#[allow(unused_imports)] // not every test binary reads golden files
pub use golden::Golden;

pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Model {
    let cfg = HfConfig::from_file(&dir.join("config.json")).unwrap().resolve().unwrap();
    let src = SafetensorsSource::open(dir, &cfg).unwrap();
    Model::load(&src, cfg, opts).unwrap()
}

/// Logits of every position of `ids` in one prefill, `[T][vocab]` flattened.
pub fn all_logits(m: &Model, ids: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache(ids.len() + 1, 1, 16);
    let mut s = m.new_scratch(ids.len(), ids.len(), ids.len() + 1);
    let mut seq = cache.new_seq();
    let rows = m.prefill(&mut cache, &mut s, &mut seq, ids, true).unwrap();
    (0..rows).flat_map(|r| s.logits(r).to_vec()).collect()
}

/// Greedy continuation with the KV cache (decode one token at a time), EOS ignored; returns the
/// tokens and the logits of each step (the distribution that chose each token).
pub fn greedy(m: &Model, ids: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = m.new_cache(ids.len() + n + 1, 1, 16);
    let mut s = m.new_scratch(ids.len().max(4), 1, ids.len() + n + 1);
    let mut seq = cache.new_seq();
    m.prefill(&mut cache, &mut s, &mut seq, ids, false).unwrap();
    let mut toks = Vec::new();
    let mut steps = Vec::new();
    for i in 0..n {
        let l = s.logits(0).to_vec();
        let t = argmax(&l);
        steps.push(l);
        toks.push(t);
        if i + 1 < n {
            m.decode(&mut cache, &mut s, &mut seq, t).unwrap();
        }
    }
    (toks, steps)
}
