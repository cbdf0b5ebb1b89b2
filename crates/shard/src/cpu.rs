//! The CPU backend: the ranks joined in a ring of TCP connections.
//!
//! Each rank connects to the next rank's data listener (published in the
//! [`TcpStore`]) and accepts one connection from the previous rank; it sends
//! only to the next and receives only from the previous. Collectives are the
//! classic ring ones:
//! - all-reduce = reduce-scatter then all-gather, `2 (w - 1)` steps, each
//!   moving `1/w` of the tensor. Chunk `c` is summed in one fixed order,
//!   `((x[c] + x[c+1]) + x[c+2]) + ...` (ranks mod w), by whichever rank
//!   holds it, and the final bits travel unchanged, so every rank gets the
//!   same bits.
//! - reduce-scatter and all-gather: one of those halves.
//! - broadcast: the root's bytes flow along the ring in 4 MiB pieces.
//! - barrier: an all-gather of one byte per rank.
//!
//! In a step a rank sends on one thread while it receives on its own, so
//! no socket buffer size can deadlock the ring.
//!
//! Messages (integers little-endian): a 32-byte header `kind: u8` (`D`
//! data, `A` abort), `op: u8`, `dtype: u8`, 5 zero bytes, `seq: u64` (the
//! collective's number, the same on every rank), `total: u64` (the bytes
//! each rank passed), `len: u64`, then `len` bytes. The receiver checks op,
//! seq, dtype and sizes, so ranks calling different collectives or passing
//! different sizes get an error, not garbage. An abort carries
//! `origin: u32` and the error text: a rank whose collective fails sends it
//! to the next rank (which forwards it), then closes its connections, so
//! every rank fails within moments, naming the rank that failed first.
//! The data connections open with `LLMFTPG2, rank: u32, world: u32,
//! token_len: u16, token` (the job token of the store, see
//! [`crate::JobToken`]) and are answered `LLMFTPG2, rank: u32, status: u8`
//! (`0` accepted, `1` a wrong or missing token). A listener serves each
//! hello on its own thread, with the store's limits: a hello within
//! [`crate::HANDSHAKE_TIMEOUT`], at most [`crate::MAX_PENDING`] waiting, a
//! token of at most [`crate::MAX_TOKEN`] bytes; anything else is closed and
//! reported on stderr. The listener binds the address it advertises.
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use llmft_tensor::{bf16, f16, Ctx, DType, Device, Element, Tensor};

use crate::group::{Backend, GroupConfig, ProcessGroup};
use crate::store::{
    check_token, hello_failed, read_by, refused, token_frame, Pending, Warnings, ACCEPTED, REFUSED,
};
use crate::{
    Error, JobToken, Result, TcpStore, WorldInfo, HANDSHAKE_TIMEOUT, MAX_PENDING, MAX_TOKEN,
};

const HELLO: &[u8; 8] = b"LLMFTPG2";
const DATA: u8 = b'D';
const ABORT: u8 = b'A';
const HEADER: usize = 32;
/// Broadcast piece: large enough to stream, small enough to pipeline.
const SEGMENT: usize = 4 << 20;
const MAX_REASON: usize = 16 << 10;
/// How long a failing rank tries to tell the next one.
const ABORT_WAIT: Duration = Duration::from_secs(1);
/// Socket timeouts must not be zero (zero means "block forever" to the OS).
const MIN_WAIT: Duration = Duration::from_millis(1);

/// What a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Connect = 1,
    AllReduce = 2,
    AllGather = 3,
    ReduceScatter = 4,
    Broadcast = 5,
    Barrier = 6,
}

impl Op {
    const ALL: [Op; 6] = [
        Op::Connect,
        Op::AllReduce,
        Op::AllGather,
        Op::ReduceScatter,
        Op::Broadcast,
        Op::Barrier,
    ];
    fn name(self) -> &'static str {
        match self {
            Op::Connect => "connect",
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

const DTYPES: [DType; 6] = [
    DType::F32,
    DType::BF16,
    DType::F16,
    DType::U8,
    DType::I8,
    DType::I32,
];

fn dtype_code(d: Option<DType>) -> u8 {
    d.and_then(|d| DTYPES.iter().position(|&x| x == d))
        .map_or(0, |i| i as u8 + 1)
}

fn dtype_name(code: u8) -> &'static str {
    match code {
        0 => "no dtype",
        c => DTYPES
            .get(c as usize - 1)
            .map_or("an unknown dtype", |d| d.name()),
    }
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// The collective in progress: what every message of it must match.
#[derive(Clone, Copy)]
struct Call {
    op: Op,
    dtype: Option<DType>,
    total: u64,
}

/// The CPU process group (see the module docs for the algorithms).
pub struct CpuGroup {
    rank: usize,
    world_size: usize,
    ring: Option<Mutex<Ring>>,
    /// Kept for the group's life: in rank 0 it is the store's server.
    _store: Option<TcpStore>,
}

impl std::fmt::Debug for CpuGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuGroup(rank {} of {})", self.rank, self.world_size)
    }
}

/// The connections of one rank and the state of its collectives.
struct Ring {
    rank: usize,
    world: usize,
    timeout: Duration,
    next: TcpStream,
    prev: TcpStream,
    seq: u64,
    call: Call,
    /// False once a send to `next` failed part-way (no abort can follow).
    next_clean: bool,
    /// False once a receive from `prev` failed part-way through a message.
    prev_clean: AtomicBool,
    broken: Option<String>,
}

impl CpuGroup {
    /// Joins the group: rendezvous through the [`TcpStore`] at
    /// `MASTER_ADDR:MASTER_PORT`, publish this rank's data address, connect
    /// the ring, and wait until every rank is connected. A world of one
    /// opens no socket.
    pub fn connect(world: &WorldInfo, cfg: &GroupConfig) -> Result<Self> {
        let (rank, w) = (world.rank, world.world_size);
        if w == 1 {
            return Ok(Self {
                rank,
                world_size: 1,
                ring: None,
                _store: None,
            });
        }
        let total = cfg.rendezvous_timeout;
        let deadline = Instant::now() + total;
        let mut store = TcpStore::connect(world, total)?;
        let addr = store.addr().to_string();
        let rendezvous = |what: String| Error::Rendezvous {
            rank,
            addr: addr.clone(),
            what,
            timeout: total,
        };
        let ip = match cfg.advertise_ip {
            Some(ip) => ip,
            None => store.local_ip()?,
        };
        let listen_err = |source| Error::Listen {
            rank,
            addr: SocketAddr::new(ip, 0).to_string(),
            purpose: "data connections",
            source,
        };
        let listener = TcpListener::bind((ip, 0)).map_err(listen_err)?;
        let mine = listener.local_addr().map_err(listen_err)?;
        store.set(&format!("pg/addr/{rank}"), &mine.to_string())?;
        let mut addrs = Vec::with_capacity(w);
        for k in 0..w {
            let key = format!("pg/addr/{k}");
            let left = deadline.saturating_duration_since(Instant::now());
            let v = match store.get_within(&key, left) {
                Err(Error::StoreTimeout { .. }) => {
                    return Err(rendezvous(format!(
                        "rank {k} did not arrive (it never set `{key}`)"
                    )))
                }
                r => r?,
            };
            let a: Option<SocketAddr> = std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok());
            addrs.push(a.ok_or_else(|| {
                rendezvous(format!("rank {k} published a bad address under `{key}`"))
            })?);
        }
        let (next_rank, prev_rank) = ((rank + 1) % w, (rank + w - 1) % w);
        let next_addr = addrs[next_rank];
        let token = store.token().cloned();
        let mut next = connect_next(next_addr, rank, w, token.as_ref(), deadline).map_err(|e| {
            rendezvous(format!("cannot reach rank {next_rank} at {next_addr}: {e}"))
        })?;
        let me = Hello {
            rank,
            prev: prev_rank,
            world: w,
            token: token.clone(),
        };
        let warnings = Arc::new(Warnings::new(format!(
            "llmft rank {rank}, data listener {mine}"
        )));
        let prev = accept_prev(&listener, me, &warnings, deadline)
            .map_err(|e| rendezvous(format!("rank {prev_rank} did not connect to {mine}: {e}")))?;
        warnings.flush();
        match read_ack(&mut next, next_rank, deadline) {
            Ok(ACCEPTED) => {}
            Ok(_) => {
                let by = format!("rank {next_rank}");
                return Err(refused(rank, next_addr.to_string(), token.as_ref(), &by));
            }
            Err(e) => {
                return Err(rendezvous(format!(
                    "rank {next_rank} at {next_addr} did not answer: {e}"
                )))
            }
        }
        let wait = Some(cfg.timeout.max(MIN_WAIT));
        for s in [&next, &prev] {
            let set = s
                .set_read_timeout(wait)
                .and_then(|_| s.set_write_timeout(wait))
                .and_then(|_| s.set_nodelay(true));
            set.map_err(|e| rendezvous(format!("cannot configure the data connections: {e}")))?;
        }
        let group = Self {
            rank,
            world_size: w,
            ring: Some(Mutex::new(Ring {
                rank,
                world: w,
                timeout: cfg.timeout,
                next,
                prev,
                seq: 0,
                call: Call {
                    op: Op::Connect,
                    dtype: None,
                    total: 0,
                },
                next_clean: true,
                prev_clean: AtomicBool::new(true),
                broken: None,
            })),
            _store: Some(store),
        };
        // Nobody leaves (and rank 0 cannot drop the store) before every
        // rank is connected.
        group.run(Op::Connect, |ring| match ring {
            Some(ring) => ring.barrier(Op::Connect),
            None => Ok(()),
        })?;
        Ok(group)
    }

    /// Runs one collective: `None` for a world of one. A failure breaks the
    /// group and is passed along the ring.
    fn run(&self, op: Op, f: impl FnOnce(Option<&mut Ring>) -> Result<()>) -> Result<()> {
        let Some(ring) = &self.ring else {
            return f(None);
        };
        let mut ring: MutexGuard<'_, Ring> = ring.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(reason) = &ring.broken {
            return Err(Error::Broken {
                reason: reason.clone(),
            });
        }
        ring.seq += 1;
        ring.call = Call {
            op,
            dtype: None,
            total: 0,
        };
        let r = f(Some(&mut ring));
        r.map_err(|e| ring.fail(e))
    }
}

/// Connects to the next rank's listener and sends the hello.
fn connect_next(
    addr: SocketAddr,
    rank: usize,
    world: usize,
    token: Option<&JobToken>,
    deadline: Instant,
) -> std::io::Result<TcpStream> {
    let mut s = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&addr, left.clamp(MIN_WAIT, Duration::from_secs(5))) {
            Ok(s) => break s,
            Err(e) if left.is_zero() => return Err(e),
            Err(_) => std::thread::sleep(left.min(Duration::from_millis(20))),
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(MIN_WAIT);
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(left))?;
    let mut hello = HELLO.to_vec();
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    hello.extend_from_slice(&token_frame(token));
    s.write_all(&hello)?;
    Ok(s)
}

/// What a listening rank expects of the hello of the rank before it.
#[derive(Clone)]
struct Hello {
    rank: usize,
    prev: usize,
    world: usize,
    token: Option<JobToken>,
}

/// Accepts the previous rank's connection. Every connection's hello is read
/// on its own thread, so nothing else that connects (a stranger, a
/// half-open socket) can hold up the one that counts; the others are
/// closed and reported.
fn accept_prev(
    listener: &TcpListener,
    me: Hello,
    warnings: &Arc<Warnings>,
    deadline: Instant,
) -> std::io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let (tx, rx) = mpsc::channel();
    let pending = Arc::new(AtomicUsize::new(0));
    loop {
        if let Ok(s) = rx.try_recv() {
            return Ok(s);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match listener.accept() {
            Ok((s, peer)) => {
                let Some(waiting) = Pending::try_new(&pending) else {
                    let why = format!("{MAX_PENDING} connections are already waiting to say hello");
                    warnings.refused(peer, &why);
                    continue;
                };
                let (tx, me, warnings) = (tx.clone(), me.clone(), warnings.clone());
                // A connection that cannot get a thread is dropped with it.
                let _ = std::thread::Builder::new()
                    .name("llmft-pg-hello".into())
                    .spawn(move || {
                        let hello = answer_hello(s, &me);
                        drop(waiting);
                        match hello {
                            Ok(s) => drop(tx.send(s)),
                            Err(why) => warnings.refused(peer, &why),
                        }
                    });
            }
            Err(e) => {
                if left.is_zero() {
                    return Err(std::io::Error::new(ErrorKind::TimedOut, "timed out"));
                }
                // Nothing to accept (or a peer gone before its accept, or
                // no descriptor left): wait for a hello a moment.
                let wait = if e.kind() == ErrorKind::WouldBlock {
                    2
                } else {
                    10
                };
                if let Ok(s) = rx.recv_timeout(left.min(Duration::from_millis(wait))) {
                    return Ok(s);
                }
            }
        }
    }
}

/// Reads and answers one hello: `Ok` with the stream of the previous rank,
/// `Err` with why the connection is refused.
fn answer_hello(mut s: TcpStream, me: &Hello) -> std::result::Result<TcpStream, String> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    s.set_nonblocking(false).map_err(hello_failed)?;
    s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(hello_failed)?;
    let mut h = [0u8; 18];
    read_by(&mut s, &mut h, deadline).map_err(hello_failed)?;
    if &h[..8] != HELLO {
        return Err("sent bytes that are not an llmft rank's hello".into());
    }
    let (r, w) = (le32(&h[8..]) as usize, le32(&h[12..]) as usize);
    let len = u16::from_le_bytes([h[16], h[17]]) as usize;
    if len > MAX_TOKEN {
        return Err(format!(
            "announced a job token of {len} bytes (at most {MAX_TOKEN})"
        ));
    }
    let mut got = vec![0u8; len];
    read_by(&mut s, &mut got, deadline).map_err(hello_failed)?;
    let mut ack = HELLO.to_vec();
    ack.extend_from_slice(&(me.rank as u32).to_le_bytes());
    if let Err(why) = check_token(me.token.as_ref(), &got) {
        ack.push(REFUSED);
        let _ = s.write_all(&ack);
        return Err(why.into());
    }
    if (r, w) != (me.prev, me.world) {
        return Err(format!(
            "said it is rank {r} of {w}, not rank {} of {}",
            me.prev, me.world
        ));
    }
    ack.push(ACCEPTED);
    s.write_all(&ack).map_err(hello_failed)?;
    Ok(s)
}

/// Reads the next rank's answer to our hello: its status.
fn read_ack(s: &mut TcpStream, next: usize, deadline: Instant) -> std::io::Result<u8> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(MIN_WAIT);
    s.set_read_timeout(Some(left))?;
    let mut ack = [0u8; 13];
    s.read_exact(&mut ack)?;
    if &ack[..8] != HELLO || le32(&ack[8..]) as usize != next {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "it is not the expected llmft rank",
        ));
    }
    Ok(ack[12])
}

impl Ring {
    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }
    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// Starts the messages of this collective: what every rank must agree on.
    fn expect(&mut self, dtype: Option<DType>, total: usize) {
        self.call.dtype = dtype;
        self.call.total = total as u64;
    }

    fn io_err(&self, peer: usize, e: std::io::Error) -> Error {
        let op = self.call.op.name();
        match e.kind() {
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected => Error::PeerClosed { op, peer },
            _ if is_timeout(&e) => Error::PeerTimeout {
                op,
                peer,
                timeout: self.timeout,
            },
            _ => Error::Io {
                op,
                peer,
                source: e,
            },
        }
    }

    fn header(&self, kind: u8, len: usize) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[0] = kind;
        h[1] = self.call.op as u8;
        h[2] = dtype_code(self.call.dtype);
        h[8..16].copy_from_slice(&self.seq.to_le_bytes());
        h[16..24].copy_from_slice(&self.call.total.to_le_bytes());
        h[24..32].copy_from_slice(&(len as u64).to_le_bytes());
        h
    }

    /// Sends one data message to the next rank.
    fn send(&self, payload: &[u8]) -> Result<()> {
        let mut s = &self.next;
        s.write_all(&self.header(DATA, payload.len()))
            .and_then(|_| s.write_all(payload))
            .map_err(|e| self.io_err(self.next_rank(), e))
    }

    /// Receives one data message of exactly `buf.len()` bytes from the
    /// previous rank.
    fn recv(&self, buf: &mut [u8]) -> Result<()> {
        let peer = self.prev_rank();
        let op = self.call.op.name();
        let mut s = &self.prev;
        let mut h = [0u8; HEADER];
        self.read_header(&mut h)?;
        let (seq, total, len) = (le64(&h[8..]), le64(&h[16..]), le64(&h[24..]));
        let protocol = |msg: String| Error::Protocol { op, peer, msg };
        match h[0] {
            DATA => {}
            ABORT => return Err(self.read_abort(&h)),
            _ => {
                return Err(protocol(
                    "sent bytes that are not an llmft message header".into(),
                ))
            }
        }
        if h[1] != self.call.op as u8 || seq != self.seq {
            let theirs = Op::ALL
                .iter()
                .find(|o| **o as u8 == h[1])
                .map_or("an unknown collective", |o| o.name());
            return Err(protocol(format!(
                "is in {theirs} #{seq}, this rank in {op} #{} (every rank must call the same \
                 collectives in the same order)",
                self.seq
            )));
        }
        if h[2] != dtype_code(self.call.dtype) {
            return Err(protocol(format!(
                "passed {}, this rank {} (every rank must pass the same dtype)",
                dtype_name(h[2]),
                dtype_name(dtype_code(self.call.dtype))
            )));
        }
        if total != self.call.total || len != buf.len() as u64 {
            return Err(protocol(format!(
                "passed {total} bytes, this rank {} (every rank must pass tensors of the same \
                 size)",
                self.call.total
            )));
        }
        s.read_exact(buf).map_err(|e| {
            self.prev_clean.store(false, Ordering::Relaxed);
            self.io_err(peer, e)
        })
    }

    /// Reads a message header; a timeout with nothing read leaves the
    /// stream clean (see [`Ring::fail`]).
    fn read_header(&self, h: &mut [u8; HEADER]) -> Result<()> {
        let peer = self.prev_rank();
        let mut s = &self.prev;
        let mut got = 0;
        while got < HEADER {
            match s.read(&mut h[got..]) {
                Ok(0) => return Err(self.io_err(peer, ErrorKind::UnexpectedEof.into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    if got > 0 || !is_timeout(&e) {
                        self.prev_clean.store(false, Ordering::Relaxed);
                    }
                    return Err(self.io_err(peer, e));
                }
            }
        }
        Ok(())
    }

    /// The rest of an abort message whose header is `h`.
    fn read_abort(&self, h: &[u8; HEADER]) -> Error {
        let peer = self.prev_rank();
        let len = le64(&h[24..]);
        if !(4..=MAX_REASON as u64).contains(&len) {
            return Error::Protocol {
                op: self.call.op.name(),
                peer,
                msg: "sent a malformed abort message".into(),
            };
        }
        let mut body = vec![0u8; len as usize];
        if let Err(e) = (&self.prev).read_exact(&mut body) {
            return self.io_err(peer, e);
        }
        Error::PeerFailed {
            origin: le32(&body) as usize,
            reason: String::from_utf8_lossy(&body[4..]).into_owned(),
        }
    }

    /// [`Ring::send`], remembering when the stream is left mid-message.
    fn send_tracked(&mut self, payload: &[u8]) -> Result<()> {
        let r = self.send(payload);
        self.next_clean &= r.is_ok();
        r
    }

    /// One ring step: send `out` to the next rank while receiving `into`
    /// from the previous one. A receive error wins: it says more (an abort
    /// carries the first failure).
    fn step(&mut self, out: &[u8], into: &mut [u8]) -> Result<()> {
        let this = &*self;
        let (sent, got) = std::thread::scope(|sc| {
            let sender = std::thread::Builder::new()
                .name("llmft-pg-send".into())
                .spawn_scoped(sc, || this.send(out));
            let sender = match sender {
                Ok(h) => h,
                Err(e) => {
                    let e = Error::Invalid {
                        op: this.call.op.name(),
                        msg: format!("cannot start the sending thread: {e}"),
                    };
                    return (Ok(()), Err(e));
                }
            };
            let got = this.recv(into);
            let sent = sender.join().unwrap_or_else(|_| {
                Err(Error::Invalid {
                    op: this.call.op.name(),
                    msg: "the sending thread panicked".into(),
                })
            });
            (sent, got)
        });
        self.next_clean &= sent.is_ok();
        got.and(sent)
    }

    /// Ring reduce-scatter over `w` chunks of `data` (`range(c)` is chunk
    /// `c`). At step `s` this rank sends chunk `r + shift - s` and adds the
    /// received chunk `r + shift - s - 1` into its own; it ends owning the
    /// sum of chunk `r + shift + 1` (mod w).
    fn reduce(
        &mut self,
        data: &mut [f32],
        range: impl Fn(usize) -> Range<usize>,
        shift: usize,
    ) -> Result<()> {
        let (r, w) = (self.rank, self.world);
        let most = (0..w).map(|c| range(c).len()).max().unwrap_or(0);
        let mut buf = vec![0f32; most];
        for s in 0..w - 1 {
            let (sc, rc) = ((r + shift + w - s) % w, (r + shift + 2 * w - s - 1) % w);
            let got = &mut buf[..range(rc).len()];
            self.step(
                bytemuck::cast_slice(&data[range(sc)]),
                bytemuck::cast_slice_mut(got),
            )?;
            // The partial sum of the ranks before plus this rank's part:
            // one rank computes each chunk's sum, so the order is fixed.
            for (d, x) in data[range(rc)].iter_mut().zip(got.iter()) {
                *d += *x;
            }
        }
        Ok(())
    }

    /// Ring all-gather of `w` chunks of bytes, this rank owning chunk
    /// `r + shift`: at step `s` it sends chunk `r + shift - s` and receives
    /// chunk `r + shift - s - 1` (mod w).
    fn gather(
        &mut self,
        data: &mut [u8],
        range: impl Fn(usize) -> Range<usize>,
        shift: usize,
    ) -> Result<()> {
        let (r, w) = (self.rank, self.world);
        let most = (0..w).map(|c| range(c).len()).max().unwrap_or(0);
        let mut buf = vec![0u8; most];
        for s in 0..w - 1 {
            let (sc, rc) = ((r + shift + w - s) % w, (r + shift + 2 * w - s - 1) % w);
            let got = &mut buf[..range(rc).len()];
            self.step(&data[range(sc)], got)?;
            data[range(rc)].copy_from_slice(got);
        }
        Ok(())
    }

    /// All-reduce of `data` in place: reduce-scatter then all-gather.
    fn all_reduce(&mut self, data: &mut [f32]) -> Result<()> {
        let (w, n) = (self.world, data.len());
        let bound = move |c: usize| c * n / w;
        self.reduce(data, |c| bound(c)..bound(c + 1), 0)?;
        self.gather(
            bytemuck::cast_slice_mut(data),
            |c| 4 * bound(c)..4 * bound(c + 1),
            1,
        )
    }

    /// Returns once every rank has entered: each rank's byte has reached
    /// every other rank.
    fn barrier(&mut self, op: Op) -> Result<()> {
        self.call.op = op;
        self.expect(None, 1);
        let mut bytes = vec![0u8; self.world];
        self.gather(&mut bytes, |c| c..c + 1, 0)
    }

    /// Streams `root`'s bytes along the ring; the rank before the root
    /// does not forward.
    fn broadcast(&mut self, data: &mut [u8], root: usize) -> Result<()> {
        let (r, w) = (self.rank, self.world);
        let last = (root + w - 1) % w;
        let pieces = data.len().div_ceil(SEGMENT).max(1);
        for i in 0..pieces {
            let seg = i * SEGMENT..((i + 1) * SEGMENT).min(data.len());
            if r != root {
                self.recv(&mut data[seg.clone()])?;
            }
            if r != last {
                self.send_tracked(&data[seg])?;
            }
        }
        Ok(())
    }

    /// Marks the group broken, tells the next rank why (unless the stream to
    /// it is mid-message) and closes both connections, so neighbours blocked
    /// on this rank fail at once instead of at their timeout. Returns the
    /// error to report: after a timeout on the previous rank, an abort that
    /// arrives from it moments later says more (it timed out first, on a
    /// rank further up).
    fn fail(&mut self, e: Error) -> Error {
        let (origin, reason) = match &e {
            Error::PeerFailed { origin, reason } => (*origin, reason.clone()),
            e => (self.rank, e.to_string()),
        };
        if self.next_clean {
            let mut body = (origin as u32).to_le_bytes().to_vec();
            let mut cut = reason.len().min(MAX_REASON - 4);
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            body.extend_from_slice(&reason.as_bytes()[..cut]);
            let mut s = &self.next;
            let _ = s.set_write_timeout(Some(ABORT_WAIT));
            let _ = s
                .write_all(&self.header(ABORT, body.len()))
                .and_then(|_| s.write_all(&body));
        }
        let _ = self.next.shutdown(Shutdown::Both);
        let e = match e {
            Error::PeerTimeout { .. } if self.prev_clean.load(Ordering::Relaxed) => {
                let _ = self
                    .prev
                    .set_read_timeout(Some(ABORT_WAIT.min(self.timeout).max(MIN_WAIT)));
                let mut h = [0u8; HEADER];
                match (&self.prev).read_exact(&mut h) {
                    Ok(()) if h[0] == ABORT => match self.read_abort(&h) {
                        up @ Error::PeerFailed { .. } => up,
                        _ => e,
                    },
                    _ => e,
                }
            }
            e => e,
        };
        let _ = self.prev.shutdown(Shutdown::Both);
        self.broken = Some(e.to_string());
        e
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn host(op: Op, what: &'static str, t: &Tensor) -> Result<()> {
    match t.device() {
        Device::Cpu => Ok(()),
        device => Err(Error::NotHost {
            op: op.name(),
            what,
            device,
        }),
    }
}

fn float(op: Op, what: &'static str, t: &Tensor) -> Result<()> {
    crate::group::check_float(op.name(), what, t)
}

/// Checks that `output` has the dtype of `input` and `world` times its
/// elements.
fn scaled(op: Op, input: &Tensor, output: &Tensor, world: usize) -> Result<()> {
    crate::group::check_scaled(op.name(), input, output, world)
}

/// Writes f32 values into a float tensor, rounding to its dtype.
fn put_f32(t: &mut Tensor, v: &[f32]) -> Result<()> {
    fn put<T: Element>(t: &mut Tensor, v: &[f32]) -> Result<()> {
        for (d, x) in t.as_mut_slice::<T>()?.iter_mut().zip(v) {
            *d = T::from_f32(*x);
        }
        Ok(())
    }
    match t.dtype() {
        DType::BF16 => put::<bf16>(t, v),
        DType::F16 => put::<f16>(t, v),
        _ => put::<f32>(t, v),
    }
}

impl ProcessGroup for CpuGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> Backend {
        Backend::Cpu
    }

    fn all_reduce_sum(&self, _ctx: &Ctx, t: &mut Tensor) -> Result<()> {
        let op = Op::AllReduce;
        self.run(op, |ring| {
            host(op, "tensor", t)?;
            float(op, "tensor", t)?;
            let Some(ring) = ring else { return Ok(()) };
            ring.expect(Some(t.dtype()), t.bytes());
            if t.dtype() == DType::F32 {
                ring.all_reduce(t.as_mut_slice::<f32>()?)
            } else {
                let mut v = t.to_f32_vec()?;
                ring.all_reduce(&mut v)?;
                put_f32(t, &v)
            }
        })
    }

    fn all_gather(&self, _ctx: &Ctx, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let op = Op::AllGather;
        self.run(op, |ring| {
            host(op, "input", input)?;
            host(op, "output", output)?;
            scaled(op, input, output, self.world_size)?;
            // A copy first: the input may be a view of the output.
            let mine = input.as_bytes()?.to_vec();
            let nb = mine.len();
            let out = output.as_bytes_mut()?;
            out[self.rank * nb..][..nb].copy_from_slice(&mine);
            let Some(ring) = ring else { return Ok(()) };
            ring.expect(Some(input.dtype()), nb);
            ring.gather(out, |c| c * nb..(c + 1) * nb, 0)
        })
    }

    fn reduce_scatter_sum(&self, _ctx: &Ctx, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let op = Op::ReduceScatter;
        self.run(op, |ring| {
            host(op, "input", input)?;
            host(op, "output", output)?;
            float(op, "input", input)?;
            scaled(op, input, output, self.world_size)?;
            let mut v = input.to_f32_vec()?;
            let n = output.numel();
            if let Some(ring) = ring {
                ring.expect(Some(input.dtype()), input.bytes());
                ring.reduce(&mut v, |c| c * n..(c + 1) * n, self.world_size - 1)?;
            }
            put_f32(output, &v[self.rank * n..][..n])
        })
    }

    fn broadcast(&self, _ctx: &Ctx, t: &mut Tensor, root: usize) -> Result<()> {
        let op = Op::Broadcast;
        self.run(op, |ring| {
            host(op, "tensor", t)?;
            if root >= self.world_size {
                return Err(Error::Invalid {
                    op: op.name(),
                    msg: format!(
                        "root {root} is not a rank of a world of {}",
                        self.world_size
                    ),
                });
            }
            let Some(ring) = ring else { return Ok(()) };
            ring.expect(Some(t.dtype()), t.bytes());
            ring.broadcast(t.as_bytes_mut()?, root)
        })
    }

    fn barrier(&self, _ctx: &Ctx) -> Result<()> {
        self.run(Op::Barrier, |ring| match ring {
            Some(ring) => ring.barrier(Op::Barrier),
            None => Ok(()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ctx: &Ctx, v: &[f32]) -> Tensor {
        Tensor::from_f32(ctx, v, DType::F32, &[v.len()]).unwrap()
    }

    #[test]
    fn the_ring_hello_ignores_strangers_and_checks_the_token() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let token = JobToken::new("ring-secret").unwrap();
        let me = Hello {
            rank: 1,
            prev: 0,
            world: 3,
            token: Some(token.clone()),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let warnings = Arc::new(Warnings::new("test listener".into()));
        let start = Instant::now();
        // Strangers first: silent, slow, garbage, an oversized token, a
        // wrong token, the right token from the wrong rank.
        let mut strangers: Vec<TcpStream> =
            (0..50).map(|_| TcpStream::connect(at).unwrap()).collect();
        let mut slow = TcpStream::connect(at).unwrap();
        slow.write_all(&HELLO[..5]).unwrap();
        strangers.push(slow);
        let mut junk = TcpStream::connect(at).unwrap();
        junk.write_all(&[0xAB; 40]).unwrap();
        strangers.push(junk);
        let mut huge = TcpStream::connect(at).unwrap();
        let mut h = HELLO.to_vec();
        h.extend_from_slice(&[0; 8]);
        h.extend_from_slice(&u16::MAX.to_le_bytes());
        huge.write_all(&h).unwrap();
        strangers.push(huge);
        let wrong = JobToken::new("guess").unwrap();
        let mut refused = connect_next(at, 0, 3, Some(&wrong), deadline).unwrap();
        let mut other_rank = connect_next(at, 2, 3, Some(&token), deadline).unwrap();
        let good = std::thread::spawn(move || {
            let mut s = connect_next(at, 0, 3, Some(&token), deadline).unwrap();
            read_ack(&mut s, 1, deadline).unwrap()
        });
        let prev = accept_prev(&listener, me, &warnings, deadline).unwrap();
        assert_eq!(good.join().unwrap(), ACCEPTED);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(read_ack(&mut refused, 1, deadline).unwrap(), REFUSED);
        assert!(read_ack(&mut other_rank, 1, deadline).is_err());
        drop((prev, strangers));
    }

    #[test]
    fn world_of_one_is_local() {
        let ctx = Ctx::cpu();
        let pg = CpuGroup::connect(&WorldInfo::single(), &GroupConfig::default()).unwrap();
        let mut x = t(&ctx, &[1.0, -2.0]);
        pg.all_reduce_sum(&ctx, &mut x).unwrap();
        assert_eq!(x.to_vec::<f32>().unwrap(), [1.0, -2.0]);
        let mut g = t(&ctx, &[0.0, 0.0]);
        pg.all_gather(&ctx, &x, &mut g).unwrap();
        assert_eq!(g.to_vec::<f32>().unwrap(), [1.0, -2.0]);
        let mut s = t(&ctx, &[0.0, 0.0]);
        pg.reduce_scatter_sum(&ctx, &x, &mut s).unwrap();
        assert_eq!(s.to_vec::<f32>().unwrap(), [1.0, -2.0]);
        pg.broadcast(&ctx, &mut x, 0).unwrap();
        pg.barrier(&ctx).unwrap();
    }

    #[test]
    fn bad_arguments_are_errors_that_name_the_collective() {
        let ctx = Ctx::cpu();
        let pg = CpuGroup::connect(&WorldInfo::single(), &GroupConfig::default()).unwrap();
        let mut ints = Tensor::zeros(&ctx, DType::I32, &[2]).unwrap();
        let e = pg.all_reduce_sum(&ctx, &mut ints).unwrap_err().to_string();
        assert!(e.starts_with("all_reduce: tensor is i32"), "{e}");
        let x = t(&ctx, &[1.0, 2.0]);
        let mut short = t(&ctx, &[0.0]);
        let e = pg.all_gather(&ctx, &x, &mut short).unwrap_err().to_string();
        assert!(e.contains("all_gather: output has 1 elements"), "{e}");
        let mut bf = Tensor::zeros(&ctx, DType::BF16, &[2]).unwrap();
        assert!(pg.reduce_scatter_sum(&ctx, &x, &mut bf).is_err());
        let e = pg.broadcast(&ctx, &mut short, 1).unwrap_err().to_string();
        assert!(e.contains("root 1"), "{e}");
    }
}
