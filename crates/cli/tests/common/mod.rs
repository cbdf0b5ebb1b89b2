//! Running the `llmft` binary from the repository root.
#![allow(dead_code)]
use std::path::Path;
use std::process::Command;

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// `llmft <args>` from the repository root, with no `LLMFT_MODEL__PATH`
/// from the environment: (exit code, stdout, stderr).
pub fn llmft(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llmft"))
        .args(args)
        .current_dir(root())
        .env_remove("LLMFT_MODEL__PATH")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh scratch folder under the system temp dir.
pub fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("llmft-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
