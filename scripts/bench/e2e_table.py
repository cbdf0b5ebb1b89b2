#!/usr/bin/env python3
"""The llmft vs Hugging Face table of an end-to-end benchmark run.

    python3 scripts/bench/e2e_table.py results.jsonl [more.jsonl ...]

Each line is one JSON object printed by `llmft bench` or
scripts/bench/hf_train_bench.py; runs of the same configuration are paired.
"""
import json
import sys


def key(r):
    return (r["model"], r["layers"], r["train_type"], r["seq"], r["micro_batch"], r["grad_accum"],
            r["checkpointing"])


def f(x, fmt):
    return "–" if x is None else format(x, fmt)


def main(paths):
    runs = {}
    for p in paths:
        with open(p) as fh:
            for line in fh:
                line = line.strip()
                if line:
                    r = json.loads(line)
                    impl = r["impl"]
                    if impl == "llmft" and r.get("checkpoint_skip_layers"):
                        impl = f"llmft, last {r['checkpoint_skip_layers']} layers not checkpointed"
                    runs.setdefault(key(r), {})[impl] = r
    rows = [
        "| model | layers | train type | seq × mb | ckpt | llmft variant | HF variant | llmft tok/s | HF tok/s | "
        "speed ratio | llmft peak GiB | HF peak GiB | peak ratio | llmft MFU | HF MFU | GEMM ceiling TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, v in runs.items():
        mine = sorted(i for i in v if i.startswith("llmft"))
        theirs = sorted(i for i in v if not i.startswith("llmft"))
        for ours, impl in [(o, t) for o in mine or [None] for t in theirs or [None]]:
            m = v.get(ours)
            hf = v.get(impl)
            get = lambda r, f_: r.get(f_) if r else None
            sp = m["tokens_per_s"] / hf["tokens_per_s"] if m and hf else None
            pk = m["peak_gib"] / hf["peak_gib"] if m and hf and m.get("peak_gib") and hf.get("peak_gib") else None
            ceiling = get(m, "gemm_ceiling_tflops") or get(hf, "gemm_ceiling_tflops")
            rows.append(
                f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} × {k[4]} | {'on' if k[6] else 'off'} | {ours or '–'} | "
                f"{impl or '–'} | "
                f"{f(get(m, 'tokens_per_s'), ',.0f')} | {f(get(hf, 'tokens_per_s'), ',.0f')} | {f(sp, '.2f')}× | "
                f"{f(get(m, 'peak_gib'), '.2f')} | {f(get(hf, 'peak_gib'), '.2f')} | {f(pk, '.2f')}× | "
                f"{f(get(m, 'mfu'), '.1%')} | {f(get(hf, 'mfu'), '.1%')} | {f(ceiling, '.0f')} |"
            )
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
