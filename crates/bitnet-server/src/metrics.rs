//! Counters, gauges and histograms, rendered in the Prometheus text format (`GET /metrics`).
//! Everything is an atomic: the scheduler thread and the HTTP handlers update them without locks
//! (the per-path request counter takes a short lock once per HTTP request).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A fixed-bucket histogram of seconds.
pub struct Histogram {
    bounds: &'static [f64],
    /// one count per bound (non-cumulative), plus +Inf
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| s <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {cum}");
    }
}

const TTFT_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const TPOT_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
const STEP_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// How a sequence left the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// eos
    Stop,
    /// max_tokens or the context
    Length,
    /// the client went away (or the handler stopped reading, e.g. on a stop string)
    Cancelled,
    /// a step failed, or the server shut down before it finished
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 4] = [Outcome::Stop, Outcome::Length, Outcome::Cancelled, Outcome::Failed];
    fn label(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
        }
    }
}

/// Every metric the server exports.
pub struct Metrics {
    http: Mutex<BTreeMap<(String, u16), u64>>,
    /// prompt tokens of admitted requests
    pub prompt_tokens: AtomicU64,
    /// tokens sent to clients
    pub generation_tokens: AtomicU64,
    /// tokens run through prefill (prompt tokens plus recomputation after preemption)
    pub prefill_tokens: AtomicU64,
    /// prompt tokens whose K/V came from the prefix cache
    pub prefix_hit_tokens: AtomicU64,
    pub queue_depth: AtomicU64,
    pub running: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub kv_block_size: AtomicU64,
    pub rejected: AtomicU64,
    pub preemptions: AtomicU64,
    /// prompt lookup: draft tokens fed, and those the sampled tokens confirmed
    pub draft_tokens: AtomicU64,
    pub draft_accepted: AtomicU64,
    pub steps: AtomicU64,
    pub step_tokens: AtomicU64,
    finished: [AtomicU64; 4],
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub step_time: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            http: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            prefill_tokens: AtomicU64::new(0),
            prefix_hit_tokens: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            running: AtomicU64::new(0),
            kv_blocks_used: AtomicU64::new(0),
            kv_blocks_total: AtomicU64::new(0),
            kv_block_size: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            draft_tokens: AtomicU64::new(0),
            draft_accepted: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            step_tokens: AtomicU64::new(0),
            finished: Default::default(),
            ttft: Histogram::new(TTFT_BUCKETS),
            tpot: Histogram::new(TPOT_BUCKETS),
            step_time: Histogram::new(STEP_BUCKETS),
        }
    }

    pub fn http_request(&self, path: &str, status: u16) {
        if let Ok(mut m) = self.http.lock() {
            *m.entry((path.to_string(), status)).or_insert(0) += 1;
        }
    }

    pub fn finished(&self, o: Outcome) {
        self.finished[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished_count(&self, o: Outcome) -> u64 {
        self.finished[o as usize].load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let scalar = |o: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            let _ = writeln!(o, "{name} {v}");
        };
        let _ = writeln!(o, "# HELP bitnet_http_requests_total HTTP requests answered, by path and status.");
        let _ = writeln!(o, "# TYPE bitnet_http_requests_total counter");
        if let Ok(m) = self.http.lock() {
            for ((path, status), n) in m.iter() {
                let _ = writeln!(o, "bitnet_http_requests_total{{path=\"{path}\",status=\"{status}\"}} {n}");
            }
        }
        let _ = writeln!(
            o,
            "# HELP bitnet_requests_finished_total Generation requests that left the scheduler, by outcome."
        );
        let _ = writeln!(o, "# TYPE bitnet_requests_finished_total counter");
        for out in Outcome::ALL {
            let _ = writeln!(
                o,
                "bitnet_requests_finished_total{{reason=\"{}\"}} {}",
                out.label(),
                self.finished_count(out)
            );
        }
        scalar(
            &mut o,
            "bitnet_requests_rejected_total",
            "counter",
            "Requests refused with 429 because the queue was full.",
            g(&self.rejected),
        );
        scalar(
            &mut o,
            "bitnet_prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests (tokens in).",
            g(&self.prompt_tokens),
        );
        scalar(
            &mut o,
            "bitnet_generation_tokens_total",
            "counter",
            "Generated tokens sent to clients (tokens out).",
            g(&self.generation_tokens),
        );
        scalar(
            &mut o,
            "bitnet_prefill_tokens_total",
            "counter",
            "Tokens run through prefill, recomputation after preemption included.",
            g(&self.prefill_tokens),
        );
        scalar(
            &mut o,
            "bitnet_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens whose K/V were reused from the prefix cache instead of computed.",
            g(&self.prefix_hit_tokens),
        );
        scalar(
            &mut o,
            "bitnet_preemptions_total",
            "counter",
            "Sequences preempted (blocks freed, recomputed later) because the KV cache was full.",
            g(&self.preemptions),
        );
        scalar(
            &mut o,
            "bitnet_draft_tokens_total",
            "counter",
            "Prompt lookup: draft tokens fed after a sampled token (--prompt-lookup).",
            g(&self.draft_tokens),
        );
        scalar(
            &mut o,
            "bitnet_draft_accepted_tokens_total",
            "counter",
            "Prompt lookup: draft tokens that were the tokens sampled (their step was saved).",
            g(&self.draft_accepted),
        );
        scalar(
            &mut o,
            "bitnet_steps_total",
            "counter",
            "Model steps (one forward over the running batch).",
            g(&self.steps),
        );
        scalar(
            &mut o,
            "bitnet_step_tokens_total",
            "counter",
            "Tokens fed to the model over all steps.",
            g(&self.step_tokens),
        );
        scalar(&mut o, "bitnet_queue_depth", "gauge", "Requests waiting for admission.", g(&self.queue_depth));
        scalar(&mut o, "bitnet_running_sequences", "gauge", "Sequences in the running batch.", g(&self.running));
        scalar(&mut o, "bitnet_kv_blocks_used", "gauge", "KV cache blocks held by sequences.", g(&self.kv_blocks_used));
        scalar(&mut o, "bitnet_kv_blocks_total", "gauge", "KV cache blocks in the pool.", g(&self.kv_blocks_total));
        scalar(&mut o, "bitnet_kv_block_size", "gauge", "Positions per KV cache block.", g(&self.kv_block_size));
        self.ttft.render(
            &mut o,
            "bitnet_time_to_first_token_seconds",
            "Time from submission to the first generated token.",
        );
        self.tpot.render(
            &mut o,
            "bitnet_time_per_output_token_seconds",
            "Time between consecutive generated tokens of a sequence.",
        );
        self.step_time.render(&mut o, "bitnet_step_duration_seconds", "Duration of one model step.");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::new();
        m.ttft.observe(Duration::from_millis(3));
        m.ttft.observe(Duration::from_millis(30));
        m.ttft.observe(Duration::from_secs(100));
        let t = m.render();
        assert!(t.contains("bitnet_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"), "{t}");
        assert!(t.contains("bitnet_time_to_first_token_seconds_bucket{le=\"0.05\"} 2"), "{t}");
        assert!(t.contains("bitnet_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3"), "{t}");
        assert!(t.contains("bitnet_time_to_first_token_seconds_count 3"), "{t}");
    }
}
