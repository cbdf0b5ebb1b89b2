//! Bounded memory on huge records: a dataset with one 100 MB line trains
//! with a peak RSS within 2× of the same run without that line — the line
//! is held once while read, its strings are cut to what `cutoff_len` can
//! use while parsed, and only that much is tokenized.
use std::io::Write;
use std::path::Path;
use std::process::Command;

mod common;
use common::{root, scratch};

/// Peak resident memory (KiB) of `llmft <args>`, from the kernel's
/// accounting of the reaped child (the VmHWM it had when it exited), with
/// its exit status and output (stdout then stderr).
fn peak_rss_kib(args: &[&str], dir: &Path) -> (i64, i32, String) {
    let out_path = dir.join("stdout.txt");
    let err_path = dir.join("stderr.txt");
    let child = Command::new(env!("CARGO_BIN_EXE_llmft"))
        .args(args)
        .current_dir(root())
        .env_remove("LLMFT_MODEL__PATH")
        .env("RAYON_NUM_THREADS", "2")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value; wait4 fills it and reaps
    // our own child (whose `Child` handle is not waited on again).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    std::mem::forget(child);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (usage.ru_maxrss, code, read(&out_path) + &read(&err_path))
}

#[test]
fn a_100_mb_record_keeps_peak_memory_within_twice_the_run_without_it() {
    let dir = scratch("memory");
    std::fs::create_dir_all(&dir).unwrap();
    let demo = std::fs::read_to_string(root().join("crates/cli/demo/train.jsonl")).unwrap();
    let plain = dir.join("plain.jsonl");
    std::fs::write(&plain, &demo).unwrap();
    // The same records and one 100 MB line: an answer of 100 MB of letters
    // and spaces (a real tokenizer's worst case is one huge string field).
    let huge = dir.join("huge.jsonl");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&huge).unwrap());
        f.write_all(demo.as_bytes()).unwrap();
        f.write_all(br#"{"messages": [{"role": "user", "content": "upper abc"}, {"role": "assistant", "content": ""#)
            .unwrap();
        let block = "ABC DEFG HIJ KLMNO PQRS TUV WXYZ ".repeat(2048);
        let mut written = 0;
        while written < 100 << 20 {
            f.write_all(block.as_bytes()).unwrap();
            written += block.len();
        }
        f.write_all(b"\"}]}\n").unwrap();
    }
    assert!(std::fs::metadata(&huge).unwrap().len() > 100 << 20);
    let run = |data: &Path, out: &str| {
        let train = format!("data.train=[\"{}\"]", data.display());
        let out = dir.join(out).display().to_string();
        peak_rss_kib(
            &[
                "train",
                "--quiet",
                "--max-steps",
                "2",
                "--output-dir",
                &out,
                "--set",
                &train,
                "--set",
                "data.validation=0.0",
                "--set",
                "model.device=cpu",
            ],
            &dir,
        )
    };
    let (base, code, err) = run(&plain, "plain");
    assert_eq!(code, 0, "{err}");
    let (with, code, err) = run(&huge, "huge");
    assert_eq!(code, 0, "{err}");
    // The huge record was read, kept (cut to cutoff_len) and counted.
    assert!(
        err.contains("3001 records → 3001 examples; 1 truncated"),
        "{err}"
    );
    println!(
        "peak RSS: {} MiB without the 100 MB record, {} MiB with it ({:.2}x)",
        base / 1024,
        with / 1024,
        with as f64 / base as f64
    );
    assert!(
        with <= 2 * base,
        "peak RSS {with} KiB with the 100 MB record vs {base} KiB without"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
