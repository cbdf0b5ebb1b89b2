//! Activation offload: what the forward keeps for the backward (each
//! checkpointed layer's input, and its attention record when kept) moves to
//! pinned host memory on the stash stream after the layer's forward, and
//! comes back on it one layer ahead of its backward (the weight copies of an
//! offloaded store use the copy stream, so both directions overlap).
//!
//! Ordering: a copy out waits for the compute that produced the tensor; the
//! device tensor is freed one layer later, when its copy has long finished
//! (freeing it right away would make the compute stream wait for the copy).
//! A copy back waits for the compute queued so far (its destination comes
//! from the compute-ordered allocator) and the compute waits for its event
//! before use. Host buffers come from a pool and are only touched by the copy
//! stash stream, whose order keeps them safe.
use llmft_tensor::{Ctx, Event, PinnedPool, StreamKind, Tensor};

use crate::Result;

/// Moves tensors to host memory and back for one pass.
pub(crate) struct Stash<'a> {
    ctx: &'a Ctx,
    pool: &'a PinnedPool,
    /// Device tensors whose copy out is queued, freed at the next layer.
    pending: Vec<Tensor>,
}

impl<'a> Stash<'a> {
    pub(crate) fn new(ctx: &'a Ctx, pool: &'a PinnedPool) -> Self {
        Self {
            ctx,
            pool,
            pending: Vec::new(),
        }
    }

    /// Queues the copy of `t` to host memory; returns the host tensor.
    pub(crate) fn out(&mut self, t: Tensor) -> Result<Tensor> {
        self.ctx.wait_for(StreamKind::Stash, StreamKind::Compute)?;
        let mut host = self.pool.take(t.dtype(), t.shape())?;
        host.copy_from_on(self.ctx, &t, StreamKind::Stash)?;
        self.pending.push(t);
        Ok(host)
    }

    /// Frees the device tensors of earlier copies out (call once the next
    /// layer's work is queued).
    pub(crate) fn settle(&mut self) {
        self.pending.clear();
    }

    /// Queues the copy of host tensor `h` back to the device.
    pub(crate) fn back(&self, h: Tensor) -> Result<Tensor> {
        self.ctx.wait_for(StreamKind::Stash, StreamKind::Compute)?;
        let mut d = Tensor::empty(self.ctx, h.dtype(), h.shape())?;
        d.copy_from_on(self.ctx, &h, StreamKind::Stash)?;
        self.pool.give(h);
        Ok(d)
    }

    /// An event after every copy back queued so far.
    pub(crate) fn mark(&self) -> Result<Event> {
        Ok(self.ctx.record(StreamKind::Stash)?)
    }

    /// Makes the compute stream wait for `ev`.
    pub(crate) fn ready(&self, ev: &Event) -> Result<()> {
        Ok(self.ctx.wait(StreamKind::Compute, ev)?)
    }
}
