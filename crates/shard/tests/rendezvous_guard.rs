//! The rendezvous under attack: a world-2 CPU job while a stranger floods
//! rank 0's store port, and clients with a wrong or no job token.
//!
//! As in `process_group.rs`, each test re-runs this binary once per rank
//! with `LLMFT_GUARD_MODE` set and only the `worker` test selected; the
//! worker prints `PGW ...` lines the parent reads. The job and the parent
//! meet through the store (keys `go` and `flooded`), so the flood is sure
//! to fall inside the job.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{fnv, mix, Harness, Job, Output, Vars, FNV};

use llmft_shard::{
    init_process_group, GroupConfig, JobToken, ProcessGroup, StoreOptions, TcpStore, WorldInfo,
    JOB_TOKEN_VAR,
};
use llmft_tensor::{Ctx, Tensor};

const HARNESS: Harness = Harness {
    mode_var: "LLMFT_GUARD_MODE",
    tag: "PGW",
};
const HELLO: &[u8; 8] = b"LLMFTKV2";
const STEPS: usize = 200;
const N: usize = 1000;
const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- worker

/// The worker's entry; a no-op when this binary runs as the test suite.
#[test]
fn worker() {
    HARNESS.worker(run_worker);
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
    HARNESS.say("ready");
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
    HARNESS.say(&format!("result {hash:016x}"));
    Ok(())
}

/// Rank `r`'s tensor at step `s`: whole numbers, so sums are exact.
fn ints(r: usize, s: usize) -> Vec<f32> {
    (0..N)
        .map(|i| (mix(((r * STEPS + s) * N + i) as u64) % 2001) as f32 - 1000.0)
        .collect()
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

/// A world-2 job in mode `mode`, its ranks given `token` (and no other).
fn start(mode: &str, token: Option<&str>) -> Job {
    HARNESS.spawn(mode, 2, &[0, 1], Vars::Torchrun, |cmd| {
        cmd.env_remove(JOB_TOKEN_VAR);
        if let Some(t) = token {
            cmd.env(JOB_TOKEN_VAR, t);
        }
        cmd.env_remove("LLMFT_STORE_BIND");
    })
}

/// Waits until both ranks are in the job and at the store.
fn wait_ready(job: &mut Job) {
    job.expect_lines("ready", 2, WAIT);
}

/// A client of `job`'s store with `token`.
fn client(job: &Job, token: Option<&str>) -> llmft_shard::Result<TcpStore> {
    let world = WorldInfo {
        rank: 7,
        world_size: 2,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: job.port(),
    };
    let opts = StoreOptions {
        token: token.map(|t| JobToken::new(t).unwrap()),
        bind: None,
    };
    TcpStore::connect_with(&world, Duration::from_secs(5), &opts)
}

/// Waits for both ranks (killing them after `within`), which must succeed:
/// the messages and stderr of each.
fn finish(job: Job, within: Duration) -> Vec<Output> {
    let (codes, out) = job.finish(within);
    for (i, code) in codes.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {i} failed: {out:?}");
    }
    out
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
    let mut job = start("steps", Some(TOKEN));
    wait_ready(&mut job);
    let at: SocketAddr = ([127, 0, 0, 1], job.port()).into();
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
    let mut me = client(&job, Some(TOKEN)).unwrap();
    me.set("go", "").unwrap();
    for f in flooders {
        f.join().unwrap();
    }
    let flood = t0.elapsed();
    me.set("flooded", "").unwrap();
    let out = finish(job, WAIT);
    drop(held);
    let want = expected_hash();
    for (rank, o) in out.iter().enumerate() {
        assert_eq!(o.lines, std::slice::from_ref(&want), "rank {rank}");
    }
    // Rank 0 said so, briefly: one line a second at most, plus the count.
    let err = &out[0].stderr;
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
    let mut job = start("steps", None);
    wait_ready(&mut job);
    let mut me = client(&job, None).unwrap();
    me.set("go", "").unwrap();
    me.set("flooded", "").unwrap();
    let out = finish(job, WAIT);
    for (rank, o) in out.iter().enumerate() {
        assert_eq!(o.lines, &[expected_hash()], "rank {rank}");
        assert!(!o.stderr.contains("refused"), "rank {rank}: {}", o.stderr);
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
    let mut job = start("idle", Some(TOKEN));
    wait_ready(&mut job);
    let (status, wrong_at, closed) = raw_hello(job.port(), b"0123456789abcdef0123456789abcdeX");
    assert_eq!((status, closed), (Some(1), true));
    let e = client(&job, Some("guess")).unwrap_err().to_string();
    assert!(e.contains("refused this rank's job token"), "{e}");
    // The next refusal line may come a second after the last.
    std::thread::sleep(Duration::from_millis(1100));
    let (status, none_at, closed) = raw_hello(job.port(), b"");
    assert_eq!((status, closed), (Some(1), true));
    let e = client(&job, None).unwrap_err().to_string();
    assert!(
        e.contains("requires a job token and this rank has none"),
        "{e}"
    );
    client(&job, Some(TOKEN)).unwrap().set("go", "").unwrap();
    let out = finish(job, WAIT);
    let err = &out[0].stderr;
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
    assert!(!out[1].stderr.contains("refused"), "{}", out[1].stderr);
}
