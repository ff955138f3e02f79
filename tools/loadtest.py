#!/usr/bin/env python3
"""Load test of `bitnet serve`: many concurrent streaming requests of mixed lengths.

Starts the server itself on a free loopback port (bounded in time), runs one request alone
(the single-sequence baseline), then N concurrent streaming requests, and checks:
  - zero errors, every response complete ([DONE], a finish_reason, and with --ignore-eos exactly
    max_tokens tokens);
  - every KV block back in the pool afterwards, nothing running or queued (GET /metrics).
Prints aggregate tokens/s, the ratio to the single-sequence rate, and p50/p99 latencies
(request, time to first token, time per output token). Exits non-zero on any failure.

Only the Python standard library. Examples:
  python3 tools/loadtest.py                                   # random:tiny, 64 requests
  python3 tools/loadtest.py --model random:2b-4t --requests 32 --concurrency 32 \
      --prompt-min 16 --prompt-max 64 --gen-min 64 --gen-max 64 --timeout 900
"""

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Server:
    """`bitnet serve` as a child process, killed at the end whatever happens."""

    def __init__(self, binary, model, port, extra, start_timeout, log_path):
        self.port = port
        cmd = [binary, "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)] + extra
        print("starting:", " ".join(cmd), flush=True)
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready (log: {log_path})")
            try:
                status, _ = get(port, "/health", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready after {start_timeout}s (log: {log_path})")
            time.sleep(0.2)

    def stop(self, timeout=20):
        """SIGTERM, then SIGKILL; returns the exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.log.close()
                return None
        self.log.close()
        return self.proc.returncode


def get(port, path, timeout=10):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        c.close()


def metrics(port):
    _, text = get(port, "/metrics")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def stream_request(port, body, timeout, headers):
    """One streamed request. Returns a dict of timings and the parsed outcome."""
    res = {"ok": False, "error": None, "tokens": 0, "finish": None, "done": False, "itl": []}
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        h = {"Content-Type": "application/json"}
        h.update(headers)
        c.request("POST", "/v1/completions", body=json.dumps(body), headers=h)
        r = c.getresponse()
        if r.status != 200:
            res["error"] = f"HTTP {r.status}: {r.read()[:300]!r}"
            return res
        last = None
        usage = None
        for raw in r:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                res["done"] = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                res["error"] = f"stream error: {chunk['error']}"
                return res
            if chunk.get("usage"):
                usage = chunk["usage"]
            for ch in chunk.get("choices", []):
                n = len(ch.get("token_ids") or []) or (1 if ch.get("text") else 0)
                if n:
                    now = time.perf_counter()
                    if last is None:
                        res["ttft"] = now - t0
                    else:
                        # n tokens arrived together: spread the gap over them
                        res["itl"].extend([(now - last) / n] * n)
                    last = now
                if ch.get("finish_reason"):
                    res["finish"] = ch["finish_reason"]
        res["latency"] = time.perf_counter() - t0
        if usage is None:
            res["error"] = "no usage chunk"
            return res
        res["tokens"] = usage["completion_tokens"]
        res["prompt_tokens"] = usage["prompt_tokens"]
        if not res["done"]:
            res["error"] = "stream ended without [DONE]"
        elif res["finish"] not in ("stop", "length"):
            res["error"] = f"bad finish_reason {res['finish']!r}"
        elif body.get("ignore_eos") and res["tokens"] != body["max_tokens"]:
            res["error"] = f"{res['tokens']} tokens, expected {body['max_tokens']}"
        else:
            res["ok"] = True
        if last is not None and res["tokens"] > 1:
            res["decode_rate"] = (res["tokens"] - 1) / max(last - t0 - res["ttft"], 1e-9)
        return res
    except Exception as e:  # noqa: BLE001 - any failure is an error of the run
        res["error"] = f"{type(e).__name__}: {e}"
        return res
    finally:
        c.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bitnet", default=os.path.join(ROOT, "target", "release", "bitnet"))
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=None, help="context passed to the server")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="passed to the server: cpu, cuda or auto")
    ap.add_argument("--plan", default=None, help="precision plan passed to the server (exact, fast, int8)")
    ap.add_argument("--kv-memory", default=None)
    ap.add_argument("--kv-cache", default=None, help="KV cache element type passed to the server (f32, f16, int8)")
    ap.add_argument("--shared-prefix", type=int, default=0,
                    help="every prompt starts with the same N tokens (a system prompt), then its own")
    ap.add_argument("--no-prefix-cache", action="store_true", help="passed to the server")
    ap.add_argument("--prompt-min", type=int, default=8)
    ap.add_argument("--prompt-max", type=int, default=200)
    ap.add_argument("--gen-min", type=int, default=16)
    ap.add_argument("--gen-max", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=None, help="token ids are drawn below this (default: the server's model, from a probe)")
    ap.add_argument("--no-ignore-eos", action="store_true", help="let eos end requests early")
    ap.add_argument("--no-baseline", action="store_true", help="skip the single-request baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300, help="seconds for the whole run")
    ap.add_argument("--start-timeout", type=float, default=120)
    ap.add_argument("--log", default=None, help="server log file (default: a temp file)")
    ap.add_argument("--api-key", default="loadtest-key")
    a = ap.parse_args()

    if not os.path.exists(a.bitnet):
        sys.exit(f"no binary at {a.bitnet}: cargo build --release -p bitnet-cli")
    port = free_port()
    extra = ["--max-batch", str(a.max_batch), "--max-queue", str(max(256, a.concurrency)), "--api-key", a.api_key, "--quiet"]
    if a.ctx:
        extra += ["--ctx", str(a.ctx)]
    if a.threads:
        extra += ["--threads", str(a.threads)]
    if a.kv_memory:
        extra += ["--kv-memory", a.kv_memory]
    if a.device:
        extra += ["--device", a.device]
    if a.plan:
        extra += ["--plan", a.plan]
    if a.kv_cache:
        extra += ["--kv-cache", a.kv_cache]
    if a.no_prefix_cache:
        extra += ["--no-prefix-cache"]
    log_path = a.log or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bitnet-loadtest-{port}.log")
    t_start = time.time()
    srv = Server(a.bitnet, a.model, port, extra, a.start_timeout, log_path)
    failures = []
    try:
        auth = {"Authorization": f"Bearer {a.api_key}"}
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/v1/models", headers=auth)
        models = json.loads(c.getresponse().read())
        c.close()
        model_id = models["data"][0]["id"]
        ctx = models["data"][0].get("max_model_len", 512)
        vocab = a.vocab or 256  # ids below 256 exist in every model we test
        rng = random.Random(a.seed)
        ignore_eos = not a.no_ignore_eos
        shared = [rng.randrange(vocab) for _ in range(a.shared_prefix)]

        def make_body(i):
            plen = rng.randint(a.prompt_min, a.prompt_max)
            gen = rng.randint(a.gen_min, a.gen_max)
            plen = max(1, min(plen, ctx - gen - 1 - len(shared)))
            prompt = shared + [rng.randrange(vocab) for _ in range(plen)]
            return {
                "model": model_id,
                "prompt": prompt,
                "max_tokens": gen,
                "temperature": 0 if i % 2 == 0 else 0.8,
                "seed": i,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": ignore_eos,
                "return_token_ids": True,
            }

        remaining = lambda: a.timeout - (time.time() - t_start)  # noqa: E731

        base_rate = None
        if not a.no_baseline:
            gen = max(a.gen_max, 32)
            body = make_body(0)
            body["max_tokens"] = min(gen, ctx - len(body["prompt"]) - 1)
            stream_request(port, dict(body, max_tokens=4), max(remaining(), 1), auth)  # warm-up
            r = stream_request(port, body, max(remaining(), 1), auth)
            if not r["ok"]:
                failures.append(f"baseline: {r['error']}")
            else:
                base_rate = r.get("decode_rate")
                print(f"single request: {r['tokens']} tokens, decode {base_rate:.1f} tok/s, ttft {r['ttft'] * 1e3:.1f} ms", flush=True)

        bodies = [make_body(i) for i in range(a.requests)]
        results = [None] * a.requests
        sem = threading.Semaphore(a.concurrency)

        def worker(i):
            with sem:
                results[i] = stream_request(port, bodies[i], max(remaining(), 1), auth)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(a.requests)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(remaining(), 0.1))
        wall = time.perf_counter() - t0
        if any(t.is_alive() for t in threads):
            failures.append(f"run did not finish within --timeout {a.timeout}s")
        done = [r for r in results if r is not None]
        errors = [r for r in done if not r["ok"]]
        for i, r in enumerate(results):
            if r is None:
                failures.append(f"request {i}: no result")
            elif not r["ok"]:
                failures.append(f"request {i}: {r['error']}")

        # Every block back in the pool, nothing running or waiting.
        m = {}
        deadline = time.time() + 10
        while time.time() < deadline:
            m = metrics(port)
            if m.get("bitnet_kv_blocks_used") == 0 and m.get("bitnet_running_sequences") == 0 and m.get("bitnet_queue_depth") == 0:
                break
            time.sleep(0.1)
        for k in ("bitnet_kv_blocks_used", "bitnet_running_sequences", "bitnet_queue_depth"):
            if m.get(k) != 0:
                failures.append(f"after the run {k} = {m.get(k)}")

        tokens = sum(r["tokens"] for r in done if r["ok"])
        lat = [r["latency"] for r in done if r["ok"]]
        ttft = [r["ttft"] for r in done if r["ok"] and "ttft" in r]
        itl = [x for r in done if r["ok"] for x in r["itl"]]
        agg = tokens / wall if wall > 0 else 0.0
        print(f"model {model_id} | max batch {a.max_batch} | {a.requests} streaming requests, {a.concurrency} at a time")
        print(f"errors {len(errors) + sum(r is None for r in results)} | complete {len(done) - len(errors)}/{a.requests}")
        print(f"completion tokens {tokens} in {wall:.2f} s: {agg:.1f} tok/s aggregate")
        if base_rate:
            print(f"single-sequence decode {base_rate:.1f} tok/s -> aggregate is {agg / base_rate:.1f}x")
        print(f"request latency p50 {percentile(lat, 50) * 1e3:.0f} ms  p99 {percentile(lat, 99) * 1e3:.0f} ms")
        print(f"time to first token p50 {percentile(ttft, 50) * 1e3:.0f} ms  p99 {percentile(ttft, 99) * 1e3:.0f} ms")
        print(f"time per output token p50 {percentile(itl, 50) * 1e3:.1f} ms  p99 {percentile(itl, 99) * 1e3:.1f} ms")
        print(
            f"server: steps {m.get('bitnet_steps_total', 0):.0f}, tokens/step {m.get('bitnet_step_tokens_total', 0) / max(m.get('bitnet_steps_total', 1), 1):.1f}, "
            f"preemptions {m.get('bitnet_preemptions_total', 0):.0f}, kv blocks {m.get('bitnet_kv_blocks_used', -1):.0f}/{m.get('bitnet_kv_blocks_total', 0):.0f} in use, "
            f"prompt tokens {m.get('bitnet_prompt_tokens_total', 0):.0f} of which reused from the prefix cache "
            f"{m.get('bitnet_prefix_cache_hit_tokens_total', 0):.0f}"
        )
        print(
            "LOADTEST_JSON "
            + json.dumps(
                {
                    "model": model_id,
                    "requests": a.requests,
                    "concurrency": a.concurrency,
                    "errors": len(failures),
                    "tokens": tokens,
                    "wall_s": wall,
                    "tok_s": agg,
                    "single_tok_s": base_rate,
                    "latency_p50_ms": percentile(lat, 50) * 1e3,
                    "latency_p99_ms": percentile(lat, 99) * 1e3,
                    "ttft_p50_ms": percentile(ttft, 50) * 1e3,
                    "ttft_p99_ms": percentile(ttft, 99) * 1e3,
                    "tpot_p50_ms": percentile(itl, 50) * 1e3,
                    "tpot_p99_ms": percentile(itl, 99) * 1e3,
                    "prefix_hit_tokens": m.get("bitnet_prefix_cache_hit_tokens_total", 0),
                }
            )
        )
    except Exception as e:  # noqa: BLE001
        failures.append(f"{type(e).__name__}: {e}")
    finally:
        code = srv.stop()
        if code != 0:
            failures.append(f"server exit code {code} after SIGTERM (log: {log_path})")
    for f in failures[:20]:
        print("FAIL:", f)
    n_ok = a.requests - sum(1 for f in failures if f.startswith("request "))
    print(f"loadtest: {n_ok} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
