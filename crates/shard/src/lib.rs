//! llmft-shard: process groups, collectives and FSDP-style sharded weight
//! stores.
//!
//! What is here now:
//! - [`WorldInfo`]: the rank/world layout of a multi-process job, read from
//!   torchrun-style or SLURM variables.
//! - [`TcpStore`]: the rendezvous key/value store (rank 0 serves it on
//!   `MASTER_ADDR:MASTER_PORT`, every rank connects), with `set`/`get`/`wait`,
//!   counters and a barrier. It listens only on the address `MASTER_ADDR`
//!   names (or `LLMFT_STORE_BIND`), and bounds what a stranger can make it
//!   do: see [the guard](#who-may-join).
//! - [`ProcessGroup`]: the collectives the trainer and the sharded store use
//!   (`all_reduce_sum`, `all_gather`, `reduce_scatter_sum`, `broadcast`,
//!   `barrier`), and [`init_process_group`] that builds one.
//! - [`CpuGroup`]: the CPU backend (the role gloo plays for PyTorch): real
//!   processes joined in a ring of TCP connections; ring reduce-scatter and
//!   all-gather, so every rank gets bit-identical sums. Every blocking read
//!   has a timeout, and a dead peer becomes an error that names it.
//! - [`Sharded`]: the FSDP sharded weight store (each rank keeps a slice of
//!   every unit; a fetch all-gathers the unit ahead of use, with prefetch,
//!   `full_shard`/`shard_grad_op`, offloaded shards and single-process
//!   simulation of a world), built by [`ShardedBuilder`].
//! - [`NcclGroup`]: the NCCL backend on CUDA tensors: collectives queued on
//!   the context's comm stream, ordered after compute and before it (or
//!   left to overlap, `all_gather_start`), with a watchdog that aborts the
//!   communicator when a collective outlives the timeout.
//!
//! A world of one process needs no network:
//!
//! ```
//! use llmft_shard::{init_process_group, GroupConfig, WorldInfo};
//! use llmft_tensor::{Ctx, DType, Tensor};
//! let ctx = Ctx::cpu();
//! let pg = init_process_group(&WorldInfo::single(), &ctx, GroupConfig::default())?;
//! assert_eq!((pg.rank(), pg.world_size()), (0, 1));
//! let mut grad = Tensor::from_f32(&ctx, &[1.0, 2.0, 3.0], DType::F32, &[3])?;
//! pg.all_reduce_sum(&ctx, &mut grad)?;
//! assert_eq!(grad.to_vec::<f32>()?, vec![1.0, 2.0, 3.0]);
//! let mut full = Tensor::zeros(&ctx, DType::F32, &[3])?;
//! pg.all_gather(&ctx, &grad, &mut full)?;
//! pg.barrier(&ctx)?;
//! # Ok::<(), llmft_shard::Error>(())
//! ```
//!
//! Started as `torchrun --nproc-per-node 2 --no-python prog` (or `srun`, or
//! by hand with `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), the same
//! program runs as two ranks: `WorldInfo::from_env()?` then
//! `init_process_group(&world, &ctx, GroupConfig::default())?`; with
//! `backend: Backend::Nccl` and `ctx = Ctx::cuda(world.local_rank)?`, over
//! NCCL.
//!
//! # Who may join
//!
//! With `LLMFT_JOB_TOKEN` set (the same value for every rank), every
//! connection to the store and between ranks of the CPU group presents it
//! first, and one without it is refused: closed, with one line on rank 0's
//! (or the listening rank's) stderr naming the peer, at most one a second.
//! `llmft launch` makes a random token for a single-node job when none is
//! set; for `--nnodes` above 1, and under `srun` or `torchrun`, set it
//! yourself on every node (e.g. `export LLMFT_JOB_TOKEN=$(openssl rand -hex
//! 16)` before `srun`). Without it nothing is checked: anyone who can reach
//! the ports can join or disturb the job. Token or not, a connection must
//! send its hello within [`HANDSHAKE_TIMEOUT`], at most [`MAX_PENDING`] may
//! be waiting to, and frames above [`MAX_TOKEN`], [`MAX_KEY`] and
//! [`MAX_VALUE`] close the connection unread, so garbage, half-open and
//! slow connections cannot stall the rendezvous or a running job. NCCL's own
//! connections are NCCL's; its unique id travels through the guarded store.
//!
//! [`WorldInfo::from_vars`] parses the variables:
//!
//! ```
//! let w = llmft_shard::WorldInfo::from_vars(|k| match k {
//!     "RANK" => Some("1".into()),
//!     "WORLD_SIZE" => Some("2".into()),
//!     "LOCAL_RANK" => Some("1".into()),
//!     _ => None,
//! })?;
//! assert_eq!((w.rank, w.world_size, w.local_rank), (1, 2, 1));
//! # Ok::<(), llmft_shard::Error>(())
//! ```

mod cpu;
mod group;
mod nccl;
mod sharded;
mod store;

use std::time::Duration;

pub use cpu::CpuGroup;
pub use group::{init_process_group, Backend, GroupConfig, Pending, ProcessGroup};
pub use nccl::{NcclGroup, WATCHDOG_EXIT_STATUS};
pub use sharded::{
    shard_bytes, Sharded, ShardedBuilder, ShardedConfig, ShardedCounters, ShardedStats,
};
pub use store::{
    JobToken, StoreOptions, TcpStore, HANDSHAKE_TIMEOUT, JOB_TOKEN_VAR, MAX_KEY, MAX_PENDING,
    MAX_TOKEN, MAX_VALUE, STORE_BIND_VAR,
};

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Seconds as people write them in messages: `30`, `0.5`.
fn secs(d: &Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s:.3}").trim_end_matches('0').to_string()
    }
}

/// Errors of this crate. None of them is raised by a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An environment variable holds something that is not what it must be.
    #[error("environment variable {var}={value:?}: {why}")]
    BadVar {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The rendezvous did not complete in time.
    #[error("rank {rank}: no rendezvous at {addr} within {} s: {what}", secs(.timeout))]
    Rendezvous {
        /// This process's rank.
        rank: usize,
        /// The store address (`MASTER_ADDR:MASTER_PORT`).
        addr: String,
        /// What this rank waited for.
        what: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// The store or a peer refused this rank's hello: its job token is
    /// wrong or missing.
    #[error("rank {rank}: {addr} refused this rank: {what}")]
    Refused {
        /// This process's rank.
        rank: usize,
        /// The address that refused.
        addr: String,
        /// Why, and what to set.
        what: String,
    },
    /// A socket could not be opened for listening.
    #[error("rank {rank}: cannot listen on {addr} ({purpose}): {source}")]
    Listen {
        /// This process's rank.
        rank: usize,
        /// The address.
        addr: String,
        /// What the socket is for.
        purpose: &'static str,
        /// The system's error.
        source: std::io::Error,
    },
    /// A key of the store was not set in time.
    #[error("store at {addr}: key `{key}` was not set within {} s", secs(.timeout))]
    StoreTimeout {
        /// The store address.
        addr: String,
        /// The key.
        key: String,
        /// How long the wait lasted.
        timeout: Duration,
    },
    /// Talking to the store failed (it closed, or the socket failed).
    #[error("store at {addr}: {msg}")]
    Store {
        /// The store address.
        addr: String,
        /// What went wrong.
        msg: String,
    },
    /// A peer closed its connection (it exited or was killed).
    #[error("{op}: rank {peer} closed the connection")]
    PeerClosed {
        /// The collective.
        op: &'static str,
        /// The peer.
        peer: usize,
    },
    /// A peer sent nothing for the whole timeout.
    #[error("{op}: no data from rank {peer} within {} s", secs(.timeout))]
    PeerTimeout {
        /// The collective.
        op: &'static str,
        /// The peer.
        peer: usize,
        /// The timeout.
        timeout: Duration,
    },
    /// Another rank failed in a collective and told the ring.
    #[error("{reason} (detected by rank {origin})")]
    PeerFailed {
        /// The rank that saw the failure first.
        origin: usize,
        /// Its error message.
        reason: String,
    },
    /// A socket error other than a closed connection or a timeout.
    #[error("{op}: socket error with rank {peer}: {source}")]
    Io {
        /// The collective.
        op: &'static str,
        /// The peer.
        peer: usize,
        /// The system's error.
        source: std::io::Error,
    },
    /// A peer sent something this rank did not expect (ranks calling
    /// different collectives, or with different sizes).
    #[error("{op}: rank {peer} {msg}")]
    Protocol {
        /// The collective.
        op: &'static str,
        /// The peer.
        peer: usize,
        /// What it sent.
        msg: String,
    },
    /// An earlier collective failed; the group cannot be used any more.
    #[error("process group is unusable after an earlier failure: {reason}")]
    Broken {
        /// The earlier failure.
        reason: String,
    },
    /// A tensor the CPU backend cannot use.
    #[error("{op}: the CPU process group needs host tensors, but {what} lives on {device}")]
    NotHost {
        /// The collective.
        op: &'static str,
        /// Which argument.
        what: &'static str,
        /// Where it lives.
        device: llmft_tensor::Device,
    },
    /// A bad argument (dtype, size, root).
    #[error("{op}: {msg}")]
    Invalid {
        /// The collective.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// NCCL or CUDA failed under the NCCL backend: the library is missing,
    /// the context is not a CUDA one, or a call returned an error.
    #[error("{op}: {msg}")]
    Nccl {
        /// The collective (or `connect`).
        op: &'static str,
        /// What failed, in NCCL's words where it has them.
        msg: String,
    },
    /// An error of the tensor layer.
    #[error(transparent)]
    Tensor(#[from] llmft_tensor::Error),
}

/// Where this process sits in a multi-process job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldInfo {
    /// Global rank, 0-based.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank on this node (selects the GPU).
    pub local_rank: usize,
    /// Address of rank 0 (rendezvous).
    pub master_addr: String,
    /// Port of rank 0.
    pub master_port: u16,
}

impl WorldInfo {
    /// A single-process world.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
        }
    }

    /// From the process environment (see [`WorldInfo::from_vars`]).
    pub fn from_env() -> Result<Self, Error> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From variables: torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    /// `MASTER_ADDR`, `MASTER_PORT`, else SLURM's `SLURM_PROCID`,
    /// `SLURM_NTASKS`, `SLURM_LOCALID`, with the master at the first host
    /// of `SLURM_JOB_NODELIST` unless `MASTER_ADDR` is set; none of them
    /// means a single process.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let num = |var: &'static str| -> Result<Option<usize>, Error> {
            get(var)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| Error::BadVar {
                        var,
                        value: v.clone(),
                        why: "not a non-negative integer",
                    })
                })
                .transpose()
        };
        let mut w = Self::single();
        if let Some(ws) = num("WORLD_SIZE")? {
            w.world_size = ws;
            w.rank = num("RANK")?.unwrap_or(0);
            w.local_rank = num("LOCAL_RANK")?.unwrap_or(w.rank);
        } else if let Some(ws) = num("SLURM_NTASKS")? {
            w.world_size = ws;
            w.rank = num("SLURM_PROCID")?.unwrap_or(0);
            w.local_rank = num("SLURM_LOCALID")?.unwrap_or(0);
        }
        if let Some(a) = get("MASTER_ADDR") {
            w.master_addr = a;
        } else if let Some(list) = get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST")) {
            w.master_addr = first_host(&list).ok_or(Error::BadVar {
                var: "SLURM_JOB_NODELIST",
                value: list.clone(),
                why: "names no host",
            })?;
        }
        if let Some(p) = get("MASTER_PORT") {
            w.master_port = p.trim().parse().map_err(|_| Error::BadVar {
                var: "MASTER_PORT",
                value: p.clone(),
                why: "not a port number",
            })?;
        }
        if w.world_size == 0 || w.rank >= w.world_size {
            return Err(Error::BadVar {
                var: "RANK",
                value: w.rank.to_string(),
                why: "must be below WORLD_SIZE (which must be at least 1)",
            });
        }
        Ok(w)
    }
}

/// The first host of a SLURM node list: `node[01-04,07],gpu3` → `node01`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first comma outside brackets ends the first entry.
    let mut depth = 0usize;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => return true,
                _ => {}
            }
            false
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    let host = match (entry.find('['), entry.find(']')) {
        (Some(open), Some(close)) if open < close => {
            let first = entry[open + 1..close].split([',', '-']).next()?.trim();
            format!("{}{first}{}", &entry[..open], &entry[close + 1..])
        }
        (None, None) => entry.to_string(),
        _ => return None,
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_host_of_slurm_node_lists() {
        assert_eq!(first_host("node[01-04]").as_deref(), Some("node01"));
        assert_eq!(first_host("node[07,01-04],gpu3").as_deref(), Some("node07"));
        assert_eq!(first_host("gpu3,gpu4").as_deref(), Some("gpu3"));
        assert_eq!(first_host("a[2-3]-ib").as_deref(), Some("a2-ib"));
        assert_eq!(first_host(" solo ").as_deref(), Some("solo"));
        assert_eq!(first_host(""), None);
        assert_eq!(first_host("bad[1-2"), None);
        let w = WorldInfo::from_vars(|k| match k {
            "SLURM_NTASKS" => Some("4".into()),
            "SLURM_PROCID" => Some("3".into()),
            "SLURM_LOCALID" => Some("1".into()),
            "SLURM_JOB_NODELIST" => Some("cn[12-13]".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank), (3, 4, 1));
        assert_eq!(w.master_addr, "cn12");
    }

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(a, _)| *a == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn torchrun_slurm_and_single() {
        let w = WorldInfo::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank), (3, 4, 1));
        assert_eq!((w.master_addr.as_str(), w.master_port), ("node0", 1234));
        let s = WorldInfo::from_vars(vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
        ]))
        .unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank), (5, 8, 1));
        assert_eq!(
            WorldInfo::from_vars(vars(&[])).unwrap(),
            WorldInfo::single()
        );
    }

    #[test]
    fn bad_values_are_errors() {
        let e = WorldInfo::from_vars(vars(&[("WORLD_SIZE", "two")])).unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE"), "{e}");
        let e = WorldInfo::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "2")])).unwrap_err();
        assert!(e.to_string().contains("RANK"), "{e}");
        assert!(WorldInfo::from_vars(vars(&[("MASTER_PORT", "99999")])).is_err());
    }
}
