#!/usr/bin/env bash
# Builds llmft's test and bench binaries (and the CLI) here, strips them and
# packs them into .gpu/bundle.tar.xz (git-ignored) with scripts/gpu/run.sh, so
# a GPU machine without Rust can run them:
#   scripts/gpu/build.sh [cargo package ...]      # default: the whole workspace
# then on the GPU machine, from the repo root:   bash scripts/gpu/run.sh
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/../.."
pkgs=()
for p in "$@"; do pkgs+=(-p "$p"); done
[ ${#pkgs[@]} -eq 0 ] && pkgs=(--workspace)
stage=.gpu/stage
rm -rf "$stage" && mkdir -p "$stage/test" "$stage/bench"

collect() { # $1 = test|bench, rest = cargo args
  local kind=$1; shift
  cargo "$@" --no-run --message-format=json 2>"$stage/cargo-$kind.log" |
    KIND=$kind python3 -c '
import json, os, sys
kind = os.environ["KIND"]
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and (("bench" in m["target"]["kind"]) if kind == "bench" else m["profile"]["test"]):
        t = m["target"]
        print(m["package_id"].split("#")[-1].split("@")[0], t["name"], t["kind"][0], m["executable"])
' | while read -r pkg name tkind exe; do
    cp "$exe" "$stage/$kind/${pkg}__${tkind}__${name}"
  done
}
collect test test --release "${pkgs[@]}" || { cat "$stage/cargo-test.log"; exit 1; }
collect bench bench "${pkgs[@]}" || { cat "$stage/cargo-bench.log"; exit 1; }
rm -f "$stage"/cargo-*.log
cargo build --release -p llmft --bin llmft -p llmft-models --example load_rss
mkdir -p "$stage/extra" && cp target/release/examples/load_rss "$stage/extra/"
cp target/release/llmft "$stage/"
# Tests find fixtures through paths compiled in (CARGO_MANIFEST_DIR).
pwd > "$stage/build_root"
strip "$stage"/test/* "$stage"/bench/* "$stage"/extra/* "$stage/llmft" 2>/dev/null || true
ls "$stage/test" "$stage/bench"
tar -C "$stage" -cf - . | xz -T2 -6 > .gpu/bundle.tar.xz
rm -rf "$stage"
du -h .gpu/bundle.tar.xz
