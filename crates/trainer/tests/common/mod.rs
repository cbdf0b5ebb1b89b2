//! The synthetic data and scratch folders the trainer tests share.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

use llmft_models::ModelBatch;
use llmft_tensor::Ctx;

/// Tokens per row.
pub const SEQ: usize = 12;

/// The tiny Llama-3 fixture (f32 HF folder).
pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/llama3")
}

/// A fresh scratch folder (removed if it exists) named after the test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llmft-trainer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Row `r` of a synthetic dataset: a deterministic token sequence.
pub fn row(r: usize) -> Vec<i32> {
    (0..SEQ)
        .map(|i| ((i * 7 + r * 13 + 3) % 96) as i32)
        .collect()
}

/// A batch of the given rows.
pub fn batch(ctx: &Ctx, rows: &[usize]) -> ModelBatch {
    let ids: Vec<i32> = rows.iter().flat_map(|&r| row(r)).collect();
    ModelBatch::from_host(ctx, rows.len(), SEQ, &ids, None, None, None).unwrap()
}

/// The micro-batches of step `step` (data changes with the step).
pub fn step_batches(ctx: &Ctx, step: u64) -> Vec<ModelBatch> {
    let s = step as usize;
    vec![
        batch(ctx, &[s % 5, (s + 1) % 5]),
        batch(ctx, &[(s + 2) % 5]),
    ]
}
