//! The benchmark `tools/gpu-check.sh` runs (through the `bitnet-cuda-bench` binary) and that
//! `bitnet bench --device cuda` can call: random weights of a preset's shapes (2B-4T by
//! default), decode throughput at several batch sizes (CUDA-graph replay, greedy sampling on
//! the device), prefill throughput, achieved weight bandwidth against a device copy-bandwidth
//! probe measured in the same run. Works in every build: without the `cuda` feature `run`
//! returns [`crate::Error::Unavailable`].

use std::fmt;
use std::time::Instant;

use bitnet_core::precision::PrecisionPlan;
use bitnet_core::sampler::SamplingParams;
use bitnet_core::weights::random::{preset_config, RandomSource};

use crate::api::{CudaOptions, KernelTime};
use crate::error::{Error, Result};
use crate::CudaModel;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// `random:` preset of the weights' shapes.
    pub preset: String,
    pub seed: u64,
    /// Decode batch sizes.
    pub batches: Vec<usize>,
    /// Prompt tokens of each decode sequence (prefilled untimed).
    pub prompt: usize,
    /// Decode steps timed per batch size and repetition.
    pub gen: usize,
    /// Prompt length of the prefill measurement (0 skips it).
    pub prefill: usize,
    /// Measured repetitions (after one warm-up); the median is reported.
    pub reps: usize,
    pub graphs: bool,
    /// Programmatic dependent launch (see [`CudaOptions::pdl`]).
    pub pdl: bool,
    pub plan: PrecisionPlan,
    pub device: usize,
    /// Bytes of the copy-bandwidth probe's buffers.
    pub probe_bytes: usize,
    /// After the timed runs, time every kernel of one decode step per batch size and of one
    /// prefill (launched one by one with events around each: slower than the graph, but it
    /// shows where a step's time goes).
    pub profile: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            preset: "2b-4t".into(),
            seed: 0,
            batches: vec![1, 8, 32],
            prompt: 64,
            gen: 128,
            prefill: 512,
            reps: 3,
            graphs: true,
            pdl: true,
            plan: PrecisionPlan::EXACT,
            device: 0,
            probe_bytes: 1 << 30,
            profile: false,
        }
    }
}

/// One measured line.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub what: String,
    /// tokens per second, all sequences together
    pub tok_s: f64,
    /// milliseconds per step (decode) or for the whole prompt (prefill)
    pub ms: f64,
    /// weight bytes read per second (decode)
    pub gb_s: Option<f64>,
}

/// The whole result.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub device: String,
    pub kernels: String,
    pub plan: String,
    pub model: String,
    pub graphs: bool,
    pub pdl: bool,
    pub load_s: f64,
    pub bytes_per_token: usize,
    pub copy_gb_s: f64,
    pub rows: Vec<BenchRow>,
    /// Per-kernel breakdowns (`BenchOptions::profile`): a title and the launches.
    pub profiles: Vec<(String, Vec<KernelTime>)>,
}

/// A breakdown of one step: launches grouped by kernel and grid (in first-launch order), with
/// calls, total and mean device time and share.
pub fn profile_table(title: &str, launches: &[KernelTime]) -> String {
    // (first launch of the group, calls, total ms)
    let mut groups: Vec<(&KernelTime, usize, f64)> = Vec::new();
    for k in launches {
        match groups.iter_mut().find(|g| g.0.name == k.name && g.0.grid == k.grid) {
            Some(g) => {
                g.1 += 1;
                g.2 += k.ms;
            }
            None => groups.push((k, 1, k.ms)),
        }
    }
    let total: f64 = launches.iter().map(|k| k.ms).sum();
    let mut s = format!("{title}: {} launches, {:.3} ms of kernel time\n", launches.len(), total);
    s += &format!(
        "| {:<16} | {:>16} | {:>6} | {:>10} | {:>9} | {:>6} |\n",
        "kernel", "grid", "calls", "total us", "us/call", "share"
    );
    s += &format!("|{:-<18}|{:->18}|{:->8}|{:->12}|{:->11}|{:->8}|\n", "", "", "", "", "", "");
    for (k, calls, ms) in groups {
        s += &format!(
            "| {:<16} | {:>16} | {:>6} | {:>10.1} | {:>9.2} | {:>5.1}% |\n",
            k.name,
            format!("{}x{}x{}", k.grid.0, k.grid.1, k.grid.2),
            calls,
            ms * 1e3,
            ms * 1e3 / calls as f64,
            100.0 * ms / total.max(1e-12)
        );
    }
    s
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "device   {}", self.device)?;
        writeln!(f, "kernels  {}", self.kernels)?;
        writeln!(f, "model    {} | plan {}", self.model, self.plan)?;
        writeln!(
            f,
            "weights read per decode step {:.3} GB | copy-bandwidth probe {:.1} GB/s (device to device, read+write) | load {:.1} s | graphs {} | pdl {}",
            self.bytes_per_token as f64 / 1e9,
            self.copy_gb_s,
            self.load_s,
            if self.graphs { "on" } else { "off" },
            if self.pdl { "on" } else { "off" }
        )?;
        writeln!(
            f,
            "| {:<16} | {:>12} | {:>10} | {:>13} | {:>11} |",
            "measure", "tok/s", "ms", "weights GB/s", "% of probe"
        )?;
        writeln!(f, "|{:-<18}|{:->14}|{:->12}|{:->15}|{:->13}|", "", "", "", "", "")?;
        for r in &self.rows {
            let (gb, pct) = match r.gb_s {
                Some(g) => (format!("{g:.1}"), format!("{:.1}%", 100.0 * g / self.copy_gb_s.max(1e-9))),
                None => ("-".into(), "-".into()),
            };
            writeln!(f, "| {:<16} | {:>12.1} | {:>10.3} | {:>13} | {:>11} |", r.what, r.tok_s, r.ms, gb, pct)?;
        }
        write!(
            f,
            "targets (H100/H200, random:2b-4t, exact): decode 1 >= 1500 tok/s, decode 32 >= 25000 tok/s, prefill 512 >= 40000 tok/s"
        )?;
        for (title, launches) in &self.profiles {
            write!(f, "\n{}", profile_table(title, launches))?;
        }
        Ok(())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

struct Rng(u64);
impl Rng {
    fn tok(&mut self, vocab: usize) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % vocab as u64) as u32
    }
}

/// Runs the benchmark; `log` receives progress lines.
pub fn run(o: &BenchOptions, log: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    crate::cuda_available().map_err(Error::Unavailable)?;
    if o.reps == 0 || o.gen == 0 || o.batches.contains(&0) {
        return Err(Error::input("reps, gen and every batch size must be at least 1"));
    }
    let cfg = preset_config(&o.preset)?.resolve()?;
    let max_batch = o.batches.iter().copied().max().unwrap_or(1);
    let max_ctx = (o.prompt + o.gen + 16).max(o.prefill + 16);
    let copts = CudaOptions {
        device: o.device,
        max_seqs: max_batch.max(1),
        max_ctx,
        block_size: 16,
        kv_blocks: None,
        prefill_chunk: o.prefill.max(o.prompt).max(1),
        max_logit_rows: 64,
        plan: o.plan,
        graphs: o.graphs,
        pdl: o.pdl,
    };
    log(&format!("building random:{} weights (seed {}) and loading them on the device...", o.preset, o.seed));
    let t0 = Instant::now();
    let src = RandomSource::new(cfg.clone(), o.seed);
    let mut m = CudaModel::load(&src, cfg.clone(), &copts)?;
    let load_s = t0.elapsed().as_secs_f64();
    log(&format!("loaded in {load_s:.1} s on {} ({})", m.device_name(), m.kernel_note()));
    let copy_gb_s = m.copy_bandwidth_probe(o.probe_bytes, 10)?;
    log(&format!("copy-bandwidth probe: {copy_gb_s:.1} GB/s"));
    let bytes = m.bytes_per_token() as f64;
    let vocab = cfg.vocab_size;
    let mut rng = Rng(0x2545f4914f6cdd1d ^ o.seed);
    let greedy = SamplingParams::greedy();
    let mut rows = Vec::new();

    for &b in &o.batches {
        let mut seqs = (0..b).map(|_| m.new_seq()).collect::<Result<Vec<_>>>()?;
        let prompts: Vec<Vec<u32>> = (0..b).map(|_| (0..o.prompt.max(1)).map(|_| rng.tok(vocab)).collect()).collect();
        let params = vec![greedy; b];
        let mut per_rep = Vec::new();
        for rep in 0..=o.reps {
            let mut next = Vec::with_capacity(b);
            for (s, p) in seqs.iter_mut().zip(&prompts) {
                m.reset_seq(s);
                next.push(m.prefill_sample(s, p, &greedy)?);
            }
            // one untimed step captures the graph of this bucket
            {
                let mut refs: Vec<_> = seqs.iter_mut().collect();
                next = m.decode_batch(&mut refs, &next, &params)?;
            }
            let steps = o.gen.min(max_ctx - o.prompt.max(1) - 2);
            let t = Instant::now();
            for _ in 0..steps {
                let mut refs: Vec<_> = seqs.iter_mut().collect();
                next = m.decode_batch(&mut refs, &next, &params)?;
            }
            let dt = t.elapsed().as_secs_f64();
            if rep > 0 {
                per_rep.push(steps as f64 / dt);
            }
        }
        for s in seqs {
            m.release(s);
        }
        let steps_s = median(per_rep);
        let row = BenchRow {
            what: format!("decode batch {b}"),
            tok_s: steps_s * b as f64,
            ms: 1e3 / steps_s,
            gb_s: Some(bytes * steps_s / 1e9),
        };
        log(&format!("decode batch {b}: {:.1} tok/s ({:.3} ms/step)", row.tok_s, row.ms));
        rows.push(row);
    }

    if o.prefill > 0 {
        let mut s = m.new_seq()?;
        let prompt: Vec<u32> = (0..o.prefill).map(|_| rng.tok(vocab)).collect();
        let mut per_rep = Vec::new();
        for rep in 0..=o.reps {
            m.reset_seq(&mut s);
            let t = Instant::now();
            m.prefill_sample(&mut s, &prompt, &greedy)?;
            let dt = t.elapsed().as_secs_f64();
            if rep > 0 {
                per_rep.push(dt);
            }
        }
        m.release(s);
        let dt = median(per_rep);
        let row =
            BenchRow { what: format!("prefill {}", o.prefill), tok_s: o.prefill as f64 / dt, ms: dt * 1e3, gb_s: None };
        log(&format!("prefill {}: {:.1} tok/s", o.prefill, row.tok_s));
        rows.push(row);
    }

    let mut profiles = Vec::new();
    if o.profile {
        for &b in &o.batches {
            let mut seqs = (0..b).map(|_| m.new_seq()).collect::<Result<Vec<_>>>()?;
            let mut next = Vec::with_capacity(b);
            for s in seqs.iter_mut() {
                let p: Vec<u32> = (0..o.prompt.max(1)).map(|_| rng.tok(vocab)).collect();
                next.push(m.prefill_sample(s, &p, &greedy)?);
            }
            let params = vec![greedy; b];
            m.profile_start();
            let r = {
                let mut refs: Vec<_> = seqs.iter_mut().collect();
                m.decode_batch(&mut refs, &next, &params)
            };
            let launches = m.profile_take()?;
            r?;
            for s in seqs {
                m.release(s);
            }
            profiles.push((format!("decode batch {b} at position {}", o.prompt.max(1)), launches));
        }
        if o.prefill > 0 {
            let mut s = m.new_seq()?;
            let prompt: Vec<u32> = (0..o.prefill).map(|_| rng.tok(vocab)).collect();
            m.profile_start();
            let r = m.prefill_sample(&mut s, &prompt, &greedy);
            let launches = m.profile_take()?;
            r?;
            m.release(s);
            profiles.push((format!("prefill {}", o.prefill), launches));
        }
    }

    Ok(BenchReport {
        device: m.device_name(),
        kernels: m.kernel_note(),
        plan: format!("{}", o.plan),
        model: format!("random:{} (seed {})", o.preset, o.seed),
        graphs: m.uses_graphs(),
        pdl: m.uses_pdl(),
        load_s,
        bytes_per_token: m.bytes_per_token(),
        copy_gb_s,
        rows,
        profiles,
    })
}
