//! The rendezvous store: a small key/value server in rank 0, over TCP.
//!
//! The idea is torch's `TCPStore`; the wire format is our own. Every message
//! is length-prefixed, integers little-endian:
//!
//! - hello, both ways, once per connection: the 8 bytes `LLMFTKV1`;
//! - request: `op: u8, key_len: u32, key, value_len: u64, value`, where `op`
//!   is `1` set (value = the bytes), `2` get (value = `wait_ms: u64`; the
//!   server answers when the key exists or the wait is over) or `3` add
//!   (value = `delta: i64`; the key holds an `i64`, missing counts as 0);
//! - reply: `status: u8, len: u64, bytes`, where `status` is `0` ok (bytes =
//!   the value, the new counter for add, nothing for set), `1` timed out
//!   (get only) or `2` bad request (bytes = a message).
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{secs, Error, Result, WorldInfo};

const HELLO: &[u8; 8] = b"LLMFTKV1";
const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
const OK: u8 = 0;
const TIMED_OUT: u8 = 1;
const BAD: u8 = 2;
/// Bounds on what one request may ask the server to allocate.
const MAX_KEY: usize = 4096;
const MAX_VALUE: u64 = 1 << 30;
/// Extra time a client waits for the answer to a `get` beyond the wait itself.
const REPLY_MARGIN: Duration = Duration::from_secs(10);

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
    conn: TcpStream,
    barriers: u64,
    _server: Option<Server>,
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
    /// Joins the store at `world.master_addr:world.master_port`; rank 0 first
    /// starts serving it there (on every interface of that address family).
    /// Connecting retries until `timeout`; `timeout` is also how long
    /// [`TcpStore::get`] and [`TcpStore::barrier`] wait.
    pub fn connect(world: &WorldInfo, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let addr = format!("{}:{}", world.master_addr, world.master_port);
        let server = if world.rank == 0 {
            Some(Server::start(world, &addr)?)
        } else {
            None
        };
        let conn = loop {
            let last = match try_connect(world, deadline) {
                Ok(c) => break c,
                Err(e) => e,
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
            conn,
            barriers: 0,
            _server: server,
        })
    }

    /// The store's address, `MASTER_ADDR:MASTER_PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
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
        if key.len() > MAX_KEY {
            return Err(Error::Store {
                addr: self.addr.clone(),
                msg: format!("key of {} bytes is longer than {MAX_KEY}", key.len()),
            });
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
            let mut body = vec![0u8; len as usize];
            self.conn.read_exact(&mut body)?;
            Ok((head[0], body))
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

/// Socket timeouts must not be zero (zero means "block forever" to the OS).
const MIN_WAIT: Duration = Duration::from_millis(1);

/// One attempt to reach the store and exchange the hello.
fn try_connect(world: &WorldInfo, deadline: Instant) -> std::result::Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = (world.master_addr.as_str(), world.master_port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", world.master_addr))?
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
            s.write_all(HELLO)?;
            let mut back = [0u8; 8];
            s.read_exact(&mut back)?;
            if &back != HELLO {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    "something else than an llmft store listens there",
                ));
            }
            Ok(s)
        })();
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the server's threads.
struct Shared {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

/// The store server of rank 0: an accept thread and a thread per client.
struct Server {
    shared: Arc<Shared>,
    wake: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    fn start(world: &WorldInfo, addr: &str) -> Result<Self> {
        let listen_err = |what: String, source| Error::Listen {
            rank: 0,
            addr: what,
            purpose: "rendezvous store",
            source,
        };
        // Listen on every interface of the master address's family: the
        // name may resolve to a loopback alias here and a real address on
        // the other nodes.
        let first = (world.master_addr.as_str(), world.master_port)
            .to_socket_addrs()
            .map_err(|e| listen_err(addr.to_string(), e))?
            .next();
        let (any, local): (IpAddr, IpAddr) = match first {
            Some(SocketAddr::V6(_)) => (Ipv6Addr::UNSPECIFIED.into(), Ipv6Addr::LOCALHOST.into()),
            _ => (Ipv4Addr::UNSPECIFIED.into(), Ipv4Addr::LOCALHOST.into()),
        };
        let bind = SocketAddr::new(any, world.master_port);
        let listener = TcpListener::bind(bind).map_err(|e| listen_err(bind.to_string(), e))?;
        let shared = Arc::new(Shared {
            map: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("llmft-store".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| listen_err(bind.to_string(), e))?;
        Ok(Self {
            shared,
            wake: SocketAddr::new(local, world.master_port),
            accept: Some(accept),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // Unblock the accept call; it sees `stop` and returns.
        let _ = TcpStream::connect_timeout(&self.wake, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for c in lock(&self.shared.conns).drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let Ok(clone) = conn.try_clone() else {
            continue;
        };
        lock(&shared.conns).push(clone);
        let s = shared.clone();
        // A client that cannot get a thread is dropped; it sees EOF.
        let _ = std::thread::Builder::new()
            .name("llmft-store-client".into())
            .spawn(move || {
                let _ = serve(conn, &s);
            });
    }
}

/// Answers one client until it hangs up (or sends garbage).
fn serve(mut c: TcpStream, shared: &Shared) -> std::io::Result<()> {
    c.set_nodelay(true)?;
    let mut hello = [0u8; 8];
    c.read_exact(&mut hello)?;
    if &hello != HELLO {
        return Ok(());
    }
    c.write_all(HELLO)?;
    loop {
        let mut head = [0u8; 5];
        c.read_exact(&mut head)?;
        let key_len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if key_len > MAX_KEY {
            return reply(&mut c, BAD, b"key too long");
        }
        let mut key = vec![0u8; key_len];
        c.read_exact(&mut key)?;
        let mut len = [0u8; 8];
        c.read_exact(&mut len)?;
        let len = u64::from_le_bytes(len);
        if len > MAX_VALUE {
            return reply(&mut c, BAD, b"value too long");
        }
        let mut value = vec![0u8; len as usize];
        c.read_exact(&mut value)?;
        let Ok(key) = String::from_utf8(key) else {
            return reply(&mut c, BAD, b"key is not UTF-8");
        };
        let num = |v: &[u8]| <[u8; 8]>::try_from(v).ok();
        match head[0] {
            OP_SET => {
                lock(&shared.map).insert(key, value);
                shared.changed.notify_all();
                reply(&mut c, OK, &[])?;
            }
            OP_ADD => {
                let Some(delta) = num(&value).map(i64::from_le_bytes) else {
                    return reply(&mut c, BAD, b"add needs an 8-byte delta");
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
                reply(&mut c, OK, &new.to_le_bytes())?;
            }
            OP_GET => {
                let Some(ms) = num(&value).map(u64::from_le_bytes) else {
                    return reply(&mut c, BAD, b"get needs an 8-byte wait");
                };
                let deadline = Instant::now() + Duration::from_millis(ms);
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
                    Some(v) => reply(&mut c, OK, &v)?,
                    None => reply(&mut c, TIMED_OUT, &[])?,
                }
            }
            _ => return reply(&mut c, BAD, b"unknown request"),
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

    #[test]
    fn set_get_add_wait_barrier_across_clients() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let mut s0 = TcpStore::connect(&world(0, 3, port), t).unwrap();
        let others: Vec<_> = (1..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let mut s = TcpStore::connect(&world(r, 3, port), t).unwrap();
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
        let mut s0 = TcpStore::connect(&world(0, 2, port), Duration::from_millis(300)).unwrap();
        let e = s0.get("nobody").unwrap_err().to_string();
        assert!(e.contains("`nobody`") && e.contains("0.3 s"), "{e}");
        let e = s0.barrier().unwrap_err().to_string();
        assert!(e.contains("1 of 2 ranks arrived"), "{e}");

        let port = free_port();
        let start = Instant::now();
        let e = TcpStore::connect(&world(1, 2, port), Duration::from_millis(400))
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
        let s0 = TcpStore::connect(&world(0, 2, port), t).unwrap();
        let mut s1 = TcpStore::connect(&world(1, 2, port), t).unwrap();
        drop(s0);
        let e = s1.get("x").unwrap_err().to_string();
        assert!(e.contains("closed the connection"), "{e}");
    }
}
