//! The prefix cache: a prompt that starts with tokens seen before reuses their K/V, and the
//! output is exactly what it would be without the cache (alone or among concurrent requests).

mod common;

use std::time::Duration;

use bitnet_core::sampler::SamplingParams;
use bitnet_server::ServerConfig;
use common::*;
use serde_json::json;

/// Greedy tokens of the single-sequence reference loop.
fn reference(prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let with_n: Vec<(Vec<u32>, usize)> = prompts.iter().map(|p| (p.clone(), n)).collect();
    reference_tokens(&with_n, SamplingParams::greedy())
}

/// `shared` followed by a tail of its own for each of `n` prompts.
fn family(shared: &[u32], n: usize) -> Vec<Vec<u32>> {
    (0..n).map(|i| [shared, &prompt(50 + i as u64, 5 + 7 * i, 640)[..]].concat()).collect()
}

#[test]
fn shared_prefixes_are_reused_and_outputs_unchanged() {
    let srv = TestServer::with("random:tiny", ServerConfig { max_batch: 8, ..ServerConfig::default() });
    let hits = || srv.metric("bitnet_prefix_cache_hit_tokens_total");
    let shared = prompt(7, 100, 640);
    let prompts = family(&shared, 6);
    let want = reference(&prompts, 12);

    // One after the other: the first computes everything; the second finds the 6 full blocks
    // (96 positions) of the shared 100 tokens.
    assert_eq!(completion_ids(&srv, &prompts[0], 12), want[0]);
    assert_eq!(hits(), 0.0);
    assert_eq!(completion_ids(&srv, &prompts[1], 12), want[1]);
    assert_eq!(hits(), 96.0);
    // The same prompt again: everything but the last block's partial tail and the last token.
    let again = completion_ids(&srv, &prompts[0], 12);
    assert_eq!(again, want[0]);
    assert!(hits() >= 96.0 + 96.0, "{}", hits());
    // A prompt that continues an earlier conversation (prompt + its answer + more) reuses the
    // answer's blocks too.
    let turn2 = [&prompts[0][..], &want[0][..], &prompt(99, 30, 640)[..]].concat();
    let before = hits();
    let want2 = reference(std::slice::from_ref(&turn2), 8);
    assert_eq!(completion_ids(&srv, &turn2, 8), want2[0]);
    assert!(hits() - before >= 112.0, "{}", hits() - before);

    // Concurrent requests sharing the prefix: identical to the reference loop.
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let addr = srv.addr;
            let body =
                json!({"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(2 * i as u64));
                let r = http(addr, "POST", "/v1/completions", &[], Some(body.to_string().as_bytes()));
                assert_eq!(r.status, 200, "{}", r.text());
                r.json()["choices"][0]["token_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect::<Vec<u32>>()
            })
        })
        .collect();
    let got: Vec<Vec<u32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(got, want);
    // Cached blocks nobody holds count as free: every block is back.
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, Duration::from_secs(10));
}

#[test]
fn eviction_under_a_small_pool_keeps_outputs() {
    // 64 blocks of 16 (the pool must hold one 512-token context plus room): many distinct
    // prompts evict each other's cached blocks; outputs stay those of the reference loop.
    let cfg = ServerConfig {
        max_batch: 4,
        ctx: Some(512),
        kv_memory: Some(64 * 16 * 2 * 2 * 64 * 4),
        ..ServerConfig::default()
    };
    let srv = TestServer::with("random:tiny", cfg);
    let prompts: Vec<Vec<u32>> = (0..10).map(|i| prompt(200 + i, 150 + 10 * i as usize, 640)).collect();
    let want = reference(&prompts, 6);
    for round in 0..2 {
        for (i, p) in prompts.iter().enumerate() {
            assert_eq!(completion_ids(&srv, p, 6), want[i], "round {round} prompt {i}");
        }
    }
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, Duration::from_secs(10));
}

#[test]
fn prefix_cache_can_be_turned_off() {
    let srv = TestServer::with("random:tiny", ServerConfig { prefix_cache: false, ..ServerConfig::default() });
    let p = prompt(3, 80, 640);
    let a = completion_ids(&srv, &p, 5);
    assert_eq!(completion_ids(&srv, &p, 5), a);
    assert_eq!(srv.metric("bitnet_prefix_cache_hit_tokens_total"), 0.0);
}
