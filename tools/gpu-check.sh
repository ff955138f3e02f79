#!/usr/bin/env bash
# The CUDA backend's check on a GPU machine that has no Rust toolchain (see
# crates/bitnet-cuda/README.md, "Checking on a GPU machine").
#
#   tools/gpu-check.sh pack   # where cargo is: build the CUDA test binaries and the benchmark
#                             # (release, --features cuda), copy them stripped to target/gpu-check/
#   tools/gpu-check.sh        # on the GPU machine, from the repository root: run them
#
# The run finds NVRTC (BITNET_NVRTC_DIR, else a libnvrtc.so.13 under /usr /opt /root /home,
# e.g. PyTorch's site-packages/nvidia/cu13/lib), runs every test binary one test at a time, then
# prints one table: decode tok/s at batch 1, 8, 32 (512-token prompts) and prefill-512 tok/s on random 2B-4T-shaped
# weights, with achieved GB/s against a copy-bandwidth probe measured in the same run. Logs go to
# $OUT (when set) or target/gpu-check/logs. Exit status: 0 when everything passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
DIST="${BITNET_GPU_CHECK_DIR:-target/gpu-check}"
BIN="$DIST/bin"
TESTS=(nvrtc_compile bitnet_cuda kernels model)

pack() {
  set -e
  command -v cargo >/dev/null || { echo "pack needs cargo" >&2; exit 2; }
  mkdir -p "$BIN" target
  echo "building the CUDA test binaries (release, --features cuda)..."
  cargo test -p bitnet-cuda --features cuda --release --no-run --message-format=json \
    > target/gpu-check-build.json
  cargo build -p bitnet-cuda --features cuda --release --bin bitnet-cuda-bench
  rm -f "$BIN"/*
  for name in "${TESTS[@]}"; do
    # the newest executable of that test target (file names carry a hash)
    exe=$(grep -o "\"executable\":\"[^\"]*/deps/${name}-[0-9a-f]*\"" target/gpu-check-build.json \
      | tail -1 | sed 's/^"executable":"//; s/"$//')
    [ -n "$exe" ] && [ -x "$exe" ] || { echo "test binary $name not found" >&2; exit 2; }
    cp "$exe" "$BIN/$name"
  done
  cp target/release/bitnet-cuda-bench "$BIN/"
  # the `bitnet` CLI too, when bitnet-cli has a `cuda` feature (it calls bitnet-cuda's bench)
  if grep -qE '^cuda *=' crates/bitnet-cli/Cargo.toml 2>/dev/null; then
    cargo build -p bitnet-cli --features cuda --release --bin bitnet
    cp target/release/bitnet "$BIN/"
  fi
  if command -v strip >/dev/null; then strip --strip-debug "$BIN"/*; fi
  # Precompile the cubins into the carried cache when NVRTC is at hand here (the GPU machine
  # reuses them when its NVRTC has the same version; it compiles them itself otherwise).
  if [ -n "${BITNET_NVRTC_DIR:-}" ]; then
    BITNET_CUDA_CACHE="$PWD/$DIST/nvrtc-cache" "$BIN/nvrtc_compile" --test-threads=1 >/dev/null 2>&1 \
      && echo "cubins cached in $DIST/nvrtc-cache"
  fi
  ls -la "$BIN"
  du -sh "$DIST"
  echo "carry $DIST to the GPU machine (device tool: carry [\"$DIST\"]) and run tools/gpu-check.sh there"
}

find_nvrtc() {
  if [ -n "${BITNET_NVRTC_DIR:-}" ] && [ -e "$BITNET_NVRTC_DIR/libnvrtc.so.13" ]; then return 0; fi
  local lib
  lib=$(find /usr /opt /root /home /workspace -name 'libnvrtc.so.13' 2>/dev/null | head -1)
  if [ -z "$lib" ]; then
    lib=$(find / -xdev -name 'libnvrtc.so.13' 2>/dev/null | head -1)
  fi
  [ -n "$lib" ] || return 1
  export BITNET_NVRTC_DIR
  BITNET_NVRTC_DIR=$(dirname "$lib")
}

# generate / logits / perplexity with --device cuda against --device cpu on the repo's fixtures;
# prints one line per check, returns non-zero on any failure.
cli_checks() {
  local log="$1" fx=fixtures/tiny-gqa4-packed bad=0 ids="1,17,42,99,300,7,250,12,77,401,33"
  echo "== cli_checks" >> "$log"
  local a b
  a=$("$BIN/bitnet" generate --device cpu --model "$fx" --token-ids "$ids" -n 24 --temperature 0 --ignore-eos --json 2>>"$log")
  b=$("$BIN/bitnet" generate --device cuda --model "$fx" --token-ids "$ids" -n 24 --temperature 0 --ignore-eos --json 2>>"$log")
  if python3 - "$a" "$b" <<'PY'
import json, sys
a, b = (json.loads(x)["token_ids"] for x in sys.argv[1:3])
print(f"generate greedy 24 tokens: cpu == cuda: {a == b}")
sys.exit(0 if a == b else 1)
PY
  then :; else bad=1; echo "cpu: $a"; echo "cuda: $b"; fi
  "$BIN/bitnet" logits --device cpu --model "$fx" --token-ids "$ids" -o "$LOGS/logits-cpu.npy" 2>>"$log" \
    && "$BIN/bitnet" logits --device cuda --model "$fx" --token-ids "$ids" -o "$LOGS/logits-cuda.npy" 2>>"$log" \
    && python3 - "$LOGS/logits-cpu.npy" "$LOGS/logits-cuda.npy" <<'PY' || bad=1
import sys, numpy as np
a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
d = float(np.abs(a - b).max())
same = bool((a.argmax(-1) == b.argmax(-1)).all())
print(f"logits {a.shape}: max|cpu - cuda| {d:.2e}, argmax equal {same}")
sys.exit(0 if d < 2e-4 and same else 1)
PY
  rm -f "$LOGS"/logits-*.npy
  a=$("$BIN/bitnet" perplexity --device cpu --model fixtures/tiny-gqa4-master --file fixtures/ppl/text.txt --ctx 128 --json 2>>"$log")
  b=$("$BIN/bitnet" perplexity --device cuda --model fixtures/tiny-gqa4-master --file fixtures/ppl/text.txt --ctx 128 --json 2>>"$log")
  python3 - "$a" "$b" <<'PY' || bad=1
import json, sys
a, b = (json.loads(x) for x in sys.argv[1:3])
# = the difference of the mean NLLs: int8 rounding-boundary flips move it by ~1e-4 (DESIGN.md)
r = abs(a["ppl"] - b["ppl"]) / a["ppl"]
print(f"perplexity ctx 128: cpu {a['ppl']:.5f} cuda {b['ppl']:.5f} (rel diff {r:.1e}, {b['tokens_per_s']:.0f} tok/s on the GPU)")
sys.exit(0 if r < 1e-3 and a["tokens_scored"] == b["tokens_scored"] else 1)
PY
  return $bad
}

# the prefix-cache load test's summary; fails unless prompt tokens were reused without errors
prefix_hits() {
  grep LOADTEST_JSON "$1" | sed 's/^LOADTEST_JSON //' | python3 -c '
import json, sys
j = json.load(sys.stdin)
print("reused prompt tokens %.0f, %.0f tok/s, ttft p50 %.0f ms, errors %d"
      % (j["prefix_hit_tokens"], j["tok_s"], j["ttft_p50_ms"], j["errors"]))
sys.exit(0 if j["prefix_hit_tokens"] > 0 and j["errors"] == 0 else 1)
'
}

run() {
  local t0=$SECONDS fails=0 passes=0
  LOGS="${OUT:-$DIST/logs}"
  mkdir -p "$LOGS"
  for name in "${TESTS[@]}" bitnet-cuda-bench; do
    [ -x "$BIN/$name" ] || {
      echo "missing $BIN/$name: build with 'tools/gpu-check.sh pack' where cargo is, carry $DIST" >&2
      exit 2
    }
  done
  echo "== device"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo "(nvidia-smi unavailable)"
  if ! find_nvrtc; then
    echo "NVRTC (libnvrtc.so.13) not found: install a CUDA 13 NVRTC (e.g. the PyTorch cu13 wheel) or set BITNET_NVRTC_DIR" >&2
    exit 2
  fi
  echo "NVRTC: $BITNET_NVRTC_DIR"
  export BITNET_FIXTURES="$PWD/fixtures"
  export BITNET_CUDA_CACHE="${BITNET_CUDA_CACHE:-$PWD/$DIST/nvrtc-cache}"
  export RUST_BACKTRACE=1

  echo "== tests (one at a time; full output in $LOGS)"
  for name in "${TESTS[@]}"; do
    local log="$LOGS/test-$name.log" start=$SECONDS
    timeout 120 "$BIN/$name" --test-threads=1 --nocapture > "$log" 2>&1
    local rc=$?
    local summary
    summary=$(grep -E '^test result:' "$log" | tail -1)
    if [ $rc -eq 0 ]; then
      passes=$((passes + 1))
      echo "ok    $name ($((SECONDS - start)) s): $summary"
    else
      fails=$((fails + 1))
      echo "FAIL  $name (exit $rc, $((SECONDS - start)) s): ${summary:-no summary}"
      grep -E "^test .*FAILED|panicked|^---- " "$log" | head -20
      grep -A12 -E "panicked at" "$log" | head -40
    fi
    if grep -q "skipped: " "$log"; then
      echo "      note: $(grep -c 'skipped: ' "$log") test(s) skipped: $(grep -m1 -o 'skipped: .*' "$log")"
    fi
  done

  echo "== benchmark (random:2b-4t)"
  local blog="$LOGS/bench.log"
  timeout 200 "$BIN/bitnet-cuda-bench" --prompt 512 --gen 64 2> "$LOGS/bench-progress.log" | tee "$blog"
  local brc=${PIPESTATUS[0]}
  if [ "$brc" -eq 0 ]; then passes=$((passes + 1)); else
    fails=$((fails + 1))
    echo "FAIL  bitnet-cuda-bench (exit $brc)"
    tail -20 "$LOGS/bench-progress.log"
  fi

  if [ -x "$BIN/bitnet" ]; then
    echo "== bitnet bench --device cuda (CLI smoke run)"
    if timeout 100 "$BIN/bitnet" bench --model random:2b-4t --device cuda --prompt 512 --gen 64 \
      > "$LOGS/cli-bench.log" 2>&1; then
      passes=$((passes + 1))
      tail -8 "$LOGS/cli-bench.log"
    else
      fails=$((fails + 1))
      echo "FAIL  bitnet bench --device cuda"
      tail -20 "$LOGS/cli-bench.log"
    fi
    echo "== the CLI on the GPU against the CPU (fixtures)"
    cli_checks "$LOGS/cli-bench.log"
    local crc=$?
    passes=$((passes + (crc == 0 ? 1 : 0)))
    fails=$((fails + (crc == 0 ? 0 : 1)))
    echo "== bitnet serve --device cuda: tools/loadtest.py (random:2b-4t, 64 streaming requests, batch 32)"
    if timeout 240 python3 tools/loadtest.py --bitnet "$BIN/bitnet" --model random:2b-4t --device cuda \
      --requests 64 --concurrency 64 --max-batch 32 --ctx 1024 --prompt-min 16 --prompt-max 256 \
      --gen-min 64 --gen-max 128 --timeout 220 --start-timeout 120 > "$LOGS/loadtest.log" 2>&1; then
      passes=$((passes + 1))
    else
      fails=$((fails + 1))
      echo "FAIL  loadtest on the GPU"
    fi
    grep -vE "^(ok|PASS) " "$LOGS/loadtest.log" | tail -12
    echo "== the prefix cache on the GPU: 64 requests sharing a 384-token prefix"
    if timeout 150 python3 tools/loadtest.py --bitnet "$BIN/bitnet" --model random:2b-4t --device cuda \
      --requests 64 --concurrency 16 --max-batch 16 --ctx 1024 --shared-prefix 384 --prompt-min 8 \
      --prompt-max 32 --gen-min 16 --gen-max 16 --no-baseline --timeout 120 --start-timeout 120 \
      > "$LOGS/loadtest-prefix.log" 2>&1 \
      && prefix_hits "$LOGS/loadtest-prefix.log"
    then
      passes=$((passes + 1))
    else
      fails=$((fails + 1))
      echo "FAIL  prefix-cache loadtest on the GPU"
      tail -12 "$LOGS/loadtest-prefix.log"
    fi
    # the official client (chat, completions, logprobs, echo, n, penalties) when it can be imported
    # (the GPU image lacks it: carry wheels, see crates/bitnet-cuda/README.md)
    if python3 -c "import openai" 2>/dev/null; then
      echo "== tools/openai_client_test.py --device cuda"
      if timeout 200 python3 tools/openai_client_test.py --bitnet "$BIN/bitnet" --device cuda \
        > "$LOGS/openai-client.log" 2>&1; then
        passes=$((passes + 1))
        tail -3 "$LOGS/openai-client.log"
      else
        fails=$((fails + 1))
        echo "FAIL  openai client against the GPU server"
        grep -vE "^(ok|PASS) " "$LOGS/openai-client.log" | tail -20
      fi
    else
      echo "(openai package not importable: client test skipped)"
    fi
  fi
  echo "gpu-check took $((SECONDS - t0)) s"
  echo "gpu-check: $passes passed, $fails failed"
  [ "$fails" -eq 0 ]
}

case "${1:-run}" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: tools/gpu-check.sh [pack|run]" >&2; exit 2 ;;
esac
