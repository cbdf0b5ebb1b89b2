//! The offloaded weight store against the resident one: same bytes for every
//! fetch over train-like, out-of-order and random fetch sequences, on the CPU
//! always and on CUDA device 0 where one exists.
use std::sync::Arc;

use llmft_offload::{
    check_host_memory, OffloadStats, Offloaded, OffloadedBuilder, OffloadedConfig,
};
use llmft_tensor::store::{BlobLayout, Resident, StoreBuilder, Unit, UnitGuard, WeightStore};
use llmft_tensor::{ops, Ctx, DType, Device, Tensor};
use proptest::prelude::*;

/// The CPU, and CUDA device 0 where one exists.
fn contexts() -> Vec<Ctx> {
    let mut v = vec![Ctx::cpu()];
    match cuda() {
        Some(c) => v.push(c),
        None => eprintln!("no CUDA device: testing the CPU path only"),
    }
    v
}

/// CUDA device 0's context, made once per test binary; `None` (and a skip
/// message) without a device, a failure under `LLMFT_REQUIRE_GPU`.
fn cuda() -> Option<Ctx> {
    static CTX: std::sync::OnceLock<Option<Ctx>> = std::sync::OnceLock::new();
    CTX.get_or_init(llmft_tensor::testing::gpu).clone()
}

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

/// A model's unit tables and home bytes, by unit index.
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
        let n = num_layers + 2;
        let mut rng = Rng::new(seed);
        let mut layouts = Vec::new();
        let mut data = Vec::new();
        for i in 0..n {
            let s = size(i).max(1);
            let mut l = BlobLayout::default();
            l.push("w", DType::F32, &[s, 3]);
            l.push("norm", DType::BF16, &[s + 1]);
            l.push("q", DType::U8, &[2 * s + 5]);
            if i % 2 == 1 {
                l.push("absmax", DType::F32, &[s.div_ceil(4)]);
            }
            data.push(rng.bytes(l.alloc_bytes()));
            layouts.push(l);
        }
        Self { layouts, data }
    }

    /// Every unit of one layout (so every buffer fits every unit).
    fn uniform(num_layers: usize, size: usize, seed: u64) -> Self {
        let mut m = Self::new(num_layers, |_| size, seed);
        let l = m.layouts[0].clone();
        let mut rng = Rng::new(seed + 1);
        for i in 0..m.layouts.len() {
            m.data[i] = rng.bytes(l.alloc_bytes());
            m.layouts[i] = l.clone();
        }
        m
    }

    fn entry_bytes(&self, u: usize, name: &str) -> &[u8] {
        let e = self.layouts[u].entry(name).unwrap();
        &self.data[u][e.offset..e.offset + e.bytes()]
    }
}

fn unit(i: usize, n: usize) -> Unit {
    Unit::from_index(i, n)
}

/// Loads `m` into a builder.
fn fill(ctx: &Ctx, b: &mut dyn StoreBuilder, m: &Model) -> llmft_tensor::Result<()> {
    let n = m.num_units();
    for i in 0..n {
        let blob = b.alloc(unit(i, n), m.layouts[i].clone())?;
        let host = Tensor::from_slice(&Ctx::cpu(), &m.data[i], &[m.data[i].len()])?;
        blob.bytes.clone().copy_from(ctx, &host)?;
        ctx.synchronize()?;
        b.add(unit(i, n), blob)?;
    }
    Ok(())
}

struct Stores {
    off: Box<dyn WeightStore>,
    res: Box<dyn WeightStore>,
    stats: OffloadStats,
}

fn build(ctx: &Ctx, m: &Model, lookahead: usize) -> Stores {
    let cfg = OffloadedConfig {
        lookahead,
        ..Default::default()
    };
    let mut ob = OffloadedBuilder::new(ctx, m.num_units(), cfg).unwrap();
    let stats = ob.stats_handle();
    fill(ctx, &mut ob, m).unwrap();
    let mut rb = Resident::builder(ctx, m.num_units());
    fill(ctx, rb.as_mut(), m).unwrap();
    Stores {
        off: Box::new(ob).finish().unwrap(),
        res: rb.finish().unwrap(),
        stats,
    }
}

fn host_bytes(t: &Tensor) -> Vec<u8> {
    t.to_ctx(&Ctx::cpu()).unwrap().as_bytes().unwrap().to_vec()
}

/// `g` holds exactly what the resident store and the model hold for its unit.
fn check_guard(g: &UnitGuard, res: &dyn WeightStore, m: &Model) {
    let n = m.num_units();
    let u = g.unit().index(n);
    let r = res.fetch(g.unit()).unwrap();
    assert_eq!(g.layout().as_ref(), r.layout().as_ref());
    assert!(g.blob().bytes() >= m.layouts[u].bytes);
    let whole = host_bytes(g.blob());
    assert_eq!(&whole[..m.data[u].len()], &m.data[u][..], "{}", g.unit());
    for e in &m.layouts[u].entries {
        let a = g.get(&e.name).unwrap();
        let b = r.get(&e.name).unwrap();
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()));
        assert_eq!(host_bytes(&a), host_bytes(&b), "{} {}", g.unit(), e.name);
        assert_eq!(host_bytes(&a), m.entry_bytes(u, &e.name));
    }
}

/// Embedding, layers, head, layers backwards, embedding.
fn train_order(num_layers: usize) -> Vec<Unit> {
    let mut v: Vec<Unit> = Unit::all(num_layers).collect();
    v.extend((0..num_layers).rev().map(Unit::Layer));
    v.push(Unit::Embed);
    v
}

#[test]
fn train_schedule_matches_resident() {
    for ctx in contexts() {
        for same_size in [true, false] {
            let layers = 4;
            let m = Model::new(
                layers,
                |i| match (i, same_size) {
                    (0, _) => 300,
                    (5, _) => 310,
                    (_, true) => 200,
                    (i, false) => 100 + 37 * i,
                },
                7,
            );
            for lookahead in 0..=3 {
                let s = build(&ctx, &m, lookahead);
                let order = train_order(layers);
                let passes = 2;
                for _ in 0..passes {
                    s.off.schedule(&order).unwrap();
                    for &u in &order {
                        let g = s.off.fetch(u).unwrap();
                        check_guard(&g, s.res.as_ref(), &m);
                    }
                }
                let c = s.stats.get();
                let what = format!("{ctx:?} same_size={same_size} lookahead={lookahead}: {c:?}");
                assert_eq!(c.fetches, (passes * order.len()) as u64, "{what}");
                assert_eq!(c.fetches, c.hits + c.demand_loads, "{what}");
                assert_eq!(c.loads, c.demand_loads + c.prefetch_loads, "{what}");
                assert!(c.peak_buffers <= lookahead as u64 + 2, "{what}");
                if lookahead == 0 {
                    assert_eq!(c.prefetch_loads, 0, "{what}");
                    assert_eq!(c.demand_loads, c.loads, "{what}");
                } else {
                    // Every fetch found its unit already copied (the first
                    // one too: schedule() started it).
                    assert_eq!(c.demand_loads, 0, "{what}");
                    assert_eq!(c.hits, c.fetches, "{what}");
                    assert_eq!(c.prefetch_hits, c.prefetch_loads, "{what}");
                    assert_eq!(c.prefetch_skipped, 0, "{what}");
                    // The turnaround (last layer, head, last layer) reuses
                    // the last layer's buffer: fewer loads than fetches.
                    assert!(c.loads < c.fetches, "{what}");
                }
                let sizes = m.data.iter().map(|d| d.len() as u64);
                let (lo, hi) = (sizes.clone().min().unwrap(), sizes.max().unwrap());
                assert!(
                    (lo * c.loads..=hi * c.loads).contains(&c.bytes_copied),
                    "{what}"
                );
                let b = s.off.bytes();
                assert_eq!(b.device, 0);
                assert_eq!(b.host, m.data.iter().map(|d| d.len()).sum::<usize>());
                assert!(b.buffers > 0);
            }
        }
    }
}

#[test]
fn layers_of_one_size_reuse_buffers() {
    for ctx in contexts() {
        let layers = 6;
        let m = Model::new(layers, |i| if i == 0 || i == 7 { 500 } else { 200 }, 3);
        let s = build(&ctx, &m, 1);
        let order: Vec<Unit> = Unit::all(layers).collect();
        for _ in 0..3 {
            s.off.schedule(&order).unwrap();
            for &u in &order {
                check_guard(&s.off.fetch(u).unwrap(), s.res.as_ref(), &m);
            }
        }
        let c = s.stats.get();
        // lookahead 1 and one guard at a time: at most 3 buffers, and the
        // layers cycle through the same few instead of allocating each time.
        assert!(c.peak_buffers <= 3, "{c:?}");
        assert!(c.buffers_allocated <= 3 * 3, "{c:?}");
        assert_eq!(c.demand_loads, 0, "{c:?}");
        let biggest = m.data.iter().map(|d| d.len()).max().unwrap();
        assert!(s.off.bytes().buffers <= 3 * biggest, "{:?}", s.off.bytes());
    }
}

#[test]
fn out_of_order_fetches() {
    for ctx in contexts() {
        let layers = 4;
        let m = Model::new(layers, |i| 50 + 10 * (i % 3), 11);
        let s = build(&ctx, &m, 1);
        let check = |u: Unit| {
            let g = s.off.fetch(u).unwrap();
            check_guard(&g, s.res.as_ref(), &m);
        };
        // Before any order: on demand.
        check(Unit::Layer(2));
        check(Unit::Head);
        assert_eq!(s.stats.get().demand_loads, 2);
        let fwd: Vec<Unit> = Unit::all(layers).collect();
        s.off.schedule(&fwd).unwrap();
        check(Unit::Embed); // prefetched by schedule
        let before = s.stats.get();
        assert_eq!(before.demand_loads, 2, "{before:?}");
        // Skips layers 0 and 1: layer 2 is still in a buffer from the first
        // fetch, and the cursor moves past it, so layer 3 is prefetched.
        check(Unit::Layer(2));
        check(Unit::Layer(3));
        let c = s.stats.get();
        assert_eq!(c.demand_loads, before.demand_loads, "{c:?}");
        // Behind the cursor: served, the cursor stays (the head comes next).
        check(Unit::Layer(0));
        check(Unit::Head);
        check(Unit::Layer(1));
        check(Unit::Embed);
        let c = s.stats.get();
        assert_eq!(c.fetches, c.hits + c.demand_loads, "{c:?}");
        // Units that do not exist.
        assert!(s.off.fetch(Unit::Layer(layers)).is_err());
        assert!(s.off.schedule(&[Unit::Embed, Unit::Layer(9)]).is_err());
        assert!(s.off.layout(Unit::Layer(layers)).is_err());
        for i in 0..m.num_units() {
            let u = unit(i, m.num_units());
            assert_eq!(
                s.off.layout(u).unwrap().as_ref(),
                s.res.layout(u).unwrap().as_ref()
            );
        }
        assert_eq!(s.off.num_units(), m.num_units());
    }
}

#[test]
fn guards_of_one_unit_share_a_buffer() {
    for ctx in contexts() {
        let layers = 3;
        // One size: any free buffer could take any unit, so a shared buffer
        // reused under a live guard would show.
        let m = Model::uniform(layers, 40, 5);
        let s = build(&ctx, &m, 2);
        let order = train_order(layers);
        s.off.schedule(&order).unwrap();
        // A tied head: the head's pass holds the embedding too.
        let head = s.off.fetch(Unit::Head).unwrap();
        let e1 = s.off.fetch(Unit::Embed).unwrap();
        let e2 = s.off.fetch(Unit::Embed).unwrap();
        assert!(e1.blob().same_storage(e2.blob()));
        assert!(!e1.blob().same_storage(head.blob()));
        drop(e1);
        // Churn through every unit while e2 and the head are alive: their
        // buffers must not be reused.
        for _ in 0..2 {
            s.off.schedule(&order).unwrap();
            for &u in &order {
                check_guard(&s.off.fetch(u).unwrap(), s.res.as_ref(), &m);
            }
        }
        check_guard(&e2, s.res.as_ref(), &m);
        check_guard(&head, s.res.as_ref(), &m);
        let c = s.stats.get();
        // lookahead 2, at most 2 guards of other units alive plus one fetched.
        assert!(c.peak_buffers <= 2 + 3 + 1, "{c:?}");
        drop((e2, head));
    }
}

#[test]
fn writes_are_seen_by_later_fetches_and_read_host() {
    for ctx in contexts() {
        let layers = 2;
        let mut m = Model::new(layers, |i| 30 + 5 * i, 9);
        let s = build(&ctx, &m, 1);
        let order = train_order(layers);
        s.off.schedule(&order).unwrap();
        drop(s.off.fetch(Unit::Embed).unwrap()); // layer 0 is prefetched now
        let mut rng = Rng::new(99);
        let mut write = |m: &mut Model, u: Unit, name: &str, on: &Ctx| {
            let i = u.index(m.num_units());
            let e = m.layouts[i].entry(name).unwrap().clone();
            let new = rng.bytes(e.bytes());
            let mut src = Tensor::zeros(&Ctx::cpu(), e.dtype, &e.shape).unwrap();
            src.as_bytes_mut().unwrap().copy_from_slice(&new);
            let src = src.to_ctx(on).unwrap();
            s.off.write(u, name, &src).unwrap();
            s.res.write(u, name, &src).unwrap();
            m.data[i][e.offset..e.offset + e.bytes()].copy_from_slice(&new);
        };
        write(&mut m, Unit::Layer(0), "w", &Ctx::cpu());
        write(&mut m, Unit::Layer(0), "q", &ctx); // from the device, on CUDA
        write(&mut m, Unit::Head, "norm", &ctx);
        for &u in &order {
            check_guard(&s.off.fetch(u).unwrap(), s.res.as_ref(), &m);
        }
        for name in ["w", "q", "norm"] {
            let h = s.off.read_host(Unit::Layer(0), name).unwrap();
            assert_eq!(h.device(), Device::Cpu);
            assert_eq!(h.as_bytes().unwrap(), m.entry_bytes(1, name));
            let r = s.res.read_host(Unit::Layer(0), name).unwrap();
            assert_eq!((h.dtype(), h.shape()), (r.dtype(), r.shape()));
        }
        // A guard of the unit is alive: refused, and nothing changes.
        let g = s.off.fetch(Unit::Layer(1)).unwrap();
        let src = s.off.read_host(Unit::Layer(1), "w").unwrap();
        let mut other = src.clone().to_ctx(&Ctx::cpu()).unwrap();
        other.as_bytes_mut().unwrap().fill(7);
        let err = s.off.write(Unit::Layer(1), "w", &other).unwrap_err();
        assert!(err.to_string().contains("guard"), "{err}");
        check_guard(&g, s.res.as_ref(), &m);
        drop(g);
        write(&mut m, Unit::Layer(1), "w", &ctx);
        check_guard(&s.off.fetch(Unit::Layer(1)).unwrap(), s.res.as_ref(), &m);
        // Unknown names and mismatched sources.
        assert!(s.off.write(Unit::Layer(1), "nope", &other).is_err());
        assert!(s.off.write(Unit::Layer(1), "q", &other).is_err());
        assert!(s.off.read_host(Unit::Layer(1), "nope").is_err());
        assert!(s.off.device_view(Unit::Layer(1), "w").is_none());
    }
}

#[test]
fn builder_checks_units_and_blobs() {
    for ctx in contexts() {
        let m = Model::new(2, |_| 10, 1);
        let n = m.num_units();
        let mut b = OffloadedBuilder::new(&ctx, n, OffloadedConfig::default()).unwrap();
        assert!(b.alloc(Unit::Layer(2), m.layouts[1].clone()).is_err());
        for i in [0, 1, 3] {
            let blob = b.alloc(unit(i, n), m.layouts[i].clone()).unwrap();
            assert_eq!(blob.bytes.device(), Device::Cpu);
            assert_eq!(blob.bytes.is_pinned(), ctx.device() != Device::Cpu);
            let kept = b.add(unit(i, n), blob.clone()).unwrap();
            assert!(kept.bytes.same_storage(&blob.bytes));
        }
        // A device blob is not a home copy.
        if ctx.device() != Device::Cpu {
            let dev = llmft_tensor::store::UnitBlob::zeros(&ctx, m.layouts[2].clone()).unwrap();
            assert!(b.add(Unit::Layer(1), dev).is_err());
        }
        // A blob smaller than its layout.
        let small = llmft_tensor::store::UnitBlob {
            bytes: Tensor::zeros(&Ctx::cpu(), DType::U8, &[3]).unwrap(),
            layout: Arc::new(m.layouts[2].clone()),
        };
        assert!(b.add(Unit::Layer(1), small).is_err());
        let err = Box::new(b).finish().err().expect("layer 1 is missing");
        assert!(err.to_string().contains("layer 1"), "{err}");
        assert!(OffloadedBuilder::new(&ctx, 1, OffloadedConfig::default()).is_err());
    }
}

#[test]
fn allocation_failure_names_the_setting_and_the_bytes() {
    for ctx in contexts() {
        let cfg = OffloadedConfig {
            lookahead: 1,
            expected_host_bytes: Some(1 << 20),
            keep_embedding: false,
        };
        let mut b = Offloaded::builder(&ctx, 3, cfg).unwrap();
        let mut small = BlobLayout::default();
        small.push("w", DType::U8, &[1000]);
        b.alloc(Unit::Embed, small).unwrap();
        let mut huge = BlobLayout::default();
        huge.push("w", DType::U8, &[1 << 52]);
        let err = b.alloc(Unit::Layer(0), huge).unwrap_err().to_string();
        eprintln!("{ctx:?}: {err}");
        assert!(err.starts_with("offload.params: could not "), "{err}");
        assert!(
            err.contains(&format!(
                "{} bytes of host memory for layer 0 (1000 bytes pinned so far of 1048576 needed)",
                1usize << 52
            )),
            "{err}"
        );
    }
}

#[test]
fn host_memory_check() {
    if !std::path::Path::new("/proc/meminfo").exists() {
        eprintln!("no /proc/meminfo: the check passes everything here");
        assert!(check_host_memory("offload.test", usize::MAX).is_ok());
        return;
    }
    let avail = llmft_offload::host_memory_available().unwrap();
    assert!(avail > 0);
    check_host_memory("offload.test", 1).unwrap();
    let err = check_host_memory("offload.test", usize::MAX).unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("offload.test needs"), "{msg}");
    assert!(matches!(
        err,
        llmft_offload::Error::HostMemory { ref setting, needed: usize::MAX, .. } if setting == "offload.test"
    ));
    let cfg = OffloadedConfig {
        lookahead: 1,
        expected_host_bytes: Some(usize::MAX / 2),
        keep_embedding: false,
    };
    let msg = Offloaded::builder(&Ctx::cpu(), 4, cfg)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.starts_with(&format!(
            "offload.params needs {} bytes of host memory for the model's frozen weights, but only ",
            usize::MAX / 2
        )) && msg.ends_with(" are available"),
        "{msg}"
    );
}

#[test]
fn concurrent_fetches() {
    for ctx in contexts() {
        let layers = 5;
        let m = Model::new(layers, |i| 64 + 8 * (i % 2), 21);
        let s = build(&ctx, &m, 2);
        s.off.schedule(&train_order(layers)).unwrap();
        let off: &dyn WeightStore = s.off.as_ref();
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let (m, res) = (&m, s.res.as_ref());
                sc.spawn(move || {
                    let mut rng = Rng::new(t + 1);
                    for _ in 0..40 {
                        let u = unit(rng.next() as usize % m.num_units(), m.num_units());
                        let g = off.fetch(u).unwrap();
                        check_guard(&g, res, m);
                    }
                });
            }
        });
        let c = s.stats.get();
        assert_eq!(c.fetches, 160);
        // Four threads hold at most one guard each (plus the checks' own).
        assert!(c.peak_buffers <= 2 + 4 + 1, "{c:?}");
    }
}

/// Heavy compute on the fetched weights while the copy stream reuses their
/// buffers: the copies must wait for the products that read a buffer before
/// overwriting it, and the products for the copies that fill it.
#[test]
fn cuda_copies_are_ordered_against_compute() {
    let Some(ctx) = cuda() else { return };
    let (d, layers, reps) = (4096usize, 4usize, 12usize);
    let mut layouts = Vec::new();
    let mut data = Vec::new();
    for i in 0..layers + 2 {
        let mut l = BlobLayout::default();
        l.push("w", DType::BF16, &[d, d]);
        let vals: Vec<f32> = {
            let mut r = Rng::new(100 + i as u64);
            (0..d * d)
                .map(|_| (r.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                .collect()
        };
        let w = Tensor::from_f32(&Ctx::cpu(), &vals, DType::BF16, &[d * d]).unwrap();
        let mut bytes = w.as_bytes().unwrap().to_vec();
        bytes.resize(l.alloc_bytes(), 0);
        data.push(bytes);
        layouts.push(l);
    }
    let m = Model { layouts, data };
    let xs: Vec<f32> = {
        let mut r = Rng::new(1);
        (0..d * d)
            .map(|_| (r.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect()
    };
    let x = Tensor::from_f32(&ctx, &xs, DType::BF16, &[d, d]).unwrap();
    let order: Vec<Unit> = (0..layers).map(Unit::Layer).collect();
    for lookahead in [0, 1, 2] {
        let s = build(&ctx, &m, lookahead);
        // The first product reads the buffer right after the fetch (the copy
        // into it must be complete), the last one `reps` products later (the
        // next copy into the buffer must wait for it).
        let product = |g: &UnitGuard, reps: usize| {
            let w = g.get("w").unwrap();
            let mut first = Tensor::empty(&ctx, DType::F32, &[d, d]).unwrap();
            ops::gemm(&ctx, &x, &w, &mut first, ops::Gemm::nt()).unwrap();
            let mut last = Tensor::empty(&ctx, DType::F32, &[d, d]).unwrap();
            for _ in 1..reps {
                ops::gemm(&ctx, &x, &w, &mut last, ops::Gemm::nt()).unwrap();
            }
            (first, last)
        };
        let want: Vec<Vec<f32>> = order
            .iter()
            .map(|&u| {
                let (c, _) = product(&s.res.fetch(u).unwrap(), 1);
                c.to_f32_vec().unwrap()
            })
            .collect();
        ctx.synchronize().unwrap();
        for pass in 0..2 {
            s.off.schedule(&order).unwrap();
            let got: Vec<(Tensor, Tensor)> = order
                .iter()
                .map(|&u| product(&s.off.fetch(u).unwrap(), reps))
                .collect();
            for (i, (first, last)) in got.iter().enumerate() {
                for (what, c) in [("first", first), ("last", last)] {
                    let c = c.to_f32_vec().unwrap();
                    let bad = c.iter().zip(&want[i]).filter(|(a, b)| a != b).count();
                    assert_eq!(
                        bad, 0,
                        "lookahead {lookahead} pass {pass} layer {i}: {what} product"
                    );
                }
            }
        }
        let c = s.stats.get();
        eprintln!("lookahead {lookahead}: {c:?}");
        assert!(c.peak_buffers <= lookahead as u64 + 2);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Train,
    Schedule(Vec<usize>),
    Fetch(usize, bool),
    Drop(usize),
    Write(usize, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Train),
        1 => prop::collection::vec(0..8usize, 0..10).prop_map(Op::Schedule),
        8 => (0..8usize, prop::bool::weighted(0.3)).prop_map(|(u, k)| Op::Fetch(u, k)),
        2 => (0..8usize).prop_map(Op::Drop),
        1 => (0..8usize, any::<u64>()).prop_map(|(u, s)| Op::Write(u, s)),
    ]
}

fn run_ops(
    ctx: &Ctx,
    layers: usize,
    sizes: &[usize],
    lookahead: usize,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let mut m = Model::new(layers, |i| sizes[i % sizes.len()], 17);
    let n = m.num_units();
    let s = build(ctx, &m, lookahead);
    let mut alive: Vec<UnitGuard> = Vec::new();
    let mut max_alive = 0;
    let mut rng = Rng::new(5);
    for op in ops {
        match op {
            Op::Train => s.off.schedule(&train_order(layers)).unwrap(),
            Op::Schedule(v) => {
                let order: Vec<Unit> = v.iter().map(|&u| unit(u % n, n)).collect();
                s.off.schedule(&order).unwrap();
            }
            Op::Fetch(u, keep) => {
                // The fetched guard counts as alive from its fetch's prefetch on.
                max_alive = max_alive.max(alive.len() + 1);
                let g = s.off.fetch(unit(u % n, n)).unwrap();
                check_guard(&g, s.res.as_ref(), &m);
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
                let un = unit(u % n, n);
                let i = un.index(n);
                let e = m.layouts[i].entries[(*seed % 3) as usize].clone();
                let mut src = Tensor::zeros(&Ctx::cpu(), e.dtype, &e.shape).unwrap();
                let new = Rng::new(*seed).bytes(e.bytes());
                src.as_bytes_mut().unwrap().copy_from_slice(&new);
                let src = if rng.next() % 2 == 0 {
                    src.to_ctx(ctx).unwrap()
                } else {
                    src
                };
                let r = s.off.write(un, &e.name, &src);
                if alive.iter().any(|g| g.unit() == un) {
                    prop_assert!(r.is_err());
                } else {
                    r.unwrap();
                    s.res.write(un, &e.name, &src).unwrap();
                    m.data[i][e.offset..e.offset + e.bytes()].copy_from_slice(&new);
                }
            }
        }
        for g in &alive {
            check_guard(g, s.res.as_ref(), &m);
        }
        let c = s.stats.get();
        prop_assert_eq!(c.fetches, c.hits + c.demand_loads);
        prop_assert_eq!(c.loads, c.demand_loads + c.prefetch_loads);
        // check_guard's resident fetch adds no buffer: it is another store.
        prop_assert!(
            c.peak_buffers <= (lookahead + max_alive + 1) as u64,
            "{:?} with lookahead {} and {} guards alive at most",
            c,
            lookahead,
            max_alive
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn random_sequences_match_resident(
        layers in 1..5usize,
        sizes in prop::collection::vec(1..40usize, 1..4),
        lookahead in 0..4usize,
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run_ops(&Ctx::cpu(), layers, &sizes, lookahead, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn random_sequences_match_resident_on_cuda(
        layers in 1..5usize,
        sizes in prop::collection::vec(1..4000usize, 1..4),
        lookahead in 0..4usize,
        ops in prop::collection::vec(op(), 1..40),
    ) {
        if let Some(ctx) = cuda() {
            run_ops(&ctx, layers, &sizes, lookahead, &ops)?;
        }
    }
}

#[test]
fn offloaded_is_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<Offloaded>();
    is::<OffloadStats>();
}
