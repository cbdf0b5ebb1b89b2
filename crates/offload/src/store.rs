//! The offloaded weight store: units' home copies in pinned host memory,
//! copied into reused device buffers just ahead of use (`offload.params`;
//! ZeRO-Offload / FSDP `CPUOffload` of parameters).
//!
//! Every unit's blob lives in page-locked host memory ([`UnitBlob::zeros_pinned`]).
//! A fetch hands out a device buffer holding a copy of it. The buffers form a
//! small pool:
//! - a buffer is sized to the unit it holds, and a free buffer is reused by a
//!   unit of the same byte size (decoder layers reuse each other's; the
//!   embedding and the head get their own);
//! - at most `lookahead + (buffers under a live guard) + 1` buffers exist
//!   when one is added, so device memory stays bounded by the lookahead;
//! - a released buffer keeps its data: fetching the same unit again before
//!   the buffer is reused copies nothing. When a load needs a buffer, the
//!   victim is the free buffer whose unit the declared order needs last (not
//!   at all first), the least recently released among equals.
//!
//! [`WeightStore::schedule`] declares the order of a pass; a fetch that
//! follows it moves a cursor there and prefetches the next `lookahead`
//! entries of the order, on the copy stream, while the caller computes with
//! the fetched unit. A prefetch never takes a buffer whose unit is needed
//! before the unit being prefetched; when no buffer can be taken it is
//! skipped, and the fetch loads on demand. A fetch outside the order loads on
//! demand and leaves the cursor where it is.
//!
//! Ordering on CUDA: a load makes the copy stream wait for the compute work
//! queued before the buffer's last release (or, for a buffer never released,
//! all compute work queued so far: the allocator may have handed out memory
//! that compute work still reads), copies on the copy stream and records a
//! `ready` event there; a fetch makes the compute stream wait for `ready`;
//! dropping a guard records the compute stream's position as the buffer's
//! last release. The host never blocks on a fetch. On a CPU context the same
//! pool and policy run, with host buffers and synchronous copies.
//!
//! ```
//! use llmft_offload::{OffloadedBuilder, OffloadedConfig};
//! use llmft_tensor::store::{BlobLayout, StoreBuilder, Unit, WeightStore};
//! use llmft_tensor::{Ctx, DType, Tensor};
//! let ctx = Ctx::cpu();
//! let mut b = OffloadedBuilder::new(&ctx, 3, OffloadedConfig::default())?;
//! let stats = b.stats_handle();
//! for unit in Unit::all(1) {
//!     let mut layout = BlobLayout::default();
//!     layout.push("w", DType::F32, &[2]);
//!     let blob = b.alloc(unit, layout)?;
//!     blob.get("w")?.copy_from(&ctx, &Tensor::from_slice(&ctx, &[1f32, 2.0], &[2])?)?;
//!     b.add(unit, blob)?;
//! }
//! let store = Box::new(b).finish()?;
//! let order: Vec<Unit> = Unit::all(1).collect();
//! store.schedule(&order)?;
//! for &unit in &order {
//!     let u = store.fetch(unit)?;
//!     assert_eq!(u.get("w")?.to_vec::<f32>()?, vec![1.0, 2.0]);
//! }
//! assert_eq!(stats.get().demand_loads, 0); // every unit was prefetched
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use llmft_tensor::store::{
    BlobLayout, StoreBuilder, StoreBytes, Unit, UnitBlob, UnitGuard, WeightStore,
};
use llmft_tensor::{Ctx, DType, Device, Event, StreamKind, Tensor};

use crate::Error;

type TResult<T> = llmft_tensor::Result<T>;

/// The setting this store implements, named in its errors.
pub const PARAMS_SETTING: &str = "offload.params";

/// Options of [`Offloaded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadedConfig {
    /// Units of the declared order prefetched ahead of the one in use (0:
    /// every fetch loads on demand).
    pub lookahead: usize,
    /// Host bytes the units will need in all, when known (the loader knows
    /// from the checkpoint): checked against the memory available before
    /// anything is allocated, so a run that cannot fit stops at once.
    pub expected_host_bytes: Option<usize>,
    /// Keep the embedding's home copy on the device: every pass starts with
    /// it, where no compute can hide its copy (1 GiB at 8B width); it is
    /// then never moved.
    pub keep_embedding: bool,
}

impl Default for OffloadedConfig {
    fn default() -> Self {
        Self {
            lookahead: 1,
            expected_host_bytes: None,
            keep_embedding: false,
        }
    }
}

/// Host memory available to this process, in bytes: `MemAvailable` of
/// `/proc/meminfo`, lowered to what the cgroup (v2) memory limit leaves.
/// `None` where `/proc/meminfo` cannot be read (not Linux).
pub fn host_memory_available() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let avail = parse_mem_available(&meminfo)?;
    Some(match cgroup_memory_left() {
        Some(left) => avail.min(left),
        None => avail,
    })
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn parse_mem_available(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut it = line["MemAvailable:".len()..].split_whitespace();
    let n: usize = it.next()?.parse().ok()?;
    let scale = match it.next() {
        Some("kB") | Some("KB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    n.checked_mul(scale)
}

/// Bytes the cgroup v2 memory limit of this process still allows, if it has one.
fn cgroup_memory_left() -> Option<usize> {
    let read = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok();
    let max: usize = read("memory.max")?.trim().parse().ok()?; // "max": no limit
    let current: usize = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// What the host memory of a setting holds, for error messages.
pub(crate) fn host_memory_purpose(setting: &str) -> &'static str {
    match setting {
        "offload.params" => " for the model's frozen weights",
        "offload.optimizer" => " for the optimizer's master weights and moments",
        "offload.activations" => " for the saved activations",
        _ => "",
    }
}

/// Fails with [`Error::HostMemory`] when `needed` bytes of host memory exceed
/// what is available ([`host_memory_available`]); passes where that cannot
/// be read. `setting` names the configuration key that asks for the memory
/// (`offload.params`, `offload.optimizer`, `offload.activations`).
pub fn check_host_memory(setting: &str, needed: usize) -> Result<(), Error> {
    match host_memory_available() {
        Some(available) if needed > available => Err(Error::HostMemory {
            setting: setting.to_string(),
            needed,
            available,
        }),
        _ => Ok(()),
    }
}

/// Counters of an [`Offloaded`] store, for benchmarks and tests. A cheap
/// cloneable handle: take one from [`OffloadedBuilder::stats_handle`] before
/// the store disappears behind `Box<dyn WeightStore>`.
#[derive(Debug, Clone, Default)]
pub struct OffloadStats(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    fetches: AtomicU64,
    hits: AtomicU64,
    prefetch_hits: AtomicU64,
    loads: AtomicU64,
    demand_loads: AtomicU64,
    prefetch_loads: AtomicU64,
    prefetch_skipped: AtomicU64,
    bytes_copied: AtomicU64,
    buffers_allocated: AtomicU64,
    peak_buffers: AtomicU64,
}

/// A snapshot of [`OffloadStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffloadCounters {
    /// Calls of `fetch`.
    pub fetches: u64,
    /// Fetches served by a buffer that already held the unit (no copy
    /// issued by the fetch): prefetched, or kept since an earlier fetch.
    /// `fetches == hits + demand_loads`.
    pub hits: u64,
    /// Hits whose buffer was loaded by a prefetch (first fetch after it).
    pub prefetch_hits: u64,
    /// Host-to-device copies of a unit.
    pub loads: u64,
    /// Loads issued by a fetch for the unit it returns (not overlapped).
    pub demand_loads: u64,
    /// Loads issued ahead of use (by `schedule` or a fetch's prefetch).
    pub prefetch_loads: u64,
    /// Prefetches skipped because no buffer could be taken.
    pub prefetch_skipped: u64,
    /// Bytes copied by loads.
    pub bytes_copied: u64,
    /// Device buffers allocated (a reused buffer counts once).
    pub buffers_allocated: u64,
    /// Most buffers that existed at once.
    pub peak_buffers: u64,
}

impl OffloadStats {
    /// A handle with zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current counters.
    pub fn get(&self) -> OffloadCounters {
        let c = &*self.0;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        OffloadCounters {
            fetches: l(&c.fetches),
            hits: l(&c.hits),
            prefetch_hits: l(&c.prefetch_hits),
            loads: l(&c.loads),
            demand_loads: l(&c.demand_loads),
            prefetch_loads: l(&c.prefetch_loads),
            prefetch_skipped: l(&c.prefetch_skipped),
            bytes_copied: l(&c.bytes_copied),
            buffers_allocated: l(&c.buffers_allocated),
            peak_buffers: l(&c.peak_buffers),
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
            &c.loads,
            &c.demand_loads,
            &c.prefetch_loads,
            &c.prefetch_skipped,
            &c.bytes_copied,
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
    llmft_tensor::Error::Invalid {
        op: PARAMS_SETTING,
        msg,
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

/// Builds an [`Offloaded`] store: blobs are allocated in pinned host memory,
/// filled by the loader and handed back.
pub struct OffloadedBuilder {
    ctx: Ctx,
    cfg: OffloadedConfig,
    homes: Vec<Option<UnitBlob>>,
    pinned: usize,
    stats: OffloadStats,
}

impl OffloadedBuilder {
    /// A builder of a store of `num_units` units (layers + 2) on `ctx`.
    /// With `cfg.expected_host_bytes`, fails with [`Error::HostMemory`] when
    /// that exceeds the host memory available.
    pub fn new(ctx: &Ctx, num_units: usize, cfg: OffloadedConfig) -> Result<Self, Error> {
        if num_units < 2 {
            return Err(Error::Invalid(format!(
                "{PARAMS_SETTING}: a store needs at least 2 units (embedding and head), got {num_units}"
            )));
        }
        if let Some(needed) = cfg.expected_host_bytes {
            check_host_memory(PARAMS_SETTING, needed)?;
        }
        Ok(Self {
            ctx: ctx.clone(),
            cfg,
            homes: vec![None; num_units],
            pinned: 0,
            stats: OffloadStats::new(),
        })
    }

    /// A handle on the counters of the store this builder makes.
    pub fn stats_handle(&self) -> OffloadStats {
        self.stats.clone()
    }

    /// The store, as its concrete type (for [`Offloaded::stats`]);
    /// [`StoreBuilder::finish`] boxes it.
    pub fn build(self) -> TResult<Offloaded> {
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
        Ok(Offloaded {
            shared: Arc::new(Shared {
                ctx: self.ctx,
                lookahead: self.cfg.lookahead,
                kept: self.cfg.keep_embedding.then_some(0),
                homes,
                state: Mutex::new(State {
                    slots: Vec::new(),
                    holder: vec![None; n],
                    order: Vec::new(),
                    cursor: 0,
                    tick: 0,
                    home_read: (0..n).map(|_| Arc::new(Event::done())).collect(),
                }),
                stats: self.stats,
            }),
        })
    }
}

impl StoreBuilder for OffloadedBuilder {
    fn alloc(&mut self, unit: Unit, layout: BlobLayout) -> TResult<UnitBlob> {
        unit_index(unit, self.homes.len())?;
        if self.cfg.keep_embedding && unit == Unit::Embed {
            return UnitBlob::zeros(&self.ctx, layout);
        }
        let bytes = layout.alloc_bytes();
        match UnitBlob::zeros_pinned(&self.ctx, layout) {
            Ok(b) => {
                self.pinned += bytes;
                Ok(b)
            }
            Err(e) => {
                let verb = match self.ctx.device() {
                    Device::Cpu => "allocate",
                    Device::Cuda(_) => "pin",
                };
                let of = match self.cfg.expected_host_bytes {
                    Some(t) => format!(" of {t} needed"),
                    None => String::new(),
                };
                let cause = match &e {
                    llmft_tensor::Error::HostOutOfMemory { .. } => String::new(),
                    llmft_tensor::Error::Invalid {
                        op: "zeros_pinned", ..
                    } => String::new(),
                    other => format!(": {other}"),
                };
                Err(invalid(format!(
                    "could not {verb} {bytes} bytes of host memory for {unit} ({} bytes pinned so far{of}){cause}",
                    self.pinned
                )))
            }
        }
    }

    fn add(&mut self, unit: Unit, blob: UnitBlob) -> TResult<UnitBlob> {
        let i = unit_index(unit, self.homes.len())?;
        let kept = self.cfg.keep_embedding && unit == Unit::Embed;
        if blob.bytes.device() != Device::Cpu && !(kept && blob.bytes.device() == self.ctx.device())
        {
            return Err(llmft_tensor::Error::Device {
                op: PARAMS_SETTING,
                what: "unit blob",
                got: blob.bytes.device(),
                expected: Device::Cpu,
            });
        }
        if blob.bytes.dtype() != DType::U8 || blob.bytes.numel() != blob.layout.alloc_bytes() {
            return Err(invalid(format!(
                "the blob of {unit} is {} {}, its layout needs {} bytes of u8",
                blob.bytes.numel(),
                blob.bytes.dtype(),
                blob.layout.alloc_bytes()
            )));
        }
        self.homes[i] = Some(blob.clone());
        Ok(blob)
    }

    fn finish(self: Box<Self>) -> TResult<Box<dyn WeightStore>> {
        Ok(Box::new(self.build()?))
    }
}

/// The offloaded store. See the module docs.
pub struct Offloaded {
    shared: Arc<Shared>,
}

struct Shared {
    ctx: Ctx,
    lookahead: usize,
    /// The unit whose home copy is on the device (`keep_embedding`): fetched
    /// as it is, never in the order of loads.
    kept: Option<usize>,
    homes: Vec<UnitBlob>,
    state: Mutex<State>,
    stats: OffloadStats,
}

struct State {
    /// Device buffers by id; `None` where one was freed (ids stay stable
    /// while guards refer to them).
    slots: Vec<Option<Slot>>,
    /// The buffer holding (or loading) each unit's data.
    holder: Vec<Option<usize>>,
    /// Unit indices of the declared order.
    order: Vec<usize>,
    /// Next entry of `order` expected.
    cursor: usize,
    /// Release clock, for least-recently-released choices.
    tick: u64,
    /// Completion of the last copy out of each unit's home copy (a write
    /// waits for it before overwriting the home).
    home_read: Vec<Arc<Event>>,
}

struct Slot {
    buf: Tensor,
    bytes: usize,
    /// Whose data the buffer holds (valid once `ready` completes).
    unit: Option<usize>,
    /// Live guards.
    refs: usize,
    /// Completion of the last load, on the copy stream.
    ready: Arc<Event>,
    /// The compute stream's position at the last release; `None` for a buffer
    /// never released (or when recording failed): the next load then waits
    /// for all compute work queued so far.
    last_release: Option<Event>,
    released_at: u64,
    /// Loaded by a prefetch and not fetched since.
    prefetched: bool,
}

#[derive(Clone, Copy)]
enum Need {
    /// A fetch waits for this load.
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

    /// The best victim among free slots passing `ok`.
    fn best_victim(&self, ok: impl Fn(&Slot) -> bool) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .filter(|(_, s)| s.refs == 0 && ok(s))
            .max_by_key(|(_, s)| self.victim_rank(s))
            .map(|(i, _)| i)
    }

    /// Detaches slot `id` from the unit it held.
    fn detach(&mut self, id: usize) {
        if let Some(s) = self.slots[id].as_mut() {
            if let Some(u) = s.unit.take() {
                if self.holder[u] == Some(id) {
                    self.holder[u] = None;
                }
            }
            s.prefetched = false;
        }
    }

    /// Frees slot `id` (a free one).
    fn free(&mut self, id: usize) {
        self.detach(id);
        self.slots[id] = None;
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer for loading unit `u`, or `None` (a prefetch that would have
    /// to evict something needed sooner, or exceed the budget).
    fn take_buffer(&self, st: &mut State, u: usize, need: Need) -> TResult<Option<usize>> {
        let bytes = self.homes[u].layout.alloc_bytes();
        let guarded = st.slots.iter().flatten().filter(|s| s.refs > 0).count();
        let cap = self.lookahead + guarded + 1;
        let mine = match need {
            Need::Demand => 0,
            Need::Prefetch(p) => p,
        };
        // A prefetch may only evict data needed after the unit it loads.
        let acceptable = |st: &State, s: &Slot| match need {
            Need::Demand => true,
            Need::Prefetch(_) => st.next_use(s.unit) > mine,
        };
        // Give back buffers over the budget that hold nothing still ahead.
        while st.live() > cap {
            let dead = st.best_victim(|s| st.next_use(s.unit) == usize::MAX);
            match dead {
                Some(id) => st.free(id),
                None => break,
            }
        }
        // A same-size buffer holding nothing ahead is as good as a new one.
        let same = |st: &State| st.best_victim(|s| s.bytes == bytes && acceptable(st, s));
        if let Some(id) = same(st) {
            let s = st.slots[id].as_ref().expect("victim exists");
            if s.unit.is_none() || st.next_use(s.unit) == usize::MAX || st.live() >= cap {
                st.detach(id);
                return Ok(Some(id));
            }
        }
        if st.live() >= cap {
            // Make room: a buffer of another size goes.
            match st.best_victim(|s| acceptable(st, s)) {
                Some(id) => st.free(id),
                None => match need {
                    Need::Prefetch(_) => return Ok(None),
                    // Unreachable while cap > guarded; never fail a fetch on it.
                    Need::Demand => {}
                },
            }
        }
        let buf = match Tensor::empty(&self.ctx, DType::U8, &[bytes]) {
            Ok(b) => b,
            Err(llmft_tensor::Error::OutOfMemory { .. }) if matches!(need, Need::Prefetch(_)) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let slot = Slot {
            buf,
            bytes,
            unit: None,
            refs: 0,
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
        OffloadStats::add(&c.buffers_allocated, 1);
        c.peak_buffers
            .fetch_max(st.live() as u64, Ordering::Relaxed);
        Ok(Some(id))
    }

    /// Queues the copy of unit `u`'s home into slot `id` on the copy stream.
    fn load(&self, st: &mut State, id: usize, u: usize) -> TResult<()> {
        st.detach(id);
        let home = &self.homes[u].bytes;
        let slot = st.slots[id].as_mut().expect("slot exists");
        match &slot.last_release {
            Some(ev) => self.ctx.wait(StreamKind::Copy, ev)?,
            None => self.ctx.wait_for(StreamKind::Copy, StreamKind::Compute)?,
        }
        slot.buf.copy_from_on(&self.ctx, home, StreamKind::Copy)?;
        slot.ready = Arc::new(self.ctx.record(StreamKind::Copy)?);
        slot.unit = Some(u);
        st.home_read[u] = slot.ready.clone();
        st.holder[u] = Some(id);
        let c = &self.stats.0;
        OffloadStats::add(&c.loads, 1);
        OffloadStats::add(&c.bytes_copied, slot.bytes as u64);
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
                    self.load(st, id, u)?;
                    st.slots[id].as_mut().expect("slot exists").prefetched = true;
                    OffloadStats::add(&self.stats.0.prefetch_loads, 1);
                }
                None => OffloadStats::add(&self.stats.0.prefetch_skipped, 1),
            }
        }
        Ok(())
    }

    /// The guard of slot `id` dropped.
    fn release(&self, id: usize) {
        let mut st = self.lock();
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

impl Offloaded {
    /// A builder of an offloaded store of `num_units` units on `ctx` (see
    /// [`OffloadedBuilder::new`]).
    pub fn builder(
        ctx: &Ctx,
        num_units: usize,
        cfg: OffloadedConfig,
    ) -> Result<Box<dyn StoreBuilder>, Error> {
        Ok(Box::new(OffloadedBuilder::new(ctx, num_units, cfg)?))
    }

    /// The store's counters.
    pub fn stats(&self) -> OffloadCounters {
        self.shared.stats.get()
    }

    /// A handle on the store's counters.
    pub fn stats_handle(&self) -> OffloadStats {
        self.shared.stats.clone()
    }

    /// Device buffers held now.
    pub fn buffers(&self) -> usize {
        self.shared.lock().live()
    }

    fn index(&self, unit: Unit) -> TResult<usize> {
        unit_index(unit, self.shared.homes.len())
    }
}

impl WeightStore for Offloaded {
    fn num_units(&self) -> usize {
        self.shared.homes.len()
    }

    fn layout(&self, unit: Unit) -> TResult<Arc<BlobLayout>> {
        Ok(self.shared.homes[self.index(unit)?].layout.clone())
    }

    fn schedule(&self, order: &[Unit]) -> TResult<()> {
        let sh = &*self.shared;
        let order = order
            .iter()
            .map(|&u| self.index(u))
            .filter(|u| !matches!(u, Ok(i) if Some(*i) == sh.kept))
            .collect::<TResult<Vec<_>>>()?;
        let mut st = sh.lock();
        st.order = order;
        st.cursor = 0;
        sh.prefetch(&mut st)
    }

    fn fetch(&self, unit: Unit) -> TResult<UnitGuard> {
        let u = self.index(unit)?;
        let sh = &*self.shared;
        if sh.kept == Some(u) {
            let h = &sh.homes[u];
            return Ok(UnitGuard::new(
                unit,
                h.bytes.clone(),
                h.layout.clone(),
                None,
            ));
        }
        let c = &sh.stats.0;
        let mut st = sh.lock();
        OffloadStats::add(&c.fetches, 1);
        let from = st.cursor.min(st.order.len());
        if let Some(p) = st.order[from..].iter().position(|&x| x == u) {
            st.cursor = from + p + 1;
        }
        let id = match st.holder[u] {
            Some(id) => {
                let s = st.slots[id].as_mut().expect("holder slot exists");
                OffloadStats::add(&c.hits, 1);
                if std::mem::take(&mut s.prefetched) {
                    OffloadStats::add(&c.prefetch_hits, 1);
                }
                id
            }
            None => {
                let id = sh
                    .take_buffer(&mut st, u, Need::Demand)?
                    .expect("a demand load always gets a buffer");
                sh.load(&mut st, id, u)?;
                OffloadStats::add(&c.demand_loads, 1);
                id
            }
        };
        let s = st.slots[id].as_mut().expect("slot exists");
        sh.ctx.wait(StreamKind::Compute, &s.ready)?;
        s.refs += 1;
        let blob = s.buf.clone();
        if let Err(e) = sh.prefetch(&mut st) {
            st.slots[id].as_mut().expect("slot exists").refs -= 1;
            return Err(e);
        }
        drop(st);
        let shared = self.shared.clone();
        Ok(UnitGuard::new(
            unit,
            blob,
            sh.homes[u].layout.clone(),
            Some(Box::new(move || shared.release(id))),
        ))
    }

    fn write(&self, unit: Unit, name: &str, src: &Tensor) -> TResult<()> {
        let u = self.index(unit)?;
        let sh = &*self.shared;
        let mut dst = sh.homes[u]
            .get(name)
            .map_err(|_| invalid(format!("{unit} has no tensor `{name}`")))?;
        if sh.kept == Some(u) {
            return dst.copy_from(&sh.ctx, src);
        }
        let mut st = sh.lock();
        if let Some(id) = st.holder[u] {
            if st.slots[id].as_ref().is_some_and(|s| s.refs > 0) {
                return Err(invalid(format!(
                    "cannot write `{name}` of {unit} while a fetched guard of it is alive"
                )));
            }
            st.detach(id);
        }
        // A copy still reading the home copy finishes first.
        st.home_read[u].synchronize()?;
        dst.copy_from(&sh.ctx, src)?;
        if src.device() != Device::Cpu {
            // A device-to-pinned copy is asynchronous: complete it here.
            sh.ctx.record(StreamKind::Compute)?.synchronize()?;
        }
        Ok(())
    }

    fn read_host(&self, unit: Unit, name: &str) -> TResult<Tensor> {
        let u = self.index(unit)?;
        let sh = &*self.shared;
        let src = sh.homes[u]
            .get(name)
            .map_err(|_| invalid(format!("{unit} has no tensor `{name}`")))?;
        let _st = sh.lock(); // no write in between
        src.to_ctx(&Ctx::cpu())
    }

    fn bytes(&self) -> StoreBytes {
        let sh = &*self.shared;
        let on = |u: usize| sh.kept == Some(u);
        let home = |want: bool| -> usize {
            (0..sh.homes.len())
                .filter(|&u| on(u) == want)
                .map(|u| sh.homes[u].bytes.bytes())
                .sum()
        };
        let (host, device) = (home(false), home(true));
        let buffers = sh
            .lock()
            .slots
            .iter()
            .flatten()
            .map(|s| s.buf.bytes())
            .sum();
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
    fn meminfo_parses() {
        let s = "MemTotal:       16384 kB\nMemFree: 1 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(parse_mem_available(s), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn units_are_checked() {
        assert_eq!(unit_index(Unit::Embed, 4).unwrap(), 0);
        assert_eq!(unit_index(Unit::Layer(1), 4).unwrap(), 2);
        assert_eq!(unit_index(Unit::Head, 4).unwrap(), 3);
        // Layer(2) of a 2-layer model would alias the head.
        assert!(unit_index(Unit::Layer(2), 4).is_err());
        assert!(unit_index(Unit::Layer(usize::MAX), 4).is_err());
    }
}
