//! The NCCL process group against the CPU backend, on real GPUs.
//!
//! Skipped (with a message) where no CUDA device exists or `libnccl.so`
//! cannot be loaded, unless LLMFT_REQUIRE_GPU is set, which makes either a
//! failure. On one GPU: every collective at a world of one, bit for bit
//! against the CPU backend, argument errors, and the watchdog's timeout.
//! On two or more GPUs also a world of two processes (this test binary run
//! again per rank with `LLMFT_NCCL_MODE` set and only the `worker` test
//! selected), compared with a CPU group of the same two processes, and a
//! stalled rank that the other's watchdog reports. Workers print `PGW ...`
//! lines the parent checks; a failing worker prints `PGW error <message>`
//! and exits with code 3.
mod common;

use std::time::{Duration, Instant};

use common::{floats, free_port, tensor, Harness, Job, Rng, Vars, FAILED};
use cudarc::driver::sys as dsys;
use llmft_shard::{
    init_process_group, Backend, GroupConfig, NcclGroup, ProcessGroup, WorldInfo,
    WATCHDOG_EXIT_STATUS,
};
use llmft_tensor::{bf16, cuda_device_count, f16, Ctx, DType, Element, StreamKind, Tensor};

const HARNESS: Harness = Harness {
    mode_var: "LLMFT_NCCL_MODE",
    tag: "PGW",
};
const CPU_PORT: &str = "LLMFT_NCCL_CPU_PORT";

/// `Some(n)` CUDA devices with NCCL loadable, else `None` after saying why
/// (or failing under LLMFT_REQUIRE_GPU).
fn gpus(test: &str) -> Option<usize> {
    let why = if cuda_device_count() == 0 {
        "no CUDA device".to_string()
    } else if llmft_tensor::cuda::nccl_version().is_none() {
        "libnccl.so cannot be loaded (put its folder on LD_LIBRARY_PATH)".to_string()
    } else {
        return Some(cuda_device_count());
    };
    assert!(
        std::env::var_os("LLMFT_REQUIRE_GPU").is_none(),
        "LLMFT_REQUIRE_GPU is set but {why}"
    );
    eprintln!("{test}: skipped: {why}");
    None
}

/// Whether `test` has two GPUs (see `gpus`), after saying why not.
fn two_gpus(test: &str) -> bool {
    let Some(n) = gpus(test) else {
        return false;
    };
    if n < 2 {
        eprintln!("{test}: skipped: only {n} GPU");
    }
    n >= 2
}

fn nccl_cfg(timeout: Duration) -> GroupConfig {
    GroupConfig {
        backend: Backend::Nccl,
        timeout,
        rendezvous_timeout: Duration::from_secs(30),
        ..GroupConfig::default()
    }
}

fn host<T: Element>(v: &[f32]) -> Tensor {
    tensor::<T>(&Ctx::cpu(), v)
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    t.to_ctx(&Ctx::cpu()).unwrap().as_bytes().unwrap().to_vec()
}

type R<T = ()> = Result<T, String>;

fn same(what: &str, n: usize, gpu: &Tensor, cpu: &Tensor) -> R {
    if bytes_of(gpu) == bytes_of(cpu) {
        Ok(())
    } else {
        Err(format!("{what} (n = {n}): NCCL and CPU results differ"))
    }
}

/// Every collective on `nccl` (tensors on `gpu`) and on `cpu` (host
/// tensors) with the same inputs; the results must have the same bits.
/// At a world of one or two the sums are one rounding of the exact sum on
/// both backends.
fn compare(gpu: &Ctx, nccl: &dyn ProcessGroup, cpu: &dyn ProcessGroup) -> R {
    let (r, w) = (nccl.rank(), nccl.world_size());
    let c = Ctx::cpu();
    let e = |e: llmft_shard::Error| e.to_string();
    for n in [0usize, 1, 7, 1000, 65_537] {
        // all_reduce in f32, bf16 and f16.
        for (dtype, tag) in [(DType::F32, 1), (DType::BF16, 2), (DType::F16, 3)] {
            let v = floats(r, n, tag);
            let mut h = match dtype {
                DType::F32 => host::<f32>(&v),
                DType::BF16 => host::<bf16>(&v),
                _ => host::<f16>(&v),
            };
            let mut d = h.to_ctx(gpu).unwrap();
            nccl.all_reduce_sum(gpu, &mut d).map_err(e)?;
            cpu.all_reduce_sum(&c, &mut h).map_err(e)?;
            same(&format!("all_reduce {dtype}"), n, &d, &h)?;
        }

        // all_gather of bytes and of bf16, then started and waited for.
        let mut g = Rng::new(r, n, 4);
        let raw: Vec<u8> = (0..n).map(|_| g.next() as u8).collect();
        let hi = Tensor::from_slice(&c, &raw, &[n]).unwrap();
        let mut ho = Tensor::zeros(&c, DType::U8, &[w * n]).unwrap();
        let di = hi.to_ctx(gpu).unwrap();
        let mut d = Tensor::zeros(gpu, DType::U8, &[w * n]).unwrap();
        nccl.all_gather(gpu, &di, &mut d).map_err(e)?;
        cpu.all_gather(&c, &hi, &mut ho).map_err(e)?;
        same("all_gather u8", n, &d, &ho)?;

        let hi = host::<bf16>(&floats(r, n, 5));
        let mut ho = Tensor::zeros(&c, DType::BF16, &[w, n]).unwrap();
        let di = hi.to_ctx(gpu).unwrap();
        let mut d = Tensor::zeros(gpu, DType::BF16, &[w, n]).unwrap();
        nccl.all_gather(gpu, &di, &mut d).map_err(e)?;
        cpu.all_gather(&c, &hi, &mut ho).map_err(e)?;
        same("all_gather bf16", n, &d, &ho)?;

        let mut d = Tensor::zeros(gpu, DType::BF16, &[w, n]).unwrap();
        let pending = nccl.all_gather_start(gpu, &di, &mut d).map_err(e)?;
        pending.wait(gpu).map_err(e)?;
        same("all_gather_start bf16", n, &d, &ho)?;

        // In place: the input is this rank's slot of the output.
        let mut slots = vec![0f32; w * n];
        slots[r * n..(r + 1) * n].copy_from_slice(&floats(r, n, 6));
        let mut d = host::<f32>(&slots).to_ctx(gpu).unwrap();
        let mine = d.view(r * n, &[n]).unwrap();
        nccl.all_gather(gpu, &mine, &mut d).map_err(e)?;
        let hi = host::<f32>(&floats(r, n, 6));
        let mut ho = Tensor::zeros(&c, DType::F32, &[w * n]).unwrap();
        cpu.all_gather(&c, &hi, &mut ho).map_err(e)?;
        same("all_gather in place", n, &d, &ho)?;

        // reduce_scatter in f32 and bf16.
        for (dtype, tag) in [(DType::F32, 7), (DType::BF16, 8)] {
            let v = floats(r, w * n, tag);
            let hi = match dtype {
                DType::F32 => host::<f32>(&v),
                _ => host::<bf16>(&v),
            };
            let mut ho = Tensor::zeros(&c, dtype, &[n]).unwrap();
            let di = hi.to_ctx(gpu).unwrap();
            let mut d = Tensor::zeros(gpu, dtype, &[n]).unwrap();
            nccl.reduce_scatter_sum(gpu, &di, &mut d).map_err(e)?;
            cpu.reduce_scatter_sum(&c, &hi, &mut ho).map_err(e)?;
            same(&format!("reduce_scatter {dtype}"), n, &d, &ho)?;
        }

        // broadcast of i32 from every root.
        for root in 0..w {
            let mut g = Rng::new(r, n, 9);
            let vals: Vec<i32> = (0..n).map(|_| g.next() as i32).collect();
            let mut h = Tensor::from_slice(&c, &vals, &[n]).unwrap();
            let mut d = h.to_ctx(gpu).unwrap();
            nccl.broadcast(gpu, &mut d, root).map_err(e)?;
            cpu.broadcast(&c, &mut h, root).map_err(e)?;
            same(&format!("broadcast from {root}"), n, &d, &h)?;
        }
    }
    nccl.barrier(gpu).map_err(e)?;
    cpu.barrier(&c).map_err(e)
}

#[test]
fn world_of_one_matches_the_cpu_backend() {
    if gpus("world_of_one_matches_the_cpu_backend").is_none() {
        return;
    }
    let gpu = Ctx::cuda(0).unwrap();
    let single = WorldInfo::single();
    let nccl = init_process_group(&single, &gpu, nccl_cfg(Duration::from_secs(60))).unwrap();
    assert_eq!(nccl.backend(), Backend::Nccl);
    let cpu = init_process_group(&single, &Ctx::cpu(), GroupConfig::default()).unwrap();
    compare(&gpu, &*nccl, &*cpu).unwrap();
}

#[test]
fn bad_arguments_are_errors() {
    if gpus("bad_arguments_are_errors").is_none() {
        return;
    }
    let gpu = Ctx::cuda(0).unwrap();
    let pg = init_process_group(
        &WorldInfo::single(),
        &gpu,
        nccl_cfg(Duration::from_secs(60)),
    )
    .unwrap();
    let mut on_host = host::<f32>(&[1.0, 2.0]);
    let e = pg
        .all_reduce_sum(&gpu, &mut on_host)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "all_reduce: the NCCL process group needs tensors on cuda:0, but tensor lives on cpu"
    );
    let mut x = on_host.to_ctx(&gpu).unwrap();
    let e = pg
        .all_reduce_sum(&Ctx::cpu(), &mut x)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("all_reduce: the context is cpu"), "{e}");
    let mut ints = Tensor::zeros(&gpu, DType::I32, &[2]).unwrap();
    let e = pg.all_reduce_sum(&gpu, &mut ints).unwrap_err().to_string();
    assert!(e.starts_with("all_reduce: tensor is i32"), "{e}");
    let mut short = Tensor::zeros(&gpu, DType::F32, &[1]).unwrap();
    let e = pg.all_gather(&gpu, &x, &mut short).unwrap_err().to_string();
    assert!(e.contains("all_gather: output has 1 elements"), "{e}");
    let e = pg.broadcast(&gpu, &mut x, 1).unwrap_err().to_string();
    assert!(e.contains("root 1"), "{e}");
    // A world of one is not broken by a bad call.
    pg.all_reduce_sum(&gpu, &mut x).unwrap();
    assert_eq!(x.to_vec::<f32>().unwrap(), [1.0, 2.0]);
}

// A collective stalled on this rank's own stream. On the H200 (2026-12-01)
// the watchdog fired, but the main thread never returned from the call that
// followed the stall (with the compute stream blocked by cuStreamWaitValue32
// NCCL's enqueue waits for the device on the host), and ncclCommAbort
// cannot free a stream blocked that way. With `exit_after_abort` the group
// then ends the process itself. Either way the process must end, with the
// watchdog's reason: status 0 where the stalled call returns (the worker
// sees the group poisoned and the next call refused), or
// WATCHDOG_EXIT_STATUS where it does not.
#[test]
fn watchdog_aborts_a_collective_that_outlives_the_timeout() {
    if gpus("watchdog_aborts_a_collective_that_outlives_the_timeout").is_none() {
        return;
    }
    // In a process of its own: the aborted communicator must not touch the
    // other tests' GPU context.
    let t0 = Instant::now();
    let (codes, out) = start("stall1", 1).finish(Duration::from_secs(60));
    let reason = "rank 0: NCCL all_reduce #2 (1000 x f32) did not complete within 0.3 s; \
                  the communicator was aborted";
    println!(
        "stalled collective: status {:?} after {:.1} s",
        codes[0],
        t0.elapsed().as_secs_f64()
    );
    match codes[0] {
        Some(0) => {
            let l = &out[0].lines;
            assert_eq!(l[0], format!("poisoned {reason}"), "{out:?}");
            assert!(
                l[1].starts_with(
                    "after process group is unusable after an earlier failure: rank 0: NCCL \
                     all_reduce #2"
                ),
                "{l:?}"
            );
        }
        Some(WATCHDOG_EXIT_STATUS) => {
            let err = &out[0].stderr;
            assert!(err.contains(&format!("llmft-shard: {reason}")), "{err}");
            assert!(
                err.contains(
                    "llmft-shard: rank 0: the process group was not closed within 2 s of the \
                     abort"
                ),
                "{err}"
            );
        }
        c => panic!("the stalled process ended with {c:?}: {out:?}"),
    }
}

#[test]
fn world_of_two_matches_the_cpu_backend() {
    if !two_gpus("world_of_two_matches_the_cpu_backend") {
        return;
    }
    let (codes, out) = start("compare", 2).finish(Duration::from_secs(120));
    assert_eq!(codes, [Some(0), Some(0)], "{out:?}");
    for o in &out {
        assert_eq!(o.lines.last().map(String::as_str), Some("ok"), "{out:?}");
    }
}

#[test]
fn stalled_rank_is_reported_by_the_watchdog() {
    if !two_gpus("stalled_rank_is_reported_by_the_watchdog") {
        return;
    }
    // Rank 1 sleeps until it is killed once rank 0 is done.
    let mut job = start("stall2", 2);
    job.finish_first(Duration::from_secs(60));
    let (codes, out) = job.finish(Duration::from_secs(10));
    assert_eq!(codes[0], Some(FAILED), "{out:?}");
    let e = out[0].lines.last().unwrap();
    assert!(
        e.starts_with(
            "error process group is unusable after an earlier failure: rank 0: NCCL all_reduce #2"
        ) && e.contains("within 2 s"),
        "{out:?}"
    );
}

// ---------------------------------------------------------------- worker

/// The worker's entry; a no-op when this binary runs as the test suite.
#[test]
fn worker() {
    HARNESS.worker(run_worker);
}

fn run_worker(mode: &str) -> R {
    let world = WorldInfo::from_env().map_err(|e| e.to_string())?;
    let gpu = Ctx::cuda(world.local_rank).map_err(|e| e.to_string())?;
    let e = |e: llmft_shard::Error| e.to_string();
    match mode {
        "compare" => {
            let nccl =
                init_process_group(&world, &gpu, nccl_cfg(Duration::from_secs(60))).map_err(e)?;
            let cpu_world = WorldInfo {
                master_port: std::env::var(CPU_PORT)
                    .ok()
                    .and_then(|p| p.parse().ok())
                    .ok_or("no CPU port")?,
                ..world.clone()
            };
            let cpu =
                init_process_group(&cpu_world, &Ctx::cpu(), GroupConfig::default()).map_err(e)?;
            compare(&gpu, &*nccl, &*cpu)?;
            HARNESS.say("ok");
            Ok(())
        }
        "stall1" => stall_one(&world, &gpu),
        "stall2" => {
            let pg =
                NcclGroup::connect(&world, &gpu, &nccl_cfg(Duration::from_secs(2))).map_err(e)?;
            let mut x = host::<f32>(&floats(world.rank, 1000, 11))
                .to_ctx(&gpu)
                .unwrap();
            pg.all_reduce_sum(&gpu, &mut x).map_err(e)?;
            pg.synchronize().map_err(e)?;
            HARNESS.say("ready");
            if world.rank == 1 {
                std::thread::sleep(Duration::from_secs(120));
            }
            pg.all_reduce_sum(&gpu, &mut x).map_err(e)?;
            pg.synchronize().map_err(e)?;
            Err("the all_reduce after the stall succeeded".into())
        }
        m => Err(format!("unknown mode {m}")),
    }
}

/// The compute stream waits on a flag the test sets only after the
/// watchdog has fired, so the all_reduce queued behind it cannot complete.
fn stall_one(world: &WorldInfo, gpu: &Ctx) -> R {
    let e = |e: llmft_shard::Error| e.to_string();
    let cfg = GroupConfig {
        exit_after_abort: Some(Duration::from_secs(2)),
        ..nccl_cfg(Duration::from_millis(300))
    };
    let pg = NcclGroup::connect(world, gpu, &cfg).map_err(e)?;
    let flag = Tensor::zeros(gpu, DType::I32, &[1]).unwrap();
    let mut x = Tensor::zeros(gpu, DType::F32, &[1000]).unwrap();
    // NCCL connects lazily at a communicator's first collective, on the
    // host, in step with the stream: a first call behind a blocked stream
    // would itself block. One collective first, then the stall.
    pg.all_reduce_sum(gpu, &mut x).map_err(e)?;
    pg.synchronize().map_err(e)?;
    gpu.synchronize().unwrap();
    let cu = gpu.cuda_ctx().unwrap();
    let fp = flag.device_ptr().unwrap();
    // SAFETY: `flag` is a live device i32; the wait ends when it is set below.
    unsafe {
        dsys::cuStreamWaitValue32_v2(
            cu.stream(StreamKind::Compute).cu_stream(),
            fp,
            1,
            dsys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
        )
    }
    .result()
    .map_err(|e| format!("cuStreamWaitValue32: {e:?}"))?;
    pg.all_reduce_sum(gpu, &mut x).map_err(e)?;
    let t0 = Instant::now();
    let reason = loop {
        if let Some(r) = pg.poisoned() {
            break r;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            return Err("the watchdog did not fire within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    HARNESS.say(&format!("poisoned {reason}"));
    // SAFETY: `flag` is live; the copy stream is not blocked.
    unsafe { dsys::cuMemsetD32Async(fp, 1, 1, cu.stream(StreamKind::Copy).cu_stream()) }
        .result()
        .map_err(|e| format!("cuMemsetD32Async: {e:?}"))?;
    let after = pg.all_reduce_sum(gpu, &mut x).unwrap_err();
    HARNESS.say(&format!("after {after}"));
    Ok(())
}

// ---------------------------------------------------------------- parent

/// Starts a world of `world` ranks in mode `mode`, rank `r` on GPU `r`,
/// with a second free port for the CPU group of `compare`.
fn start(mode: &str, world: usize) -> Job {
    let cpu_port = free_port().to_string();
    let ranks: Vec<usize> = (0..world).collect();
    HARNESS.spawn(mode, world, &ranks, Vars::Torchrun, |cmd| {
        cmd.env(CPU_PORT, &cpu_port);
    })
}
