#!/usr/bin/env python3
"""`bitnet serve` driven by the official `openai` Python package.

Starts the server on a free loopback port with a small model (default: the repo fixture
fixtures/tiny-gqa4-master, which has a tokenizer and a chat template), runs chat and completions
requests, streamed and not, plus error cases, then stops the server with SIGTERM and checks that
it exits cleanly. Bounded in time; the server is killed whatever happens.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install openai
    /tmp/venv/bin/python tools/openai_client_test.py [--bitnet target/release/bitnet]
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "client-test-key"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary, model, port, timeout, log_path, device="cpu"):
    cmd = [binary, "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--api-key", KEY, "--max-batch", "8", "--device", device]
    print("starting:", " ".join(cmd), flush=True)
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} (log: {log_path})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, log
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"server not ready after {timeout}s (log: {log_path})")
        time.sleep(0.2)


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = []

    def run(self, name, fn):
        t0 = time.time()
        try:
            fn()
            self.passed += 1
            print(f"ok    {name} ({time.time() - t0:.2f}s)", flush=True)
        except Exception:  # noqa: BLE001
            self.failed.append(name)
            print(f"FAIL  {name}\n{traceback.format_exc()}", flush=True)


def longer_context(model):
    """A model folder copied with a 1024-token context (the tiny fixture's config says 256, and
    its 640-token vocabulary spends ~250 tokens on one tool's description; RoPE runs past it)."""
    import json
    import shutil
    import tempfile
    cfg_path = os.path.join(model, "config.json")
    if not os.path.isfile(cfg_path):
        return model
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("max_position_embeddings", 0) >= 1024:
        return model
    dst = os.path.join(tempfile.mkdtemp(prefix="bitnet-openai-test-"), os.path.basename(model.rstrip("/")))
    shutil.copytree(model, dst)
    cfg["max_position_embeddings"] = 1024
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bitnet", default=os.path.join(ROOT, "target", "release", "bitnet"))
    ap.add_argument("--model", default=os.path.join(ROOT, "fixtures", "tiny-gqa4-master"))
    ap.add_argument("--device", default="cpu", help="the server's --device (cpu, cuda)")
    ap.add_argument("--start-timeout", type=float, default=120)
    ap.add_argument("--timeout", type=float, default=60, help="seconds per request")
    a = ap.parse_args()
    if not os.path.exists(a.bitnet):
        sys.exit(f"no binary at {a.bitnet}: cargo build --release -p bitnet-cli")

    port = free_port()
    log_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bitnet-openai-test-{port}.log")
    proc, log = start_server(a.bitnet, longer_context(a.model), port, a.start_timeout, log_path, a.device)
    c = Checks()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, timeout=a.timeout, max_retries=0)
        model = client.models.list().data[0].id
        msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]

        def models():
            ids = [m.id for m in client.models.list().data]
            assert ids == [model], ids

        def chat():
            r = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0)
            assert r.object == "chat.completion", r
            assert r.id.startswith("chatcmpl-"), r.id
            ch = r.choices[0]
            assert ch.message.role == "assistant"
            assert isinstance(ch.message.content, str)
            assert ch.finish_reason in ("stop", "length"), ch.finish_reason
            u = r.usage
            assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 16 or ch.finish_reason == "stop", u
            assert u.total_tokens == u.prompt_tokens + u.completion_tokens

        def chat_stream():
            full = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0,
                                                  extra_body={"ignore_eos": True})
            stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0, stream=True,
                                                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            text, finish, usage, n = "", None, None, 0
            for chunk in stream:
                n += 1
                assert chunk.object == "chat.completion.chunk"
                if chunk.usage is not None:
                    usage = chunk.usage
                for ch in chunk.choices:
                    text += ch.delta.content or ""
                    finish = ch.finish_reason or finish
            assert n > 2, n
            assert text == full.choices[0].message.content, (text, full.choices[0].message.content)
            assert finish == "length", finish
            assert usage is not None and usage.completion_tokens == 24, usage
            assert usage.prompt_tokens == full.usage.prompt_tokens

        def chat_stream_no_usage():
            stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, stream=True)
            chunks = list(stream)
            assert all(ch.usage is None for ch in chunks)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")

        def completions():
            r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.object == "text_completion"
            assert r.choices[0].finish_reason == "length"
            assert r.usage.completion_tokens == 12
            s = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True,
                                          stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            text, usage = "", None
            for chunk in s:
                if chunk.usage is not None:
                    usage = chunk.usage
                for ch in chunk.choices:
                    text += ch.text or ""
            assert text == r.choices[0].text, (text, r.choices[0].text)
            assert usage.completion_tokens == 12

        def completions_token_ids():
            r = client.completions.create(model=model, prompt=[608, 100, 200, 300], max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.usage.prompt_tokens == 4, r.usage
            assert r.usage.completion_tokens == 5

        def json_mode():
            # response_format json_object: the reply parses as a JSON object (or was cut by max_tokens)
            import json
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Reply in JSON."}],
                                               max_tokens=200, temperature=0.8, seed=3,
                                               response_format={"type": "json_object"})
            ch = r.choices[0]
            if ch.finish_reason == "stop":
                assert isinstance(json.loads(ch.message.content), dict), ch.message.content
            else:
                assert ch.finish_reason == "length" and ch.message.content.lstrip().startswith("{"), ch

        def json_schema():
            # response_format json_schema (structured outputs): the reply matches the schema by value
            import json
            import re
            schema = {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 20},
                "population": {"type": "integer", "minimum": 0, "maximum": 50000000},
                "kind": {"enum": ["town", "city", "village"]},
                "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
                "required": ["city", "population", "kind", "code"], "additionalProperties": False}
            rf = {"type": "json_schema", "json_schema": {"name": "place", "strict": True, "schema": schema}}
            for seed in (1, 2):
                r = client.chat.completions.create(model=model, max_tokens=200, temperature=0.8, seed=seed,
                                                   messages=[{"role": "user", "content": "Name a place."}],
                                                   response_format=rf)
                ch = r.choices[0]
                if ch.finish_reason == "length":
                    assert ch.message.content.lstrip().startswith("{"), ch
                    continue
                assert ch.finish_reason == "stop", ch
                v = json.loads(ch.message.content)
                assert list(v) == ["city", "population", "kind", "code"], v
                assert re.fullmatch("[A-Z]{2}-[0-9]{3}", v["code"]), v
                assert len(v["city"]) <= 20 and 0 <= v["population"] <= 50000000, v
                assert v["kind"] in ("town", "city", "village"), v
            # the client's own structured outputs: a pydantic model's schema, the reply parsed into it
            import datetime

            from pydantic import BaseModel, Field

            class Place(BaseModel):
                city: str = Field(max_length=12)
                population: int = Field(ge=0, le=1000)
                area: float = Field(gt=0, le=99.5)
                capital: bool
                founded: datetime.date

            parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
            try:
                r = parse(model=model, messages=[{"role": "user", "content": "Name a place."}], max_tokens=300,
                          temperature=0.8, seed=4, response_format=Place)
                p = r.choices[0].message.parsed
                assert isinstance(p, Place) and len(p.city) <= 12 and 0 <= p.population <= 1000, p
                assert 0 < p.area <= 99.5, p
            except openai.LengthFinishReasonError:
                pass  # cut by max_tokens: a valid prefix, which the client refuses to parse
            bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {
                "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}}
            try:
                client.chat.completions.create(model=model, max_tokens=5, response_format=bad,
                                               messages=[{"role": "user", "content": "x"}])
                raise AssertionError("an unsupported schema keyword was accepted")
            except openai.BadRequestError as e:
                assert "uniqueItems" in str(e), e

        def tools():
            # tools with a forced call: message.tool_calls in OpenAI's shape, arguments matching the schema
            import json
            add = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["a", "b"], "additionalProperties": False}}}
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "1+2?"}],
                                               tools=[add], tool_choice={"type": "function", "function": {"name": "add"}},
                                               max_tokens=60, temperature=0.8, seed=5)
            ch = r.choices[0]
            if ch.finish_reason == "length":
                return
            assert ch.finish_reason == "tool_calls", ch
            call = ch.message.tool_calls[0]
            assert call.type == "function" and call.function.name == "add" and call.id.startswith("call_"), call
            args = json.loads(call.function.arguments)
            assert set(args) == {"a", "b"} and all(0 <= v <= 9 for v in args.values()), args
            # streamed: the id and name first, then the arguments in pieces that add up to a JSON object
            stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "1+2?"}],
                                                    tools=[add], tool_choice="required", max_tokens=60, temperature=0.8,
                                                    seed=5, stream=True)
            name, text, finish = None, "", None
            for chunk in stream:
                d = chunk.choices[0].delta
                for t in d.tool_calls or []:
                    name = t.function.name or name
                    text += t.function.arguments or ""
                finish = chunk.choices[0].finish_reason or finish
            if finish == "tool_calls":
                assert name == "add" and set(json.loads(text)) == {"a", "b"}, (name, text)
            # the call and its result sent back
            r = client.chat.completions.create(model=model, max_tokens=5, tools=[add], messages=[
                {"role": "user", "content": "1+2?"}, ch.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "3"}])
            assert r.choices[0].finish_reason in ("stop", "length", "tool_calls"), r

        def structured_outputs():
            # vLLM's extensions through extra_body: a choice, a regular expression in full
            import re
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Yes or no?"}],
                                               max_tokens=10, temperature=1.0, seed=1,
                                               extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
            assert r.choices[0].message.content in ("yes", "no"), r.choices[0]
            r = client.completions.create(model=model, prompt="Code:", max_tokens=20, temperature=1.0, seed=2,
                                          extra_body={"guided_regex": "[A-Z]{2}[0-9]{1,3}"})
            c = r.choices[0]
            assert re.fullmatch("[A-Z]{2}[0-9]{1,3}", c.text) and c.finish_reason == "stop", c

        def several_prompts():
            # a list of prompts (lm-evaluation-harness batches this way): choices in prompt order
            prompts = ["Once upon a time", "The cat", "A"]
            r = client.completions.create(model=model, prompt=prompts, max_tokens=4, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert [ch.index for ch in r.choices] == [0, 1, 2], r.choices
            for p, ch in zip(prompts, r.choices):
                one = client.completions.create(model=model, prompt=p, max_tokens=4, temperature=0,
                                                extra_body={"ignore_eos": True})
                assert ch.text == one.choices[0].text, (p, ch.text, one.choices[0].text)
            assert r.usage.completion_tokens == 12, r.usage

        def sampling_with_seed():
            kw = dict(model=model, messages=msgs, max_tokens=16, temperature=0.9, top_p=0.95, seed=42)
            a1 = client.chat.completions.create(**kw).choices[0].message.content
            a2 = client.chat.completions.create(**kw).choices[0].message.content
            assert a1 == a2, (a1, a2)
            # n choices: choice i is the request with seed + i
            many = client.chat.completions.create(**dict(kw, n=3))
            assert [c.index for c in many.choices] == [0, 1, 2], many.choices
            assert many.choices[0].message.content == a1
            b = client.chat.completions.create(**dict(kw, seed=43)).choices[0].message.content
            assert many.choices[1].message.content == b, (many.choices[1].message.content, b)

        def stop_strings():
            r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=30, temperature=0,
                                          extra_body={"ignore_eos": True})
            full = r.choices[0].text
            if len(full) < 6:
                return
            stop = full[len(full) // 2:len(full) // 2 + 2]
            s = client.completions.create(model=model, prompt="Once upon a time", max_tokens=30, temperature=0, stop=[stop],
                                          extra_body={"ignore_eos": True})
            assert s.choices[0].text == full[:full.index(stop)], (s.choices[0].text, full, stop)
            assert s.choices[0].finish_reason == "stop"

        def logprobs_and_penalties():
            # The client's own types parse the chat and legacy forms, streamed and not.
            r = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                               top_logprobs=3, frequency_penalty=0.5, presence_penalty=0.3)
            content = r.choices[0].logprobs.content
            assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
            for t in content:
                assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token, t
                assert t.logprob <= 0, t
                assert bytes(t.bytes).decode("utf-8", "replace") == t.token, t
            s = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                               top_logprobs=3, frequency_penalty=0.5, presence_penalty=0.3, stream=True)
            streamed = [t for ch in s if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
            assert [t.token for t in streamed] == [t.token for t in content]
            c2 = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0,
                                           logprobs=2, extra_body={"ignore_eos": True})
            lp = c2.choices[0].logprobs
            assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6, lp
            assert all(2 <= len(m) <= 3 for m in lp.top_logprobs), lp
            # lm-evaluation-harness's loglikelihood request: echo the prompt with its log-probabilities
            e = client.completions.create(model=model, prompt="Once upon a time", max_tokens=1, temperature=0,
                                          logprobs=1, echo=True, extra_body={"ignore_eos": True})
            lp = e.choices[0].logprobs
            assert e.choices[0].text.startswith("Once upon a time"), e.choices[0].text
            assert len(lp.tokens) == e.usage.prompt_tokens + 1, (len(lp.tokens), e.usage)
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp
            assert all(v <= 0 for v in lp.token_logprobs[1:]), lp

        def errors():
            try:
                client.chat.completions.create(model="no-such-model", messages=msgs)
                raise AssertionError("unknown model accepted")
            except openai.NotFoundError as e:
                assert e.status_code == 404
            try:
                client.chat.completions.create(model=model, messages=msgs, max_tokens=100000)
                raise AssertionError("max_tokens beyond the context accepted")
            except openai.BadRequestError as e:
                assert e.body["code"] == "context_length_exceeded", e.body
            try:
                client.chat.completions.create(model=model, messages=[])
                raise AssertionError("empty messages accepted")
            except openai.BadRequestError as e:
                assert e.body["param"] == "messages", e.body
            try:
                client.chat.completions.create(model=model, messages=msgs, temperature=5)
                raise AssertionError("temperature 5 accepted")
            except openai.BadRequestError as e:
                assert e.body["param"] == "temperature", e.body
            try:
                client.chat.completions.create(model=model, messages=msgs, n=17)
                raise AssertionError("n=17 accepted")
            except openai.BadRequestError:
                pass
            bad = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0, timeout=a.timeout)
            try:
                bad.models.list()
                raise AssertionError("wrong API key accepted")
            except openai.AuthenticationError as e:
                assert e.status_code == 401

        def blocks_returned():
            deadline = time.time() + 10
            while True:
                m = metrics(port)
                if m["bitnet_kv_blocks_used"] == 0 and m["bitnet_running_sequences"] == 0:
                    break
                assert time.time() < deadline, m
                time.sleep(0.1)
            assert m["bitnet_generation_tokens_total"] > 0
            assert m["bitnet_prompt_tokens_total"] > 0

        for name, fn in [("models", models), ("chat", chat), ("chat_stream", chat_stream),
                         ("chat_stream_no_usage", chat_stream_no_usage), ("completions", completions),
                         ("completions_token_ids", completions_token_ids), ("several_prompts", several_prompts),
                         ("json_mode", json_mode), ("json_schema", json_schema), ("tools", tools),
                         ("structured_outputs", structured_outputs),
                         ("sampling_with_seed", sampling_with_seed),
                         ("stop_strings", stop_strings), ("logprobs_and_penalties", logprobs_and_penalties),
                         ("errors", errors), ("blocks_returned", blocks_returned)]:
            c.run(name, fn)
    except Exception:  # noqa: BLE001
        c.failed.append("setup")
        traceback.print_exc()
    finally:
        code = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        else:
            code = proc.returncode
        log.close()
        if code != 0:
            c.failed.append(f"clean exit on SIGTERM (code {code})")
            print(f"FAIL  server exit code {code}; log {log_path}:")
            with open(log_path, "rb") as f:
                sys.stdout.write(f.read()[-4000:].decode("utf-8", "replace"))
        else:
            c.passed += 1
            print("ok    clean exit on SIGTERM")
    print(f"openai client test: {c.passed} passed, {len(c.failed)} failed")
    sys.exit(1 if c.failed else 0)


if __name__ == "__main__":
    main()
