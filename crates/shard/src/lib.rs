//! llmft-shard: process groups, collectives and FSDP-style sharded weight
//! stores (the sharded store and NCCL collectives arrive with the FSDP issue).
//!
//! What is here now: [`WorldInfo`], the rank/world layout of a multi-GPU job,
//! read from torchrun-style or SLURM variables.
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

/// Errors of this crate.
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
    /// `SLURM_NTASKS`, `SLURM_LOCALID`; none of them means a single process.
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

#[cfg(test)]
mod tests {
    use super::*;

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
