#!/usr/bin/env python3
"""The torch counterpart of `cpu_adam_bench`: torch.optim.AdamW on CPU
tensors, timed the same way on the same sizes, one JSON line per
measurement with the keys the Rust binary prints.

    python3 scripts/bench/cpu_adam_torch.py [--params N] [--threads T] [--steps S]
        [--warmup W] [--tensors K] [--grad-dtype bf16,f32] [--impls foreach,for_loop,fused]
        [--bf16-copy] [--zero-grad] [--bw-gib G | --no-bw] [--max-seconds X] [--json FILE]

N f32 parameters (default 207,000,000: Llama-3-70B with LoRA r16 on all 7
linears) are split into K = 1120 tensors of near-equal length. Implementations:
torch_foreach (foreach=True), torch_for_loop (foreach=False), torch_fused
(fused=True, torch's own single-pass CPU kernel). torch needs gradients in the
parameters' dtype, so with bf16 gradients a step also copies them into the f32
.grad tensors (what an offload pipeline built on torch has to do); with
--bf16-copy it also copies the updated parameters to bf16, with --zero-grad it
zeroes the gradients it was given. Bytes per element are counted as the Rust
binary counts them (the bytes a step needs, not what torch's extra passes
move), so gb_per_s of the two compare directly.

Host bandwidth is measured with torch ops over arrays of G GiB: copy
(a.copy_(b), 2 arrays), triad (a = b + s*c, 3) and the in-place update
(a = b + s*a, 3). CPU only, no network; an implementation whose first step
says the run would take more than --max-seconds runs fewer steps.
"""
import argparse
import json
import platform
import statistics
import sys
import time

import torch

LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 0.01
IMPLS = {
    "foreach": ("torch_foreach", dict(foreach=True)),
    "for_loop": ("torch_for_loop", dict(foreach=False)),
    "fused": ("torch_fused", dict(fused=True)),
}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
GRAD_BYTES = {"f32": 4, "bf16": 2, "f16": 2}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def emit(obj, path):
    line = json.dumps(obj, sort_keys=True)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def split_lengths(n, k):
    k = max(1, min(k, max(n, 1)))
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def best_of(reps, fn):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def host_bandwidth(gib):
    n = int(gib * (1 << 30) / 4)
    nbytes = n * 4
    a = torch.zeros(n)
    b = torch.arange(n, dtype=torch.float32)
    c = torch.full((n,), 0.5)
    copy = best_of(5, lambda: a.copy_(b))
    triad = best_of(5, lambda: torch.add(b, c, alpha=0.5, out=a))
    update = best_of(5, lambda: torch.add(b, a, alpha=0.5, out=a))
    out = [("copy", 2 * nbytes / copy / 1e9), ("triad", 3 * nbytes / triad / 1e9),
           ("update", 3 * nbytes / update / 1e9)]
    del a, b, c
    return out


def foreach_copy(dst, src):
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def run(args, impl, grad_dtype, bw):
    name, kwargs = IMPLS[impl]
    lens = split_lengths(args.params, args.tensors)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.empty(n).uniform_(-0.02, 0.02, generator=gen)) for n in lens]
    for p in params:
        p.grad = torch.empty_like(p).uniform_(-1e-3, 1e-3, generator=gen)
    staged = None
    if grad_dtype != "f32":
        staged = [p.grad.to(DTYPES[grad_dtype]) for p in params]
    p16 = [torch.empty(n, dtype=torch.bfloat16) for n in lens] if args.bf16_copy else None
    try:
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        return {"bench": "cpu_adamw", "impl": name, "params": args.params, "grad_dtype": grad_dtype,
                "error": f"{type(e).__name__}: {e}"}

    grads = [p.grad for p in params]

    def step():
        if staged is not None:
            foreach_copy(grads, staged)
        opt.step()
        if p16 is not None:
            foreach_copy(p16, params)
        if args.zero_grad:
            if staged is not None:
                torch._foreach_zero_(staged)
            else:
                opt.zero_grad(set_to_none=False)

    steps, times = args.steps, []
    with torch.no_grad():
        for i in range(args.warmup + steps):
            t = time.perf_counter()
            step()
            dt = time.perf_counter() - t
            if i == 0 and dt * (args.warmup + steps) > args.max_seconds:
                steps = max(1, int(args.max_seconds / dt) - args.warmup)
            if i >= args.warmup:
                times.append(dt)
            if len(times) >= steps:
                break
    times.sort()
    median = times[len(times) // 2]
    gbytes = GRAD_BYTES[grad_dtype]
    per_elem = 24 + gbytes + (gbytes if args.zero_grad else 0) + (2 if args.bf16_copy else 0)
    gb_per_s = args.params * per_elem / median / 1e9
    kinds = dict(bw) if bw else {}
    host_bw = max(kinds.values()) if kinds else None
    return {
        "bench": "cpu_adamw",
        "impl": name,
        "params": args.params,
        "tensors": len(lens),
        "threads": torch.get_num_threads(),
        "grad_dtype": grad_dtype,
        "bf16_copy": args.bf16_copy,
        "zero_grad": args.zero_grad,
        "steps": len(times),
        "s_per_step": median,
        "s_per_step_min": times[0],
        "s_per_step_mean": statistics.fmean(times),
        "elems_per_s": args.params / median,
        "bytes_per_elem": per_elem,
        "gb_per_s": gb_per_s,
        "host_bw_gb_per_s": host_bw,
        "host_copy_gb_per_s": kinds.get("copy"),
        "host_triad_gb_per_s": kinds.get("triad"),
        "host_update_gb_per_s": kinds.get("update"),
        "frac_of_host_bw": gb_per_s / host_bw if host_bw else None,
        "cpu": cpu_model(),
        "torch": torch.__version__,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=207_000_000)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tensors", type=int, default=1120)
    ap.add_argument("--grad-dtype", default="bf16,f32")
    ap.add_argument("--impls", default="foreach,for_loop,fused")
    ap.add_argument("--bf16-copy", action="store_true")
    ap.add_argument("--zero-grad", action="store_true")
    ap.add_argument("--bw-gib", type=float, default=1.0)
    ap.add_argument("--no-bw", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=300.0,
                    help="time budget per implementation and dtype; fewer steps run past it")
    ap.add_argument("--json", default=None, help="append the JSON lines to this file")
    args = ap.parse_args()
    args.steps = max(1, args.steps)

    threads = args.threads
    if threads is None:
        import os
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)

    dtypes = [d for d in args.grad_dtype.split(",") if d]
    impls = [i for i in args.impls.split(",") if i]
    for d in dtypes:
        if d not in DTYPES:
            sys.exit(f"unknown --grad-dtype {d} ({', '.join(DTYPES)})")
    for i in impls:
        if i not in IMPLS:
            sys.exit(f"unknown --impls entry {i} ({', '.join(IMPLS)})")

    bw = None
    if not args.no_bw and args.bw_gib > 0:
        bw = host_bandwidth(args.bw_gib)
        for kind, gbs in bw:
            emit({"bench": "host_bw", "impl": "torch", "kind": kind, "threads": torch.get_num_threads(),
                  "array_gib": args.bw_gib, "gb_per_s": gbs, "cpu": cpu_model()}, args.json)
    for d in dtypes:
        for i in impls:
            emit(run(args, i, d, bw), args.json)


if __name__ == "__main__":
    main()
