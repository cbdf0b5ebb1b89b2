//! Every long-running subcommand shows progress; with output that is not a
//! terminal it is quiet, line-based (no carriage returns) and each line
//! carries counts and a percentage where the total is known.
use std::path::Path;
use std::process::Command;

mod common;
use common::{root, scratch};

/// `llmft <args>` with output to pipes (not a terminal) and a progress line
/// at every report: (exit code, stdout, stderr).
fn llmft_piped(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llmft"))
        .args(args)
        .current_dir(root())
        .env_remove("LLMFT_MODEL__PATH")
        .env("LLMFT_PROGRESS_INTERVAL_S", "0")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `<prefix>` lines (`loading weights: `): each is `P% D/T tensors, G GB, R GB/s, Ns`
/// with P = 100·D/T; the last says 100%. Returns how many there were.
fn check_lines(stderr: &str, prefix: &str, what: &str) -> usize {
    let lines: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .collect();
    assert!(
        lines.len() >= 2,
        "{what}: no loading progress in:\n{stderr}"
    );
    for l in &lines {
        let (pct, rest) = l.split_once("% ").unwrap_or_else(|| panic!("{what}: {l}"));
        let pct: f64 = pct.parse().unwrap_or_else(|_| panic!("{what}: {l}"));
        let (frac, rest) = rest
            .split_once(" tensors, ")
            .unwrap_or_else(|| panic!("{what}: {l}"));
        let (d, t) = frac.split_once('/').unwrap();
        let (d, t): (f64, f64) = (d.parse().unwrap(), t.parse().unwrap());
        assert!((pct - (100.0 * d / t).round()).abs() < 1.0, "{what}: {l}");
        assert!(
            rest.contains(" GB, ") && rest.contains(" GB/s"),
            "{what}: {l}"
        );
    }
    let last = lines.last().unwrap();
    assert!(last.starts_with("100% "), "{what}: {last}");
    lines.len()
}

fn no_carriage_returns(out: &str, err: &str, what: &str) {
    assert!(
        !out.contains('\r') && !err.contains('\r'),
        "{what}: a carriage return"
    );
    assert!(!err.contains("\x1b["), "{what}: a terminal escape");
}

#[test]
fn long_subcommands_report_line_based_progress_off_a_terminal() {
    let dir = scratch("progress");
    let out = dir.join("run");
    let out_s = out.display().to_string();
    // train: loading (random weights, quantized), tokenizing, the steps.
    let (code, so, se) = llmft_piped(&["train", "--max-steps", "4", "--output-dir", &out_s]);
    assert_eq!(code, 0, "{so}\n{se}");
    no_carriage_returns(&so, &se, "train");
    check_lines(&se, "loading weights: ", "train");
    let tok: Vec<&str> = se
        .lines()
        .filter(|l| l.starts_with("tokenizing: "))
        .collect();
    assert!(!tok.is_empty(), "no tokenizing progress:\n{se}");
    for l in &tok {
        let n: usize = l["tokenizing: ".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{l}"));
        assert!(
            n > 0 && l.contains(" records (") && l.contains(" examples, "),
            "{l}"
        );
    }
    let steps: Vec<&str> = se.lines().filter(|l| l.starts_with("step ")).collect();
    assert!(
        steps.iter().any(|l| l.starts_with("step 4/4 loss ")),
        "no step lines:\n{se}"
    );

    let model = format!("model.path={}", out.join("demo/model").display());
    // quantize: loading and quantizing.
    let q = dir.join("q").display().to_string();
    let (code, so, se) = llmft_piped(&["quantize", "--out", &q, "--set", &model]);
    assert_eq!(code, 0, "{so}\n{se}");
    no_carriage_returns(&so, &se, "quantize");
    check_lines(&se, "loading weights: ", "quantize");
    // merge: loading the base, then writing the merged model.
    let m = dir.join("m").display().to_string();
    let adapter = out.join("adapter").display().to_string();
    let (code, so, se) =
        llmft_piped(&["merge", "--adapter", &adapter, "--out", &m, "--set", &model]);
    assert_eq!(code, 0, "{so}\n{se}");
    no_carriage_returns(&so, &se, "merge");
    check_lines(&se, "loading weights: ", "merge");
    check_lines(&se, "writing merged model: ", "merge");
    assert!(Path::new(&m).join("config.json").is_file());
    // data inspect tokenizes the whole dataset for its statistics.
    let train = format!(
        "data.train=[\"{}\"]",
        Path::new(root())
            .join("crates/cli/demo/train.jsonl")
            .display()
    );
    let (code, so, se) = llmft_piped(&[
        "data", "inspect", "-n", "1", "--set", &model, "--set", &train,
    ]);
    assert_eq!(code, 0, "{so}\n{se}");
    no_carriage_returns(&so, &se, "data inspect");
    assert!(
        se.lines()
            .any(|l| l.starts_with("tokenizing: 3000 records (3000 examples")),
        "{se}"
    );
    // generate: loading the model (and the adapter) before decoding.
    let (code, so, se) = llmft_piped(&[
        "generate",
        "--prompt",
        "2+2=",
        "--max-new-tokens",
        "4",
        "--adapter",
        &adapter,
        "--set",
        &model,
    ]);
    assert_eq!(code, 0, "{so}\n{se}");
    no_carriage_returns(&so, &se, "generate");
    check_lines(&se, "loading weights: ", "generate");
    // bench: drawing and quantizing its random weights.
    let (code, so, se) = llmft_piped(&[
        "bench",
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--gemm-size",
        "0",
    ]);
    assert_eq!(code, 0, "{so}\n{se}");
    no_carriage_returns(&so, &se, "bench");
    check_lines(&se, "loading weights: ", "bench");
    std::fs::remove_dir_all(&dir).unwrap();
}
