//! Token sampling: repetition penalty, temperature, top-k, top-p, min-p, then a draw from a
//! seeded PRNG, in the order of Hugging Face transformers' logits processors.
//!
//! A [`Sampler`] owns every buffer it needs, sized for the vocabulary when it is created, so
//! [`Sampler::sample`] makes no heap allocation (the decode loop is checked for that). The
//! random generator is xoshiro256** seeded through splitmix64: the same seed, logits and history
//! give the same tokens on every machine.

use crate::error::{Error, Result};
use crate::generation_config::GenerationConfig;

/// Decoding settings of one request.
///
/// The "off" values: `temperature == 0` means greedy (argmax), `top_k == 0`, `top_p == 1`,
/// `min_p == 0`, `repetition_penalty == 1`, `frequency_penalty == presence_penalty == 0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 selects greedy decoding (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Keep only the `top_k` highest logits (tokens tied with the k-th are kept, as in
    /// transformers); 0 disables.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability mass
    /// reaches `top_p` (at least one token); 1 disables.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top token's; 0 disables.
    pub min_p: f32,
    /// transformers' repetition penalty over the distinct tokens of the history:
    /// `logit < 0 ? logit * p : logit / p`; 1 disables. Applies in greedy mode too.
    pub repetition_penalty: f32,
    /// OpenAI's frequency penalty: subtracted from a token's logit once per time it was
    /// generated so far (the prompt does not count), in [-2, 2]; 0 disables.
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty: subtracted once from the logit of every token generated so
    /// far, in [-2, 2]; 0 disables. Both apply after the repetition penalty and before the
    /// temperature (vLLM's order), in greedy mode too.
    pub presence_penalty: f32,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Plain sampling from the model's distribution (temperature 1, no truncation, no
    /// penalty, seed 0), as the OpenAI API does when a request sets nothing.
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token (ties to the lowest id), no penalty.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Self::default() }
    }

    /// Whether these settings pick the argmax deterministically (temperature 0 or top_k 1).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Whether a penalty reads the token history (repetition, frequency or presence), so the
    /// logits alone do not decide the draw.
    pub fn uses_history(&self) -> bool {
        self.repetition_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }

    /// Checks every value; the error names the field and the accepted range.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::input(format!(
                "temperature must be a finite number >= 0 (0 = greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::input(format!("top_p must be in (0, 1] (1 = off), got {}", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::input(format!("min_p must be in [0, 1] (0 = off), got {}", self.min_p)));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(Error::input(format!(
                "repetition_penalty must be a finite number > 0 (1 = off), got {}",
                self.repetition_penalty
            )));
        }
        for (name, v) in [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::input(format!("{name} must be in [-2, 2] (0 = off), got {v}")));
            }
        }
        Ok(())
    }

    /// The settings a `generation_config.json` asks for, with the defaults of transformers'
    /// `GenerationConfig` for every absent field: `do_sample = false`, `temperature = 1.0`,
    /// `top_k = 50`, `top_p = 1.0`, `min_p = None` (off), `repetition_penalty = 1.0`.
    ///
    /// As in transformers, `do_sample` false (or absent) means greedy decoding whatever the
    /// temperature / top-k / top-p say, but the repetition penalty still applies; a sampling
    /// temperature of 0 also means greedy. The seed is 0; set `seed` afterwards. The result is
    /// not validated (call [`SamplingParams::validate`]).
    pub fn from_generation_config(gc: &GenerationConfig) -> Self {
        // transformers' GenerationConfig defaults (generation/configuration_utils.py).
        const HF_TEMPERATURE: f32 = 1.0;
        const HF_TOP_K: usize = 50;
        const HF_TOP_P: f32 = 1.0;
        const HF_REPETITION_PENALTY: f32 = 1.0;

        let repetition_penalty = gc.repetition_penalty.unwrap_or(HF_REPETITION_PENALTY);
        if !gc.do_sample.unwrap_or(false) {
            return SamplingParams { repetition_penalty, ..Self::greedy() };
        }
        SamplingParams {
            temperature: gc.temperature.unwrap_or(HF_TEMPERATURE),
            top_k: gc.top_k.unwrap_or(HF_TOP_K),
            top_p: gc.top_p.unwrap_or(HF_TOP_P),
            min_p: gc.min_p.unwrap_or(0.0),
            repetition_penalty,
            ..Self::default()
        }
    }
}

/// xoshiro256** (Blackman and Vigna), seeded through splitmix64.
#[derive(Debug, Clone)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut splitmix = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        // splitmix64 never yields four zeros in a row, so the state is never all zero.
        Xoshiro256 { s: [splitmix(), splitmix(), splitmix(), splitmix()] }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Below this many candidates, top-p sorts instead of bisecting.
const TOP_P_SORT: usize = 64;

/// The largest value, NaN ignored (-inf for an empty or all-NaN slice). Lane-wise so that it
/// vectorizes.
fn max_of(xs: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            // f32::max returns the other operand when one is NaN.
            lanes[j] = lanes[j].max(c[j]);
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(rest) {
        max = max.max(v);
    }
    max
}

/// Index of the largest value, ties to the lowest index; NaN never wins; 0 when no value is
/// above -inf.
fn argmax(xs: &[f32]) -> u32 {
    let max = max_of(xs);
    if max == f32::NEG_INFINITY {
        return 0;
    }
    xs.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// A value that at least `k` entries of `xs` reach (`0 < k <= xs.len()`): the smallest of the
/// maxima of `k` near-equal chunks. Everything in the top k is >= it, so it prefilters top-k.
fn kth_lower_bound(xs: &[f32], k: usize) -> f32 {
    let n = xs.len();
    let mut lb = f32::INFINITY;
    for j in 0..k {
        lb = lb.min(max_of(&xs[j * n / k..(j + 1) * n / k]));
    }
    lb
}

/// Writes the indices of the entries `>= floor` to `idx` and returns their count. Blocks with
/// no such entry are skipped after a vectorized maximum, so a selective filter costs about
/// one vectorized pass.
fn gather_at_least(xs: &[f32], floor: f32, idx: &mut [u32]) -> usize {
    const CHUNK: usize = 64;
    let mut m = 0usize;
    for (c, chunk) in xs.chunks(CHUNK).enumerate() {
        if max_of(chunk) >= floor {
            for (j, &v) in chunk.iter().enumerate() {
                if v >= floor {
                    idx[m] = (c * CHUNK + j) as u32;
                    m += 1;
                }
            }
        }
    }
    m
}

/// Buckets of the top-p histogram: 1/8 octave each, over probabilities in (0, 1].
const TOP_P_BUCKETS: usize = 1024;

/// Histogram bucket of an unnormalized probability `e` in [0, 1]: larger `e`, smaller bucket
/// (the exponent and the top 3 mantissa bits, reversed).
#[inline]
fn top_p_bucket(e: f32) -> usize {
    (TOP_P_BUCKETS - 1).saturating_sub((e.to_bits() >> 20) as usize)
}

/// `exp(x)` for `x <= 0` (Cephes' single-precision polynomial, about 1 ulp): exactly 1 at 0,
/// and 0 below -87 (where f32 turns subnormal) and for -inf. Plain arithmetic, so loops over
/// it vectorize and give the same bits on every machine.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer (round to nearest even).
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.max(-87.0);
    let shifted = xc * std::f32::consts::LOG2_E + MAGIC;
    let k = shifted - MAGIC;
    let r = xc - k * C1 - k * C2;
    let mut y = 1.987_569_1e-4f32;
    y = y * r + 1.398_199_9e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 1.666_666_5e-1;
    y = y * r + 0.5;
    y = y * (r * r) + r + 1.0;
    // k (in [-126, 0]) sits in the low mantissa bits of `shifted`; reading it there instead
    // of casting keeps the loop vectorizable. 2^k is a normal float.
    let k_int = (shifted.to_bits() as i32).wrapping_sub(0x4b40_0000);
    let scale = f32::from_bits((k_int.wrapping_add(127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

/// Tokens per block of the dense probability array (block sums speed up the draw).
const BLOCK: usize = 256;

/// `probs[i] = exp(xs[i] - max)` and `blocks[b]` = the sum of block `b`; returns the total.
fn exp_dense(xs: &[f32], max: f32, probs: &mut [f32], blocks: &mut [f64]) -> f64 {
    let mut total = 0.0f64;
    for ((xb, pb), bs) in xs.chunks(BLOCK).zip(probs.chunks_mut(BLOCK)).zip(blocks) {
        for (e, &v) in pb.iter_mut().zip(xb) {
            *e = exp_nonpos(v - max);
        }
        let mut lanes = [0.0f64; 8];
        let chunks = pb.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for j in 0..8 {
                lanes[j] += c[j] as f64;
            }
        }
        let mut sum: f64 = lanes.iter().sum();
        for &e in rest {
            sum += e as f64;
        }
        *bs = sum;
        total += sum;
    }
    total
}

/// Draws from the dense array: the token where the running sum first exceeds `r`.
fn draw_dense(r: f64, probs: &[f32], blocks: &[f64]) -> u32 {
    let mut cum = 0.0f64;
    for (b, &bs) in blocks.iter().enumerate() {
        if bs > 0.0 && cum + bs > r {
            let start = b * BLOCK;
            let mut c = cum;
            let mut last = start;
            for (j, &e) in probs[start..(start + BLOCK).min(probs.len())].iter().enumerate() {
                if e > 0.0 {
                    c += e as f64;
                    last = start + j;
                    if r < c {
                        return last as u32;
                    }
                }
            }
            // Rounding between the block sum and the running sum.
            return last as u32;
        }
        cum += bs;
    }
    probs.iter().rposition(|&e| e > 0.0).unwrap_or(0) as u32
}

/// NaN -> -inf.
#[inline]
fn clean(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

/// transformers' repetition penalty on one logit.
#[inline]
fn penalize(logit: f32, penalty: f32) -> f32 {
    if logit < 0.0 {
        logit * penalty
    } else {
        logit / penalty
    }
}

/// Picks the next token from a row of logits. Create one per sequence (or reuse one through
/// [`Sampler::reset`] / [`Sampler::set_params`]); all scratch memory is allocated by
/// [`Sampler::new`] and [`Sampler::sample`] allocates nothing.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    vocab_size: usize,
    rng: Xoshiro256,
    /// Processed logits (penalty, temperature, NaN -> -inf), indexed by token id.
    scratch: Vec<f32>,
    /// Unnormalized probabilities `exp(l - max)`, indexed by token id.
    probs: Vec<f32>,
    /// Candidate token ids; the first `m` entries are live.
    idx: Vec<u32>,
    /// Sums of [`BLOCK`]-token blocks of `probs` (dense path).
    blocks: Vec<f64>,
    /// OpenAI's `logit_bias`: added to these tokens' logits before anything else
    bias: Vec<(u32, f32)>,
    /// the biased row, when there is a bias or a mask (allocated by the first one)
    biased: Vec<f32>,
    /// when `masked`: bit `t` set = token `t` may be drawn (JSON mode's allowed tokens)
    allow: Vec<u64>,
    masked: bool,
}

impl Sampler {
    /// A sampler for logits rows of `vocab_size` entries. Fails when `params` do not
    /// [validate](SamplingParams::validate) or `vocab_size` does not fit token ids (`u32`).
    pub fn new(params: SamplingParams, vocab_size: usize) -> Result<Self> {
        params.validate()?;
        if vocab_size > u32::MAX as usize {
            return Err(Error::input(format!("vocab_size {vocab_size} does not fit 32-bit token ids")));
        }
        Ok(Sampler {
            params,
            vocab_size,
            rng: Xoshiro256::new(params.seed),
            scratch: vec![0.0; vocab_size],
            probs: vec![0.0; vocab_size],
            idx: vec![0; vocab_size],
            blocks: vec![0.0; vocab_size.div_ceil(BLOCK)],
            bias: Vec::new(),
            biased: Vec::new(),
            allow: Vec::new(),
            masked: false,
        })
    }

    /// Restricts the next draws to `allowed` token ids (None: no restriction), e.g. the tokens
    /// that keep a JSON document valid (`json_mode.rs`). The others count as -inf before
    /// anything else; with none allowed, the row has no finite logit (see [`Sampler::sample`]).
    /// Allocates once per sampler.
    pub fn set_allowed(&mut self, allowed: Option<&[u32]>) {
        let Some(ids) = allowed else {
            self.masked = false;
            return;
        };
        let words = self.vocab_size.div_ceil(64);
        if self.allow.len() != words {
            self.allow = vec![0; words];
        }
        if self.biased.len() != self.vocab_size {
            self.biased = vec![0.0; self.vocab_size];
        }
        self.allow.fill(0);
        for &t in ids.iter().filter(|&&t| (t as usize) < self.vocab_size) {
            self.allow[t as usize / 64] |= 1 << (t % 64);
        }
        self.masked = true;
    }

    /// Sets OpenAI's `logit_bias` (token id, value added to its logit before the penalties,
    /// the temperature and the draw; ids outside the vocabulary are ignored). [`Sampler::new`]
    /// and [`Sampler::set_params`] start without one. Allocates (once per request), sampling
    /// with it does not.
    pub fn set_logit_bias(&mut self, bias: &[(u32, f32)]) {
        self.bias.clear();
        self.bias.extend(bias.iter().filter(|&&(t, _)| (t as usize) < self.vocab_size));
        if !self.bias.is_empty() && self.biased.len() != self.vocab_size {
            self.biased = vec![0.0; self.vocab_size];
        }
    }

    /// The current settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The vocabulary size the buffers were sized for.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Restarts the random sequence from `seed` (and records it in the params), to reuse the
    /// sampler for a new request. Allocates nothing.
    pub fn reset(&mut self, seed: u64) {
        self.params.seed = seed;
        self.rng = Xoshiro256::new(seed);
    }

    /// Replaces the settings (validated) and restarts the random sequence from
    /// `params.seed`. Allocates nothing.
    pub fn set_params(&mut self, params: SamplingParams) -> Result<()> {
        params.validate()?;
        self.params = params;
        self.rng = Xoshiro256::new(params.seed);
        self.bias.clear();
        self.masked = false;
        Ok(())
    }

    /// Picks the next token.
    ///
    /// `logits` is one row; entries past `vocab_size` are ignored, and a shorter row limits
    /// the candidates to its length (an empty row gives 0). `history` holds the tokens the
    /// repetition penalty looks at (transformers uses the whole sequence, prompt included);
    /// each distinct token is penalized once, and ids outside the row are ignored. The tokens
    /// of `history` from `prompt_len` on are the ones generated so far, which the frequency and
    /// presence penalties count. NaN logits never win (they count as -inf); a row with no
    /// finite logit gives the greedy answer (lowest id among the largest, or 0). No heap
    /// allocation.
    pub fn sample(&mut self, logits: &[f32], history: &[u32], prompt_len: usize) -> u32 {
        if self.bias.is_empty() && !self.masked {
            return self.sample_row(logits, history, prompt_len);
        }
        // The biased (and masked) row stands in for the model's (taken out of `self` while it
        // is read).
        let mut biased = std::mem::take(&mut self.biased);
        let n = logits.len().min(self.vocab_size);
        biased[..n].copy_from_slice(&logits[..n]);
        for &(t, b) in &self.bias {
            if let Some(v) = biased[..n].get_mut(t as usize) {
                *v += b;
            }
        }
        if self.masked {
            for (i, v) in biased[..n].iter_mut().enumerate() {
                if (self.allow[i / 64] >> (i % 64)) & 1 == 0 {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        let tok = self.sample_row(&biased[..n], history, prompt_len);
        self.biased = biased;
        tok
    }

    /// [`Sampler::sample`] after the bias.
    fn sample_row(&mut self, logits: &[f32], history: &[u32], prompt_len: usize) -> u32 {
        let n = logits.len().min(self.vocab_size);
        if n == 0 {
            return 0;
        }
        let logits = &logits[..n];
        let p = self.params;
        let greedy = p.is_greedy();
        let generated = &history[prompt_len.min(history.len())..];
        let use_penalty = p.repetition_penalty != 1.0 && !history.is_empty();
        let use_counts = (p.frequency_penalty != 0.0 || p.presence_penalty != 0.0) && !generated.is_empty();
        if greedy && !use_penalty && !use_counts {
            return argmax(logits);
        }

        // 1. repetition penalty, 2. frequency and presence penalties, 3. temperature,
        // NaN -> -inf. Multiply by the reciprocal (within an ulp of a division, and faster).
        let inv_temperature = if greedy { 1.0 } else { 1.0 / p.temperature };
        let scratch = &mut self.scratch[..n];
        for (s, &v) in scratch.iter_mut().zip(logits) {
            *s = clean(v) * inv_temperature;
        }
        let penalized = |t: usize| if use_penalty { penalize(logits[t], p.repetition_penalty) } else { logits[t] };
        if use_penalty {
            // Computed from the raw logit, so a repeated token is penalized once.
            for &t in history {
                let t = t as usize;
                if t < n {
                    scratch[t] = clean(penalized(t)) * inv_temperature;
                }
            }
        }
        if use_counts {
            // Presence: set from the penalized logit, so once per distinct token; frequency:
            // subtracted once per occurrence.
            for &t in generated {
                let t = t as usize;
                if t < n {
                    scratch[t] = (clean(penalized(t)) - p.presence_penalty) * inv_temperature;
                }
            }
            let step = p.frequency_penalty * inv_temperature;
            for &t in generated {
                if let Some(s) = scratch.get_mut(t as usize) {
                    *s -= step;
                }
            }
        }
        if greedy {
            argmax(scratch)
        } else {
            self.sample_processed(n)
        }
    }

    /// Steps 3 to 6 on `scratch[..n]`.
    fn sample_processed(&mut self, n: usize) -> u32 {
        let p = self.params;
        let Sampler { scratch, probs, idx, blocks, rng, .. } = self;
        let scratch: &[f32] = &scratch[..n];
        let probs = &mut probs[..n];
        let max = max_of(scratch);
        if max.is_infinite() {
            // No finite candidate, or an infinite logit: the distribution is degenerate.
            return argmax(scratch);
        }
        // Descending by value, ties to the lowest id.
        let desc = |a: &u32, b: &u32| scratch[*b as usize].total_cmp(&scratch[*a as usize]).then(a.cmp(b));

        // Two representations of the candidates: "dense" (every token, probabilities in
        // `probs[..n]`) until a filter runs, then the list `idx[..m]` (probabilities still
        // indexed by token id).
        let mut dense = true;
        let mut m = 0usize;
        let mut total: f64;

        // 3. top-k: keep every token >= the k-th largest value (transformers keeps ties).
        // Candidates are prefiltered by a cheap lower bound of that value.
        if p.top_k > 0 && p.top_k < n {
            let k = p.top_k;
            let floor = kth_lower_bound(scratch, k).max(f32::MIN);
            m = gather_at_least(scratch, floor, idx);
            if k < m {
                idx[..m].select_nth_unstable_by(k - 1, desc);
                let threshold = scratch[idx[k - 1] as usize];
                let mut kept = k;
                for j in k..m {
                    let t = idx[j];
                    if scratch[t as usize] >= threshold {
                        idx[kept] = t;
                        kept += 1;
                    }
                }
                m = kept;
            }
            dense = false;
            total = 0.0;
            for &t in &idx[..m] {
                let e = exp_nonpos(scratch[t as usize] - max);
                probs[t as usize] = e;
                total += e as f64;
            }
        } else {
            total = exp_dense(scratch, max, probs, blocks);
            if p.top_p >= 1.0 && p.min_p <= 0.0 {
                return draw_dense(rng.next_f64() * total, probs, blocks);
            }
        }

        // 4. top-p: in descending order, keep a token while the mass before it is < top_p
        // (transformers: drop where the ascending cumulative sum is <= 1 - top_p), at least
        // one. Without sorting everything: a histogram of the probabilities finds the bucket
        // that holds the cut, then bisection with selections narrows it to a small sort.
        if p.top_p < 1.0 && (dense || m > 1) {
            let target = p.top_p as f64 * total;
            let mass = |ids: &[u32], probs: &[f32]| ids.iter().map(|&t| probs[t as usize] as f64).sum::<f64>();
            // Invariant: positions < lo are kept, with `before` their mass; the cut is <= hi.
            let (mut lo, mut hi, mut before) = (0usize, m, 0.0f64);
            if dense || m > TOP_P_SORT {
                let mut hist = [0.0f64; TOP_P_BUCKETS];
                if dense {
                    for &e in probs.iter() {
                        hist[top_p_bucket(e)] += e as f64;
                    }
                } else {
                    for &t in &idx[..m] {
                        let e = probs[t as usize];
                        hist[top_p_bucket(e)] += e as f64;
                    }
                }
                let mut cut = TOP_P_BUCKETS - 1;
                for (b, &h) in hist.iter().enumerate() {
                    if before + h >= target {
                        cut = b;
                        break;
                    }
                    before += h;
                }
                // Keep the buckets up to the cut (tokens of probability 0 never matter),
                // then put the buckets before the cut first.
                // bucket(e) <= cut  <=>  e >= the smallest float of bucket `cut`.
                let lowest = f32::from_bits(((TOP_P_BUCKETS - 1 - cut) as u32) << 20).max(f32::from_bits(1));
                let w = if dense {
                    gather_at_least(probs, lowest, idx)
                } else {
                    let mut w = 0usize;
                    for r in 0..m {
                        let t = idx[r];
                        if probs[t as usize] >= lowest {
                            idx[w] = t;
                            w += 1;
                        }
                    }
                    w
                };
                let mut first = 0usize;
                for r in 0..w {
                    if top_p_bucket(probs[idx[r] as usize]) < cut {
                        idx.swap(first, r);
                        first += 1;
                    }
                }
                lo = first;
                hi = w;
                dense = false;
                // Summed in bucket order above; recompute in token order.
                before = mass(&idx[..lo], probs);
            }
            while hi - lo > TOP_P_SORT {
                let mid = lo + (hi - lo) / 2;
                idx[lo..hi].select_nth_unstable_by(mid - lo, desc);
                let upper = mass(&idx[lo..mid], probs);
                if before + upper >= target {
                    hi = mid; // the token at `mid` has >= target before it: dropped
                } else {
                    lo = mid; // ... or kept, with everything above it
                    before += upper;
                }
            }
            idx[lo..hi].sort_unstable_by(desc);
            let mut kept = lo;
            for &t in &idx[lo..hi] {
                if kept > 0 && before >= target {
                    break;
                }
                before += probs[t as usize] as f64;
                kept += 1;
            }
            m = kept.max(1);
            total = mass(&idx[..m], probs);
        }

        // 5. min-p: keep p_i >= min_p * p_max, i.e. exp(l_i - l_max) >= min_p (the max, at
        // exactly 1, is always kept since min_p <= 1).
        if p.min_p > 0.0 && (dense || m > 1) {
            let kept = if dense {
                dense = false;
                gather_at_least(probs, p.min_p, idx)
            } else {
                let mut kept = 0usize;
                for j in 0..m {
                    let t = idx[j];
                    if probs[t as usize] >= p.min_p {
                        idx[kept] = t;
                        kept += 1;
                    }
                }
                kept
            };
            total = idx[..kept].iter().map(|&t| probs[t as usize] as f64).sum();
            m = kept.max(1);
        }
        debug_assert!(!dense);

        // 6. draw.
        if m == 1 {
            return idx[0];
        }
        let r = rng.next_f64() * total;
        let mut cum = 0.0f64;
        let mut last = idx[0];
        for &t in &idx[..m] {
            let e = probs[t as usize] as f64;
            if e > 0.0 {
                cum += e;
                last = t;
                if r < cum {
                    return t;
                }
            }
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, ..SamplingParams::default() }
    }

    /// Deterministic pseudo-random logits.
    fn logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Xoshiro256::new(seed);
        (0..n).map(|_| (rng.next_f64() * 20.0 - 10.0) as f32).collect()
    }

    fn argmax_ref(l: &[f32]) -> u32 {
        let mut best = 0;
        for i in 1..l.len() {
            if l[i] > l[best] {
                best = i;
            }
        }
        best as u32
    }

    #[test]
    fn xoshiro_reference_values() {
        // xoshiro256** with state [1, 2, 3, 4] (reference implementation's first outputs).
        let mut r = Xoshiro256 { s: [1, 2, 3, 4] };
        assert_eq!(r.next_u64(), 11520);
        assert_eq!(r.next_u64(), 0);
        assert_eq!(r.next_u64(), 1509978240);
        assert_eq!(r.next_u64(), 1215971899390074240);
        let mut a = Xoshiro256::new(7);
        let mut b = Xoshiro256::new(7);
        for _ in 0..100 {
            let x = a.next_f64();
            assert!((0.0..1.0).contains(&x));
            assert_eq!(x, b.next_f64());
        }
    }

    #[test]
    fn greedy_is_argmax_lowest_tie() {
        let mut s = Sampler::new(SamplingParams::greedy(), 6).unwrap();
        assert_eq!(s.sample(&[0.0, 3.0, -1.0, 3.0, 2.0, 1.0], &[], 0), 1);
        assert_eq!(s.sample(&[5.0, 5.0, 5.0, 5.0, 5.0, 5.0], &[], 0), 0);
        for seed in 0..20 {
            let l = logits(1000, seed);
            let mut s = Sampler::new(SamplingParams::greedy(), 1000).unwrap();
            assert_eq!(s.sample(&l, &[], 0), argmax_ref(&l));
        }
    }

    #[test]
    fn top_k_one_and_tiny_top_p_equal_greedy() {
        for seed in 0..20 {
            let l = logits(5000, seed);
            let want = argmax_ref(&l);
            let mut k1 = Sampler::new(SamplingParams { top_k: 1, seed, ..params(1.0) }, 5000).unwrap();
            let mut p0 = Sampler::new(SamplingParams { top_p: 1e-6, seed, ..params(1.5) }, 5000).unwrap();
            let mut minp = Sampler::new(SamplingParams { min_p: 1.0, seed, ..params(1.0) }, 5000).unwrap();
            for _ in 0..5 {
                assert_eq!(k1.sample(&l, &[], 0), want);
                assert_eq!(p0.sample(&l, &[], 0), want);
                assert_eq!(minp.sample(&l, &[], 0), want);
            }
        }
    }

    #[test]
    fn seed_determinism() {
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.01,
            repetition_penalty: 1.1,
            frequency_penalty: 0.2,
            presence_penalty: 0.1,
            seed: 1234,
        };
        let l = logits(3000, 99);
        let run = |p: SamplingParams| {
            let mut s = Sampler::new(p, 3000).unwrap();
            let mut hist = vec![];
            for _ in 0..50 {
                let t = s.sample(&l, &hist, 0);
                hist.push(t);
            }
            hist
        };
        let a = run(p);
        assert_eq!(a, run(p));
        let other = run(SamplingParams { seed: 4321, ..p });
        assert_ne!(a, other);

        // reset() replays the same sequence.
        let mut s = Sampler::new(SamplingParams { seed: 5, ..params(1.0) }, 3000).unwrap();
        let first: Vec<u32> = (0..20).map(|_| s.sample(&l, &[], 0)).collect();
        s.reset(5);
        let second: Vec<u32> = (0..20).map(|_| s.sample(&l, &[], 0)).collect();
        assert_eq!(first, second);
    }

    fn frequencies(p: SamplingParams, l: &[f32], draws: usize) -> Vec<f64> {
        let mut s = Sampler::new(p, l.len()).unwrap();
        let mut counts = vec![0usize; l.len()];
        for _ in 0..draws {
            counts[s.sample(l, &[], 0) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    #[test]
    fn distribution_three_tokens() {
        let l = [0.2f32.ln(), 0.3f32.ln(), 0.5f32.ln()];
        let f = frequencies(SamplingParams { seed: 42, ..params(1.0) }, &l, 200_000);
        for (got, want) in f.iter().zip([0.2, 0.3, 0.5]) {
            assert!((got - want).abs() < 0.005, "{f:?}");
        }
        // Temperature 2 flattens: p ~ sqrt(p).
        let z: f64 = [0.2f64, 0.3, 0.5].iter().map(|x| x.sqrt()).sum();
        let f = frequencies(SamplingParams { seed: 1, ..params(2.0) }, &l, 200_000);
        for (got, want) in f.iter().zip([0.2f64, 0.3, 0.5]) {
            assert!((got - want.sqrt() / z).abs() < 0.005, "{f:?}");
        }
        // top_k 2 renormalizes over {1, 2}.
        let f = frequencies(SamplingParams { top_k: 2, seed: 3, ..params(1.0) }, &l, 200_000);
        assert_eq!(f[0], 0.0);
        assert!((f[1] - 0.375).abs() < 0.005, "{f:?}");
        // top_p 0.6: mass before token 1 is 0.5 < 0.6 -> keep {2, 1}; before token 0 is 0.8.
        let f = frequencies(SamplingParams { top_p: 0.6, seed: 4, ..params(1.0) }, &l, 200_000);
        assert_eq!(f[0], 0.0);
        assert!((f[1] - 0.375).abs() < 0.005, "{f:?}");
        // top_p 0.5 keeps only the 0.5 token.
        let f = frequencies(SamplingParams { top_p: 0.5, seed: 4, ..params(1.0) }, &l, 10_000);
        assert_eq!(f[2], 1.0);
        // min_p 0.5: 0.2 < 0.25 dropped, 0.3 kept.
        let f = frequencies(SamplingParams { min_p: 0.5, seed: 5, ..params(1.0) }, &l, 200_000);
        assert_eq!(f[0], 0.0);
        assert!((f[1] - 0.375).abs() < 0.005, "{f:?}");
    }

    #[test]
    fn top_p_partial_selection_matches_full_sort() {
        // Large vocab: exercises the partial-selection path; compare the support with a
        // direct computation.
        let n = 20_000;
        let l: Vec<f32> = logits(n, 8).iter().map(|v| v * 0.2).collect();
        let top_p = 0.3f32;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        let max = l[order[0]];
        let total: f64 = l.iter().map(|&v| exp_nonpos(v - max) as f64).sum();
        let mut cum = 0.0;
        let mut support = std::collections::HashSet::new();
        for &t in &order {
            if !support.is_empty() && cum >= top_p as f64 * total {
                break;
            }
            cum += exp_nonpos(l[t] - max) as f64;
            support.insert(t as u32);
        }
        assert!(support.len() > 4 * TOP_P_SORT, "test must exercise the bisection");
        let mut s = Sampler::new(SamplingParams { top_p, seed: 9, ..params(1.0) }, n).unwrap();
        for _ in 0..2000 {
            let t = s.sample(&l, &[], 0);
            assert!(support.contains(&t), "token {t} outside the nucleus");
        }
    }

    #[test]
    fn exp_nonpos_accuracy() {
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-0.0), 1.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-87.5), 0.0);
        assert_eq!(exp_nonpos(-1e30), 0.0);
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_nonpos(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_37;
        }
        assert!(worst < 3e-7, "max relative error {worst}");
    }

    /// The support of top-k then top-p, computed by sorting everything.
    fn nucleus(l: &[f32], top_k: usize, top_p: f32) -> std::collections::HashSet<u32> {
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        if top_k > 0 {
            let thr = l[order[top_k - 1]];
            order.retain(|&t| l[t] >= thr);
        }
        let max = l[order[0]];
        let total: f64 = order.iter().map(|&t| exp_nonpos(l[t] - max) as f64).sum();
        let mut cum = 0.0;
        let mut support = std::collections::HashSet::new();
        for &t in &order {
            if !support.is_empty() && cum >= top_p as f64 * total {
                break;
            }
            cum += exp_nonpos(l[t] - max) as f64;
            support.insert(t as u32);
        }
        support
    }

    #[test]
    fn top_k_then_top_p_support() {
        let n = 30_000;
        let l: Vec<f32> = logits(n, 21).iter().map(|v| v * 0.3).collect();
        for (top_k, top_p) in [(2000, 0.5f32), (5000, 0.97), (100, 0.3), (3, 0.99)] {
            let support = nucleus(&l, top_k, top_p);
            let mut s = Sampler::new(SamplingParams { top_k, top_p, seed: 3, ..params(1.0) }, n).unwrap();
            let mut seen = std::collections::HashSet::new();
            for _ in 0..3000 {
                let t = s.sample(&l, &[], 0);
                assert!(support.contains(&t), "token {t} outside ({top_k}, {top_p})");
                seen.insert(t);
            }
            if support.len() <= 3 {
                assert_eq!(seen.len(), support.len());
            }
        }
    }

    #[test]
    fn top_k_keeps_ties() {
        // Tokens 1 and 2 tie for second place: top_k = 2 keeps both (transformers semantics).
        let l = [0.0f32, 1.0, 1.0, 2.0];
        let f = frequencies(SamplingParams { top_k: 2, seed: 11, ..params(1.0) }, &l, 50_000);
        assert_eq!(f[0], 0.0);
        assert!(f[1] > 0.1 && f[2] > 0.1, "{f:?}");
    }

    #[test]
    fn logit_bias_shifts_the_row() {
        let l = [3.0f32, 2.0, 1.0, -1.0];
        let mut s = Sampler::new(SamplingParams::greedy(), 4).unwrap();
        s.set_logit_bias(&[(0, -100.0)]);
        assert_eq!(s.sample(&l, &[], 0), 1);
        s.set_logit_bias(&[(3, 4.5), (99, 1000.0)]); // the out-of-vocabulary id is ignored
        assert_eq!(s.sample(&l, &[], 0), 3);
        // Before the penalties: 3 is biased to 3.5, then its presence penalty takes 1.0 off.
        let mut p = Sampler::new(SamplingParams { presence_penalty: 1.0, ..SamplingParams::greedy() }, 4).unwrap();
        p.set_logit_bias(&[(3, 4.5)]);
        assert_eq!(p.sample(&l, &[3], 0), 0);
        // New settings drop the bias.
        s.set_params(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&l, &[], 0), 0);
        // Sampling path: -100 makes a token (all but) impossible.
        let mut s = Sampler::new(SamplingParams { seed: 9, ..params(1.0) }, 3).unwrap();
        s.set_logit_bias(&[(1, -100.0)]);
        for _ in 0..300 {
            assert_ne!(s.sample(&[0.0, 5.0, 0.0], &[], 0), 1);
        }
    }

    #[test]
    fn frequency_and_presence_penalties() {
        let l = [3.0f32, 2.0, 1.0, -1.0];
        let greedy = |f: f32, pr: f32| {
            Sampler::new(SamplingParams { frequency_penalty: f, presence_penalty: pr, ..SamplingParams::greedy() }, 4)
                .unwrap()
        };
        // Frequency: 0.6 per occurrence among the generated tokens (from index 2 on); the prompt
        // [0, 0] does not count. One 0 generated: 3.0 - 0.6 = 2.4 still wins; two: 1.8 < 2.0.
        let mut s = greedy(0.6, 0.0);
        assert_eq!(s.sample(&l, &[0, 0], 2), 0);
        assert_eq!(s.sample(&l, &[0, 0, 0], 2), 0);
        assert_eq!(s.sample(&l, &[0, 0, 0, 0], 2), 1);
        // ... unless 1 is generated too: 2.0 - 0.6 = 1.4 < 1.8, 0 wins again.
        assert_eq!(s.sample(&l, &[0, 0, 0, 1, 0], 2), 0);
        // Presence: once per distinct generated token, however often.
        let mut s = greedy(0.0, 1.5);
        assert_eq!(s.sample(&l, &[0, 0, 0, 0, 0], 4), 1);
        assert_eq!(s.sample(&l, &[0, 0, 0, 0, 0], 0), 1);
        // 0 -> 1.5, 1 -> 0.5 (once, not twice: that would be -1.0), 2 -> 1.0.
        assert_eq!(s.sample(&l, &[0, 1, 1], 0), 0);
        assert_eq!(s.sample(&[3.0, 2.0, 1.9, -1.0], &[0, 1, 1], 0), 2);
        // Negative values favour repeats; prompt_len past the history means nothing generated.
        let mut s = greedy(-1.0, -0.5);
        // 1.0 + 0.5 + 2 x 1.0 = 3.5 > 3.0.
        assert_eq!(s.sample(&l, &[2, 2], 0), 2);
        assert_eq!(s.sample(&l, &[2, 2], 5), 0);
        // After the repetition penalty (vLLM's order): token 0 (generated) 3.0 / 2 - 0.6 = 0.9,
        // token 2 (prompt only) 1.0 / 2 = 0.5, token 1 untouched 2.0 wins.
        let mut s = Sampler::new(
            SamplingParams { repetition_penalty: 2.0, frequency_penalty: 0.6, ..SamplingParams::greedy() },
            4,
        )
        .unwrap();
        assert_eq!(s.sample(&l, &[2, 0], 1), 1);
        // The sampling path sees the same processed logits: 20 - 2 - 20 x 2 = -22 against 0, so
        // token 0 (p ~ 3e-10) does not come up in 500 draws.
        let mut s =
            Sampler::new(SamplingParams { presence_penalty: 2.0, frequency_penalty: 2.0, seed: 4, ..params(1.0) }, 2)
                .unwrap();
        for _ in 0..500 {
            assert_eq!(s.sample(&[20.0, 0.0], &[0; 20], 0), 1);
        }
        // Validation names the field.
        for (p, name) in [
            (SamplingParams { frequency_penalty: 2.5, ..SamplingParams::default() }, "frequency_penalty"),
            (SamplingParams { presence_penalty: f32::NAN, ..SamplingParams::default() }, "presence_penalty"),
        ] {
            let e = Sampler::new(p, 4).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn repetition_penalty_effect() {
        // Positive logit divided, negative multiplied (transformers).
        let l = [2.0f32, 1.5, -0.5, -3.0];
        let p = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(p, 4).unwrap();
        assert_eq!(s.sample(&l, &[], 0), 0);
        // 2.0 / 2 = 1.0 < 1.5 -> token 1 wins; duplicates count once.
        assert_eq!(s.sample(&l, &[0, 0, 0], 0), 1);
        assert_eq!(s.sample(&l, &[0, 1], 0), 0);
        // Heavier penalty: 2.0 / 10 = 0.2 still beats 1.5 / 10 = 0.15 and -0.5.
        let p3 = SamplingParams { repetition_penalty: 10.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(p3, 4).unwrap();
        assert_eq!(s.sample(&l, &[0, 1], 0), 0);
        // Negative logits are multiplied: -1.0 * 2 = -2.0 < -1.5.
        let neg = [-1.0f32, -1.5, -4.0, -3.0];
        let mut s2 = Sampler::new(p, 4).unwrap();
        assert_eq!(s2.sample(&neg, &[], 0), 0);
        assert_eq!(s2.sample(&neg, &[0], 0), 1);
        // -1.5 * 2 = -3.0 ties token 0 (-3.0): the lowest id wins.
        let mut s3 = Sampler::new(p, 2).unwrap();
        assert_eq!(s3.sample(&[-3.0, -1.5], &[1], 0), 0);
        // Out-of-range history ids are ignored; bits are cleared between calls.
        assert_eq!(s.sample(&l, &[99, u32::MAX], 0), 0);
        // Sampling path: a heavily penalized token almost never appears.
        let l = [30.0f32, 30.0];
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1e6, seed: 2, ..params(1.0) }, 2).unwrap();
        for _ in 0..1000 {
            assert_eq!(s.sample(&l, &[0], 0), 1);
        }
    }

    #[test]
    fn nan_and_inf_do_not_panic() {
        let all = [
            SamplingParams::greedy(),
            params(1.0),
            SamplingParams { top_k: 2, top_p: 0.9, min_p: 0.1, repetition_penalty: 1.3, ..params(0.7) },
        ];
        for p in all {
            let mut s = Sampler::new(p, 4).unwrap();
            assert_eq!(s.sample(&[f32::NAN, 30.0, f32::NAN, 0.5], &[3], 0), 1);
            assert_eq!(s.sample(&[f32::NAN; 4], &[0], 0), 0);
            assert_eq!(s.sample(&[f32::NEG_INFINITY; 4], &[], 0), 0);
            assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0, f32::INFINITY], &[], 0), 1);
            assert_eq!(s.sample(&[], &[], 0), 0);
            // Longer rows are cut at vocab_size, shorter ones limit the candidates.
            assert!(s.sample(&[0.0, 0.0, 0.0, 0.0, 100.0], &[], 0) < 4);
            assert!(s.sample(&[0.0, 0.0], &[], 0) < 2);
        }
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases = [
            (SamplingParams { temperature: -1.0, ..SamplingParams::default() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..SamplingParams::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..SamplingParams::default() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..SamplingParams::default() }, "top_p"),
            (SamplingParams { min_p: -0.1, ..SamplingParams::default() }, "min_p"),
            (SamplingParams { min_p: f32::NAN, ..SamplingParams::default() }, "min_p"),
            (SamplingParams { repetition_penalty: 0.0, ..SamplingParams::default() }, "repetition_penalty"),
        ];
        for (p, field) in cases {
            let err = p.validate().unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
            assert!(err.to_string().contains(field), "{err}");
            assert!(Sampler::new(p, 10).is_err());
        }
        assert!(SamplingParams::default().validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
        let mut s = Sampler::new(SamplingParams::default(), 10).unwrap();
        assert!(s.set_params(SamplingParams { top_p: 2.0, ..SamplingParams::default() }).is_err());
    }

    #[test]
    fn from_generation_config_follows_hf_defaults() {
        let gc = GenerationConfig::default();
        assert_eq!(SamplingParams::from_generation_config(&gc), SamplingParams::greedy());
        let gc = GenerationConfig {
            do_sample: Some(false),
            temperature: Some(0.6),
            repetition_penalty: Some(1.2),
            ..GenerationConfig::default()
        };
        let p = SamplingParams::from_generation_config(&gc);
        assert!(p.is_greedy());
        assert_eq!(p.repetition_penalty, 1.2);
        // 2B-4T's generation_config: do_sample, temperature 0.6, top_p 0.9; top_k -> 50.
        let gc = GenerationConfig {
            do_sample: Some(true),
            temperature: Some(0.6),
            top_p: Some(0.9),
            ..GenerationConfig::default()
        };
        let p = SamplingParams::from_generation_config(&gc);
        assert_eq!(p, SamplingParams { temperature: 0.6, top_k: 50, top_p: 0.9, ..SamplingParams::default() });
        p.validate().unwrap();
    }
}
