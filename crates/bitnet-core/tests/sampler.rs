//! `Sampler::sample` and a JSON-constrained step must not allocate: checked with a counting global
//! allocator, per thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bitnet_core::sampler::{Sampler, SamplingParams};

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> usize {
    ALLOCS.with(|c| c.get())
}

/// Deterministic logits shaped like a language model's: a few large values over noise.
fn fake_logits(n: usize, step: u64) -> Vec<f32> {
    let mut x = 0x1234_5678_9abc_def0u64 ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let noise = (x >> 40) as f32 / (1u64 << 24) as f32 * 6.0 - 3.0;
            if i % 997 == (step as usize % 997) {
                noise + 12.0
            } else {
                noise
            }
        })
        .collect()
}

#[test]
fn sample_makes_no_heap_allocation() {
    const VOCAB: usize = 128_256;
    let settings = [
        SamplingParams::greedy(),
        SamplingParams { repetition_penalty: 1.3, ..SamplingParams::greedy() },
        SamplingParams::default(),
        SamplingParams { temperature: 0.6, top_k: 50, top_p: 0.9, seed: 7, ..SamplingParams::default() },
        SamplingParams { temperature: 1.2, top_p: 0.95, seed: 8, ..SamplingParams::default() },
        SamplingParams {
            temperature: 2.0,
            top_p: 0.999,
            min_p: 0.001,
            repetition_penalty: 1.1,
            seed: 9,
            ..SamplingParams::default()
        },
        SamplingParams { top_k: 1, ..SamplingParams::default() },
        SamplingParams { frequency_penalty: 0.5, presence_penalty: 0.7, ..SamplingParams::greedy() },
        SamplingParams {
            frequency_penalty: -0.3,
            presence_penalty: 1.5,
            top_p: 0.9,
            seed: 3,
            ..SamplingParams::default()
        },
    ];
    let rows: Vec<Vec<f32>> = (0..8).map(|s| fake_logits(VOCAB, s)).collect();
    let mut nan_row = rows[0].clone();
    for v in nan_row.iter_mut().step_by(3) {
        *v = f32::NAN;
    }
    let mut history: Vec<u32> = Vec::with_capacity(1024);
    history.extend((0..200u32).map(|i| i * 641 % VOCAB as u32));

    for (p, bias) in settings.iter().flat_map(|&p| [(p, false), (p, true)]) {
        let mut sampler = Sampler::new(p, VOCAB).unwrap();
        if bias {
            // set before the count: the bias allocates once per request, sampling with it never
            sampler.set_logit_bias(&[(5, 2.0), (997, -100.0), (12_000, 7.5)]);
        }
        let before = allocs();
        let mut fastest = f64::INFINITY;
        for step in 0..64 {
            let row = &rows[step % rows.len()];
            let t0 = std::time::Instant::now();
            // The first 100 tokens of the history are the prompt.
            let tok = sampler.sample(row, &history, 100);
            fastest = fastest.min(t0.elapsed().as_secs_f64());
            assert!((tok as usize) < VOCAB);
            let tok = sampler.sample(&nan_row, &history, 100);
            assert!((tok as usize) < VOCAB && !nan_row[tok as usize].is_nan());
            if history.len() < history.capacity() {
                history.push(tok);
            }
        }
        sampler.reset(123);
        let n = allocs() - before;
        // Informational (the machine may be shared): the fastest of 64 calls.
        eprintln!("{p:?}: {:.1} us/sample (fastest)", fastest * 1e6);
        assert_eq!(n, 0, "{n} allocations in 128 samples with {p:?}, bias {bias}");
    }
}

/// `set_allowed` restricts every draw to the listed tokens (greedy and sampled, with a bias
/// too), without allocating once set; `None` lifts it.
#[test]
fn allowed_tokens_restrict_the_draw() {
    let v = 1000;
    let logits = fake_logits(v, 3);
    let allowed: Vec<u32> = vec![5, 77, 640, 999];
    for params in [SamplingParams::greedy(), SamplingParams { temperature: 1.5, seed: 9, ..Default::default() }] {
        let mut s = Sampler::new(params, v).unwrap();
        s.set_logit_bias(&[(77, 50.0)]);
        s.set_allowed(Some(&allowed));
        let before = allocs();
        for _ in 0..50 {
            let t = s.sample(&logits, &[], 0);
            assert!(allowed.contains(&t), "{t} is not allowed");
        }
        assert_eq!(allocs(), before, "sampling with a mask allocates nothing");
        s.set_allowed(None);
        s.set_logit_bias(&[]);
        let free: Vec<u32> = (0..20).map(|_| s.sample(&logits, &[], 0)).collect();
        if params.is_greedy() {
            let best = (0..v).max_by(|&a, &b| logits[a].partial_cmp(&logits[b]).unwrap()).unwrap() as u32;
            assert!(free.iter().all(|&t| t == best));
        }
    }
}

/// A constrained sequence's steps (`JsonRun::allowed`, `advance`) allocate nothing once its
/// buffers have grown: JSON mode, a schema and a regex, over a long array whose items repeat one
/// state.
#[test]
fn json_constraint_steps_make_no_heap_allocation() {
    use bitnet_core::json_mode::{JsonRun, JsonSpec, JsonVocab, Shape};
    use bitnet_core::json_schema::pattern::Pattern;
    use bitnet_core::json_schema::JsonSchema;
    use std::sync::Arc;

    let pieces: [&[u8]; 12] = [b"{", b"}", b"[", b"]", b"\"a\"", b":", b",", b" ", b"1", b"7", b"\"x\"", b", 7"];
    let vocab =
        Arc::new(JsonVocab::from_tokens(pieces.len(), pieces.iter().enumerate().map(|(i, p)| (i as u32, p.to_vec()))));
    let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9}}}, "required": ["a"]});
    let schema = Arc::new(JsonSchema::compile(&schema).unwrap());
    let regex = Arc::new(Pattern::compile_full(r#"\{"a": \[1(, 7)*\]\}"#).unwrap());
    // {"a": [1, 7, 7, ...]}
    let mut doc: Vec<u32> = vec![0, 4, 5, 7, 2, 8];
    doc.extend(std::iter::repeat_n(11, 200));
    doc.extend([3, 1]);
    let specs = [
        ("JSON mode", JsonSpec::json(vocab.clone(), None)),
        ("schema", JsonSpec::json(vocab.clone(), Some(schema))),
        ("regex", JsonSpec { vocab: vocab.clone(), shape: Shape::Regex(regex), eos: vec![] }),
    ];
    for (what, spec) in specs {
        let mut run = JsonRun::new(&spec);
        for (i, &tok) in doc.iter().enumerate() {
            let before = allocs();
            assert!(run.allowed().contains(&tok), "step {i}");
            assert!(run.advance(tok), "step {i}");
            // the buffers grow in the first steps; from the array's tenth item on, none
            if i > 16 {
                assert_eq!(allocs(), before, "step {i} allocated ({what})");
            }
        }
        assert!(run.is_complete());
    }
}
