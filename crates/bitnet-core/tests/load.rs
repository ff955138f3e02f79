//! `Model::load` repacks layers on several threads: the model must not depend on how many, and a
//! bad checkpoint must give the error a serial load gives (the lowest failing layer's).

use bitnet_core::config::ModelConfig;
use bitnet_core::error::Result;
use bitnet_core::model::{LoadOptions, Model};
use bitnet_core::weights::random::{preset_config, RandomSource};
use bitnet_core::weights::{DenseMatrix, LayerNorm, Proj, TernaryCodes, WeightSource};

/// `random:tiny` with more layers (so threads interleave), some of whose projections carry a code
/// out of range.
struct Corrupt {
    inner: RandomSource,
    bad: Vec<(usize, Proj)>,
}

impl WeightSource for Corrupt {
    fn format_name(&self) -> String {
        self.inner.format_name()
    }
    fn ternary(&self, layer: usize, proj: Proj) -> Result<TernaryCodes> {
        let mut t = self.inner.ternary(layer, proj)?;
        if self.bad.contains(&(layer, proj)) {
            let n = t.codes.len();
            t.codes[n / 2 + 3] = 2;
        }
        Ok(t)
    }
    fn layer_norm(&self, layer: usize, which: LayerNorm) -> Result<Vec<f32>> {
        self.inner.layer_norm(layer, which)
    }
    fn final_norm(&self) -> Result<Vec<f32>> {
        self.inner.final_norm()
    }
    fn embedding(&self) -> Result<DenseMatrix> {
        self.inner.embedding()
    }
    fn lm_head(&self) -> Result<Option<DenseMatrix>> {
        self.inner.lm_head()
    }
}

fn config(layers: usize) -> ModelConfig {
    let mut hf = preset_config("tiny").unwrap();
    hf.num_hidden_layers = layers;
    hf.resolve().unwrap()
}

fn load(src: &Corrupt, cfg: &ModelConfig, threads: usize) -> Result<Model> {
    Model::load(src, cfg.clone(), &LoadOptions { threads, ..Default::default() })
}

#[test]
fn layers_load_the_same_on_any_number_of_threads() {
    let cfg = config(9);
    let src = Corrupt { inner: RandomSource::new(cfg.clone(), 3), bad: vec![] };
    let ids = [5u32, 17, 300, 2, 99, 41];
    let logits = |threads: usize| {
        let m = load(&src, &cfg, threads).unwrap();
        assert_eq!(m.threads(), threads);
        let mut cache = m.new_cache(ids.len(), 1, 16);
        let mut s = m.new_scratch(ids.len(), ids.len(), ids.len());
        let mut seq = cache.new_seq();
        m.prefill(&mut cache, &mut s, &mut seq, &ids, true).unwrap();
        (0..ids.len()).flat_map(|i| s.logits(i).to_vec()).collect::<Vec<f32>>()
    };
    let one = logits(1);
    for threads in [2, 3, 4] {
        // the same layers in the same places: the same logits, bit for bit
        assert_eq!(logits(threads), one, "{threads} threads");
    }
}

#[test]
fn the_lowest_bad_layer_is_reported() {
    let cfg = config(12);
    for threads in [1, 2, 4, 8] {
        let src = Corrupt {
            inner: RandomSource::new(cfg.clone(), 3),
            bad: vec![(9, Proj::Up), (4, Proj::Down), (11, Proj::Q), (5, Proj::K)],
        };
        let err = match load(&src, &cfg, threads) {
            Ok(_) => panic!("{threads} threads: a code out of range was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("layer 4 Down: ternary code 2 out of range"), "{threads} threads: {err}");
    }
}
