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
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cudarc::driver::sys as dsys;
use llmft_shard::{init_process_group, Backend, GroupConfig, NcclGroup, ProcessGroup, WorldInfo};
use llmft_tensor::{bf16, cuda_device_count, f16, Ctx, DType, Element, StreamKind, Tensor};

const MODE: &str = "LLMFT_NCCL_MODE";
const CPU_PORT: &str = "LLMFT_NCCL_CPU_PORT";
const FAILED: i32 = 3;

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

fn nccl_cfg(timeout: Duration) -> GroupConfig {
    GroupConfig {
        backend: Backend::Nccl,
        timeout,
        rendezvous_timeout: Duration::from_secs(30),
        ..GroupConfig::default()
    }
}

/// splitmix64: a different, reproducible stream per (rank, n, tag).
struct Rng(u64);
impl Rng {
    fn new(rank: usize, n: usize, tag: u64) -> Self {
        Self((rank as u64) << 40 ^ (n as u64) << 8 ^ tag)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn float(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn floats(rank: usize, n: usize, tag: u64) -> Vec<f32> {
    let mut r = Rng::new(rank, n, tag);
    (0..n).map(|_| r.float()).collect()
}

fn host<T: Element>(v: &[f32]) -> Tensor {
    let t: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    Tensor::from_slice(&Ctx::cpu(), &t, &[v.len()]).unwrap()
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

// On the H200 (2026-12-01) the watchdog fired and printed its message, but
// the stalled process never ended: with the compute stream blocked by
// cuStreamWaitValue32 the second all_reduce call itself did not return (NCCL
// or the driver waits for the device on the host), and ncclCommAbort cannot
// free a stream blocked that way. A real stall (a peer that never joins) is
// `stalled_rank_is_reported_by_the_watchdog`, which needs two GPUs.
#[test]
#[ignore = "hangs on one GPU: a stream blocked by cuStreamWaitValue32 also blocks the next NCCL call on the host (see above)"]
fn watchdog_aborts_a_collective_that_outlives_the_timeout() {
    if gpus("watchdog_aborts_a_collective_that_outlives_the_timeout").is_none() {
        return;
    }
    // In a process of its own: the aborted communicator must not touch the
    // other tests' GPU context.
    let (codes, out) = start("stall1", 1).finish(Duration::from_secs(60));
    assert_eq!(codes, [Some(0)], "{out:?}");
    let l = &out[0].0;
    assert!(
        l[0] == "poisoned rank 0: NCCL all_reduce #2 (1000 x f32) did not complete within 0.3 s; \
                 the communicator was aborted",
        "{l:?}"
    );
    assert!(
        l[1].starts_with(
            "after process group is unusable after an earlier failure: rank 0: NCCL all_reduce #2"
        ),
        "{l:?}"
    );
}

#[test]
fn world_of_two_matches_the_cpu_backend() {
    let Some(n) = gpus("world_of_two_matches_the_cpu_backend") else {
        return;
    };
    if n < 2 {
        eprintln!("world_of_two_matches_the_cpu_backend: skipped: only {n} GPU");
        return;
    }
    let (codes, out) = start("compare", 2).finish(Duration::from_secs(120));
    assert_eq!(codes, [Some(0), Some(0)], "{out:?}");
    for (l, _) in &out {
        assert_eq!(l.last().map(String::as_str), Some("ok"), "{out:?}");
    }
}

#[test]
fn stalled_rank_is_reported_by_the_watchdog() {
    let Some(n) = gpus("stalled_rank_is_reported_by_the_watchdog") else {
        return;
    };
    if n < 2 {
        eprintln!("stalled_rank_is_reported_by_the_watchdog: skipped: only {n} GPU");
        return;
    }
    // Rank 1 sleeps until it is killed once rank 0 is done.
    let mut job = start("stall2", 2);
    job.finish_first(Duration::from_secs(60));
    let (codes, out) = job.finish(Duration::from_secs(10));
    assert_eq!(codes[0], Some(FAILED), "{out:?}");
    let e = out[0].0.last().unwrap();
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
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    let code = match run_worker(&mode) {
        Ok(()) => 0,
        Err(e) => {
            say(&format!("error {e}"));
            FAILED
        }
    };
    std::process::exit(code);
}

fn say(line: &str) {
    println!("PGW {line}");
    let _ = std::io::stdout().flush();
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
            say("ok");
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
            say("ready");
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
    let pg = NcclGroup::connect(world, gpu, &nccl_cfg(Duration::from_millis(300))).map_err(e)?;
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
    say(&format!("poisoned {reason}"));
    // SAFETY: `flag` is live; the copy stream is not blocked.
    unsafe { dsys::cuMemsetD32Async(fp, 1, 1, cu.stream(StreamKind::Copy).cu_stream()) }
        .result()
        .map_err(|e| format!("cuMemsetD32Async: {e:?}"))?;
    let after = pg.all_reduce_sum(gpu, &mut x).unwrap_err();
    say(&format!("after {after}"));
    Ok(())
}

// ---------------------------------------------------------------- parent

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What one rank printed: its `PGW` lines and its stderr.
type Output = (Vec<String>, String);

/// The ranks of one job.
struct Job {
    children: Vec<Child>,
    out: Vec<std::thread::JoinHandle<Output>>,
}

/// Starts a world of `world` ranks in mode `mode`, rank `r` on GPU `r`.
fn start(mode: &str, world: usize) -> Job {
    let (port, cpu_port) = (free_port(), free_port());
    let exe = std::env::current_exe().unwrap();
    let mut children = Vec::new();
    let mut out = Vec::new();
    for rank in 0..world {
        let mut cmd = Command::new(&exe);
        cmd.args(["worker", "--exact", "--nocapture", "--test-threads=1"]);
        for k in ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"] {
            cmd.env_remove(k);
        }
        let r = rank.to_string();
        cmd.env("RANK", &r)
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", &r)
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(CPU_PORT, cpu_port.to_string())
            .env(MODE, mode);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut stderr = child.stderr.take().unwrap();
        out.push(std::thread::spawn(move || {
            let err = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = stderr.read_to_string(&mut s);
                s
            });
            // The harness's `test worker ... ` has no newline of its own.
            let lines = stdout
                .lines()
                .map_while(|l| l.ok())
                .filter_map(|l| l.find("PGW ").map(|at| l[at + 4..].to_string()))
                .collect();
            (lines, err.join().unwrap_or_default())
        }));
        children.push(child);
    }
    Job { children, out }
}

impl Job {
    /// Waits for rank 0 to exit (up to `within`), then kills the others.
    fn finish_first(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.children[0].try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for c in &mut self.children[1..] {
            let _ = c.kill();
        }
    }

    /// Waits for every child (killing all after `within`); the exit codes,
    /// and the `PGW` lines and the stderr of each rank.
    fn finish(&mut self, within: Duration) -> (Vec<Option<i32>>, Vec<Output>) {
        let deadline = Instant::now() + within;
        let mut codes = vec![None; self.children.len()];
        let mut done = vec![false; self.children.len()];
        while done.iter().any(|d| !d) {
            for (i, c) in self.children.iter_mut().enumerate() {
                if !done[i] {
                    if let Some(s) = c.try_wait().unwrap() {
                        codes[i] = s.code();
                        done[i] = true;
                    }
                }
            }
            if Instant::now() > deadline {
                for c in &mut self.children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                // What the ranks printed before they were killed.
                let out: Vec<Output> = self.out.drain(..).map(|h| h.join().unwrap()).collect();
                panic!("ranks still running after {within:?}: {done:?}; they printed {out:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = self.out.drain(..).map(|h| h.join().unwrap()).collect();
        (codes, out)
    }
}
