#!/usr/bin/env python3
"""Reference perplexities for `bitnet perplexity`, computed with Hugging Face transformers.

Writes fixtures/ppl/expected.json (and fixtures/ppl/tokens.txt, the token stream as ids) for
fixtures/ppl/text.txt on the tiny-gqa4-master fixture (which has a tokenizer), for
(ctx 64, stride 64) and (ctx 64, stride 32).

The convention is the one of crates/bitnet-core/src/perplexity.rs:
  - stream = [BOS] + tokenizer(text, add_special_tokens=False)
  - windows stream[start : min(start + ctx, n)] for start = 0, stride, 2*stride, ...; no window
    after the one that reaches the end of the stream
  - the first token of every window is replaced by BOS (as llama-perplexity does)
  - logits at window position j predict stream[start + j + 1]; a window scores only the targets
    stream[max(prev_end, start + 1) : end] (prev_end = end of the previous window)
  - NLL = -log_softmax(float32 logits, in float64)[target]; PPL = exp(sum NLL / count)

Run with the fixture venv (tools/README.md):
    /work/venv-fixtures/bin/python tools/make_ppl_fixture.py
Deterministic: one torch thread, TORCHDYNAMO_DISABLE=1, float32 model, eager attention.
"""

import os

os.environ["TORCHDYNAMO_DISABLE"] = "1"  # before torch is imported (see tools/make_fixtures.py)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
CASES = [(64, 64), (64, 32)]


def windows(n, ctx, stride):
    """(start, end, score_from) of every window; the same as perplexity::windows in Rust."""
    assert ctx >= 2 and 1 <= stride <= ctx and n >= 2
    out, prev_end, start = [], 0, 0
    while True:
        end = min(start + ctx, n)
        score_from = max(prev_end, start + 1)
        if score_from < end:
            out.append((start, end, score_from))
        prev_end = end
        if end == n:
            return out
        start += stride


def evaluate(logits_fn, stream, bos, ctx, stride):
    """Sum of NLLs over the windows; logits_fn(ids) returns float [T, V] logits."""
    nll, count, per_window = 0.0, 0, []
    for start, end, score_from in windows(len(stream), ctx, stride):
        ids = list(stream[start:end])
        ids[0] = bos
        logp = torch.log_softmax(logits_fn(ids).to(torch.float64), dim=-1)
        w = 0.0
        for i in range(score_from, end):
            w -= logp[i - start - 1, stream[i]].item()
        nll += w
        count += end - score_from
        per_window.append({"start": start, "end": end, "score_from": score_from, "nll": w})
    return {"ctx": ctx, "stride": stride, "nll_sum": nll, "count": count, "ppl": math.exp(nll / count),
            "windows": per_window}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "fixtures/tiny-gqa4-master"))
    ap.add_argument("--text", default=str(ROOT / "fixtures/ppl/text.txt"))
    ap.add_argument("--out", default=str(ROOT / "fixtures/ppl"))
    a = ap.parse_args()

    model_dir, text_path, out = Path(a.model), Path(a.text), Path(a.out)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.to(torch.float32)  # the embedding can stay bf16 otherwise
    model.eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    text = text_path.read_text(encoding="utf-8")
    bos = tok.bos_token_id
    assert bos is not None
    stream = [bos] + tok(text, add_special_tokens=False)["input_ids"]
    @torch.no_grad()
    def hf_logits(ids):
        logits = model(torch.tensor([ids])).logits[0]
        assert logits.dtype == torch.float32
        return logits

    # The independent float64 reference of tools/make_fixtures.py (exact int8 x ternary dots).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_fixtures import RefModel  # noqa: E402

    ref = RefModel(model_dir)
    results, exact = [], []
    for ctx, stride in CASES:
        r = evaluate(hf_logits, stream, bos, ctx, stride)
        x = evaluate(lambda ids: torch.from_numpy(ref.forward(ids)), stream, bos, ctx, stride)
        results.append(r)
        exact.append({k: x[k] for k in ("ctx", "stride", "nll_sum", "count", "ppl")}
                     | {"window_nll": [w["nll"] for w in x["windows"]]})
        flips = sum(abs(a["nll"] - b["nll"]) > 1e-3 for a, b in zip(r["windows"], x["windows"]))
        print(f"ctx {ctx} stride {stride}: PPL {r['ppl']:.6f} (float64 reference {x['ppl']:.6f}, "
              f"relative diff {r['ppl'] / x['ppl'] - 1:+.2e}; {flips} of {len(r['windows'])} windows differ by "
              f"more than 1e-3 in NLL: int8 rounding-boundary flips) over {r['count']} tokens")

    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
    (out / "tokens.txt").write_text(" ".join(map(str, stream)) + "\n")
    doc = {
        "about": "reference perplexities for `bitnet perplexity` (tools/make_ppl_fixture.py)",
        "model": rel(model_dir),
        "text": rel(text_path),
        "tokens_file": rel(out / "tokens.txt"),
        "convention": ("stream = [BOS] + encode(text, add_special_tokens=False); windows of ctx tokens at "
                       "multiples of stride, the last one ending at the end of the stream; first token of "
                       "each window replaced by BOS; each window scores targets stream[max(prev_end, start+1):end]; "
                       "NLL from float32 logits, log_softmax in float64"),
        "bos": bos,
        "n_tokens": len(stream),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "how": ("TORCHDYNAMO_DISABLE=1; AutoModelForCausalLM.from_pretrained(folder, dtype=float32, "
                "attn_implementation='eager'); model.to(float32); 1 torch thread; CPU"),
        "results": results,
        "exact_float64": exact,
        "exact_float64_how": "tools/make_fixtures.py RefModel: numpy float64 forward, exact int8 x ternary dots",
    }
    (out / "expected.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out / 'expected.json'} ({len(stream)} tokens)")


if __name__ == "__main__":
    main()
