#!/usr/bin/env bash
# Builds what scripts/gpu/dist_bench.sh runs on a GPU machine: the CLI and
# the NCCL test binary, stripped, into .gpu/dist/ (git-ignored). Carry that
# folder with the device tool.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/dist
cargo build --release -p llmft --bin llmft
cp target/release/llmft .gpu/dist/llmft
exe=$(cargo test --release -p llmft-shard --test nccl --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "nccl":
        print(m["executable"])')
cp "$exe" .gpu/dist/nccl_test
strip .gpu/dist/llmft .gpu/dist/nccl_test
ls -la .gpu/dist
