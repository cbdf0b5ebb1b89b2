#!/usr/bin/env bash
# Jobs no earlier benchmark measured, each run by `llmft bench` (a few steps)
# next to `llmft estimate --json` of the same flags, so the estimate meets
# peaks it was not written against. Needs .gpu/dist/llmft (scripts/gpu/dist_build.sh
# or any release build of the CLI copied there).
#   there: OUT=... bash scripts/gpu/estimate_check.sh
# Writes $OUT/estimate-check.jsonl: one bench JSON object per job (with
# "tag") and $OUT/estimate-pred.jsonl: the estimate of each (same tag).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
CUDA_LIB=${CUDA_LIB:-$(ls -d /usr/local/cuda-1*/targets/x86_64-linux/lib 2>/dev/null | tail -1)}
export LD_LIBRARY_PATH="$CUDA_LIB:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export LLMFT_KERNEL_CACHE=${LLMFT_KERNEL_CACHE:-/tmp/llmft-kernels}
B=${LLMFT_BIN:-.gpu/dist/llmft}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/estimate-device.txt"
: > "$OUT/estimate-check.jsonl"; : > "$OUT/estimate-pred.jsonl"
jobs=(
  "qwen3-8b qlora 2048x2|--model qwen3-8b --micro-batch 2"
  "8b qlora no checkpointing 2048x1|--model llama3-8b --checkpointing false"
  "8b lora attention recomputed 2048x2|--model llama3-8b --train-type lora --keep-attention false --micro-batch 2"
  "8b-8l freeze 2048x1|--model llama3-8b --layers 8 --train-type freeze"
  "8b-4l hqq_dora 2048x2|--model llama3-8b --layers 4 --train-type hqq_dora --micro-batch 2"
  "8b qlora 8192x1 activations offloaded|--model llama3-8b --seq 8192 --offload-activations"
  "7b int8_lora 2048x2|--model llama2-7b --train-type int8_lora --micro-batch 2"
  "70b-8l sim2 shard_grad_op 2048x2|--model llama2-70b --layers 8 --simulate-world 2 --strategy shard_grad_op --micro-batch 2"
  "70b-16l offload all lean 4096x1|--model llama2-70b --layers 16 --seq 4096 --offload-params --offload-activations --offload-optimizer --cache-dequantized false --keep-embedding false"
)
for j in "${jobs[@]}"; do
  tag=${j%%|*}; flags=${j#*|}
  echo "== $tag" >&2
  # shellcheck disable=SC2086
  if "$B" bench $flags --steps 4 --warmup 1 --gemm-size 0 > "$OUT/bench.tmp" 2> "$OUT/bench-err.tmp"; then
    python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); v["tag"]=sys.argv[2]; print(json.dumps(v))' "$OUT/bench.tmp" "$tag" >> "$OUT/estimate-check.jsonl"
  else
    echo "bench failed: $tag: $(tail -2 "$OUT/bench-err.tmp")" | tee -a "$OUT/estimate-errors.txt" >&2
  fi
  # shellcheck disable=SC2086
  "$B" estimate $flags --json | python3 -c 'import json,sys; v=json.load(sys.stdin); v["tag"]=sys.argv[1]; print(json.dumps(v))' "$tag" >> "$OUT/estimate-pred.jsonl"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
pred = {json.loads(l)["tag"]: json.loads(l) for l in open(f"{out}/estimate-pred.jsonl")}
for l in open(f"{out}/estimate-check.jsonl"):
    m = json.loads(l); p = pred[m["tag"]]
    g = p["gpu_peak_gib"] / m["peak_gib"] - 1
    h = m.get("host_rss_peak_gib")
    hs = f" host {h:.2f} vs {p['host_peak_gib']:.2f}" if h else ""
    print(f"{m['tag']:<44} gpu measured {m['peak_gib']:7.3f} estimated {p['gpu_peak_gib']:7.3f} ({100*g:+.1f}%){hs}  {m['tokens_per_s']:.0f} tok/s")
PY
