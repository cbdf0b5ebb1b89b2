#!/usr/bin/env bash
# The torch FSDP-QLoRA peer on a GPU machine (one GPU, one process):
# scripts/bench/fsdp_offload_peer.py on the Llama-2-70B shape cut to a few
# layers, without and with FSDP CPUOffload(offload_params=True), each with
# FULL_SHARD really running at world size 1 and with torch's own clamp of it to
# NO_SHARD (--keep-full-shard true/false; see the script). Writes under $OUT:
#   peer.jsonl (one JSON object per run), peer.log, peer_device.txt
#
#   bash scripts/gpu/peer_offload.sh
# Needs: python3 with torch, transformers and peft; bitsandbytes (0.50.2, the
# cuda130 library) unzipped from its wheel into .gpu/e2e/site, or PEER_SITE=DIR.
# PEER_LAYERS (8), PEER_SEQ (2048), PEER_MB (2), PEER_STEPS (timed, 10),
# PEER_WARMUP (2), PEER_RUNS (the runs in order, "cpu_offload keep_full_shard"
# pairs: "false true;true true;false false;true false") and
# PEER_EXTRA (more flags for every run, e.g. "--precision bf16_buffers_autocast")
# override the defaults.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
CUDA_LIB=${CUDA_LIB:-$(ls -d /usr/local/cuda-1*/targets/x86_64-linux/lib 2>/dev/null | tail -1)}
export LD_LIBRARY_PATH="$CUDA_LIB:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
site=${PEER_SITE:-$PWD/.gpu/e2e/site}
case $site in /*) ;; *) site=$PWD/$site ;; esac
[ -d "$site/bitsandbytes" ] || echo "warning: no bitsandbytes under $site (the qlora runs will say so)" >&2
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
layers=${PEER_LAYERS:-8}
seq=${PEER_SEQ:-2048}
mb=${PEER_MB:-2}
steps=${PEER_STEPS:-10}
warmup=${PEER_WARMUP:-2}
runs=${PEER_RUNS:-"false true;true true;false false;true false"}
read -ra extra <<< "${PEER_EXTRA:-}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nproc; free -g | sed -n 2p; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/peer_device.txt"
: > "$OUT/peer.jsonl"
log="$OUT/peer.log"
: > "$log"
IFS=';' read -ra list <<< "$runs"
for r in "${list[@]}"; do
  read -r off keep <<< "$r"
  echo "== torch_fsdp_qlora llama2-70b L$layers seq $seq mb $mb cpu_offload=$off keep_full_shard=$keep" \
    "${extra[*]}" | tee -a "$log"
  tmp=$(mktemp)
  python3 scripts/bench/fsdp_offload_peer.py --model llama2-70b --layers "$layers" --train-type qlora \
    --seq "$seq" --micro-batch "$mb" --steps "$steps" --warmup "$warmup" --cpu-offload "$off" \
    --keep-full-shard "$keep" "${extra[@]}" --json "$tmp" >> "$log" 2>&1 \
    || echo "failed: rc=$? (see $log)" | tee -a "$log"
  cat "$tmp" >> "$OUT/peer.jsonl"
  rm -f "$tmp"
done
python3 - "$OUT/peer.jsonl" <<'EOF'
import json, sys
print("| offload params | sharding (effective) | tok/s | step ms | peak GiB | reserved GiB | GPU-resident "
      "weights GiB | host RSS GiB |")
print("|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    if line.strip():
        r = json.loads(line)
        print(f"| {r['offload']['params']} | {r['fsdp']['sharding_effective']} | {r['tokens_per_s']:,.0f} | "
              f"{r['step_ms']:.0f} | {r['peak_gib']:.2f} | {r['reserved_gib']:.2f} | {r['weights_gib']:.2f} | "
              f"{r['host_rss_gib']:.2f} |")
EOF
