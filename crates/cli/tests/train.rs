//! `llmft train` through the binary: the built-in demo job learns, every
//! train type runs, a killed run resumes bit for bit, a kill during a
//! checkpoint write leaves the previous checkpoint usable, and bad input is
//! one clear sentence with a non-zero exit.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{llmft, root, scratch};

/// `train` on the demo model and data with `sets`, into `out`.
fn train_args(out: &Path, sets: &[&str]) -> Vec<String> {
    let mut args = vec![
        "train".to_string(),
        "--output-dir".into(),
        out.display().to_string(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s.to_string());
    }
    args
}

fn run(args: &[String]) -> (i32, String, String) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    llmft(&refs)
}

/// The percentages of "held-out answer accuracy: X% before, Y% after".
fn accuracies(stdout: &str) -> (f64, f64) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("held-out answer accuracy:"))
        .unwrap_or_else(|| panic!("no accuracy line in:\n{stdout}"));
    let nums: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn demo_job_learns_and_writes_a_peft_adapter() {
    let out = scratch("demo");
    let (code, stdout, stderr) = run(&train_args(&out, &[]));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    println!("{stdout}");
    let (before, after) = accuracies(&stdout);
    assert!(
        after >= before + 10.0,
        "held-out accuracy must rise by 10 points or more: {before}% -> {after}%"
    );
    let steps: Vec<f64> = metrics(&out)
        .iter()
        .filter_map(|m| m.get("loss").and_then(|l| l.as_f64()))
        .collect();
    assert_eq!(steps.len(), 250);
    let head: f64 = steps[..20].iter().sum::<f64>() / 20.0;
    let tail: f64 = steps[steps.len() - 20..].iter().sum::<f64>() / 20.0;
    assert!(tail < 0.75 * head, "loss must fall: {head} -> {tail}");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(out.join("adapter").join(f).is_file(), "adapter/{f}");
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 16);
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // The adapter applies to the demo model with `generate`.
    let model = format!("model.path={}", out.join("demo/model").display());
    let adapter = out.join("adapter").display().to_string();
    let (code, text, err) = llmft(&[
        "generate",
        "--prompt",
        "Q: upper abc\nA: ",
        "--adapter",
        &adapter,
        "--set",
        &model,
        "--set",
        "model.quant=nf4",
        "--max-new-tokens",
        "4",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(text.starts_with("Q: upper abc"), "{text}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn every_train_type_runs_a_few_steps() {
    for tt in [
        "qlora",
        "hqq_lora",
        "hqq_dora",
        "bnb_dora",
        "int8_lora",
        "lora",
        "full",
        "freeze",
    ] {
        let out = scratch(&format!("type-{tt}"));
        let t = format!("train.train_type=\"{tt}\"");
        let merged = format!("train.export_merged={}", tt == "qlora");
        let args = train_args(
            &out,
            &[
                &t,
                &merged,
                "train.max_steps=3",
                "train.eval_every=0",
                "data.batch.batch_size=2",
            ],
        );
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, 0, "{tt}: {stdout}\n{stderr}");
        let m = metrics(&out);
        assert_eq!(m.len(), 3, "{tt}");
        assert!(
            m.iter().all(|l| l["loss"].as_f64().unwrap().is_finite()),
            "{tt}"
        );
        let adapter = !matches!(tt, "full" | "freeze");
        let file = if adapter {
            "adapter/adapter_model.safetensors"
        } else {
            "model/model.safetensors"
        };
        assert!(out.join(file).is_file(), "{tt}: {file}");
        if tt == "qlora" {
            // The merged export is a dense HF folder with the tokenizer.
            for f in ["config.json", "model.safetensors", "tokenizer.json"] {
                assert!(out.join("merged").join(f).is_file(), "merged/{f}");
            }
        }
        if tt.ends_with("dora") {
            let cfg = std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap();
            assert!(cfg.contains("\"use_dora\": true"), "{tt}: {cfg}");
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Settings of the resume tests: 20 steps, small batches, dropout on (its
/// masks must be redrawn identically after a resume).
const RESUME: &[&str] = &[
    "train.max_steps=20",
    "train.checkpoint_every=10",
    "train.keep_last=0",
    "train.eval_every=0",
    "lora.lora_dropout=0.1",
    "data.batch.batch_size=4",
];

fn spawn(args: &[String]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_llmft"))
        .args(args)
        .current_dir(root())
        .env_remove("LLMFT_MODEL__PATH")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for(path: &Path, child: &mut std::process::Child) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {} appeared",
            path.display()
        );
        assert!(t.elapsed() < Duration::from_secs(300), "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn killed_run_resumes_bit_for_bit() {
    let straight = scratch("resume-straight");
    let (code, o, e) = run(&train_args(&straight, RESUME));
    assert_eq!(code, 0, "{o}\n{e}");

    let killed = scratch("resume-killed");
    let args = train_args(&killed, RESUME);
    let mut child = spawn(&args);
    wait_for(&killed.join("checkpoint-10"), &mut child);
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(still_running, "the run must be killed mid-way");
    assert!(!killed.join("adapter").exists());

    let mut resume = args.clone();
    resume.push("--resume".into());
    let (code, o, e) = run(&resume);
    assert_eq!(code, 0, "{o}\n{e}");
    assert!(o.contains("resuming from"), "{o}");
    for f in [
        "adapter/adapter_model.safetensors",
        "checkpoint-20/optimizer.safetensors",
        "checkpoint-20/adapter_model.safetensors",
    ] {
        let a = std::fs::read(straight.join(f)).unwrap();
        let b = std::fs::read(killed.join(f)).unwrap();
        assert!(
            a == b,
            "{f} differs between the straight and the resumed run"
        );
    }
    let losses = |d: &Path| -> Vec<(u64, u64)> {
        metrics(d)
            .iter()
            .map(|m| {
                (
                    m["step"].as_u64().unwrap(),
                    m["loss"].as_f64().unwrap().to_bits(),
                )
            })
            .collect()
    };
    assert_eq!(losses(&straight), losses(&killed), "metrics.jsonl");
    for d in [straight, killed] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn kill_during_checkpoint_writes_leaves_the_previous_one_usable() {
    let out = scratch("kill-ckpt");
    let base = train_args(
        &out,
        &[
            "train.max_steps=400",
            "train.checkpoint_every=1",
            "train.keep_last=2",
            "train.eval_every=0",
            "data.batch.batch_size=1",
        ],
    );
    // Most of each step's time goes to the checkpoint, so kills at spread
    // delays land inside writes (and renames / deletions of old ones).
    for delay_ms in [0u64, 37, 113, 271] {
        let mut child = spawn(&base);
        wait_for(&out.join("checkpoint-1"), &mut child);
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        let latest = newest_checkpoint(&out).expect("a checkpoint survives");
        let step: u64 = latest
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_start_matches("checkpoint-")
            .parse()
            .unwrap();
        let mut resume = base.clone();
        resume.extend([
            "--resume".into(),
            "--max-steps".into(),
            (step + 1).to_string(),
        ]);
        let (code, o, e) = run(&resume);
        assert_eq!(code, 0, "resume from {} failed: {o}\n{e}", latest.display());
        let _ = std::fs::remove_dir_all(&out);
    }
}

fn newest_checkpoint(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let n: u64 = p
                .file_name()?
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            Some((n, p))
        })
        .max()
        .map(|(_, p)| p)
}

/// A failing run: exit code ≠ 0, one `error:` line on stderr, no panic.
fn fails(args: &[String]) -> String {
    let (code, _, err) = run(args);
    assert_ne!(code, 0, "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one sentence expected:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

#[test]
fn bad_input_is_one_clear_sentence() {
    let out = scratch("bad");
    let quiet = |sets: &[&str]| {
        let mut a = train_args(&out, sets);
        a.push("--quiet".into());
        a
    };

    let e = fails(&quiet(&["train.max_step=5"]));
    assert!(
        e.contains("`train.max_step`") && e.contains("`train.max_steps`"),
        "{e}"
    );

    let missing = out.join("no-such-model");
    let e = fails(&quiet(&[&format!("model.path=\"{}\"", missing.display())]));
    assert!(e.contains("no-such-model"), "{e}");

    std::fs::create_dir_all(&out).unwrap();
    let data = out.join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\", \"output\": \"d\"}\n{not json\n",
    )
    .unwrap();
    let e = fails(&quiet(&[&format!("data.train=[\"{}\"]", data.display())]));
    assert!(e.contains("bad.jsonl:3"), "{e}");

    // Attention scores of one 131072-token row do not fit in memory.
    let e = fails(&quiet(&[
        "data.batch.seq_len=131072",
        "data.batch.batch_size=1",
    ]));
    assert!(
        e.contains("out of memory at training step 1")
            && e.contains("data.batch.batch_size")
            && e.contains("data.batch.seq_len"),
        "{e}"
    );

    // A checkpoint whose optimizer state is cut short.
    let (code, o, err) = run(&quiet(&["train.max_steps=2", "train.eval_every=0"]));
    assert_eq!(code, 0, "{o}\n{err}");
    let opt = out.join("checkpoint-2/optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    let mut resume = quiet(&["train.max_steps=3"]);
    resume.push("--resume".into());
    let e = fails(&resume);
    assert!(e.contains("optimizer.safetensors"), "{e}");

    let e = fails(&quiet(&[
        "train.train_type=\"lora\"",
        "model.quant=\"nf4\"",
    ]));
    assert!(
        e.contains("model.quant") && e.contains("train.train_type"),
        "{e}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}
