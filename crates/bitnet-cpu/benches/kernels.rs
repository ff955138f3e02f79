//! Kernel benchmark: `cargo bench -p bitnet-cpu --bench kernels [-- FILTER...]`.
//!
//! For every available level and every benchmarked op case (the table in
//! `bitnet_cpu::kernels::cases`, shared with the tests), with 1 and 2 threads: time per matmul,
//! GB/s of packed weight bytes, GMAC/s. A memory read-bandwidth probe (sum of a 1 GB buffer) runs
//! in the same process for the roofline. Decode (n_tok = 1) cycles through enough copies of the
//! matrix to exceed the last-level cache, so weights come from DRAM as in a real decode step
//! (`src = dram`), and is timed again on one cache-resident copy (`src = cache`: the kernel's
//! compute ceiling). Prefill (n_tok = 128) is compute bound and uses one copy.
//! The dense section times the LM head GEMV (bf16 / f32 / f16, 128256 x 2560), the int8, 4-bit and 2-bit heads;
//! the attention section the attention primitives per level (one kv head, 1024 keys; from
//! cache and, K/V copies cycled, from DRAM).
//!
//! FILTER words (any mix): level names (`generic`, `avx2`, `avxvnni`, `avx512vnni`, `avx512vbmi`), case names
//! (`qkv`, `o`, `gate_up`, `down`), `decode` / `prefill` (n_tok 1 / > 1), `dense`, `ternary`, `attn`,
//! `t1` / `t2` (thread counts), `cache` / `dram` (attention), `quick` (shorter runs).

use std::hint::black_box;
use std::time::{Duration, Instant};

use bitnet_cpu::dense::{self, DenseRef};
use bitnet_cpu::kernels::cases::{random_acts, random_codes, random_scales, Rng, CASES};
use bitnet_cpu::kernels::{self, Int2Matrix, Int4Matrix, Int8Matrix, KernelLevel, QuantActs, TernaryMatrix};
use bitnet_cpu::ThreadPool;

/// Bytes of weights cycled through in decode runs (well above the L3 cache: a Xeon VM here
/// reported 480 MB of it).
const STREAM_BYTES: usize = 1 << 30;

struct Filter {
    words: Vec<String>,
    quick: bool,
}

impl Filter {
    fn from_args() -> Filter {
        let words: Vec<String> =
            std::env::args().skip(1).filter(|a| !a.starts_with('-')).map(|a| a.to_ascii_lowercase()).collect();
        let quick = words.iter().any(|w| w == "quick");
        Filter { words: words.into_iter().filter(|w| w != "quick").collect(), quick }
    }
    /// True when no word of `group` is given, or `name` is one of the given words.
    fn allows(&self, group: &[&str], name: &str) -> bool {
        let given: Vec<&String> = self.words.iter().filter(|w| group.contains(&w.as_str())).collect();
        given.is_empty() || given.iter().any(|w| *w == name)
    }
    fn budget(&self) -> Duration {
        Duration::from_millis(if self.quick { 150 } else { 600 })
    }
}

/// Runs `f` until `budget` has passed (at least `min_iters` times); returns the median and best
/// time per call.
fn time_it(budget: Duration, min_iters: usize, mut f: impl FnMut(usize)) -> (f64, f64) {
    f(0); // warm up
    let mut samples = Vec::new();
    let start = Instant::now();
    let mut i = 1;
    while samples.len() < min_iters || (start.elapsed() < budget && samples.len() < 100_000) {
        let t = Instant::now();
        f(i);
        samples.push(t.elapsed().as_secs_f64());
        i += 1;
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (samples[samples.len() / 2], samples[0])
}

/// Read bandwidth of `pool` summing `buf` (1 GiB): the best of 3 whole passes, and the median and
/// best over passes cut in `chunk`-byte pieces (each piece split across the threads), which
/// resist preemption on a shared machine the way the kernels' per-call timings do. With
/// `two_streams`, each thread reads its part as two interleaved halves (two streams far apart).
fn read_bandwidth(pool: &ThreadPool, buf: &[u64], chunk: usize, two_streams: bool) -> (f64, f64, f64) {
    let sum_range = |part: &[u64]| {
        pool.run(|tid, nt| {
            let r = bitnet_cpu::split_range(part.len(), nt, tid, 64);
            let p = &part[r];
            if two_streams {
                let (a, b) = p.split_at(p.len() / 2 / 16 * 16);
                black_box(sum2_u64(a, b));
            } else {
                black_box(sum_u64(p));
            }
        })
    };
    let mut full = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        sum_range(buf);
        full = full.max((buf.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    let mut v = Vec::new();
    for _ in 0..2 {
        for part in buf.chunks_exact(chunk / 8) {
            let t = Instant::now();
            sum_range(part);
            v.push(chunk as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (full, v[v.len() / 2], v[v.len() - 1])
}

/// Sums two slices read side by side (two streams), 128 bytes of each in turn.
fn sum2_u64(a: &[u64], b: &[u64]) -> u64 {
    let mut acc = [0u64; 16];
    for (ca, cb) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for k in 0..16 {
            acc[k] = acc[k].wrapping_add(ca[k]).wrapping_add(cb[k]);
        }
    }
    let n = a.len().min(b.len()) / 16 * 16;
    let rest = a[n..].iter().chain(&b[n..]);
    acc.iter().chain(rest).fold(0u64, |x, &y| x.wrapping_add(y))
}

/// `"m%/b%"` from two fractions.
fn pct(m: f64, b: f64) -> String {
    format!("{:.0}/{:.0}%", 100.0 * m, 100.0 * b)
}

fn sum_u64(v: &[u64]) -> u64 {
    let mut acc = [0u64; 16];
    let chunks = v.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..16 {
            acc[k] = acc[k].wrapping_add(c[k]);
        }
    }
    acc.iter().chain(rest).fold(0u64, |a, &b| a.wrapping_add(b))
}

fn main() {
    let filter = Filter::from_args();
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let levels = KernelLevel::available();
    let thread_names = ["t1", "t2"];
    println!("bitnet-cpu kernel benchmark");
    println!("available levels: {}", levels.iter().map(|l| l.name()).collect::<Vec<_>>().join(", "));
    println!(
        "detected: {}; cpus: {}",
        KernelLevel::detect().name(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Memory read bandwidth probe.
    // on huge pages where the OS allows, as the packed weights are (`bitnet_cpu::mem`)
    let mut buf = bitnet_cpu::mem::advised(vec![0u64; 1 << 27]);
    buf.iter_mut().enumerate().for_each(|(i, v)| *v = i as u64);
    // Per thread count: (median, best) piece bandwidth, the larger of 1 and 2 streams.
    let mut bw = [(0f64, 0f64); 2];
    for (i, pool) in pools.iter().enumerate() {
        for two in [false, true] {
            let (full, med, best) = read_bandwidth(pool, &buf, 4 << 20, two);
            bw[i] = (bw[i].0.max(med), bw[i].1.max(best));
            println!(
                "memory read bandwidth, {} thread(s), {} per thread: {full:.1} GB/s whole 1 GiB pass (best of 3); in 4 MiB pieces: median {med:.1}, best {best:.1} GB/s",
                i + 1,
                if two { "2 streams" } else { "1 stream" },
            );
        }
    }
    println!(
        "(%bw: kernel GB/s over the larger piece bandwidth above with the same thread count, median/median and best/best; \
         GB/s counts packed weight bytes, GMAC/s rows x cols x n_tok; the machine is shared, so medians are noisy)"
    );
    drop(buf);

    if filter.allows(&["ternary", "dense", "attn"], "ternary") {
        println!();
        println!(
            "{:<11} {:<8} {:>11} {:>5} {:>5} {:>3} {:>10} {:>10} {:>15} {:>15} {:>11}",
            "level",
            "case",
            "shape",
            "n_tok",
            "src",
            "thr",
            "median_us",
            "best_us",
            "GB/s med/best",
            "GMAC/s med/best",
            "%bw m/b"
        );
        let mut rng = Rng::new(42);
        for case in CASES.iter().filter(|c| !c.bench_toks.is_empty()) {
            if !filter.allows(&CASES.iter().map(|c| c.name).collect::<Vec<_>>(), case.name) {
                continue;
            }
            let codes = random_codes(&mut rng, case.rows, case.cols);
            let scales = random_scales(&mut rng, case.rows);
            for &level in &levels {
                if !filter.allows(&KernelLevel::ALL.map(|l| l.name()), level.name()) {
                    continue;
                }
                let m = TernaryMatrix::from_codes(&codes, case.rows, case.cols, scales.clone(), level);
                for &n_tok in case.bench_toks {
                    let phase = if n_tok == 1 { "decode" } else { "prefill" };
                    if !filter.allows(&["decode", "prefill"], phase) {
                        continue;
                    }
                    // Decode and batch steps (n_tok <= 32) stream through copies (weights from DRAM,
                    // as in a real step), and again with one cache-resident copy (the kernel's
                    // compute ceiling); prefill reuses one copy (compute bound).
                    let streamed = STREAM_BYTES.div_ceil(m.nbytes()).max(2);
                    let sources: &[(&str, usize)] =
                        if n_tok <= 32 { &[("dram", streamed), ("cache", 1)] } else { &[("cache", 1)] };
                    let x = random_acts(&mut rng, n_tok, case.cols);
                    let mut out = vec![0f32; n_tok * case.rows];
                    for &(src, copies) in sources {
                        let mats: Vec<TernaryMatrix> = (0..copies).map(|_| m.clone()).collect();
                        for (ti, pool) in pools.iter().enumerate() {
                            if !filter.allows(&thread_names, thread_names[ti]) {
                                continue;
                            }
                            let (med, best) = time_it(filter.budget(), 5, |i| {
                                kernels::matmul(pool, &mats[i % copies], &x, &mut out, case.rows);
                            });
                            black_box(&out);
                            let gb = |t: f64| m.nbytes() as f64 / t / 1e9;
                            let gmac = |t: f64| (case.rows * case.cols * n_tok) as f64 / t / 1e9;
                            let pct = if src == "dram" {
                                format!("{:>4.0}/{:<4.0}%", 100.0 * gb(med) / bw[ti].0, 100.0 * gb(best) / bw[ti].1)
                            } else {
                                format!("{:>11}", "-")
                            };
                            println!(
                                "{:<11} {:<8} {:>11} {:>5} {:>5} {:>3} {:>10.1} {:>10.1} {:>15} {:>15} {pct}",
                                level.name(),
                                case.name,
                                format!("{}x{}", case.rows, case.cols),
                                n_tok,
                                src,
                                ti + 1,
                                med * 1e6,
                                best * 1e6,
                                format!("{:.1}/{:.1}", gb(med), gb(best)),
                                format!("{:.1}/{:.1}", gmac(med), gmac(best)),
                            );
                        }
                    }
                }
            }
        }
    }

    if filter.allows(&["ternary", "dense", "attn"], "dense") {
        bench_dense(&filter, &pools, &bw);
    }
    if filter.allows(&["ternary", "dense", "attn"], "attn") {
        bench_attn(&filter);
    }
}

/// Attention primitives of one kv head of 2B-4T (head_dim 128, 4 query heads per kv head) over
/// `keys` cached positions, one thread: scores, softmax, V sum, as `bitnet-core` runs an item
/// (chunks of 64 keys, query rows in groups of 4). Decode: 1, 2 or 4 query rows of one token (a
/// kv head split over 4, 2 or 1 items); prefill tile: 32 rows (8 tokens). f32, f16 and int8 K/V
/// (int8: codes and scales, `KvElem::row_len` bytes a row).
fn bench_attn(filter: &Filter) {
    use bitnet_cpu::attn::{AttnOps, KeyRows, KvElem, KEY_CHUNK, KEY_TILE, MAX_ROWS};
    println!();
    println!(
        "{:<12} {:<5} {:>5} {:>6} {:>5} {:>10} {:>10} {:>16} {:>14}",
        "attention", "kv", "rows", "keys", "src", "median_us", "best_us", "GFLOP/s med/best", "KV GB/s m/b"
    );
    const HD: usize = 128;
    /// V rows prefetched this many keys ahead, as `bitnet-core`'s attention does.
    const V_AHEAD: usize = 8;
    /// `kt`: K as transposed tiles (`[keys / 16][HD][16]`), `v`: V rows `[keys][HD]`.
    #[allow(clippy::too_many_arguments)]
    fn run<T: KvElem>(
        ops: AttnOps,
        kt: &[T],
        v: &[T],
        q: &[f32],
        rows: usize,
        keys: usize,
        sc: &mut [f32],
        out: &mut [f32],
    ) {
        // Stack arrays, as in `bitnet-core`: nothing allocated inside the timed loop.
        const TILES: usize = KEY_CHUNK / KEY_TILE;
        let row = T::row_len(HD);
        for j0 in (0..keys).step_by(KEY_CHUNK) {
            let (mut tiles, mut ahead): ([&[T]; TILES], [&[T]; TILES]) = ([&[]; TILES], [&[]; TILES]);
            let nt = ((j0 + KEY_CHUNK).min(keys) - j0) / KEY_TILE;
            let na = (keys.saturating_sub(j0 + KEY_CHUNK) / KEY_TILE).min(TILES);
            for (t, tile) in tiles[..nt].iter_mut().enumerate() {
                *tile = &kt[(j0 + t * KEY_TILE) * row..][..row * KEY_TILE];
            }
            for (t, a) in ahead[..na].iter_mut().enumerate() {
                *a = &kt[(j0 + KEY_CHUNK + t * KEY_TILE) * row..][..row * KEY_TILE];
            }
            for r0 in (0..rows).step_by(MAX_ROWS) {
                let n = MAX_ROWS.min(rows - r0);
                let mut qs: [&[f32]; MAX_ROWS] = [&[]; MAX_ROWS];
                for (r, qr) in qs[..n].iter_mut().enumerate() {
                    *qr = &q[(r0 + r) * HD..][..HD];
                }
                let ah = if r0 == 0 { &ahead[..na.min(nt)] } else { &[] };
                ops.dots(&qs[..n], &tiles[..nt], ah, 0.088, &mut sc[r0 * keys + j0..], keys);
            }
        }
        for r in 0..rows {
            ops.softmax(&mut sc[r * keys..(r + 1) * keys]);
        }
        out.fill(0.0);
        for j0 in (0..keys).step_by(KEY_CHUNK) {
            let (mut vs, mut ahead) = (KeyRows::default(), KeyRows::default());
            (j0..(j0 + KEY_CHUNK).min(keys)).for_each(|j| vs.push(&v[j * row..(j + 1) * row]));
            (j0 + V_AHEAD..(j0 + KEY_CHUNK + V_AHEAD).min(keys)).for_each(|j| ahead.push(&v[j * row..(j + 1) * row]));
            for (g, chunk) in out[..rows * HD].chunks_mut(MAX_ROWS * HD).enumerate() {
                let mut outs: [&mut [f32]; MAX_ROWS] = Default::default();
                let mut n = 0;
                for (o, row) in outs.iter_mut().zip(chunk.chunks_mut(HD)) {
                    *o = row;
                    n += 1;
                }
                let ah = if g == 0 { &ahead[..] } else { &[] };
                ops.pv(&mut outs[..n], &vs, ah, &sc[g * MAX_ROWS * keys + j0..], keys);
            }
        }
    }
    let mut rng = Rng::new(5);
    let keys = 1024;
    // One kv head's K (transposed in tiles of 16 keys, as the KV cache holds it) and V, random
    // either way; `dram` cycles through copies filling STREAM_BYTES per element type (each
    // decode step finds a layer's K/V evicted by the weights streamed since), `cache` reads
    // copy 0 again and again.
    let kf: Vec<f32> = (0..keys * HD).map(|_| rng.unit() - 0.5).collect();
    let vf: Vec<f32> = (0..keys * HD).map(|_| rng.unit() - 0.5).collect();
    let half = |x: &Vec<f32>| -> Vec<u16> { x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect() };
    let (kh, vh) = (half(&kf), half(&vf));
    // int8: K as the cache's tiles (a key per lane), V as its rows
    let row8 = <i8 as KvElem>::row_len(HD);
    let mut kq = vec![0i8; keys * row8];
    for (j, k) in kf.chunks(HD).enumerate() {
        bitnet_cpu::attn::quantize_kv_tile_lane(
            k,
            &mut kq[j / KEY_TILE * KEY_TILE * row8..][..KEY_TILE * row8],
            j % KEY_TILE,
        );
    }
    let mut vq = vec![0i8; keys * row8];
    for (v, out) in vf.chunks(HD).zip(vq.chunks_mut(row8)) {
        bitnet_cpu::attn::quantize_kv_row(v, out);
    }
    fn copies<T: Copy>(x: &[T], bytes: usize) -> Vec<T> {
        let n = (bytes / 2 / std::mem::size_of_val(x)).max(1);
        let mut c = bitnet_cpu::mem::advised(Vec::with_capacity(n * x.len()));
        (0..n).for_each(|_| c.extend_from_slice(x));
        c
    }
    let stream = filter.allows(&["cache", "dram"], "dram");
    let bytes = if stream { STREAM_BYTES } else { 0 };
    let (kfs, vfs, khs, vhs) = (copies(&kf, bytes), copies(&vf, bytes), copies(&kh, bytes), copies(&vh, bytes));
    let (kqs, vqs) = (copies(&kq, bytes), copies(&vq, bytes));
    let q: Vec<f32> = (0..32 * HD).map(|_| rng.unit() - 0.5).collect();
    let mut sc = vec![0f32; 32 * keys];
    let mut out = vec![0f32; 32 * HD];
    for level in bitnet_cpu::dense::DenseLevel::available() {
        if !filter.allows(&["generic", "avx2", "avx512"], level.name()) {
            continue;
        }
        let ops = AttnOps::new(level);
        for rows in [1usize, 2, 4, 32] {
            for kv in ["f32", "f16", "int8"] {
                if !filter.allows(&["f32", "f16", "int8"], kv) {
                    continue;
                }
                for src in ["cache", "dram"] {
                    if !filter.allows(&["cache", "dram"], src) {
                        continue;
                    }
                    let n = keys * HD;
                    let pick = |i: usize, len: usize, n: usize| if src == "dram" { i % (len / n) * n } else { 0 };
                    let t = time_it(filter.budget(), 3, |i| match kv {
                        "f32" => {
                            let o = pick(i, kfs.len(), n);
                            run(ops, &kfs[o..o + n], &vfs[o..o + n], &q, rows, keys, &mut sc, &mut out)
                        }
                        "f16" => {
                            let o = pick(i, khs.len(), n);
                            run(ops, &khs[o..o + n], &vhs[o..o + n], &q, rows, keys, &mut sc, &mut out)
                        }
                        _ => {
                            let n = keys * row8;
                            let o = pick(i, kqs.len(), n);
                            run(ops, &kqs[o..o + n], &vqs[o..o + n], &q, rows, keys, &mut sc, &mut out)
                        }
                    });
                    // two mul+add pairs per (row, key, dim): q.k and p.v
                    let flop = (4 * rows * keys * HD) as f64;
                    let kv_bytes = (2
                        * keys
                        * match kv {
                            "f32" => 4 * HD,
                            "f16" => 2 * HD,
                            _ => row8,
                        }) as f64;
                    println!(
                        "{:<12} {:<5} {:>5} {:>6} {:>5} {:>10.1} {:>10.1} {:>16} {:>14}",
                        level.name(),
                        kv,
                        rows,
                        keys,
                        src,
                        t.0 * 1e6,
                        t.1 * 1e6,
                        format!("{:.1}/{:.1}", flop / t.0 * 1e-9, flop / t.1 * 1e-9),
                        format!("{:.1}/{:.1}", kv_bytes / t.0 * 1e-9, kv_bytes / t.1 * 1e-9)
                    );
                }
            }
        }
    }
}

/// The LM head of 2B-4T: 128256 x 2560, bandwidth bound.
fn bench_dense(filter: &Filter, pools: &[ThreadPool; 2], bw: &[(f64, f64); 2]) {
    let (rows, cols) = (128256usize, 2560usize);
    println!();
    println!(
        "{:<18} {:>5} {:>3} {:>10} {:>10} {:>15} {:>15} {:>11}",
        "LM head 128256x2560", "n_tok", "thr", "median_us", "best_us", "GB/s med/best", "GOP/s med/best", "%bw m/b"
    );
    let mut rng = Rng::new(9);
    let wf: Vec<f32> = (0..rows * cols).map(|_| rng.unit() - 0.5).collect();
    let wb: Vec<u16> = wf.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    // as the model does with a head it streams (`bitnet_cpu::mem`)
    bitnet_cpu::mem::collapse_huge_pages(wf.as_ptr() as *const u8, rows * cols * 4);
    bitnet_cpu::mem::collapse_huge_pages(wb.as_ptr() as *const u8, rows * cols * 2);
    let x: Vec<f32> = (0..32 * cols).map(|_| rng.unit() - 0.5).collect();
    let mut out = vec![0f32; 32 * rows];
    // GOP/s: 2 ops (multiply, add) per weight and token.
    let report = |name: &str, n_tok: usize, ti: usize, bytes: usize, (med, best): (f64, f64)| {
        let gb = |t: f64| bytes as f64 / t / 1e9;
        let gop = |t: f64| 2.0 * (rows * cols * n_tok) as f64 / t / 1e9;
        println!(
            "{:<18} {:>5} {:>3} {:>10.1} {:>10.1} {:>15} {:>15} {:>11}",
            name,
            n_tok,
            ti + 1,
            med * 1e6,
            best * 1e6,
            format!("{:.1}/{:.1}", gb(med), gb(best)),
            format!("{:.1}/{:.1}", gop(med), gop(best)),
            pct(gb(med) / bw[ti].0, gb(best) / bw[ti].1),
        );
    };
    // bf16 in the lossless 12-bit layout (the exact plan's head on AVX-512), also at AVX2 (strips
    // unpacked to bf16 for the bf16 kernel) beside plain bf16 there
    let packed = dense::PackedBf16::pack(&wb, rows, cols).expect("uniform weights pack");
    let (best, avx2) = (dense::DenseLevel::detect(), dense::DenseLevel::Avx2);
    let mut heads = vec![
        ("bf16 gemv", DenseRef::BF16(&wb), rows * cols * 2, best),
        ("bf16 packed gemv", DenseRef::PackedBf16(&packed), packed.nbytes(), best),
        ("f32 gemv", DenseRef::F32(&wf), rows * cols * 4, best),
    ];
    if best != avx2 && avx2.is_available() {
        heads.push(("bf16 gemv avx2", DenseRef::BF16(&wb), rows * cols * 2, avx2));
        heads.push(("bf16 packed avx2", DenseRef::PackedBf16(&packed), packed.nbytes(), avx2));
    }
    for (name, w, bytes, level) in heads {
        for (ti, pool) in pools.iter().enumerate() {
            if !filter.allows(&["t1", "t2"], ["t1", "t2"][ti]) {
                continue;
            }
            for n_tok in [1usize, 4, 32] {
                let t = time_it(filter.budget(), 3, |_| {
                    let p = bitnet_cpu::pool::SyncPtr::new(&mut out);
                    pool.run(|tid, nt| {
                        let p = p;
                        let r = bitnet_cpu::split_range(rows, nt, tid, 16);
                        // SAFETY: disjoint row ranges; out holds 32 * rows.
                        let o = unsafe { p.slice(0, 32 * rows) };
                        if n_tok == 1 {
                            dense::gemv_rows_with(level, w, cols, &x, r.clone(), &mut o[r.start..r.end]);
                        } else {
                            dense::gemm_rows_with(level, w, cols, &x, cols, n_tok, r.clone(), &mut o[r.start..], rows);
                        }
                    });
                });
                report(name, n_tok, ti, bytes, t);
            }
        }
    }
    drop(wf);
    {
        // int8 weights (per-row scales) x f32 activations: the dense kernels with an i8 widening.
        let q: Vec<i8> = wb.iter().map(|&h| (h >> 8) as i8).collect();
        let scale = vec![1e-3f32; rows];
        let w = DenseRef::I8 { q: &q, scale: &scale };
        for (ti, pool) in pools.iter().enumerate() {
            if !filter.allows(&["t1", "t2"], ["t1", "t2"][ti]) {
                continue;
            }
            for n_tok in [1usize, 4, 32] {
                let t = time_it(filter.budget(), 3, |_| {
                    let p = bitnet_cpu::pool::SyncPtr::new(&mut out);
                    pool.run(|tid, nt| {
                        let p = p;
                        let r = bitnet_cpu::split_range(rows, nt, tid, 16);
                        // SAFETY: disjoint row ranges; out holds 32 * rows.
                        let o = unsafe { p.slice(0, 32 * rows) };
                        dense::gemm_rows(w, cols, &x, cols, n_tok, r.clone(), &mut o[r.start..], rows);
                    });
                });
                report("i8w x f32 gemv", n_tok, ti, rows * cols, t);
            }
        }
    }
    // the integer heads: int8 per row (`int8` plan), 4-bit per 32 (`int4` plan) and 2-bit per 32
    // (`int2` plan), on int8 activations
    let mut xq = QuantActs::new(32, cols);
    for t in 0..32 {
        xq.quantize_row(t, &x[t * cols..(t + 1) * cols]);
    }
    for level in KernelLevel::available() {
        if !filter.allows(&KernelLevel::ALL.map(|l| l.name()), level.name()) {
            continue;
        }
        let i8m = Int8Matrix::from_dense(DenseRef::BF16(&wb), rows, cols, level);
        let i4m = Int4Matrix::from_dense(DenseRef::BF16(&wb), rows, cols, level);
        let i2m = Int2Matrix::from_dense(DenseRef::BF16(&wb), rows, cols, level);
        type Run<'a> = &'a dyn Fn(&ThreadPool, &QuantActs, &mut [f32]);
        let heads: [(&str, usize, Run<'_>); 3] = [
            ("int8", i8m.nbytes(), &|p, x, o| i8m.matmul(p, x, o, rows)),
            ("int4", i4m.nbytes(), &|p, x, o| i4m.matmul(p, x, o, rows)),
            ("int2", i2m.nbytes(), &|p, x, o| i2m.matmul(p, x, o, rows)),
        ];
        for (name, bytes, run) in heads {
            for (ti, pool) in pools.iter().enumerate() {
                if !filter.allows(&["t1", "t2"], ["t1", "t2"][ti]) {
                    continue;
                }
                for n_tok in [1usize, 4, 32] {
                    xq.set_n_tok(n_tok);
                    xq.fill_group_sums();
                    let t = time_it(filter.budget(), 3, |_| run(pool, &xq, &mut out));
                    report(&format!("{name} {}", level.name()), n_tok, ti, bytes, t);
                }
            }
        }
    }
}
