//! GGUF reader and GgufSource tests.
//!
//! Tests marked "needs /work/shared" read `shared/fixtures/gguf-tiny` (bitnet.cpp's I2_S GGUF of a
//! tiny BitNet plus its bf16 master weights) and SKIP with a printed line where it is absent.
//! The rest build their files with `GgufWriter`.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use bitnet_core::config::HfConfig;
use bitnet_core::gguf::{
    norm_tensor_name, ternary_tensor_name, GgufArray, GgufDType, GgufFile, GgufHeader, GgufSource, GgufValue,
    GgufWriter, OUTPUT_NORM, TOKEN_EMBD,
};
use bitnet_core::weights::{DenseMatrix, LayerNorm, Proj, WeightSource};
use bitnet_core::Error;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures/gguf-tiny");

/// The fixture directory, or None (with a printed SKIP line) when /work/shared is absent.
fn fixture(test: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(FIXTURE);
    if dir.join("ggml-model-i2_s.gguf").is_file() && dir.join("model.safetensors").is_file() {
        Some(dir)
    } else {
        println!("SKIP {test}: needs /work/shared ({} not found)", dir.display());
        None
    }
}

fn gguf_path(dir: &Path) -> PathBuf {
    dir.join("ggml-model-i2_s.gguf")
}

/// HF master tensor name of a projection.
fn hf_proj(layer: usize, p: Proj) -> String {
    let s = match p {
        Proj::Q => "self_attn.q_proj",
        Proj::K => "self_attn.k_proj",
        Proj::V => "self_attn.v_proj",
        Proj::O => "self_attn.o_proj",
        Proj::Gate => "mlp.gate_proj",
        Proj::Up => "mlp.up_proj",
        Proj::Down => "mlp.down_proj",
    };
    format!("model.layers.{layer}.{s}.weight")
}

/// HF master tensor name of a norm.
fn hf_norm(layer: usize, n: LayerNorm) -> String {
    let s = match n {
        LayerNorm::Input => "input_layernorm",
        LayerNorm::AttnSub => "self_attn.attn_sub_norm",
        LayerNorm::PostAttention => "post_attention_layernorm",
        LayerNorm::FfnSub => "mlp.ffn_sub_norm",
    };
    format!("model.layers.{layer}.{s}.weight")
}

/// The bf16 master tensors of model.safetensors, widened to f32, with their shapes.
fn masters(dir: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("read model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse model.safetensors");
    st.iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{name}");
            let data = view
                .data()
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect();
            (name.to_string(), (view.shape().to_vec(), data))
        })
        .collect()
}

/// transformers' online ternarization, in f32: `inv = 1 / max(mean|W|, 1e-5)`,
/// `codes = round_half_even(W * inv).clamp(-1, 1)`, output scale `1 / inv`, with mean|W| summed
/// in f32 in torch's order (see [`torch_cpu_sum`]).
fn online_ternary(w: &[f32]) -> (Vec<i8>, f32) {
    let abs: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    let mean = torch_cpu_sum(&abs, TORCH_VEC, TORCH_THREADS) / abs.len() as f32;
    let inv = 1.0f32 / mean.max(1e-5);
    let codes = w.iter().map(|&v| (v * inv).round_ties_even().clamp(-1.0, 1.0) as i8).collect();
    (codes, 1.0f32 / inv)
}

/// The correctly rounded f32 mean of |W| (exact f64 sum of the bf16 values, rounded once).
fn exact_mean_abs(w: &[f32]) -> f32 {
    (w.iter().map(|v| v.abs() as f64).sum::<f64>() / w.len() as f64) as f32
}

/// f32 lanes of the machine that made the fixture's goldens (AVX2) and its torch thread count.
/// With these, the emulated sum reproduces all 14 GGUF scales; a correctly rounded mean misses
/// 4 of them by one ulp of the mean (two ulps of the scale after the double reciprocal).
const TORCH_VEC: usize = 8;
const TORCH_THREADS: usize = 2;

/// torch's CPU `sum` of a contiguous f32 tensor (aten/src/ATen/native/cpu/SumKernel.cpp
/// `cascade_sum`): a two-pass reduction over `threads` chunks of at least 32768 elements (the
/// grain size), each chunk summed as `vectorized_inner_sum` does (vectors of `vec` lanes, 4
/// interleaved accumulators, 4 cascade levels), then the per-thread partial sums added.
fn torch_cpu_sum(x: &[f32], vec: usize, threads: usize) -> f32 {
    const GRAIN: usize = 32768;
    let n = x.len();
    if n < GRAIN || threads == 1 {
        return torch_chunk_sum(x, vec);
    }
    let tasks = threads.min(n.div_ceil(GRAIN));
    let chunk = n.div_ceil(tasks);
    let mut buf = vec![0f32; threads];
    for (t, b) in buf.iter_mut().enumerate().take(tasks) {
        let (lo, hi) = (t * chunk, ((t + 1) * chunk).min(n));
        if lo < hi {
            *b += torch_chunk_sum(&x[lo..hi], vec);
        }
    }
    torch_chunk_sum(&buf, vec)
}

/// One `vectorized_inner_sum` row: `row_sum` with ilp factor 4 over whole vectors
/// (`multi_row_sum`'s cascade), then the scalar tail, then the lanes in order.
#[allow(clippy::needless_range_loop)] // mirrors the C++ loops index for index
fn torch_chunk_sum(x: &[f32], v: usize) -> f32 {
    let ceil_log2 = |n: usize| {
        if n <= 1 {
            0
        } else {
            (usize::BITS - (n - 1).leading_zeros()) as usize
        }
    };
    let n_vec = x.len() / v;
    let rows = n_vec / 4;
    let level_power = 4.max(ceil_log2(rows) / 4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    // acc[level][k][lane]
    let mut acc = vec![vec![vec![0f32; v]; 4]; 4];
    let add_row = |acc: &mut Vec<Vec<Vec<f32>>>, r: usize| {
        for k in 0..4 {
            for l in 0..v {
                acc[0][k][l] += x[(r * 4 + k) * v + l];
            }
        }
    };
    let mut i = 0usize;
    while i + level_step <= rows {
        for _ in 0..level_step {
            add_row(&mut acc, i);
            i += 1;
        }
        for j in 1..4 {
            for k in 0..4 {
                for l in 0..v {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0;
                }
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        add_row(&mut acc, i);
        i += 1;
    }
    for j in 1..4 {
        for k in 0..4 {
            for l in 0..v {
                acc[0][k][l] += acc[j][k][l];
            }
        }
    }
    let mut part = acc.swap_remove(0);
    for vi in rows * 4..n_vec {
        for l in 0..v {
            part[0][l] += x[vi * v + l];
        }
    }
    for k in 1..4 {
        for l in 0..v {
            part[0][l] += part[k][l];
        }
    }
    let mut fin = 0f32;
    for &e in &x[n_vec * v..] {
        fin += e;
    }
    for l in 0..v {
        fin += part[0][l];
    }
    fin
}

/// llama.cpp's q/k row permutation for interleaved RoPE (`convert_hf_to_gguf.py` `permute`).
fn llama_permute_rows(codes: &[i8], rows: usize, cols: usize, n_head: usize) -> Vec<i8> {
    let hd = rows / n_head;
    let mut out = vec![0i8; codes.len()];
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let dst = h * hd + i * 2 + j;
                let src = h * hd + j * (hd / 2) + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&codes[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// fixture tests (need /work/shared)
// ---------------------------------------------------------------------------------------------

/// Needs /work/shared. Confirms the x86 I2_S layout, the absence of a q/k row permutation and the
/// exactness of the scale: every I2_S tensor decodes to the online ternarization of its master,
/// and the stored scale equals `1 / inv` bit for bit.
#[test]
fn fixture_i2s_codes_and_scales_match_masters() {
    let Some(dir) = fixture("fixture_i2s_codes_and_scales_match_masters") else {
        return;
    };
    let m = masters(&dir);
    let src = GgufSource::open(gguf_path(&dir)).expect("open fixture");
    let cfg = src.model_config().clone();
    let mut n_checked = 0;
    for layer in 0..cfg.num_layers {
        for p in Proj::ALL {
            let t = src.ternary(layer, p).expect("ternary");
            let (shape, w) = &m[&hf_proj(layer, p)];
            assert_eq!(shape, &vec![t.rows, t.cols], "{layer} {p:?}");
            let (codes, scale) = online_ternary(w);
            assert!(codes == t.codes, "layer {layer} {p:?}: decoded codes differ from the online ternarization");
            assert_eq!(t.scale.to_bits(), scale.to_bits(), "layer {layer} {p:?}: scale {} vs 1/inv {scale}", t.scale);
            if matches!(p, Proj::Q | Proj::K) {
                // The test discriminates: the llama-permuted rows would not match.
                let heads = if p == Proj::Q { cfg.num_heads } else { cfg.num_kv_heads };
                let perm = llama_permute_rows(&codes, t.rows, t.cols, heads);
                assert!(perm != t.codes, "layer {layer} {p:?}: permuted rows match too; test cannot tell");
            }
            n_checked += 1;
        }
    }
    assert_eq!(n_checked, 14);
    let exact_misses = (0..cfg.num_layers)
        .flat_map(|l| Proj::ALL.map(|p| (l, p)))
        .filter(|&(l, p)| {
            let inv = 1.0f32 / exact_mean_abs(&m[&hf_proj(l, p)].1).max(1e-5);
            (1.0f32 / inv).to_bits() != src.ternary(l, p).unwrap().scale.to_bits()
        })
        .count();
    println!("scales: 14/14 equal torch's 1/inv; a correctly rounded mean|W| would miss {exact_misses}");

    // The raw reader agrees, and the file holds exactly these 14 I2_S tensors.
    let f = src.file();
    let i2s: Vec<_> = f.tensors().iter().filter(|t| t.dtype == GgufDType::I2S).collect();
    assert_eq!(i2s.len(), 14);
    for t in i2s {
        let (codes, _) = f.read_i2s(&t.name).expect("read_i2s");
        assert_eq!(codes.len() as u64, t.n_elements);
        assert_eq!(t.n_bytes, t.n_elements / 4 + 32);
    }
}

/// Needs /work/shared. Norms, final norm and embedding equal the masters; the F16 embedding is
/// the bf16 master rounded to f16 (one f16-subnormal element changes: HF [557, 113]).
#[test]
fn fixture_norms_and_embedding_match_masters() {
    let Some(dir) = fixture("fixture_norms_and_embedding_match_masters") else {
        return;
    };
    let m = masters(&dir);
    let src = GgufSource::open(gguf_path(&dir)).expect("open fixture");
    let layers = src.model_config().num_layers;
    for layer in 0..layers {
        for n in LayerNorm::ALL {
            let got = src.layer_norm(layer, n).expect("norm");
            assert_eq!(got, m[&hf_norm(layer, n)].1, "layer {layer} {n:?}");
        }
    }
    assert_eq!(src.final_norm().unwrap(), m["model.norm.weight"].1);
    assert!(src.lm_head().unwrap().is_none(), "tied");

    let emb = src.embedding().unwrap();
    let (shape, w) = &m["model.embed_tokens.weight"];
    assert_eq!(vec![emb.rows(), emb.cols()], *shape);
    let DenseMatrix::F16 { data, .. } = &emb else { panic!("embedding should stay F16, got {:?}", emb.dtype()) };
    let mut changed = Vec::new();
    for (i, (&h, &v)) in data.iter().zip(w).enumerate() {
        assert_eq!(h, half::f16::from_f32(v).to_bits(), "element {i}");
        if half::f16::from_bits(h).to_f32() != v {
            changed.push((i / shape[1], i % shape[1]));
        }
    }
    assert_eq!(changed, vec![(557, 113)]);
}

/// Needs /work/shared. Metadata mapped to HfConfig resolves to the same ModelConfig as
/// config.json; the tokenizer data matches tokenizer.json.
#[test]
fn fixture_config_and_tokenizer() {
    let Some(dir) = fixture("fixture_config_and_tokenizer") else {
        return;
    };
    let src = GgufSource::open(gguf_path(&dir)).expect("open fixture");
    assert_eq!(src.architecture(), "bitnet-25");
    assert_eq!(src.format_name(), "gguf I2_S (bitnet-25)");
    let hf = src.hf_config().unwrap();
    assert_eq!(hf.rms_norm_eps, 1e-5);
    assert_eq!(hf.rope_theta, 500000.0);
    assert_eq!(hf.head_dim, Some(64));
    assert_eq!(hf.tie_word_embeddings, Some(true));
    assert_eq!(hf.model_type.as_deref(), Some("bitnet"));
    assert_eq!(hf.architectures, vec!["BitNetForCausalLM".to_string()]);
    assert_eq!(hf.bos_token_id, Some(608));
    assert_eq!(hf.eos_token_id, Some(vec![617])); // the converter writes tokenizer_config's eos
    let from_json = HfConfig::from_file(&dir.join("config.json")).unwrap().resolve().unwrap();
    let ours = hf.resolve().unwrap();
    assert_eq!(ours.quant_mode, None, "the GGUF format decides the quantization");
    let dims = |c: &bitnet_core::config::ModelConfig| {
        (
            (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers),
            (c.num_heads, c.num_kv_heads, c.head_dim, c.gqa_group, c.q_dim, c.kv_dim),
            (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings),
        )
    };
    assert_eq!(dims(&ours), dims(&from_json));

    let tokens = src.tokenizer_tokens().expect("tokens");
    assert_eq!(tokens.len(), 640);
    assert_eq!(src.tokenizer_merges().map(|m| m.len()), Some(457));
    assert_eq!(src.tokenizer_token_types().map(|t| t.len()), Some(640));
    assert_eq!(src.tokenizer_scores().map(|t| t.len()), Some(640));
    assert_eq!(src.tokenizer_model(), Some("gpt2"));
    assert_eq!(src.tokenizer_pre(), None);
    assert_eq!(src.bos_token_id(), Some(608));
    assert_eq!(src.eos_token_id(), Some(617));
    assert_eq!(src.add_bos_token(), Some(true));
    assert!(src.chat_template().unwrap().contains("BITNETAssistant: "));

    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    let mut by_id: HashMap<u64, String> = HashMap::new();
    for (tok, id) in tj["model"]["vocab"].as_object().unwrap() {
        by_id.insert(id.as_u64().unwrap(), tok.clone());
    }
    for t in tj["added_tokens"].as_array().unwrap() {
        by_id.insert(t["id"].as_u64().unwrap(), t["content"].as_str().unwrap().to_string());
    }
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(Some(t), by_id.get(&(i as u64)), "token {i}");
    }
    let merges: Vec<String> =
        tj["model"]["merges"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect();
    assert_eq!(src.tokenizer_merges().unwrap(), merges.as_slice());
}

/// Needs /work/shared. The tensor names in the file are exactly the mapped ones.
#[test]
fn fixture_tensor_names() {
    let Some(dir) = fixture("fixture_tensor_names") else {
        return;
    };
    let f = GgufFile::open(gguf_path(&dir)).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    let mut want = vec![TOKEN_EMBD.to_string(), OUTPUT_NORM.to_string()];
    for l in 0..2 {
        want.extend(Proj::ALL.iter().map(|&p| ternary_tensor_name(l, p)));
        want.extend(LayerNorm::ALL.iter().map(|&n| norm_tensor_name(l, n)));
    }
    want.sort();
    let mut have: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
    have.sort();
    assert_eq!(have, want);
}

// ---------------------------------------------------------------------------------------------
// corrupted files (need /work/shared: they mutate the fixture bytes)
// ---------------------------------------------------------------------------------------------

fn fixture_bytes(test: &str) -> Option<Vec<u8>> {
    fixture(test).map(|d| std::fs::read(gguf_path(&d)).expect("read fixture"))
}

fn p() -> &'static Path {
    Path::new("mutated.gguf")
}

/// Byte position just after the name string of tensor info `name` (its n_dims field).
fn tensor_info_pos(bytes: &[u8], name: &str) -> usize {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(name.as_bytes());
    let at = bytes.windows(pat.len()).position(|w| w == pat.as_slice()).expect("tensor info");
    at + pat.len()
}

/// Position of the value (after key and type) of metadata key `key`.
fn meta_value_pos(bytes: &[u8], key: &str) -> usize {
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    let at = bytes.windows(pat.len()).position(|w| w == pat.as_slice()).expect("key");
    at + pat.len() + 4
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn format_msg<T>(r: Result<T, Error>) -> String {
    match r {
        Err(e @ Error::Format { .. }) => e.to_string(),
        Err(e) => panic!("expected a format error, got {e:?}"),
        Ok(_) => panic!("expected a format error, got Ok"),
    }
}

/// Needs /work/shared. Truncation anywhere before the end of the last tensor is an error.
#[test]
fn truncated_files_are_errors() {
    let Some(bytes) = fixture_bytes("truncated_files_are_errors") else {
        return;
    };
    let h = GgufHeader::parse(p(), &bytes).unwrap();
    let end = h.tensors().iter().map(|t| h.data_offset() + t.offset + t.n_bytes).max().unwrap() as usize;
    let data = h.data_offset() as usize;
    // every offset inside the header, then a stride through the data
    let cuts = (0..data).chain((data..end).step_by(997)).chain([end - 1]);
    for k in cuts {
        let e = format_msg(GgufHeader::parse(p(), &bytes[..k]));
        assert!(e.starts_with("mutated.gguf: "), "{e}");
    }
    assert!(GgufHeader::parse(p(), &bytes[..end]).is_ok());
    // the owned/mmap path says the same
    assert!(GgufFile::from_bytes("t.gguf", bytes[..data + 100].to_vec()).is_err());
    let e = GgufFile::from_bytes("t.gguf", bytes[..22].to_vec()).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
}

/// Needs /work/shared. Header-level corruptions, each a clear error.
#[test]
fn corrupted_headers_are_errors() {
    let Some(orig) = fixture_bytes("corrupted_headers_are_errors") else {
        return;
    };
    let check = |mutate: &dyn Fn(&mut Vec<u8>), want: &[&str]| {
        let mut b = orig.clone();
        mutate(&mut b);
        let e = format_msg(GgufHeader::parse(p(), &b));
        for w in want {
            assert!(e.contains(w), "{e:?} should contain {w:?}");
        }
    };
    check(&|b| b[0] = b'X', &["not a GGUF file", "magic"]);
    check(&|b| put_u32(b, 4, 1), &["version 1"]);
    check(&|b| put_u32(b, 4, 99), &["version 99"]);
    check(&|b| put_u32(b, 4, 3u32.swap_bytes()), &["big-endian"]);
    check(&|b| put_u64(b, 8, 1 << 50), &["tensor count", "impossible"]);
    check(&|b| put_u64(b, 16, u64::MAX), &["metadata key/value count", "impossible"]);
    // a string length of 2^60 (the first key)
    check(&|b| put_u64(b, 24, 1 << 60), &["metadata key #0", "string length 1152921504606846976"]);
    // a token string of 2^60 bytes, and an absurd array count
    check(
        &|b| {
            let at = meta_value_pos(b, "tokenizer.ggml.tokens");
            put_u64(b, at + 12, 1 << 60);
        },
        &["tokenizer.ggml.tokens", "string length"],
    );
    check(
        &|b| {
            let at = meta_value_pos(b, "tokenizer.ggml.merges");
            put_u64(b, at + 4, 1 << 61);
        },
        &["tokenizer.ggml.merges", "array element count", "impossible"],
    );
    check(
        &|b| {
            let at = meta_value_pos(b, "general.name");
            put_u32(b, at - 4, 13);
        },
        &["general.name", "unknown value type 13"],
    );
    let q = "blk.0.attn_q.weight";
    let qi = tensor_info_pos(&orig, q);
    // n_dims u32 | ne0 u64 | ne1 u64 | type u32 | offset u64
    check(&|b| put_u32(b, qi + 20, 77), &[q, "unknown tensor type id 77"]);
    check(&|b| put_u32(b, qi + 20, 12), &[q, "unsupported tensor type 12 (Q4_K)"]);
    check(&|b| put_u32(b, qi, 5), &[q, "5 dimensions"]);
    check(&|b| put_u64(b, qi + 4, 0), &[q, "zero dimension"]);
    check(
        &|b| {
            put_u64(b, qi + 4, 100);
            put_u64(b, qi + 12, 1);
        },
        &[q, "multiple of 128"],
    );
    check(&|b| put_u64(b, qi + 4, 1 << 62), &[q, "overflow"]);
    check(&|b| put_u64(b, qi + 24, 1 << 40), &[q, "past the end of the file"]);
    check(&|b| put_u64(b, qi + 24, u64::MAX - 31), &[q, "past the end of the file"]);
    check(&|b| put_u64(b, qi + 24, 16), &[q, "not a multiple of the alignment"]);
    // a dim product larger than the bytes it has: overlaps the next tensor or runs off the end
    check(&|b| put_u64(b, qi + 12, 4096), &["overlap"]);
    let last = "token_embd.weight";
    let li = tensor_info_pos(&orig, last);
    check(&|b| put_u64(b, li + 12, 100_000), &[last, "past the end"]);
}

/// Needs /work/shared. Corruptions that the container accepts but GgufSource rejects.
#[test]
fn corrupted_contents_are_errors() {
    let Some(orig) = fixture_bytes("corrupted_contents_are_errors") else {
        return;
    };
    let q = "blk.0.attn_q.weight";

    // dims that keep the byte size but disagree with the metadata
    let mut b = orig.clone();
    let at = tensor_info_pos(&b, q);
    put_u64(&mut b, at + 4, 128);
    put_u64(&mut b, at + 12, 512);
    let src = GgufSource::from_file(GgufFile::from_bytes("m.gguf", b).unwrap()).unwrap();
    let e = format_msg(src.ternary(0, Proj::Q));
    assert!(e.contains(q) && e.contains("[128, 512]") && e.contains("[256, 256]"), "{e}");

    // a code 3 in the I2_S data
    let mut b = orig.clone();
    let h = GgufHeader::parse(p(), &b).unwrap();
    let t = h.tensor_info(q).unwrap();
    let data_at = (h.data_offset() + t.offset) as usize;
    b[data_at + 40] = 0b01_11_01_01; // block 1, byte 8, group 1
    let src = GgufSource::from_file(GgufFile::from_bytes("m.gguf", b).unwrap()).unwrap();
    let e = format_msg(src.ternary(0, Proj::Q));
    assert!(e.contains(q) && e.contains("code 3 at element 168"), "{e}");
    assert!(src.ternary(0, Proj::K).is_ok());

    // an unknown architecture
    let mut b = orig.clone();
    let at = meta_value_pos(&b, "general.architecture");
    b[at + 8..at + 8 + 9].copy_from_slice(b"bitnet-99");
    let e = GgufSource::from_file(GgufFile::from_bytes("m.gguf", b).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Config(_)) && e.to_string().contains("\"bitnet-99\""), "{e}");

    // a metadata value of the wrong type
    let mut b = orig.clone();
    let at = meta_value_pos(&b, "bitnet-25.block_count");
    put_u32(&mut b, at - 4, 6); // u32 -> f32
    let e = format_msg(GgufSource::from_file(GgufFile::from_bytes("m.gguf", b).unwrap()));
    assert!(e.contains("bitnet-25.block_count") && e.contains("expected a non-negative integer"), "{e}");

    // a bos id outside the vocabulary
    let mut b = orig.clone();
    let at = meta_value_pos(&b, "tokenizer.ggml.bos_token_id");
    put_u32(&mut b, at, 640);
    let e = format_msg(GgufSource::from_file(GgufFile::from_bytes("m.gguf", b).unwrap()));
    assert!(e.contains("tokenizer.ggml.bos_token_id") && e.contains("640"), "{e}");

    // out-of-range layer
    let src = GgufSource::from_file(GgufFile::from_bytes("m.gguf", orig).unwrap()).unwrap();
    assert!(matches!(src.ternary(2, Proj::Q), Err(Error::InvalidInput(_))));
}

/// Tiny deterministic PRNG (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Exercises everything GgufSource offers on a (possibly mutated) file; must never panic.
fn exercise(bytes: Vec<u8>) {
    let Ok(f) = GgufFile::from_bytes("fuzz.gguf", bytes) else {
        return;
    };
    for t in f.tensors() {
        let _ = f.read_f32(&t.name);
        let _ = f.read_i2s(&t.name);
    }
    let Ok(src) = GgufSource::from_file(f) else {
        return;
    };
    let _ = src.hf_config().map(|h| h.resolve());
    let _ = (src.tokenizer_tokens(), src.tokenizer_merges(), src.tokenizer_token_types(), src.chat_template());
    let n = src.model_config().num_layers.min(4);
    for l in 0..n + 1 {
        for pr in Proj::ALL {
            let _ = src.ternary(l, pr);
        }
        for nn in LayerNorm::ALL {
            let _ = src.layer_norm(l, nn);
        }
    }
    let _ = (src.final_norm(), src.embedding(), src.lm_head());
}

/// Thousands of random mutations of the fixture header (bytes, bits, u32/u64 fields with edge
/// values, truncations); the parser must return Ok or Err, never panic. Without /work/shared it
/// fuzzes a small written model instead.
#[test]
fn fuzz_header_mutations_never_panic() {
    let orig = fixture_bytes("fuzz_header_mutations_never_panic (fixture part)")
        .unwrap_or_else(|| tiny_model("bitnet-25", true).0.to_bytes());
    let header_len = GgufHeader::parse(p(), &orig).unwrap().data_offset() as usize;
    let edge: [u64; 10] = [0, 1, 2, 3, 31, 32, 0xFFFF_FFFF, 1 << 60, u64::MAX, orig.len() as u64];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut buf = orig.clone();
    let (mut ok, mut err) = (0usize, 0usize);
    for iter in 0..6000 {
        let n_mut = 1 + rng.below(4);
        for _ in 0..n_mut {
            let at = rng.below(header_len);
            match rng.below(5) {
                0 => buf[at] = rng.next() as u8,
                1 => buf[at] ^= 1 << rng.below(8),
                2 if at + 4 <= buf.len() => put_u32(&mut buf, at, edge[rng.below(edge.len())] as u32),
                3 if at + 8 <= buf.len() => put_u64(&mut buf, at, edge[rng.below(edge.len())]),
                _ if at + 8 <= buf.len() => {
                    let v = u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
                    put_u64(&mut buf, at, v.wrapping_add(rng.next() % 64).wrapping_sub(32));
                }
                _ => {}
            }
        }
        let cut = if rng.below(8) == 0 { rng.below(buf.len()) } else { buf.len() };
        let r = catch_unwind(AssertUnwindSafe(|| {
            let res = GgufHeader::parse(p(), &buf[..cut]).is_ok();
            if iter % 20 == 0 {
                exercise(buf[..cut].to_vec());
            }
            res
        }));
        match r {
            Ok(true) => ok += 1,
            Ok(false) => err += 1,
            Err(_) => panic!("parser panicked at fuzz iteration {iter}"),
        }
        buf.copy_from_slice(&orig);
    }
    println!("fuzz: {ok} parsed, {err} rejected");
    assert!(err > 1000, "most mutations should be caught ({err})");
}

/// Needs /work/shared. Random mutations of tensor data never panic the decoders.
#[test]
fn fuzz_data_mutations_never_panic() {
    let Some(orig) = fixture_bytes("fuzz_data_mutations_never_panic") else {
        return;
    };
    let data = GgufHeader::parse(p(), &orig).unwrap().data_offset() as usize;
    let mut rng = Rng(12345);
    for iter in 0..100 {
        let mut b = orig.clone();
        for _ in 0..64 {
            let at = data + rng.below(b.len() - data);
            b[at] = rng.next() as u8;
        }
        if catch_unwind(AssertUnwindSafe(|| exercise(b))).is_err() {
            panic!("panicked at data fuzz iteration {iter}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// written files (no fixture needed)
// ---------------------------------------------------------------------------------------------

fn s(v: &str) -> GgufValue {
    GgufValue::String(v.into())
}

/// A tiny BitNet GGUF: hidden 128, intermediate 256, 1 layer, 2 heads, 1 kv head.
fn tiny_model(arch: &str, untied: bool) -> (GgufWriter, Vec<Vec<i8>>) {
    let (h, ff, vocab) = (128u64, 256u64, 4u64);
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", s(arch));
    w.add_meta(format!("{arch}.embedding_length"), GgufValue::U32(h as u32));
    w.add_meta(format!("{arch}.feed_forward_length"), GgufValue::U32(ff as u32));
    w.add_meta(format!("{arch}.block_count"), GgufValue::U32(1));
    w.add_meta(format!("{arch}.attention.head_count"), GgufValue::U32(2));
    w.add_meta(format!("{arch}.attention.head_count_kv"), GgufValue::U32(1));
    w.add_meta(format!("{arch}.rope.dimension_count"), GgufValue::U32(64));
    w.add_meta(format!("{arch}.rope.freq_base"), GgufValue::F32(10000.0));
    w.add_meta(format!("{arch}.rope.scaling.type"), s("linear"));
    w.add_meta(format!("{arch}.rope.scaling.factor"), GgufValue::F32(1.0));
    w.add_meta(format!("{arch}.attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-6));
    w.add_meta(format!("{arch}.context_length"), GgufValue::U64(2048));
    let toks = ["<s>", "</s>", "a", "b"].iter().map(|t| t.to_string()).collect();
    w.add_meta("tokenizer.ggml.tokens", GgufValue::Array(GgufArray::String(toks)));
    w.add_meta("tokenizer.ggml.token_type", GgufValue::Array(GgufArray::I32(vec![3, 3, 1, 1])));
    w.add_meta("tokenizer.ggml.merges", GgufValue::Array(GgufArray::String(vec!["a b".into()])));
    w.add_meta("tokenizer.ggml.bos_token_id", GgufValue::U32(0));
    w.add_meta("tokenizer.ggml.eos_token_id", GgufValue::U32(1));
    let mut rng = Rng(7);
    let mut all_codes = Vec::new();
    for pr in Proj::ALL {
        let (rows, cols) = match pr {
            Proj::Q | Proj::O => (h, h),
            Proj::K | Proj::V => (64, h),
            Proj::Gate | Proj::Up => (ff, h),
            Proj::Down => (h, ff),
        };
        let codes: Vec<i8> = (0..rows * cols).map(|_| rng.below(3) as i8 - 1).collect();
        let name = ternary_tensor_name(0, pr);
        if pr == Proj::Up {
            // dense ternary, as bitnet.cpp's intermediate f32 file stores it
            let vals: Vec<f32> = codes.iter().map(|&c| c as f32 * 0.75).collect();
            w.add_f32(name, &[cols, rows], &vals);
        } else {
            w.add_i2s(name, &[cols, rows], &codes, 0.5 + pr as u8 as f32).unwrap();
        }
        all_codes.push(codes);
    }
    for nn in LayerNorm::ALL {
        let len = if nn == LayerNorm::FfnSub { ff } else { h };
        let v: Vec<f32> = (0..len).map(|i| i as f32 / 8.0).collect();
        w.add_f32(norm_tensor_name(0, nn), &[len], &v);
    }
    w.add_f32(OUTPUT_NORM, &[h], &vec![1.0; h as usize]);
    let emb: Vec<u16> = (0..vocab * h).map(|i| half::bf16::from_f32(i as f32 * 0.01).to_bits()).collect();
    w.add_u16_bits(TOKEN_EMBD, &[h, vocab], GgufDType::BF16, &emb);
    if untied {
        let head: Vec<f32> = (0..vocab * h).map(|i| (i as f32 * 0.37).sin()).collect();
        w.add_q8_0("output.weight", &[h, vocab], &head);
    }
    (w, all_codes)
}

#[test]
fn written_untied_model_roundtrips() {
    for (arch, version) in [("bitnet-b1.58", 3), ("bitnet", 2), ("bitnet-25", 3)] {
        let (mut w, codes) = tiny_model(arch, true);
        w.set_version(version);
        let f = GgufFile::from_bytes("tiny.gguf", w.to_bytes()).unwrap();
        assert_eq!(f.version(), version);
        let src = GgufSource::from_file(f).unwrap();
        let hf = src.hf_config().unwrap();
        assert_eq!(hf.tie_word_embeddings, Some(false));
        assert_eq!(hf.rms_norm_eps, 1e-6);
        assert_eq!(hf.rope_scaling, None, "linear x1 is the identity");
        assert_eq!(hf.max_position_embeddings, 2048);
        let cfg = hf.resolve().unwrap();
        assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size), (2, 1, 64, 4));
        for (pr, c) in Proj::ALL.iter().zip(&codes) {
            let t = src.ternary(0, *pr).unwrap();
            assert_eq!(&t.codes, c, "{pr:?}");
            let want = if *pr == Proj::Up { 0.75 } else { 0.5 + *pr as u8 as f32 };
            assert_eq!(t.scale, want);
        }
        assert!(matches!(src.embedding().unwrap(), DenseMatrix::BF16 { rows: 4, cols: 128, .. }));
        let head = src.lm_head().unwrap().expect("untied head");
        let DenseMatrix::F32 { rows: 4, cols: 128, data } = head else { panic!("Q8_0 head -> F32") };
        for (i, v) in data.iter().enumerate() {
            assert!((v - (i as f32 * 0.37).sin()).abs() < 0.01, "head {i}");
        }
        assert_eq!(src.layer_norm(0, LayerNorm::FfnSub).unwrap().len(), 256);
        assert_eq!(src.tokenizer_token_types(), Some(vec![3, 3, 1, 1]));
        assert_eq!(src.eos_token_id(), Some(1));
    }
}

#[test]
fn written_model_config_errors() {
    let (mut w, _) = tiny_model("bitnet-b1.58", false);
    w.add_meta("bitnet-b1.58.rope.scaling.type", s("yarn"));
    let e = GgufSource::from_file(GgufFile::from_bytes("t.gguf", w.to_bytes()).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Config(_)) && e.to_string().contains("rope_scaling"), "{e}");

    let (mut w, _) = tiny_model("bitnet-b1.58", false);
    w.add_meta("bitnet-b1.58.rope.dimension_count", GgufValue::U32(32));
    let e = GgufSource::from_file(GgufFile::from_bytes("t.gguf", w.to_bytes()).unwrap()).unwrap_err();
    assert!(e.to_string().contains("partial rotary"), "{e}");

    let (w, _) = tiny_model("llama", false);
    let e = GgufSource::from_file(GgufFile::from_bytes("t.gguf", w.to_bytes()).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Config(_)) && e.to_string().contains("\"llama\""), "{e}");

    // an absurd size, and a missing one
    let (mut w, _) = tiny_model("bitnet", false);
    w.add_meta("bitnet.attention.head_count", GgufValue::U64(1 << 40));
    let e = GgufSource::from_file(GgufFile::from_bytes("t.gguf", w.to_bytes()).unwrap()).unwrap_err();
    assert!(e.to_string().contains("\"bitnet.attention.head_count\": 1099511627776 is out of range"), "{e}");
    let (w, _) = tiny_model("bitnet", false);
    let f = GgufFile::from_bytes("t.gguf", w.to_bytes()).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata().iter().filter(|(k, _)| k != "bitnet.block_count") {
        w.add_meta(k.clone(), v.clone());
    }
    let e = GgufSource::from_file(GgufFile::from_bytes("t.gguf", w.to_bytes()).unwrap()).unwrap_err();
    assert!(e.to_string().contains("\"bitnet.block_count\" is missing"), "{e}");

    // a duplicate tensor name
    let (mut w, _) = tiny_model("bitnet", false);
    w.add_f32("blk.0.attn_q.weight", &[128, 128], &vec![0.0; 128 * 128]);
    let e = GgufFile::from_bytes("t.gguf", w.to_bytes()).unwrap_err();
    assert!(e.to_string().contains("\"blk.0.attn_q.weight\": appears twice"), "{e}");
}

#[test]
fn dense_non_ternary_weight_is_an_error() {
    let h = 128u64;
    let (full, _) = tiny_model("bitnet", false);
    // rebuild with a non-ternary F32 attn_o
    let bytes = full.to_bytes();
    let f = GgufFile::from_bytes("t.gguf", bytes).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        w.add_meta(k.clone(), v.clone());
    }
    for t in f.tensors() {
        if t.name == ternary_tensor_name(0, Proj::O) {
            let vals: Vec<f32> = (0..h * h).map(|i| (i % 3) as f32 * 0.1).collect();
            w.add_f32(t.name.clone(), &[h, h], &vals);
        } else {
            w.add_tensor(t.name.clone(), &t.dims, t.dtype, f.tensor_bytes(&t.name).unwrap().to_vec());
        }
    }
    let src = GgufSource::from_file(GgufFile::from_bytes("t.gguf", w.to_bytes()).unwrap()).unwrap();
    let e = format_msg(src.ternary(0, Proj::O));
    assert!(e.contains("blk.0.attn_output.weight") && e.contains("ternary"), "{e}");
    assert!(src.ternary(0, Proj::Down).is_ok());
}
