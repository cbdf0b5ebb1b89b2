#!/usr/bin/env bash
# Multi-process checks and benchmarks on a GPU machine (no Rust there).
# Binaries come from `bash scripts/gpu/dist_build.sh` (here) in .gpu/dist/.
# Everything goes under $OUT: results.jsonl (one JSON object per run, tagged),
# dist.log, device.txt, table.md.
#
#   DIST_PARTS="nccl world1 sim70b" bash scripts/gpu/dist_bench.sh    # one GPU
#   DIST_PARTS="nccl two70b" bash scripts/gpu/dist_bench.sh           # 2+ GPUs
# Parts:
#   nccl    the NCCL test binary: every collective against the CPU backend at
#           world 1 (and at world 2 with two GPUs), bad arguments, the watchdog
#   world1  the demo job through a real NCCL communicator at world 1
#           (full_shard, shard_grad_op, no_shard) against the plain run,
#           deterministic attention: per-step losses and adapter SHA-256
#   world1bench  the 70B shape cut to 8 layers, resident against the sharded
#           store gathering through NCCL at world 1 (same losses? tokens/s?)
#   sim70b  rank 0 of a 2-rank Llama-2-70B NF4 QLoRA r16 job, seq 2048
#           (`llmft bench --simulate-world 2`): with parameter offload at
#           micro-batch 2, and without it at micro-batch 1
#   two70b  the same job on two real GPUs (`llmft launch --nproc-per-node 2
#           -- bench --backend nccl`): full_shard with and without parameter
#           offload, against the single-GPU offloaded run in the same call
#   two8b   Llama-3.1-8B QLoRA 2048 x 2 on two GPUs: no_shard (DDP) and
#           full_shard against one GPU
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
CUDA_LIB=${CUDA_LIB:-$(ls -d /usr/local/cuda-1*/targets/x86_64-linux/lib 2>/dev/null | tail -1)}
# NCCL packages ship libnccl.so.2 only; the binding also looks for libnccl.so.
nccl_link=/tmp/llmft-nccl
mkdir -p "$nccl_link"
for d in /usr/lib/x86_64-linux-gnu "$CUDA_LIB"; do
  [ -e "$d/libnccl.so.2" ] && ln -sf "$d/libnccl.so.2" "$nccl_link/libnccl.so" && break
done
export LD_LIBRARY_PATH="$nccl_link:$CUDA_LIB:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export LLMFT_KERNEL_CACHE=${LLMFT_KERNEL_CACHE:-/tmp/llmft-kernels} LLMFT_REQUIRE_NVRTC=1
export NCCL_NVLS_ENABLE=0
bin=${LLMFT_BIN:-$PWD/.gpu/dist/llmft}
parts=${DIST_PARTS:-"nccl world1 sim70b"}
log="$OUT/dist.log"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nproc; free -g | sed -n 2p; date -u +%Y-%m-%dT%H:%MZ; } | tee -a "$OUT/device.txt"
touch "$OUT/results.jsonl"
gpus=$(nvidia-smi -L | wc -l)

# tagged FILE TAG: appends FILE's JSON object to results.jsonl with a tag.
tagged() {
  [ -s "$1" ] && python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["tag"]=sys.argv[2]; print(json.dumps(d))' \
    "$1" "$2" >> "$OUT/results.jsonl"
  rm -f "$1"
}
# bench TAG ARGS...: one `llmft bench` (or `llmft launch ... -- bench` when
# ARGS start with "launch").
bench() {
  local tag=$1; shift
  echo "== $tag: llmft $*" | tee -a "$log"
  local tmp; tmp=$(mktemp)
  local t0=$SECONDS
  if [ "$1" = launch ]; then
    timeout 580 "$bin" "$@" --json "$tmp" >> "$log" 2>&1 || echo "$tag failed: rc=$?" | tee -a "$log"
  else
    timeout 580 "$bin" bench "$@" --json "$tmp" >> "$log" 2>&1 || echo "$tag failed: rc=$?" | tee -a "$log"
  fi
  echo "   $tag: $((SECONDS - t0)) s" | tee -a "$log"
  tagged "$tmp" "$tag"
}
q70=(--model llama2-70b --train-type qlora --seq 2048 --gemm-size 0 --offload-activations --offload-optimizer)

for part in $parts; do
  case $part in
  nccl)
    echo "== nccl test binary" | tee -a "$log"
    LLMFT_REQUIRE_GPU=1 "$PWD/.gpu/dist/nccl_test" --nocapture --test-threads 1 >> "$log" 2>&1 \
      && echo "   nccl tests passed" | tee -a "$log" || echo "   nccl tests FAILED" | tee -a "$log" ;;
  world1)
    for v in plain full_shard shard_grad_op no_shard; do
      o=/tmp/llmft-w1-$v
      rm -rf "$o"
      sets=(--set train.max_steps=20 --set train.eval_every=0 --set train.deterministic=true)
      [ "$v" != plain ] && sets+=(--set 'dist.backend="nccl"' --set "dist.strategy=\"$v\"")
      echo "== world1 $v" | tee -a "$log"
      timeout 300 "$bin" train --quiet --output-dir "$o" "${sets[@]}" >> "$log" 2>&1 \
        || echo "world1 $v failed: rc=$?" | tee -a "$log"
      python3 - "$o" "$v" >> "$OUT/results.jsonl" <<'EOF'
import hashlib, json, os, sys
o, v = sys.argv[1:]
m = [json.loads(l) for l in open(os.path.join(o, "metrics.jsonl"))] if os.path.exists(os.path.join(o, "metrics.jsonl")) else []
f = os.path.join(o, "adapter", "adapter_model.safetensors")
sha = hashlib.sha256(open(f, "rb").read()).hexdigest() if os.path.exists(f) else None
print(json.dumps({"tag": f"world1 {v}", "impl": "llmft", "model": "demo", "world_size": 1,
                  "simulated": False, "backend": None if v == "plain" else "nccl", "strategy": v,
                  "losses": [x["loss"] for x in m if "loss" in x], "trained_sha256": sha}))
EOF
    done ;;
  world1bench)
    c=(--model llama2-70b --layers 8 --train-type qlora --seq 2048 --micro-batch 2 --steps 8 --warmup 3 --gemm-size 0 --deterministic)
    bench "70b-8l resident" "${c[@]}"
    bench "70b-8l nccl world 1 full_shard" "${c[@]}" --backend nccl --strategy full_shard
    bench "70b-8l nccl world 1 full_shard params offloaded" "${c[@]}" --backend nccl --strategy full_shard --offload-params ;;
  sim70b)
    bench "70b sim2 full_shard params offloaded mb2" "${q70[@]}" --micro-batch 2 --steps 5 --warmup 2 \
      --simulate-world 2 --offload-params
    bench "70b sim2 full_shard params offloaded mb2 lean" "${q70[@]}" --micro-batch 2 --steps 5 --warmup 2 \
      --simulate-world 2 --offload-params --keep-embedding false --cache-dequantized false
    bench "70b sim2 full_shard resident shards mb1" "${q70[@]}" --micro-batch 1 --steps 5 --warmup 2 \
      --simulate-world 2 --cache-dequantized false ;;
  two70b)
    if [ "$gpus" -lt 2 ]; then echo "two70b: $gpus GPU(s), skipped" | tee -a "$log"; continue; fi
    bench "70b 1 GPU offloaded mb2" "${q70[@]}" --micro-batch 2 --steps 5 --warmup 2 --offload-params
    bench "70b 2 GPUs full_shard params offloaded mb2" launch --nproc-per-node 2 -- bench "${q70[@]}" \
      --micro-batch 2 --steps 5 --warmup 2 --offload-params --backend nccl --strategy full_shard
    bench "70b 2 GPUs full_shard resident shards mb1" launch --nproc-per-node 2 -- bench "${q70[@]}" \
      --micro-batch 1 --steps 5 --warmup 2 --cache-dequantized false --backend nccl --strategy full_shard ;;
  two8b)
    if [ "$gpus" -lt 2 ]; then echo "two8b: $gpus GPU(s), skipped" | tee -a "$log"; continue; fi
    c=(--model llama3-8b --train-type qlora --seq 2048 --micro-batch 2 --steps 10 --warmup 3 --gemm-size 0)
    bench "8b 1 GPU" "${c[@]}"
    bench "8b 2 GPUs no_shard" launch --nproc-per-node 2 -- bench "${c[@]}" --backend nccl --strategy no_shard
    bench "8b 2 GPUs full_shard" launch --nproc-per-node 2 -- bench "${c[@]}" --backend nccl --strategy full_shard ;;
  *) echo "unknown part $part" | tee -a "$log" ;;
  esac
done
python3 - "$OUT/results.jsonl" <<'EOF' | tee "$OUT/table.md"
import json, sys
print("| run | world | simulated | tok/s | step ms | peak GiB | host RSS GiB | loss last | adapter sha |")
print("|---|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    d = json.loads(line)
    f = lambda k, fmt="{:.2f}": fmt.format(d[k]) if isinstance(d.get(k), (int, float)) else "-"
    last = d["losses"][-1] if d.get("losses") else None
    print(f"| {d.get('tag')} | {d.get('world_size', '-')} | {d.get('simulated', '-')} | {f('tokens_per_s', '{:.0f}')} | "
          f"{f('step_ms_median', '{:.1f}')} | {f('peak_gib')} | {f('host_rss_peak_gib')} | "
          f"{'-' if last is None else format(last, '.6f')} | {(d.get('trained_sha256') or '-')[:12]} |")
EOF
