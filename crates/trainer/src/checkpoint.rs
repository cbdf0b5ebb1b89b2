//! Checkpoint folders: `checkpoint-<step>/` with the trained parameters —
//! the adapter in PEFT format (`adapter_config.json`,
//! `adapter_model.safetensors`, f32) or, for full / freeze training, the
//! trained weights (`model.safetensors`, f32, Hugging Face names) — the
//! optimizer moments (`optimizer.safetensors`, or one
//! `optimizer-rank<r>-of-<w>.safetensors` per rank), `trainer_state.json`
//! and `manifest.json`.
//!
//! The write protocol survives a kill at any point and a full disk:
//! 1. the files go into `tmp-checkpoint-<step>/`, each created, written,
//!    synced and hashed (SHA-256) as it is written (a data-parallel run's
//!    ranks each write their own optimizer file there; rank 0 hashes them
//!    after a barrier);
//! 2. `manifest.json`, listing every file with its size and SHA-256 in the
//!    order written, is written and synced last, then the folder itself;
//! 3. the folder is renamed to `checkpoint-<step>` (one atomic step; an
//!    earlier folder of the same step is first moved aside to
//!    `replaced-checkpoint-<step>`, which still counts as that step's
//!    checkpoint until the new one is in place) and the output folder is
//!    synced;
//! 4. only then are checkpoints beyond `keep_last` deleted, each renamed to
//!    `deleted-checkpoint-<step>` first so a kill never leaves a
//!    half-deleted folder under a checkpoint's name.
//!
//! A write that fails (no space, a file-size limit) removes its temporary
//! folder and reports one [`Error::CheckpointWrite`]; a killed one leaves
//! it, and [`clean`] removes it when the next run starts. On resume,
//! [`verify`] checks every file against the manifest and refuses the
//! checkpoint, naming the file, when one is missing, of another size or
//! hashes differently: a damaged checkpoint is never skipped for an older
//! one, nor silently replaced by a fresh start.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use llmft_data::Cursor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::io;
use crate::{Error, Result, TrainType};

/// Trained model weights of a full / freeze checkpoint.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimizer state file inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer state file inside a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
/// The manifest of a checkpoint (written last): every other file with its
/// size and SHA-256.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Format tag of `trainer_state.json`.
pub const FORMAT: &str = "llmft-checkpoint-v1";
/// Format tag of `manifest.json`.
pub const MANIFEST_FORMAT: &str = "llmft-checkpoint-manifest-v1";
const PREFIX: &str = "checkpoint-";
const TMP_PREFIX: &str = "tmp-checkpoint-";
const REPLACED_PREFIX: &str = "replaced-checkpoint-";
const DELETED_PREFIX: &str = "deleted-checkpoint-";
/// Test hook: `LLMFT_FAULT_KILL_AT=<step>:<bytes>` makes the process send
/// itself SIGKILL while it writes the checkpoint of `<step>`, once `<bytes>`
/// bytes of that checkpoint's files (manifest included, in the manifest's
/// order) are written: 0 = before the first file, the checkpoint's total
/// size = after the manifest is synced, right before the rename. Tests use
/// it to kill a write at chosen points; it is read once per checkpoint and
/// ignored when unset or malformed.
pub const FAULT_KILL_AT_ENV: &str = "LLMFT_FAULT_KILL_AT";
/// Bytes per write call of a checkpoint file.
const CHUNK: usize = 1 << 16;

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

/// `manifest.json`: the files of a checkpoint, in the order written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The manifest format tag ([`MANIFEST_FORMAT`]).
    pub format: String,
    /// The checkpoint's step (as in `trainer_state.json`).
    pub step: u64,
    /// Every file of the checkpoint but the manifest itself.
    pub files: Vec<ManifestEntry>,
}

/// One file of a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// The file name inside the checkpoint folder.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, lower-case hex.
    pub sha256: String,
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
/// ranks may write into it before [`Writer::commit`]).
pub(crate) fn prepare(output_dir: &Path, step: u64) -> Result<PathBuf> {
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::CheckpointWrite { step, path, source }
    };
    std::fs::create_dir_all(output_dir).map_err(fail(output_dir))?;
    let tmp = tmp_for(output_dir, step);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(fail(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(fail(&tmp))?;
    Ok(tmp)
}

/// The temporary folder of the checkpoint of `step` under `output_dir`.
pub(crate) fn tmp_for(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("{TMP_PREFIX}{step}"))
}

/// The byte offset [`FAULT_KILL_AT_ENV`] asks to be killed at while writing
/// the checkpoint of `step`, if any.
fn fault_kill_at(step: u64) -> Option<u64> {
    let v = std::env::var(FAULT_KILL_AT_ENV).ok()?;
    let (s, bytes) = v.split_once(':')?;
    (s.trim().parse::<u64>().ok()? == step)
        .then(|| bytes.trim().parse().ok())
        .flatten()
}

/// Writes the files of one checkpoint into its temporary folder (made by
/// [`prepare`]): each file is created, written, synced and recorded with
/// its size and SHA-256; [`Writer::commit`] adds the manifest and puts the
/// folder in place.
pub(crate) struct Writer {
    dir: PathBuf,
    step: u64,
    /// Bytes of checkpoint files this process wrote so far.
    written: u64,
    /// [`FAULT_KILL_AT_ENV`]'s offset for this checkpoint.
    kill_at: Option<u64>,
    files: Vec<ManifestEntry>,
}

impl Writer {
    /// A writer of the checkpoint of `step` into `tmp`.
    pub(crate) fn new(tmp: &Path, step: u64) -> Self {
        Writer {
            dir: tmp.to_path_buf(),
            step,
            written: 0,
            kill_at: fault_kill_at(step),
            files: Vec::new(),
        }
    }

    fn fail(&self, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
        let (step, path) = (self.step, path.to_path_buf());
        move |source| Error::CheckpointWrite { step, path, source }
    }

    /// The test hook: SIGKILL once the bytes written reach the offset
    /// [`FAULT_KILL_AT_ENV`] names.
    fn fault_point(&self) {
        if self.kill_at.is_some_and(|k| self.written >= k) {
            // SAFETY: kill(2) on our own pid with a constant signal; no
            // memory is shared with the call.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            std::process::abort();
        }
    }

    /// Creates `name` (which must not exist yet), writes `bytes`, syncs it.
    fn write_synced(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.fault_point();
        let path = self.dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(self.fail(&path))?;
        let mut rest = bytes;
        while !rest.is_empty() {
            self.fault_point();
            let mut n = rest.len().min(CHUNK);
            if let Some(k) = self.kill_at {
                // Stop exactly at the offset (fault_point returned, so
                // written < k).
                n = n.min((k - self.written).try_into().unwrap_or(usize::MAX));
            }
            f.write_all(&rest[..n]).map_err(self.fail(&path))?;
            self.written += n as u64;
            rest = &rest[n..];
        }
        f.sync_all().map_err(self.fail(&path))
    }

    /// Writes the checkpoint file `name` (a plain file name) and records it
    /// for the manifest.
    pub(crate) fn file(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_synced(name, bytes)?;
        self.files.push(ManifestEntry {
            name: name.to_string(),
            size: bytes.len() as u64,
            sha256: hex(&Sha256::digest(bytes)),
        });
        Ok(())
    }

    /// Records the file `name` another rank wrote (and synced) into the
    /// folder, reading it back for its size and hash.
    pub(crate) fn file_of_peer(&mut self, name: &str) -> Result<()> {
        let path = self.dir.join(name);
        let (size, sha256) = hash_file(&path).map_err(self.fail(&path))?;
        self.files.push(ManifestEntry {
            name: name.to_string(),
            size,
            sha256,
        });
        Ok(())
    }

    /// Finishes the checkpoint: `trainer_state.json` and then the manifest
    /// are written and synced, the folder synced and renamed to
    /// `checkpoint-<step>` under `output_dir`, the output folder synced,
    /// and all but the newest `keep_last` checkpoints (0 = keep all)
    /// deleted. On an error before the rename the temporary folder is
    /// removed; earlier checkpoints are never touched before the new one
    /// is in place.
    pub(crate) fn commit(
        mut self,
        output_dir: &Path,
        state: &TrainerState,
        keep_last: usize,
    ) -> Result<PathBuf> {
        let tmp = self.dir.clone();
        let placed = self.place(output_dir, state);
        if placed.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        let dst = placed?;
        if keep_last > 0 {
            let all = list(output_dir)?;
            let others: Vec<&(u64, PathBuf)> = all.iter().filter(|(_, p)| *p != dst).collect();
            let excess = (others.len() + 1).saturating_sub(keep_last);
            for (step, old) in others.into_iter().take(excess) {
                let trash = output_dir.join(format!("{DELETED_PREFIX}{step}"));
                let fail = |p: &Path| {
                    let (step, path) = (*step, p.to_path_buf());
                    move |source| Error::CheckpointWrite { step, path, source }
                };
                if trash.exists() {
                    std::fs::remove_dir_all(&trash).map_err(fail(&trash))?;
                }
                std::fs::rename(old, &trash).map_err(fail(old))?;
                sync_dir(output_dir).map_err(fail(output_dir))?;
                std::fs::remove_dir_all(&trash).map_err(fail(&trash))?;
            }
        }
        Ok(dst)
    }

    /// [`Writer::commit`] up to the rename (and the replaced folder's
    /// removal).
    fn place(&mut self, output_dir: &Path, state: &TrainerState) -> Result<PathBuf> {
        let json = serde_json::to_vec_pretty(state).expect("trainer state serializes");
        self.file(STATE_FILE, &json)?;
        let dir = self.dir.clone();
        sync_dir(&dir).map_err(self.fail(&dir))?;
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            step: self.step,
            files: self.files.clone(),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        self.write_synced(MANIFEST_FILE, &json)?;
        sync_dir(&dir).map_err(self.fail(&dir))?;
        self.fault_point();
        let dst = dir_for(output_dir, self.step);
        let replaced = output_dir.join(format!("{REPLACED_PREFIX}{}", self.step));
        if dst.exists() {
            // An earlier checkpoint of this step (a run resumed from an
            // older one): moved aside, it still counts until the new one
            // is in place.
            if replaced.exists() {
                std::fs::remove_dir_all(&replaced).map_err(self.fail(&replaced))?;
            }
            std::fs::rename(&dst, &replaced).map_err(self.fail(&dst))?;
        }
        std::fs::rename(&dir, &dst).map_err(self.fail(&dst))?;
        sync_dir(output_dir).map_err(self.fail(output_dir))?;
        if replaced.exists() {
            std::fs::remove_dir_all(&replaced).map_err(self.fail(&replaced))?;
        }
        Ok(dst)
    }
}

/// Syncs the directory `dir` (its entries: created, renamed files).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The size and SHA-256 (hex) of the file at `path`, read in pieces.
fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex(&h.finalize())))
}

/// The step of a folder named `<prefix><step>`.
fn step_of(path: &Path, prefix: &str) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix(prefix)?
        .parse::<u64>()
        .ok()
}

/// Checkpoints under `output_dir`, oldest first: every `checkpoint-<step>`
/// folder that looks like one (it holds `manifest.json` or
/// `trainer_state.json`; only a complete write is ever renamed to that
/// name, so a damaged one is listed and then refused by [`verify`]), and a
/// `replaced-checkpoint-<step>` whose replacement was interrupted before it
/// was in place. Temporary folders of an interrupted write, and folders
/// with neither file, are ignored.
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    if !output_dir.exists() {
        return Ok(out);
    }
    let mut replaced = Vec::new();
    for entry in std::fs::read_dir(output_dir).map_err(io(output_dir))? {
        let path = entry.map_err(io(output_dir))?.path();
        if !(path.join(MANIFEST_FILE).is_file() || path.join(STATE_FILE).is_file()) {
            continue;
        }
        if let Some(step) = step_of(&path, PREFIX) {
            out.push((step, path));
        } else if let Some(step) = step_of(&path, REPLACED_PREFIX) {
            replaced.push((step, path));
        }
    }
    for (step, path) in replaced {
        if !out.iter().any(|(s, _)| *s == step) {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint under `output_dir`, if any. It is not checked
/// here: [`verify`] (which resuming runs) refuses it when it is damaged,
/// rather than falling back to an older one.
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(output_dir)?.pop().map(|(_, p)| p))
}

/// Removes what interrupted checkpoint writes left under `output_dir`:
/// temporary folders, folders half-way through deletion, and a replaced
/// checkpoint whose replacement is in place. Returns the folders removed.
/// Only one process of a run may call it, before its first checkpoint.
pub fn clean(output_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !output_dir.is_dir() {
        return Ok(removed);
    }
    for entry in std::fs::read_dir(output_dir).map_err(io(output_dir))? {
        let path = entry.map_err(io(output_dir))?.path();
        if !path.is_dir() {
            continue;
        }
        let stale = step_of(&path, TMP_PREFIX).is_some()
            || step_of(&path, DELETED_PREFIX).is_some()
            || step_of(&path, REPLACED_PREFIX).is_some_and(|s| dir_for(output_dir, s).is_dir());
        if stale {
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
            removed.push(path);
        }
    }
    removed.sort();
    Ok(removed)
}

/// Reads `dir/manifest.json`; the error names the file.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let err = |msg: String| Error::Checkpoint {
        path: path.clone(),
        msg,
    };
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(err(format!(
                "is missing, so {} is not a complete llmft checkpoint (damaged, or written by \
                 an llmft older than checkpoint manifests)",
                dir.display()
            )))
        }
        Err(e) => return Err(err(format!("cannot be read: {e}"))),
    };
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| err(e.to_string()))?;
    if m.format != MANIFEST_FORMAT {
        return Err(err(format!(
            "format {:?}, expected {MANIFEST_FORMAT:?}",
            m.format
        )));
    }
    for f in &m.files {
        let plain = !f.name.is_empty()
            && f.name != "."
            && f.name != ".."
            && !f.name.contains(['/', '\\', '\0'])
            && f.name != MANIFEST_FILE;
        if !plain {
            return Err(err(format!(
                "lists {:?}, which is not a file name of the checkpoint",
                f.name
            )));
        }
        let hex_ok = f.sha256.len() == 64 && f.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_ok {
            return Err(err(format!(
                "the SHA-256 of {:?} is not 64 hex digits",
                f.name
            )));
        }
    }
    if !m.files.iter().any(|f| f.name == STATE_FILE) {
        return Err(err(format!("does not list {STATE_FILE}")));
    }
    Ok(m)
}

/// Checks the checkpoint at `dir` against its manifest: every file listed
/// must be there with its size and SHA-256. The error names the first file
/// that is missing, of another size or damaged.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let m = read_manifest(dir)?;
    for f in &m.files {
        let path = dir.join(&f.name);
        let err = |msg: String| Error::Checkpoint {
            path: path.clone(),
            msg,
        };
        let (size, sha) = match hash_file(&path) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(err(format!("is missing ({MANIFEST_FILE} lists it)")))
            }
            Err(e) => return Err(err(format!("cannot be read: {e}"))),
        };
        if size != f.size {
            return Err(err(format!(
                "is {size} bytes, {MANIFEST_FILE} says {} (truncated or overwritten)",
                f.size
            )));
        }
        if !sha.eq_ignore_ascii_case(&f.sha256) {
            return Err(err(format!(
                "its SHA-256 differs from the one {MANIFEST_FILE} records (the file is damaged)"
            )));
        }
    }
    Ok(m)
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

    fn state(step: u64) -> TrainerState {
        TrainerState {
            format: FORMAT.into(),
            step,
            optimizer_step: step,
            seed: 1,
            cursor: None,
            next_lr: 0.0,
            train_type: None,
            loss_scale: None,
            loss_scale_clean_steps: 0,
            world_size: None,
            optimizer_sharded: false,
        }
    }

    /// Writes checkpoint `step` with one file `a.bin` holding `bytes`.
    fn write(out: &Path, step: u64, bytes: &[u8], keep_last: usize) -> PathBuf {
        let tmp = prepare(out, step).unwrap();
        let mut w = Writer::new(&tmp, step);
        w.file("a.bin", bytes).unwrap();
        w.commit(out, &state(step), keep_last).unwrap()
    }

    fn names(out: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_replaced_or_half_deleted_checkpoint_never_loses_the_last_good_one() {
        let out = std::env::temp_dir().join(format!("llmft-ckpt-replace-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        write(&out, 2, b"two", 0);
        let four = write(&out, 4, b"four", 0);
        assert_eq!(verify(&four).unwrap().files[0].size, 4);
        // Writing step 4 again (a run resumed from checkpoint-2) replaces it.
        write(&out, 4, b"FOUR!", 0);
        assert_eq!(std::fs::read(four.join("a.bin")).unwrap(), b"FOUR!");
        assert_eq!(names(&out), ["checkpoint-2", "checkpoint-4"]);
        // Killed between moving the old one aside and the rename: the old
        // one still counts as step 4 and is kept by clean.
        let replaced = out.join(format!("{REPLACED_PREFIX}4"));
        std::fs::rename(&four, &replaced).unwrap();
        std::fs::create_dir_all(tmp_for(&out, 4)).unwrap();
        std::fs::create_dir_all(out.join(format!("{DELETED_PREFIX}2"))).unwrap();
        assert_eq!(latest_checkpoint(&out).unwrap(), Some(replaced.clone()));
        verify(&replaced).unwrap();
        assert_eq!(clean(&out).unwrap().len(), 2);
        assert_eq!(names(&out), ["checkpoint-2", "replaced-checkpoint-4"]);
        // The next write of step 4 removes it; retention keeps the new one.
        write(&out, 4, b"4", 1);
        assert_eq!(names(&out), ["checkpoint-4"]);
        assert_eq!(list(&out).unwrap(), [(4, four.clone())]);
        // A damaged file is named; so is a missing manifest.
        std::fs::write(four.join("a.bin"), b"5").unwrap();
        let e = verify(&four).unwrap_err().to_string();
        assert!(e.contains("a.bin") && e.contains("SHA-256"), "{e}");
        std::fs::remove_file(four.join(MANIFEST_FILE)).unwrap();
        let e = verify(&four).unwrap_err().to_string();
        assert!(e.contains(MANIFEST_FILE) && e.contains("missing"), "{e}");
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn a_manifest_naming_files_outside_the_folder_is_refused() {
        let dir = std::env::temp_dir().join(format!("llmft-ckpt-escape-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let entry = |name: &str| ManifestEntry {
            name: name.into(),
            size: 0,
            sha256: "0".repeat(64),
        };
        for bad in ["../x", "/etc/passwd", "", "..", MANIFEST_FILE] {
            let m = Manifest {
                format: MANIFEST_FORMAT.into(),
                step: 1,
                files: vec![entry(STATE_FILE), entry(bad)],
            };
            std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
            let e = read_manifest(&dir).unwrap_err().to_string();
            assert!(
                e.contains(MANIFEST_FILE) && e.contains("not a file name"),
                "{bad}: {e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
