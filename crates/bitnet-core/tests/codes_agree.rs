//! The master-weight checkpoint quantized at load gives exactly the codes transformers packed
//! into the packed twin of the same fixture (tools/make_fixtures.py writes both from one model).

mod common;

use bitnet_core::config::HfConfig;
use bitnet_core::weights::safetensors::SafetensorsSource;
use bitnet_core::weights::{Proj, WeightSource};

#[test]
fn master_quantization_equals_packed_codes() {
    for shape in ["tiny-gqa4", "tiny-untied-odd"] {
        let md = common::repo_fixture(&format!("{shape}-master"));
        let pd = common::repo_fixture(&format!("{shape}-packed"));
        let mc = HfConfig::from_file(&md.join("config.json")).unwrap().resolve().unwrap();
        let pc = HfConfig::from_file(&pd.join("config.json")).unwrap().resolve().unwrap();
        let m = SafetensorsSource::open(&md, &mc).unwrap();
        let p = SafetensorsSource::open(&pd, &pc).unwrap();
        for l in 0..mc.num_layers {
            for pr in Proj::ALL {
                let a = m.ternary(l, pr).unwrap();
                let b = p.ternary(l, pr).unwrap();
                let diff = a.codes.iter().zip(&b.codes).filter(|(x, y)| x != y).count();
                assert_eq!(diff, 0, "{shape} layer {l} {pr:?}: {diff} codes differ");
            }
        }
    }
}
