//! Multi-process training on the CPU backend, through the binary: world 2
//! (started by `llmft launch`, as torchrun starts it, and as SLURM's `srun`
//! starts it) trains like world 1 at the same global batch for every
//! sharding strategy (hybrid_shard over two "nodes" of two ranks too); a
//! world-2 run killed with `kill -9` ends everywhere, names the rank, keeps
//! its last checkpoint loadable, and resumes to the same steps as a straight
//! run; a rank whose peer never comes fails within the timeout naming the
//! address.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{ephemeral_low, port, port_block, root, scratch, PORT_BLOCK};

/// The demo job's `train` arguments with `sets`, into `out`, quiet.
fn train_args(out: &Path, sets: &[&str]) -> Vec<String> {
    let mut args = vec![
        "train".to_string(),
        "--quiet".into(),
        "--output-dir".into(),
        out.display().to_string(),
        "--set".into(),
        "train.eval_every=0".into(),
        "--set".into(),
        "data.batch.batch_size=2".into(),
        // The CPU backend's world-2 jobs train on the CPU even where a GPU
        // exists; so must the world-1 runs they are compared with (the NCCL
        // runs are scripts/gpu/dist_bench.sh's).
        "--set".into(),
        "model.device=\"cpu\"".into(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s.to_string());
    }
    args
}

fn command(args: &[String], env: &[(&str, String)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llmft"));
    c.args(args)
        .current_dir(root())
        .env_remove("LLMFT_MODEL__PATH")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for k in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
        "SLURM_JOB_NODELIST",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Runs to the end: (exit code, stdout, stderr).
fn run(args: &[String], env: &[(&str, String)]) -> (i32, String, String) {
    let out = command(args, env).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `llmft launch --nproc-per-node 2 --master-port P -- <args>`.
fn launch_args(p: u16, args: &[String]) -> Vec<String> {
    let mut a = vec![
        "launch".to_string(),
        "--nproc-per-node".into(),
        "2".into(),
        "--master-port".into(),
        p.to_string(),
        "--".into(),
    ];
    a.extend(args.iter().cloned());
    a
}

/// (step, loss) of every metrics line.
fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_else(|e| panic!("{}: {e}", out.display()))
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|m| Some((m["step"].as_u64()?, m["loss"].as_f64()?)))
        .collect()
}

/// The f32 tensors of a safetensors file.
fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, v)
        })
        .collect()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-3)
}

/// Losses and every tensor of `file` agree within `rel` (relative to the
/// largest magnitude of each tensor).
fn assert_same_run(what: &str, a: &Path, b: &Path, file: &str, rel: f64) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), lb.len(), "{what}: metrics lines");
    for ((sa, x), (sb, y)) in la.iter().zip(&lb) {
        assert_eq!(sa, sb, "{what}");
        assert!(close(*x, *y, rel), "{what}: step {sa} loss {x} vs {y}");
    }
    let (ta, tb) = (tensors(&a.join(file)), tensors(&b.join(file)));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "{what}: {file} tensor names"
    );
    for (name, x) in &ta {
        let y = &tb[name];
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6) as f64;
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (f64::from(*p) - f64::from(*q)).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= rel * scale,
            "{what}: {file} {name} differs by {worst} (scale {scale})"
        );
    }
}

const STEPS: &str = "train.max_steps=6";

#[test]
fn world_2_trains_as_world_1_for_every_strategy() {
    let t0 = Instant::now();
    // World 1: two micro-batches of 2 rows a step; world 2: one per rank.
    let one = scratch("dist-w1");
    let (code, o, e) = run(&train_args(&one, &[STEPS, "train.grad_accum=2"]), &[]);
    assert_eq!(code, 0, "{o}\n{e}");
    for (i, strategy) in ["full_shard", "shard_grad_op", "no_shard"]
        .iter()
        .enumerate()
    {
        let two = scratch(&format!("dist-w2-{strategy}"));
        let s = format!("dist.strategy=\"{strategy}\"");
        let args = train_args(&two, &[STEPS, "dist.backend=\"cpu\"", &s]);
        let (code, o, e) = run(&launch_args(port(i as u16), &args), &[]);
        assert_eq!(code, 0, "{strategy}: {o}\n{e}");
        assert_same_run(
            strategy,
            &one,
            &two,
            "adapter/adapter_model.safetensors",
            1e-5,
        );
        std::fs::remove_dir_all(&two).unwrap();
    }
    std::fs::remove_dir_all(&one).unwrap();

    // Full training with the weights sharded.
    let full = ["train.train_type=\"full\"", "train.lr=1e-4"];
    let one = scratch("dist-full-w1");
    let mut sets = vec![STEPS, "train.grad_accum=2"];
    sets.extend(full);
    let (code, o, e) = run(&train_args(&one, &sets), &[]);
    assert_eq!(code, 0, "{o}\n{e}");
    let two = scratch("dist-full-w2");
    let mut sets = vec![
        STEPS,
        "dist.backend=\"cpu\"",
        "dist.strategy=\"full_shard\"",
    ];
    sets.extend(full);
    let (code, o, e) = run(&launch_args(port(3), &train_args(&two, &sets)), &[]);
    assert_eq!(code, 0, "{o}\n{e}");
    assert_same_run(
        "full, full_shard",
        &one,
        &two,
        "model/model.safetensors",
        1e-5,
    );
    for d in [one, two] {
        std::fs::remove_dir_all(d).unwrap();
    }
    eprintln!("strategies: {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn hybrid_shard_over_two_nodes_of_two_ranks_trains_as_world_1() {
    let one = scratch("dist-hybrid-w1");
    let (code, o, e) = run(&train_args(&one, &[STEPS, "train.grad_accum=4"]), &[]);
    assert_eq!(code, 0, "{o}\n{e}");
    // Two "nodes" on this machine: a launcher each, 2 ranks each.
    let four = scratch("dist-hybrid-w4");
    let args = train_args(
        &four,
        &[
            STEPS,
            "dist.backend=\"cpu\"",
            "dist.strategy=\"hybrid_shard\"",
        ],
    );
    let p = port(11).to_string();
    let nodes: Vec<Child> = (0..2)
        .map(|node| {
            let mut a = vec![
                "launch".to_string(),
                "--nproc-per-node".into(),
                "2".into(),
                "--nnodes".into(),
                "2".into(),
                "--node-rank".into(),
                node.to_string(),
                "--master-port".into(),
                p.clone(),
                "--".into(),
            ];
            a.extend(args.iter().cloned());
            command(&a, &[]).spawn().unwrap()
        })
        .collect();
    for (node, c) in nodes.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "node {node}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let f = "adapter/adapter_model.safetensors";
    assert_same_run("hybrid_shard", &one, &four, f, 1e-5);
    for d in [one, four] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Two `llmft train` processes started with `env(rank)` each, as a
/// launcher would; both must succeed. The stderr of each.
fn start_pair(args: &[String], env: impl Fn(usize) -> Vec<(&'static str, String)>) -> Vec<String> {
    let children: Vec<Child> = (0..2)
        .map(|r| command(args, &env(r)).spawn().unwrap())
        .collect();
    let mut stderr = Vec::new();
    for (r, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "rank {r}: {}\n{err}",
            String::from_utf8_lossy(&out.stdout),
        );
        stderr.push(err);
    }
    stderr
}

/// `args` without `--quiet`.
fn with_progress(args: Vec<String>) -> Vec<String> {
    args.into_iter().filter(|a| a != "--quiet").collect()
}

/// The progress lines of `stderr` (not a terminal: plain lines), each
/// without its timings: loading and writing weights, tokenizing, the
/// training steps.
fn progress_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter_map(|l| {
            if l.starts_with("step ") && l.contains(" eta ") {
                l.split(" loss ").next()
            } else if [
                "loading weights: ",
                "writing merged model: ",
                "tokenizing: ",
            ]
            .iter()
            .any(|p| l.starts_with(p))
            {
                l.split(',').next()
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn torchrun_and_slurm_variables_start_the_same_job() {
    let launched = scratch("dist-env-launch");
    let sets = ["train.max_steps=3", "dist.backend=\"cpu\""];
    // With progress on: only rank 0 reports (below: what the launcher's
    // two ranks print together is what rank 0 alone prints).
    let args = with_progress(train_args(&launched, &sets));
    let (code, o, launched_err) = run(&launch_args(port(4), &args), &[]);
    assert_eq!(code, 0, "{o}\n{launched_err}");

    let torchrun = scratch("dist-env-torchrun");
    let p = port(5).to_string();
    let stderr = start_pair(&with_progress(train_args(&torchrun, &sets)), |r| {
        vec![
            ("RANK", r.to_string()),
            ("LOCAL_RANK", r.to_string()),
            ("WORLD_SIZE", "2".into()),
            ("LOCAL_WORLD_SIZE", "2".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", p.clone()),
        ]
    });
    let rank0 = progress_lines(&stderr[0]);
    for step in ["step 1/3", "step 2/3", "step 3/3"] {
        assert_eq!(rank0.iter().filter(|l| **l == step).count(), 1, "{rank0:?}");
    }
    assert!(
        rank0.iter().any(|l| l.starts_with("loading weights: 100%")),
        "{rank0:?}"
    );
    assert!(
        rank0.iter().any(|l| l.starts_with("tokenizing: ")),
        "{rank0:?}"
    );
    assert_eq!(progress_lines(&stderr[1]), Vec::<&str>::new(), "rank 1");
    assert_eq!(progress_lines(&launched_err), rank0, "launched");
    let slurm = scratch("dist-env-slurm");
    let p = port(6).to_string();
    start_pair(&train_args(&slurm, &sets), |r| {
        vec![
            ("SLURM_PROCID", r.to_string()),
            ("SLURM_LOCALID", r.to_string()),
            ("SLURM_NTASKS", "2".into()),
            ("SLURM_JOB_NODELIST", "localhost".into()),
            ("MASTER_PORT", p.clone()),
        ]
    });
    let file = "adapter/adapter_model.safetensors";
    for d in [&torchrun, &slurm] {
        assert_same_run("started by variables", &launched, d, file, 0.0);
    }
    for d in [launched, torchrun, slurm] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Pids of the processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces; split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn wait_for(path: &Path, child: &mut Child) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the job ended before {} appeared",
            path.display()
        );
        assert!(t.elapsed() < Duration::from_secs(300), "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The rank whose `RANK` is `rank` among `pids`.
fn rank_pid(pids: &[u32], rank: usize) -> u32 {
    *pids
        .iter()
        .find(|&&p| {
            std::fs::read(format!("/proc/{p}/environ"))
                .map(|env| {
                    env.split(|&b| b == 0)
                        .any(|kv| kv == format!("RANK={rank}").as_bytes())
                })
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no rank {rank} among {pids:?}"))
}

#[test]
fn killed_rank_ends_the_job_and_the_run_resumes_to_the_same_steps() {
    let sets = [
        "train.max_steps=20",
        "train.checkpoint_every=10",
        "train.keep_last=0",
        "lora.lora_dropout=0.1",
        "dist.backend=\"cpu\"",
        "dist.timeout_s=60",
    ];
    let straight = scratch("dist-resume-straight");
    let (code, o, e) = run(&launch_args(port(7), &train_args(&straight, &sets)), &[]);
    assert_eq!(code, 0, "{o}\n{e}");

    let killed = scratch("dist-resume-killed");
    let args = launch_args(port(8), &train_args(&killed, &sets));
    let mut launcher = command(&args, &[]).spawn().unwrap();
    wait_for(&killed.join("checkpoint-10"), &mut launcher);
    let ranks = children_of(launcher.id());
    assert_eq!(ranks.len(), 2, "two ranks under the launcher: {ranks:?}");
    let victim = rank_pid(&ranks, 1);
    let t = Instant::now();
    // SAFETY: signalling a child process of this test.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let out = launcher.wait_with_output().unwrap();
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the launcher must fail: {stderr}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        stderr.contains("rank 1") && stderr.contains("SIGKILL"),
        "the launcher names the rank and how it ended: {stderr}"
    );
    for p in &ranks {
        assert!(!alive(*p), "rank pid {p} survived");
    }
    assert!(!killed.join("adapter").exists(), "no final output");

    let mut resume = train_args(&killed, &sets);
    resume.push("--resume".into());
    let (code, o, e) = run(&launch_args(port(9), &resume), &[]);
    assert_eq!(code, 0, "{o}\n{e}");
    let (a, b) = (losses(&straight), losses(&killed));
    let after = |l: &[(u64, f64)]| -> Vec<(u64, u64)> {
        l.iter()
            .filter(|(s, _)| *s > 10)
            .map(|(s, x)| (*s, x.to_bits()))
            .collect()
    };
    assert_eq!(after(&a).len(), 10, "{a:?}");
    assert_eq!(after(&a), after(&b), "steps 11-20");
    let f = "adapter/adapter_model.safetensors";
    assert_eq!(
        std::fs::read(straight.join(f)).unwrap(),
        std::fs::read(killed.join(f)).unwrap(),
        "{f}"
    );
    for d in [straight, killed] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn a_rank_whose_peer_never_comes_fails_within_the_timeout() {
    let out: PathBuf = scratch("dist-alone");
    let p = port(10);
    let t = Instant::now();
    let (code, _, e) = run(
        &train_args(&out, &["dist.backend=\"cpu\"", "dist.timeout_s=3"]),
        &[
            ("RANK", "1".into()),
            ("WORLD_SIZE", "2".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", p.to_string()),
        ],
    );
    assert_ne!(code, 0, "{e}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(
        e.contains(&format!("127.0.0.1:{p}")) && !e.contains("panicked"),
        "names the address: {e}"
    );
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn rendezvous_ports_lie_below_the_ephemeral_range() {
    // Every process id's block, for Linux's default range and a wider one.
    for low in [32768, 49152, 24000] {
        for pid in (0..4_194_304u32).step_by(97).chain([1999, 4_194_303]) {
            let b = port_block(pid, low);
            assert!(
                b >= 20000 && b + PORT_BLOCK <= low,
                "pid {pid}: {b} (range from {low})"
            );
        }
    }
    // This process's ports: the 15 the tests of this file use.
    let low = ephemeral_low();
    assert!(port(0) >= 20000 && port(14) < low, "{} {low}", port(14));
    assert_eq!(port(14) - port(0), 14);
}

/// `llmft bench` draws each global micro-batch's tokens from its index, so
/// two ranks of one micro-batch each train on what one process
/// accumulating two micro-batches does: the same losses step by step.
#[test]
fn bench_at_world_2_trains_on_world_1s_batches() {
    let common: Vec<String> = [
        "bench",
        "--model",
        "tiny",
        "--layers",
        "1",
        "--seq",
        "16",
        "--micro-batch",
        "2",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--dtype",
        "f32",
        "--gemm-size",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let losses = |out: &str| -> Vec<f64> {
        let last = out.lines().last().unwrap_or_default();
        let v: serde_json::Value =
            serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {out}"));
        v["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let mut one = common.clone();
    one.extend(["--grad-accum".to_string(), "2".into()]);
    let (code, out1, err) = run(&one, &[]);
    assert_eq!(code, 0, "{err}");
    let mut two = common.clone();
    two.extend(["--backend".to_string(), "cpu".into()]);
    let (code, out2, err) = run(&launch_args(port(14), &two), &[]);
    assert_eq!(code, 0, "{err}");
    let (a, b) = (losses(&out1), losses(&out2));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "world 1 {a:?} vs world 2 {b:?}"
        );
    }
}
