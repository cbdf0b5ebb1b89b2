#!/usr/bin/env bash
# The pre-Ampere kernel paths on a newer GPU (H100/H200), for real: the
# CUDA-vs-CPU tests under LLMFT_KERNEL_ARCH=70 and =75, a 20-step QLoRA fp16
# run of the built-in demo job forced onto the sm_70 path against the CPU f32
# run (losses step by step), and the throughput of the sm_70/sm_75 paths next
# to the normal one (`llmft bench`, fp16 QLoRA). Uses the bundle of
# scripts/gpu/build.sh:
#   here:  scripts/gpu/build.sh llmft-tensor llmft-lora llmft-quant llmft-models llmft-trainer
#   there: bash scripts/gpu/arch_check.sh            # or: ... tests | train | bench
# The parts can run in separate calls (each well under 10 minutes on an H200).
# ARCH_PATHS (default "70 75 native") and ARCH_TESTS (test binary names of the
# bundle) choose what `tests` runs. `tiles` compares the attention backward's
# tilings: `llmft bench` of the same jobs with this build and with an earlier
# one at .gpu/old/llmft (from before the 64 × 32 / 64 × 16 tiles, so it took
# the materialized attention on the sm_86 and sm_75 paths), with
# `llmft estimate` of each; the earlier one comes from
# `git worktree add <dir> <commit>; cargo build --release -p llmft`, stripped.
# Run 2 of benches/results/arch/:
#   ARCH_PATHS="native 86 75 70" ARCH_TESTS="llmft-tensor__test__attention
#   llmft-models__test__reference llmft-models__test__checkpointing" arch_check.sh tests
#   arch_check.sh tiles
# Writes under $OUT: arch_check-<part>.jsonl (one JSON object per check), tests-*.log,
# train-*/ (metrics.jsonl of each run), bench-*.json, device.txt.
# ARCH_TRAIN_TOL (default 0.03): the largest relative loss difference allowed.
set -uo pipefail
cd "$(dirname "$0")/../.."
what=${1:-all}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
CUDA_LIB=${CUDA_LIB:-$(ls -d /usr/local/cuda-1*/targets/x86_64-linux/lib 2>/dev/null | tail -1)}
export LD_LIBRARY_PATH="$CUDA_LIB:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export LLMFT_KERNEL_CACHE=${LLMFT_KERNEL_CACHE:-/tmp/llmft-kernels}
export LLMFT_REQUIRE_NVRTC=1 LLMFT_REQUIRE_GPU=1
bin=/tmp/llmft-gpu-arch
rm -rf "$bin" && mkdir -p "$bin" && xz -dc .gpu/bundle.tar.xz | tar -C "$bin" -xf -
root=$(cat "$bin/build_root")
if [ "$root" != "$PWD" ] && [ ! -e "$root" ]; then
  mkdir -p "$(dirname "$root")" && ln -s "$PWD" "$root"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
"$bin/llmft" env | tee -a "$OUT/device.txt"
jl="$OUT/arch_check-$what.jsonl"
: > "$jl"

# 1. CUDA-vs-CPU tests on the sm_70 and sm_75 paths (and the normal path).
if [ "$what" = all ] || [ "$what" = tests ]; then
  for arch in ${ARCH_PATHS:-70 75 native}; do
    for b in ${ARCH_TESTS:-llmft-tensor__test__cuda_vs_cpu llmft-tensor__test__attention \
             llmft-tensor__test__multi_tensor llmft-lora__test__cuda_vs_cpu llmft-quant__test__gpu \
             llmft-models__test__reference llmft-trainer__test__parity}; do
      t="$bin/test/$b"
      [ -x "$t" ] || { echo "{\"check\":\"cuda_vs_cpu\",\"arch\":\"$arch\",\"binary\":\"$(basename "$t")\",\"status\":\"missing\"}" >> "$jl"; continue; }
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
      path=$(grep -m1 -o 'kernels: sm_[0-9]* path[^;]*' "$log" | head -1)
      # The attention test names the backward tiles the path picked.
      tiles=$(grep -m1 -o 'bwd_tiles path=[^"]*' "$log" | head -1)
      skipped=$(grep -c 'skipped' "$log")
      echo "{\"check\":\"cuda_vs_cpu\",\"arch\":\"$arch\",\"binary\":\"$name\",\"passed\":${p:-0},\"failed\":${f:-0},\"rc\":$rc,\"seconds\":$secs,\"skip_lines\":$skipped,\"path_line\":\"${path//\"/}\",\"tiles\":\"$tiles\"}" | tee -a "$jl"
    done
  done
fi

# 2. 20 QLoRA steps of the demo job: CPU f32 vs GPU fp16 on the sm_70 path
#    (and on the normal path, for reference).
if [ "$what" = all ] || [ "$what" = train ]; then
  common=(--set train.max_steps=20 --set train.warmup_steps=5 --set train.eval_every=0
          --set train.checkpoint_every=0 --set train.init_loss_scale=1024)
  run() { # $1 tag, rest: env and args
    local tag=$1; shift
    rm -rf "$OUT/train-$tag"
    env "$@" > "$OUT/train-$tag.log" 2>&1
    echo "train-$tag rc=$?" >> "$OUT/train-$tag.log"
  }
  run cpu-f32 -u LLMFT_KERNEL_ARCH "$bin/llmft" train "${common[@]}" --set model.device=cpu \
    --set model.dtype=f32 --set train.output_dir="$OUT/train-cpu-f32"
  run sm70-f16 LLMFT_KERNEL_ARCH=70 "$bin/llmft" train "${common[@]}" --set model.device=cuda:0 \
    --set model.dtype=auto --set train.output_dir="$OUT/train-sm70-f16"
  run native-f16 -u LLMFT_KERNEL_ARCH "$bin/llmft" train "${common[@]}" --set model.device=cuda:0 \
    --set model.dtype=f16 --set train.output_dir="$OUT/train-native-f16"
  # bf16 on the sm_70 path must be refused with one clear error.
  LLMFT_KERNEL_ARCH=70 "$bin/llmft" train "${common[@]}" --set model.device=cuda:0 \
    --set model.dtype=bf16 --set train.output_dir="$OUT/train-sm70-bf16" > "$OUT/train-sm70-bf16.log" 2>&1
  echo "{\"check\":\"bf16_refused_on_sm70\",\"rc\":$?,\"message\":$(tail -1 "$OUT/train-sm70-bf16.log" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))')}" | tee -a "$jl"
  TOL=${ARCH_TRAIN_TOL:-0.03} python3 - "$OUT" >> "$jl" <<'PY'
import json, os, sys
out = sys.argv[1]
def losses(tag):
    p = os.path.join(out, f"train-{tag}", "metrics.jsonl")
    rows = []
    if os.path.exists(p):
        for line in open(p):
            r = json.loads(line)
            if "loss" in r and "step" in r and "eval_loss" not in r:
                rows.append(r)
    return rows
cpu = {r["step"]: r for r in losses("cpu-f32")}
tol = float(os.environ["TOL"])
for tag in ["sm70-f16", "native-f16"]:
    g = losses(tag)
    diffs = [abs(r["loss"] - cpu[r["step"]]["loss"]) / abs(cpu[r["step"]]["loss"]) for r in g if r["step"] in cpu]
    tps = [r.get("tokens_per_s", 0) for r in g[3:]]
    res = {
        "check": "qlora_f16_vs_cpu_f32", "run": tag, "steps": len(g), "cpu_steps": len(cpu),
        "max_rel_loss_diff": max(diffs) if diffs else None, "tol": tol,
        "skipped_steps": sum(1 for r in g if r.get("skipped")),
        "losses": [round(r["loss"], 5) for r in g],
        "cpu_losses": [round(cpu[s]["loss"], 5) for s in sorted(cpu)],
        "tokens_per_s_median": sorted(tps)[len(tps) // 2] if tps else None,
        "pass": bool(diffs) and len(g) == 20 and len(cpu) == 20 and max(diffs) <= tol,
    }
    print(json.dumps(res))
    print(json.dumps(res), file=sys.stderr)
PY
fi

# 3. Throughput: Llama-3-8B-shaped QLoRA (8 layers), fp16, on each path.
if [ "$what" = all ] || [ "$what" = bench ]; then
  args=(bench --model llama3-8b --layers 8 --train-type qlora --seq 2048 --micro-batch 1
        --dtype f16 --steps 10 --warmup 3 --gemm-size 0)
  for arch in native 75 70; do
    j="$OUT/bench-$arch.json"; rm -f "$j"
    if [ "$arch" = native ]; then
      env -u LLMFT_KERNEL_ARCH "$bin/llmft" "${args[@]}" --json "$j" > "$OUT/bench-$arch.log" 2>&1
    else
      LLMFT_KERNEL_ARCH=$arch "$bin/llmft" "${args[@]}" --json "$j" > "$OUT/bench-$arch.log" 2>&1
    fi
    rc=$?
    python3 - "$j" "$arch" "$rc" <<'PY' | tee -a "$jl"
import json, sys
p, arch, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    b = json.load(open(p))
except Exception:
    b = {}
print(json.dumps({"check": "throughput", "path": arch, "rc": rc,
                  "tokens_per_s": b.get("tokens_per_s"), "step_ms_median": b.get("step_ms_median"),
                  "peak_gib": b.get("peak_gib", b.get("peak_allocated_gib")),
                  "loss_first": b.get("loss_first"), "loss_last": b.get("loss_last")}))
PY
  done
fi
# 4. Throughput and peak of the same jobs: this build's tilings against the
#    materialized attention of the earlier build on the sm_86 and sm_75
#    paths, and the native path's 128 × 64 tiles for reference.
if [ "$what" = tiles ]; then
  old=.gpu/old/llmft
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
