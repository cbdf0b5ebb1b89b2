#!/usr/bin/env bash
# Runs the binaries packed by scripts/gpu/build.sh on a GPU machine and prints
# one pass/fail table. Logs go to $OUT (or ./gpu-out).
#   bash scripts/gpu/run.sh [tests|benches|all] [bench filter]
set -uo pipefail
cd "$(dirname "$0")/../.."
what=${1:-all}
filter=${2:-cuda}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
CUDA_LIB=${CUDA_LIB:-$(ls -d /usr/local/cuda-1*/targets/x86_64-linux/lib 2>/dev/null | tail -1)}
export LD_LIBRARY_PATH="$CUDA_LIB:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export LLMFT_KERNEL_CACHE=${LLMFT_KERNEL_CACHE:-/tmp/llmft-kernels}
export LLMFT_REQUIRE_NVRTC=1 LLMFT_REQUIRE_GPU=1
bin=/tmp/llmft-gpu
rm -rf "$bin" && mkdir -p "$bin" && xz -dc .gpu/bundle.tar.xz | tar -C "$bin" -xf -
# Fixture paths are compiled in: make the build folder point at this checkout.
root=$(cat "$bin/build_root")
if [ "$root" != "$PWD" ] && [ ! -e "$root" ]; then
  mkdir -p "$(dirname "$root")" && ln -s "$PWD" "$root"
fi
# The CLI tests run the binary at its build path (CARGO_BIN_EXE_llmft).
if [ -x "$bin/llmft" ] && [ ! -x "$root/target/release/llmft" ]; then
  mkdir -p "$root/target/release" && cp "$bin/llmft" "$root/target/release/llmft"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"

table="$OUT/table.md"
if [ "$what" != benches ]; then
  echo "| binary | passed | failed | ignored | status |" > "$table"
  echo "|---|---|---|---|---|" >> "$table"
  : > "$OUT/tests.log"
  for t in "$bin"/test/*; do
    name=$(basename "$t")
    log=$(mktemp)
    "$t" --nocapture 2>&1 | tee "$log" >> "$OUT/tests.log"
    rc=${PIPESTATUS[0]}
    sum=$(grep -E '^test result:' "$log" | tail -1)
    p=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$sum"); f=$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$sum")
    i=$(sed -nE 's/.* ([0-9]+) ignored.*/\1/p' <<<"$sum")
    st=PASS; [ "$rc" -ne 0 ] && st="FAIL(rc=$rc)"
    echo "| $name | ${p:-0} | ${f:-0} | ${i:-0} | $st |" >> "$table"
    grep -h '^RESULT ' "$log" >> "$OUT/results.txt" || true
    rm -f "$log"
  done
fi
if [ "$what" != tests ]; then
  : > "$OUT/bench.log"
  for b in "$bin"/bench/*; do
    echo "== $(basename "$b")" >> "$OUT/bench.log"
    case "$b" in
      *__ops) LLMFT_BENCH_SKIP_CPU=1 "$b" --bench "$filter" ;;
      *__quant) echo "quant benches: run scripts/gpu/quant_run.sh (needs the bnb/hqq wheels)" ;;
      *__pipeline) "$b" --bench ;;
      *__model_layers)
        IFS=';' read -ra runs <<< "${MODEL_BENCH_ARGS:-llama3-8b 32 2048 1 nf4;llama3-8b 32 2048 2 nf4;llama3-8b 32 4096 1 nf4;llama3-8b 32 2048 2 hqq4;llama3-8b 32 2048 2 bf16}"
        for a in "${runs[@]}"; do "$b" --bench $a; done ;;
      *) "$b" --bench ;;
    esac 2>&1 | tee -a "$OUT/bench.log" | grep -E '^(cuda|[a-z_]+/)|time:|thrpt:|^\{' || true
  done
fi
if [ "$what" != tests ] && [ -x "$bin/extra/load_rss" ]; then
  # Peak host memory while loading a sharded 8-layer Llama-3-8B-shaped checkpoint.
  ck=/tmp/llmft-rss-ckpt
  "$bin/extra/load_rss" write "$ck" llama3-8b 8 2048 >/dev/null && "$bin/extra/load_rss" load "$ck" | tee "$OUT/load_rss.json"
  rm -rf "$ck"
fi
[ -f "$table" ] && cat "$table"
