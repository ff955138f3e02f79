//! A bf16 LM head (and the embedding tied to it) is kept in the lossless 12-bit layout (every
//! plan) where the CPU runs its kernels: the logits must be those of the same values read
//! unpacked, bit for bit, in prefill (every position: the packed GEMM) and decode (the GEMV).

use bitnet_core::error::Result;
use bitnet_core::model::{LoadOptions, Model};
use bitnet_core::weights::random::{preset_config, RandomSource};
use bitnet_core::weights::{DenseMatrix, LayerNorm, Proj, TernaryCodes, WeightSource};

/// `random:tiny` with its bf16 embedding widened to f32 (exactly): never packed, and the f32
/// kernels sum the same values in the bf16 kernels' order.
struct Widened(RandomSource);

impl WeightSource for Widened {
    fn format_name(&self) -> String {
        self.0.format_name()
    }
    fn ternary(&self, layer: usize, proj: Proj) -> Result<TernaryCodes> {
        self.0.ternary(layer, proj)
    }
    fn layer_norm(&self, layer: usize, which: LayerNorm) -> Result<Vec<f32>> {
        self.0.layer_norm(layer, which)
    }
    fn final_norm(&self) -> Result<Vec<f32>> {
        self.0.final_norm()
    }
    fn embedding(&self) -> Result<DenseMatrix> {
        let e = self.0.embedding()?;
        let (rows, cols) = (e.rows(), e.cols());
        let mut data = vec![0f32; rows * cols];
        for (r, row) in data.chunks_exact_mut(cols).enumerate() {
            e.row_to_f32(r, row);
        }
        Ok(DenseMatrix::F32 { rows, cols, data })
    }
    fn lm_head(&self) -> Result<Option<DenseMatrix>> {
        self.0.lm_head()
    }
}

#[test]
fn packed_head_gives_the_unpacked_logits() {
    let cfg = preset_config("tiny").unwrap().resolve().unwrap();
    let opts = LoadOptions { threads: 2, ..Default::default() };
    let packed = Model::load(&RandomSource::new(cfg.clone(), 7), cfg.clone(), &opts).unwrap();
    let plain = Model::load(&Widened(RandomSource::new(cfg.clone(), 7)), cfg.clone(), &opts).unwrap();
    assert_eq!(plain.lm_head_storage(), "f32");
    if bitnet_cpu::dense::PackedBf16::kernels_available() {
        assert_eq!(packed.lm_head_storage(), "bf16 (12-bit lossless packing)");
        assert!(packed.bytes_per_token() < plain.bytes_per_token());
    }
    let ids = [5u32, 17, 300, 2, 99, 41];
    let run = |m: &Model| {
        let mut cache = m.new_cache(ids.len() + 4, 1, 16);
        let mut s = m.new_scratch(ids.len(), ids.len(), ids.len() + 4);
        let mut seq = cache.new_seq();
        m.prefill(&mut cache, &mut s, &mut seq, &ids, true).unwrap();
        let mut all: Vec<f32> = (0..ids.len()).flat_map(|i| s.logits(i).to_vec()).collect();
        for t in [7u32, 600, 1] {
            m.decode(&mut cache, &mut s, &mut seq, t).unwrap();
            all.extend_from_slice(s.logits(0));
        }
        all
    };
    let (a, b) = (run(&packed), run(&plain));
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "packed and unpacked logits differ");
}
