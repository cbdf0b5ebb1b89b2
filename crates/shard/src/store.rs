//! The rendezvous store: a small key/value server in rank 0, over TCP.
//!
//! The idea is torch's `TCPStore`; the wire format is our own. Every message
//! is length-prefixed, integers little-endian:
//!
//! - hello, once per connection: the client sends the 8 bytes `LLMFTKV2`,
//!   `token_len: u16` and the job token (see [`JobToken`]; empty without
//!   one); the server answers `LLMFTKV2, status: u8`, `0` accepted or `1`
//!   refused (a wrong or missing token), and closes a refused connection;
//! - request: `op: u8, key_len: u32, key, value_len: u64, value`, where `op`
//!   is `1` set (value = the bytes), `2` get (value = `wait_ms: u64`; the
//!   server answers when the key exists or the wait is over) or `3` add
//!   (value = `delta: i64`; the key holds an `i64`, missing counts as 0);
//! - reply: `status: u8, len: u64, bytes`, where `status` is `0` ok (bytes =
//!   the value, the new counter for add, nothing for set), `1` timed out
//!   (get only) or `2` bad request (bytes = a message).
//!
//! The server is built to meet strangers: it listens only on the address it
//! is told (see [`StoreOptions::bind`]), serves each connection on its own
//! thread, drops a connection that has not sent a valid hello within
//! [`HANDSHAKE_TIMEOUT`], holds at most [`MAX_PENDING`] connections that
//! have not yet, and closes a connection whose frame is larger than
//! [`MAX_TOKEN`], [`MAX_KEY`] or [`MAX_VALUE`] without allocating it. Each
//! refusal is one line on stderr naming the peer, at most one a second
//! (with a count of the others).
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{secs, Error, Result, WorldInfo};

const HELLO: &[u8; 8] = b"LLMFTKV2";
const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
const OK: u8 = 0;
const TIMED_OUT: u8 = 1;
const BAD: u8 = 2;
/// The hello's answer to a connection with the right token (or any, when
/// the job has none), and to one without.
pub(crate) const ACCEPTED: u8 = 0;
pub(crate) const REFUSED: u8 = 1;
/// The longest key a request may name.
pub const MAX_KEY: usize = 4 << 10;
/// The largest value a request may carry (and a reply return).
pub const MAX_VALUE: u64 = 64 << 20;
/// The longest job token.
pub const MAX_TOKEN: usize = 256;
/// How long a new connection (to the store or to a rank's data listener)
/// may take to send its hello before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many connections may be waiting to send their hello at once; more
/// are closed as they arrive (an honest client retries).
pub const MAX_PENDING: usize = 256;
/// The variable that holds the job token.
pub const JOB_TOKEN_VAR: &str = "LLMFT_JOB_TOKEN";
/// The variable that overrides the address the store listens on.
pub const STORE_BIND_VAR: &str = "LLMFT_STORE_BIND";
/// Extra time a client waits for the answer to a `get` beyond the wait itself.
const REPLY_MARGIN: Duration = Duration::from_secs(10);
/// How often a refusal may be reported on stderr.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// The shared secret of one job: every connection to the store and between
/// ranks presents it in its first frame, and a connection without it is
/// refused. It comes from `LLMFT_JOB_TOKEN` ([`JobToken::from_env`]);
/// `llmft launch` makes one for a single-node job. Without a token (the
/// variable unset or empty) nothing is checked: anyone who can reach the
/// ports can join or disturb the job, which is the user's choice to make.
#[derive(Clone)]
pub struct JobToken(Vec<u8>);

impl std::fmt::Debug for JobToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A secret: its length only.
        write!(f, "JobToken({} bytes)", self.0.len())
    }
}

impl JobToken {
    /// A token of 1 to [`MAX_TOKEN`] bytes.
    pub fn new(token: &str) -> Result<Self> {
        if token.is_empty() || token.len() > MAX_TOKEN {
            return Err(Error::BadVar {
                var: JOB_TOKEN_VAR,
                value: format!("<{} bytes>", token.len()),
                why: "a job token has 1 to 256 bytes",
            });
        }
        Ok(Self(token.as_bytes().to_vec()))
    }

    /// `LLMFT_JOB_TOKEN`, `None` when unset or empty.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`JobToken::from_env`] through `get`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        match get(JOB_TOKEN_VAR) {
            Some(t) if !t.is_empty() => Self::new(&t).map(Some),
            _ => Ok(None),
        }
    }

    /// Whether `got` is this token, in time that does not depend on where
    /// they differ.
    pub(crate) fn matches(&self, got: &[u8]) -> bool {
        let mut diff = u8::from(self.0.len() != got.len());
        for (i, w) in self.0.iter().enumerate() {
            diff |= w ^ got.get(i).copied().unwrap_or(!w);
        }
        std::hint::black_box(diff) == 0
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Checks a presented token against the job's: `Err` says why it is refused.
pub(crate) fn check_token(
    want: Option<&JobToken>,
    got: &[u8],
) -> std::result::Result<(), &'static str> {
    match want {
        None => Ok(()),
        Some(_) if got.is_empty() => Err("presented no job token"),
        Some(t) if t.matches(got) => Ok(()),
        Some(_) => Err("presented a wrong job token"),
    }
}

/// The hello frame's token part: `token_len: u16, token`.
pub(crate) fn token_frame(token: Option<&JobToken>) -> Vec<u8> {
    let t = token.map_or(&[][..], JobToken::bytes);
    let mut v = (t.len() as u16).to_le_bytes().to_vec();
    v.extend_from_slice(t);
    v
}

/// The error of a rank whose hello was refused.
pub(crate) fn refused(rank: usize, addr: String, token: Option<&JobToken>, by: &str) -> Error {
    let what = match token {
        None => format!(
            "{by} requires a job token and this rank has none (set {JOB_TOKEN_VAR} to the same \
             value for every rank)"
        ),
        Some(_) => format!(
            "{by} refused this rank's job token ({JOB_TOKEN_VAR} must be the same for every rank)"
        ),
    };
    Error::Refused { rank, addr, what }
}

/// How the store is reached and guarded.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// The job's token; `None` checks nothing.
    pub token: Option<JobToken>,
    /// Where rank 0 listens. By default the address `MASTER_ADDR` names: an
    /// IP as given; a name, the first address it resolves to here that can
    /// be bound, preferring non-loopback ones. A name other than
    /// `localhost` that resolves only to loopback here (a Debian-style
    /// `127.0.1.1 node0` line) may name a real address on the other nodes,
    /// so then the store listens on every interface and says so on stderr.
    /// `0.0.0.0` or `::` asks for every interface.
    pub bind: Option<IpAddr>,
}

impl StoreOptions {
    /// `LLMFT_JOB_TOKEN` and `LLMFT_STORE_BIND` (an IP) from the process
    /// environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`StoreOptions::from_env`] through `get`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let bind = match get(STORE_BIND_VAR) {
            Some(v) if !v.trim().is_empty() => {
                Some(v.trim().parse::<IpAddr>().map_err(|_| Error::BadVar {
                    var: STORE_BIND_VAR,
                    value: v.clone(),
                    why: "not an IP address (0.0.0.0 or :: for every interface)",
                })?)
            }
            _ => None,
        };
        Ok(Self {
            token: JobToken::from_vars(&get)?,
            bind,
        })
    }
}

/// A client of the rendezvous store; in rank 0 it also owns the server.
///
/// ```no_run
/// # fn main() -> llmft_shard::Result<()> {
/// let world = llmft_shard::WorldInfo::from_env()?;
/// let mut store = llmft_shard::TcpStore::connect(&world, std::time::Duration::from_secs(30))?;
/// store.set(&format!("host/{}", world.rank), "node7")?;
/// let first = store.get("host/0")?; // waits until rank 0 has set it
/// store.barrier()?;
/// # let _ = first; Ok(()) }
/// ```
pub struct TcpStore {
    addr: String,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    token: Option<JobToken>,
    conn: TcpStream,
    barriers: u64,
    server: Option<Server>,
}

impl std::fmt::Debug for TcpStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TcpStore({}, rank {} of {})",
            self.addr, self.rank, self.world_size
        )
    }
}

impl TcpStore {
    /// [`TcpStore::connect_with`] the [`StoreOptions::from_env`].
    pub fn connect(world: &WorldInfo, timeout: Duration) -> Result<Self> {
        Self::connect_with(world, timeout, &StoreOptions::from_env()?)
    }

    /// Joins the store at `world.master_addr:world.master_port`; rank 0
    /// first starts serving it there (see [`StoreOptions::bind`]).
    /// Connecting retries until `timeout`, except that a refused token is
    /// an error at once; `timeout` is also how long [`TcpStore::get`] and
    /// [`TcpStore::barrier`] wait.
    pub fn connect_with(world: &WorldInfo, timeout: Duration, opts: &StoreOptions) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let addr = format!("{}:{}", world.master_addr, world.master_port);
        let server = if world.rank == 0 {
            Some(Server::start(world, &addr, opts)?)
        } else {
            None
        };
        let token = opts.token.as_ref();
        let conn = loop {
            let last = match try_connect(world, token, deadline) {
                Ok(c) => break c,
                Err(Attempt::Refused) => {
                    return Err(refused(world.rank, addr, token, "rank 0's store"))
                }
                Err(Attempt::Failed(e)) => e,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Rendezvous {
                    rank: world.rank,
                    addr,
                    what: format!("rank 0's store did not answer (last error: {last})"),
                    timeout,
                });
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
        };
        Ok(Self {
            addr,
            rank: world.rank,
            world_size: world.world_size,
            timeout,
            token: opts.token.clone(),
            conn,
            barriers: 0,
            server,
        })
    }

    /// The store's address, `MASTER_ADDR:MASTER_PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The job token this client presented (the ranks' data connections
    /// present it too).
    pub(crate) fn token(&self) -> Option<&JobToken> {
        self.token.as_ref()
    }

    /// The address rank 0's server listens on (`None` in other ranks).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(|s| s.bound)
    }

    /// The local address of this rank's connection to the store: the
    /// interface through which this host reaches rank 0.
    pub fn local_ip(&self) -> Result<IpAddr> {
        self.conn
            .local_addr()
            .map(|a| a.ip())
            .map_err(|e| self.io_error(e))
    }
    /// Sets `key` to `value` (replacing any earlier value).
    pub fn set_bytes(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.request(OP_SET, key, value, self.timeout).map(drop)
    }

    /// The value of `key`, waiting up to the store's timeout for some rank
    /// to set it.
    pub fn get_bytes(&mut self, key: &str) -> Result<Vec<u8>> {
        self.get_within(key, self.timeout)
    }

    /// [`TcpStore::set_bytes`] for text.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        self.set_bytes(key, value.as_bytes())
    }

    /// [`TcpStore::get_bytes`] for text.
    pub fn get(&mut self, key: &str) -> Result<String> {
        let v = self.get_bytes(key)?;
        String::from_utf8(v).map_err(|_| Error::Store {
            addr: self.addr.clone(),
            msg: format!("key `{key}` does not hold UTF-8 text"),
        })
    }

    /// Waits (up to the store's timeout in all) until every key is set.
    pub fn wait(&mut self, keys: &[&str]) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        for key in keys {
            let left = deadline.saturating_duration_since(Instant::now());
            self.get_within(key, left).map_err(|e| match e {
                Error::StoreTimeout { addr, key, .. } => Error::StoreTimeout {
                    addr,
                    key,
                    timeout: self.timeout,
                },
                e => e,
            })?;
        }
        Ok(())
    }

    /// Adds `delta` to the counter `key` (missing counts as 0) and returns
    /// the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        let v = self.request(OP_ADD, key, &delta.to_le_bytes(), self.timeout)?;
        let bytes: [u8; 8] = v.as_slice().try_into().map_err(|_| Error::Store {
            addr: self.addr.clone(),
            msg: format!("add on `{key}` answered {} bytes, not 8", v.len()),
        })?;
        Ok(i64::from_le_bytes(bytes))
    }

    /// Returns once every rank of the world has called `barrier` as many
    /// times as this one, or fails after the store's timeout saying how many
    /// arrived.
    pub fn barrier(&mut self) -> Result<()> {
        let key = format!("barrier/{}", self.barriers);
        self.barriers += 1;
        let arrived = self.add(&key, 1)?;
        if arrived == self.world_size as i64 {
            self.set_bytes(&format!("{key}/done"), &[])?;
        }
        match self.get_bytes(&format!("{key}/done")) {
            Err(Error::StoreTimeout { .. }) => {
                let arrived = self.add(&key, 0)?;
                Err(Error::Store {
                    addr: self.addr.clone(),
                    msg: format!(
                        "{key}: {arrived} of {} ranks arrived within {} s",
                        self.world_size,
                        secs(&self.timeout)
                    ),
                })
            }
            r => r.map(drop),
        }
    }

    /// [`TcpStore::get_bytes`] with its own wait.
    pub(crate) fn get_within(&mut self, key: &str, wait: Duration) -> Result<Vec<u8>> {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        match self.request(OP_GET, key, &ms.to_le_bytes(), wait + REPLY_MARGIN) {
            Err(Error::StoreTimeout { addr, key, .. }) => Err(Error::StoreTimeout {
                addr,
                key,
                timeout: wait,
            }),
            r => r,
        }
    }

    fn io_error(&self, e: std::io::Error) -> Error {
        let msg = match e.kind() {
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe => "rank 0 closed the connection".to_string(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut => "no answer in time".to_string(),
            _ => e.to_string(),
        };
        Error::Store {
            addr: self.addr.clone(),
            msg,
        }
    }

    fn request(&mut self, op: u8, key: &str, value: &[u8], wait: Duration) -> Result<Vec<u8>> {
        let too_long = |what: &str, len: usize, max: u64| Error::Store {
            addr: self.addr.clone(),
            msg: format!("{what} of {len} bytes is longer than the store takes ({max})"),
        };
        if key.len() > MAX_KEY {
            return Err(too_long("key", key.len(), MAX_KEY as u64));
        }
        if value.len() as u64 > MAX_VALUE {
            return Err(too_long("value", value.len(), MAX_VALUE));
        }
        let mut msg = Vec::with_capacity(13 + key.len() + value.len());
        msg.push(op);
        msg.extend_from_slice(&(key.len() as u32).to_le_bytes());
        msg.extend_from_slice(key.as_bytes());
        msg.extend_from_slice(&(value.len() as u64).to_le_bytes());
        msg.extend_from_slice(value);
        let reply = (|| {
            self.conn
                .set_write_timeout(Some(self.timeout.max(MIN_WAIT)))?;
            self.conn.set_read_timeout(Some(wait.max(MIN_WAIT)))?;
            self.conn.write_all(&msg)?;
            let mut head = [0u8; 9];
            self.conn.read_exact(&mut head)?;
            let len = u64::from_le_bytes(head[1..9].try_into().unwrap_or_default());
            if len > MAX_VALUE {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("the store answered a value of {len} bytes"),
                ));
            }
            Ok((head[0], read_body(&mut self.conn, len)?))
        })();
        let (status, body) = reply.map_err(|e| self.io_error(e))?;
        match status {
            OK => Ok(body),
            TIMED_OUT => Err(Error::StoreTimeout {
                addr: self.addr.clone(),
                key: key.to_string(),
                timeout: wait,
            }),
            _ => Err(Error::Store {
                addr: self.addr.clone(),
                msg: String::from_utf8_lossy(&body).into_owned(),
            }),
        }
    }
}

/// The longest wait a `get` may ask for (30 days).
const LONGEST_GET_MS: u64 = 30 * 24 * 3600 * 1000;

/// Socket timeouts must not be zero (zero means "block forever" to the OS).
const MIN_WAIT: Duration = Duration::from_millis(1);

/// Reads `len` bytes (bounded by the caller), growing the buffer as they
/// arrive rather than trusting the length up front.
fn read_body(c: &mut impl Read, len: u64) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    c.take(len).read_to_end(&mut body)?;
    if (body.len() as u64) < len {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    Ok(body)
}

/// Fills `buf` from `c` by `deadline`, however the bytes trickle in.
pub(crate) fn read_by(c: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        c.set_read_timeout(Some(left.max(MIN_WAIT)))?;
        match c.read(&mut buf[got..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why a hello failed: a refused token ends the rendezvous, anything else
/// is retried.
enum Attempt {
    Refused,
    Failed(String),
}

/// One attempt to reach the store and exchange the hello.
fn try_connect(
    world: &WorldInfo,
    token: Option<&JobToken>,
    deadline: Instant,
) -> std::result::Result<TcpStream, Attempt> {
    let addrs: Vec<SocketAddr> = (world.master_addr.as_str(), world.master_port)
        .to_socket_addrs()
        .map_err(|e| Attempt::Failed(format!("cannot resolve {}: {e}", world.master_addr)))?
        .collect();
    let mut last = format!("{} resolves to no address", world.master_addr);
    for a in addrs {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(MIN_WAIT);
        let attempt = (|| {
            let mut s = TcpStream::connect_timeout(&a, left.min(Duration::from_secs(5)))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(left))?;
            s.set_write_timeout(Some(left))?;
            let mut hello = HELLO.to_vec();
            hello.extend_from_slice(&token_frame(token));
            s.write_all(&hello)?;
            let mut back = [0u8; 9];
            s.read_exact(&mut back)?;
            if &back[..8] != HELLO {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    "something else than an llmft store of this version listens there",
                ));
            }
            Ok((s, back[8]))
        })();
        match attempt {
            Ok((s, ACCEPTED)) => return Ok(s),
            Ok(_) => return Err(Attempt::Refused),
            Err(e) => last = e.to_string(),
        }
    }
    Err(Attempt::Failed(last))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Refusals reported on stderr, at most one line a second; the others are
/// counted into the next line (or the last, [`Warnings::flush`]).
pub(crate) struct Warnings {
    who: String,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Warnings {
    pub(crate) fn new(who: String) -> Self {
        Self {
            who,
            state: Mutex::new((None, 0)),
        }
    }

    pub(crate) fn refused(&self, peer: SocketAddr, why: &str) {
        let mut st = lock(&self.state);
        let now = Instant::now();
        if st.0.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            st.1 += 1;
            return;
        }
        let more = match std::mem::take(&mut st.1) {
            0 => String::new(),
            n => format!(" ({n} more refused since the last warning)"),
        };
        st.0 = Some(now);
        eprintln!(
            "{}: refused a connection from {peer}: {why}{more}",
            self.who
        );
    }

    /// Reports the refusals not yet reported.
    pub(crate) fn flush(&self) {
        let n = std::mem::take(&mut lock(&self.state).1);
        if n > 0 {
            eprintln!("{}: refused {n} more connections", self.who);
        }
    }
}

/// Counts a connection as waiting for its hello while it lives.
pub(crate) struct Pending(Arc<AtomicUsize>);

impl Pending {
    /// `None` when [`MAX_PENDING`] connections are waiting already.
    pub(crate) fn try_new(count: &Arc<AtomicUsize>) -> Option<Self> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_PENDING).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// State shared by the server's threads.
struct Shared {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
    stop: AtomicBool,
    token: Option<JobToken>,
    pending: Arc<AtomicUsize>,
    warnings: Warnings,
    /// Every open connection (a clone, to shut it down with the server).
    conns: Mutex<HashMap<u64, TcpStream>>,
}

/// The store server of rank 0: an accept thread and a thread per client.
struct Server {
    shared: Arc<Shared>,
    bound: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

/// Where rank 0 listens (see [`StoreOptions::bind`]): the candidates in
/// order, and a note for stderr when it falls back to every interface.
fn bind_candidates(
    world: &WorldInfo,
    opts: &StoreOptions,
) -> std::io::Result<(Vec<SocketAddr>, Option<String>)> {
    let port = world.master_port;
    if let Some(ip) = opts.bind {
        return Ok((vec![SocketAddr::new(ip, port)], None));
    }
    let name = world.master_addr.trim();
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok((vec![SocketAddr::new(ip, port)], None));
    }
    let mut addrs: Vec<SocketAddr> = (name, port).to_socket_addrs()?.collect();
    // A name that resolves only to loopback here may be a real address
    // elsewhere; `localhost` is loopback everywhere.
    if !addrs.is_empty()
        && addrs.iter().all(|a| a.ip().is_loopback())
        && !name.eq_ignore_ascii_case("localhost")
    {
        let any: IpAddr = match addrs[0] {
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        };
        let note = format!(
            "llmft store: MASTER_ADDR={name} resolves only to loopback ({}) on rank 0's host, \
             which other hosts cannot reach; listening on every interface (set MASTER_ADDR to \
             an IP, or {STORE_BIND_VAR}, to choose)",
            addrs[0].ip()
        );
        return Ok((vec![SocketAddr::new(any, port)], Some(note)));
    }
    addrs.sort_by_key(|a| a.ip().is_loopback());
    Ok((addrs, None))
}

impl Server {
    fn start(world: &WorldInfo, addr: &str, opts: &StoreOptions) -> Result<Self> {
        let listen_err = |what: String, source| Error::Listen {
            rank: 0,
            addr: what,
            purpose: "rendezvous store",
            source,
        };
        let (candidates, note) =
            bind_candidates(world, opts).map_err(|e| listen_err(addr.to_string(), e))?;
        let mut last = None;
        let mut listener = None;
        for a in candidates {
            match TcpListener::bind(a) {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(e) => last = Some((a, e)),
            }
        }
        let listener = match (listener, last) {
            (Some(l), _) => l,
            (None, Some((a, e))) => return Err(listen_err(a.to_string(), e)),
            (None, None) => {
                let e = std::io::Error::new(ErrorKind::NotFound, "it resolves to no address");
                return Err(listen_err(addr.to_string(), e));
            }
        };
        let bound = listener
            .local_addr()
            .map_err(|e| listen_err(addr.to_string(), e))?;
        deepen_backlog(&listener);
        if let Some(note) = note {
            eprintln!("{note}");
        }
        let shared = Arc::new(Shared {
            map: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            token: opts.token.clone(),
            pending: Arc::new(AtomicUsize::new(0)),
            warnings: Warnings::new(format!("llmft store on {bound} (rank 0)")),
            conns: Mutex::new(HashMap::new()),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("llmft-store".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| listen_err(bound.to_string(), e))?;
        Ok(Self {
            shared,
            bound,
            accept: Some(accept),
        })
    }
}

/// Lets the kernel queue as many connections as it allows (std's 128 fill
/// up under a flood, and then a rank's connect waits a second per SYN it
/// resends). Calling `listen` again on a listening socket only changes its
/// backlog; failing, the socket keeps the old one.
fn deepen_backlog(listener: &TcpListener) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is a listening socket that `listener` owns for
    // the whole call; `listen` reads no memory of ours.
    unsafe {
        libc::listen(listener.as_raw_fd(), 4096);
    }
}

/// How long rank 0's store, when it closes, waits for the other ranks'
/// connections to end first: a rank may still be reading the reply to its
/// last request (the end of a barrier) when rank 0 is done.
const LINGER: Duration = Duration::from_secs(5);

impl Drop for Server {
    fn drop(&mut self) {
        // Connections past their hello (ranks, the owner's own client) end
        // when their processes are done with the store; strangers still in
        // their hello do not hold the server open.
        let deadline = Instant::now() + LINGER;
        while Instant::now() < deadline {
            let open = lock(&self.shared.conns).len();
            if open <= self.shared.pending.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // Unblock the accept call; it sees `stop` and returns.
        let wake = match self.bound.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(ip) if ip.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        let _ = TcpStream::connect_timeout(
            &SocketAddr::new(wake, self.bound.port()),
            Duration::from_secs(1),
        );
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for (_, c) in lock(&self.shared.conns).drain() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        self.shared.warnings.flush();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else {
            // Out of descriptors, or a peer gone before its accept: not a
            // reason to spin.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let Ok(peer) = conn.peer_addr() else { continue };
        let Some(pending) = Pending::try_new(&shared.pending) else {
            shared.warnings.refused(
                peer,
                &format!("{MAX_PENDING} connections are already waiting to say hello"),
            );
            continue;
        };
        let Ok(clone) = conn.try_clone() else {
            continue;
        };
        let id = next_id;
        next_id += 1;
        lock(&shared.conns).insert(id, clone);
        let s = shared.clone();
        // A client that cannot get a thread is dropped; it sees EOF.
        let spawned = std::thread::Builder::new()
            .name("llmft-store-client".into())
            .spawn(move || {
                serve(conn, peer, pending, &s);
                lock(&s.conns).remove(&id);
            });
        if spawned.is_err() {
            lock(&shared.conns).remove(&id);
        }
    }
}

/// Why reading a hello failed, for the refusal line.
pub(crate) fn hello_failed(e: std::io::Error) -> String {
    match e.kind() {
        ErrorKind::UnexpectedEof => "closed before finishing its hello".into(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
            "sent no complete hello within {} s",
            secs(&HANDSHAKE_TIMEOUT)
        ),
        _ => format!("failed during its hello: {e}"),
    }
}

/// Reads and checks a client's hello by the handshake deadline; `Err` says
/// why the connection is refused (`true`: tell the client so).
fn handshake(
    c: &mut TcpStream,
    token: Option<&JobToken>,
) -> std::result::Result<(), (String, bool)> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let io = |e| (hello_failed(e), false);
    let mut head = [0u8; 10];
    read_by(c, &mut head, deadline).map_err(io)?;
    if &head[..8] != HELLO {
        return Err(("sent bytes that are not an llmft store hello".into(), false));
    }
    let len = u16::from_le_bytes([head[8], head[9]]) as usize;
    if len > MAX_TOKEN {
        let why = format!("announced a job token of {len} bytes (at most {MAX_TOKEN})");
        return Err((why, false));
    }
    let mut got = vec![0u8; len];
    read_by(c, &mut got, deadline).map_err(io)?;
    check_token(token, &got).map_err(|why| (why.to_string(), true))
}

/// Answers one client until it hangs up (or breaks the protocol).
fn serve(mut c: TcpStream, peer: SocketAddr, pending: Pending, shared: &Shared) {
    let _ = c.set_nodelay(true);
    let _ = c.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    let hello = handshake(&mut c, shared.token.as_ref());
    drop(pending);
    if let Err((why, tell)) = hello {
        if tell {
            let mut no = HELLO.to_vec();
            no.push(REFUSED);
            let _ = c.write_all(&no);
        }
        shared.warnings.refused(peer, &why);
        return;
    }
    let mut yes = HELLO.to_vec();
    yes.push(ACCEPTED);
    // An accepted client waits as long as the job lives.
    let ready = c
        .write_all(&yes)
        .and_then(|_| c.set_read_timeout(None))
        .and_then(|_| c.set_write_timeout(None));
    if ready.is_err() {
        return;
    }
    match requests(&mut c, shared) {
        Err(Violation(why)) if !why.is_empty() => shared.warnings.refused(peer, &why),
        _ => {}
    }
}

/// A client broke the protocol: the connection is closed and this reported.
struct Violation(String);

impl From<std::io::Error> for Violation {
    fn from(_: std::io::Error) -> Self {
        // A socket error ends the connection quietly (a rank exited).
        Violation(String::new())
    }
}

/// Answers requests until the client hangs up (`Ok`, or `Err` with an empty
/// reason for a socket error) or breaks the protocol.
fn requests(c: &mut TcpStream, shared: &Shared) -> std::result::Result<(), Violation> {
    let bad = |c: &mut TcpStream, why: String| {
        let _ = reply(c, BAD, why.as_bytes());
        Err(Violation(why))
    };
    loop {
        let mut head = [0u8; 5];
        match c.read_exact(&mut head) {
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            r => r?,
        }
        let key_len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if key_len > MAX_KEY {
            return bad(
                c,
                format!("sent a key of {key_len} bytes (at most {MAX_KEY})"),
            );
        }
        let key = read_body(c, key_len as u64)?;
        let mut len = [0u8; 8];
        c.read_exact(&mut len)?;
        let len = u64::from_le_bytes(len);
        if len > MAX_VALUE {
            return bad(
                c,
                format!("sent a value of {len} bytes (at most {MAX_VALUE})"),
            );
        }
        let value = read_body(c, len)?;
        let Ok(key) = String::from_utf8(key) else {
            return bad(c, "sent a key that is not UTF-8".into());
        };
        let num = |v: &[u8]| <[u8; 8]>::try_from(v).ok();
        match head[0] {
            OP_SET => {
                lock(&shared.map).insert(key, value);
                shared.changed.notify_all();
                reply(c, OK, &[])?;
            }
            OP_ADD => {
                let Some(delta) = num(&value).map(i64::from_le_bytes) else {
                    return bad(c, "sent an add without an 8-byte delta".into());
                };
                let mut map = lock(&shared.map);
                let old = map
                    .get(&key)
                    .and_then(|v| num(v))
                    .map_or(0, i64::from_le_bytes);
                let new = old.wrapping_add(delta);
                map.insert(key, new.to_le_bytes().to_vec());
                drop(map);
                shared.changed.notify_all();
                reply(c, OK, &new.to_le_bytes())?;
            }
            OP_GET => {
                let Some(ms) = num(&value).map(u64::from_le_bytes) else {
                    return bad(c, "sent a get without an 8-byte wait".into());
                };
                // Capped: an absurd wait must not overflow the clock.
                let deadline = Instant::now() + Duration::from_millis(ms.min(LONGEST_GET_MS));
                let mut map = lock(&shared.map);
                let found = loop {
                    if let Some(v) = map.get(&key) {
                        break Some(v.clone());
                    }
                    let now = Instant::now();
                    if now >= deadline || shared.stop.load(Ordering::SeqCst) {
                        break None;
                    }
                    map = shared
                        .changed
                        .wait_timeout(map, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                };
                drop(map);
                match found {
                    Some(v) => reply(c, OK, &v)?,
                    None => reply(c, TIMED_OUT, &[])?,
                }
            }
            op => return bad(c, format!("sent an unknown request (op {op})")),
        }
    }
}

fn reply(c: &mut TcpStream, status: u8, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(9 + body.len());
    msg.push(status);
    msg.extend_from_slice(&(body.len() as u64).to_le_bytes());
    msg.extend_from_slice(body);
    c.write_all(&msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn world(rank: usize, world_size: usize, port: u16) -> WorldInfo {
        WorldInfo {
            rank,
            world_size,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    /// Without the process environment: these tests run side by side.
    fn connect(world: &WorldInfo, t: Duration) -> Result<TcpStore> {
        TcpStore::connect_with(world, t, &StoreOptions::default())
    }

    fn with_token(token: Option<&str>) -> StoreOptions {
        StoreOptions {
            token: token.map(|t| JobToken::new(t).unwrap()),
            bind: None,
        }
    }

    /// A raw client: the hello with `token`, and the server's answer.
    fn hello(port: u16, token: &[u8]) -> (TcpStream, Option<[u8; 9]>) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut h = HELLO.to_vec();
        h.extend_from_slice(&(token.len() as u16).to_le_bytes());
        h.extend_from_slice(token);
        s.write_all(&h).unwrap();
        let mut back = [0u8; 9];
        let answer = s.read_exact(&mut back).ok().map(|_| back);
        (s, answer)
    }

    /// Whether the server closed `s` (EOF, or a reset) after any reply.
    fn closed(s: &mut TcpStream) -> bool {
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
        }
    }

    #[test]
    fn set_get_add_wait_barrier_across_clients() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let mut s0 = connect(&world(0, 3, port), t).unwrap();
        let others: Vec<_> = (1..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let mut s = connect(&world(r, 3, port), t).unwrap();
                    s.set(&format!("k{r}"), &format!("v{r}")).unwrap();
                    let n = s.add("count", 5).unwrap();
                    assert!(n == 5 || n == 10, "{n}");
                    assert_eq!(s.get("k0").unwrap(), "v0");
                    s.barrier().unwrap();
                    s.barrier().unwrap();
                })
            })
            .collect();
        s0.set_bytes("k0", b"v0").unwrap();
        s0.wait(&["k1", "k2"]).unwrap();
        assert_eq!(s0.get_bytes("k2").unwrap(), b"v2");
        s0.barrier().unwrap();
        assert_eq!(s0.add("count", 0).unwrap(), 10);
        s0.barrier().unwrap();
        for h in others {
            h.join().unwrap();
        }
        // A value that is set twice holds the second.
        s0.set("k0", "again").unwrap();
        assert_eq!(s0.get("k0").unwrap(), "again");
    }

    #[test]
    fn missing_key_and_missing_server_time_out_with_names() {
        let port = free_port();
        let mut s0 = connect(&world(0, 2, port), Duration::from_millis(300)).unwrap();
        let e = s0.get("nobody").unwrap_err().to_string();
        assert!(e.contains("`nobody`") && e.contains("0.3 s"), "{e}");
        let e = s0.barrier().unwrap_err().to_string();
        assert!(e.contains("1 of 2 ranks arrived"), "{e}");

        let port = free_port();
        let start = Instant::now();
        let e = connect(&world(1, 2, port), Duration::from_millis(400))
            .unwrap_err()
            .to_string();
        assert!(start.elapsed() < Duration::from_secs(3));
        assert!(
            e.starts_with(&format!(
                "rank 1: no rendezvous at 127.0.0.1:{port} within 0.4 s"
            )),
            "{e}"
        );
    }

    #[test]
    fn clients_see_the_server_go_away() {
        let port = free_port();
        let t = Duration::from_secs(5);
        let s0 = connect(&world(0, 2, port), t).unwrap();
        let mut s1 = connect(&world(1, 2, port), t).unwrap();
        drop(s0);
        let e = s1.get("x").unwrap_err().to_string();
        assert!(e.contains("closed the connection"), "{e}");
    }

    #[test]
    fn the_server_listens_on_the_master_address_only_unless_asked() {
        let t = Duration::from_secs(5);
        // Linux answers all of 127/8 on loopback: 127.0.0.2 reaches a
        // server on every interface, not one on 127.0.0.1.
        let other = |port| TcpStream::connect_timeout(&([127, 0, 0, 2], port).into(), t);
        let port = free_port();
        let s0 = connect(&world(0, 1, port), t).unwrap();
        assert_eq!(s0.listen_addr(), Some(([127, 0, 0, 1], port).into()));
        assert!(other(port).is_err());
        drop(s0);

        let port = free_port();
        let every = StoreOptions {
            bind: Some(Ipv4Addr::UNSPECIFIED.into()),
            ..StoreOptions::default()
        };
        let s0 = TcpStore::connect_with(&world(0, 1, port), t, &every).unwrap();
        assert_eq!(s0.listen_addr(), Some(([0, 0, 0, 0], port).into()));
        assert!(other(port).is_ok());
        drop(s0);

        let port = free_port();
        let local = WorldInfo {
            master_addr: "localhost".into(),
            ..world(0, 1, port)
        };
        let s0 = connect(&local, t).unwrap();
        assert!(s0.listen_addr().unwrap().ip().is_loopback(), "{s0:?}");
        // Not rank 0: no server.
        assert_eq!(connect(&world(1, 2, port), t).unwrap().listen_addr(), None);
    }

    #[test]
    fn options_from_variables() {
        let get = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string())
        };
        let o = StoreOptions::from_vars(get(&[])).unwrap();
        assert!(o.token.is_none() && o.bind.is_none());
        let o =
            StoreOptions::from_vars(get(&[(JOB_TOKEN_VAR, ""), (STORE_BIND_VAR, " ")])).unwrap();
        assert!(o.token.is_none() && o.bind.is_none());
        let o = StoreOptions::from_vars(get(&[(JOB_TOKEN_VAR, "abc"), (STORE_BIND_VAR, "::")]))
            .unwrap();
        assert!(o.token.unwrap().matches(b"abc"));
        assert_eq!(o.bind, Some(Ipv6Addr::UNSPECIFIED.into()));
        let e = StoreOptions::from_vars(get(&[(STORE_BIND_VAR, "eth0")])).unwrap_err();
        assert!(e.to_string().contains("LLMFT_STORE_BIND"), "{e}");
        assert!(JobToken::new(&"x".repeat(MAX_TOKEN)).is_ok());
        let e = JobToken::new(&"x".repeat(MAX_TOKEN + 1)).unwrap_err();
        // The message does not repeat the secret.
        assert!(!e.to_string().contains("xxx"), "{e}");
        assert_eq!(
            format!("{:?}", JobToken::new("hush").unwrap()),
            "JobToken(4 bytes)"
        );
    }

    #[test]
    fn tokens_match_only_exactly() {
        let t = JobToken::new("0123456789abcdef").unwrap();
        assert!(t.matches(b"0123456789abcdef"));
        for other in [
            &b""[..],
            b"0123456789abcdeF",
            b"0123456789abcde",
            b"0123456789abcdef0",
        ] {
            assert!(!t.matches(other), "{other:?}");
        }
        assert_eq!(check_token(None, b""), Ok(()));
        assert_eq!(check_token(None, b"any"), Ok(()));
        assert_eq!(check_token(Some(&t), b""), Err("presented no job token"));
        assert_eq!(
            check_token(Some(&t), b"x"),
            Err("presented a wrong job token")
        );
    }

    #[test]
    fn a_wrong_or_missing_token_is_refused_at_once() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let _s0 =
            TcpStore::connect_with(&world(0, 2, port), t, &with_token(Some("right"))).unwrap();
        let mut s1 =
            TcpStore::connect_with(&world(1, 2, port), t, &with_token(Some("right"))).unwrap();
        s1.set("k", "v").unwrap();
        let start = Instant::now();
        let e = TcpStore::connect_with(&world(1, 2, port), t, &with_token(Some("wrong")))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "rank 1: 127.0.0.1:{port} refused this rank: rank 0's store refused this rank's \
                 job token (LLMFT_JOB_TOKEN must be the same for every rank)"
            )
        );
        let e = TcpStore::connect_with(&world(1, 2, port), t, &with_token(None))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("requires a job token and this rank has none"),
            "{e}"
        );
        assert!(start.elapsed() < Duration::from_secs(2));
        // On the wire: the refusal, then the close.
        let (mut s, answer) = hello(port, b"wrong");
        assert_eq!(answer.map(|a| a[8]), Some(REFUSED));
        assert!(closed(&mut s));
        assert_eq!(s1.get("k").unwrap(), "v");

        // A store without a token takes any.
        let port = free_port();
        let _s0 = TcpStore::connect_with(&world(0, 2, port), t, &with_token(None)).unwrap();
        TcpStore::connect_with(&world(1, 2, port), t, &with_token(Some("mine"))).unwrap();
    }

    #[test]
    fn frames_over_the_bounds_close_the_connection_unallocated() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let opts = with_token(Some("tok"));
        let mut s0 = TcpStore::connect_with(&world(0, 2, port), t, &opts).unwrap();
        // A token longer than any: closed, no answer.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(t)).unwrap();
        let mut h = HELLO.to_vec();
        h.extend_from_slice(&u16::MAX.to_le_bytes());
        s.write_all(&h).unwrap();
        assert!(closed(&mut s));
        // After a good hello: a 4 GiB key, a 1 TiB value, an unknown op.
        let frames: [Vec<u8>; 3] = [
            [&[OP_SET][..], &u32::MAX.to_le_bytes()].concat(),
            [
                &[OP_SET][..],
                &1u32.to_le_bytes(),
                b"k",
                &(1u64 << 40).to_le_bytes(),
            ]
            .concat(),
            [&[9u8][..], &1u32.to_le_bytes(), b"k", &0u64.to_le_bytes()].concat(),
        ];
        for (i, f) in frames.iter().enumerate() {
            let (mut s, answer) = hello(port, b"tok");
            assert_eq!(answer.map(|a| a[8]), Some(ACCEPTED));
            s.write_all(f).unwrap();
            let mut head = [0u8; 9];
            s.read_exact(&mut head).unwrap();
            assert_eq!(head[0], BAD, "frame {i}");
            assert!(closed(&mut s), "frame {i}");
        }
        // The client refuses to send them.
        let e = s0
            .set(&"k".repeat(MAX_KEY + 1), "v")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key of 4097 bytes is longer"), "{e}");
        let big = vec![0u8; MAX_VALUE as usize + 1];
        let e = s0.set_bytes("k", &big).unwrap_err().to_string();
        assert!(e.contains("value of 67108865 bytes"), "{e}");
        // The largest allowed value goes through.
        s0.set_bytes("big", &big[1..]).unwrap();
        assert_eq!(s0.get_bytes("big").unwrap().len() as u64, MAX_VALUE);
    }

    #[test]
    fn silent_and_slow_clients_do_not_hold_up_others() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let mut s0 = connect(&world(0, 2, port), t).unwrap();
        let silent: Vec<TcpStream> = (0..100)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
        slow.write_all(&HELLO[..3]).unwrap();
        let start = Instant::now();
        let mut s1 = connect(&world(1, 2, port), t).unwrap();
        s1.set("k", "v").unwrap();
        assert_eq!(s0.get("k").unwrap(), "v");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        drop(silent);
    }

    #[test]
    fn too_many_waiting_connections_are_closed_as_they_come() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let _s0 = connect(&world(0, 2, port), t).unwrap();
        let mut silent: Vec<TcpStream> = (0..MAX_PENDING)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        // Wait until the server has taken them all in.
        let deadline = Instant::now() + t;
        let mut extra = loop {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            if closed(&mut s) {
                break s;
            }
            silent.push(s);
            assert!(Instant::now() < deadline);
        };
        assert!(closed(&mut extra));
        // Room again once they go.
        drop(silent);
        let start = Instant::now();
        let mut s1 = connect(&world(1, 2, port), t).unwrap();
        s1.set("k", "v").unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
