//! The process group: the collectives every backend provides.
use std::net::IpAddr;
use std::time::Duration;

use llmft_tensor::{Ctx, Event, StreamKind, Tensor};

use crate::{CpuGroup, Error, NcclGroup, Result, WorldInfo};

/// Which implementation does the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// Host tensors over TCP between the processes (the role gloo plays
    /// for PyTorch); runs anywhere.
    #[default]
    Cpu,
    /// NCCL on CUDA tensors of one GPU per process ([`NcclGroup`]): the
    /// collectives are queued on the context's comm stream and do not block
    /// the host; a watchdog enforces the timeout. Needs `libnccl.so` on the
    /// library path.
    Nccl,
}

impl Backend {
    /// Lower-case name, as in configs: `cpu`, `nccl`.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Nccl => "nccl",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" | "gloo" => Ok(Backend::Cpu),
            "nccl" => Ok(Backend::Nccl),
            _ => Err(Error::Invalid {
                op: "backend",
                msg: format!("`{s}` is not a process-group backend; use cpu or nccl"),
            }),
        }
    }
}

/// How to build a process group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// The backend.
    pub backend: Backend,
    /// How long any one blocking read or write of a collective may wait for
    /// a peer; for NCCL, how long an issued collective may take to complete
    /// (default 300 s, as torch.distributed).
    pub timeout: Duration,
    /// How long the rendezvous may take in all: reaching rank 0's store,
    /// every rank arriving, the data connections (default 300 s).
    pub rendezvous_timeout: Duration,
    /// The address the other ranks reach this one at; by default the local
    /// address of this rank's connection to rank 0.
    pub advertise_ip: Option<IpAddr>,
    /// NCCL only: once the watchdog has aborted the communicator, end the
    /// process with status [`crate::WATCHDOG_EXIT_STATUS`] if the group is
    /// still alive this long after (not dropped: a thread is stuck in a CUDA
    /// or NCCL call the abort could not unblock, or nobody handles the
    /// error). `None` (the default) leaves the process to its owner; the
    /// `llmft` CLI sets it, so that a failed rank always ends.
    pub exit_after_abort: Option<Duration>,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Cpu,
            timeout: Duration::from_secs(300),
            rendezvous_timeout: Duration::from_secs(300),
            advertise_ip: None,
            exit_after_abort: None,
        }
    }
}

/// The collectives of a group of processes, one per rank.
///
/// Every rank calls the same collectives in the same order with tensors of
/// the same dtype and size. Each call takes the context so a GPU backend can
/// order the collective on [`llmft_tensor::StreamKind::Comm`]; the CPU
/// backend needs host tensors and returns when the result is in place.
/// After a failed collective (a peer died, timed out, or called something
/// else) the group is unusable: later calls fail at once, and the peers are
/// told, so they fail fast too instead of waiting for their timeout.
pub trait ProcessGroup: Send + Sync {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// The backend doing the work.
    fn backend(&self) -> Backend;
    /// Sums `t` over all ranks, in place. f32, or bf16/f16 accumulated in
    /// f32 and rounded once (NCCL rounds after each step, so from three
    /// ranks on its bf16/f16 sums may differ in the last place). Every rank
    /// gets the same bits.
    fn all_reduce_sum(&self, ctx: &Ctx, t: &mut Tensor) -> Result<()>;
    /// Concatenates every rank's `input` into `output` in rank order;
    /// `output` has the same dtype and `world_size()` times the elements.
    /// Any dtype: the bytes are copied.
    fn all_gather(&self, ctx: &Ctx, input: &Tensor, output: &mut Tensor) -> Result<()>;
    /// Sums `input` (`world_size()` equal slices) over all ranks and leaves
    /// slice `rank()` of the sum in `output`. f32, bf16 or f16 (accumulated
    /// in f32).
    fn reduce_scatter_sum(&self, ctx: &Ctx, input: &Tensor, output: &mut Tensor) -> Result<()>;
    /// Copies `root`'s `t` into `t` on every rank. Any dtype.
    fn broadcast(&self, ctx: &Ctx, t: &mut Tensor, root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self, ctx: &Ctx) -> Result<()>;
    /// Starts [`ProcessGroup::all_gather`] without making the compute
    /// stream wait for it: a GPU backend queues it on the comm stream after
    /// the compute work queued so far, so it overlaps what compute does
    /// next (a sharded store's prefetch of the next unit). `output` may be
    /// read on the compute stream only after [`Pending::wait`]; `input` and
    /// `output` must stay alive until then. The default runs the blocking
    /// collective (the CPU backend: the result is in place on return).
    fn all_gather_start(&self, ctx: &Ctx, input: &Tensor, output: &mut Tensor) -> Result<Pending> {
        self.all_gather(ctx, input, output)?;
        Ok(Pending::done())
    }
}

/// A collective started by [`ProcessGroup::all_gather_start`].
#[must_use = "the result may only be used after `wait`"]
#[derive(Debug)]
pub struct Pending(Option<Event>);

impl Pending {
    /// A collective whose result is already in place.
    pub fn done() -> Self {
        Pending(None)
    }

    /// A collective that completes with `event` (recorded on the stream
    /// that runs it).
    pub fn after(event: Event) -> Self {
        Pending(Some(event))
    }

    /// Orders the compute stream's later work after the collective.
    pub fn wait(self, ctx: &Ctx) -> Result<()> {
        if let Some(e) = &self.0 {
            ctx.wait(StreamKind::Compute, e)?;
        }
        Ok(())
    }
}

/// Checks that a sum's tensor is f32, bf16 or f16 (every backend's rule).
pub(crate) fn check_float(op: &'static str, what: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype().is_float() {
        return Ok(());
    }
    Err(Error::Invalid {
        op,
        msg: format!("{what} is {}; sums take f32, bf16 or f16", t.dtype()),
    })
}

/// Checks that `output` has the dtype of `input` and `world` times its
/// elements (for `reduce_scatter`, the other way round): every backend's
/// rule for all-gather and reduce-scatter.
pub(crate) fn check_scaled(
    op: &'static str,
    input: &Tensor,
    output: &Tensor,
    world: usize,
) -> Result<()> {
    let (big, small, big_name, small_name) = match op {
        "reduce_scatter" => (input, output, "input", "output"),
        _ => (output, input, "output", "input"),
    };
    if output.dtype() != input.dtype() {
        return Err(Error::Invalid {
            op,
            msg: format!(
                "output is {} but input is {}",
                output.dtype(),
                input.dtype()
            ),
        });
    }
    if small.numel().checked_mul(world) != Some(big.numel()) {
        return Err(Error::Invalid {
            op,
            msg: format!(
                "{big_name} has {} elements, expected world {world} x {small_name} {} = {}",
                big.numel(),
                small.numel(),
                small.numel().saturating_mul(world)
            ),
        });
    }
    Ok(())
}

/// Joins the process group of `world` with `cfg.backend`: rendezvous at
/// `world.master_addr:world.master_port` (a world of one needs none), then
/// the backend's connections. Every rank of the world must call it. The
/// NCCL backend works on `ctx`'s GPU (a CUDA context on `cuda:LOCAL_RANK`);
/// the CPU backend does not use `ctx`.
pub fn init_process_group(
    world: &WorldInfo,
    ctx: &Ctx,
    cfg: GroupConfig,
) -> Result<Box<dyn ProcessGroup>> {
    match cfg.backend {
        Backend::Cpu => Ok(Box::new(CpuGroup::connect(world, &cfg)?)),
        Backend::Nccl => Ok(Box::new(NcclGroup::connect(world, ctx, &cfg)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_and_nccl_needs_a_cuda_context() {
        assert_eq!("gloo".parse::<Backend>().unwrap(), Backend::Cpu);
        assert_eq!("nccl".parse::<Backend>().unwrap().to_string(), "nccl");
        assert!("mpi".parse::<Backend>().is_err());
        let cfg = GroupConfig {
            backend: Backend::Nccl,
            ..GroupConfig::default()
        };
        let e = init_process_group(&WorldInfo::single(), &Ctx::cpu(), cfg)
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .starts_with("connect: the NCCL backend needs a CUDA context"),
            "{e}"
        );
    }
}
