//! The rendezvous under attack: a world-2 CPU job while a stranger floods
//! rank 0's store port, and clients with a wrong or no job token.
//!
//! As in `process_group.rs`, each test re-runs this binary once per rank
//! with `LLMFT_GUARD_MODE` set and only the `worker` test selected; the
//! worker prints `PGW ...` lines the parent reads. The job and the parent
//! meet through the store (keys `go` and `flooded`), so the flood is sure
//! to fall inside the job.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use llmft_shard::{
    init_process_group, GroupConfig, JobToken, ProcessGroup, StoreOptions, TcpStore, WorldInfo,
    JOB_TOKEN_VAR,
};
use llmft_tensor::{Ctx, Tensor};

const MODE: &str = "LLMFT_GUARD_MODE";
const HELLO: &[u8; 8] = b"LLMFTKV2";
const STEPS: usize = 200;
const N: usize = 1000;
const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- worker

/// The worker's entry; a no-op when this binary runs as the test suite.
#[test]
fn worker() {
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    let code = match run_worker(&mode) {
        Ok(()) => 0,
        Err(e) => {
            println!("PGW error {e}");
            3
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

fn say(line: &str) {
    println!("PGW {line}");
    let _ = std::io::stdout().flush();
}

fn run_worker(mode: &str) -> Result<(), String> {
    let e = |e: llmft_shard::Error| e.to_string();
    let world = WorldInfo::from_env().map_err(e)?;
    let cfg = GroupConfig {
        timeout: WAIT,
        rendezvous_timeout: WAIT,
        ..GroupConfig::default()
    };
    let ctx = Ctx::cpu();
    let pg = init_process_group(&world, &ctx, cfg).map_err(e)?;
    // A client of rank 0's store of its own (not rank 0: no second server),
    // to meet the parent and to use the store during the flood.
    let mut store = TcpStore::connect(
        &WorldInfo {
            rank: 1,
            ..world.clone()
        },
        WAIT,
    )
    .map_err(e)?;
    say("ready");
    store.get("go").map_err(e)?;
    match mode {
        "steps" => steps(&ctx, &*pg, &mut store),
        "idle" => store.barrier().map_err(e),
        m => Err(format!("unknown mode {m}")),
    }
}

/// 200 all-reduces of known whole numbers, a barrier after each and a store
/// barrier every 10; after half of them the ranks wait until the parent's
/// flood is over. Prints the hash of every result.
fn steps(ctx: &Ctx, pg: &dyn ProcessGroup, store: &mut TcpStore) -> Result<(), String> {
    let e = |e: llmft_shard::Error| e.to_string();
    let mut hash = FNV;
    for s in 0..STEPS {
        if s == STEPS / 2 {
            store.get("flooded").map_err(e)?;
        }
        let mut x = Tensor::from_f32(ctx, &ints(pg.rank(), s), llmft_tensor::DType::F32, &[N])
            .map_err(|e| e.to_string())?;
        pg.all_reduce_sum(ctx, &mut x).map_err(e)?;
        fnv(&mut hash, x.as_bytes().map_err(|e| e.to_string())?);
        pg.barrier(ctx).map_err(e)?;
        if s % 10 == 9 {
            store.barrier().map_err(e)?;
        }
    }
    say(&format!("result {hash:016x}"));
    Ok(())
}

/// splitmix64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rank `r`'s tensor at step `s`: whole numbers, so sums are exact.
fn ints(r: usize, s: usize) -> Vec<f32> {
    (0..N)
        .map(|i| (mix(((r * STEPS + s) * N + i) as u64) % 2001) as f32 - 1000.0)
        .collect()
}

const FNV: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h = (*h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
}

/// The hash an undisturbed world-2 run prints, computed here.
fn expected_hash() -> String {
    let mut hash = FNV;
    for s in 0..STEPS {
        let (a, b) = (ints(0, s), ints(1, s));
        let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        fnv(&mut hash, bytemuck::cast_slice(&sum));
    }
    format!("result {hash:016x}")
}

// ---------------------------------------------------------------- parent

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A world-2 job: its children, `PGW` lines and stderr.
struct Job {
    port: u16,
    children: Vec<Child>,
    lines: mpsc::Receiver<(usize, String)>,
    stderr: Vec<std::thread::JoinHandle<String>>,
}

fn start(mode: &str, token: Option<&str>) -> Job {
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    let (tx, lines) = mpsc::channel();
    let mut children = Vec::new();
    let mut stderr = Vec::new();
    for rank in 0..2usize {
        let mut cmd = Command::new(&exe);
        cmd.args(["worker", "--exact", "--nocapture", "--test-threads=1"]);
        for k in [
            "SLURM_PROCID",
            "SLURM_NTASKS",
            "SLURM_LOCALID",
            JOB_TOKEN_VAR,
        ] {
            cmd.env_remove(k);
        }
        if let Some(t) = token {
            cmd.env(JOB_TOKEN_VAR, t);
        }
        cmd.env("RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(MODE, mode)
            .env_remove("LLMFT_STORE_BIND");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(|l| l.ok()) {
                if let Some(at) = line.find("PGW ") {
                    let _ = tx.send((rank, line[at + 4..].to_string()));
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        stderr.push(std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        }));
        children.push(child);
    }
    Job {
        port,
        children,
        lines,
        stderr,
    }
}

impl Job {
    fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        let mut ready = 0;
        while ready < 2 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((_, l)) if l == "ready" => ready += 1,
                Ok((rank, l)) => panic!("rank {rank}: {l}"),
                Err(_) => panic!("the ranks were not ready within {WAIT:?}"),
            }
        }
    }

    /// A client of this job's store with `token`.
    fn client(&self, token: Option<&str>) -> llmft_shard::Result<TcpStore> {
        let world = WorldInfo {
            rank: 7,
            world_size: 2,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: self.port,
        };
        let opts = StoreOptions {
            token: token.map(|t| JobToken::new(t).unwrap()),
            bind: None,
        };
        TcpStore::connect_with(&world, Duration::from_secs(5), &opts)
    }

    /// Waits for both ranks (killing them after `within`): the `PGW` lines
    /// and stderr of each.
    fn finish(mut self, within: Duration) -> Vec<(Vec<String>, String)> {
        let deadline = Instant::now() + within;
        for (i, c) in self.children.iter_mut().enumerate() {
            loop {
                if let Some(s) = c.try_wait().unwrap() {
                    assert_eq!(s.code(), Some(0), "rank {i} failed");
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    panic!("rank {i} still running after {within:?}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let errs: Vec<String> = self.stderr.into_iter().map(|h| h.join().unwrap()).collect();
        let mut lines = vec![Vec::new(); 2];
        while let Ok((rank, l)) = self.lines.recv_timeout(Duration::from_millis(200)) {
            lines[rank].push(l);
        }
        lines.into_iter().zip(errs).collect()
    }
}

/// One garbage connection of kind `k` to `at`; errors are the point.
fn garbage(at: SocketAddr, k: u64, rnd: u64) {
    let Ok(mut s) = TcpStream::connect(at) else {
        return;
    };
    let random: Vec<u8> = (0..1 + rnd % 200).map(|i| mix(rnd ^ i) as u8).collect();
    let token_hello = |t: &[u8]| [&HELLO[..], &(t.len() as u16).to_le_bytes(), t].concat();
    let frame = match k % 9 {
        0 => random,
        // An oversized token length, then junk.
        1 => [&HELLO[..], &u16::MAX.to_le_bytes(), &random].concat(),
        // Part of a hello, then gone.
        2 => token_hello(TOKEN.as_bytes())[..(rnd % 20) as usize].to_vec(),
        3 => token_hello(b"not-the-token"),
        4 => token_hello(b""),
        // With the right token: a 4 GiB key, a 1 TiB value, half a request.
        5 => [
            &token_hello(TOKEN.as_bytes())[..],
            &[1],
            &u32::MAX.to_le_bytes(),
        ]
        .concat(),
        6 => [
            &token_hello(TOKEN.as_bytes())[..],
            &[1],
            &5u32.to_le_bytes(),
            b"flood",
            &(1u64 << 40).to_le_bytes(),
        ]
        .concat(),
        7 => [&token_hello(TOKEN.as_bytes())[..], &[2, 200, 0]].concat(),
        // Another version's hello.
        _ => [&b"LLMFTKV1"[..], &random].concat(),
    };
    let _ = s.write_all(&frame);
}

#[test]
fn a_flood_of_garbage_and_half_open_connections_leaves_the_job_exact() {
    let t0 = Instant::now();
    let job = start("steps", Some(TOKEN));
    job.wait_ready();
    let at: SocketAddr = ([127, 0, 0, 1], job.port).into();
    // 100 half-open connections for the whole job: 90 silent, 10 with part
    // of a hello.
    let mut held: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(at).unwrap()).collect();
    for s in &mut held[90..] {
        s.write_all(&HELLO[..4]).unwrap();
    }
    let flooders: Vec<_> = (0..2u64)
        .map(|f| {
            std::thread::spawn(move || {
                for i in 0..5000u64 {
                    let r = mix(f << 32 | i);
                    garbage(at, r >> 8, r);
                }
            })
        })
        .collect();
    let mut me = job.client(Some(TOKEN)).unwrap();
    me.set("go", "").unwrap();
    for f in flooders {
        f.join().unwrap();
    }
    let flood = t0.elapsed();
    me.set("flooded", "").unwrap();
    let out = job.finish(WAIT);
    drop(held);
    let want = expected_hash();
    for (rank, (lines, _)) in out.iter().enumerate() {
        assert_eq!(lines, std::slice::from_ref(&want), "rank {rank}");
    }
    // Rank 0 said so, briefly: one line a second at most, plus the count.
    let err = &out[0].1;
    let refusals = err.lines().filter(|l| l.contains("refused")).count();
    let secs = t0.elapsed().as_secs() as usize;
    assert!(
        err.contains("refused a connection from 127.0.0.1:"),
        "{err}"
    );
    assert!(
        (1..=secs + 3).contains(&refusals),
        "{refusals} lines in {secs} s: {err}"
    );
    eprintln!("flood of 10000 in {flood:?}, test {:?}", t0.elapsed());
}

#[test]
fn an_undisturbed_job_without_a_token_gets_the_same_results() {
    let job = start("steps", None);
    job.wait_ready();
    let mut me = job.client(None).unwrap();
    me.set("go", "").unwrap();
    me.set("flooded", "").unwrap();
    let out = job.finish(WAIT);
    for (rank, (lines, err)) in out.iter().enumerate() {
        assert_eq!(lines, &[expected_hash()], "rank {rank}");
        assert!(!err.contains("refused"), "rank {rank}: {err}");
    }
}

/// A raw hello with `token`: the store's status byte, and the local
/// address the store saw.
fn raw_hello(port: u16, token: &[u8]) -> (Option<u8>, SocketAddr, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(&[&HELLO[..], &(token.len() as u16).to_le_bytes(), token].concat())
        .unwrap();
    let mut back = [0u8; 9];
    let status = s.read_exact(&mut back).ok().map(|_| back[8]);
    let mut rest = Vec::new();
    let closed = s.read_to_end(&mut rest).is_ok() && rest.is_empty();
    (status, me, closed)
}

#[test]
fn clients_with_a_wrong_or_no_token_are_refused_and_named() {
    let job = start("idle", Some(TOKEN));
    job.wait_ready();
    let (status, wrong_at, closed) = raw_hello(job.port, b"0123456789abcdef0123456789abcdeX");
    assert_eq!((status, closed), (Some(1), true));
    let e = job.client(Some("guess")).unwrap_err().to_string();
    assert!(e.contains("refused this rank's job token"), "{e}");
    // The next refusal line may come a second after the last.
    std::thread::sleep(Duration::from_millis(1100));
    let (status, none_at, closed) = raw_hello(job.port, b"");
    assert_eq!((status, closed), (Some(1), true));
    let e = job.client(None).unwrap_err().to_string();
    assert!(
        e.contains("requires a job token and this rank has none"),
        "{e}"
    );
    job.client(Some(TOKEN)).unwrap().set("go", "").unwrap();
    let out = job.finish(WAIT);
    let err = &out[0].1;
    assert!(
        err.contains(&format!(
            "refused a connection from {wrong_at}: presented a wrong job token"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "refused a connection from {none_at}: presented no job token"
        )),
        "{err}"
    );
    // The refusal lines name peers, never the token.
    assert!(!err.contains(TOKEN), "{err}");
    assert!(!out[1].1.contains("refused"), "{}", out[1].1);
}
