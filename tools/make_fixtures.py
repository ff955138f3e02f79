#!/usr/bin/env python3
"""Make the tiny BitNet b1.58 golden fixtures in fixtures/ (see tools/README.md).

For each model spec below this writes two checkpoint folders of the SAME seeded model:

  <name>-master  master format, like microsoft/bitnet-b1.58-2B-4T-bf16: BF16 [out,in]
                 `*_proj.weight`, config `autobitlinear` / `online` (transformers ternarizes
                 at load time)
  <name>-packed  packed format, like microsoft/bitnet-b1.58-2B-4T: U8 [out/4,in]
                 `*_proj.weight` + BF16 [1] `*_proj.weight_scale`, config `bitlinear` /
                 `offline`. The ternary codes are transformers' online codes of the masters.

and in each folder the goldens:

  golden.safetensors        transformers (float32 model, eager attention, CPU)
  golden_exact.safetensors  independent numpy float64 reference (exact int8 x ternary dots)
  golden.json               prompts, greedy tokens, per-step top1-top2 margins, diffs, checks

Run with the fixture venv (tools/requirements-fixtures.txt):
    /work/venv-fixtures/bin/python tools/make_fixtures.py --out fixtures

Deterministic: seeded torch.Generator, one CPU thread; two runs give byte-identical files.
"""

import os

# Must be set before torch is imported: transformers' BitNet integration decorates its
# quantization functions with @torch.compile; we want the plain eager ops.
os.environ["TORCHDYNAMO_DISABLE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import safetensors  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: E402
from transformers.integrations import bitnet as hf_bitnet  # noqa: E402

torch.set_num_threads(1)  # reductions must not depend on the thread count
transformers.logging.set_verbosity_error()

N_NEW = 16
MARGIN_TARGET = 0.05  # wanted top1-top2 margin (prefill last position and every greedy step)
MARGIN_MIN = 0.02  # accepted if no candidate reaches MARGIN_TARGET
FLIP_TOL = 1e-3  # |fp32 - float64| above this means an int8 activation rounding flipped
MAX_MODEL_TRIES = 16
MAX_PROMPT_TRIES = 200
MIN_DISTINCT = 4  # wanted: at least this many distinct tokens among the 16 greedy ones
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

DEFAULT_TOKENIZER_DIR = Path("/work/shared/fixtures/gguf-tiny")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]

SPECS = [
    dict(
        name="tiny-gqa4",
        about="2B-4T scaled down: tied embeddings, GQA ratio 4, relu2, rope_theta 5e5, Llama-3 tokenizer cut to 640 ids",
        seed=20251201, vocab=640, hidden=256, inter=768, layers=2, heads=8, kv_heads=2,
        rope_theta=500000.0, eps=1e-5, tie=True, max_pos=256,
        bos=608, eos=[609, 617], eot=617, tokenizer=True,
        regular_ids=(0, 608),  # prompt ids are drawn from [0, 608) (no special tokens) ...
        lengths={"p0_bos_only": 1, "p1_20tok": 20, "p2_40tok": 40},
        insert={"p2_40tok": {24: 617}},  # ... except <|eot_id|> at position 24 of p2, as in a chat turn
    ),
    dict(
        name="tiny-untied-odd",
        about="untied bf16 lm_head, 9 heads / 3 kv heads (GQA ratio 3), non-power-of-two sizes, 3 layers, no tokenizer",
        seed=20251301, vocab=515, hidden=288, inter=480, layers=3, heads=9, kv_heads=3,
        rope_theta=10000.0, eps=1e-6, tie=False, max_pos=192,
        bos=512, eos=513, eot=None, tokenizer=False,
        regular_ids=(0, 512),
        lengths={"p0_bos_only": 1, "p1_20tok": 20, "p2_40tok": 40},
        insert={},
    ),
]


# ----------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------

def student_t(g, shape, df):
    """Student-t samples from a torch.Generator (df integer): z / sqrt(chi2_df / df)."""
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    chi2 = torch.zeros(shape, dtype=torch.float64)
    for _ in range(df):
        chi2 += torch.randn(shape, generator=g, dtype=torch.float64) ** 2
    return z / torch.sqrt(chi2 / df)


def log_uniform(g, lo, hi):
    u = torch.rand((), generator=g, dtype=torch.float64).item()
    return float(np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo))))


def build_master(spec, seed):
    """BF16 master weights in HF names (an ordered dict)."""
    g = torch.Generator().manual_seed(seed)
    H, I, V = spec["hidden"], spec["inter"], spec["vocab"]
    hd = H // spec["heads"]
    kvd = spec["kv_heads"] * hd
    bf = torch.bfloat16

    def linear(out_f, in_f, lo, hi):
        # heavy-tailed (t, 3 dof) masters with a per-matrix mean|W| drawn in [lo, hi]
        target = log_uniform(g, lo, hi)
        w = student_t(g, (out_f, in_f), 3)
        w = w / w.abs().mean() * target
        return w.to(bf)

    def norm(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).to(bf)

    def embed(rows):
        w = student_t(g, (rows, H), 5)
        return (w / w.std() * 0.19).to(bf)

    t = {"model.embed_tokens.weight": embed(V)}
    for li in range(spec["layers"]):
        p = f"model.layers.{li}."
        t[p + "input_layernorm.weight"] = norm(H)
        # per-matrix mean|W| ranges: q/k give attention scores of std ~1.5; o/down make the
        # residual stream large next to the embedding (else a tied model copies its input token)
        t[p + "self_attn.q_proj.weight"] = linear(H, H, 0.07, 0.14)
        t[p + "self_attn.k_proj.weight"] = linear(kvd, H, 0.07, 0.14)
        t[p + "self_attn.v_proj.weight"] = linear(kvd, H, 0.05, 0.12)
        t[p + "self_attn.attn_sub_norm.weight"] = norm(H)
        t[p + "self_attn.o_proj.weight"] = linear(H, H, 0.12, 0.3)
        t[p + "post_attention_layernorm.weight"] = norm(H)
        t[p + "mlp.gate_proj.weight"] = linear(I, H, 0.05, 0.12)
        t[p + "mlp.up_proj.weight"] = linear(I, H, 0.05, 0.12)
        t[p + "mlp.ffn_sub_norm.weight"] = norm(I)
        t[p + "mlp.down_proj.weight"] = linear(H, I, 0.08, 0.2)
    t["model.norm.weight"] = norm(H)
    if not spec["tie"]:
        t["lm_head.weight"] = embed(V)
    return t


def online_quant(w_bf16):
    """transformers' WeightQuant (integrations/bitnet.py), op for op, in float32.

    Returns (codes int8 [out,in], inv = 1/max(mean|W|,1e-5) as a float32 0-d tensor)."""
    w = w_bf16.float()
    inv = 1.0 / w.abs().mean().clamp_(min=1e-5)
    codes = (w * inv).round().clamp(-1, 1)
    return codes.to(torch.int8), inv


def pack_codes(codes):
    """DESIGN.md layout, written independently of transformers.pack_weights:
    with R = out/4, bits 2i..2i+1 of packed[r, c] hold codes[i*R + r, c] + 1."""
    out_f = codes.shape[0]
    assert out_f % 4 == 0, out_f
    R = out_f // 4
    u = (codes.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros((R, codes.shape[1]), dtype=torch.uint8)
    for i in range(4):
        packed |= u[i * R:(i + 1) * R] << (2 * i)
    return packed


def build_packed(master):
    """Packed tensors + per-matrix info. weight_scale = bf16(inv), see tools/README.md."""
    t, info = {}, {}
    for k, v in master.items():
        base = k[: -len(".weight")]
        if any(base.endswith(p) for p in PROJ):
            codes, inv = online_quant(v)
            ws = inv.reshape(1).to(torch.bfloat16)
            t[k] = pack_codes(codes)
            t[base + ".weight_scale"] = ws
            mean32 = v.float().abs().mean()
            info[base] = dict(
                codes=codes, inv=inv, ws=ws,
                summary=dict(
                    shape=list(v.shape),
                    mean_abs_fp32=float(mean32),
                    inv_fp32=float(inv),  # transformers' `scale` in WeightQuant
                    dequant_fp32=float(torch.tensor(1.0, dtype=torch.float32) / inv),  # 1/inv
                    dequant_minus_mean_ulps=int(
                        (torch.tensor(1.0, dtype=torch.float32) / inv).view(torch.int32) - mean32.view(torch.int32)),
                    packed_weight_scale_bf16=float(ws.float()),
                    zero_fraction=float((codes == 0).float().mean()),
                ),
            )
        else:
            t[k] = v
    return t, info


# ----------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------

def config_json(spec, fmt):
    qc = ({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
          if fmt == "master" else
          {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"})
    eos = spec["eos"]
    return {
        "architectures": ["BitNetForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_bitnet.BitNetConfig",
            "AutoModelForCausalLM": "modeling_bitnet.BitNetForCausalLM",
        },
        "bos_token_id": spec["bos"],
        "eos_token_id": eos[0] if isinstance(eos, list) else eos,
        "hidden_act": "relu2",
        "hidden_size": spec["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": spec["inter"],
        "max_position_embeddings": spec["max_pos"],
        "model_type": "bitnet",
        "rms_norm_eps": spec["eps"],
        "num_attention_heads": spec["heads"],
        "num_hidden_layers": spec["layers"],
        "num_key_value_heads": spec["kv_heads"],
        "rope_theta": spec["rope_theta"],
        "tie_word_embeddings": spec["tie"],
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": spec["vocab"],
        "quantization_config": qc,
    }


def generation_config_json(spec):
    return {
        "bos_token_id": spec["bos"],
        "eos_token_id": spec["eos"],
        "do_sample": True,
        "temperature": 0.6,
        "max_length": spec["max_pos"],
        "top_p": 0.9,
        "transformers_version": "4.40.0.dev0",
    }


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")


def write_model_folder(d, spec, fmt, tensors, tok_files):
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "config.json", config_json(spec, fmt))
    write_json(d / "generation_config.json", generation_config_json(spec))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    for name, data in tok_files.items():
        (d / name).write_bytes(data)


def load_hf(d):
    """The reference load: float32 weights, eager attention, then model.to(float32)."""
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager")
    model.to(torch.float32)  # the embedding can stay bf16 otherwise
    model.eval()
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point():
            assert p.dtype == torch.float32, (name, p.dtype)
    for name, m in model.named_modules():
        if isinstance(m, hf_bitnet.BitLinear):
            assert m.weight.dtype == torch.uint8 and m.dtype == torch.float32, (name, m.weight.dtype, m.dtype)
    return model


# ----------------------------------------------------------------------------------------
# transformers runs
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def hf_run(model, ids, n_new=N_NEW):
    x = torch.tensor(ids, dtype=torch.long)[None]
    prefill = model(input_ids=x, use_cache=False).logits[0].float().clone()
    toks, steps = [], []
    cur = x
    for _ in range(n_new):  # full recompute greedy, EOS ignored
        lg = model(input_ids=cur, use_cache=False).logits[0, -1].float().clone()
        t = int(torch.argmax(lg))
        steps.append(lg)
        toks.append(t)
        cur = torch.cat([cur, torch.tensor([[t]])], dim=1)
    return dict(prefill=prefill, tokens=toks, steps=torch.stack(steps))


@torch.no_grad()
def hf_generate(model, ids, n_new=N_NEW):
    """transformers' KV-cache generate(), greedy, never stopping at EOS."""
    x = torch.tensor(ids, dtype=torch.long)[None]
    model.generation_config.eos_token_id = None
    gc = GenerationConfig(do_sample=False, max_new_tokens=n_new, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)
    toks = out.sequences[0, len(ids):].tolist()
    logits = torch.stack([l[0].float() for l in out.logits])
    return toks, logits


# ----------------------------------------------------------------------------------------
# independent float64 reference (numpy only; reads the checkpoint bytes itself)
# ----------------------------------------------------------------------------------------

def read_safetensors_np(path):
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        buf = data[a:b]
        if v["dtype"] == "BF16":
            u = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = u.view(np.float32).astype(np.float64)
        elif v["dtype"] == "U8":
            arr = np.frombuffer(buf, dtype=np.uint8)
        elif v["dtype"] == "F32":
            arr = np.frombuffer(buf, dtype="<f4").astype(np.float64)
        else:
            raise ValueError(v["dtype"])
        out[k] = arr.reshape(v["shape"])
    return out


class RefModel:
    """float64 everywhere; each BitLinear is an exact integer dot (int8 activations x
    ternary codes, summed exactly: |sum| < 2^53 so float64 BLAS is exact) times float64 scales."""

    def __init__(self, folder):
        cfg = json.loads((Path(folder) / "config.json").read_text())
        self.cfg = cfg
        self.t = read_safetensors_np(Path(folder) / "model.safetensors")
        qc = cfg["quantization_config"]
        self.H = cfg["hidden_size"]
        self.nh = cfg["num_attention_heads"]
        self.nkv = cfg["num_key_value_heads"]
        self.hd = self.H // self.nh
        self.eps = cfg["rms_norm_eps"]
        self.L = cfg["num_hidden_layers"]
        self.lin = {}
        self.code_mismatch_vs_fp32 = 0
        for li in range(self.L):
            for p in PROJ:
                base = f"model.layers.{li}.{p}"
                if qc["quantization_mode"] == "online":
                    W = self.t[base + ".weight"]
                    mean = max(np.abs(W).mean(), 1e-5)
                    codes = np.clip(np.rint(W / mean), -1, 1)
                    mul = mean  # output multiplier: y = dot / s_act * mean|W|
                else:
                    pk = self.t[base + ".weight"]
                    R = pk.shape[0]
                    codes = np.concatenate([((pk >> (2 * i)) & 3).astype(np.float64) - 1 for i in range(4)], axis=0)
                    assert codes.shape[0] == 4 * R
                    ws = self.t[base + ".weight_scale"].reshape(())
                    mul = 1.0 / ws  # transformers BitLinear: y = dot / (weight_scale * s_act)
                self.lin[base] = (np.ascontiguousarray(codes.T), mul)
        self.emb = self.t["model.embed_tokens.weight"]
        self.head = self.t["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else self.t["lm_head.weight"]
        d = self.hd
        self.inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))

    def rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def bitlinear(self, x, base):
        codesT, mul = self.lin[base]
        amax = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
        s = 127.0 / amax
        q = np.clip(np.rint(x * s), -128, 127)  # round half to even, like torch.round
        return (q @ codesT) / s * mul

    def forward(self, ids):
        ids = np.asarray(ids)
        T = len(ids)
        x = self.emb[ids].copy()
        ang = np.arange(T, dtype=np.float64)[:, None] * self.inv_freq[None, :]
        ang = np.concatenate([ang, ang], axis=-1)
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        half = self.hd // 2

        def rope(v):  # v [T, heads, d], rotate-half
            rot = np.concatenate([-v[..., half:], v[..., :half]], axis=-1)
            return v * cos + rot * sin

        mask = np.triu(np.full((T, T), -np.inf), k=1)
        group = self.nh // self.nkv
        for li in range(self.L):
            p = f"model.layers.{li}."
            h = self.rms(x, self.t[p + "input_layernorm.weight"])
            q = rope(self.bitlinear(h, p + "self_attn.q_proj").reshape(T, self.nh, self.hd))
            k = rope(self.bitlinear(h, p + "self_attn.k_proj").reshape(T, self.nkv, self.hd))
            v = self.bitlinear(h, p + "self_attn.v_proj").reshape(T, self.nkv, self.hd)
            att = np.empty((T, self.nh, self.hd))
            for hh in range(self.nh):
                kv = hh // group
                sc = q[:, hh] @ k[:, kv].T / np.sqrt(self.hd) + mask
                sc = np.exp(sc - sc.max(-1, keepdims=True))
                sc /= sc.sum(-1, keepdims=True)
                att[:, hh] = sc @ v[:, kv]
            a = self.rms(att.reshape(T, self.nh * self.hd), self.t[p + "self_attn.attn_sub_norm.weight"])
            x = x + self.bitlinear(a, p + "self_attn.o_proj")
            h = self.rms(x, self.t[p + "post_attention_layernorm.weight"])
            gt = self.bitlinear(h, p + "mlp.gate_proj")
            up = self.bitlinear(h, p + "mlp.up_proj")
            m = self.rms(np.maximum(gt, 0.0) ** 2 * up, self.t[p + "mlp.ffn_sub_norm.weight"])
            x = x + self.bitlinear(m, p + "mlp.down_proj")
        x = self.rms(x, self.t["model.norm.weight"])
        return x @ self.head.T

    def run(self, ids, n_new=N_NEW):
        prefill = self.forward(ids)
        toks, steps, cur = [], [], list(ids)
        for _ in range(n_new):
            lg = self.forward(cur)[-1]
            t = int(np.argmax(lg))
            steps.append(lg)
            toks.append(t)
            cur.append(t)
        return dict(prefill=prefill, tokens=toks, steps=np.stack(steps))


# ----------------------------------------------------------------------------------------
# evaluation and selection
# ----------------------------------------------------------------------------------------

def top2_margin(row):
    r = np.sort(np.asarray(row, dtype=np.float64))
    return float(r[-1] - r[-2])


def evaluate(models, refs, ids, full=True):
    """Run fp32 transformers and the float64 reference for both formats. With full=False it
    stops early (returns complete=False) once the fp32 margins or diversity already fail."""
    res = {}
    for fmt in ("master", "packed"):
        hf = hf_run(models[fmt], ids)
        step_m = [top2_margin(r) for r in hf["steps"].numpy()]
        res[fmt] = dict(hf=hf, step_margins=step_m, prefill_last_margin=top2_margin(hf["prefill"][-1].numpy()),
                        min_margin=min(step_m))
        if not full and (min(step_m) < MARGIN_TARGET or len(set(hf["tokens"])) < MIN_DISTINCT):
            return res, False
    for fmt in ("master", "packed"):
        r, hf = res[fmt], res[fmt]["hf"]
        ex = refs[fmt].run(ids)
        r.update(
            ex=ex, exact_step_margins=[top2_margin(x) for x in ex["steps"]],
            diff_prefill=float(np.abs(hf["prefill"].numpy().astype(np.float64) - ex["prefill"]).max()),
            diff_steps=float(np.abs(hf["steps"].numpy().astype(np.float64) - ex["steps"]).max()),
            tokens_agree=hf["tokens"] == ex["tokens"],
        )
    return res, True


def verdict(res):
    """(level, score): level 2 = meets MARGIN_TARGET and MIN_DISTINCT, 1 = meets MARGIN_MIN,
    0 = neither; every level also needs no activation-rounding flip and identical fp32/float64
    tokens."""
    clean = all("ex" in r and r["tokens_agree"] and max(r["diff_prefill"], r["diff_steps"]) < FLIP_TOL
                for r in res.values())
    mm = min(r["min_margin"] for r in res.values())
    distinct = min(len(set(r["hf"]["tokens"])) for r in res.values())
    level = 0 if not clean else (2 if mm >= MARGIN_TARGET and distinct >= MIN_DISTINCT else
                                 (1 if mm >= MARGIN_MIN else 0))
    return level, (1 if clean else 0, min(distinct, MIN_DISTINCT), mm)


def prompt_candidate(spec, pname, k):
    n = spec["lengths"][pname]
    if n == 1:
        return [spec["bos"]]
    g = torch.Generator().manual_seed(spec["seed"] * 1000 + 100 * list(spec["lengths"]).index(pname) + k)
    lo, hi = spec["regular_ids"]
    ids = [spec["bos"]] + torch.randint(lo, hi, (n - 1,), generator=g).tolist()
    for pos, tok in spec["insert"].get(pname, {}).items():
        ids[pos] = tok
    return ids


def load_pair(tmp, spec, master, packed, tok_files):
    dirs = {}
    for fmt, t in (("master", master), ("packed", packed)):
        d = Path(tmp) / f"{spec['name']}-{fmt}"
        if d.exists():
            shutil.rmtree(d)
        write_model_folder(d, spec, fmt, t, tok_files)
        dirs[fmt] = d
    models = {fmt: load_hf(d) for fmt, d in dirs.items()}
    refs = {fmt: RefModel(d) for fmt, d in dirs.items()}
    return dirs, models, refs


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def make_spec(spec, out_root, tok_files):
    name = spec["name"]
    tmp = tempfile.mkdtemp(prefix="bitnet-fixtures-")
    try:
        # 1. model seed scan: float64 codes must equal transformers' fp32 codes, and the
        #    BOS-only prompt (which depends on the model alone) must have clean margins.
        best = None
        for mt in range(MAX_MODEL_TRIES):
            seed = spec["seed"] + mt
            master = build_master(spec, seed)
            packed, qinfo = build_packed(master)
            dirs, models, refs = load_pair(tmp, spec, master, packed, tok_files)
            # codes in float64 vs transformers' float32 codes
            mism = 0
            for base, inf in qinfo.items():
                codesT, _ = refs["master"].lin[base]
                mism += int((codesT.T != inf["codes"].numpy()).sum())
            res, _ = evaluate(models, refs, prompt_candidate(spec, "p0_bos_only", 0))
            level, score = verdict(res)
            log(f"[{name}] model seed {seed}: code mismatches {mism}, bos level {level} min margin {score[2]:.4f} distinct {score[1]}")
            cand = (level if mism == 0 else -1, score, mt)
            if best is None or cand[:2] > best[0][:2]:
                best = (cand, seed)
            if mism == 0 and level == 2:
                break
        seed = best[1]
        model_scan = dict(tried=mt + 1, chosen_seed=seed, chosen_level=best[0][0])
        master = build_master(spec, seed)
        packed, qinfo = build_packed(master)
        dirs, models, refs = load_pair(tmp, spec, master, packed, tok_files)

        # 2. prompt scans
        prompts, results, prompt_scan = {}, {}, {}
        for pname in spec["lengths"]:
            bestp = None
            tries = 1 if spec["lengths"][pname] == 1 else MAX_PROMPT_TRIES
            for k in range(tries):
                ids = prompt_candidate(spec, pname, k)
                res, _ = evaluate(models, refs, ids, full=False)
                level, score = verdict(res)
                if bestp is None or (level, score) > bestp[0]:
                    bestp = ((level, score), k, ids)
                if level == 2:
                    break
            (level, score), k, ids = bestp
            res, _ = evaluate(models, refs, ids)  # the chosen one, complete
            assert verdict(res) == (level, score) or level < 2, (pname, verdict(res), level, score)
            log(f"[{name}] {pname}: candidate {k} of {tries} tried, level {level}, min margin {score[2]:.4f}, distinct {score[1]}")
            prompts[pname] = ids
            results[pname] = res
            prompt_scan[pname] = dict(candidate=k, candidates_tried=min(tries, k + 1) if level == 2 else tries,
                                      level=level)

        # 3. checks on the chosen model
        checks = packed_checks(spec, models, qinfo, dirs, tmp, master, prompts, tok_files)

        # 4. write the two fixture folders
        versions = dict(transformers=transformers.__version__, torch=torch.__version__,
                        numpy=np.__version__, safetensors=safetensors.__version__,
                        python=platform.python_version())
        tok = None
        if spec["tokenizer"]:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_str(tok_files["tokenizer.json"].decode())
        for fmt in ("master", "packed"):
            d = Path(out_root) / f"{name}-{fmt}"
            d.mkdir(parents=True, exist_ok=True)
            for f in d.iterdir():
                if f.is_file():
                    f.unlink()
            write_model_folder(d, spec, fmt, master if fmt == "master" else packed, tok_files)
            write_goldens(d, spec, fmt, seed, prompts, results, models[fmt], qinfo, checks, versions,
                          model_scan, prompt_scan, tok)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def packed_checks(spec, models, qinfo, dirs, tmp, master, prompts, tok_files):
    """Does transformers load the packed folder as we mean it?"""
    out = {}
    pm = models["packed"]
    mods = dict(pm.named_modules())
    ok_codes, ok_scale, ok_pack = True, True, True
    for base, inf in qinfo.items():
        m = mods[base]
        assert isinstance(m, hf_bitnet.BitLinear), (base, type(m))
        unpacked = hf_bitnet.unpack_weights(m.weight, dtype=torch.float32)
        ok_codes &= bool(torch.equal(unpacked, inf["codes"].float()))
        ok_scale &= bool(torch.equal(m.weight_scale, inf["ws"].float()))
        ok_pack &= bool(torch.equal(hf_bitnet.pack_weights(inf["codes"].clone()), m.weight))
    out["transformers_unpacked_codes_equal_online_codes"] = ok_codes
    out["transformers_pack_weights_equals_our_packing"] = ok_pack
    out["loaded_weight_scale_equals_file_bf16"] = ok_scale
    # the master model's online quantization gives the same codes, and dequantized weights code/inv
    mm = dict(models["master"].named_modules())
    ok_online = True
    for base, inf in qinfo.items():
        m = mm[base]
        assert isinstance(m, hf_bitnet.AutoBitLinear) and m.online_quant, base
        wq = hf_bitnet.WeightQuant.apply(m.weight)
        ok_online &= bool(torch.equal(wq, inf["codes"].float() / inf["inv"]))
    out["master_online_weightquant_equals_codes_over_inv"] = ok_online
    lm = getattr(pm, "lm_head")
    rp = pm.config.rope_parameters
    out["loaded_rope_parameters"] = dict(rp)
    expect_inv = 1.0 / (spec["rope_theta"] ** (torch.arange(0, spec["hidden"] // spec["heads"], 2,
                                                             dtype=torch.float) / (spec["hidden"] // spec["heads"])))
    out["loaded_rope_theta_ok"] = (rp["rope_theta"] == spec["rope_theta"]
                                   and bool(torch.equal(pm.model.rotary_emb.inv_freq, expect_inv)))
    out["lm_head_module"] = type(lm).__name__
    out["lm_head_not_quantized"] = type(lm) is torch.nn.Linear
    if spec["tie"]:
        out["lm_head_tied_to_embedding"] = bool(torch.equal(lm.weight, pm.model.embed_tokens.weight))
    assert ok_codes and ok_scale and ok_pack and ok_online and out["lm_head_not_quantized"], out
    assert out["loaded_rope_theta_ok"], out

    # weight_scale convention: packed (bf16(inv), divided) must be close to master; the other
    # reading (bf16(mean|W|)) is far off.
    ids = prompts["p1_20tok"]
    lm_master = models["master"](input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    lm_packed = pm(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    wrong = {k: (v if not k.endswith(".weight_scale") else
                 (1.0 / qinfo[k[: -len(".weight_scale")]]["inv"]).reshape(1).to(torch.bfloat16))
             for k, v in build_packed(master)[0].items()}
    wd = Path(tmp) / "wrong-scale"
    if wd.exists():
        shutil.rmtree(wd)
    write_model_folder(wd, spec, "packed", wrong, tok_files)
    lm_wrong = load_hf(wd)(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    out["weight_scale_convention"] = dict(
        prompt="p1_20tok",
        stored="weight_scale = bf16(1/max(mean|W|,1e-5)) (transformers' `scale`); BitLinear divides by it",
        max_abs_logit_diff_packed_vs_master=float((lm_packed - lm_master).abs().max()),
        argmax_agree_packed_vs_master=float((lm_packed.argmax(-1) == lm_master.argmax(-1)).float().mean()),
        if_stored_bf16_mean_abs_instead_max_abs_logit_diff_vs_master=float((lm_wrong - lm_master).abs().max()),
        if_stored_bf16_mean_abs_instead_argmax_agree=float((lm_wrong.argmax(-1) == lm_master.argmax(-1)).float().mean()),
        logit_absmax_master=float(lm_master.abs().max()),
    )
    return out


def write_goldens(d, spec, fmt, seed, prompts, results, model, qinfo, checks, versions, model_scan,
                  prompt_scan, tok):
    gold, exact = {}, {}
    per_prompt, diffs = {}, {}
    absmax = 0.0
    for pname, ids in prompts.items():
        r = results[pname][fmt]
        hf, ex = r["hf"], r["ex"]
        kv_toks, kv_logits = hf_generate(model, ids)
        ii = torch.tensor(ids, dtype=torch.long)
        gold[f"{pname}.input_ids"] = ii
        gold[f"{pname}.prefill_logits"] = hf["prefill"].contiguous()
        gold[f"{pname}.greedy_tokens"] = torch.tensor(hf["tokens"], dtype=torch.long)
        gold[f"{pname}.greedy_step_logits"] = hf["steps"].contiguous()
        exact[f"{pname}.input_ids"] = ii
        exact[f"{pname}.prefill_logits"] = torch.from_numpy(ex["prefill"].astype(np.float32))
        exact[f"{pname}.greedy_tokens"] = torch.tensor(ex["tokens"], dtype=torch.long)
        exact[f"{pname}.greedy_step_logits"] = torch.from_numpy(ex["steps"].astype(np.float32))
        absmax = max(absmax, float(hf["prefill"].abs().max()), float(hf["steps"].abs().max()))
        per_prompt[pname] = dict(
            greedy_tokens=hf["tokens"],
            prefill_last_margin=r["prefill_last_margin"],
            step_margins=r["step_margins"],
            min_top1_top2_margin=r["min_margin"],
            generate_kvcache_tokens=kv_toks,
            kvcache_matches_recompute=kv_toks == hf["tokens"],
            kvcache_step_logits_max_abs_diff_vs_recompute=float((kv_logits - hf["steps"]).abs().max()),
        )
        if tok is not None:
            per_prompt[pname]["prompt_text"] = tok.decode(ids, skip_special_tokens=False)
            per_prompt[pname]["greedy_text"] = tok.decode(hf["tokens"], skip_special_tokens=False)
        diffs[pname] = dict(
            prefill_max_abs=r["diff_prefill"], greedy_steps_max_abs=r["diff_steps"],
            exact_greedy_tokens=ex["tokens"], exact_tokens_match_fp32=r["tokens_agree"],
            exact_step_margins=r["exact_step_margins"],
        )
        assert per_prompt[pname]["kvcache_matches_recompute"], (d, pname)
    meta_src = ("transformers %s BitNetForCausalLM %s dtype=float32 (model.to(float32)) eager attention, CPU, 1 thread"
                % (transformers.__version__,
                   "online AutoBitLinear" if fmt == "master" else "offline BitLinear (packed)"))
    save_file(gold, str(d / "golden.safetensors"), metadata={"source": meta_src})
    save_file(exact, str(d / "golden_exact.safetensors"),
              metadata={"source": "tools/make_fixtures.py RefModel: numpy float64, exact int8 x ternary dots"})
    spec_out = {k: v for k, v in spec.items() if k not in ("insert", "lengths", "regular_ids")}
    spec_out["head_dim"] = spec["hidden"] // spec["heads"]
    info = {
        "fixture": d.name,
        "format": fmt,
        "spec": spec_out,
        "model_seed": seed,
        "n_new": N_NEW,
        **versions,
        "how": ("TORCHDYNAMO_DISABLE=1; AutoModelForCausalLM.from_pretrained(folder, dtype=float32, "
                "attn_implementation='eager'); model.to(float32); torch.set_num_threads(1). "
                "greedy = full recompute, argmax of the last position, EOS ignored; "
                "greedy_step_logits[i] = logits for prompt + greedy_tokens[:i] (so [0] == prefill_logits[-1]). "
                "golden_exact: independent numpy float64 forward with its own greedy."),
        "prompts": prompts,
        "fp32": per_prompt,
        "fp32_vs_exact_max_abs_logit_diff": diffs,
        "logit_absmax_fp32": absmax,
        "ternary_zero_fraction": float(np.mean([float((i["codes"] == 0).float().mean()) for i in qinfo.values()])),
        "bitlinear": {b: i["summary"] for b, i in qinfo.items()},
        "selection": dict(margin_target=MARGIN_TARGET, margin_min=MARGIN_MIN, flip_tol=FLIP_TOL,
                          min_distinct_greedy_tokens=MIN_DISTINCT,
                          criterion="top1-top2 margin >= target at the last prefill position and every greedy step, "
                                    "in both formats; |fp32 - float64| < flip_tol; identical fp32/float64 tokens; "
                                    "at least min_distinct_greedy_tokens distinct greedy tokens",
                          model_seed_scan=model_scan, prompt_scan=prompt_scan),
        "checks": checks,
    }
    write_json(d / "golden.json", info)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="fixtures", help="output folder (fixtures/ of the repo)")
    ap.add_argument("--tokenizer-dir", default=None,
                    help="where tokenizer.json / tokenizer_config.json come from (default: the existing "
                         "<out>/tiny-gqa4-master if it has them, else %s)" % DEFAULT_TOKENIZER_DIR)
    ap.add_argument("--only", default=None, help="make only this spec (tiny-gqa4 or tiny-untied-odd)")
    args = ap.parse_args()
    out = Path(args.out)
    tdir = Path(args.tokenizer_dir) if args.tokenizer_dir else None
    if tdir is None:
        tdir = out / "tiny-gqa4-master"
        if not all((tdir / f).is_file() for f in TOKENIZER_FILES):
            tdir = DEFAULT_TOKENIZER_DIR
    tok_files = {f: (tdir / f).read_bytes() for f in TOKENIZER_FILES}  # read before any overwrite
    for spec in SPECS:
        if args.only and spec["name"] != args.only:
            continue
        make_spec(spec, out, tok_files if spec["tokenizer"] else {})
    log("done")


if __name__ == "__main__":
    main()
