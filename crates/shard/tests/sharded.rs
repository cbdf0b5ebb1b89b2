//! The sharded store against the blobs it was built from: every fetched
//! byte equals the original blob's, for `full_shard` and `shard_grad_op`,
//! with and without offloaded shards, in a world of one, in simulated worlds
//! of 2 and 3, and across real processes over the CPU backend (the test
//! binary re-runs itself once per rank with `LLMFT_SHARD_MODE` set and only
//! the `worker` test selected; a worker prints `SHW ...` lines the parent
//! checks).
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Harness, Output, Vars};

use llmft_shard::{
    shard_bytes, Backend, CpuGroup, GroupConfig, Pending, ProcessGroup, ShardedBuilder,
    ShardedConfig, ShardedStats, WorldInfo,
};
use llmft_tensor::store::{BlobLayout, StoreBuilder, Unit, UnitGuard, WeightStore};
use llmft_tensor::{Ctx, DType, Device, Tensor};
use proptest::prelude::*;

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 56) as u8).collect()
    }
}

/// A model's unit tables and bytes, by unit index.
#[derive(Clone)]
struct Model {
    layouts: Vec<BlobLayout>,
    data: Vec<Vec<u8>>,
}

impl Model {
    fn num_units(&self) -> usize {
        self.layouts.len()
    }

    /// `size(i)` scales unit `i`: f32, bf16 and u8 entries of about that many
    /// elements each.
    fn new(num_layers: usize, size: impl Fn(usize) -> usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let (layouts, data) = (0..num_layers + 2)
            .map(|i| {
                let s = size(i).max(1);
                let mut l = BlobLayout::default();
                l.push("w", DType::F32, &[s, 3]);
                l.push("norm", DType::BF16, &[s + 1]);
                l.push("q", DType::U8, &[2 * s + 5]);
                let d = rng.bytes(l.alloc_bytes());
                (l, d)
            })
            .unzip();
        Self { layouts, data }
    }

    /// Units of one u8 entry of `sizes[i]` bytes (any size, down to 1).
    fn bytes_only(sizes: &[usize], seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let (layouts, data) = sizes
            .iter()
            .map(|&s| {
                let mut l = BlobLayout::default();
                l.push("q", DType::U8, &[s.max(1)]);
                let d = rng.bytes(l.alloc_bytes());
                (l, d)
            })
            .unzip();
        Self { layouts, data }
    }

    fn entry_bytes(&self, u: usize, name: &str) -> &[u8] {
        let e = self.layouts[u].entry(name).unwrap();
        &self.data[u][e.offset..e.offset + e.bytes()]
    }

    /// Overwrites entry `name` of unit `u` with random bytes; the new value
    /// as a host tensor.
    fn rewrite(&mut self, u: usize, name: &str, seed: u64) -> Tensor {
        let e = self.layouts[u].entry(name).unwrap().clone();
        let new = Rng::new(seed).bytes(e.bytes());
        let mut src = Tensor::zeros(&Ctx::cpu(), e.dtype, &e.shape).unwrap();
        src.as_bytes_mut().unwrap().copy_from_slice(&new);
        self.data[u][e.offset..e.offset + e.bytes()].copy_from_slice(&new);
        src
    }
}

fn unit(i: usize, n: usize) -> Unit {
    Unit::from_index(i, n)
}

/// Embedding, layers, head, layers backwards, embedding.
fn train_order(num_layers: usize) -> Vec<Unit> {
    let mut v: Vec<Unit> = Unit::all(num_layers).collect();
    v.extend((0..num_layers).rev().map(Unit::Layer));
    v.push(Unit::Embed);
    v
}

fn single() -> Arc<dyn ProcessGroup> {
    Arc::new(CpuGroup::connect(&WorldInfo::single(), &GroupConfig::default()).unwrap())
}

fn config(
    simulate: Option<usize>,
    reshard: bool,
    offload: bool,
    lookahead: usize,
) -> ShardedConfig {
    ShardedConfig {
        reshard_after_forward: reshard,
        offload,
        lookahead,
        simulate_world: simulate,
    }
}

/// Loads `m` into a builder the way the models loader does: fill the staged
/// blob, hand it over, drop what comes back.
fn fill(ctx: &Ctx, b: &mut dyn StoreBuilder, m: &Model) -> llmft_tensor::Result<()> {
    let n = m.num_units();
    for i in 0..n {
        let blob = b.alloc(unit(i, n), m.layouts[i].clone())?;
        let host = Tensor::from_slice(&Ctx::cpu(), &m.data[i], &[m.data[i].len()])?;
        blob.bytes.clone().copy_from(ctx, &host)?;
        b.add(unit(i, n), blob)?;
    }
    Ok(())
}

fn build(
    group: Arc<dyn ProcessGroup>,
    m: &Model,
    cfg: ShardedConfig,
) -> (Box<dyn WeightStore>, ShardedStats) {
    let ctx = Ctx::cpu();
    let mut b = ShardedBuilder::new(&ctx, m.num_units(), group, cfg).unwrap();
    let stats = b.stats_handle();
    fill(&ctx, &mut b, m).unwrap();
    (Box::new(b).finish().unwrap(), stats)
}

fn host_bytes(t: &Tensor) -> Vec<u8> {
    t.to_ctx(&Ctx::cpu()).unwrap().as_bytes().unwrap().to_vec()
}

/// `g` holds exactly the model's bytes for its unit; a description of the
/// first difference otherwise.
fn guard_matches(g: &UnitGuard, m: &Model) -> Result<(), String> {
    let u = g.unit().index(m.num_units());
    if g.layout().as_ref() != &m.layouts[u] {
        return Err(format!("{}: another layout", g.unit()));
    }
    if host_bytes(g.blob()) != m.data[u] {
        return Err(format!("{}: the blob differs", g.unit()));
    }
    for e in &m.layouts[u].entries {
        let t = g.get(&e.name).unwrap();
        if (t.dtype(), t.shape()) != (e.dtype, e.shape.as_slice())
            || host_bytes(&t) != m.entry_bytes(u, &e.name)
        {
            return Err(format!("{}: entry {} differs", g.unit(), e.name));
        }
    }
    Ok(())
}

fn check_guard(g: &UnitGuard, m: &Model) {
    guard_matches(g, m).unwrap();
}

/// The sum of this rank's shard bytes over the units in a world of `w`.
fn shard_total(m: &Model, w: usize) -> usize {
    m.layouts
        .iter()
        .map(|l| shard_bytes(l.alloc_bytes(), w))
        .sum()
}

#[test]
fn fetches_in_simulated_worlds_equal_the_blobs() {
    let layers = 4;
    let m = Model::new(layers, |i| [300, 120, 120, 120, 120, 310][i], 7);
    let n = m.num_units();
    let order = train_order(layers);
    for simulate in [None, Some(2), Some(3)] {
        let w = simulate.unwrap_or(1);
        for reshard in [true, false] {
            for offload in [false, true] {
                for lookahead in [1, 2] {
                    let cfg = config(simulate, reshard, offload, lookahead);
                    let what = format!("{cfg:?}");
                    let (s, stats) = build(single(), &m, cfg);
                    for pass in 0..2 {
                        s.schedule(&order).unwrap();
                        for &u in &order {
                            let g = s.fetch(u).unwrap();
                            assert_eq!(g.blob().bytes(), m.data[u.index(n)].len(), "{what}");
                            check_guard(&g, &m);
                        }
                        let c = stats.get();
                        let what = format!("{what} pass {pass}: {c:?}");
                        assert_eq!(c.fetches, c.hits + c.demand, "{what}");
                        assert_eq!(c.gathers, c.demand + c.prefetched, "{what}");
                        assert_eq!(c.demand, 0, "{what}");
                        assert_eq!(c.prefetch_skipped, 0, "{what}");
                        if reshard {
                            assert!(c.peak_buffers <= lookahead as u64 + 2, "{what}");
                        } else {
                            // shard_grad_op: each unit gathered once per step.
                            if pass == 0 {
                                assert_eq!(c.gathers, n as u64, "{what}");
                            }
                            assert!(c.gathers <= (n * (pass + 1)) as u64, "{what}");
                            assert!(c.peak_buffers <= (n + lookahead + 1) as u64, "{what}");
                        }
                    }
                    let b = s.bytes();
                    let total = shard_total(&m, w);
                    if offload {
                        assert_eq!((b.device, b.host), (0, total), "{what}");
                    } else {
                        assert_eq!((b.device, b.host), (total, 0), "{what}");
                    }
                    let biggest = m.layouts.iter().map(|l| l.alloc_bytes()).max().unwrap();
                    let buf_max = w * shard_bytes(biggest, w);
                    assert!(b.buffers > 0 && b.buffers <= n * buf_max, "{what}");
                    let c = stats.get();
                    assert_eq!(c.simulated_peer_bytes, ((w - 1) * total) as u64);
                    assert_eq!(c.gathered_bytes % 256, 0);
                }
            }
        }
    }
}

#[test]
fn full_shard_regathers_and_shard_grad_op_holds() {
    let layers = 3;
    let m = Model::new(layers, |_| 64, 3);
    let order = train_order(layers);
    let mut gathers = Vec::new();
    for reshard in [true, false] {
        let (s, stats) = build(single(), &m, config(Some(2), reshard, false, 1));
        s.schedule(&order).unwrap();
        for &u in &order {
            drop(s.fetch(u).unwrap());
        }
        gathers.push(stats.get().gathers);
    }
    // full_shard: the first layers and the embedding come back in backward;
    // shard_grad_op: each of the 5 units once.
    assert!(gathers[0] > 5, "{gathers:?}");
    assert_eq!(gathers[1], 5, "{gathers:?}");
}

#[test]
fn out_of_order_fetches() {
    let layers = 4;
    let m = Model::new(layers, |i| 50 + 10 * (i % 3), 11);
    for reshard in [true, false] {
        for offload in [false, true] {
            let (s, stats) = build(single(), &m, config(Some(3), reshard, offload, 1));
            let check = |u: Unit| check_guard(&s.fetch(u).unwrap(), &m);
            // Before any order: on demand.
            check(Unit::Layer(2));
            check(Unit::Head);
            assert_eq!(stats.get().demand, 2);
            let fwd: Vec<Unit> = Unit::all(layers).collect();
            s.schedule(&fwd).unwrap();
            check(Unit::Embed);
            check(Unit::Layer(2));
            check(Unit::Layer(3));
            check(Unit::Layer(0));
            check(Unit::Head);
            check(Unit::Layer(1));
            check(Unit::Embed);
            // Guards alive at once, of one unit and of several.
            let a = s.fetch(Unit::Layer(1)).unwrap();
            let b = s.fetch(Unit::Layer(1)).unwrap();
            let h = s.fetch(Unit::Head).unwrap();
            assert!(a.blob().same_storage(b.blob()));
            for &u in &train_order(layers) {
                check(u);
            }
            for g in [&a, &b, &h] {
                check_guard(g, &m);
            }
            let c = stats.get();
            assert_eq!(c.fetches, c.hits + c.demand, "{c:?}");
            assert_eq!(c.gathers, c.demand + c.prefetched, "{c:?}");
            // Units that do not exist.
            assert!(s.fetch(Unit::Layer(layers)).is_err());
            assert!(s.schedule(&[Unit::Embed, Unit::Layer(9)]).is_err());
            assert!(s.layout(Unit::Layer(layers)).is_err());
            assert!(s.read_host(Unit::Layer(layers), "w").is_err());
            assert_eq!(s.num_units(), m.num_units());
            assert!(s.device_view(Unit::Embed, "w").is_none());
        }
    }
}

#[test]
fn writes_are_seen_by_fetches_and_read_host() {
    let layers = 2;
    for simulate in [None, Some(2), Some(3)] {
        for reshard in [true, false] {
            for offload in [false, true] {
                let mut m = Model::new(layers, |i| 90 + 5 * i, 9);
                let n = m.num_units();
                let (s, stats) = build(single(), &m, config(simulate, reshard, offload, 1));
                let order = train_order(layers);
                s.schedule(&order).unwrap();
                drop(s.fetch(Unit::Embed).unwrap()); // layer 0 is gathered now
                                                     // "w" (1080 bytes) spans every rank's shard.
                for (u, name, seed) in [(1, "w", 1), (1, "q", 2), (n - 1, "norm", 3)] {
                    let src = m.rewrite(u, name, seed);
                    s.write(unit(u, n), name, &src).unwrap();
                }
                for &u in &order {
                    check_guard(&s.fetch(u).unwrap(), &m);
                }
                for i in 0..n {
                    for e in &m.layouts[i].entries {
                        let h = s.read_host(unit(i, n), &e.name).unwrap();
                        assert_eq!(h.device(), Device::Cpu);
                        assert_eq!((h.dtype(), h.shape()), (e.dtype, e.shape.as_slice()));
                        assert_eq!(h.as_bytes().unwrap(), m.entry_bytes(i, &e.name));
                    }
                }
                // shard_grad_op: a write to a unit held between forward and
                // backward reaches its buffer; no gather sees it.
                s.schedule(&order).unwrap();
                for &u in &order[..layers + 2] {
                    drop(s.fetch(u).unwrap());
                }
                let src = m.rewrite(1, "w", 4);
                s.write(Unit::Layer(0), "w", &src).unwrap();
                let before = stats.get().gathers;
                for &u in &order[layers + 2..] {
                    check_guard(&s.fetch(u).unwrap(), &m);
                }
                if !reshard {
                    assert_eq!(stats.get().gathers, before);
                }
                // A guard of the unit is alive: refused, nothing changes.
                let g = s.fetch(Unit::Layer(1)).unwrap();
                let mut other = s.read_host(Unit::Layer(1), "w").unwrap();
                other.as_bytes_mut().unwrap().fill(7);
                let err = s.write(Unit::Layer(1), "w", &other).unwrap_err();
                assert!(err.to_string().contains("guard"), "{err}");
                check_guard(&g, &m);
                drop(g);
                assert!(s.write(Unit::Layer(1), "nope", &other).is_err());
                assert!(s.write(Unit::Layer(1), "q", &other).is_err());
                assert!(s.write(Unit::Layer(9), "w", &other).is_err());
                assert!(s.read_host(Unit::Layer(1), "nope").is_err());
                for &u in &order {
                    check_guard(&s.fetch(u).unwrap(), &m);
                }
            }
        }
    }
}

/// A group that claims `world` ranks and fails every collective.
struct FakeGroup(usize);

impl ProcessGroup for FakeGroup {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        self.0
    }
    fn backend(&self) -> Backend {
        Backend::Cpu
    }
    fn all_reduce_sum(&self, _: &Ctx, _: &mut Tensor) -> llmft_shard::Result<()> {
        Err(fake())
    }
    fn all_gather(&self, _: &Ctx, _: &Tensor, _: &mut Tensor) -> llmft_shard::Result<()> {
        Err(fake())
    }
    fn reduce_scatter_sum(&self, _: &Ctx, _: &Tensor, _: &mut Tensor) -> llmft_shard::Result<()> {
        Err(fake())
    }
    fn broadcast(&self, _: &Ctx, _: &mut Tensor, _: usize) -> llmft_shard::Result<()> {
        Err(fake())
    }
    fn barrier(&self, _: &Ctx) -> llmft_shard::Result<()> {
        Err(fake())
    }
    fn all_gather_start(
        &self,
        _: &Ctx,
        _: &Tensor,
        _: &mut Tensor,
    ) -> llmft_shard::Result<Pending> {
        Err(fake())
    }
}

fn fake() -> llmft_shard::Error {
    llmft_shard::Error::Invalid {
        op: "fake",
        msg: "no peers".into(),
    }
}

#[test]
fn bad_input_is_an_error() {
    let ctx = Ctx::cpu();
    let new = |n: usize, g: Arc<dyn ProcessGroup>, cfg: ShardedConfig| {
        ShardedBuilder::new(&ctx, n, g, cfg)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let e = new(3, Arc::new(FakeGroup(2)), config(Some(2), true, false, 1)).unwrap_err();
    assert!(e.contains("simulate_world") && e.contains("2 ranks"), "{e}");
    assert!(new(3, single(), config(Some(0), true, false, 1)).is_err());
    assert!(new(3, single(), config(None, true, false, 0)).is_err());
    assert!(new(1, single(), ShardedConfig::default()).is_err());

    let m = Model::new(1, |_| 10, 1);
    let mut b = ShardedBuilder::new(&ctx, 3, single(), config(Some(2), true, false, 1)).unwrap();
    assert!(b.alloc(Unit::Layer(1), m.layouts[1].clone()).is_err());
    let blob = b.alloc(Unit::Embed, m.layouts[0].clone()).unwrap();
    b.add(Unit::Embed, blob.clone()).unwrap();
    let e = b.add(Unit::Embed, blob.clone()).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
    // A blob of another size, of another dtype, of a unit not in the store.
    let mut short = b.alloc(Unit::Head, m.layouts[2].clone()).unwrap();
    short.bytes = short.bytes.view(0, &[10]).unwrap();
    assert!(b.add(Unit::Head, short).is_err());
    let mut wide = b.alloc(Unit::Head, m.layouts[2].clone()).unwrap();
    wide.bytes = Tensor::zeros(&ctx, DType::F32, &[m.layouts[2].alloc_bytes() / 4]).unwrap();
    assert!(b.add(Unit::Head, wide).is_err());
    assert!(b.add(Unit::Layer(1), blob.clone()).is_err());
    let e = Box::new(b).finish().err().unwrap();
    assert!(e.to_string().contains("never added"), "{e}");

    // A real world of 2 whose peers never answer: the layout check fails
    // as an error.
    let mut b =
        ShardedBuilder::new(&ctx, 3, Arc::new(FakeGroup(2)), ShardedConfig::default()).unwrap();
    fill(&ctx, &mut b, &m).unwrap();
    let e = Box::new(b).finish().err().unwrap();
    assert!(e.to_string().contains("no peers"), "{e}");
}

#[derive(Debug, Clone)]
enum Op {
    Train,
    Fetch(usize, bool),
    Drop(usize),
    Write(usize, u64),
    Read(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Train),
        8 => (0..8usize, prop::bool::weighted(0.3)).prop_map(|(u, k)| Op::Fetch(u, k)),
        2 => (0..8usize).prop_map(Op::Drop),
        1 => (0..8usize, any::<u64>()).prop_map(|(u, s)| Op::Write(u, s)),
        1 => (0..8usize).prop_map(Op::Read),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn random_sizes_and_worlds_fetch_the_blobs(
        sizes in prop::collection::vec(prop_oneof![1..5usize, 1..2000usize], 2..6),
        world in 1..=4usize,
        reshard in any::<bool>(),
        offload in any::<bool>(),
        lookahead in 1..4usize,
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let mut m = Model::bytes_only(&sizes, 17);
        let n = m.num_units();
        let (s, stats) = build(single(), &m, config(Some(world), reshard, offload, lookahead));
        prop_assert_eq!(s.bytes().device + s.bytes().host, shard_total(&m, world));
        let mut alive: Vec<UnitGuard> = Vec::new();
        for op in &ops {
            match op {
                Op::Train => s.schedule(&train_order(n - 2)).unwrap(),
                Op::Fetch(u, keep) => {
                    let g = s.fetch(unit(u % n, n)).unwrap();
                    prop_assert!(guard_matches(&g, &m).is_ok(), "{:?}", guard_matches(&g, &m));
                    if *keep && alive.len() < 4 {
                        alive.push(g);
                    }
                }
                Op::Drop(i) => {
                    if !alive.is_empty() {
                        let i = i % alive.len();
                        alive.swap_remove(i);
                    }
                }
                Op::Write(u, seed) => {
                    let (u, un) = (u % n, unit(u % n, n));
                    if !alive.iter().any(|g| g.unit() == un) {
                        let src = m.rewrite(u, "q", *seed);
                        s.write(un, "q", &src).unwrap();
                    }
                }
                Op::Read(u) => {
                    let h = s.read_host(unit(u % n, n), "q").unwrap();
                    prop_assert_eq!(h.as_bytes().unwrap(), m.entry_bytes(u % n, "q"));
                }
            }
            for g in &alive {
                prop_assert!(guard_matches(g, &m).is_ok(), "{:?}", guard_matches(g, &m));
            }
            let c = stats.get();
            prop_assert_eq!(c.fetches, c.hits + c.demand);
            prop_assert_eq!(c.gathers, c.demand + c.prefetched);
        }
    }
}

#[test]
fn sharded_store_is_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<llmft_shard::Sharded>();
    is::<ShardedStats>();
}

// ------------------------------------------------------- real processes

const HARNESS: Harness = Harness {
    mode_var: "LLMFT_SHARD_MODE",
    tag: "SHW",
};

/// The worker's entry; a no-op when this binary runs as the test suite.
#[test]
fn worker() {
    HARNESS.worker(run_worker);
}

fn run_worker(mode: &str) -> Result<(), String> {
    let world = WorldInfo::from_env().map_err(|e| e.to_string())?;
    let cfg = GroupConfig {
        timeout: Duration::from_secs(10),
        rendezvous_timeout: Duration::from_secs(10),
        ..GroupConfig::default()
    };
    let pg: Arc<dyn ProcessGroup> =
        Arc::new(CpuGroup::connect(&world, &cfg).map_err(|e| e.to_string())?);
    match mode {
        "store" => store_worker(pg),
        "mismatch" => mismatch_worker(pg),
        m => Err(format!("unknown mode {m}")),
    }
}

/// Every rank builds the same store, fetches in schedule order, writes the
/// same values and reads entries back (collectively).
fn store_worker(pg: Arc<dyn ProcessGroup>) -> Result<(), String> {
    let (r, w) = (pg.rank(), pg.world_size());
    let layers = 3;
    let order = train_order(layers);
    for (reshard, offload, lookahead) in [
        (true, false, 1),
        (false, false, 2),
        (true, true, 2),
        (false, true, 1),
    ] {
        let what = format!("rank {r} reshard {reshard} offload {offload}");
        let mut m = Model::new(layers, |i| [500, 200, 200, 200, 700][i], 5);
        let n = m.num_units();
        let (s, stats) = build(pg.clone(), &m, config(None, reshard, offload, lookahead));
        let b = s.bytes();
        let total = shard_total(&m, w);
        let whole: usize = m.data.iter().map(|d| d.len()).sum();
        if b.device + b.host != total || total < whole / w || total >= whole / w + 256 * n {
            return Err(format!("{what}: {b:?} for {whole} bytes of units"));
        }
        for _ in 0..2 {
            s.schedule(&order).map_err(|e| e.to_string())?;
            for &u in &order {
                let g = s.fetch(u).map_err(|e| e.to_string())?;
                guard_matches(&g, &m).map_err(|e| format!("{what}: {e}"))?;
            }
        }
        let c = stats.get();
        if c.demand != 0 || c.gathers != c.prefetched {
            return Err(format!("{what}: {c:?}"));
        }
        for (u, name, seed) in [(1, "w", 1), (2, "q", 2), (n - 1, "norm", 3), (0, "w", 4)] {
            let src = m.rewrite(u, name, seed);
            s.write(unit(u, n), name, &src).map_err(|e| e.to_string())?;
        }
        s.schedule(&order).map_err(|e| e.to_string())?;
        for &u in &order {
            let g = s.fetch(u).map_err(|e| e.to_string())?;
            guard_matches(&g, &m).map_err(|e| format!("{what} after writes: {e}"))?;
        }
        for i in 0..n {
            for e in &m.layouts[i].entries {
                let h = s
                    .read_host(unit(i, n), &e.name)
                    .map_err(|e| e.to_string())?;
                if h.as_bytes().map_err(|e| e.to_string())? != m.entry_bytes(i, &e.name) {
                    return Err(format!("{what}: read_host of {} {}", unit(i, n), e.name));
                }
            }
        }
        HARNESS.say(&format!("ok {reshard} {offload} {}", b.device + b.host));
    }
    Ok(())
}

/// Rank 1 loads another model: every rank's `finish` fails, naming it.
fn mismatch_worker(pg: Arc<dyn ProcessGroup>) -> Result<(), String> {
    let extra = if pg.rank() == 1 { 1 } else { 0 };
    let m = Model::new(1, |i| 100 + extra * i, 5);
    let ctx = Ctx::cpu();
    let mut b =
        ShardedBuilder::new(&ctx, 3, pg, ShardedConfig::default()).map_err(|e| e.to_string())?;
    fill(&ctx, &mut b, &m).map_err(|e| e.to_string())?;
    match Box::new(b).finish() {
        Ok(_) => Err("finish accepted other layouts".into()),
        Err(e) => {
            HARNESS.say(&format!("refused {e}"));
            Ok(())
        }
    }
}

/// Every collective has a 10 s timeout, so a stuck rank ends by itself;
/// this is the backstop.
const JOB_WAIT: Duration = Duration::from_secs(120);

/// Runs `world` ranks in mode `mode`; each rank's exit code and output.
fn run_job(mode: &str, world: usize) -> Vec<(Option<i32>, Output)> {
    let ranks: Vec<usize> = (0..world).collect();
    let (codes, out) = HARNESS
        .spawn(mode, world, &ranks, Vars::Torchrun, |_| {})
        .finish(JOB_WAIT);
    codes.into_iter().zip(out).collect()
}

fn real_world(world: usize) {
    let t = Instant::now();
    let ranks = run_job("store", world);
    for (rank, (code, out)) in ranks.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {rank}: {out:?}");
        assert_eq!(out.lines.len(), 4, "rank {rank}: {:?}", out.lines);
    }
    // Every rank holds the same share of the model.
    assert!(
        ranks.iter().all(|(_, o)| o.lines == ranks[0].1.lines),
        "{ranks:?}"
    );
    eprintln!("world {world}: {:?}", t.elapsed());
}

#[test]
fn real_world_2() {
    real_world(2);
}

#[test]
fn real_world_3() {
    real_world(3);
}

#[test]
fn ranks_with_other_layouts_are_refused() {
    for (rank, (code, out)) in run_job("mismatch", 3).iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {rank}: {out:?}");
        let lines = &out.lines;
        assert!(
            lines.len() == 1 && lines[0].contains("rank(s) 1 built"),
            "rank {rank}: {lines:?}"
        );
    }
}
