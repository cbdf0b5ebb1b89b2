//! Checkpoint folders: `checkpoint-<step>/` with the trained parameters —
//! the adapter in PEFT format (`adapter_config.json`,
//! `adapter_model.safetensors`, f32) or, for full / freeze training, the
//! trained weights (`model.safetensors`, f32, Hugging Face names) — the
//! optimizer moments (`optimizer.safetensors`) and `trainer_state.json`. A folder is
//! written under a temporary name and renamed, so a crash mid-write never
//! leaves a folder named `checkpoint-<step>` that is incomplete.
use std::path::{Path, PathBuf};

use llmft_data::Cursor;
use serde::{Deserialize, Serialize};

use crate::error::io;
use crate::{Error, Result, TrainType};

/// Trained model weights of a full / freeze checkpoint.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimizer state file inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer state file inside a checkpoint (written last).
pub const STATE_FILE: &str = "trainer_state.json";
/// Format tag of `trainer_state.json`.
pub const FORMAT: &str = "llmft-checkpoint-v1";
const PREFIX: &str = "checkpoint-";
const TMP_PREFIX: &str = "tmp-checkpoint-";

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// The checkpoint format tag (`"llmft-checkpoint-v1"`); a checkpoint with another is
    /// refused.
    pub format: String,
    /// Completed steps (the schedule's position).
    pub step: u64,
    /// Updates the optimizer applied (bias correction).
    pub optimizer_step: u64,
    /// Run seed (dropout masks derive from it and the step).
    pub seed: u64,
    /// Data loader position after the last step, if the loop recorded one.
    pub cursor: Option<Cursor>,
    /// Learning rate of the next step (informative).
    pub next_lr: f32,
    /// The run's train type (absent in older states).
    #[serde(default)]
    pub train_type: Option<TrainType>,
    /// The f16 loss scale for the next step; `None` unless f16.
    #[serde(default)]
    pub loss_scale: Option<f32>,
    /// Clean f16 steps since the loss scale last changed.
    #[serde(default)]
    pub loss_scale_clean_steps: u64,
    /// Data-parallel ranks of the run (its data cursor counts this many
    /// ranks' batches); absent = 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
    /// The optimizer state is split over the ranks: one
    /// [`optimizer_rank_file`] per rank instead of `optimizer.safetensors`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optimizer_sharded: bool,
}

/// The folder of the checkpoint of `step` under `output_dir`.
pub(crate) fn dir_for(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("{PREFIX}{step}"))
}

/// The optimizer file of `rank` of `world` in a checkpoint whose optimizer
/// state is split over the ranks.
pub fn optimizer_rank_file(rank: usize, world: usize) -> String {
    format!("optimizer-rank{rank:05}-of-{world:05}.safetensors")
}

/// The temporary folder of the checkpoint of `step`, made empty (several
/// ranks may write into it before [`commit`]).
pub(crate) fn prepare(output_dir: &Path, step: u64) -> Result<PathBuf> {
    std::fs::create_dir_all(output_dir).map_err(io(output_dir))?;
    let tmp = tmp_for(output_dir, step);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    Ok(tmp)
}

/// The temporary folder of the checkpoint of `step` under `output_dir`.
pub(crate) fn tmp_for(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("{TMP_PREFIX}{step}"))
}

/// Finishes the checkpoint being written in `tmp` (made by [`prepare`]):
/// `files` adds to it, `trainer_state.json` is written last, every file
/// synced, the folder renamed to `checkpoint-<step>`, and all but the
/// newest `keep_last` checkpoints (0 = keep all) deleted.
pub(crate) fn commit(
    output_dir: &Path,
    tmp: &Path,
    state: &TrainerState,
    keep_last: usize,
    files: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    files(tmp)?;
    let json = serde_json::to_vec_pretty(state).expect("trainer state serializes");
    let state_path = tmp.join(STATE_FILE);
    std::fs::write(&state_path, json).map_err(io(&state_path))?;
    for entry in std::fs::read_dir(tmp).map_err(io(tmp))? {
        let path = entry.map_err(io(tmp))?.path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))?;
    }
    let dst = dir_for(output_dir, state.step);
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(io(&dst))?;
    }
    std::fs::rename(tmp, &dst).map_err(io(&dst))?;
    if keep_last > 0 {
        let all = list(output_dir)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep_last)) {
            std::fs::remove_dir_all(old).map_err(io(old))?;
        }
    }
    Ok(dst)
}

/// Complete checkpoints under `output_dir` (named `checkpoint-<step>` and
/// holding `trainer_state.json`), oldest first. Temporary folders of an
/// interrupted write are ignored.
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    if !output_dir.exists() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(output_dir).map_err(io(output_dir))? {
        let path = entry.map_err(io(output_dir))?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(step) = step {
            if path.join(STATE_FILE).is_file() {
                out.push((step, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint under `output_dir`, if any.
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(output_dir)?.pop().map(|(_, p)| p))
}

/// Reads `dir/trainer_state.json`; the error names the file.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read(&path).map_err(io(&path))?;
    let state: TrainerState = serde_json::from_slice(&text).map_err(|e| Error::Checkpoint {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    if state.format != FORMAT {
        return Err(Error::Checkpoint {
            path,
            msg: format!("format {:?}, expected {FORMAT:?}", state.format),
        });
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_without_the_newer_fields_still_load() {
        let dir = std::env::temp_dir().join(format!("llmft-state-v1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(STATE_FILE),
            r#"{"format": "llmft-checkpoint-v1", "step": 4, "optimizer_step": 3, "seed": 42,
                "cursor": null, "next_lr": 0.001}"#,
        )
        .unwrap();
        let s = read_state(&dir).unwrap();
        assert_eq!((s.step, s.optimizer_step, s.train_type), (4, 3, None));
        assert_eq!((s.loss_scale, s.loss_scale_clean_steps), (None, 0));
        std::fs::write(
            dir.join(STATE_FILE),
            r#"{"format": "llmft-checkpoint-v1", "step": 4, "optimizer_step": 3, "seed": 42,
                "cursor": null, "next_lr": 0.001, "train_type": "freeze",
                "loss_scale": 1024.0, "loss_scale_clean_steps": 7}"#,
        )
        .unwrap();
        let s = read_state(&dir).unwrap();
        assert_eq!(s.train_type, Some(TrainType::Freeze));
        assert_eq!((s.loss_scale, s.loss_scale_clean_steps), (Some(1024.0), 7));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
