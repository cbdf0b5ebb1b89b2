#!/usr/bin/env bash
# The fused attention backward's smaller tilings (64 keys × 32 queries for
# the 99 KiB of sm_86/89 and the 96 KiB of sm_70, 64 × 16 for the 64 KiB of
# sm_75) on an H100/H200, through the forced kernel paths
# (LLMFT_KERNEL_ARCH): the CUDA-vs-CPU attention and model tests on each
# path, the one-GPU NCCL watchdog test, and `llmft bench` of the same jobs
# with this build and with a build from before the tilings (which took the
# materialized attention on those paths), so the two sit side by side.
#   here:  scripts/gpu/build.sh llmft-tensor llmft-models llmft-shard
#          (and the earlier CLI at .gpu/old/llmft: git worktree add <dir>
#          <commit>; cargo build --release -p llmft; strip; copy)
#   there: bash scripts/gpu/attn_tiles.sh tests    # then: ... bench
# Writes under $OUT: attn_tiles-<part>.jsonl (one object per check or run),
# tests-*.log, bench-*.json / .log, device.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
what=${1:-all}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
CUDA_LIB=${CUDA_LIB:-$(ls -d /usr/local/cuda-1*/targets/x86_64-linux/lib 2>/dev/null | tail -1)}
export LD_LIBRARY_PATH="$CUDA_LIB:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export LLMFT_KERNEL_CACHE=${LLMFT_KERNEL_CACHE:-/tmp/llmft-kernels}
export LLMFT_REQUIRE_NVRTC=1 LLMFT_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0
bin=/tmp/llmft-gpu-tiles
if [ ! -x "$bin/llmft" ]; then
  rm -rf "$bin" && mkdir -p "$bin" && xz -dc .gpu/bundle.tar.xz | tar -C "$bin" -xf -
fi
root=$(cat "$bin/build_root")
if [ "$root" != "$PWD" ] && [ ! -e "$root" ]; then
  mkdir -p "$(dirname "$root")" && ln -s "$PWD" "$root"
fi
old=.gpu/old/llmft
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
jl="$OUT/attn_tiles-$what.jsonl"
: > "$jl"

# 1. CUDA vs CPU on each kernel path: the attention op (every tiling the
#    path picks), the models (their fused attention), checkpointing modes.
if [ "$what" = all ] || [ "$what" = tests ]; then
  for arch in native 86 75 70; do
    for t in "$bin"/test/llmft-tensor__test__attention "$bin"/test/llmft-models__test__reference \
             "$bin"/test/llmft-models__test__checkpointing; do
      name=$(basename "$t")
      log="$OUT/tests-$arch-$name.log"
      start=$(date +%s.%N)
      if [ "$arch" = native ]; then
        env -u LLMFT_KERNEL_ARCH "$t" --test-threads 1 --nocapture > "$log" 2>&1; rc=$?
      else
        LLMFT_KERNEL_ARCH=$arch "$t" --test-threads 1 --nocapture > "$log" 2>&1; rc=$?
      fi
      secs=$(python3 -c "import time; print(round(time.time() - $start, 1))")
      sum=$(grep -E '^test result:' "$log" | tail -1)
      p=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$sum"); f=$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$sum")
      tiles=$(grep -m1 -o 'bwd_tiles path=[^"]*' "$log" | head -1)
      skipped=$(grep -c 'skipped' "$log")
      echo "{\"check\":\"cuda_vs_cpu\",\"path\":\"$arch\",\"binary\":\"$name\",\"passed\":${p:-0},\"failed\":${f:-0},\"rc\":$rc,\"seconds\":$secs,\"skip_lines\":$skipped,\"tiles\":\"$tiles\"}" | tee -a "$jl"
    done
  done
  t="$bin"/test/llmft-shard__test__nccl
  "$t" --test-threads 1 --nocapture > "$OUT/tests-nccl.log" 2>&1; rc=$?
  sum=$(grep -E '^test result:' "$OUT/tests-nccl.log" | tail -1)
  echo "{\"check\":\"nccl_one_gpu\",\"rc\":$rc,\"summary\":\"$sum\",\"watchdog\":\"$(grep -m1 -o 'stalled collective: [^"]*' "$OUT/tests-nccl.log")\"}" | tee -a "$jl"
fi

# 2. Throughput and peak of the same jobs: this build's tilings against the
#    materialized attention of the earlier build on the sm_86 and sm_75
#    paths, and the native path's 128 × 64 tiles for reference.
if [ "$what" = all ] || [ "$what" = bench ]; then
  common=(--steps 6 --warmup 2 --gemm-size 0)
  jobs=(
    "8b-8l qlora bf16 2048x2|--model llama3-8b --layers 8 --train-type qlora --seq 2048 --micro-batch 2"
    "70b-4l qlora bf16 2048x1|--model llama2-70b --layers 4 --train-type qlora --seq 2048 --micro-batch 1"
    "8b-8l qlora f16 2048x1|--model llama3-8b --layers 8 --train-type qlora --seq 2048 --micro-batch 1 --dtype f16"
  )
  for j in "${jobs[@]}"; do
    tag=${j%%|*}; flags=${j#*|}
    case "$tag" in
      *" f16 "*) runs="new:native new:75 old:75" ;;
      *) runs="new:native new:86 old:86" ;;
    esac
    for r in $runs; do
      build=${r%%:*}; arch=${r#*:}
      b="$bin/llmft"; [ "$build" = old ] && b=$old
      f="$OUT/bench-${tag// /_}-$build-$arch"
      # shellcheck disable=SC2086
      if [ "$arch" = native ]; then
        env -u LLMFT_KERNEL_ARCH "$b" bench $flags "${common[@]}" --json "$f.json" > "$f.log" 2>&1; rc=$?
      else
        LLMFT_KERNEL_ARCH=$arch "$b" bench $flags "${common[@]}" --json "$f.json" > "$f.log" 2>&1; rc=$?
      fi
      python3 - "$f.json" "$tag" "$build" "$arch" "$rc" <<'PY' | tee -a "$jl"
import json, sys
p, tag, build, arch, rc = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
try:
    b = json.load(open(p))
except Exception:
    b = {}
attn = {("new", "native"): "fused 128x64", ("new", "86"): "fused 64x32",
        ("new", "75"): "fused 64x16", ("old", "86"): "materialized",
        ("old", "75"): "materialized"}[(build, arch)]
b.update({"tag": tag, "build": build, "kernel_path": arch, "attention": attn, "rc": rc,
          "simulated": False})
print(json.dumps(b))
PY
    done
    # shellcheck disable=SC2086
    "$bin/llmft" estimate $flags --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(json.dumps({"tag": sys.argv[1], "estimate_gpu_peak_gib": v["gpu_peak_gib"]}))' "$tag" | tee -a "$jl"
  done
fi
echo "wrote $jl"
