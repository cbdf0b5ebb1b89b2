//! The multi-process scaffolding shared by the tests of llmft-shard.
//!
//! A test that needs real ranks re-runs its own test binary once per rank
//! (a [`Job`]), with only the `worker` test selected and torchrun- or
//! SLURM-style variables naming the rank, `MASTER_ADDR`/`MASTER_PORT`
//! naming rank 0's store, and the file's mode variable naming what the
//! worker does. The contract between the two sides is a [`Harness`]:
//!
//! - each test file defines `#[test] fn worker() { HARNESS.worker(run) }`,
//!   a no-op when the binary runs as the test suite;
//! - a worker talks to the parent only through stdout lines `<tag> <text>`
//!   ([`Harness::say`]); the parent keeps `<text>` (the libtest harness's
//!   `test worker ... ` prefix has no newline of its own, so the tag is
//!   searched for anywhere in a line) and every byte of stderr;
//! - a worker whose run fails prints `<tag> error <message>` and exits with
//!   [`FAILED`]; any exit code other than 0 and [`FAILED`] (a panic, an
//!   abort) fails the parent with that rank's output.
//!
//! The parent waits with deadlines only: a job still running at one is
//! killed and the panic shows what every rank printed. A `Job` that is
//! dropped (a failing assertion) kills the ranks still running.
//!
//! Also here: the seeded generators and the hash the workers share.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use llmft_shard::WATCHDOG_EXIT_STATUS;
use llmft_tensor::{Ctx, Element, Tensor};

/// The exit code of a worker whose run returned an error.
pub const FAILED: i32 = 3;

/// The variables that name a rank, removed from every worker's environment
/// before [`Vars`] sets its own.
const RANK_VARS: [&str; 6] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
];

/// One test file's worker contract: the variable that carries the mode and
/// the tag of the lines a worker prints for the parent.
pub struct Harness {
    /// Set to the mode in a worker; unset when the binary is the test suite.
    pub mode_var: &'static str,
    /// Lines `<tag> <text>` on a worker's stdout are its messages.
    pub tag: &'static str,
}

impl Harness {
    /// Prints one message for the parent, flushed at once.
    pub fn say(&self, line: &str) {
        println!("{} {line}", self.tag);
        let _ = std::io::stdout().flush();
    }

    /// The body of the file's `worker` test: returns at once unless the
    /// mode variable is set; otherwise runs `run(mode)` and exits the
    /// process, with 0, or with [`FAILED`] after saying `error <message>`.
    pub fn worker(&self, run: impl FnOnce(&str) -> Result<(), String>) {
        let Ok(mode) = std::env::var(self.mode_var) else {
            return;
        };
        let code = match run(&mode) {
            Ok(()) => 0,
            Err(e) => {
                self.say(&format!("error {e}"));
                FAILED
            }
        };
        let _ = std::io::stdout().flush();
        std::process::exit(code);
    }

    /// Starts ranks `ranks` of a world of `world` in mode `mode`, rank 0's
    /// store on a free port of 127.0.0.1 ([`Job::port`]). `env` adds to
    /// (or removes from) each rank's environment, after the rank, master
    /// and mode variables are set.
    pub fn spawn(
        &self,
        mode: &str,
        world: usize,
        ranks: &[usize],
        vars: Vars,
        env: impl Fn(&mut Command),
    ) -> Job {
        let port = free_port();
        let exe = std::env::current_exe().unwrap();
        let needle = format!("{} ", self.tag);
        let (tx, lines) = mpsc::channel();
        let mut job = Job {
            ranks: ranks.to_vec(),
            port,
            children: Vec::new(),
            lines,
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        for (i, &rank) in ranks.iter().enumerate() {
            let mut cmd = Command::new(&exe);
            cmd.args(["worker", "--exact", "--nocapture", "--test-threads=1"]);
            for k in RANK_VARS {
                cmd.env_remove(k);
            }
            let (r, w) = (rank.to_string(), world.to_string());
            match vars {
                Vars::Torchrun => cmd
                    .env("RANK", &r)
                    .env("WORLD_SIZE", &w)
                    .env("LOCAL_RANK", &r),
                Vars::Slurm => cmd
                    .env("SLURM_PROCID", &r)
                    .env("SLURM_NTASKS", &w)
                    .env("SLURM_LOCALID", &r),
            };
            cmd.env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env(self.mode_var, mode);
            env(&mut cmd);
            let mut child = cmd
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let out = BufReader::new(child.stdout.take().unwrap());
            let (tx, needle) = (tx.clone(), needle.clone());
            job.stdout.push(std::thread::spawn(move || {
                for line in out.lines().map_while(|l| l.ok()) {
                    if let Some(at) = line.find(&needle) {
                        let _ = tx.send((i, line[at + needle.len()..].to_string()));
                    }
                }
            }));
            let mut err = child.stderr.take().unwrap();
            job.stderr.push(std::thread::spawn(move || {
                let mut s = String::new();
                let _ = err.read_to_string(&mut s);
                s
            }));
            job.children.push(child);
        }
        job
    }
}

/// A port of 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Which variables tell a worker its rank.
#[derive(Clone, Copy, Debug)]
pub enum Vars {
    /// `RANK`, `WORLD_SIZE`, `LOCAL_RANK`.
    Torchrun,
    /// `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`.
    Slurm,
}

/// What one rank printed: its messages (without the tag; those taken by
/// [`Job::expect_lines`] are not here) and its whole stderr.
#[derive(Debug, Default)]
pub struct Output {
    pub lines: Vec<String>,
    pub stderr: String,
}

/// The ranks of one job, by position in the `ranks` they were spawned as;
/// their messages arrive on reader threads while they run.
pub struct Job {
    ranks: Vec<usize>,
    port: u16,
    children: Vec<Child>,
    /// (position, text) of every message.
    lines: mpsc::Receiver<(usize, String)>,
    stdout: Vec<JoinHandle<()>>,
    stderr: Vec<JoinHandle<String>>,
}

impl Job {
    /// The port of rank 0's store (`MASTER_PORT`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits for `count` messages that start with `prefix`, the (position,
    /// text) of each. Any other message first, or fewer within `within`,
    /// kills the job and fails with what the ranks printed.
    pub fn expect_lines(
        &mut self,
        prefix: &str,
        count: usize,
        within: Duration,
    ) -> Vec<(usize, String)> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        while got.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((i, l)) if l.starts_with(prefix) => got.push((i, l)),
                Ok((i, l)) => self.fail(format!(
                    "rank {} said `{l}` while {got:?} of {count} `{prefix}` lines had come",
                    self.ranks[i]
                )),
                Err(_) => self.fail(format!(
                    "only {got:?} of {count} `{prefix}` lines within {within:?}"
                )),
            }
        }
        got
    }

    /// Kills the rank at position `i` (it exits with no code).
    pub fn kill(&mut self, i: usize) {
        self.children[i].kill().unwrap();
    }

    /// Waits for the rank at position 0 to exit (up to `within`), then kills
    /// the others.
    pub fn finish_first(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.children[0].try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for c in &mut self.children[1..] {
            let _ = c.kill();
        }
    }

    /// Waits for every rank; the exit codes (`None`: killed by a signal)
    /// and what each printed, by position. After `within` it kills them all
    /// and fails with what they printed; an exit code other than 0,
    /// [`FAILED`] and the NCCL watchdog's [`WATCHDOG_EXIT_STATUS`] fails
    /// with that rank's output.
    pub fn finish(mut self, within: Duration) -> (Vec<Option<i32>>, Vec<Output>) {
        let deadline = Instant::now() + within;
        let mut codes = vec![None; self.children.len()];
        let mut done = vec![false; self.children.len()];
        loop {
            for (i, c) in self.children.iter_mut().enumerate() {
                if !done[i] {
                    if let Some(s) = c.try_wait().unwrap() {
                        codes[i] = s.code();
                        done[i] = true;
                    }
                }
            }
            if done.iter().all(|d| *d) {
                break;
            }
            if Instant::now() > deadline {
                self.fail(format!("ranks still running after {within:?}: {done:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = self.collect();
        for (i, code) in codes.iter().enumerate() {
            if code.is_some_and(|c| ![0, FAILED, WATCHDOG_EXIT_STATUS].contains(&c)) {
                panic!("rank {} exited with {code:?}: {:?}", self.ranks[i], out[i]);
            }
        }
        (codes, out)
    }

    /// Kills every rank and panics with `what` and what they printed.
    fn fail(&mut self, what: String) -> ! {
        self.kill_all();
        let out = self.collect();
        panic!("{what}; the ranks printed {out:?}");
    }

    fn kill_all(&mut self) {
        for c in &mut self.children {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Once every rank has exited: the messages not yet taken and the
    /// stderr of each.
    fn collect(&mut self) -> Vec<Output> {
        for h in self.stdout.drain(..) {
            let _ = h.join();
        }
        let mut out: Vec<Output> = self
            .stderr
            .drain(..)
            .map(|h| Output {
                lines: Vec::new(),
                stderr: h.join().unwrap_or_default(),
            })
            .collect();
        while let Ok((i, l)) = self.lines.try_recv() {
            if let Some(o) = out.get_mut(i) {
                o.lines.push(l);
            }
        }
        out
    }
}

impl Drop for Job {
    /// A job given up on (a failed assertion) leaves no rank running.
    fn drop(&mut self) {
        self.kill_all();
    }
}

// ---------------------------------------------------------- shared data

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64's output for state `z` (the state advanced once, then mixed).
pub fn mix(z: u64) -> u64 {
    let mut z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// splitmix64: a different, reproducible stream per (rank, n, tag).
pub struct Rng(u64);

impl Rng {
    pub fn new(rank: usize, n: usize, tag: u64) -> Self {
        Self((rank as u64) << 40 ^ (n as u64) << 8 ^ tag)
    }
    pub fn next(&mut self) -> u64 {
        let z = mix(self.0);
        self.0 = self.0.wrapping_add(GOLDEN);
        z
    }
    /// Uniform in [-1, 1).
    pub fn float(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// A whole number in [-m, m]: sums of these are exact in any order.
    pub fn int(&mut self, m: u64) -> f32 {
        (self.next() % (2 * m + 1)) as f32 - m as f32
    }
}

/// `n` floats in [-1, 1) of the stream (rank, n, tag).
pub fn floats(rank: usize, n: usize, tag: u64) -> Vec<f32> {
    let mut r = Rng::new(rank, n, tag);
    (0..n).map(|_| r.float()).collect()
}

/// `v` as a 1-d tensor of `T` on `ctx`.
pub fn tensor<T: Element>(ctx: &Ctx, v: &[f32]) -> Tensor {
    let t: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    Tensor::from_slice(ctx, &t, &[v.len()]).unwrap()
}

/// FNV-1a's starting value.
pub const FNV: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, to compare result bits across ranks.
pub fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h = (*h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
}
