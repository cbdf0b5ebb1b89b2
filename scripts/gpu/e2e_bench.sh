#!/usr/bin/env bash
# The end-to-end training benchmark on a GPU machine (no Rust there): for each
# configuration, `llmft bench` (the prebuilt binary) and its Hugging Face
# counterpart (scripts/bench/hf_train_bench.py: transformers + peft +
# bitsandbytes) run one after the other in this same call; then a table of
# llmft ÷ HF ratios. Everything is written under $OUT:
#   results.jsonl (one JSON object per run), table.md, e2e.log, device.txt
#
#   bash scripts/gpu/e2e_bench.sh
# Needs: .gpu/e2e/llmft (cargo build --release -p llmft; copied there) and
# .gpu/e2e/site (bitsandbytes 0.50.2 unzipped from its wheel, cuda130 library).
# E2E_RUNS overrides the runs: "model train_type seq micro_batch layers;...".
# E2E_ONLY=llmft|hf runs one side only. QLoRA runs are also measured with
# HF's tutorial recipe (peft.prepare_model_for_kbit_training) unless E2E_KBIT=0.
# E2E_LLMFT_VARIANTS="--skip-layers 10|--skip-layers 12" adds llmft runs of
# each configuration with those extra flags ('|'-separated).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
CUDA_LIB=${CUDA_LIB:-$(ls -d /usr/local/cuda-1*/targets/x86_64-linux/lib 2>/dev/null | tail -1)}
export LD_LIBRARY_PATH="$CUDA_LIB:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export LLMFT_KERNEL_CACHE=${LLMFT_KERNEL_CACHE:-/tmp/llmft-kernels} LLMFT_REQUIRE_NVRTC=1
export PYTHONPATH="$PWD/.gpu/e2e/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
bin=${LLMFT_BIN:-$PWD/.gpu/e2e/llmft}
runs=${E2E_RUNS:-"llama3-8b qlora 2048 2 32;llama3-8b lora 2048 2 32;llama3-8b qlora 4096 1 32"}
only=${E2E_ONLY:-}
steps=${E2E_STEPS:-12}
warmup=${E2E_WARMUP:-3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/device.txt"
: > "$OUT/results.jsonl"
log="$OUT/e2e.log"
: > "$log"
IFS=';' read -ra list <<< "$runs"
for r in "${list[@]}"; do
  read -r model tt seq mb layers <<< "$r"
  common=(--model "$model" --layers "$layers" --train-type "$tt" --seq "$seq" --micro-batch "$mb"
          --checkpointing true --steps "$steps" --warmup "$warmup")
  tag="$model $tt seq $seq mb $mb L$layers"
  if [ "$only" != hf ]; then
    echo "== llmft $tag" | tee -a "$log"
    tmp=$(mktemp)
    "$bin" bench "${common[@]}" --json "$tmp" >> "$log" 2>&1 || echo "llmft failed: rc=$?" | tee -a "$log"
    cat "$tmp" >> "$OUT/results.jsonl"; rm -f "$tmp"
    IFS='|' read -ra variants <<< "${E2E_LLMFT_VARIANTS:-}"
    for extra in "${variants[@]}"; do
      [ -n "$extra" ] || continue
      echo "== llmft $tag $extra" | tee -a "$log"
      tmp=$(mktemp)
      # shellcheck disable=SC2086
      "$bin" bench "${common[@]}" $extra --json "$tmp" >> "$log" 2>&1 || echo "llmft failed: rc=$?" | tee -a "$log"
      cat "$tmp" >> "$OUT/results.jsonl"; rm -f "$tmp"
    done
  fi
  if [ "$only" != llmft ]; then
    echo "== hf $tag" | tee -a "$log"
    tmp=$(mktemp)
    python3 scripts/bench/hf_train_bench.py "${common[@]}" --json "$tmp" >> "$log" 2>&1 \
      || echo "hf failed: rc=$?" | tee -a "$log"
    cat "$tmp" >> "$OUT/results.jsonl"; rm -f "$tmp"
    if [ "$tt" = qlora ] && [ "${E2E_KBIT:-1}" = 1 ]; then
      echo "== hf+kbit-prep $tag" | tee -a "$log"
      tmp=$(mktemp)
      python3 scripts/bench/hf_train_bench.py "${common[@]}" --kbit-prep --json "$tmp" >> "$log" 2>&1 \
        || echo "hf+kbit-prep failed: rc=$?" | tee -a "$log"
      cat "$tmp" >> "$OUT/results.jsonl"; rm -f "$tmp"
    fi
  fi
done
python3 scripts/bench/e2e_table.py "$OUT/results.jsonl" | tee "$OUT/table.md"
