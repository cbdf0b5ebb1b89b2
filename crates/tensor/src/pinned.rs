//! A pool of page-locked host buffers, reused by size: activation offload
//! and optimizer offload move the same sizes every step, and pinning memory
//! (cuMemHostAlloc) is far too slow to do per step.
use std::collections::HashMap;
use std::sync::Mutex;

use crate::{numel, Ctx, DType, Result, Tensor};

/// Page-locked host buffers of `ctx`'s GPU (ordinary host memory on a CPU
/// context), handed out by [`PinnedPool::take`] and returned by
/// [`PinnedPool::give`].
///
/// A buffer given back may still be the source or destination of a copy
/// queued on a stream; whoever takes it next must queue its own copies on the
/// same stream (or wait for that one), as activation offload does with the
/// copy stream.
pub struct PinnedPool {
    ctx: Ctx,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    free: HashMap<usize, Vec<Tensor>>,
    held: usize,
}

impl PinnedPool {
    /// An empty pool for `ctx`.
    pub fn new(ctx: &Ctx) -> Self {
        Self {
            ctx: ctx.clone(),
            state: Mutex::new(PoolState::default()),
        }
    }

    /// A buffer of `dtype` and `shape` (contents unspecified: a reused one
    /// holds what it held).
    pub fn take(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let bytes = numel(shape).saturating_mul(dtype.size()).max(1);
        let reused = self
            .state
            .lock()
            .unwrap()
            .free
            .get_mut(&bytes)
            .and_then(|v| v.pop());
        let raw = match reused {
            Some(t) => t,
            None => {
                let t = Tensor::zeros_pinned(&self.ctx, DType::U8, &[bytes])?;
                self.state.lock().unwrap().held += bytes;
                t
            }
        };
        if numel(shape) == 0 {
            return raw.view(0, &[0])?.reinterpret(dtype, shape);
        }
        raw.reinterpret(dtype, shape)
    }

    /// Returns a buffer from [`PinnedPool::take`].
    pub fn give(&self, t: Tensor) {
        let bytes = t.bytes().max(1);
        let raw = match t.reinterpret(DType::U8, &[t.bytes()]) {
            Ok(r) if t.bytes() > 0 => r,
            _ => return,
        };
        let mut st = self.state.lock().unwrap();
        st.free.entry(bytes).or_default().push(raw);
    }

    /// Bytes of host memory the pool holds (free and handed out).
    pub fn held_bytes(&self) -> usize {
        self.state.lock().unwrap().held
    }
}
