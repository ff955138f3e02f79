//! The golden files the fixtures carry (`golden.safetensors`, tools/make_fixtures.py), read as
//! f64. Shared by bitnet-core's and bitnet-cuda's tests (the latter include this file by path).

use std::collections::BTreeMap;
use std::path::Path;

/// One golden file: name -> (shape, values as f64).
pub struct Golden {
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Golden {
    pub fn open(path: &Path) -> Golden {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden safetensors");
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let d = view.data();
            let vals: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => {
                    d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
                }
                safetensors::Dtype::F64 => {
                    d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
                }
                safetensors::Dtype::I64 => {
                    d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
                }
                safetensors::Dtype::I32 => {
                    d.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
                }
                other => panic!("unexpected dtype {other:?} in {name}"),
            };
            tensors.insert(name.to_string(), (view.shape().to_vec(), vals));
        }
        Golden { tensors }
    }
    pub fn prompts(&self) -> Vec<String> {
        self.tensors.keys().filter_map(|k| k.strip_suffix(".input_ids").map(String::from)).collect()
    }
    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.tensors[key].1.iter().map(|&v| v as u32).collect()
    }
    pub fn get(&self, key: &str) -> &(Vec<usize>, Vec<f64>) {
        &self.tensors[key]
    }
}
