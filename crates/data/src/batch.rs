//! Batches: packed rows or padded rows, a seeded shuffle per epoch, shards
//! per rank and a resumable cursor.
//!
//! Every epoch has a plan fixed by `(seed, epoch, dataset, config, world)`:
//! 1. the example order: `0..n`, shuffled with [`SplitMix64`] seeded by
//!    `(seed, epoch)` when `shuffle` is on;
//! 2. rows: packing places examples in that order first-fit into a window
//!    of `pack_window` open rows of `seq_len` tokens (the oldest row is
//!    closed when none fits); without packing each example is a row, and
//!    with `group_by_length` rows are sorted by length within windows of 64
//!    batches whose batch order is then shuffled;
//! 3. global micro-batches of `batch_size` consecutive rows (`drop_last`
//!    drops a short last one);
//! 4. rank `r` of `w` takes global batches `r, r + w, r + 2w, ...`, and every
//!    rank the same number (`floor(global / w)`), so shards are disjoint and
//!    ranks step together.
//!
//! A [`Cursor`] `(epoch, index)` names the next batch of this rank; seeking
//! to it reproduces exactly the batches a run would have seen from there.

use serde::{Deserialize, Serialize};

use crate::config::{BatchConfig, DataConfig};
use crate::dataset::TokenizedDataset;
use crate::encode::IGNORE_INDEX;
use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// Rows of padding batches are sorted by length within windows of this many batches.
const GROUP_WINDOW_BATCHES: usize = 64;

/// Consecutive epochs without a batch for this rank before [`Loader::next_batch`] gives up.
pub const MAX_EMPTY_EPOCHS: usize = 8;

/// This process's place among data-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// This rank, `0..world`.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
}

impl Shard {
    /// A single process.
    pub fn single() -> Self {
        Shard { rank: 0, world: 1 }
    }

    /// Rank `rank` of `world`.
    pub fn new(rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::config(
                "rank",
                format!("rank {rank} is not in 0..{world}"),
            ));
        }
        Ok(Shard { rank, world })
    }

    /// From torchrun's `RANK`/`WORLD_SIZE` or SLURM's `SLURM_PROCID`/
    /// `SLURM_NTASKS`; a single process when neither is set.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok();
        let pair = match (var("RANK"), var("WORLD_SIZE")) {
            (Some(r), Some(w)) => Some((r, w, "RANK")),
            _ => match (var("SLURM_PROCID"), var("SLURM_NTASKS")) {
                (Some(r), Some(w)) => Some((r, w, "SLURM_PROCID")),
                _ => None,
            },
        };
        let Some((r, w, key)) = pair else {
            return Ok(Shard::single());
        };
        let parse = |s: &str, k: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| Error::config(k, format!("`{s}` is not a number")))
        };
        Shard::new(parse(&r, key)?, parse(&w, "WORLD_SIZE")?)
    }
}

/// Position in the batch stream: the next batch is number `index` (of this
/// rank) in epoch `epoch`. Save it in checkpoints; [`Loader::seek`] resumes.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Cursor {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Batch index within the epoch, for this rank.
    pub index: u64,
}

/// A micro-batch: `rows` rows of `seq_len` tokens, flattened row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Rows.
    pub rows: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Token ids; padding is the dataset's pad id.
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids` ([`IGNORE_INDEX`] on prompt and padding).
    pub labels: Vec<i32>,
    /// Position of each token within its own example (0 on padding).
    pub position_ids: Vec<u32>,
    /// Per row, the example boundaries as cumulative offsets: `[0, l1,
    /// l1 + l2, ..., used]`; tokens at `used..seq_len` are padding. A token
    /// attends only to earlier tokens between the same two boundaries.
    pub cu_seqlens: Vec<Vec<u32>>,
    /// Per row, the dataset indices of the examples in it.
    pub examples: Vec<Vec<u32>>,
}

impl Batch {
    /// Non-padding tokens.
    pub fn num_tokens(&self) -> usize {
        self.cu_seqlens
            .iter()
            .map(|c| *c.last().unwrap_or(&0) as usize)
            .sum()
    }

    /// Tokens with a label.
    pub fn num_trained(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }

    /// Which example of `row` the token at `pos` belongs to (`None` for padding).
    pub fn sequence_of(&self, row: usize, pos: usize) -> Option<usize> {
        let c = &self.cu_seqlens[row];
        let pos = pos as u32;
        if pos >= *c.last()? {
            return None;
        }
        Some(c.partition_point(|&b| b <= pos) - 1)
    }

    /// Whether the token at `query` may attend to the token at `key` in
    /// `row`: causal, and within one example.
    pub fn can_attend(&self, row: usize, query: usize, key: usize) -> bool {
        key <= query
            && self.sequence_of(row, query).is_some()
            && self.sequence_of(row, query) == self.sequence_of(row, key)
    }

    /// Next-token targets: `targets[t] = labels[t + 1]` when `t + 1` is in
    /// the same example, else [`IGNORE_INDEX`] — the shift done per example
    /// so that no prediction crosses a packing boundary.
    pub fn targets(&self) -> Vec<i32> {
        let mut out = vec![IGNORE_INDEX; self.labels.len()];
        for (r, bounds) in self.cu_seqlens.iter().enumerate() {
            let base = r * self.seq_len;
            for w in bounds.windows(2) {
                let (s, e) = (w[0] as usize, w[1] as usize);
                for t in s..e.saturating_sub(1) {
                    out[base + t] = self.labels[base + t + 1];
                }
            }
        }
        out
    }

    /// Boundaries over the whole flattened batch (offsets into
    /// `input_ids`), as variable-length attention kernels take them; each
    /// row's padding tail is a sequence of its own.
    pub fn flat_cu_seqlens(&self) -> Vec<u32> {
        let mut out = vec![0u32];
        for (r, bounds) in self.cu_seqlens.iter().enumerate() {
            let base = (r * self.seq_len) as u32;
            out.extend(bounds[1..].iter().map(|&b| base + b));
            if (*bounds.last().unwrap_or(&0) as usize) < self.seq_len {
                out.push(base + self.seq_len as u32);
            }
        }
        out.dedup();
        out
    }
}

/// Rows of example indices, per micro-batch.
type Plan = Vec<Vec<Vec<u32>>>;

/// Batches of a [`TokenizedDataset`] for one rank, over any number of epochs.
#[derive(Debug)]
pub struct Loader<'a> {
    data: &'a TokenizedDataset,
    cfg: BatchConfig,
    shard: Shard,
    cursor: Cursor,
    plan: Option<(u64, Plan)>,
}

impl<'a> Loader<'a> {
    /// A loader over `data` with `config.batch` (its `seq_len` 0 means
    /// `config.cutoff_len`), starting at epoch 0.
    pub fn new(data: &'a TokenizedDataset, config: &DataConfig, shard: Shard) -> Result<Self> {
        let mut cfg = config.batch.clone();
        if cfg.seq_len == 0 {
            cfg.seq_len = config.cutoff_len;
        }
        Self::with_batch_config(data, cfg, shard)
    }

    /// A loader with a complete batch config (`seq_len` > 0 when packing).
    pub fn with_batch_config(
        data: &'a TokenizedDataset,
        cfg: BatchConfig,
        shard: Shard,
    ) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(Error::config("batch.batch_size", "must be at least 1"));
        }
        if cfg.packing && cfg.seq_len == 0 {
            return Err(Error::config(
                "batch.seq_len",
                "must be at least 1 when packing",
            ));
        }
        Shard::new(shard.rank, shard.world)?;
        Ok(Loader {
            data,
            cfg,
            shard,
            cursor: Cursor::default(),
            plan: None,
        })
    }

    /// The next batch's position.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Continue from `cursor` (as saved from [`Loader::cursor`]).
    pub fn seek(&mut self, cursor: Cursor) {
        self.cursor = cursor;
    }

    /// Batches this rank gets in `epoch` (packing can make it differ a
    /// little between epochs).
    pub fn batches_in_epoch(&mut self, epoch: u64) -> usize {
        self.plan_for(epoch).len()
    }

    /// Batch `index` of `epoch` for this rank, without moving the cursor.
    pub fn batch_at(&mut self, epoch: u64, index: usize) -> Option<Batch> {
        let rows = self.plan_for(epoch).get(index)?.clone();
        Some(self.build(&rows))
    }

    /// The next batch, moving on to the next epoch after the last one. An
    /// epoch with no batch for this rank (tiny data: fewer micro-batches
    /// than ranks) is skipped; `None` when that happens
    /// [`MAX_EMPTY_EPOCHS`] times in a row.
    pub fn next_batch(&mut self) -> Option<Batch> {
        for _ in 0..MAX_EMPTY_EPOCHS {
            let Cursor { epoch, index } = self.cursor;
            let n = self.batches_in_epoch(epoch) as u64;
            if index >= n {
                self.cursor = Cursor {
                    epoch: epoch + 1,
                    index: 0,
                };
                continue;
            }
            let batch = self.batch_at(epoch, index as usize)?;
            self.cursor = if index + 1 >= n {
                Cursor {
                    epoch: epoch + 1,
                    index: 0,
                }
            } else {
                Cursor {
                    epoch,
                    index: index + 1,
                }
            };
            return Some(batch);
        }
        None
    }

    fn plan_for(&mut self, epoch: u64) -> &Plan {
        if self.plan.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let global = self.global_plan(epoch);
            let (rank, world) = (self.shard.rank, self.shard.world);
            let per_rank = global.len() / world;
            let mine = global
                .into_iter()
                .skip(rank)
                .step_by(world)
                .take(per_rank)
                .collect();
            self.plan = Some((epoch, mine));
        }
        &self.plan.as_ref().expect("plan was just set").1
    }

    fn global_plan(&self, epoch: u64) -> Plan {
        let cfg = &self.cfg;
        let n = self.data.len();
        let mut order: Vec<u32> = (0..n as u32).collect();
        if cfg.shuffle {
            SplitMix64::new(cfg.seed, 0, epoch).shuffle(&mut order);
        }
        let len = |i: u32| self.data.example_len(i as usize);
        let mut batches: Plan = if cfg.packing {
            let rows = pack(&order, len, cfg.seq_len, cfg.pack_window.max(1));
            rows.chunks(cfg.batch_size).map(<[_]>::to_vec).collect()
        } else if cfg.group_by_length {
            let mut rng = SplitMix64::new(cfg.seed, 2, epoch);
            let mut out = Vec::new();
            for window in order.chunks(cfg.batch_size * GROUP_WINDOW_BATCHES) {
                let mut w = window.to_vec();
                w.sort_by_key(|&i| std::cmp::Reverse(len(i)));
                let mut group: Plan = w
                    .chunks(cfg.batch_size)
                    .map(|c| c.iter().map(|&i| vec![i]).collect())
                    .collect();
                if cfg.shuffle {
                    rng.shuffle(&mut group);
                }
                out.extend(group);
            }
            out
        } else {
            order
                .chunks(cfg.batch_size)
                .map(|c| c.iter().map(|&i| vec![i]).collect())
                .collect()
        };
        if cfg.drop_last {
            batches.retain(|b| b.len() == cfg.batch_size);
        }
        batches
    }

    fn build(&self, rows: &[Vec<u32>]) -> Batch {
        let seq_len = if self.cfg.packing {
            self.cfg.seq_len
        } else {
            let longest = rows
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|&i| self.data.example_len(i as usize))
                        .sum::<usize>()
                })
                .max()
                .unwrap_or(0);
            let m = self.cfg.pad_to_multiple_of.max(1);
            longest.div_ceil(m) * m
        };
        let total = rows.len() * seq_len;
        let mut b = Batch {
            rows: rows.len(),
            seq_len,
            input_ids: vec![self.data.pad_id(); total],
            labels: vec![IGNORE_INDEX; total],
            position_ids: vec![0; total],
            cu_seqlens: Vec::with_capacity(rows.len()),
            examples: rows.to_vec(),
        };
        for (r, row) in rows.iter().enumerate() {
            let base = r * seq_len;
            let mut used = 0usize;
            let mut bounds = vec![0u32];
            for &ex in row {
                let ids = self.data.input_ids(ex as usize);
                // Longer than a row only when the dataset was built with a
                // larger cutoff than this row length: keep the head.
                let take = ids.len().min(seq_len - used);
                let trained = self.data.trained(ex as usize);
                for t in 0..take {
                    let k = base + used + t;
                    b.input_ids[k] = ids[t];
                    b.labels[k] = if trained[t] {
                        ids[t] as i32
                    } else {
                        IGNORE_INDEX
                    };
                    b.position_ids[k] = t as u32;
                }
                used += take;
                bounds.push(used as u32);
            }
            b.cu_seqlens.push(bounds);
        }
        b
    }
}

impl Iterator for Loader<'_> {
    type Item = Batch;

    /// Endless over epochs (see [`Loader::next_batch`]).
    fn next(&mut self) -> Option<Batch> {
        self.next_batch()
    }
}

/// First-fit packing of examples (in `order`) into rows of `seq_len`
/// tokens, with at most `window` rows open; rows come out in closing order.
fn pack(order: &[u32], len: impl Fn(u32) -> usize, seq_len: usize, window: usize) -> Vec<Vec<u32>> {
    let mut done = Vec::new();
    let mut open: std::collections::VecDeque<(usize, Vec<u32>)> = std::collections::VecDeque::new();
    for &i in order {
        let l = len(i).min(seq_len);
        if let Some(row) = open.iter_mut().find(|(used, _)| used + l <= seq_len) {
            row.0 += l;
            row.1.push(i);
            continue;
        }
        if open.len() == window {
            done.push(open.pop_front().expect("window is not empty").1);
        }
        open.push_back((l, vec![i]));
    }
    done.extend(open.into_iter().map(|(_, r)| r));
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_fills_gaps_in_the_window() {
        let lens = [6, 6, 3, 4, 2];
        let rows = pack(&[0, 1, 2, 3, 4], |i| lens[i as usize], 8, 2);
        // 0 opens row A, 1 opens B, 2 fits neither: A is closed, C opened;
        // 3 joins C, 4 fills B.
        assert_eq!(rows, vec![vec![0], vec![1, 4], vec![2, 3]]);
        let rows = pack(&[0, 1, 2, 3, 4], |i| lens[i as usize], 8, 4);
        assert_eq!(rows, vec![vec![0, 4], vec![1], vec![2, 3]]);
    }
}
