//! A sequence's KV blocks go back to the pool when it finishes, fails, or its client goes away.

mod common;

use std::io::BufRead;
use std::time::Duration;

use bitnet_server::ServerConfig;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(20);

#[test]
fn blocks_return_when_sequences_finish() {
    let srv = TestServer::with("random:tiny", ServerConfig::default());
    assert_eq!(srv.metric("bitnet_kv_blocks_used"), 0.0);
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let addr = srv.addr;
            std::thread::spawn(move || {
                let p = prompt(i, 20 + 17 * i as usize, 640);
                let body =
                    json!({"prompt": p, "max_tokens": 40 + i, "temperature": 0.8, "seed": i, "stream": i % 2 == 0});
                http(addr, "POST", "/v1/completions", &[], Some(body.to_string().as_bytes())).status
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, T);
    assert_eq!(srv.metric("bitnet_running_sequences"), 0.0);
    assert_eq!(
        srv.metric("bitnet_requests_finished_total{reason=\"length\"}")
            + srv.metric("bitnet_requests_finished_total{reason=\"stop\"}"),
        6.0
    );
}

#[test]
fn blocks_return_when_a_sequence_fails() {
    let cfg = ServerConfig { debug_faults: true, ..ServerConfig::default() };
    let srv = TestServer::with("random:tiny", cfg);
    // Not streamed: the failure is an HTTP 500 with an OpenAI error body.
    let r = srv.post(
        "/v1/completions",
        &json!({"prompt": prompt(3, 50, 640), "max_tokens": 100, "bitnet_fail_after": 5, "ignore_eos": true}),
    );
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(r.error()["type"], "server_error");
    // Streamed: the stream carries an error event after some tokens.
    let r = srv.post(
        "/v1/completions",
        &json!({"prompt": prompt(4, 70, 640), "max_tokens": 100, "bitnet_fail_after": 5, "ignore_eos": true, "stream": true}),
    );
    assert_eq!(r.status, 200);
    let ev = r.sse();
    assert!(ev.last().unwrap().contains("\"error\""), "{ev:?}");
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, T);
    assert_eq!(srv.metric("bitnet_requests_finished_total{reason=\"failed\"}"), 2.0);
    // And the server keeps serving.
    assert_eq!(srv.post("/v1/completions", &json!({"prompt": [1, 2], "max_tokens": 3})).status, 200);
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, T);
}

#[test]
fn blocks_return_when_the_client_disconnects() {
    // Slow steps so that the sequences are still running when the clients leave.
    let cfg = ServerConfig { debug_step_delay: Duration::from_millis(10), ..ServerConfig::default() };
    let srv = TestServer::with("random:tiny", cfg);
    // A streamed request: read a few events, then hang up.
    let body = json!({"prompt": prompt(5, 60, 640), "max_tokens": 400, "ignore_eos": true, "stream": true});
    let (status, mut r) = open_stream(srv.addr, "/v1/completions", &body);
    assert_eq!(status, 200);
    let mut line = String::new();
    let mut events = 0;
    while events < 5 {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.contains("data:") {
            events += 1;
        }
    }
    assert!(srv.metric("bitnet_kv_blocks_used") > 0.0);
    drop(r);
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, T);
    assert_eq!(srv.metric("bitnet_requests_finished_total{reason=\"cancelled\"}"), 1.0);
    assert_eq!(srv.metric("bitnet_running_sequences"), 0.0);

    // A non-streamed request whose client hangs up while it runs.
    let body = json!({"prompt": prompt(6, 30, 640), "max_tokens": 400, "ignore_eos": true});
    let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
    use std::io::Write;
    let b = body.to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    while srv.metric("bitnet_running_sequences") == 0.0 {
        assert!(t0.elapsed() < T);
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(s);
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, T);
    assert_eq!(srv.metric("bitnet_requests_finished_total{reason=\"cancelled\"}"), 2.0);
    assert_eq!(srv.metric("bitnet_requests_finished_total{reason=\"length\"}"), 0.0);
}

#[test]
fn queued_requests_leave_the_queue_when_the_client_disconnects() {
    let cfg = ServerConfig { max_batch: 1, debug_step_delay: Duration::from_millis(10), ..ServerConfig::default() };
    let srv = TestServer::with("random:tiny", cfg);
    let body = json!({"prompt": prompt(7, 20, 640), "max_tokens": 100, "ignore_eos": true, "stream": true});
    let (_, first) = open_stream(srv.addr, "/v1/completions", &body);
    srv.wait_metric("bitnet_running_sequences", 1.0, T);
    let addr = srv.addr;
    // The second one waits (batch full); its client gives up.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    use std::io::Write;
    let b = body.to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    srv.wait_metric("bitnet_queue_depth", 1.0, T);
    drop(s);
    srv.wait_metric("bitnet_queue_depth", 0.0, T);
    drop(first);
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, T);
    assert_eq!(srv.metric("bitnet_requests_finished_total{reason=\"cancelled\"}"), 2.0);
}
