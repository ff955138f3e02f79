#!/usr/bin/env bash
# The one test command (README): every Rust test, then the real-client server checks.
# Installs what the tests need (a Python venv with the `openai` package) and needs no network
# beyond the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --release 2>&1
# The CUDA backend builds without a toolkit; its tests report themselves skipped without a GPU.
cargo test --release -p bitnet-cuda --features cuda 2>&1
cargo check --release -p bitnet-cli --features cuda
cargo build --release -p bitnet-cli

# Real OpenAI-client tests of `bitnet serve` (tools/openai_client_test.py, tools/loadtest.py).
if [ -f tools/openai_client_test.py ]; then
  VENV="${BITNET_TEST_VENV:-$PWD/target/py-venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tools/requirements-tests.txt
  fi
  BIN="$PWD/target/release/bitnet"
  timeout 300 "$VENV/bin/python" tools/openai_client_test.py --bitnet "$BIN"
  timeout 300 "$VENV/bin/python" tools/loadtest.py --bitnet "$BIN" --model random:tiny --requests 64 \
    --concurrency 64 --max-batch 32 --timeout 240
  # the int8 KV cache under load, in a pool small enough that sequences wait for blocks
  timeout 300 "$VENV/bin/python" tools/loadtest.py --bitnet "$BIN" --model random:tiny --requests 32 \
    --concurrency 32 --max-batch 16 --plan int8 --kv-cache int8 --kv-memory 1MiB --no-baseline --timeout 240
fi
