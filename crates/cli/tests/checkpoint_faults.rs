//! Checkpoints under faults, through the binary on the CPU: a run killed
//! (SIGKILL, through the writer's `LLMFT_FAULT_KILL_AT` test hook) at 20
//! byte offsets spread over a checkpoint write resumes from the previous
//! checkpoint and ends with the same adapter bytes as an uninterrupted
//! run; a write that hits a file-size limit fails with one sentence and
//! leaves the previous checkpoint loadable; a checkpoint with any damaged
//! file (adapter, adapter config, optimizer, trainer state, manifest; a
//! rank's optimizer part of a world-2 run) is refused on resume naming the
//! file, never skipped for an older one nor restarted from zero.
use std::collections::BTreeSet;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

mod common;
use common::{port, root, scratch};

/// The demo's model folder and training file, written once per test
/// binary by a one-step demo run.
fn demo() -> &'static (PathBuf, PathBuf) {
    static DEMO: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DEMO.get_or_init(|| {
        let dir = scratch("ckpt-faults-demo");
        let out = llmft(
            &[
                "train",
                "--quiet",
                "--output-dir",
                &dir.display().to_string(),
                "--set",
                "train.max_steps=1",
                "--set",
                "train.eval_every=0",
                "--set",
                "data.batch.batch_size=1",
            ],
            &[],
        );
        assert!(out.status.success(), "{}", text(&out));
        (dir.join("demo/model"), dir.join("demo/train.jsonl"))
    })
}

/// `train` of a small LoRA job on the demo model into `out`: six steps,
/// a checkpoint every two, dropout on (its masks must be redrawn the same
/// after a resume), with `sets` after these.
fn train_args(out: &Path, sets: &[&str]) -> Vec<String> {
    let (model, data) = demo();
    let mut args: Vec<String> = vec![
        "train".into(),
        "--quiet".into(),
        "--output-dir".into(),
        out.display().to_string(),
    ];
    let own = [
        format!("model.path=\"{}\"", model.display()),
        format!("data.train=[\"{}\"]", data.display()),
        "data.validation=0".into(),
        "data.cutoff_len=48".into(),
        "data.batch.seq_len=48".into(),
        "data.batch.batch_size=2".into(),
        "lora.r=4".into(),
        "lora.target_modules=[\"q_proj\", \"v_proj\"]".into(),
        "lora.lora_dropout=0.1".into(),
        "train.max_steps=6".into(),
        "train.checkpoint_every=2".into(),
        "train.eval_every=0".into(),
    ];
    for s in own.iter().map(String::as_str).chain(sets.iter().copied()) {
        args.push("--set".into());
        args.push(s.to_string());
    }
    args
}

fn command(args: &[impl AsRef<str>], env: &[(&str, String)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llmft"));
    c.args(args.iter().map(AsRef::as_ref))
        .current_dir(root())
        .env_remove("LLMFT_MODEL__PATH")
        .env_remove("LLMFT_FAULT_KILL_AT");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn llmft(args: &[impl AsRef<str>], env: &[(&str, String)]) -> Output {
    command(args, env).output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn with_resume(mut args: Vec<String>) -> Vec<String> {
    args.push("--resume".into());
    args
}

fn adapter_bytes(out: &Path) -> Vec<u8> {
    let f = out.join("adapter/adapter_model.safetensors");
    std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()))
}

/// (step, loss bits) of every metrics line.
fn losses(out: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|m| Some((m["step"].as_u64()?, m["loss"].as_f64()?.to_bits())))
        .collect()
}

/// The names of the entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// (file name, size) of a checkpoint's files in the order they are
/// written: the manifest's entries, then the manifest itself.
fn write_order(ckpt: &Path) -> Vec<(String, u64)> {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("manifest.json")).unwrap()).unwrap();
    let mut v: Vec<(String, u64)> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f["size"].as_u64().unwrap(),
            )
        })
        .collect();
    for (name, size) in &v {
        assert_eq!(
            std::fs::metadata(ckpt.join(name)).unwrap().len(),
            *size,
            "{name}"
        );
    }
    let manifest = std::fs::metadata(ckpt.join("manifest.json")).unwrap().len();
    v.push(("manifest.json".into(), manifest));
    v
}

/// 20 byte offsets spread over a write of files of `sizes` (in order):
/// 0, each file's first byte, one byte in, its middle and its last byte,
/// the end of the last file before the manifest, and the total (after the
/// manifest, right before the rename), topped up evenly.
fn kill_points(sizes: &[u64]) -> Vec<u64> {
    let total: u64 = sizes.iter().sum();
    let mut points = BTreeSet::from([0, total]);
    let mut start = 0;
    for &s in sizes {
        points.extend([start, start + 1, start + s / 2, start + s - 1]);
        start += s;
    }
    let mut k = 1;
    while points.len() < 20 {
        points.insert(total * k / 21);
        k += 1;
    }
    // Spread: keep the structural points first, then thin evenly.
    let mut v: Vec<u64> = points.into_iter().collect();
    while v.len() > 20 {
        // Drop the point closest to its left neighbour (never 0 or total).
        let i = (1..v.len() - 1)
            .min_by_key(|&i| v[i] - v[i - 1])
            .expect("more than two points");
        v.remove(i);
    }
    v
}

#[test]
fn kill_at_20_points_of_a_checkpoint_write_resumes_to_the_same_adapter() {
    let t0 = std::time::Instant::now();
    let straight = scratch("ckpt-faults-straight");
    let out = llmft(&train_args(&straight, &["train.keep_last=0"]), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let reference = adapter_bytes(&straight);
    let order = write_order(&straight.join("checkpoint-4"));
    let sizes: Vec<u64> = order.iter().map(|(_, s)| *s).collect();
    let total: u64 = sizes.iter().sum();
    let points = kill_points(&sizes);
    assert_eq!(points.len(), 20, "{points:?}");
    assert_eq!((points[0], points[19]), (0, total));
    println!("checkpoint-4 files in write order: {order:?}; kill points: {points:?}");

    for &at in &points {
        let dir = scratch(&format!("ckpt-faults-kill-{at}"));
        // keep_last = 1: the commit of checkpoint-4 would delete checkpoint-2.
        let args = train_args(&dir, &["train.keep_last=1"]);
        let out = llmft(&args, &[("LLMFT_FAULT_KILL_AT", format!("4:{at}"))]);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGKILL),
            "kill at byte {at}: {}",
            text(&out)
        );
        let left = entries(&dir);
        assert!(
            left.contains(&"checkpoint-2".to_string())
                && !left.contains(&"checkpoint-4".to_string())
                && left.contains(&"tmp-checkpoint-4".to_string()),
            "kill at byte {at} of {total}: {left:?}"
        );

        let out = llmft(&with_resume(args), &[]);
        assert!(
            out.status.success(),
            "resume after byte {at}: {}",
            text(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!(
                "resuming from {}",
                dir.join("checkpoint-2").display()
            )),
            "{stdout}"
        );
        assert!(
            adapter_bytes(&dir) == reference,
            "kill at byte {at}: the resumed run's adapter differs from the uninterrupted run's"
        );
        assert_eq!(losses(&dir), losses(&straight), "kill at byte {at}");
        let left = entries(&dir);
        assert!(
            !left.iter().any(|e| e.starts_with("tmp-")),
            "the killed write's folder is cleaned: {left:?}"
        );
        assert!(
            left.contains(&"checkpoint-6".to_string()) && !left.contains(&"checkpoint-2".into()),
            "retention after the resume: {left:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::remove_dir_all(&straight).unwrap();
    println!(
        "20 kills and resumes in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// Runs `args` with a file-size limit of `bytes` and SIGXFSZ ignored, so a
/// write past the limit fails with EFBIG instead of killing the process.
fn with_file_limit(args: &[String], bytes: u64) -> Output {
    let mut c = command(args, &[]);
    // SAFETY: only async-signal-safe calls (signal, setrlimit) between
    // fork and exec; the ignored disposition survives the exec.
    unsafe {
        c.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: bytes as libc::rlim_t,
                rlim_max: bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().unwrap()
}

/// The single `error: ...` line of a failed run's stderr (no panic).
fn one_error(out: &Output) -> String {
    assert!(!out.status.success(), "{}", text(out));
    assert_eq!(out.status.signal(), None, "{}", text(out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one sentence expected:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

#[test]
fn a_write_past_the_file_size_limit_fails_and_keeps_the_previous_checkpoint() {
    let straight = scratch("ckpt-faults-fsize-straight");
    let out = llmft(
        &train_args(&straight, &["train.max_steps=4", "train.keep_last=1"]),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));

    let dir = scratch("ckpt-faults-fsize");
    // The same job, stopped (by the kill hook) as it starts checkpoint-4.
    let job = train_args(&dir, &["train.max_steps=4", "train.keep_last=1"]);
    let out = llmft(&job, &[("LLMFT_FAULT_KILL_AT", "4:0".into())]);
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{}", text(&out));
    let before: Vec<(String, Vec<u8>)> = entries(&dir.join("checkpoint-2"))
        .into_iter()
        .map(|n| {
            let b = std::fs::read(dir.join("checkpoint-2").join(&n)).unwrap();
            (n, b)
        })
        .collect();
    // What the failed write must leave: the killed write's folder is
    // cleaned as the resume starts, the failed one removes its own.
    let listed: Vec<String> = entries(&dir)
        .into_iter()
        .filter(|e| !e.starts_with("tmp-"))
        .collect();
    // 16 KiB: more than metrics.jsonl and the small JSON files, less than
    // the adapter (about 30 KB) and the optimizer state (about 60 KB).
    let resume = with_resume(job);
    let e = one_error(&with_file_limit(&resume, 16 << 10));
    assert!(
        e.contains("checkpoint 4 was not saved")
            && e.contains("adapter_model.safetensors")
            && e.contains("earlier checkpoints are untouched"),
        "{e}"
    );
    println!("{e}");
    assert_eq!(
        entries(&dir),
        listed,
        "the failed write leaves no folder behind"
    );
    let after: Vec<(String, Vec<u8>)> = entries(&dir.join("checkpoint-2"))
        .into_iter()
        .map(|n| {
            let b = std::fs::read(dir.join("checkpoint-2").join(&n)).unwrap();
            (n, b)
        })
        .collect();
    assert!(before == after, "checkpoint-2 is unchanged");

    // It is loadable: the resume without the limit ends as a straight run.
    let out = llmft(&resume, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(adapter_bytes(&dir) == adapter_bytes(&straight));
    assert_eq!(losses(&dir), losses(&straight));
    for d in [dir, straight] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Flips one byte in the middle of `path` (same size: only the hash can tell).
fn flip_byte(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x20;
    std::fs::write(path, b).unwrap();
}

#[test]
fn a_damaged_checkpoint_file_is_refused_naming_it() {
    let dir = scratch("ckpt-faults-damage");
    // checkpoint-1 and checkpoint-2: a damaged newest one must be refused,
    // not skipped for checkpoint-1.
    let args = train_args(
        &dir,
        &[
            "train.max_steps=2",
            "train.checkpoint_every=1",
            "train.keep_last=0",
        ],
    );
    let out = llmft(&args, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let resume = with_resume(train_args(
        &dir,
        &["train.max_steps=3", "train.keep_last=0"],
    ));
    let ckpt = dir.join("checkpoint-2");
    let metrics = std::fs::read(dir.join("metrics.jsonl")).unwrap();
    let listed = entries(&dir);
    type Damage = fn(&Path);
    let truncate: Damage = |p| {
        let b = std::fs::read(p).unwrap();
        std::fs::write(p, &b[..b.len() - 1]).unwrap();
    };
    let remove: Damage = |p| std::fs::remove_file(p).unwrap();
    let cases: [(&str, Damage, &str); 8] = [
        ("optimizer.safetensors", flip_byte, "SHA-256"),
        ("optimizer.safetensors", truncate, "bytes"),
        ("adapter_model.safetensors", flip_byte, "SHA-256"),
        ("adapter_config.json", flip_byte, "SHA-256"),
        ("trainer_state.json", flip_byte, "SHA-256"),
        ("trainer_state.json", remove, "missing"),
        ("manifest.json", truncate, "manifest.json"),
        ("manifest.json", remove, "missing"),
    ];
    for (file, damage, says) in cases {
        let path = ckpt.join(file);
        let pristine = std::fs::read(&path).unwrap();
        damage(&path);
        let e = one_error(&llmft(&resume, &[]));
        assert!(
            e.contains(&path.display().to_string()) && e.contains(says),
            "{file}: {e}"
        );
        println!("{e}");
        assert_eq!(entries(&dir), listed, "{file}: nothing written");
        assert_eq!(
            std::fs::read(dir.join("metrics.jsonl")).unwrap(),
            metrics,
            "{file}: metrics untouched"
        );
        std::fs::write(&path, pristine).unwrap();
    }
    // Repaired, it resumes.
    let out = llmft(&resume, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("checkpoint-2"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_damaged_rank_file_of_a_world_2_checkpoint_is_refused_naming_it() {
    let dir = scratch("ckpt-faults-w2");
    let launch = |p: u16, args: Vec<String>| -> Vec<String> {
        let mut a: Vec<String> = [
            "launch",
            "--nproc-per-node",
            "2",
            "--master-port",
            &p.to_string(),
            "--",
        ]
        .map(String::from)
        .into();
        a.extend(args);
        a
    };
    let sets = [
        "train.max_steps=2",
        "train.keep_last=0",
        "data.batch.batch_size=1",
        "dist.backend=\"cpu\"",
        // The CPU process group moves host tensors: train on the CPU even
        // where a GPU exists.
        "model.device=\"cpu\"",
        "dist.strategy=\"full_shard\"",
        "dist.timeout_s=60",
    ];
    let out = llmft(&launch(port(0), train_args(&dir, &sets)), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let ckpt = dir.join("checkpoint-2");
    let names: Vec<String> = write_order(&ckpt).into_iter().map(|(n, _)| n).collect();
    for r in 0..2 {
        let f = format!("optimizer-rank0000{r}-of-00002.safetensors");
        assert!(names.contains(&f), "the manifest lists {f}: {names:?}");
    }
    let rank1 = ckpt.join("optimizer-rank00001-of-00002.safetensors");
    flip_byte(&rank1);
    let mut resume = train_args(&dir, &sets);
    resume.push("--resume".into());
    let out = llmft(&launch(port(1), resume), &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&rank1.display().to_string()) && err.contains("SHA-256"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
