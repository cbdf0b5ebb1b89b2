#!/usr/bin/env bash
# The offload benchmarks on a GPU machine (no Rust there): `llmft bench` runs
# resident and offloaded side by side in this one call, optionally with the
# torch FSDP + CPUOffload peer (scripts/gpu/peer_offload.sh). Everything goes
# under $OUT: results.jsonl (one JSON object per run), offload.log, device.txt.
#
#   OFFLOAD_PARTS="smoke 70b 8b" bash scripts/gpu/offload_bench.sh
#   OFFLOAD_PARTS="peer identity full" bash scripts/gpu/offload_bench.sh
# Parts:
#   smoke     a tiny model, resident vs every offload, deterministic (same losses?)
#   70b       Llama-2-70B shape, all 80 layers, QLoRA r16, 2048 x 2: resident vs
#             offloaded params + activations + optimizer
#   8b        Llama-3.1-8B shape QLoRA 2048 x 2: resident, activation offload,
#             activations + params
#   peer      the 70B shape cut to 8 layers: llmft resident and offloaded, then
#             torch FSDP with and without CPUOffload (bitsandbytes from
#             OFFLOAD_SITE, default .gpu/off/site)
#   identity  QLoRA and HQQ-LoRA, 4 layers of the 8B shape, 20 deterministic
#             steps: resident vs all offloads (losses and adapter SHA-256)
#   full      full fine-tuning of a 3B-class shape (8B shape, 8 layers):
#             resident vs offload.optimizer
#   8bparams  the 8B shape with activations + params offloaded, the embedding
#             kept on the GPU, lookahead 1 and 2
#   lean      the offloaded 70B runs (8 and 80 layers) with the embedding
#             offloaded too and no dequantized-weight cache (the lowest peak)
#   peerlean  the lean offloaded 70B-8L run and torch FSDP + CPUOffload
#             (FULL_SHARD kept) side by side
#   longctx   the 8B shape at micro-batch 1, one step per LONG_RUNS entry
#             (LAYERS:SEQ:on|off[:lean], on = activations + params offloaded,
#             lean = attention output recomputed instead of kept):
#             200k tokens on all 32 layers with offload, longer sequences on
#             4 layers (with offload a layer's GPU work does not grow with the
#             layer count), and 32 layers without offload at two lengths
#   load      a bf16 safetensors checkpoint of 70B width (LOAD_LAYERS, 20)
#             written to disk, then loaded as NF4 into the offloaded store
#             (load_rss at $LOAD_RSS_BIN, default .gpu/off/load_rss)
# Needs the CLI at $LLMFT_BIN (default .gpu/off/llmft).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
CUDA_LIB=${CUDA_LIB:-$(ls -d /usr/local/cuda-1*/targets/x86_64-linux/lib 2>/dev/null | tail -1)}
export LD_LIBRARY_PATH="$CUDA_LIB:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export LLMFT_KERNEL_CACHE=${LLMFT_KERNEL_CACHE:-/tmp/llmft-kernels} LLMFT_REQUIRE_NVRTC=1
bin=${LLMFT_BIN:-$PWD/.gpu/off/llmft}
parts=${OFFLOAD_PARTS:-"smoke 70b 8b peer identity full"}
log="$OUT/offload.log"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nproc; free -g | sed -n 2p; date -u +%Y-%m-%dT%H:%MZ; } | tee -a "$OUT/device.txt"
touch "$OUT/results.jsonl"

# run TAG ARGS...: one `llmft bench`, its JSON appended to results.jsonl with the tag.
run() {
  local tag=$1; shift
  echo "== $tag: llmft bench $*" | tee -a "$log"
  local tmp; tmp=$(mktemp)
  local t0=$SECONDS
  "$bin" bench "$@" --json "$tmp" >> "$log" 2>&1 || echo "$tag failed: rc=$?" | tee -a "$log"
  echo "   $tag: $((SECONDS - t0)) s" | tee -a "$log"
  [ -s "$tmp" ] && python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["tag"]=sys.argv[2]; print(json.dumps(d))' \
    "$tmp" "$tag" >> "$OUT/results.jsonl"
  rm -f "$tmp"
}
all_off=(--offload-params --offload-activations --offload-optimizer)

for part in $parts; do
  case $part in
  smoke)
    for v in "" "--offload-params" "--offload-activations" "--offload-optimizer" "${all_off[*]}"; do
      # shellcheck disable=SC2086
      run "smoke${v:+ $v}" --model tiny --seq 256 --micro-batch 2 --steps 4 --warmup 1 \
        --deterministic --gemm-size 0 $v
    done ;;
  70b)
    c=(--model llama2-70b --train-type qlora --seq 2048 --micro-batch 2 --steps 5 --warmup 2 --gemm-size 0)
    run "70b resident" "${c[@]}"
    run "70b offloaded" "${c[@]}" "${all_off[@]}" ;;
  8b)
    c=(--model llama3-8b --train-type qlora --seq 2048 --micro-batch 2 --steps 10 --warmup 3)
    run "8b resident" "${c[@]}"
    run "8b activations" "${c[@]}" --offload-activations --gemm-size 0
    run "8b activations+params" "${c[@]}" --offload-activations --offload-params --gemm-size 0 ;;
  peer)
    c=(--model llama2-70b --layers 8 --train-type qlora --seq 2048 --micro-batch 2 --steps 10 --warmup 3 --gemm-size 0)
    run "70b-8l resident" "${c[@]}"
    run "70b-8l offloaded" "${c[@]}" "${all_off[@]}"
    run "70b-8l params+activations" "${c[@]}" --offload-params --offload-activations
    PEER_SITE=${OFFLOAD_SITE:-$PWD/.gpu/off/site} PEER_RUNS=${PEER_RUNS:-"true true;false false"} \
      PEER_STEPS=${PEER_STEPS:-8} bash scripts/gpu/peer_offload.sh >> "$log" 2>&1
    cat "$OUT/peer.jsonl" >> "$OUT/results.jsonl" ;;
  identity)
    for tt in qlora hqq_lora; do
      c=(--model llama3-8b --layers 4 --train-type "$tt" --seq 2048 --micro-batch 2 --steps 20 --warmup 1
         --deterministic --gemm-size 0)
      run "identity $tt resident" "${c[@]}"
      run "identity $tt offloaded" "${c[@]}" "${all_off[@]}"
    done ;;
  full)
    c=(--model llama3-8b --layers 8 --train-type full --seq 2048 --micro-batch 1 --steps 5 --warmup 2 --gemm-size 0)
    run "full-3b resident" "${c[@]}"
    run "full-3b optimizer" "${c[@]}" --offload-optimizer ;;
  8bparams)
    c=(--model llama3-8b --train-type qlora --seq 2048 --micro-batch 2 --steps 10 --warmup 3 --gemm-size 0)
    run "8b activations+params keep-embedding" "${c[@]}" --offload-activations --offload-params
    run "8b activations+params keep-embedding lookahead 2" "${c[@]}" --offload-activations --offload-params --lookahead 2 ;;
  lean)
    lean=(--keep-embedding false --cache-dequantized false)
    c=(--model llama2-70b --train-type qlora --seq 2048 --micro-batch 2 --gemm-size 0)
    run "70b-8l offloaded lean" "${c[@]}" --layers 8 --steps 10 --warmup 3 "${all_off[@]}" "${lean[@]}"
    run "70b offloaded lean" "${c[@]}" --steps 5 --warmup 2 "${all_off[@]}" "${lean[@]}" ;;
  peerlean)
    c=(--model llama2-70b --layers 8 --train-type qlora --seq 2048 --micro-batch 2 --steps 10 --warmup 3 --gemm-size 0)
    run "70b-8l offloaded lean" "${c[@]}" "${all_off[@]}" --keep-embedding false --cache-dequantized false
    PEER_SITE=${OFFLOAD_SITE:-$PWD/.gpu/off/site} PEER_RUNS="true true" PEER_STEPS=${PEER_STEPS:-6} \
      bash scripts/gpu/peer_offload.sh >> "$log" 2>&1
    cat "$OUT/peer.jsonl" >> "$OUT/results.jsonl" ;;
  longctx)
    # LAYERS:SEQ:on|off[:lean], one optimizer step each (no warm-up: a step at
    # 200k tokens takes minutes); "on" = activations + params offloaded,
    # "lean" = the attention output not kept (recomputed in the backward).
    runs=${LONG_RUNS:-"32:200000:on:lean 4:200000:off 4:200000:on"}
    for spec in $runs; do
      IFS=: read -r L S O K <<< "$spec"
      extra=(); [ "$O" = on ] && extra=(--offload-activations --offload-params)
      [ "${K:-}" = lean ] && extra+=(--keep-attention false)
      echo "== long context: $L layers, seq $S, offload $O" | tee -a "$log"
      t0=$SECONDS
      rm -f "$OUT/long.json"
      timeout "${LONG_TIMEOUT:-300}" "$bin" bench --model llama3-8b --layers "$L" --train-type qlora \
        --seq "$S" --micro-batch 1 --steps 1 --warmup 0 --gemm-size 0 "${extra[@]}" \
        --json "$OUT/long.json" >> "$log" 2>&1 || echo "long context $spec failed: rc=$?" | tee -a "$log"
      echo "   $spec: $((SECONDS - t0)) s" | tee -a "$log"
      [ -s "$OUT/long.json" ] && python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["tag"]=sys.argv[2]; print(json.dumps(d))' \
        "$OUT/long.json" "long context $spec" >> "$OUT/results.jsonl"
    done ;;
  load)
    lr=${LOAD_RSS_BIN:-$PWD/.gpu/off/load_rss}
    dir=${LOAD_DIR:-/tmp/llmft-load-70b}
    rm -rf "$dir"
    echo "== load: writing ${LOAD_LAYERS:-20} layers of the 70B shape to $dir" | tee -a "$log"
    t0=$SECONDS
    "$lr" write "$dir" llama2-70b "${LOAD_LAYERS:-20}" 4096 >> "$log" 2>&1
    echo "   written in $((SECONDS - t0)) s" | tee -a "$log"
    "$lr" load-offloaded "$dir" 2>>"$log" | tee -a "$log" | python3 -c 'import json,sys; d=json.loads(sys.stdin.readline()); d["tag"]="load 70b-width nf4 offloaded"; print(json.dumps(d))' >> "$OUT/results.jsonl"
    rm -rf "$dir" ;;
  *) echo "unknown part $part" | tee -a "$log" ;;
  esac
done
python3 - "$OUT/results.jsonl" <<'EOF' | tee "$OUT/table.md"
import json, sys
print("| run | tok/s | step ms | peak GiB | host RSS GiB | store host GiB | loss last | adapter sha |")
print("|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    d = json.loads(line)
    tag = d.get("tag") or f"{d.get('impl')} {d.get('variant', '')}"
    f = lambda k, fmt="{:.2f}": fmt.format(d[k]) if isinstance(d.get(k), (int, float)) else "-"
    print(f"| {tag} | {f('tokens_per_s', '{:.0f}')} | {f('step_ms_median', '{:.1f}')} | {f('peak_gib')} | "
          f"{f('host_rss_peak_gib')} | {f('store_host_gib')} | {f('loss_last', '{:.6f}')} | {(d.get('trained_sha256') or '-')[:12]} |")
EOF
