"""Turns criterion's console output into a markdown table (median time and
median throughput per benchmark):  python3 scripts/bench_table.py LOG [COPY_BENCH]
With COPY_BENCH (e.g. cuda/copy_d2d_bf16), byte throughputs are also given as
a percentage of that benchmark's."""
import re
import sys

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
TP = {"B/s": 1, "KiB/s": 2**10, "MiB/s": 2**20, "GiB/s": 2**30, "TiB/s": 2**40,
      "elem/s": 1, "Kelem/s": 1e3, "Melem/s": 1e6, "Gelem/s": 1e9, "Telem/s": 1e12}


def parse(path):
    rows, name = [], None
    for line in open(path, encoding="utf-8", errors="replace"):
        m = re.match(r"^(\S+/\S+)\s*(time:.*)?$", line.rstrip())
        if m and not line.startswith("Benchmarking"):
            name = m.group(1)
        t = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
        if t and name:
            rows.append({"name": name, "time": float(t.group(1)) * UNITS[t.group(2)]})
        p = re.search(r"thrpt:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
        if p and rows and rows[-1]["name"] == name:
            rows[-1]["tp"] = float(p.group(1)) * TP[p.group(2)]
            rows[-1]["unit"] = "bytes" if p.group(2).endswith("B/s") else "flops"
    return rows


def main():
    rows = parse(sys.argv[1])
    ref = next((r for r in rows if len(sys.argv) > 2 and r["name"] == sys.argv[2]), None)
    print("| benchmark | median time | throughput | vs copy |")
    print("|---|---|---|---|")
    for r in rows:
        t = r["time"]
        ts = f"{t*1e6:.1f} µs" if t < 1e-3 else f"{t*1e3:.3f} ms"
        tp, pct = "", ""
        if "tp" in r:
            if r["unit"] == "bytes":
                tp = f"{r['tp']/1e9:.0f} GB/s"
                if ref and "tp" in ref:
                    pct = f"{100*r['tp']/ref['tp']:.0f}%"
            else:
                tp = f"{r['tp']/1e12:.1f} TFLOP/s"
        print(f"| {r['name']} | {ts} | {tp} | {pct} |")


if __name__ == "__main__":
    main()
