#!/usr/bin/env bash
# Multi-process checks and benchmarks on a GPU machine (no Rust there).
# Binaries come from `bash scripts/gpu/dist_build.sh` (here) in .gpu/dist/.
# Everything goes under $OUT: results.jsonl (one JSON object per run, tagged),
# dist.log, device.txt, table.md.
#
#   DIST_PARTS="nccl world1 sim70b" bash scripts/gpu/dist_bench.sh    # one GPU
#   DIST_PARTS="nccl two8b kill" bash scripts/gpu/dist_bench.sh       # 2+ GPUs (see below)
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
#           full_shard against one GPU at the same global batch (accumulating
#           two micro-batches; twice, for the run-to-run spread)
#   kill    kill -9 of rank 1 of a world-2 NCCL training job, under `llmft
#           launch` and with the ranks started by hand: seconds to the end
#   checks  issue 14's figures from results.jsonl: losses against the
#           spread, scaling, per-rank peaks against the simulated ones,
#           step time against the simulated rank's, the kill times
# On nvidia-h200-x2, three calls (each under the 600 s limit; same $OUT):
#   DIST_PARTS="nccl two8b kill" ...; DIST_PARTS="sim70b" ...;
#   DIST_PARTS="two70b checks" ...   then `bash scripts/gpu/run.sh tests`.
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
    # The same global batches (bench draws each global micro-batch's tokens
    # from its index): world 1 accumulating two micro-batches, twice (the
    # run-to-run spread the world-2 losses are judged against), and world 2
    # with one each.
    c=(--model llama3-8b --train-type qlora --seq 2048 --micro-batch 2 --steps 12 --warmup 3 --gemm-size 0)
    bench "8b 1 GPU ga2 run 1" "${c[@]}" --grad-accum 2
    bench "8b 1 GPU ga2 run 2" "${c[@]}" --grad-accum 2
    bench "8b 2 GPUs no_shard" launch --nproc-per-node 2 -- bench "${c[@]}" --backend nccl --strategy no_shard
    bench "8b 2 GPUs full_shard" launch --nproc-per-node 2 -- bench "${c[@]}" --backend nccl --strategy full_shard ;;
  kill)
    kb=${KILL_BACKEND:-nccl}  # KILL_BACKEND=cpu tries the part on a machine without GPUs
    if [ "$kb" = nccl ] && [ "$gpus" -lt 2 ]; then echo "kill: $gpus GPU(s), skipped" | tee -a "$log"; continue; fi
    # kill -9 of rank 1 of a world-2 NCCL training job, under `llmft launch`
    # and started by hand (as srun without --kill-on-bad-exit would leave
    # it): seconds until the job has ended.
    for mode in launch manual; do
      o=/tmp/llmft-kill-$mode; rm -rf "$o"; klog="$OUT/kill-$mode.log"
      port=$((29600 + RANDOM % 200))
      sets=(train --quiet --output-dir "$o" --set train.max_steps=1000000 --set train.eval_every=0
            --set train.checkpoint_every=0 --set "dist.backend=\"$kb\"" --set 'dist.strategy="full_shard"'
            --set dist.timeout_s=15)
      pids=()
      if [ "$mode" = launch ]; then
        "$bin" launch --nproc-per-node 2 --master-port "$port" -- "${sets[@]}" > "$klog" 2>&1 &
        pids=($!)
      else
        for r in 0 1; do
          MASTER_ADDR=127.0.0.1 MASTER_PORT=$port WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r \
            "$bin" "${sets[@]}" >> "$klog" 2>&1 &
          pids+=($!)
        done
      fi
      sleep 25
      victim=""
      for c in $(pgrep -f "llmft-kill-$mode"); do
        grep -qz '^RANK=1$' "/proc/$c/environ" 2>/dev/null && grep -qz '^LOCAL_RANK=1$' "/proc/$c/environ" && victim=$c
      done
      t0=$(date +%s.%N)
      [ -n "$victim" ] && kill -9 "$victim"
      rc=0; for p in "${pids[@]}"; do timeout 120 tail --pid="$p" -f /dev/null; wait "$p"; rc=$((rc | $?)); done
      left=$(pgrep -fc "llmft-kill-$mode")
      secs=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
      pkill -9 -f "llmft-kill-$mode"
      python3 - "$klog" "$mode" "$victim" "$secs" "$rc" "$left" "$kb" >> "$OUT/results.jsonl" <<'PY'
import json, sys
klog, mode, victim, secs, rc, left = sys.argv[1:7]
tail = open(klog, errors="replace").read().strip().splitlines()[-4:]
print(json.dumps({"tag": f"kill -9 rank 1 ({mode})", "impl": "llmft", "world_size": 2, "backend": sys.argv[7],
                  "victim_pid": victim or None, "seconds_to_end": float(secs), "rc": int(rc),
                  "processes_left": int(left), "last_lines": tail}))
PY
      tail -1 "$OUT/results.jsonl" | tee -a "$log"
    done ;;
  checks)
    # Issue 14's figures from results.jsonl (this call's and earlier ones'
    # under the same $OUT).
    python3 - "$OUT/results.jsonl" <<'PY' | tee "$OUT/checks.txt"
import json, sys
rows = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    rows[d.get("tag")] = d
def g(tag, key):
    return rows.get(tag, {}).get(key)
def rel(a, b):
    return abs(a - b) / abs(b)
r1, r2 = g("8b 1 GPU ga2 run 1", "losses"), g("8b 1 GPU ga2 run 2", "losses")
if r1 and r2:
    spread = max(rel(a, b) for a, b in zip(r1, r2))
    print(f"1. world-1 run-to-run spread (max relative per-step loss difference): {spread:.2e}")
    for s in ["no_shard", "full_shard"]:
        w2 = g(f"8b 2 GPUs {s}", "losses")
        if w2:
            d = max(rel(a, b) for a, b in zip(w2, r1))
            print(f"   world 2 {s} vs world 1: {d:.2e} ({d / max(spread, 1e-12):.1f}x the spread)")
            t1, t2 = g("8b 1 GPU ga2 run 1", "tokens_per_s"), g(f"8b 2 GPUs {s}", "tokens_per_s")
            print(f"2. {s} scaling: {t2:.0f} / {t1:.0f} tok/s = {t2 / t1:.3f}x (check: >= 1.9)")
one = g("70b 1 GPU offloaded mb2", "tokens_per_s")
for two, sim in [("70b 2 GPUs full_shard params offloaded mb2", "70b sim2 full_shard params offloaded mb2"),
                 ("70b 2 GPUs full_shard resident shards mb1", "70b sim2 full_shard resident shards mb1")]:
    p2, ps = g(two, "peak_gib"), g(sim, "peak_gib")
    if p2 is None:
        continue
    line = f"3. {two}: peak {p2:.2f} GiB per rank, {g(two, 'tokens_per_s'):.0f} tok/s"
    if one:
        line += f" ({g(two, 'tokens_per_s') / one:.2f}x the one-GPU offloaded run)"
    if ps:
        line += f"; simulated {ps:.2f} GiB ({100 * (p2 / ps - 1):+.1f}%)"
        s2, ss = g(two, "step_ms_median"), g(sim, "step_ms_median")
        if s2 and ss:
            line += f"\n4. step {s2:.0f} ms vs the simulated rank's {ss:.0f} ms = {s2 / ss:.3f}x (check: <= 1.1)"
    print(line)
for m in ["launch", "manual"]:
    k = rows.get(f"kill -9 rank 1 ({m})")
    if k:
        print(f"5. kill -9 of rank 1 ({m}): job ended after {k['seconds_to_end']} s, rc {k['rc']}, "
              f"{k['processes_left']} processes left (check: <= 30 s)")
PY
    ;;
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
