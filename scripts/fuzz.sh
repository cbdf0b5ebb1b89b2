#!/usr/bin/env bash
# Runs every llmft fuzz target (tests/fuzz, cargo-fuzz on nightly) one after
# the other, one job each, and prints one summary line per target.
#
#   scripts/fuzz.sh [RUNS] [TARGET...]
#
# RUNS: executions per target (default 1000000). TARGET: a subset of the
# targets (default: all). Every run uses -timeout=5 -rss_limit_mb=2048.
# Environment: FUZZ_SANITIZER (default none; `address` for ASan),
# FUZZ_MAX_LEN (default 0: libFuzzer's own choice from the corpus),
# FUZZ_MAX_TIME (default 0: no limit; else seconds per target, ending a run
# before RUNS), FUZZ_LOG_DIR (default tests/fuzz/target/logs).
#
# The corpus of each target (tests/fuzz/corpus/<target>) grows with what a run
# finds; minimize it before committing (cargo +nightly fuzz cmin <target>).
# A crash input lands in tests/fuzz/artifacts/<target>/: copy it to
# tests/fuzz/regressions/<target>/ (replayed by tests/tests/fuzz_replay.rs)
# and fix the bug.
set -euo pipefail

cd "$(dirname "$0")/../tests/fuzz"
RUNS="${1:-1000000}"
shift || true
ALL=(safetensors_index model_config layered_config dataset_records peft_adapter quant_metadata checkpoint_manifest)
if [ "$#" -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL[@]}"); fi
SAN="${FUZZ_SANITIZER:-none}"
MAX_LEN="${FUZZ_MAX_LEN:-0}"
MAX_TIME="${FUZZ_MAX_TIME:-0}"
LOGS="${FUZZ_LOG_DIR:-target/logs}"
mkdir -p "$LOGS"

cargo +nightly fuzz build -O -a -s "$SAN"

printf '%-20s %10s %8s %8s %8s %8s %9s %7s\n' target execs secs 'execs/s' cov ft crashes status
failed=0
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="$LOGS/$t.log"
    start=$(date +%s.%N)
    set +e
    args=(-runs="$RUNS" -timeout=5 -rss_limit_mb=2048 -print_final_stats=1)
    if [ "$MAX_LEN" != 0 ]; then args+=(-max_len="$MAX_LEN"); fi
    if [ "$MAX_TIME" != 0 ]; then args+=(-max_total_time="$MAX_TIME"); fi
    cargo +nightly fuzz run -O -a -s "$SAN" "$t" "corpus/$t" -- "${args[@]}" \
        -artifact_prefix="artifacts/$t/" >"$log" 2>&1
    rc=$?
    set -e
    end=$(date +%s.%N)
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", b - a }')
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    # The last status line libFuzzer printed: "#N  DONE  cov: C ft: F ...".
    last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 || true)
    cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.*ft: \([0-9]*\).*/\1/p' <<<"$last")
    crashes=$(find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
    status=ok
    if [ "$rc" != 0 ] || [ "$crashes" != 0 ]; then status="FAIL(rc=$rc)"; failed=1; fi
    printf '%-20s %10s %8s %8s %8s %8s %9s %7s\n' "$t" "${execs:-?}" "$secs" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$crashes" "$status"
done
if [ "$failed" != 0 ]; then
    echo "some targets failed; logs in tests/fuzz/$LOGS, inputs in tests/fuzz/artifacts/" >&2
    exit 1
fi
