//! `llmft launch`: torchrun's role. Starts `--nproc-per-node` ranks of one
//! command on this node, each with the environment contract that
//! [`llmft_shard::WorldInfo`] reads (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`), then
//! watches them: the first rank to fail (or a SIGINT/SIGTERM to the launcher)
//! stops the others with SIGTERM, then SIGKILL after a grace period.
//!
//! The ranks share a job token (`LLMFT_JOB_TOKEN`, see
//! [`llmft_shard::JobToken`]): one already set is inherited; otherwise a
//! single-node launch makes a random one (128 bits, hex), so nothing else on
//! the machine or the network can join or disturb the rendezvous. A
//! multi-node launch makes none, since each node's launcher would make a
//! different one: set the same `LLMFT_JOB_TOKEN` on every node (without it
//! the job runs unguarded, and the launcher says so).
//!
//! Each rank runs in a process group of its own, so a signal reaches the
//! rank's own children too (data workers, a `sh -c` pipeline), and dies with
//! the launcher if the launcher is killed outright (`PR_SET_PDEATHSIG`).
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use llmft_shard::JOB_TOKEN_VAR;

/// How often the launcher looks at its ranks and at its own signals.
const POLL: Duration = Duration::from_millis(100);
/// After a rank exits with an error: how long the others get to show whether
/// one of them was killed (the likelier cause) before the failure is named.
const SETTLE: Duration = Duration::from_millis(500);
/// How long ranks get between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(10);
/// How long the launcher waits for SIGKILLed ranks to be reaped before it
/// gives up on them (a process stuck in the kernel, e.g. in a GPU driver
/// call, dies when the call returns).
const REAP: Duration = Duration::from_secs(10);

/// Arguments of `llmft launch`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Examples:
  llmft launch --nproc-per-node 2 -- train --config examples/llama2-70b-qlora-2gpu.toml
  llmft launch --nproc-per-node 8 --nnodes 2 --node-rank 0 --master-addr node0 -- train -c job.toml
  llmft launch --nproc-per-node 4 --exec -- python worker.py")]
pub struct LaunchArgs {
    /// Ranks to start on this node (usually one per GPU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub nproc_per_node: u32,
    /// Nodes in the job.
    #[arg(long, value_name = "M", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub nnodes: u32,
    /// This node's index, 0 to nnodes-1.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub node_rank: u32,
    /// Address of rank 0's node [default: $MASTER_ADDR, else 127.0.0.1].
    #[arg(long, value_name = "ADDR")]
    pub master_addr: Option<String>,
    /// Rendezvous port on rank 0's node [default: $MASTER_PORT, else 29500].
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// ARGS[0] is any program, not an llmft subcommand (torchrun's
    /// --no-python).
    #[arg(long)]
    pub exec: bool,
    /// The llmft subcommand line each rank runs (e.g. `train --config
    /// job.toml`), or with --exec a program and its arguments.
    #[arg(
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<OsString>,
}

/// What the launcher starts: resolved arguments, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Ranks on this node.
    pub nproc_per_node: usize,
    /// Nodes in the job.
    pub nnodes: usize,
    /// This node's index.
    pub node_rank: usize,
    /// Rank 0's node.
    pub master_addr: String,
    /// Rank 0's rendezvous port.
    pub master_port: u16,
    /// The program each rank runs.
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// The job token made for the ranks (`None`: `LLMFT_JOB_TOKEN` is set
    /// already, or the job spans nodes).
    pub job_token: Option<String>,
}

impl Plan {
    /// Checks `a` and fills the defaults, reading `MASTER_ADDR` and
    /// `MASTER_PORT` through `get` when the flags are absent; `exe` is the
    /// program to run without `--exec` (llmft itself).
    pub fn new(
        a: &LaunchArgs,
        exe: impl FnOnce() -> std::io::Result<std::path::PathBuf>,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let nproc_per_node = a.nproc_per_node as usize;
        let nnodes = a.nnodes as usize;
        let node_rank = a.node_rank as usize;
        if nproc_per_node == 0 || nnodes == 0 {
            return Err("--nproc-per-node and --nnodes must be at least 1".into());
        }
        if node_rank >= nnodes {
            return Err(format!(
                "--node-rank {node_rank} is not below --nnodes {nnodes} (nodes are numbered 0 to {})",
                nnodes - 1
            ));
        }
        if nnodes
            .checked_mul(nproc_per_node)
            .is_none_or(|w| w > u32::MAX as usize)
        {
            return Err(format!(
                "--nnodes {nnodes} × --nproc-per-node {nproc_per_node} ranks is too many"
            ));
        }
        let master_addr = match (&a.master_addr, get("MASTER_ADDR")) {
            (Some(addr), _) => addr.clone(),
            (None, Some(addr)) if !addr.trim().is_empty() => addr.trim().to_string(),
            _ => "127.0.0.1".into(),
        };
        if master_addr.is_empty() {
            return Err("--master-addr is empty".into());
        }
        let master_port = match (a.master_port, get("MASTER_PORT")) {
            (Some(p), _) => p,
            (None, Some(p)) => p.trim().parse().map_err(|_| {
                format!("MASTER_PORT `{p}` is not a port number (0 to 65535); set --master-port")
            })?,
            (None, None) => 29500,
        };
        let Some((first, rest)) = a.args.split_first() else {
            return Err("give the command each rank runs after `--`, e.g. `llmft launch --nproc-per-node 2 -- train --config job.toml`".into());
        };
        let (program, args) = if a.exec {
            (first.clone(), rest.to_vec())
        } else {
            if first == "launch" {
                return Err("`llmft launch -- launch ...` would start launchers, not ranks; give an llmft subcommand such as `train`".into());
            }
            let exe = exe().map_err(|e| format!("cannot find the llmft executable: {e}"))?;
            (exe.into_os_string(), a.args.clone())
        };
        let inherited = get(JOB_TOKEN_VAR).is_some_and(|t| !t.is_empty());
        let job_token = if inherited || nnodes > 1 {
            None
        } else {
            Some(random_token().map_err(|e| {
                format!("cannot read /dev/urandom for a job token ({e}); set {JOB_TOKEN_VAR}")
            })?)
        };
        Ok(Self {
            nproc_per_node,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            program,
            args,
            job_token,
        })
    }

    /// Ranks in the whole job.
    pub fn world_size(&self) -> usize {
        self.nnodes * self.nproc_per_node
    }

    /// The global rank of local rank `local`.
    pub fn rank(&self, local: usize) -> usize {
        self.node_rank * self.nproc_per_node + local
    }

    /// The variables local rank `local` gets; `get` reads the launcher's own
    /// environment (an `NCCL_NVLS_ENABLE` already set there is kept).
    ///
    /// Inherited SLURM variables stay: `WorldInfo` reads torchrun's variables
    /// first, and these are always set.
    pub fn rank_env(
        &self,
        local: usize,
        get: impl Fn(&str) -> Option<String>,
    ) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("RANK", self.rank(local).to_string()),
            ("WORLD_SIZE", self.world_size().to_string()),
            ("LOCAL_RANK", local.to_string()),
            ("LOCAL_WORLD_SIZE", self.nproc_per_node.to_string()),
            ("GROUP_RANK", self.node_rank.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ];
        // NVLink SHARP (multicast) buffers fail to register on the machines
        // we run on; NCCL falls back to the ring without it.
        if get("NCCL_NVLS_ENABLE").is_none() {
            env.push(("NCCL_NVLS_ENABLE", "0".into()));
        }
        if let Some(t) = &self.job_token {
            env.push((JOB_TOKEN_VAR, t.clone()));
        }
        env
    }
}

/// 128 random bits from the kernel, as 32 hex digits.
fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// How a rank ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Status(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    fn of(status: std::process::ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(c), _) => Exit::Status(c),
            (None, Some(s)) => Exit::Signal(s),
            // Neither only for stopped/continued, which `wait` does not report.
            (None, None) => Exit::Status(-1),
        }
    }

    fn success(self) -> bool {
        self == Exit::Status(0)
    }
}

/// How the job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every rank exited with status 0.
    Success,
    /// The first rank to fail (the lowest, among ranks seen failing in one
    /// poll).
    RankFailed {
        /// Its global rank.
        rank: usize,
        /// Its process id.
        pid: u32,
        /// How it ended.
        exit: Exit,
    },
    /// The launcher got this signal and stopped the ranks.
    Interrupted {
        /// The signal.
        signal: i32,
        /// Ranks it stopped.
        ranks: usize,
    },
}

impl Outcome {
    /// The launcher's one line about it (none on success).
    pub fn line(&self) -> Option<String> {
        match self {
            Outcome::Success => None,
            Outcome::RankFailed {
                rank,
                pid,
                exit: Exit::Status(s),
            } => Some(format!(
                "llmft launch: rank {rank} (pid {pid}) exited with status {s}"
            )),
            Outcome::RankFailed {
                rank,
                pid,
                exit: Exit::Signal(s),
            } => Some(format!(
                "llmft launch: rank {rank} (pid {pid}) was killed by signal {}",
                signal_name(*s)
            )),
            Outcome::Interrupted { signal, ranks } => Some(format!(
                "llmft launch: got {}; stopped {ranks} rank{}",
                signal_name(*signal),
                if *ranks == 1 { "" } else { "s" }
            )),
        }
    }

    /// The launcher's exit status: 0, 1 for a failed rank, 128 + the signal
    /// for an interrupted launch (as a shell reports it).
    pub fn code(&self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::RankFailed { .. } => 1,
            Outcome::Interrupted { signal, .. } => (128 + signal).clamp(1, 255) as u8,
        }
    }
}

/// `SIGKILL (9)` for the common signals, `signal 42` for the others.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => return format!("signal {sig}"),
    };
    format!("{name} ({sig})")
}

/// The first SIGINT/SIGTERM the launcher got (0: none yet).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// How many it got (a second one during the grace period skips to SIGKILL).
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    let _ = SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

fn install_signal_handlers() -> Result<(), String> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value,
        // and the handler only touches atomics (async-signal-safe).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(format!(
                "cannot handle {}: {}",
                signal_name(sig),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// One started rank.
struct Rank {
    rank: usize,
    child: Child,
    exit: Option<Exit>,
}

impl Rank {
    /// Signals the rank's process group (its pid: it leads its own group);
    /// a group already gone is fine.
    fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), sig);
        }
    }

    /// Reaps the rank if it has ended.
    fn poll(&mut self) -> Option<Exit> {
        if self.exit.is_none() {
            // An error here means the child is already reaped, which only
            // this loop does; treat it as ended.
            self.exit = match self.child.try_wait() {
                Ok(Some(status)) => Some(Exit::of(status)),
                Ok(None) => None,
                Err(_) => Some(Exit::Status(-1)),
            };
        }
        self.exit
    }
}

fn spawn(plan: &Plan, local: usize) -> std::io::Result<Rank> {
    let mut cmd = std::process::Command::new(&plan.program);
    cmd.args(&plan.args)
        .envs(plan.rank_env(local, |k| std::env::var(k).ok()))
        // Outside the terminal's foreground group a read of the terminal
        // would stop the rank.
        .stdin(Stdio::null())
        .process_group(0);
    let launcher = std::process::id();
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe system calls (prctl, getppid), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher died before the prctl took effect.
            if libc::getppid() as u32 != launcher {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    Ok(Rank {
        rank: plan.rank(local),
        child,
        exit: None,
    })
}

/// SIGTERM to every rank's group, SIGKILL once they have all ended or the
/// grace period is over (or a second signal came), then reaps them.
fn stop(ranks: &mut [Rank]) {
    for r in ranks.iter() {
        r.signal(libc::SIGTERM);
    }
    let signals = SIGNALS.load(Ordering::SeqCst);
    let deadline = Instant::now() + GRACE;
    while ranks.iter_mut().any(|r| r.poll().is_none())
        && Instant::now() < deadline
        && SIGNALS.load(Ordering::SeqCst) == signals
    {
        std::thread::sleep(POLL);
    }
    // Also for ranks that have ended: their own children may live on.
    for r in ranks.iter() {
        r.signal(libc::SIGKILL);
    }
    let deadline = Instant::now() + REAP;
    while ranks.iter_mut().any(|r| r.poll().is_none()) && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
}

/// The failure to report, if a rank failed: a rank killed by a signal is
/// the likelier cause than one that exited with an error (its peers fail
/// when it vanishes), so after an error exit the ranks get one more short
/// look before the lowest rank that failed is named.
fn first_failure(ranks: &mut [Rank]) -> Option<Outcome> {
    let pick = |ranks: &mut [Rank]| {
        let mut failed: Vec<(bool, usize, u32, Exit)> = ranks
            .iter_mut()
            .filter_map(|r| {
                let exit = r.poll().filter(|e| !e.success())?;
                Some((!matches!(exit, Exit::Signal(_)), r.rank, r.child.id(), exit))
            })
            .collect();
        failed.sort_by_key(|&(by_status, rank, ..)| (by_status, rank));
        failed.first().copied()
    };
    let (by_status, ..) = pick(ranks)?;
    if by_status {
        std::thread::sleep(SETTLE);
    }
    let (_, rank, pid, exit) = pick(ranks)?;
    Some(Outcome::RankFailed { rank, pid, exit })
}

/// Starts the ranks and watches them to the end.
fn run(plan: &Plan) -> Result<Outcome, String> {
    install_signal_handlers()?;
    let mut ranks = Vec::with_capacity(plan.nproc_per_node);
    for local in 0..plan.nproc_per_node {
        match spawn(plan, local) {
            Ok(r) => ranks.push(r),
            Err(e) => {
                stop(&mut ranks);
                return Err(format!(
                    "cannot start rank {} (`{}`): {e}",
                    plan.rank(local),
                    plan.program.to_string_lossy()
                ));
            }
        }
    }
    let outcome = loop {
        let signal = SIGNAL.load(Ordering::SeqCst);
        if signal != 0 {
            break Outcome::Interrupted {
                signal,
                ranks: ranks
                    .iter_mut()
                    .map(Rank::poll)
                    .filter(Option::is_none)
                    .count(),
            };
        }
        if let Some(failed) = first_failure(&mut ranks) {
            break failed;
        }
        if ranks.iter_mut().all(|r| r.poll().is_some()) {
            return Ok(Outcome::Success);
        }
        std::thread::sleep(POLL);
    };
    stop(&mut ranks);
    Ok(outcome)
}

/// `llmft launch`: exit 2 for arguments that cannot run, else the
/// [`Outcome::code`] of the job.
pub fn main(args: &LaunchArgs) -> ExitCode {
    let plan = match Plan::new(args, std::env::current_exe, |k| std::env::var(k).ok()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if plan.nnodes > 1 && std::env::var(JOB_TOKEN_VAR).map_or(true, |t| t.is_empty()) {
        eprintln!(
            "llmft launch: {JOB_TOKEN_VAR} is not set: anyone who can reach this job's ports can \
             join it; set the same {JOB_TOKEN_VAR} on every node"
        );
    }
    match run(&plan) {
        Ok(outcome) => {
            if let Some(line) = outcome.line() {
                eprintln!("{line}");
            }
            ExitCode::from(outcome.code())
        }
        Err(e) => {
            eprintln!("llmft launch: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        launch: LaunchArgs,
    }

    fn parse(argv: &[&str]) -> Result<LaunchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("launch").chain(argv.iter().copied())).map(|c| c.launch)
    }

    fn plan(argv: &[&str], vars: &[(&str, &str)]) -> Result<Plan, String> {
        let a = parse(argv).map_err(|e| e.to_string())?;
        Plan::new(
            &a,
            || Ok("/bin/llmft".into()),
            |k| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            },
        )
    }

    #[test]
    fn defaults_and_env_fallbacks() {
        let p = plan(
            &["--nproc-per-node", "2", "--", "train", "-c", "x.toml"],
            &[],
        )
        .unwrap();
        assert_eq!((p.nnodes, p.node_rank), (1, 0));
        assert_eq!(
            (p.master_addr.as_str(), p.master_port),
            ("127.0.0.1", 29500)
        );
        assert_eq!(p.program, "/bin/llmft");
        assert_eq!(p.args, ["train", "-c", "x.toml"]);
        let env = [("MASTER_ADDR", "node7"), ("MASTER_PORT", "1234")];
        let p = plan(&["--nproc-per-node", "2", "--", "train"], &env).unwrap();
        assert_eq!((p.master_addr.as_str(), p.master_port), ("node7", 1234));
        let p = plan(
            &[
                "--nproc-per-node",
                "2",
                "--master-addr",
                "a",
                "--master-port",
                "9",
                "--",
                "x",
            ],
            &env,
        )
        .unwrap();
        assert_eq!((p.master_addr.as_str(), p.master_port), ("a", 9));
        let e = plan(
            &["--nproc-per-node", "2", "--", "x"],
            &[("MASTER_PORT", "http")],
        )
        .unwrap_err();
        assert!(e.contains("MASTER_PORT `http`"), "{e}");
    }

    #[test]
    fn exec_runs_the_program_and_flags_after_it_are_its_own() {
        let p = plan(
            &["--nproc-per-node", "1", "--exec", "--", "sh", "-c", "true"],
            &[],
        )
        .unwrap();
        assert_eq!(p.program, "sh");
        assert_eq!(p.args, ["-c", "true"]);
        // Without `--`, everything from the first positional on is the command.
        let p = plan(&["--nproc-per-node", "1", "train", "--nnodes", "4"], &[]).unwrap();
        assert_eq!(p.nnodes, 1);
        assert_eq!(p.args, ["train", "--nnodes", "4"]);
    }

    #[test]
    fn bad_input_is_one_error() {
        for argv in [
            &["--nproc-per-node", "0", "--", "x"][..],
            &["--nproc-per-node", "1", "--nnodes", "0", "--", "x"],
            &["--nproc-per-node", "1"],
            &["--nproc-per-node", "1", "--"],
            &["--", "x"],
        ] {
            assert!(parse(argv).is_err(), "{argv:?}");
        }
        let e = plan(
            &[
                "--nproc-per-node",
                "2",
                "--nnodes",
                "2",
                "--node-rank",
                "2",
                "--",
                "x",
            ],
            &[],
        )
        .unwrap_err();
        assert!(e.contains("--node-rank 2 is not below --nnodes 2"), "{e}");
        let e = plan(
            &[
                "--nproc-per-node",
                "2",
                "--",
                "launch",
                "--nproc-per-node",
                "2",
            ],
            &[],
        )
        .unwrap_err();
        assert!(e.contains("would start launchers"), "{e}");
        let e = plan(
            &[
                "--nproc-per-node",
                "4294967295",
                "--nnodes",
                "4294967295",
                "--",
                "x",
            ],
            &[],
        )
        .unwrap_err();
        assert!(e.contains("too many"), "{e}");
    }

    #[test]
    fn rank_env_follows_torchrun() {
        let p = plan(
            &[
                "--nproc-per-node",
                "8",
                "--nnodes",
                "2",
                "--node-rank",
                "1",
                "--master-addr",
                "n0",
                "--",
                "x",
            ],
            &[],
        )
        .unwrap();
        let env = p.rank_env(3, |_| None);
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("RANK"), Some("11"));
        assert_eq!(get("WORLD_SIZE"), Some("16"));
        assert_eq!(get("LOCAL_RANK"), Some("3"));
        assert_eq!(get("LOCAL_WORLD_SIZE"), Some("8"));
        assert_eq!(get("GROUP_RANK"), Some("1"));
        assert_eq!(get("MASTER_ADDR"), Some("n0"));
        assert_eq!(get("MASTER_PORT"), Some("29500"));
        assert_eq!(get("NCCL_NVLS_ENABLE"), Some("0"));
        // The ranks' variables are what WorldInfo reads, even under SLURM.
        let w = llmft_shard::WorldInfo::from_vars(|k| match k {
            "SLURM_PROCID" => Some("0".into()),
            "SLURM_NTASKS" => Some("2".into()),
            _ => get(k).map(String::from),
        })
        .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank), (11, 16, 3));
        // A setting of the user's own is kept.
        let env = p.rank_env(0, |k| (k == "NCCL_NVLS_ENABLE").then(|| "1".into()));
        assert!(env.iter().all(|(n, _)| *n != "NCCL_NVLS_ENABLE"));
    }

    #[test]
    fn a_single_node_job_gets_a_token_unless_one_is_set() {
        let token = |p: &Plan| {
            let env = p.rank_env(1, |_| None);
            env.iter()
                .find(|(n, _)| *n == JOB_TOKEN_VAR)
                .map(|(_, v)| v.clone())
        };
        let one = plan(&["--nproc-per-node", "2", "--", "x"], &[]).unwrap();
        let t = token(&one).unwrap();
        assert!(
            t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()),
            "{t}"
        );
        // The same for every rank, and new for every job.
        assert_eq!(one.rank_env(0, |_| None), one.rank_env(0, |_| None));
        let again = plan(&["--nproc-per-node", "2", "--", "x"], &[]).unwrap();
        assert_ne!(token(&again), Some(t));
        // The user's own is inherited, not replaced.
        let set = plan(
            &["--nproc-per-node", "2", "--", "x"],
            &[(JOB_TOKEN_VAR, "mine")],
        );
        assert_eq!(token(&set.unwrap()), None);
        // Over nodes each launcher would make another: none is made.
        let nodes = plan(&["--nproc-per-node", "2", "--nnodes", "2", "--", "x"], &[]).unwrap();
        assert_eq!(token(&nodes), None);
    }

    #[test]
    fn outcome_lines_and_codes() {
        let failed = |exit| Outcome::RankFailed {
            rank: 2,
            pid: 4242,
            exit,
        };
        assert_eq!(Outcome::Success.line(), None);
        assert_eq!(Outcome::Success.code(), 0);
        assert_eq!(
            failed(Exit::Status(3)).line().unwrap(),
            "llmft launch: rank 2 (pid 4242) exited with status 3"
        );
        assert_eq!(
            failed(Exit::Signal(9)).line().unwrap(),
            "llmft launch: rank 2 (pid 4242) was killed by signal SIGKILL (9)"
        );
        assert_eq!(failed(Exit::Signal(9)).code(), 1);
        let i = Outcome::Interrupted {
            signal: libc::SIGTERM,
            ranks: 3,
        };
        assert_eq!(
            i.line().unwrap(),
            "llmft launch: got SIGTERM (15); stopped 3 ranks"
        );
        assert_eq!(i.code(), 143);
        assert_eq!(signal_name(42), "signal 42");
    }
}
