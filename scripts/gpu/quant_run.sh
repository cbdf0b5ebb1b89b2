#!/usr/bin/env bash
# llmft-quant on a GPU machine (no Rust there): makes the bnb/hqq fixtures and
# runs the test, bench and example binaries copied into .gpu/quant/bin
# (test_*, bench_*, example_*; built here with cargo --release, stripped). Everything it writes goes to $OUT.
#   bash scripts/gpu/quant_run.sh [fixtures] [tests] [bench]
# Needs .gpu/quant/site: bitsandbytes 0.50.2 (cuda130 library only), hqq
# 0.2.8.post1 and termcolor, unzipped from their wheels.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export LLMFT_KERNEL_CACHE=/tmp/llmft-kernels LLMFT_REQUIRE_NVRTC=1
export PYTHONPATH=$PWD/.gpu/quant/site PYTHONUNBUFFERED=1
# Tests find fixtures through the build folder's path compiled in.
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for step in "$@"; do
  case $step in
    fixtures)
      python3 scripts/fixtures/quant_make_fixtures.py "$OUT/fixtures" 2>&1 ;;
    tests)
      for t in .gpu/quant/bin/test_*; do
        echo "== $t"; "$t" --test-threads 1 --nocapture 2>&1
      done | tee "$OUT/tests.log" ;;
    bench)
      for b in .gpu/quant/bin/bench_*; do
        echo "== $b"; LLMFT_BENCH_SKIP_CPU=1 "$b" --bench --warm-up-time 1 2>&1
      done | tee "$OUT/bench.log"
      for e in .gpu/quant/bin/example_*; do echo "== $e"; "$e" 2>&1; done | tee "$OUT/e2e.log" ;;
  esac
done
