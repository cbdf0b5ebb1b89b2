//! Times llmft's host AdamW (`llmft_offload::CpuAdamW`) on N f32 parameters
//! and measures the host's memory bandwidth, so the step's bytes/s can be
//! read against what the machine can stream.
//!
//! ```text
//! cargo run --release -p llmft-benches --bin cpu_adam_bench -- \
//!     [--params N] [--threads T] [--steps S] [--warmup W] [--tensors K] \
//!     [--grad-dtype bf16,f32,f16] [--bf16-copy] [--zero-grad] [--tile E] \
//!     [--bw-gib G | --no-bw] [--json out.jsonl]
//! ```
//!
//! N defaults to 207,000,000 (Llama-3-70B with LoRA r16 on all 7 linears has
//! 207,093,760 adapter parameters), split
//! into K = 1120 tensors (A and B of 560 linears) of near-equal length. One
//! JSON line per measurement goes to stdout (and is appended to `--json`).
//! Bytes per element of a step: p, m, v read and written (24), the gradient
//! read, the gradient written when zeroed, 2 for the bf16 copy. Host bandwidth
//! is STREAM-style over arrays of G GiB each (default 1): copy, triad and an
//! in-place update (see [`host_bandwidth`]); `host_bw_gb_per_s` is the best of
//! the three. GB are 10⁹ bytes.
use std::io::Write;
use std::time::Instant;

use half::{bf16, f16};
use llmft_offload::{AdamWTensor, CpuAdamW, Grad, GradElement};
use llmft_tensor::ops::AdamWParams;
use rayon::prelude::*;
use serde_json::{json, Value};

/// Elements per parallel chunk of the initialization and bandwidth loops.
const PAR_CHUNK: usize = 1 << 16;

struct Args {
    params: usize,
    threads: usize,
    steps: usize,
    warmup: usize,
    tensors: usize,
    grad_dtypes: Vec<String>,
    bf16_copy: bool,
    zero_grad: bool,
    tile: usize,
    bw_gib: f64,
    json: Option<String>,
}

const USAGE: &str = "cpu_adam_bench [--params N] [--threads T] [--steps S] [--warmup W] \
[--tensors K] [--grad-dtype bf16,f32,f16] [--bf16-copy] [--zero-grad] [--tile E] \
[--bw-gib G | --no-bw] [--json FILE]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        params: 207_000_000,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        steps: 10,
        warmup: 2,
        tensors: 1120,
        grad_dtypes: vec!["bf16".into(), "f32".into()],
        bf16_copy: false,
        zero_grad: false,
        tile: llmft_offload::cpu_adam::DEFAULT_TILE,
        bw_gib: 1.0,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        let num = |s: String| -> Result<usize, String> {
            s.replace('_', "")
                .parse()
                .map_err(|e| format!("{flag}: {s}: {e}"))
        };
        match flag.as_str() {
            "--params" => a.params = num(value()?)?,
            "--threads" => a.threads = num(value()?)?,
            "--steps" => a.steps = num(value()?)?.max(1),
            "--warmup" => a.warmup = num(value()?)?,
            "--tensors" => a.tensors = num(value()?)?.max(1),
            "--tile" => a.tile = num(value()?)?,
            "--grad-dtype" => {
                a.grad_dtypes = value()?.split(',').map(str::to_string).collect();
            }
            "--bf16-copy" => a.bf16_copy = true,
            "--zero-grad" => a.zero_grad = true,
            "--bw-gib" => {
                let s = value()?;
                a.bw_gib = s.parse().map_err(|e| format!("--bw-gib: {s}: {e}"))?;
            }
            "--no-bw" => a.bw_gib = 0.0,
            "--json" => a.json = Some(value()?),
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {flag}\n{USAGE}")),
        }
    }
    Ok(a)
}

/// Prints one measurement and appends it to the JSON-lines file.
fn emit(line: &Value, json: &Option<String>) {
    println!("{line}");
    if let Some(path) = json {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
        writeln!(f, "{line}").unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A deterministic value in [-1, 1) from `i`.
fn noise(seed: u64, i: usize) -> f32 {
    let mut x = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Fills `x` with `f(index)` on the pool (first touch: pages land near the
/// threads that stream them later).
fn fill_par<T: Send>(pool: &rayon::ThreadPool, x: &mut [T], f: impl Fn(usize) -> T + Sync) {
    pool.install(|| {
        x.par_chunks_mut(PAR_CHUNK).enumerate().for_each(|(c, xs)| {
            for (j, o) in xs.iter_mut().enumerate() {
                *o = f(c * PAR_CHUNK + j);
            }
        })
    });
}

fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Host bandwidth in GB/s over arrays of `gib` GiB each, STREAM-style
/// (bytes counted as the kernel names them, best of 5): copy `a = b`
/// (2 arrays), triad `a = b + s·c` (3), and the in-place update
/// `a = a·s + b` (3, each counted byte moved: the pattern of `p`, `m`, `v`).
/// Copy and triad also read `a` before writing it (write-allocate) without
/// counting it, so they understate the traffic.
fn host_bandwidth(pool: &rayon::ThreadPool, gib: f64) -> [(&'static str, f64); 3] {
    let n = (gib * (1u64 << 30) as f64 / 4.0) as usize;
    let bytes = (n * 4) as f64;
    let mut a = vec![0f32; n];
    let mut b = vec![0f32; n];
    let mut c = vec![0f32; n];
    fill_par(pool, &mut a, |_| 0.0);
    fill_par(pool, &mut b, |i| i as f32);
    fill_par(pool, &mut c, |i| 0.5 * i as f32);
    let copy = best_of(5, || {
        pool.install(|| {
            a.par_chunks_mut(PAR_CHUNK)
                .zip(b.par_chunks(PAR_CHUNK))
                .for_each(|(d, s)| d.copy_from_slice(s))
        })
    });
    let s = 0.5f32;
    let triad = best_of(5, || {
        pool.install(|| {
            a.par_chunks_mut(PAR_CHUNK)
                .zip(b.par_chunks(PAR_CHUNK))
                .zip(c.par_chunks(PAR_CHUNK))
                .for_each(|((a, b), c)| {
                    for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                        *a = b + s * c;
                    }
                })
        })
    });
    let update = best_of(5, || {
        pool.install(|| {
            a.par_chunks_mut(PAR_CHUNK)
                .zip(b.par_chunks(PAR_CHUNK))
                .for_each(|(a, b)| {
                    for (a, b) in a.iter_mut().zip(b) {
                        *a = *a * s + b;
                    }
                })
        })
    });
    std::hint::black_box(&a);
    [
        ("copy", 2.0 * bytes / copy / 1e9),
        ("triad", 3.0 * bytes / triad / 1e9),
        ("update", 3.0 * bytes / update / 1e9),
    ]
}

/// Near-equal lengths of `k` tensors summing to `n`.
fn split_lengths(n: usize, k: usize) -> Vec<usize> {
    let k = k.min(n.max(1));
    (0..k).map(|i| n / k + usize::from(i < n % k)).collect()
}

/// Cuts `x` into consecutive pieces of `lens`.
fn pieces<'a, T>(mut x: &'a mut [T], lens: &[usize]) -> Vec<&'a mut [T]> {
    lens.iter()
        .map(|&l| {
            let (a, b) = std::mem::take(&mut x).split_at_mut(l);
            x = b;
            a
        })
        .collect()
}

trait FromF32: GradElement {
    fn from(x: f32) -> Self;
}
impl FromF32 for f32 {
    fn from(x: f32) -> Self {
        x
    }
}
impl FromF32 for bf16 {
    fn from(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
impl FromF32 for f16 {
    fn from(x: f32) -> Self {
        f16::from_f32(x)
    }
}

fn run<G: FromF32>(a: &Args, opt: &CpuAdamW, bw: Option<[(&str, f64); 3]>) -> Value {
    let n = a.params;
    let pool = opt.pool();
    let mut p = vec![0f32; n];
    let mut m = vec![0f32; n];
    let mut v = vec![0f32; n];
    let mut g = vec![G::ZERO; n];
    let mut out = vec![bf16::ZERO; if a.bf16_copy { n } else { 0 }];
    fill_par(pool, &mut p, |i| 0.02 * noise(1, i));
    fill_par(pool, &mut m, |_| 0.0);
    fill_par(pool, &mut v, |_| 0.0);
    fill_par(pool, &mut g, |i| G::from(1e-3 * noise(2, i)));
    fill_par(pool, &mut out, |_| bf16::ZERO);

    let lens = split_lengths(n, a.tensors);
    let mut outs: Vec<Option<&mut [bf16]>> = if a.bf16_copy {
        pieces(&mut out, &lens).into_iter().map(Some).collect()
    } else {
        lens.iter().map(|_| None).collect()
    };
    let mut ts: Vec<AdamWTensor<'_, G>> = pieces(&mut p, &lens)
        .into_iter()
        .zip(pieces(&mut g, &lens))
        .zip(pieces(&mut m, &lens).into_iter().zip(pieces(&mut v, &lens)))
        .zip(outs.iter_mut())
        .map(|(((p, g), (m, v)), o)| {
            let grad = if a.zero_grad {
                Grad::Zero(g)
            } else {
                Grad::Keep(&*g)
            };
            let t = AdamWTensor::new(p, grad, m, v);
            match o.take() {
                Some(o) => t.with_bf16_copy(o),
                None => t,
            }
        })
        .collect();

    let base = AdamWParams {
        lr: 1e-4,
        weight_decay: 0.0,
        ..AdamWParams::default()
    };
    let mut times = Vec::with_capacity(a.steps);
    for s in 0..a.warmup + a.steps {
        let hp = AdamWParams {
            step: s as u64 + 1,
            ..base
        };
        let t = Instant::now();
        opt.step_multi(&hp, &mut ts).expect("cpu adamw step");
        if s >= a.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    drop(ts);
    std::hint::black_box((&p, &m, &v, &out));

    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let per_elem =
        24 + G::BYTES + if a.zero_grad { G::BYTES } else { 0 } + if a.bf16_copy { 2 } else { 0 };
    let bytes = (n * per_elem) as f64;
    let gb_per_s = bytes / median / 1e9;
    let host_bw = bw.map(|b| b.iter().map(|x| x.1).fold(0.0, f64::max));
    let kind = |i: usize| bw.map(|b| b[i].1);
    json!({
        "bench": "cpu_adamw",
        "impl": "llmft",
        "params": n,
        "tensors": lens.len(),
        "threads": opt.threads(),
        "grad_dtype": G::NAME,
        "bf16_copy": a.bf16_copy,
        "zero_grad": a.zero_grad,
        "tile": opt.tile(),
        "simd": opt.simd(),
        "steps": a.steps,
        "s_per_step": median,
        "s_per_step_min": times[0],
        "s_per_step_mean": mean,
        "elems_per_s": n as f64 / median,
        "bytes_per_elem": per_elem,
        "gb_per_s": gb_per_s,
        "host_bw_gb_per_s": host_bw,
        "host_copy_gb_per_s": kind(0),
        "host_triad_gb_per_s": kind(1),
        "host_update_gb_per_s": kind(2),
        "frac_of_host_bw": host_bw.map(|h| gb_per_s / h),
        "cpu": cpu_model(),
    })
}

fn main() {
    let a = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let opt = CpuAdamW::with_threads(a.threads)
        .and_then(|o| o.with_tile(a.tile))
        .unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        });
    let bw = (a.bw_gib > 0.0).then(|| {
        let bw = host_bandwidth(opt.pool(), a.bw_gib);
        for (kind, gbs) in bw {
            emit(
                &json!({
                    "bench": "host_bw",
                    "impl": "llmft",
                    "kind": kind,
                    "threads": opt.threads(),
                    "array_gib": a.bw_gib,
                    "gb_per_s": gbs,
                    "cpu": cpu_model(),
                }),
                &a.json,
            );
        }
        bw
    });
    for d in &a.grad_dtypes {
        let line = match d.as_str() {
            "f32" => run::<f32>(&a, &opt, bw),
            "bf16" => run::<bf16>(&a, &opt, bw),
            "f16" => run::<f16>(&a, &opt, bw),
            _ => {
                eprintln!("unknown --grad-dtype {d} (f32, bf16, f16)");
                std::process::exit(2)
            }
        };
        emit(&line, &a.json);
    }
}
