//! Data parallelism inside the trainer: every rank runs the same step on
//! its own part of the global batch, the trained-token count that
//! normalizes the loss is summed over the ranks before the backward, and
//! the gradients are summed over the ranks (as flat buckets) before the
//! update, so every rank applies the same update and world N trains as
//! world 1 at the same global batch.
//!
//! Every rank holds the whole trainable state (adapter, or the f32 masters
//! of full/freeze training). Its optimizer state is replicated, or split
//! over the ranks ([`DataParallel::with_sharded_optimizer`]: each rank
//! updates the parameters it owns and broadcasts them). The frozen weights
//! are what a sharded store splits.
use std::sync::Arc;

use llmft_models::Grads;
use llmft_shard::ProcessGroup;
use llmft_tensor::{Ctx, DType, Tensor};

use crate::Result;

/// Elements of one gradient bucket (f32: 100 MB).
pub const BUCKET_ELEMS: usize = 25 << 20;

/// The data-parallel group of a trainer.
#[derive(Clone)]
pub struct DataParallel {
    group: Arc<dyn ProcessGroup>,
    bucket_elems: usize,
    shard_optimizer: bool,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DataParallel(rank {} of {}, {})",
            self.group.rank(),
            self.group.world_size(),
            self.group.backend()
        )
    }
}

impl DataParallel {
    /// Data parallelism over `group`.
    pub fn new(group: Arc<dyn ProcessGroup>) -> Self {
        Self {
            group,
            bucket_elems: BUCKET_ELEMS,
            shard_optimizer: false,
        }
    }

    /// The same with the optimizer state split over the ranks (ZeRO stage
    /// 1: each rank keeps and updates the moments of 1/world of the
    /// parameters, checkpoints hold one optimizer file per rank), as FSDP's
    /// sharded strategies do; off (replicated, as DDP) by default.
    pub fn with_sharded_optimizer(mut self, on: bool) -> Self {
        self.shard_optimizer = on;
        self
    }

    /// Whether the optimizer state is split over the ranks.
    pub fn shards_optimizer(&self) -> bool {
        self.shard_optimizer && self.world_size() > 1
    }

    /// The same with buckets of `elems` elements (tests).
    pub fn with_bucket_elems(mut self, elems: usize) -> Self {
        self.bucket_elems = elems.max(1);
        self
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.group.world_size()
    }

    /// The process group.
    pub fn group(&self) -> &Arc<dyn ProcessGroup> {
        &self.group
    }

    /// `vals` summed over the ranks (f32 on the wire: counts are exact
    /// below 2^24).
    pub fn sum(&self, ctx: &Ctx, vals: &[f64]) -> Result<Vec<f64>> {
        let v: Vec<f32> = vals.iter().map(|&x| x as f32).collect();
        let mut t = Tensor::from_slice(ctx, &v, &[v.len()])?;
        self.group.all_reduce_sum(ctx, &mut t)?;
        Ok(t.to_vec::<f32>()?.into_iter().map(f64::from).collect())
    }

    /// Sums every gradient of `grads` over the ranks, in place: tensors of
    /// one dtype are packed, in [`Grads::tensors_mut`] order, into buckets
    /// of at most the bucket size (a larger tensor is reduced alone).
    pub fn all_reduce_grads(&self, ctx: &Ctx, grads: &mut Grads) -> Result<()> {
        let mut by_dtype: Vec<(DType, Vec<&mut Tensor>)> = Vec::new();
        for t in grads.tensors_mut() {
            match by_dtype.iter_mut().find(|(d, _)| *d == t.dtype()) {
                Some((_, v)) => v.push(t),
                None => by_dtype.push((t.dtype(), vec![t])),
            }
        }
        for (dtype, tensors) in by_dtype {
            let mut bucket: Vec<&mut Tensor> = Vec::new();
            let mut elems = 0;
            for t in tensors {
                if t.numel() >= self.bucket_elems {
                    self.group.all_reduce_sum(ctx, t)?;
                    continue;
                }
                if elems + t.numel() > self.bucket_elems {
                    self.reduce_bucket(ctx, dtype, &mut bucket, elems)?;
                    bucket.clear();
                    elems = 0;
                }
                elems += t.numel();
                bucket.push(t);
            }
            self.reduce_bucket(ctx, dtype, &mut bucket, elems)?;
        }
        Ok(())
    }

    fn reduce_bucket(
        &self,
        ctx: &Ctx,
        dtype: DType,
        bucket: &mut [&mut Tensor],
        elems: usize,
    ) -> Result<()> {
        match bucket {
            [] => return Ok(()),
            [one] => return Ok(self.group.all_reduce_sum(ctx, one)?),
            _ => {}
        }
        let mut flat = Tensor::empty(ctx, dtype, &[elems])?;
        let mut at = 0;
        for t in bucket.iter() {
            flat.view(at, &[t.numel()])?.copy_from(ctx, t)?;
            at += t.numel();
        }
        self.group.all_reduce_sum(ctx, &mut flat)?;
        let mut at = 0;
        for t in bucket.iter_mut() {
            let src = flat.view(at, t.shape())?;
            t.copy_from(ctx, &src)?;
            at += t.numel();
        }
        Ok(())
    }
}
