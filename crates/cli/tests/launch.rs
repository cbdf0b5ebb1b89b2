//! `llmft launch` with real processes on the CPU: each rank is `sh -c` (via
//! `--exec`) and reports through files in a scratch folder.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A launcher started in `dir`, its stdout and stderr in files there (a
/// pipe could be held open by a stray grandchild and block the test).
fn launch(dir: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_llmft"))
        .arg("launch")
        .args(args)
        .current_dir(dir)
        .env_remove("MASTER_ADDR")
        .env_remove("MASTER_PORT")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("launcher.out")).unwrap())
        .stderr(std::fs::File::create(dir.join("launcher.err")).unwrap())
        .spawn()
        .unwrap()
}

/// Waits for `child` at most `limit`: its exit code (None if a signal ended
/// it); kills it and fails if it runs longer.
fn wait(child: &mut Child, limit: Duration) -> Option<i32> {
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("the launcher ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits (at most 10 s) for the files `names` in `dir`, then reads each as a pid.
fn pids(dir: &Path, names: &[&str]) -> Vec<i32> {
    let t = Instant::now();
    while !names.iter().all(|n| dir.join(n).is_file()) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "ranks never wrote {names:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    names
        .iter()
        .map(|n| read(&dir.join(n)).trim().parse().unwrap())
        .collect()
}

/// Whether `pid` is a live process (a zombie waiting for its reaper is dead).
fn alive(pid: i32) -> bool {
    let stat = read(&PathBuf::from(format!("/proc/{pid}/stat")));
    match stat.rfind(')') {
        Some(i) => !stat[i + 1..].trim_start().starts_with('Z'),
        None => false,
    }
}

/// Waits (at most 2 s: the launcher has reaped its ranks, but an orphaned
/// grandchild dies a moment later) for every pid to be gone.
fn assert_gone(pids: &[i32]) {
    let t = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "survivors among {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `$$` to `pid.$RANK` atomically (a reader never sees it half-written).
const WRITE_PID: &str = "echo $$ > pid.$RANK.tmp && mv pid.$RANK.tmp pid.$RANK";

#[test]
fn every_rank_gets_the_torchrun_environment() {
    let dir = tempfile::tempdir().unwrap();
    let script = "echo $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $GROUP_RANK \
                  $MASTER_ADDR $MASTER_PORT $NCCL_NVLS_ENABLE > env.$RANK";
    let mut l = launch(
        dir.path(),
        &[
            "--nproc-per-node",
            "3",
            "--master-port",
            "29611",
            "--exec",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    assert_eq!(
        wait(&mut l, Duration::from_secs(20)),
        Some(0),
        "{}",
        read(&dir.path().join("launcher.err"))
    );
    for r in 0..3 {
        assert_eq!(
            read(&dir.path().join(format!("env.{r}"))).trim(),
            format!("{r} 3 {r} 3 0 127.0.0.1 29611 0")
        );
    }
}

#[test]
fn second_node_ranks_and_master_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Command::new(env!("CARGO_BIN_EXE_llmft"))
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--nnodes",
            "3",
            "--node-rank",
            "2",
            "--exec",
            "--",
        ])
        .args([
            "sh",
            "-c",
            "echo $RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $MASTER_PORT > env.$LOCAL_RANK",
        ])
        .current_dir(dir.path())
        .env("MASTER_ADDR", "node0")
        .env("MASTER_PORT", "4321")
        .spawn()
        .unwrap();
    assert_eq!(wait(&mut l, Duration::from_secs(20)), Some(0));
    assert_eq!(read(&dir.path().join("env.0")).trim(), "4 6 0 node0 4321");
    assert_eq!(read(&dir.path().join("env.1")).trim(), "5 6 1 node0 4321");
}

#[test]
fn a_rank_killed_by_sigkill_stops_the_job() {
    let dir = tempfile::tempdir().unwrap();
    // Rank 1 dies once the others have started; they would sleep a minute,
    // rank 2 with a child of its own (its process group is signalled).
    let script = format!(
        "if [ $RANK = 1 ]; then \
           while [ ! -f pid.0 ] || [ ! -f pid.2 ] || [ ! -f child.2 ]; do sleep 0.02; done; kill -9 $$; \
         elif [ $RANK = 2 ]; then \
           sleep 60 & echo $! > child.2.tmp && mv child.2.tmp child.2; {WRITE_PID}; wait; \
         else {WRITE_PID}; exec sleep 60; fi"
    );
    let t = Instant::now();
    let mut l = launch(
        dir.path(),
        &["--nproc-per-node", "3", "--exec", "--", "sh", "-c", &script],
    );
    let survivors = pids(dir.path(), &["pid.0", "pid.2", "child.2"]);
    let code = wait(&mut l, Duration::from_secs(30));
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let err = read(&dir.path().join("launcher.err"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("llmft launch: rank 1 (pid "), "{err}");
    assert!(err.contains("was killed by signal SIGKILL (9)"), "{err}");
    assert_gone(&survivors);
}

#[test]
fn a_rank_exiting_nonzero_stops_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let script =
        format!("{WRITE_PID}; if [ $RANK = 1 ]; then sleep 0.2; exit 3; fi; exec sleep 60");
    let mut l = launch(
        dir.path(),
        &["--nproc-per-node", "2", "--exec", "--", "sh", "-c", &script],
    );
    let ranks = pids(dir.path(), &["pid.0", "pid.1"]);
    let code = wait(&mut l, Duration::from_secs(30));
    let err = read(&dir.path().join("launcher.err"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "llmft launch: rank 1 (pid {}) exited with status 3",
            ranks[1]
        )),
        "{err}"
    );
    assert_gone(&ranks);
}

#[test]
fn sigterm_to_the_launcher_ends_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!("{WRITE_PID}; exec sleep 60");
    let mut l = launch(
        dir.path(),
        &["--nproc-per-node", "2", "--exec", "--", "sh", "-c", &script],
    );
    let ranks = pids(dir.path(), &["pid.0", "pid.1"]);
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(
        unsafe { libc::kill(l.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let code = wait(&mut l, Duration::from_secs(15));
    let err = read(&dir.path().join("launcher.err"));
    assert_eq!(code, Some(128 + libc::SIGTERM), "{err}");
    assert!(
        err.contains("llmft launch: got SIGTERM (15); stopped 2 ranks"),
        "{err}"
    );
    assert_gone(&ranks);
}

#[test]
fn without_exec_the_ranks_run_llmft() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = launch(dir.path(), &["--nproc-per-node", "2", "--", "--version"]);
    assert_eq!(wait(&mut l, Duration::from_secs(20)), Some(0));
    let out = read(&dir.path().join("launcher.out"));
    assert_eq!(
        out.matches(concat!("llmft ", env!("CARGO_PKG_VERSION")))
            .count(),
        2,
        "{out}"
    );
}

#[test]
fn bad_arguments_exit_2_with_one_error() {
    let dir = tempfile::tempdir().unwrap();
    for (args, says) in [
        (
            &["--nproc-per-node", "0", "--", "train"][..],
            "--nproc-per-node",
        ),
        (
            &[
                "--nproc-per-node",
                "1",
                "--nnodes",
                "2",
                "--node-rank",
                "2",
                "--",
                "train",
            ],
            "--node-rank 2",
        ),
        (&["--nproc-per-node", "1"], "ARGS"),
        (
            &["--nproc-per-node", "1", "--exec", "--", "/nonexistent/prog"],
            "/nonexistent/prog",
        ),
    ] {
        let mut l = launch(dir.path(), args);
        let code = wait(&mut l, Duration::from_secs(10));
        let err = read(&dir.path().join("launcher.err"));
        let want = if args.contains(&"/nonexistent/prog") {
            1
        } else {
            2
        };
        assert_eq!(code, Some(want), "{args:?}: {err}");
        assert!(
            err.contains(says) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
