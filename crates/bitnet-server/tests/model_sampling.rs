//! The scheduler with a model that draws its own tokens (`BatchModel::forward_sampled`, what the
//! GPU does): the ids it returns are used as they are, steps whose requests it cannot sample fall
//! back to the host sampler, and the output is the same as with host sampling.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bitnet_core::batch::{BatchModel, CpuBatch, SeqId, StepChunk};
use bitnet_core::config::ModelConfig;
use bitnet_core::precision::PrecisionPlan;
use bitnet_core::sampler::SamplingParams;
use bitnet_server::{kv_plan, ServerConfig};
use common::{load, TestServer};
use serde_json::json;

/// The CPU model, drawing greedy tokens itself (argmax, lowest id on ties) and counting the
/// steps it did.
struct ArgmaxOnModel {
    inner: CpuBatch,
    ids: Vec<u32>,
    sampled_steps: Arc<AtomicUsize>,
}

impl BatchModel for ArgmaxOnModel {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn plan(&self) -> PrecisionPlan {
        self.inner.plan()
    }
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    fn free_blocks(&self) -> usize {
        self.inner.free_blocks()
    }
    fn used_blocks(&self) -> usize {
        self.inner.used_blocks()
    }
    fn new_seq(&mut self) -> bitnet_core::Result<SeqId> {
        self.inner.new_seq()
    }
    fn seq_len(&self, s: SeqId) -> usize {
        self.inner.seq_len(s)
    }
    fn seq_blocks(&self, s: SeqId) -> usize {
        self.inner.seq_blocks(s)
    }
    fn reserve(&mut self, s: SeqId, len: usize) -> bitnet_core::Result<()> {
        self.inner.reserve(s, len)
    }
    fn truncate(&mut self, s: SeqId, len: usize) {
        self.inner.truncate(s, len)
    }
    fn release(&mut self, s: SeqId) {
        self.inner.release(s)
    }
    fn forward(&mut self, chunks: &[StepChunk<'_>]) -> bitnet_core::Result<()> {
        self.inner.forward(chunks)
    }
    fn logits(&self, row: usize) -> &[f32] {
        self.inner.logits(row)
    }
    fn forward_sampled(
        &mut self,
        chunks: &[StepChunk<'_>],
        params: &[(SamplingParams, usize)],
    ) -> bitnet_core::Result<bool> {
        self.inner.forward(chunks)?;
        if !params.iter().all(|(p, _)| p.is_greedy()) {
            return Ok(false);
        }
        self.ids.clear();
        for r in 0..params.len() {
            let l = self.inner.logits(r);
            let mut best = 0;
            for (i, &v) in l.iter().enumerate() {
                if v > l[best] {
                    best = i;
                }
            }
            self.ids.push(best as u32);
        }
        self.sampled_steps.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }
    fn sampled(&self) -> &[u32] {
        &self.ids
    }
}

fn cfg() -> ServerConfig {
    ServerConfig { max_batch: 4, ctx: Some(256), prefill_chunk: 32, ..ServerConfig::default() }
}

fn completions(srv: &TestServer, temperature: f64) -> Vec<serde_json::Value> {
    let prompts = ["The quick brown", "Once upon a time", "A", "Rust is a language that"];
    std::thread::scope(|s| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| {
                s.spawn(move || {
                    let b = json!({"model": srv.model_id, "prompt": p, "max_tokens": 12, "temperature": temperature,
                        "seed": 5, "ignore_eos": true, "return_token_ids": true});
                    let r = srv.post("/v1/completions", &b);
                    assert_eq!(r.status, 200, "{}", r.text());
                    r.json()["choices"][0]["token_ids"].clone()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn tokens_drawn_by_the_model_equal_host_sampling() {
    let host = TestServer::with("fixture", cfg());
    let want = completions(&host, 0.0);
    host.stop().unwrap();

    let engine = load("fixture");
    let c = cfg();
    let plan = kv_plan(&engine.model.cfg, engine.model.plan.kv_cache, &c).unwrap();
    let (model, meta) = engine.split();
    let steps = Arc::new(AtomicUsize::new(0));
    let m = ArgmaxOnModel {
        inner: CpuBatch::new(
            model,
            plan.n_blocks,
            plan.block_size,
            plan.ctx,
            c.max_batch,
            c.max_batch + c.prefill_chunk,
        ),
        ids: Vec::new(),
        sampled_steps: steps.clone(),
    };
    let srv = TestServer::start_model(meta, Box::new(m), plan, c);
    let got = completions(&srv, 0.0);
    assert_eq!(got, want, "greedy ids drawn by the model differ from host sampling");
    let n = steps.load(Ordering::Relaxed);
    assert!(n >= 12, "the model drew tokens in {n} steps");
    // sampled requests: the model declines, the host samples (and seeded runs repeat)
    let a = completions(&srv, 1.0);
    let b = completions(&srv, 1.0);
    assert_eq!(a, b);
    assert!(a.iter().all(|ids| ids.as_array().is_some_and(|v| v.len() == 12)));
    assert_eq!(steps.load(Ordering::Relaxed), n, "the model sampled a non-greedy request");
    // greedy with log-probabilities: they come from the logits, so the host samples
    let r = srv.post(
        "/v1/completions",
        &json!({"prompt": "A", "max_tokens": 6, "temperature": 0, "ignore_eos": true, "logprobs": 1, "return_token_ids": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().len(), 6);
    let ids = j["choices"][0]["token_ids"].as_array().unwrap();
    assert_eq!(ids[..], want[2].as_array().unwrap()[..6], "same greedy ids as host sampling");
    assert_eq!(steps.load(Ordering::Relaxed), n, "the model sampled a request that wants log-probabilities");
    // a logit bias is applied by the host sampler too
    let r = srv.post(
        "/v1/completions",
        &json!({"prompt": "A", "max_tokens": 3, "temperature": 0, "ignore_eos": true, "logit_bias": {"42": 100},
            "return_token_ids": true}),
    );
    assert_eq!(r.json()["choices"][0]["token_ids"], json!([42, 42, 42]), "{}", r.text());
    assert_eq!(steps.load(Ordering::Relaxed), n, "the model sampled a request with a logit bias");
    // a model without every-token logits refuses the prompt's log-probabilities up front
    let r = srv.post("/v1/completions", &json!({"prompt": "A", "max_tokens": 2, "logprobs": 1, "echo": true}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "echo");
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, std::time::Duration::from_secs(10));
    srv.stop().unwrap();
}
