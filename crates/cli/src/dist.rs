//! Multi-process jobs: the world from torchrun's or SLURM's variables, the
//! device of each rank (its local rank's GPU), the process group of the
//! `[dist]` backend, and the weight store of the `[dist]` strategy.
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

/// The compute device of this rank: `model.device`, where `auto` in a world
/// of several processes means the GPU of the local rank (`cuda:LOCAL_RANK`,
/// or `cuda:0` when each rank sees one GPU), the CPU when there is none.
pub fn device_for(s: &Settings, world: &WorldInfo) -> Result<Ctx, String> {
    if s.model.device == "auto" && world.world_size > 1 {
        // Counting devices makes no context: a rank touches only its GPU.
        let gpus = llmft_tensor::cuda_device_count();
        if gpus > 0 {
            // One visible GPU per rank (SLURM's --gpus-per-task binding, or
            // CUDA_VISIBLE_DEVICES per rank) is cuda:0 for every rank.
            let ordinal = match (world.local_rank < gpus, gpus) {
                (true, _) => world.local_rank,
                (false, 1) => 0,
                (false, _) => {
                    return Err(format!(
                        "rank {}: local rank {} has no GPU of its own ({gpus} are visible); \
                         start at most {gpus} processes per node",
                        world.rank, world.local_rank
                    ))
                }
            };
            return Ctx::new(Device::Cuda(ordinal)).map_err(|e| {
                format!(
                    "rank {}: the GPU of local rank {} (cuda:{ordinal}): {e}; start one process per GPU",
                    world.rank, world.local_rank
                )
            });
        }
    }
    crate::device_ctx(&s.model.device)
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
    let group: Arc<dyn ProcessGroup> = Arc::from(
        init_process_group(world, ctx, cfg.clone()).map_err(|e| format!("rank {rank}: {e}"))?,
    );
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
