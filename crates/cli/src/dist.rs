//! Multi-process jobs: the world from torchrun's or SLURM's variables, the
//! device of each rank (its local rank's GPU; the CPU under the CPU
//! backend), the process group of the `[dist]` backend, and the weight
//! store of the `[dist]` strategy.
//!
//! Every rank runs the same `llmft train`. The trainer splits each global
//! batch between the ranks and sums gradients over them; the strategy
//! decides where the frozen weights live:
//! - `no_shard`: every rank holds all of them (the store `[offload]` picks);
//! - `full_shard` / `shard_grad_op`: each rank holds 1/world of every unit
//!   and gathers a unit for use (with `offload.params` its part lives in
//!   pinned host memory);
//! - `hybrid_shard`: the same among the ranks of one node, each node holding
//!   a whole copy; gradients are still summed over every rank.
use std::sync::Arc;
use std::time::Duration;

use llmft_models::StoreBuilder;
use llmft_shard::{
    init_process_group, Backend, GroupConfig, ProcessGroup, ShardedBuilder, ShardedConfig,
    WorldInfo,
};
use llmft_tensor::{Ctx, Device};

use crate::config::{OffloadSettings, Settings, Strategy};

/// A running multi-process job, as this rank sees it.
pub struct Job {
    /// Every rank: gradients and counts are summed over it.
    pub group: Arc<dyn ProcessGroup>,
    /// The ranks the frozen weights are split over (`None`: not split).
    pub shard_group: Option<Arc<dyn ProcessGroup>>,
    /// The `[dist]` strategy.
    pub strategy: Strategy,
}

/// This process's world (a single process when no launcher set one).
pub fn world() -> Result<WorldInfo, String> {
    WorldInfo::from_env().map_err(|e| e.to_string())
}

/// Where a rank computes, as [`placement`] decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// CUDA device 0 if a context can be made on it, else the CPU (a single
    /// process with `auto` for both settings).
    Best,
    /// This device.
    On(Device),
}

/// [`placement`]'s answer: the device, and a line for rank 0 to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The device.
    pub target: Target,
    /// Why a machine with GPUs trains on the CPU, when it does.
    pub note: Option<&'static str>,
}

/// The device of a rank from `model.device`, `dist.backend`, the world and
/// the number of GPUs this process sees; pure, so it is tested without GPUs.
///
/// - `dist.backend = "cpu"`: the CPU backend's collectives take host
///   tensors only (a CUDA tensor is refused), so `auto` trains on the CPU
///   and a GPU device is an error;
/// - `"nccl"`: NCCL takes CUDA tensors only, so `auto` is the local rank's
///   GPU and `cpu` (or no GPU at all) is an error;
/// - `"auto"`: `auto` is the local rank's GPU in a world of several
///   processes (`cuda:LOCAL_RANK`, or `cuda:0` when each rank sees one GPU),
///   the CPU where there is none; the backend then follows the device.
pub fn placement(
    device: &str,
    backend: &str,
    world: &WorldInfo,
    gpus: usize,
) -> Result<Placement, String> {
    let backend = match backend {
        "auto" => None,
        b => Some(
            b.parse::<Backend>()
                .map_err(|e| format!("dist.backend: {e}"))?,
        ),
    };
    let named = match device {
        "auto" => None,
        d => Some(
            d.parse::<Device>()
                .map_err(|e| format!("model.device: {e}"))?,
        ),
    };
    let on = |d| Placement {
        target: Target::On(d),
        note: None,
    };
    match (backend, named) {
        (Some(Backend::Cpu), Some(Device::Cuda(i))) => Err(format!(
            "model.device = \"cuda:{i}\" cannot train with dist.backend = \"cpu\", whose \
             collectives take host tensors only: set model.device = \"cpu\" (or \"auto\"), or \
             dist.backend = \"nccl\" (or \"auto\") for the GPUs"
        )),
        (Some(Backend::Cpu), _) => Ok(Placement {
            target: Target::On(Device::Cpu),
            note: (named.is_none() && gpus > 0).then_some(
                "dist.backend = \"cpu\": training on the CPU, since the CPU backend's collectives \
                 take host tensors only (dist.backend = \"nccl\" or \"auto\" trains on the GPUs)",
            ),
        }),
        (Some(Backend::Nccl), Some(Device::Cpu)) => Err(
            "model.device = \"cpu\" cannot train with dist.backend = \"nccl\", which needs a GPU \
             per rank: set model.device = \"auto\" (or cuda:N), or dist.backend = \"cpu\" (or \
             \"auto\") for the CPU"
                .into(),
        ),
        (Some(Backend::Nccl), None) if gpus == 0 => Err(
            "dist.backend = \"nccl\" needs a GPU per rank and this process sees none: set \
             dist.backend = \"cpu\" (or \"auto\") to train on the CPU"
                .into(),
        ),
        (Some(Backend::Nccl), None) => rank_gpu(world, gpus).map(on),
        (None, None) if world.world_size > 1 && gpus > 0 => rank_gpu(world, gpus).map(on),
        (None, None) if world.world_size > 1 => Ok(on(Device::Cpu)),
        (None, None) => Ok(Placement {
            target: Target::Best,
            note: None,
        }),
        (_, Some(d)) => Ok(on(d)),
    }
}

/// The GPU of this rank among `gpus > 0` visible ones: its local rank's, or
/// the only one (SLURM's --gpus-per-task binding, or CUDA_VISIBLE_DEVICES
/// per rank, makes it cuda:0 for every rank).
fn rank_gpu(world: &WorldInfo, gpus: usize) -> Result<Device, String> {
    match (world.local_rank < gpus, gpus) {
        (true, _) => Ok(Device::Cuda(world.local_rank)),
        (false, 1) => Ok(Device::Cuda(0)),
        (false, _) => Err(format!(
            "rank {}: local rank {} has no GPU of its own ({gpus} are visible); start at most \
             {gpus} processes per node",
            world.rank, world.local_rank
        )),
    }
}

/// The compute device of this rank (see [`placement`]); rank 0 says why
/// when a machine with GPUs trains on the CPU.
pub fn device_for(s: &Settings, world: &WorldInfo) -> Result<Ctx, String> {
    // Counting devices makes no context: a rank touches only its GPU.
    let gpus = llmft_tensor::cuda_device_count();
    let p = placement(&s.model.device, &s.dist.backend, world, gpus)?;
    if let Some(note) = p.note.filter(|_| world.rank == 0) {
        eprintln!("{note}");
    }
    match p.target {
        Target::Best => Ok(Ctx::best()),
        Target::On(Device::Cpu) => Ok(Ctx::cpu()),
        Target::On(d @ Device::Cuda(ordinal)) => Ctx::new(d).map_err(|e| {
            if world.world_size > 1 {
                format!(
                    "rank {}: the GPU of local rank {} (cuda:{ordinal}): {e}; start one process per GPU",
                    world.rank, world.local_rank
                )
            } else {
                e.to_string()
            }
        }),
    }
}

/// Ranks per node: `LOCAL_WORLD_SIZE` (torchrun, `llmft launch`) or
/// `SLURM_NTASKS_PER_NODE` (its leading number, as in `8(x2)`).
fn local_world_size() -> Result<usize, String> {
    for var in ["LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"] {
        if let Ok(v) = std::env::var(var) {
            let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
            return digits
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("environment variable {var}={v:?} is not a rank count"));
        }
    }
    Err(
        "dist.strategy = \"hybrid_shard\" needs the ranks per node: set LOCAL_WORLD_SIZE \
         (llmft launch and torchrun do) or SLURM_NTASKS_PER_NODE"
            .into(),
    )
}

/// How long a rank whose NCCL watchdog fired has to report the error and
/// exit before the process group ends it (`GroupConfig::exit_after_abort`).
const ABORT_GRACE: Duration = Duration::from_secs(10);

/// Joins the job of `world` per `s.dist`; `None` for a single process whose
/// `dist.backend` is `auto` (nothing to join).
pub fn join(s: &Settings, world: &WorldInfo, ctx: &Ctx) -> Result<Option<Job>, String> {
    let d = &s.dist;
    if world.world_size == 1 && d.backend == "auto" {
        return Ok(None);
    }
    let backend = match d.backend.as_str() {
        "auto" => match ctx.device() {
            Device::Cuda(_) => Backend::Nccl,
            Device::Cpu => Backend::Cpu,
        },
        b => b
            .parse::<Backend>()
            .map_err(|e| format!("dist.backend: {e}"))?,
    };
    if d.timeout_s == 0 {
        return Err("dist.timeout_s must be at least 1 second".into());
    }
    let timeout = Duration::from_secs(d.timeout_s);
    let cfg = GroupConfig {
        backend,
        timeout,
        rendezvous_timeout: timeout,
        // A rank whose NCCL communicator was aborted ends even where a call
        // stays stuck on the GPU (the launcher then ends the others).
        exit_after_abort: Some(ABORT_GRACE),
        ..GroupConfig::default()
    };
    let rank = world.rank;
    let group: Arc<dyn ProcessGroup> =
        Arc::from(init_process_group(world, ctx, cfg.clone()).map_err(|e| of_rank(rank, e))?);
    let shard_group = match d.strategy {
        Strategy::NoShard => None,
        Strategy::FullShard | Strategy::ShardGradOp => Some(group.clone()),
        Strategy::HybridShard => Some(node_group(world, ctx, cfg)?),
    };
    Ok(Some(Job {
        group,
        shard_group,
        strategy: d.strategy,
    }))
}

/// `e` as an error of rank `rank`: prefixed with it, unless it names it
/// first already (the rendezvous errors do).
fn of_rank(rank: usize, e: impl std::fmt::Display) -> String {
    let e = e.to_string();
    match e.starts_with(&format!("rank {rank}: ")) {
        true => e,
        false => format!("rank {rank}: {e}"),
    }
}

/// The group of this node's ranks (ranks `node·n .. node·n + n` with `n`
/// ranks per node), meeting at 127.0.0.1 on `MASTER_PORT + 1 + node`.
fn node_group(
    world: &WorldInfo,
    ctx: &Ctx,
    cfg: GroupConfig,
) -> Result<Arc<dyn ProcessGroup>, String> {
    let n = local_world_size()?;
    if world.world_size % n != 0 || world.local_rank >= n || world.rank % n != world.local_rank {
        return Err(format!(
            "rank {}: dist.strategy = \"hybrid_shard\" needs {n} consecutive ranks per node, but \
             this is rank {} of {} with local rank {}",
            world.rank, world.rank, world.world_size, world.local_rank
        ));
    }
    let node = world.rank / n;
    let port = u32::from(world.master_port) + 1 + node as u32;
    let node_world = WorldInfo {
        rank: world.local_rank,
        world_size: n,
        local_rank: world.local_rank,
        master_addr: "127.0.0.1".into(),
        master_port: u16::try_from(port).map_err(|_| {
            format!(
                "MASTER_PORT {} leaves no port for node {node}'s group",
                world.master_port
            )
        })?,
    };
    let g = init_process_group(&node_world, ctx, cfg)
        .map_err(|e| format!("rank {} (node {node}'s group): {e}", world.rank))?;
    Ok(Arc::from(g))
}

impl Job {
    /// The number of ranks each unit's bytes are split over (1: not split).
    pub fn shard_world(&self) -> usize {
        self.shard_group.as_ref().map_or(1, |g| g.world_size())
    }

    /// The store builder of this rank.
    pub fn store_builder(
        &self,
        ctx: &Ctx,
        offload: &OffloadSettings,
        num_units: usize,
    ) -> Result<Box<dyn StoreBuilder>, String> {
        let Some(g) = &self.shard_group else {
            return crate::store_builder(ctx, offload, num_units);
        };
        let cfg = ShardedConfig {
            reshard_after_forward: self.strategy != Strategy::ShardGradOp,
            offload: offload.params,
            lookahead: offload.lookahead.max(1),
            simulate_world: None,
        };
        Ok(Box::new(
            ShardedBuilder::new(ctx, num_units, g.clone(), cfg).map_err(|e| e.to_string())?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(rank: usize, world_size: usize, local_rank: usize) -> WorldInfo {
        WorldInfo {
            rank,
            world_size,
            local_rank,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
        }
    }

    fn target(device: &str, backend: &str, w: &WorldInfo, gpus: usize) -> Result<Target, String> {
        placement(device, backend, w, gpus).map(|p| p.target)
    }

    #[test]
    fn the_cpu_backend_trains_on_the_cpu_even_where_gpus_are() {
        for (w, gpus) in [(rank(1, 2, 1), 2), (rank(0, 2, 0), 8), (rank(0, 1, 0), 1)] {
            let p = placement("auto", "cpu", &w, gpus).unwrap();
            assert_eq!(p.target, Target::On(Device::Cpu), "{w:?}");
            assert!(p.note.unwrap().contains("training on the CPU"), "{w:?}");
            assert_eq!(target("cpu", "gloo", &w, gpus), Ok(Target::On(Device::Cpu)));
        }
        // Nothing to explain without a GPU.
        let p = placement("auto", "cpu", &rank(0, 2, 0), 0).unwrap();
        assert_eq!((p.target, p.note), (Target::On(Device::Cpu), None));
        // A GPU named with the CPU backend cannot work: one sentence.
        for d in ["cuda", "cuda:1"] {
            let e = placement(d, "cpu", &rank(1, 2, 1), 2).unwrap_err();
            assert!(
                e.starts_with("model.device = \"cuda:")
                    && e.contains(
                        "dist.backend = \"cpu\", whose collectives take host tensors only"
                    ),
                "{e}"
            );
            assert_eq!(e.matches(". ").count(), 0, "one sentence: {e}");
        }
    }

    #[test]
    fn errors_name_the_rank_once() {
        let e = "rank 1: cannot listen on 127.0.0.1:29500 (rendezvous store): in use";
        assert_eq!(of_rank(1, e), e);
        assert_eq!(of_rank(0, e), format!("rank 0: {e}"));
        assert_eq!(of_rank(1, "barrier: broken"), "rank 1: barrier: broken");
    }

    #[test]
    fn nccl_needs_a_gpu_per_rank() {
        let w = rank(1, 2, 1);
        assert_eq!(
            target("auto", "nccl", &w, 2),
            Ok(Target::On(Device::Cuda(1)))
        );
        assert_eq!(
            target("auto", "nccl", &w, 1),
            Ok(Target::On(Device::Cuda(0)))
        );
        assert_eq!(
            target("auto", "nccl", &rank(0, 1, 0), 1),
            Ok(Target::On(Device::Cuda(0)))
        );
        let e = target("auto", "nccl", &rank(3, 4, 3), 2).unwrap_err();
        assert!(
            e.contains("local rank 3 has no GPU of its own (2 are visible)"),
            "{e}"
        );
        let e = target("auto", "nccl", &w, 0).unwrap_err();
        assert!(e.contains("this process sees none"), "{e}");
        let e = target("cpu", "nccl", &w, 2).unwrap_err();
        assert!(
            e.starts_with("model.device = \"cpu\" cannot train with dist.backend = \"nccl\""),
            "{e}"
        );
    }

    #[test]
    fn auto_follows_the_gpus_and_a_named_device_is_kept() {
        let w = rank(1, 2, 1);
        assert_eq!(
            target("auto", "auto", &w, 2),
            Ok(Target::On(Device::Cuda(1)))
        );
        assert_eq!(target("auto", "auto", &w, 0), Ok(Target::On(Device::Cpu)));
        assert_eq!(target("auto", "auto", &rank(0, 1, 0), 4), Ok(Target::Best));
        assert_eq!(target("auto", "auto", &rank(0, 1, 0), 0), Ok(Target::Best));
        assert_eq!(target("cpu", "auto", &w, 2), Ok(Target::On(Device::Cpu)));
        assert_eq!(
            target("cuda:1", "auto", &w, 2),
            Ok(Target::On(Device::Cuda(1)))
        );
        assert_eq!(
            target("cuda:0", "nccl", &w, 2),
            Ok(Target::On(Device::Cuda(0)))
        );
        for p in [
            placement("auto", "auto", &w, 2),
            placement("cuda", "nccl", &w, 2),
        ] {
            assert_eq!(p.unwrap().note, None);
        }
        let e = target("tpu", "auto", &w, 0).unwrap_err();
        assert!(e.starts_with("model.device: "), "{e}");
        let e = target("auto", "mpi", &w, 0).unwrap_err();
        assert!(e.starts_with("dist.backend: "), "{e}");
    }
}
