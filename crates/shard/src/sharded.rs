//! The FSDP sharded weight store: each rank keeps a slice of every unit and
//! the ranks all-gather a unit just ahead of its use (PyTorch FSDP's
//! `full_shard` / `shard_grad_op` of frozen or fully trained weights).
//!
//! Sharding: a unit blob of `B` bytes ([`BlobLayout::alloc_bytes`]) is padded
//! to `world * S` bytes, `S = ceil(B / world)` rounded up to 256; rank `r`
//! keeps bytes `[r*S, (r+1)*S)` (the padding is zeros) in its shard home: on
//! the compute device, or in pinned host memory with
//! [`ShardedConfig::offload`]. Every rank must build the store from the same
//! layouts in the same order; [`StoreBuilder::finish`] checks that (a
//! collective).
//!
//! A fetch hands out a device buffer of `world * S` bytes holding the whole
//! unit (the all-gather of every rank's shard); the guard views its first
//! `B` bytes. The buffers form a pool as in `llmft-offload`'s `Offloaded`:
//! - a free buffer is reused by a unit of the same size, and a released
//!   buffer keeps its data, so fetching the unit again before the buffer is
//!   reused gathers nothing;
//! - at most `lookahead + (buffers under a live guard) + (held buffers) + 1`
//!   buffers exist when one is added. With
//!   [`ShardedConfig::reshard_after_forward`] (`full_shard`) nothing is held:
//!   a released unit's buffer may go to the next unit at once. Without it
//!   (`shard_grad_op`) a unit fetched once stays gathered, held, until its
//!   last fetch in the declared order: gathered once per step, at the cost
//!   of the whole model's buffers at the forward/backward turnaround.
//!
//! [`WeightStore::schedule`] declares the order of a pass; a fetch that
//! follows it moves a cursor there and prefetches the next `lookahead`
//! entries of the order with [`ProcessGroup::all_gather_start`] (NCCL runs
//! it on the comm stream while compute goes on; the CPU backend runs it then
//! and there), and a fetch waits on the [`Pending`] before handing the unit
//! to compute. A fetch outside the order gathers on demand and leaves the
//! cursor where it is.
//!
//! Collectives must be called by every rank in the same order. Every
//! decision here (hit or gather, prefetch or skip, which buffer goes) is a
//! function of the pool's state, which only the sequence of `schedule`,
//! `fetch`, guard drops, `write` and `read_host` calls changes, so ranks that
//! make the same calls in the same order (one thread per rank, as a training
//! step does) issue the same collectives. Nothing depends on timing or on
//! free memory: a buffer that cannot be allocated is an error, never a
//! skipped prefetch (the other ranks then wait for this one until the
//! group's timeout).
//!
//! Ordering on CUDA: a gather of device shards is queued on the comm stream
//! after the compute work queued so far (which covers the compute that read
//! the buffer before its release). With offload, the rank's shard is first
//! copied into its slot of the buffer on the copy stream (after the buffer's
//! last release), the comm stream waits for that copy, and the all-gather
//! runs in place (its input is a view of the output's slot). A fetch makes
//! the compute stream wait for the gather; dropping a guard records the
//! compute stream's position as the buffer's last release.
//!
//! Simulation ([`ShardedConfig::simulate_world`]): one process plays rank 0
//! of an `N`-rank job. The other `N - 1` shards of each unit live in (pinned)
//! host memory and a "gather" copies them, with this rank's shard, into the
//! buffer on the copy stream. Device memory per rank and compute are those
//! of one rank of the real job (its communication time is not), and every
//! fetched byte is the unsharded model's, so losses are exactly those of the
//! unsharded run. A world of one, simulated or real, gathers by copies too.
//!
//! ```
//! use std::sync::Arc;
//! use llmft_shard::{CpuGroup, GroupConfig, ShardedBuilder, ShardedConfig, WorldInfo};
//! use llmft_tensor::store::{BlobLayout, StoreBuilder, Unit, WeightStore};
//! use llmft_tensor::{Ctx, DType, Tensor};
//! let ctx = Ctx::cpu();
//! let group = Arc::new(CpuGroup::connect(&WorldInfo::single(), &GroupConfig::default())?);
//! // One process playing rank 0 of two.
//! let cfg = ShardedConfig { simulate_world: Some(2), ..ShardedConfig::default() };
//! let mut b = ShardedBuilder::new(&ctx, 3, group, cfg)?;
//! let stats = b.stats_handle();
//! for unit in Unit::all(1) {
//!     let mut layout = BlobLayout::default();
//!     layout.push("w", DType::F32, &[300]);
//!     let blob = b.alloc(unit, layout)?;
//!     blob.get("w")?.copy_from(&ctx, &Tensor::from_f32(&ctx, &[1.5; 300], DType::F32, &[300])?)?;
//!     b.add(unit, blob)?; // keeps bytes 0..768 of 1200 (padded to 1536)
//! }
//! let store = Box::new(b).finish()?;
//! assert_eq!(store.bytes().device, 3 * 768);
//! let order: Vec<Unit> = Unit::all(1).collect();
//! store.schedule(&order)?;
//! for &unit in &order {
//!     let u = store.fetch(unit)?;
//!     assert_eq!(u.get("w")?.to_vec::<f32>()?, vec![1.5; 300]);
//! }
//! let c = stats.get();
//! assert_eq!((c.gathers, c.demand), (3, 0)); // every unit was prefetched
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use llmft_tensor::store::{
    entry_view, BlobLayout, StoreBuilder, StoreBytes, Unit, UnitBlob, UnitGuard, WeightStore, ALIGN,
};
use llmft_tensor::{numel, Ctx, DType, Device, Event, StreamKind, Tensor};

use crate::group::{Backend, Pending, ProcessGroup};
use crate::Error;

type TResult<T> = llmft_tensor::Result<T>;

/// The name this store's errors carry.
const OP: &str = "sharded store";

/// Options of [`Sharded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardedConfig {
    /// Free a gathered unit as soon as its guard drops (FSDP `full_shard`);
    /// false keeps a unit gathered from its forward fetch until its last
    /// fetch in the declared order (`shard_grad_op`: gathered once per step).
    pub reshard_after_forward: bool,
    /// Keep this rank's shards in pinned host memory (`offload.params`): a
    /// gather first copies the shard up, then all-gathers.
    pub offload: bool,
    /// Units prefetched ahead of use (at least 1).
    pub lookahead: usize,
    /// Simulate a world of this many ranks in one process (this is rank 0):
    /// the group passed must be a world of 1; the other ranks' shards are
    /// kept in (pinned) host memory and "gathered" by copies, so device
    /// memory per rank and compute are those of one rank of an N-rank job
    /// (communication time is not that of a real job). `None`: real.
    pub simulate_world: Option<usize>,
}

impl Default for ShardedConfig {
    fn default() -> Self {
        Self {
            reshard_after_forward: true,
            offload: false,
            lookahead: 1,
            simulate_world: None,
        }
    }
}

/// Bytes of each rank's shard of a unit of `bytes` bytes in a world of
/// `world`: `ceil(bytes / world)` rounded up to 256 (at least 256).
pub fn shard_bytes(bytes: usize, world: usize) -> usize {
    bytes.max(1).div_ceil(world.max(1)).next_multiple_of(ALIGN)
}

/// Counters of a [`Sharded`] store, for benchmarks and tests. A cheap
/// cloneable handle: take one from [`ShardedBuilder::stats_handle`] before
/// the store disappears behind `Box<dyn WeightStore>`.
#[derive(Debug, Clone, Default)]
pub struct ShardedStats(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    fetches: AtomicU64,
    hits: AtomicU64,
    prefetch_hits: AtomicU64,
    gathers: AtomicU64,
    demand: AtomicU64,
    prefetched: AtomicU64,
    prefetch_skipped: AtomicU64,
    gathered_bytes: AtomicU64,
    buffers_allocated: AtomicU64,
    peak_buffers: AtomicU64,
    simulated_peer_bytes: AtomicU64,
}

/// A snapshot of [`ShardedStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardedCounters {
    /// Calls of `fetch`, and of `read_host` (which fetches the unit).
    /// `fetches == hits + demand`.
    pub fetches: u64,
    /// Fetches served by a buffer that already held the unit (no gather
    /// issued by the fetch): prefetched, held, or kept since an earlier fetch.
    pub hits: u64,
    /// Hits whose buffer was filled by a prefetch (first fetch after it).
    pub prefetch_hits: u64,
    /// Gathers of a unit into a buffer. `gathers == demand + prefetched`.
    pub gathers: u64,
    /// Gathers issued by a fetch for the unit it returns (not overlapped).
    pub demand: u64,
    /// Gathers issued ahead of use (by `schedule` or a fetch's prefetch).
    pub prefetched: u64,
    /// Prefetches skipped because no buffer could be taken.
    pub prefetch_skipped: u64,
    /// Bytes of the buffers filled by gathers (`world * S` each).
    pub gathered_bytes: u64,
    /// Device buffers allocated (a reused buffer counts once).
    pub buffers_allocated: u64,
    /// Most buffers that existed at once.
    pub peak_buffers: u64,
    /// Host bytes of the simulated peers' shards (0 when not simulating);
    /// not a counter: [`ShardedStats::reset`] keeps it.
    pub simulated_peer_bytes: u64,
}

impl ShardedStats {
    /// A handle with zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current counters.
    pub fn get(&self) -> ShardedCounters {
        let c = &*self.0;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ShardedCounters {
            fetches: l(&c.fetches),
            hits: l(&c.hits),
            prefetch_hits: l(&c.prefetch_hits),
            gathers: l(&c.gathers),
            demand: l(&c.demand),
            prefetched: l(&c.prefetched),
            prefetch_skipped: l(&c.prefetch_skipped),
            gathered_bytes: l(&c.gathered_bytes),
            buffers_allocated: l(&c.buffers_allocated),
            peak_buffers: l(&c.peak_buffers),
            simulated_peer_bytes: l(&c.simulated_peer_bytes),
        }
    }

    /// Zeroes every counter (the peak becomes 0, and is raised again by the
    /// next buffer allocated).
    pub fn reset(&self) {
        let c = &*self.0;
        for a in [
            &c.fetches,
            &c.hits,
            &c.prefetch_hits,
            &c.gathers,
            &c.demand,
            &c.prefetched,
            &c.prefetch_skipped,
            &c.gathered_bytes,
            &c.buffers_allocated,
            &c.peak_buffers,
        ] {
            a.store(0, Ordering::Relaxed);
        }
    }

    fn add(a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }
}

fn invalid(msg: String) -> llmft_tensor::Error {
    llmft_tensor::Error::Invalid { op: OP, msg }
}

/// A collective's error as the store reports it.
fn comm(e: Error) -> llmft_tensor::Error {
    match e {
        Error::Tensor(t) => t,
        other => invalid(other.to_string()),
    }
}

/// A failed gather of `unit`, naming it (a dead or stalled peer shows up
/// here first).
fn gather_failed(unit: Unit) -> impl FnOnce(Error) -> llmft_tensor::Error {
    move |e| match e {
        Error::Tensor(t) => t,
        other => invalid(format!("gathering {unit}: {other}")),
    }
}

/// Checks that `unit` exists in a store of `n` units; its slot index.
fn unit_index(unit: Unit, n: usize) -> TResult<usize> {
    let ok = match unit {
        Unit::Embed | Unit::Head => n >= 2,
        Unit::Layer(i) => i.checked_add(2).is_some_and(|j| j < n),
    };
    if ok {
        Ok(unit.index(n))
    } else {
        Err(invalid(format!(
            "no {unit} in a store of {n} units ({} layers)",
            n.saturating_sub(2)
        )))
    }
}

/// What a rank keeps of one unit.
struct Home {
    layout: Arc<BlobLayout>,
    /// This rank's shard (`S` bytes): on the device, or pinned host memory
    /// with offload.
    shard: Tensor,
    /// Simulated ranks `1..N`'s shards, in rank order (`(N-1) * S` bytes of
    /// pinned host memory); `None` when not simulating.
    peers: Option<Tensor>,
}

/// Builds a [`Sharded`] store: blobs are staged whole on the compute device,
/// and [`StoreBuilder::add`] keeps this rank's slice of each.
pub struct ShardedBuilder {
    ctx: Ctx,
    group: Arc<dyn ProcessGroup>,
    cfg: ShardedConfig,
    world: usize,
    rank: usize,
    homes: Vec<Option<Home>>,
    stats: ShardedStats,
}

impl ShardedBuilder {
    /// A builder of a store of `num_units` units (layers + 2) on `ctx`,
    /// sharded over `group` (or over [`ShardedConfig::simulate_world`]
    /// simulated ranks, with a group of one). With NCCL, `ctx` must be the
    /// context the group works on: the store orders its copies against that
    /// context's comm stream.
    pub fn new(
        ctx: &Ctx,
        num_units: usize,
        group: Arc<dyn ProcessGroup>,
        cfg: ShardedConfig,
    ) -> Result<Self, Error> {
        let bad = |msg: String| Error::Invalid { op: OP, msg };
        if num_units < 2 {
            return Err(bad(format!(
                "a store needs at least 2 units (embedding and head), got {num_units}"
            )));
        }
        if cfg.lookahead == 0 {
            return Err(bad("lookahead must be at least 1".into()));
        }
        let (world, rank) = match cfg.simulate_world {
            Some(0) => return Err(bad("simulate_world must be at least 1".into())),
            Some(n) if group.world_size() != 1 => {
                return Err(bad(format!(
                    "simulate_world = {n} runs in one process, but the process group has {} ranks",
                    group.world_size()
                )))
            }
            Some(n) => (n, 0),
            None => (group.world_size(), group.rank()),
        };
        if world == 0 || rank >= world {
            return Err(bad(format!("rank {rank} of a world of {world}")));
        }
        if cfg.simulate_world.is_none()
            && world > 1
            && ctx.device() != Device::Cpu
            && group.backend() == Backend::Cpu
        {
            return Err(bad(format!(
                "the cpu process group gathers host tensors only; a store on {} needs the nccl backend",
                ctx.device()
            )));
        }
        Ok(Self {
            ctx: ctx.clone(),
            group,
            cfg,
            world,
            rank,
            homes: (0..num_units).map(|_| None).collect(),
            stats: ShardedStats::new(),
        })
    }

    /// A handle on the counters of the store this builder makes.
    pub fn stats_handle(&self) -> ShardedStats {
        self.stats.clone()
    }

    /// The store, as its concrete type (for [`Sharded::stats`]);
    /// [`StoreBuilder::finish`] boxes it. With a real world of more than one
    /// rank this is a collective: the ranks check that they built the store
    /// from the same layouts.
    pub fn build(self) -> TResult<Sharded> {
        let n = self.homes.len();
        let mut homes = Vec::with_capacity(n);
        for (i, h) in self.homes.into_iter().enumerate() {
            homes.push(h.ok_or_else(|| {
                invalid(format!(
                    "{} was never added to the store",
                    Unit::from_index(i, n)
                ))
            })?);
        }
        let peer_bytes = homes
            .iter()
            .filter_map(|h| h.peers.as_ref())
            .map(|p| p.bytes() as u64)
            .sum();
        self.stats
            .0
            .simulated_peer_bytes
            .store(peer_bytes, Ordering::Relaxed);
        // NCCL gathers even a world of one (its path is then exercised on
        // a single GPU); the CPU backend's world of one copies.
        let collective = self.cfg.simulate_world.is_none()
            && (self.world > 1 || self.group.backend() == Backend::Nccl);
        if collective {
            check_same_layouts(&self.ctx, &*self.group, self.world, &homes)?;
        }
        Ok(Sharded {
            shared: Arc::new(Shared {
                ctx: self.ctx,
                group: self.group,
                world: self.world,
                rank: self.rank,
                collective,
                offload: self.cfg.offload,
                lookahead: self.cfg.lookahead,
                state: Mutex::new(State {
                    keep_gathered: !self.cfg.reshard_after_forward,
                    slots: Vec::new(),
                    holder: vec![None; n],
                    order: Vec::new(),
                    cursor: 0,
                    tick: 0,
                    home_read: (0..n).map(|_| Arc::new(Event::done())).collect(),
                }),
                homes,
                stats: self.stats,
            }),
        })
    }
}

/// FNV-1a of the store's tables and shard sizes.
fn fingerprint(world: usize, homes: &[Home]) -> u64 {
    struct Fnv(u64);
    impl Fnv {
        fn eat(&mut self, b: &[u8]) {
            for &x in b {
                self.0 = (self.0 ^ x as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
        fn num(&mut self, v: usize) {
            self.eat(&(v as u64).to_le_bytes());
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.num(world);
    h.num(homes.len());
    for home in homes {
        let l = &home.layout;
        h.num(l.alloc_bytes());
        h.num(home.shard.bytes());
        for e in &l.entries {
            h.eat(e.name.as_bytes());
            h.eat(e.dtype.to_string().as_bytes());
            h.num(e.offset);
            h.num(e.shape.len());
            for &d in &e.shape {
                h.num(d);
            }
        }
    }
    h.0
}

/// Every rank built the store from the same tables (an all-gather of their
/// fingerprints), or an error on every rank that names the ones that differ.
fn check_same_layouts(
    ctx: &Ctx,
    group: &dyn ProcessGroup,
    world: usize,
    homes: &[Home],
) -> TResult<()> {
    let mine = fingerprint(world, homes).to_le_bytes();
    let input = Tensor::from_slice(ctx, &mine, &[mine.len()])?;
    let mut all = Tensor::zeros(ctx, DType::U8, &[world * mine.len()])?;
    group.all_gather(ctx, &input, &mut all).map_err(comm)?;
    let all = all.to_ctx(&Ctx::cpu())?;
    let all = all.as_bytes()?;
    let first = &all[..mine.len()];
    let differ: Vec<String> = (1..world)
        .filter(|&k| &all[k * mine.len()..(k + 1) * mine.len()] != first)
        .map(|k| k.to_string())
        .collect();
    if differ.is_empty() {
        Ok(())
    } else {
        Err(invalid(format!(
            "rank(s) {} built the store from other unit layouts than rank 0 (every rank must load the same model)",
            differ.join(", ")
        )))
    }
}

impl StoreBuilder for ShardedBuilder {
    fn alloc(&mut self, unit: Unit, layout: BlobLayout) -> TResult<UnitBlob> {
        unit_index(unit, self.homes.len())?;
        UnitBlob::zeros(&self.ctx, layout)
    }

    /// Keeps this rank's slice of `blob` and returns `blob` itself (the
    /// store does not retain it: drop it).
    fn add(&mut self, unit: Unit, blob: UnitBlob) -> TResult<UnitBlob> {
        let i = unit_index(unit, self.homes.len())?;
        if self.homes[i].is_some() {
            return Err(invalid(format!("{unit} was added to the store twice")));
        }
        if blob.bytes.device() != self.ctx.device() {
            return Err(llmft_tensor::Error::Device {
                op: OP,
                what: "unit blob",
                got: blob.bytes.device(),
                expected: self.ctx.device(),
            });
        }
        let b = blob.layout.alloc_bytes();
        if blob.bytes.dtype() != DType::U8 || blob.bytes.numel() != b {
            return Err(invalid(format!(
                "the blob of {unit} is {} {}, its layout needs {b} bytes of u8",
                blob.bytes.numel(),
                blob.bytes.dtype()
            )));
        }
        let s = shard_bytes(b, self.world);
        let shard = if self.cfg.offload {
            Tensor::zeros_pinned(&self.ctx, DType::U8, &[s])?
        } else {
            Tensor::zeros(&self.ctx, DType::U8, &[s])?
        };
        // Bytes [lo, hi) of the blob into `dst` at 0.
        let put = |dst: &Tensor, lo: usize, hi: usize| -> TResult<()> {
            if lo < hi {
                let src = blob.bytes.view(lo, &[hi - lo])?;
                dst.view(0, &[hi - lo])?.copy_from(&self.ctx, &src)?;
            }
            Ok(())
        };
        let lo = (self.rank * s).min(b);
        put(&shard, lo, (lo + s).min(b))?;
        let peers = match self.cfg.simulate_world {
            Some(n) if n > 1 => {
                let p = Tensor::zeros_pinned(&self.ctx, DType::U8, &[(n - 1) * s])?;
                put(&p, s.min(b), b)?;
                Some(p)
            }
            _ => None,
        };
        // Device-to-pinned copies are asynchronous; the caller may drop or
        // refill the blob as soon as this returns.
        self.ctx.synchronize()?;
        self.homes[i] = Some(Home {
            layout: blob.layout.clone(),
            shard,
            peers,
        });
        Ok(blob)
    }

    fn finish(self: Box<Self>) -> TResult<Box<dyn WeightStore>> {
        Ok(Box::new(self.build()?))
    }
}

/// The sharded store. See the module docs.
pub struct Sharded {
    shared: Arc<Shared>,
}

struct Shared {
    ctx: Ctx,
    group: Arc<dyn ProcessGroup>,
    /// The world the units are sharded over (simulated or real).
    world: usize,
    /// This rank in it.
    rank: usize,
    /// Gathers go through the group (a real world of more than one rank,
    /// or NCCL at any size); otherwise they are copies.
    collective: bool,
    offload: bool,
    lookahead: usize,
    homes: Vec<Home>,
    state: Mutex<State>,
    stats: ShardedStats,
}

struct State {
    /// `shard_grad_op`: a unit fetched once stays gathered until its last
    /// fetch in the declared order.
    keep_gathered: bool,
    /// Device buffers by id; `None` where one was freed (ids stay stable
    /// while guards refer to them).
    slots: Vec<Option<Slot>>,
    /// The buffer holding (or gathering) each unit.
    holder: Vec<Option<usize>>,
    /// Unit indices of the declared order.
    order: Vec<usize>,
    /// Next entry of `order` expected.
    cursor: usize,
    /// Release clock, for least-recently-released choices.
    tick: u64,
    /// Completion of the last copy-stream copy out of each unit's homes (a
    /// write waits for it before overwriting them).
    home_read: Vec<Arc<Event>>,
}

struct Slot {
    /// `world * S` bytes.
    buf: Tensor,
    /// Whose data the buffer holds (valid once `pending` and `ready` are
    /// waited for).
    unit: Option<usize>,
    /// Live guards.
    refs: usize,
    /// The all-gather into the buffer, until a fetch waits for it.
    pending: Option<Pending>,
    /// Completion of the copies into the buffer, on the copy stream.
    ready: Arc<Event>,
    /// The compute stream's position at the last release; `None` for a
    /// buffer never released, or whose last writer is unknown: the next
    /// copy into it then waits for all compute work queued so far.
    last_release: Option<Event>,
    released_at: u64,
    /// Filled by a prefetch and not fetched since.
    prefetched: bool,
}

impl Slot {
    fn bytes(&self) -> usize {
        self.buf.bytes()
    }
}

#[derive(Clone, Copy)]
enum Need {
    /// A fetch waits for this gather.
    Demand,
    /// A prefetch of the order's entry at this position.
    Prefetch(usize),
}

impl State {
    /// Position of the next use of unit `u` in the order from the cursor on,
    /// `usize::MAX` when none.
    fn next_use(&self, u: Option<usize>) -> usize {
        let Some(u) = u else { return usize::MAX };
        self.order[self.cursor.min(self.order.len())..]
            .iter()
            .position(|&x| x == u)
            .map_or(usize::MAX, |p| p + self.cursor)
    }

    /// A released buffer that `shard_grad_op` keeps until its unit's last
    /// fetch: fetched (not just prefetched) and needed again.
    fn held(&self, s: &Slot) -> bool {
        self.keep_gathered
            && s.refs == 0
            && !s.prefetched
            && s.unit.is_some()
            && self.next_use(s.unit) != usize::MAX
    }

    fn live(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// Eviction rank of a free slot: higher is a better victim.
    fn victim_rank(&self, s: &Slot) -> (bool, usize, std::cmp::Reverse<u64>) {
        (
            s.unit.is_none(),
            self.next_use(s.unit),
            std::cmp::Reverse(s.released_at),
        )
    }

    /// The best victim among free, unheld slots passing `ok`.
    fn best_victim(&self, ok: impl Fn(&Slot) -> bool) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .filter(|(_, s)| s.refs == 0 && !self.held(s) && ok(s))
            .max_by_key(|(_, s)| self.victim_rank(s))
            .map(|(i, _)| i)
    }

    /// Detaches slot `id` from the unit it holds. A gather still in flight
    /// is waited for on the compute stream, and the next copy into the
    /// buffer then waits for all compute work (which includes that wait).
    fn detach(&mut self, ctx: &Ctx, id: usize) -> TResult<()> {
        let Some(s) = self.slots[id].as_mut() else {
            return Ok(());
        };
        if let Some(p) = s.pending.take() {
            s.last_release = None;
            p.wait(ctx).map_err(comm)?;
        }
        s.prefetched = false;
        if let Some(u) = s.unit.take() {
            if self.holder[u] == Some(id) {
                self.holder[u] = None;
            }
        }
        Ok(())
    }

    /// Frees slot `id` (a free one).
    fn free(&mut self, ctx: &Ctx, id: usize) -> TResult<()> {
        self.detach(ctx, id)?;
        self.slots[id] = None;
        Ok(())
    }

    fn slot(&mut self, id: usize) -> TResult<&mut Slot> {
        self.slots
            .get_mut(id)
            .and_then(|s| s.as_mut())
            .ok_or_else(|| invalid(format!("internal: buffer {id} does not exist")))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of unit `u`'s gather buffer.
    fn buf_bytes(&self, u: usize) -> usize {
        self.world * self.homes[u].shard.bytes()
    }

    /// A buffer for gathering unit `u`, or `None` (a prefetch that would
    /// have to evict something needed sooner, or exceed the budget). A
    /// function of the pool's state only, so every rank decides alike.
    fn take_buffer(&self, st: &mut State, u: usize, need: Need) -> TResult<Option<usize>> {
        let bytes = self.buf_bytes(u);
        let kept = st
            .slots
            .iter()
            .flatten()
            .filter(|s| s.refs > 0 || st.held(s))
            .count();
        let cap = self.lookahead + kept + 1;
        let mine = match need {
            Need::Demand => 0,
            Need::Prefetch(p) => p,
        };
        // A prefetch may only evict data needed after the unit it gathers.
        let acceptable = |st: &State, s: &Slot| match need {
            Need::Demand => true,
            Need::Prefetch(_) => st.next_use(s.unit) > mine,
        };
        // Give back buffers over the budget that hold nothing still ahead.
        while st.live() > cap {
            match st.best_victim(|s| st.next_use(s.unit) == usize::MAX) {
                Some(id) => st.free(&self.ctx, id)?,
                None => break,
            }
        }
        // A same-size buffer holding nothing ahead is as good as a new one.
        if let Some(id) = st.best_victim(|s| s.bytes() == bytes && acceptable(st, s)) {
            let s = st.slot(id)?;
            let unit = s.unit;
            if unit.is_none() || st.next_use(unit) == usize::MAX || st.live() >= cap {
                return Ok(Some(id));
            }
        }
        if st.live() >= cap {
            // Make room: a buffer of another size goes. Demand always finds
            // one: `cap` exceeds the guarded and held buffers.
            match st.best_victim(|s| acceptable(st, s)) {
                Some(id) => st.free(&self.ctx, id)?,
                None if matches!(need, Need::Prefetch(_)) => return Ok(None),
                None => {}
            }
        }
        // Out of memory is an error, not a skip: a skip could differ
        // between ranks.
        let buf = Tensor::empty(&self.ctx, DType::U8, &[bytes])?;
        let slot = Slot {
            buf,
            unit: None,
            refs: 0,
            pending: None,
            ready: Arc::new(Event::done()),
            last_release: None,
            released_at: 0,
            prefetched: false,
        };
        let id = match st.slots.iter().position(|s| s.is_none()) {
            Some(i) => {
                st.slots[i] = Some(slot);
                i
            }
            None => {
                st.slots.push(Some(slot));
                st.slots.len() - 1
            }
        };
        let c = &self.stats.0;
        ShardedStats::add(&c.buffers_allocated, 1);
        c.peak_buffers
            .fetch_max(st.live() as u64, Ordering::Relaxed);
        Ok(Some(id))
    }

    /// Makes the copy stream wait until slot `s`'s buffer may be overwritten.
    fn copy_after_release(&self, s: &Slot) -> TResult<()> {
        match &s.last_release {
            Some(ev) => self.ctx.wait(StreamKind::Copy, ev),
            None => self.ctx.wait_for(StreamKind::Copy, StreamKind::Compute),
        }
    }

    /// Starts gathering unit `u` into slot `id`.
    fn gather(&self, st: &mut State, id: usize, u: usize) -> TResult<()> {
        st.detach(&self.ctx, id)?;
        let ctx = &self.ctx;
        let home = &self.homes[u];
        let unit = Unit::from_index(u, self.homes.len());
        let s = home.shard.bytes();
        let slot = st.slot(id)?;
        let mut buf = slot.buf.clone();
        let mut mine = buf.view(self.rank * s, &[s])?;
        let mut copied = None;
        if self.collective {
            let pending = if home.shard.device() == buf.device() {
                self.group
                    .all_gather_start(ctx, &home.shard, &mut buf)
                    .map_err(gather_failed(unit))?
            } else {
                // The pinned shard goes up into its slot, then the gather
                // runs in place once the comm stream has seen the copy.
                self.copy_after_release(slot)?;
                mine.copy_from_on(ctx, &home.shard, StreamKind::Copy)?;
                let ev = ctx.record(StreamKind::Copy)?;
                ctx.wait(StreamKind::Comm, &ev)?;
                copied = Some(Arc::new(ev));
                self.group
                    .all_gather_start(ctx, &mine, &mut buf)
                    .map_err(gather_failed(unit))?
            };
            slot.pending = Some(pending);
            slot.ready = Arc::new(Event::done());
        } else {
            self.copy_after_release(slot)?;
            mine.copy_from_on(ctx, &home.shard, StreamKind::Copy)?;
            if let Some(p) = &home.peers {
                buf.view(s, &[p.bytes()])?
                    .copy_from_on(ctx, p, StreamKind::Copy)?;
            }
            let ev = Arc::new(ctx.record(StreamKind::Copy)?);
            slot.ready = ev.clone();
            copied = Some(ev);
        }
        slot.unit = Some(u);
        let bytes = slot.bytes() as u64;
        if let Some(ev) = copied {
            st.home_read[u] = ev;
        }
        st.holder[u] = Some(id);
        let c = &self.stats.0;
        ShardedStats::add(&c.gathers, 1);
        ShardedStats::add(&c.gathered_bytes, bytes);
        Ok(())
    }

    /// Prefetches the next `lookahead` entries of the order after the cursor.
    fn prefetch(&self, st: &mut State) -> TResult<()> {
        let end = st.cursor.saturating_add(self.lookahead).min(st.order.len());
        for p in st.cursor..end {
            let u = st.order[p];
            if st.holder[u].is_some() {
                continue;
            }
            match self.take_buffer(st, u, Need::Prefetch(p))? {
                Some(id) => {
                    self.gather(st, id, u)?;
                    st.slot(id)?.prefetched = true;
                    ShardedStats::add(&self.stats.0.prefetched, 1);
                }
                None => ShardedStats::add(&self.stats.0.prefetch_skipped, 1),
            }
        }
        Ok(())
    }

    /// The buffer holding unit `u`, gathered on demand if none does, ready
    /// for the compute stream and counted as guarded; its id.
    fn acquire(&self, st: &mut State, u: usize) -> TResult<usize> {
        let c = &self.stats.0;
        ShardedStats::add(&c.fetches, 1);
        let id = match st.holder[u] {
            Some(id) => {
                ShardedStats::add(&c.hits, 1);
                if std::mem::take(&mut st.slot(id)?.prefetched) {
                    ShardedStats::add(&c.prefetch_hits, 1);
                }
                id
            }
            None => {
                let id = self
                    .take_buffer(st, u, Need::Demand)?
                    .ok_or_else(|| invalid("internal: no buffer for a demand gather".into()))?;
                self.gather(st, id, u)?;
                ShardedStats::add(&c.demand, 1);
                id
            }
        };
        let s = st.slot(id)?;
        if let Some(p) = s.pending.take() {
            p.wait(&self.ctx).map_err(comm)?;
        }
        self.ctx.wait(StreamKind::Compute, &s.ready)?;
        s.refs += 1;
        Ok(id)
    }

    /// A guard of slot `id` dropped.
    fn release(&self, st: &mut State, id: usize) {
        // Under the lock, so a later release never stores an earlier event.
        let ev = self.ctx.record(StreamKind::Compute).ok();
        st.tick += 1;
        let tick = st.tick;
        if let Some(s) = st.slots[id].as_mut() {
            s.refs = s.refs.saturating_sub(1);
            s.last_release = ev;
            s.released_at = tick;
        }
    }
}

impl Sharded {
    /// A builder of a sharded store of `num_units` units on `ctx` (see
    /// [`ShardedBuilder::new`]).
    pub fn builder(
        ctx: &Ctx,
        num_units: usize,
        group: Arc<dyn ProcessGroup>,
        cfg: ShardedConfig,
    ) -> Result<Box<dyn StoreBuilder>, Error> {
        Ok(Box::new(ShardedBuilder::new(ctx, num_units, group, cfg)?))
    }

    /// The store's counters.
    pub fn stats(&self) -> ShardedCounters {
        self.shared.stats.get()
    }

    /// A handle on the store's counters.
    pub fn stats_handle(&self) -> ShardedStats {
        self.shared.stats.clone()
    }

    /// Device buffers held now.
    pub fn buffers(&self) -> usize {
        self.shared.lock().live()
    }

    /// The world the units are sharded over and this rank in it (`(N, 0)`
    /// when simulating `N` ranks).
    pub fn world(&self) -> (usize, usize) {
        (self.shared.world, self.shared.rank)
    }

    fn index(&self, unit: Unit) -> TResult<usize> {
        unit_index(unit, self.shared.homes.len())
    }
}

impl WeightStore for Sharded {
    fn num_units(&self) -> usize {
        self.shared.homes.len()
    }

    fn layout(&self, unit: Unit) -> TResult<Arc<BlobLayout>> {
        Ok(self.shared.homes[self.index(unit)?].layout.clone())
    }

    /// Declares the order and prefetches its first entries: with a real
    /// world, every rank must call it at the same point.
    fn schedule(&self, order: &[Unit]) -> TResult<()> {
        let order = order
            .iter()
            .map(|&u| self.index(u))
            .collect::<TResult<Vec<_>>>()?;
        let sh = &*self.shared;
        let mut st = sh.lock();
        st.order = order;
        st.cursor = 0;
        sh.prefetch(&mut st)
    }

    fn fetch(&self, unit: Unit) -> TResult<UnitGuard> {
        let u = self.index(unit)?;
        let sh = &*self.shared;
        let mut st = sh.lock();
        let from = st.cursor.min(st.order.len());
        if let Some(p) = st.order[from..].iter().position(|&x| x == u) {
            st.cursor = from + p + 1;
        }
        let id = sh.acquire(&mut st, u)?;
        if let Err(e) = sh.prefetch(&mut st) {
            sh.release(&mut st, id);
            return Err(e);
        }
        let layout = sh.homes[u].layout.clone();
        let blob = st.slot(id)?.buf.view(0, &[layout.alloc_bytes()])?;
        drop(st);
        let shared = self.shared.clone();
        Ok(UnitGuard::new(
            unit,
            blob,
            layout,
            Some(Box::new(move || {
                let mut st = shared.lock();
                shared.release(&mut st, id)
            })),
        ))
    }

    /// Writes the slice of `src` (the whole new value, the same on every
    /// rank) that falls in this rank's shard, and (simulating) in the peers'
    /// shards, and into the buffer holding the unit if one does, so a later
    /// fetch sees it without a gather. No communication.
    fn write(&self, unit: Unit, name: &str, src: &Tensor) -> TResult<()> {
        let u = self.index(unit)?;
        let sh = &*self.shared;
        let ctx = &sh.ctx;
        let home = &sh.homes[u];
        let e = home
            .layout
            .entry(name)
            .ok_or_else(|| invalid(format!("{unit} has no tensor `{name}`")))?;
        if src.dtype() != e.dtype || src.numel() != numel(&e.shape) {
            return Err(invalid(format!(
                "`{name}` of {unit} is {} {:?}; the source is {} {:?}",
                e.dtype,
                e.shape,
                src.dtype(),
                src.shape()
            )));
        }
        if src.device() != Device::Cpu && src.device() != ctx.device() {
            return Err(llmft_tensor::Error::Device {
                op: OP,
                what: "source",
                got: src.device(),
                expected: ctx.device(),
            });
        }
        let src = src.reinterpret(DType::U8, &[e.bytes()])?;
        let mut st = sh.lock();
        let holder = st.holder[u];
        if let Some(id) = holder {
            if st.slot(id)?.refs > 0 {
                return Err(invalid(format!(
                    "cannot write `{name}` of {unit} while a fetched guard of it is alive"
                )));
            }
        }
        // Copies still reading the homes finish first.
        let host_homes = sh.offload || home.peers.is_some() || ctx.device() == Device::Cpu;
        if host_homes {
            st.home_read[u].synchronize()?;
        } else {
            ctx.wait(StreamKind::Compute, &st.home_read[u])?;
        }
        if let Some(id) = holder {
            let s = st.slot(id)?;
            if let Some(p) = s.pending.take() {
                p.wait(ctx).map_err(comm)?;
            }
            ctx.wait(StreamKind::Compute, &s.ready)?;
            entry_view(&s.buf, e)?
                .reinterpret(DType::U8, &[e.bytes()])?
                .copy_from(ctx, &src)?;
            // Written on the compute stream after the last release.
            s.last_release = None;
        }
        let s = home.shard.bytes();
        let (lo, hi) = (e.offset, e.offset + e.bytes());
        // Bytes [a, b) of the blob, when any fall in [lo, hi), into `dst`
        // at `a - base`.
        let put = |dst: &Tensor, base: usize, a: usize, b: usize| -> TResult<()> {
            let (a, b) = (a.max(lo), b.min(hi));
            if a < b {
                dst.view(a - base, &[b - a])?
                    .copy_from(ctx, &src.view(a - lo, &[b - a])?)?;
            }
            Ok(())
        };
        let r = sh.rank * s;
        put(&home.shard, r, r, r + s)?;
        if let Some(p) = &home.peers {
            put(p, s, s, s + p.bytes())?;
        }
        if host_homes && src.device() != Device::Cpu {
            // A device-to-pinned copy is asynchronous: complete it here.
            ctx.record(StreamKind::Compute)?.synchronize()?;
        }
        Ok(())
    }

    /// A COLLECTIVE with a real world: every rank must call it for the same
    /// units and names in the same order (it gathers the unit unless a
    /// buffer holds it already). Leaves the declared order's cursor alone
    /// and prefetches nothing.
    fn read_host(&self, unit: Unit, name: &str) -> TResult<Tensor> {
        let u = self.index(unit)?;
        let sh = &*self.shared;
        let e = sh.homes[u]
            .layout
            .entry(name)
            .ok_or_else(|| invalid(format!("{unit} has no tensor `{name}`")))?;
        let mut st = sh.lock();
        let id = sh.acquire(&mut st, u)?;
        let out = st
            .slot(id)
            .and_then(|s| entry_view(&s.buf, e))
            .and_then(|v| v.to_ctx(&Ctx::cpu()));
        sh.release(&mut st, id);
        out
    }

    /// `device`: this rank's shards where they live on the compute device
    /// (the host, for a CPU context); `host`: the shards offloaded to pinned
    /// memory; `buffers`: the gather buffers. The simulated peers' shards
    /// are in [`ShardedCounters::simulated_peer_bytes`].
    fn bytes(&self) -> StoreBytes {
        let sh = &*self.shared;
        let shards: usize = sh.homes.iter().map(|h| h.shard.bytes()).sum();
        let buffers = sh.lock().slots.iter().flatten().map(|s| s.bytes()).sum();
        let (device, host) = if sh.offload { (0, shards) } else { (shards, 0) };
        StoreBytes {
            device,
            host,
            buffers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_sizes() {
        assert_eq!(shard_bytes(1, 1), 256);
        assert_eq!(shard_bytes(1, 4), 256);
        assert_eq!(shard_bytes(256, 1), 256);
        assert_eq!(shard_bytes(257, 1), 512);
        assert_eq!(shard_bytes(1200, 2), 768);
        assert_eq!(shard_bytes(3 * 256, 3), 256);
        assert_eq!(shard_bytes(3 * 256 + 1, 3), 512);
    }

    #[test]
    fn units_are_checked() {
        assert_eq!(unit_index(Unit::Layer(1), 4).unwrap(), 2);
        assert!(unit_index(Unit::Layer(2), 4).is_err());
        assert!(unit_index(Unit::Layer(usize::MAX), 4).is_err());
    }
}
