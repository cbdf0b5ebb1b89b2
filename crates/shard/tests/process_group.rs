//! The CPU process group across real processes.
//!
//! Each test re-runs this test binary once per rank with `LLMFT_PG_MODE`
//! set and only the `worker` test selected; the worker reads its rank from
//! torchrun- or SLURM-style variables, joins the group, runs the mode and
//! prints `PGW ...` lines the parent checks. A failing worker prints
//! `PGW error <message>` and exits with code 3.
mod common;

use std::time::{Duration, Instant};

use common::{floats, fnv, free_port, tensor, Harness, Job, Rng, Vars, FAILED, FNV};
use llmft_shard::{init_process_group, GroupConfig, ProcessGroup, WorldInfo};
use llmft_tensor::{bf16, f16, Ctx, DType, Tensor};

const HARNESS: Harness = Harness {
    mode_var: "LLMFT_PG_MODE",
    tag: "PGW",
};
const TIMEOUT_MS: &str = "LLMFT_PG_TIMEOUT_MS";
const RENDEZVOUS_MS: &str = "LLMFT_PG_RENDEZVOUS_MS";

// ---------------------------------------------------------------- worker

/// The worker's entry; a no-op when this binary runs as the test suite.
#[test]
fn worker() {
    HARNESS.worker(run_worker);
}

fn ms_var(name: &str, default: u64) -> Duration {
    let ms = std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Duration::from_millis(ms)
}

fn run_worker(mode: &str) -> Result<(), String> {
    let world = WorldInfo::from_env().map_err(|e| e.to_string())?;
    let cfg = GroupConfig {
        timeout: ms_var(TIMEOUT_MS, 10_000),
        rendezvous_timeout: ms_var(RENDEZVOUS_MS, 10_000),
        ..GroupConfig::default()
    };
    let ctx = Ctx::cpu();
    let pg = init_process_group(&world, &ctx, cfg).map_err(|e| e.to_string())?;
    assert_eq!((pg.rank(), pg.world_size()), (world.rank, world.world_size));
    match mode {
        "collectives" => collectives(&ctx, &*pg),
        "mismatch" => mismatch(&ctx, &*pg),
        "stall" => stall(&ctx, &*pg),
        m => Err(format!("unknown mode {m}")),
    }
}

fn ints(rank: usize, n: usize, m: u64, tag: u64) -> Vec<f32> {
    let mut r = Rng::new(rank, n, tag);
    (0..n).map(|_| r.int(m)).collect()
}

/// Element-wise sum over ranks of `gen(rank)`, in f64.
fn sum_over(w: usize, gen: impl Fn(usize) -> Vec<f32>) -> Vec<f64> {
    let all: Vec<Vec<f32>> = (0..w).map(gen).collect();
    (0..all[0].len())
        .map(|i| all.iter().map(|v| v[i] as f64).sum())
        .collect()
}

fn check(what: &str, ok: bool) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("{what}: wrong result"))
    }
}

fn collectives(ctx: &Ctx, pg: &dyn ProcessGroup) -> Result<(), String> {
    let (r, w) = (pg.rank(), pg.world_size());
    let e = |e: llmft_shard::Error| e.to_string();
    let mut hash = FNV;
    for n in [0usize, 1, 2, 7, 1000, 65_537, 200_003] {
        // all_reduce, f32: exact sums, then random data whose bits every
        // rank must agree on.
        let mut x = tensor::<f32>(ctx, &ints(r, n, 1000, 1));
        pg.all_reduce_sum(ctx, &mut x).map_err(e)?;
        let want = sum_over(w, |k| ints(k, n, 1000, 1));
        let got = x.to_vec::<f32>().unwrap();
        check(
            "all_reduce f32",
            got.iter().zip(&want).all(|(a, b)| *a as f64 == *b),
        )?;

        let mut x = tensor::<f32>(ctx, &floats(r, n, 2));
        pg.all_reduce_sum(ctx, &mut x).map_err(e)?;
        let want = sum_over(w, |k| floats(k, n, 2));
        let got = x.to_vec::<f32>().unwrap();
        check(
            "all_reduce f32 random",
            got.iter()
                .zip(&want)
                .all(|(a, b)| (*a as f64 - b).abs() <= 1e-6 * w as f64),
        )?;
        fnv(&mut hash, x.as_bytes().unwrap());

        // bf16 / f16, accumulated in f32: exact for small whole numbers,
        // and the same bits everywhere for random data.
        let mut x = tensor::<bf16>(ctx, &ints(r, n, 40, 3));
        pg.all_reduce_sum(ctx, &mut x).map_err(e)?;
        let want = sum_over(w, |k| ints(k, n, 40, 3));
        let got = x.to_f32_vec().unwrap();
        check(
            "all_reduce bf16",
            got.iter().zip(&want).all(|(a, b)| *a as f64 == *b),
        )?;
        let mut x = tensor::<f16>(ctx, &floats(r, n, 4));
        pg.all_reduce_sum(ctx, &mut x).map_err(e)?;
        let want = sum_over(w, |k| floats(k, n, 4));
        let got = x.to_f32_vec().unwrap();
        check(
            "all_reduce f16 random",
            got.iter()
                .zip(&want)
                .all(|(a, b)| (*a as f64 - b).abs() <= 2e-3 * (1.0 + b.abs())),
        )?;
        fnv(&mut hash, x.as_bytes().unwrap());

        // all_gather: bytes in rank order, for a byte and a float dtype.
        let bytes = |k: usize| -> Vec<u8> {
            let mut g = Rng::new(k, n, 5);
            (0..n).map(|_| g.next() as u8).collect()
        };
        let input = Tensor::from_slice(ctx, &bytes(r), &[n]).unwrap();
        let mut out = Tensor::zeros(ctx, DType::U8, &[w * n]).unwrap();
        pg.all_gather(ctx, &input, &mut out).map_err(e)?;
        let want: Vec<u8> = (0..w).flat_map(bytes).collect();
        check("all_gather u8", out.as_bytes().unwrap() == want.as_slice())?;
        let input = tensor::<f32>(ctx, &floats(r, n, 6));
        let mut out = Tensor::zeros(ctx, DType::F32, &[w, n]).unwrap();
        pg.all_gather(ctx, &input, &mut out).map_err(e)?;
        let want: Vec<f32> = (0..w).flat_map(|k| floats(k, n, 6)).collect();
        check("all_gather f32", out.to_vec::<f32>().unwrap() == want)?;

        // reduce_scatter: this rank's slice of the sum.
        let input = tensor::<f32>(ctx, &ints(r, w * n, 1000, 7));
        let mut out = Tensor::zeros(ctx, DType::F32, &[n]).unwrap();
        pg.reduce_scatter_sum(ctx, &input, &mut out).map_err(e)?;
        let want = sum_over(w, |k| ints(k, w * n, 1000, 7));
        let got = out.to_vec::<f32>().unwrap();
        check(
            "reduce_scatter f32",
            got.iter()
                .zip(&want[r * n..(r + 1) * n])
                .all(|(a, b)| *a as f64 == *b),
        )?;
        let input = tensor::<bf16>(ctx, &ints(r, w * n, 40, 8));
        let mut out = Tensor::zeros(ctx, DType::BF16, &[n]).unwrap();
        pg.reduce_scatter_sum(ctx, &input, &mut out).map_err(e)?;
        let want = sum_over(w, |k| ints(k, w * n, 40, 8));
        let got = out.to_f32_vec().unwrap();
        check(
            "reduce_scatter bf16",
            got.iter()
                .zip(&want[r * n..(r + 1) * n])
                .all(|(a, b)| *a as f64 == *b),
        )?;

        // broadcast from every root, i32 elements.
        for root in 0..w {
            let vals = |k: usize| -> Vec<i32> {
                let mut g = Rng::new(k, n, 9);
                (0..n).map(|_| g.next() as i32).collect()
            };
            let mut t = Tensor::from_slice(ctx, &vals(r), &[n]).unwrap();
            pg.broadcast(ctx, &mut t, root).map_err(e)?;
            check("broadcast", t.to_vec::<i32>().unwrap() == vals(root))?;
        }
    }
    // A broadcast larger than one 4 MiB piece.
    let n = 1_500_000;
    let mut t = tensor::<f32>(ctx, &floats(r, n, 10));
    pg.broadcast(ctx, &mut t, w - 1).map_err(e)?;
    check(
        "broadcast 6 MB",
        t.to_vec::<f32>().unwrap() == floats(w - 1, n, 10),
    )?;
    pg.barrier(ctx).map_err(e)?;
    HARNESS.say(&format!("hash {hash:016x}"));
    Ok(())
}

/// Rank 0 and rank 1 disagree: first on the size, then on the collective.
fn mismatch(ctx: &Ctx, pg: &dyn ProcessGroup) -> Result<(), String> {
    let r = pg.rank();
    let mut x = Tensor::zeros(ctx, DType::F32, &[10 + 2 * r]).unwrap();
    let e = pg.all_reduce_sum(ctx, &mut x).unwrap_err().to_string();
    HARNESS.say(&format!("size {e}"));
    let e = pg.barrier(ctx).unwrap_err().to_string();
    HARNESS.say(&format!("after {e}"));
    Ok(())
}

/// All ranks finish one all-reduce; then rank 1 stalls (the parent kills
/// it, or the others time out), while the others enter the next.
fn stall(ctx: &Ctx, pg: &dyn ProcessGroup) -> Result<(), String> {
    let mut x = tensor::<f32>(ctx, &floats(pg.rank(), 1000, 11));
    pg.all_reduce_sum(ctx, &mut x).map_err(|e| e.to_string())?;
    HARNESS.say("ready");
    if pg.rank() == 1 {
        std::thread::sleep(ms_var("LLMFT_PG_STALL_MS", 60_000));
    }
    let first = pg.all_reduce_sum(ctx, &mut x);
    // A failed group stays failed, and says so at once.
    let later = pg.barrier(ctx).unwrap_err().to_string();
    if !later.contains("unusable") {
        return Err(format!("barrier after a failure said: {later}"));
    }
    match first {
        Ok(()) => Err("the all_reduce after the stall succeeded".into()),
        Err(e) => Err(e.to_string()),
    }
}

// ---------------------------------------------------------------- parent

/// Starts ranks `ranks` of a world of `world` in mode `mode`, with `env`
/// added to each rank's environment.
fn start(mode: &str, world: usize, ranks: &[usize], vars: Vars, env: &[(&str, String)]) -> Job {
    HARNESS.spawn(mode, world, ranks, vars, |cmd| {
        for (k, v) in env {
            cmd.env(k, v);
        }
    })
}

/// Every collective checked on every rank, and the same bits everywhere.
fn run_collectives(world: usize, vars: Vars) {
    let start_at = Instant::now();
    let ranks: Vec<usize> = (0..world).collect();
    let job = start("collectives", world, &ranks, vars, &[]);
    let (codes, out) = job.finish(Duration::from_secs(60));
    for (rank, (code, o)) in codes.iter().zip(&out).enumerate() {
        assert_eq!(*code, Some(0), "rank {rank}: {o:?}");
    }
    let hashes: Vec<&String> = out.iter().map(|o| &o.lines[0]).collect();
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    eprintln!("world {world}: {:?}", start_at.elapsed());
}

#[test]
fn collectives_world_1() {
    run_collectives(1, Vars::Torchrun);
}

#[test]
fn collectives_world_2() {
    run_collectives(2, Vars::Torchrun);
}

#[test]
fn collectives_world_3() {
    run_collectives(3, Vars::Torchrun);
}

#[test]
fn collectives_world_3_slurm_variables() {
    run_collectives(3, Vars::Slurm);
}

fn kill_mid_collective(world: usize) {
    let ranks: Vec<usize> = (0..world).collect();
    // The collective timeout is long: only noticing the death ends it fast.
    let env = [(TIMEOUT_MS, "30000".to_string())];
    let mut job = start("stall", world, &ranks, Vars::Torchrun, &env);
    job.expect_lines("ready", world, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(200));
    job.kill(1);
    let killed = Instant::now();
    let (codes, out) = job.finish(Duration::from_secs(10));
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    for rank in (0..world).filter(|&r| r != 1) {
        assert_eq!(codes[rank], Some(FAILED), "rank {rank}: {:?}", out[rank]);
        // The `ready` lines were taken by `expect_lines`.
        let e = out[rank].lines.last().unwrap();
        assert!(
            e.starts_with("error all_reduce: rank 1 closed the connection"),
            "rank {rank}: {e}"
        );
    }
    assert_eq!(codes[1], None, "rank 1 dies by a signal");
}

#[test]
fn killed_rank_fails_the_others_fast_world_2() {
    kill_mid_collective(2);
}

#[test]
fn killed_rank_fails_the_others_fast_world_3() {
    kill_mid_collective(3);
}

#[test]
fn stalled_rank_times_out_naming_it() {
    let env = [
        (TIMEOUT_MS, "500".to_string()),
        ("LLMFT_PG_STALL_MS", "1500".to_string()),
    ];
    let job = start("stall", 3, &[0, 1, 2], Vars::Torchrun, &env);
    let (codes, out) = job.finish(Duration::from_secs(20));
    assert_eq!(codes, [Some(FAILED); 3], "{out:?}");
    // Rank 2 waits on rank 1 itself; rank 0 waits on rank 2 and hears why.
    assert_eq!(
        out[2].lines[1],
        "error all_reduce: no data from rank 1 within 0.5 s"
    );
    assert_eq!(
        out[0].lines[1],
        "error all_reduce: no data from rank 1 within 0.5 s (detected by rank 2)"
    );
}

#[test]
fn mismatched_sizes_are_errors_on_every_rank() {
    let job = start("mismatch", 2, &[0, 1], Vars::Torchrun, &[]);
    let (codes, out) = job.finish(Duration::from_secs(20));
    assert_eq!(codes, [Some(0), Some(0)]);
    for l in out.iter().map(|o| &o.lines) {
        assert!(
            l[0].starts_with("size all_reduce: rank ") && l[0].contains("same size"),
            "{l:?}"
        );
        assert!(l[1].contains("unusable"), "{l:?}");
    }
}

#[test]
fn missing_rank_fails_the_rendezvous_naming_the_address() {
    let env = [(RENDEZVOUS_MS, "1000".to_string())];
    let start_at = Instant::now();
    let job = start("collectives", 3, &[0, 1], Vars::Torchrun, &env);
    let port = job.port();
    let (codes, out) = job.finish(Duration::from_secs(20));
    assert!(start_at.elapsed() < Duration::from_secs(10));
    assert_eq!(codes, [Some(FAILED), Some(FAILED)]);
    for (rank, o) in out.iter().enumerate() {
        assert_eq!(
            o.lines[0],
            format!(
                "error rank {rank}: no rendezvous at 127.0.0.1:{port} within 1 s: rank 2 did \
                 not arrive (it never set `pg/addr/2`)"
            )
        );
    }
}

#[test]
fn missing_rank_0_fails_the_rendezvous_naming_the_address() {
    let port = free_port();
    let world = WorldInfo {
        rank: 1,
        world_size: 2,
        local_rank: 1,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    let cfg = GroupConfig {
        rendezvous_timeout: Duration::from_millis(500),
        ..GroupConfig::default()
    };
    let start_at = Instant::now();
    let e = init_process_group(&world, &Ctx::cpu(), cfg)
        .err()
        .unwrap()
        .to_string();
    assert!(start_at.elapsed() < Duration::from_secs(3));
    assert!(
        e.starts_with(&format!(
            "rank 1: no rendezvous at 127.0.0.1:{port} within 0.5 s: rank 0's store did not answer"
        )),
        "{e}"
    );
}
