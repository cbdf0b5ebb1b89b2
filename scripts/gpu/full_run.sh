#!/usr/bin/env bash
# The whole GPU pass, in one call on a GPU machine with torch, transformers and
# peft: the reference fixtures that need them (LoRA vs PEFT), every test binary
# of .gpu/bundle.tar.xz (scripts/gpu/build.sh), the check that PEFT loads the
# adapters llmft saved, then the CUDA benches. Outputs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ "${REGENERATE_FIXTURES:-1}" = 1 ]; then
  python3 scripts/fixtures/lora_make_fixtures.py crates/lora/fixtures 2>&1 | grep -v -i warn | tail -5
  python3 scripts/fixtures/lora_models_make_fixtures.py crates/models/fixtures crates/lora/fixtures/models 2>&1 |
    grep -v -i warn | tail -12
  tar czf "$OUT/lora_fixtures.tgz" crates/lora/fixtures
fi
export LLMFT_LORA_EXPORT_DIR=/tmp/llmft-adapters LLMFT_MERGED_EXPORT_DIR=/tmp/llmft-merged
bash scripts/gpu/run.sh tests
python3 scripts/fixtures/lora_models_make_fixtures.py crates/models/fixtures crates/lora/fixtures/models \
  "$LLMFT_LORA_EXPORT_DIR" "$LLMFT_MERGED_EXPORT_DIR" 2>&1 | grep -E "RESULT|Error|error|>" |
  tee "$OUT/peft_loads_llmft.txt"
if [ "${SKIP_BENCHES:-0}" != 1 ]; then
  bash scripts/gpu/run.sh benches "${1:-cuda}" > "$OUT/bench_summary.txt" 2>&1
  grep -E '^\{' "$OUT/bench.log" | tail -6
fi
