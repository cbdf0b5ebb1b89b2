//! CUDA against CPU: every op, forward and backward, on proptest shapes, in
//! f32, bf16 and f16. Inputs are placed both 16-byte aligned and at odd
//! element offsets inside larger buffers (the vectorized and the scalar
//! kernel paths), with rows up to D = 4096. f32 results must be within 1e-5
//! relative L2 of the CPU, bf16/f16 within 1e-2.
//!
//! Each test prints `RESULT op=.. dtype=.. rel_l2=..` lines (the largest
//! error it saw per op and dtype) for a table; run with `--nocapture`.
//! Without a CUDA GPU every test prints "skipping: no CUDA GPU" and passes.
mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;

use common::*;
use llmft_tensor::ops::{
    self, AdamWParams, CrossEntropyOpts, Gemm, LmHeadGrads, RopeScaling, TableCache,
};
use llmft_tensor::{Ctx, DType, Device, Error, Tensor};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

type CaseResult = Result<(), TestCaseError>;

/// Runs `test` on `cases` draws of `strategy`; panics with the minimal failing case.
fn run<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> CaseResult) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

/// The largest relative error seen per (op, dtype); printed when dropped.
#[derive(Default)]
struct Results(RefCell<BTreeMap<(String, String), f64>>);

impl Results {
    fn record(&self, op: &str, dt: DType, err: f64) {
        let mut m = self.0.borrow_mut();
        let e = m.entry((op.to_string(), dt.to_string())).or_insert(0.0);
        // NaN is the worst error.
        if err.is_nan() || err > *e {
            *e = err;
        }
    }

    /// Compares values, recording the error under `op`/`dt`.
    fn vals(&self, op: &str, dt: DType, gpu: &[f64], cpu: &[f64], tol: f64) -> CaseResult {
        let err = rel_l2(gpu, cpu);
        self.record(op, dt, err);
        if err <= tol {
            Ok(())
        } else {
            Err(TestCaseError::fail(format!(
                "{op} {dt}: CUDA vs CPU relative L2 {err:.3e} > {tol:.0e} \
                 (first values {:?} vs {:?})",
                &gpu[..gpu.len().min(4)],
                &cpu[..cpu.len().min(4)]
            )))
        }
    }

    /// Compares a GPU tensor with a CPU tensor at the tolerance of `dt`.
    fn cmp(&self, op: &str, dt: DType, gpu: &Tensor, cpu: &Tensor) -> CaseResult {
        self.vals(op, dt, &f64s(gpu), &f64s(cpu), tol_for(dt))
    }

    /// Compares exactly.
    fn exact(&self, op: &str, dt: DType, gpu: &Tensor, cpu: &Tensor) -> CaseResult {
        self.exact_vals(op, dt, &f64s(gpu), &f64s(cpu))
    }

    /// Compares values exactly.
    fn exact_vals(&self, op: &str, dt: DType, g: &[f64], c: &[f64]) -> CaseResult {
        self.record(op, dt, rel_l2(g, c));
        if g == c {
            Ok(())
        } else {
            let i = g.iter().zip(c).position(|(a, b)| a != b).unwrap_or(0);
            Err(TestCaseError::fail(format!(
                "{op} {dt}: element {i} is {} on CUDA, {} on the CPU",
                g.get(i).copied().unwrap_or(f64::NAN),
                c.get(i).copied().unwrap_or(f64::NAN)
            )))
        }
    }
}

impl Drop for Results {
    fn drop(&mut self) {
        for ((op, dt), e) in self.0.borrow().iter() {
            eprintln!("RESULT op={op} dtype={dt} rel_l2={e:.3e}");
        }
    }
}

/// A GPU copy of host tensor `t`, `off` elements into a larger buffer.
fn up(gpu: &Ctx, t: &Tensor, off: usize) -> Tensor {
    let big = Tensor::zeros(gpu, t.dtype(), &[t.numel() + off]).unwrap();
    let mut v = big.view(off, t.shape()).unwrap();
    v.copy_from(gpu, t).unwrap();
    v
}

/// A zero GPU tensor `off` elements into a larger buffer.
fn gzeros(gpu: &Ctx, dt: DType, shape: &[usize], off: usize) -> Tensor {
    let big = Tensor::zeros(gpu, dt, &[numel(shape) + off]).unwrap();
    big.view(off, shape).unwrap()
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn float_dtype() -> impl Strategy<Value = DType> {
    select(vec![DType::F32, DType::BF16, DType::F16])
}

/// Element offsets: 0 and 8 keep every dtype 16-byte aligned, 4 only f32, 1 and 3 none.
fn offset() -> impl Strategy<Value = usize> {
    select(vec![0usize, 0, 8, 4, 1, 3])
}

/// Odd offsets only.
fn odd_offset() -> impl Strategy<Value = usize> {
    select(vec![1usize, 3, 5])
}

/// Element counts for flat ops: small odd ones and multiples of 8 around 4096.
fn flat_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => 1usize..=100,
        1 => select(vec![8usize, 64, 1000, 4095, 4096, 4104, 65_537]),
    ]
}

/// Row widths D: small odd ones, multiples of 8 (vector path) up to 4096.
fn row_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => 1usize..=300,
        1 => select(vec![8usize, 64, 128, 1000, 1024, 2048, 4088, 4095, 4096]),
    ]
}

fn mat_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 1usize..=70,
        1 => select(vec![64usize, 127, 128, 129, 256]),
    ]
}

// --------------------------------------------------------- cast and fill

#[test]
fn cast_and_fill() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let floats = [DType::F32, DType::BF16, DType::F16];
    run(
        32,
        (flat_len(), offset(), offset(), any::<u64>()),
        |(n, ox, oy, seed)| {
            let mut rng = SeedRng::new(seed);
            let v = rng.normals(n, 100.0);
            for from in floats {
                let x = host(&v, from, &[n]);
                let gx = up(&gpu, &x, ox);
                for to in floats {
                    let mut y = host_zeros(to, &[n]);
                    let mut gy = gzeros(&gpu, to, &[n], oy);
                    ops::cast(&Ctx::cpu(), &x, &mut y).unwrap();
                    ops::cast(&gpu, &gx, &mut gy).unwrap();
                    res.exact(&format!("cast_{from}_{to}"), to, &gy, &y)?;
                }
            }
            for (dt, value) in [
                (DType::F32, 0.1f32),
                (DType::BF16, -3.3),
                (DType::F16, 7.7),
                (DType::I32, -7.0),
            ] {
                let mut y = host_zeros(dt, &[n]);
                let mut gy = gzeros(&gpu, dt, &[n], oy);
                ops::fill(&Ctx::cpu(), &mut y, value).unwrap();
                ops::fill(&gpu, &mut gy, value).unwrap();
                res.exact("fill", dt, &gy, &y)?;
            }
            Ok(())
        },
    );
}

// ------------------------------------------------------ add, axpby, mul

#[test]
fn add_axpby_mul() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let strat = (
        flat_len(),
        float_dtype(),
        (offset(), offset(), offset()),
        any::<u64>(),
    );
    run(48, strat, |(n, dt, (oa, ob, oy), seed)| {
        let mut rng = SeedRng::new(seed);
        let a = host(&rng.normals(n, 1.0), dt, &[n]);
        let b = host(&rng.normals(n, 1.0), dt, &[n]);
        let (ga, gb) = (up(&gpu, &a, oa), up(&gpu, &b, ob));
        let cpu = Ctx::cpu();

        let (mut y, mut gy) = (host_zeros(dt, &[n]), gzeros(&gpu, dt, &[n], oy));
        ops::add(&cpu, &a, &b, &mut y).unwrap();
        ops::add(&gpu, &ga, &gb, &mut gy).unwrap();
        res.cmp("add", dt, &gy, &y)?;

        ops::mul(&cpu, &a, &b, &mut y).unwrap();
        ops::mul(&gpu, &ga, &gb, &mut gy).unwrap();
        res.cmp("mul", dt, &gy, &y)?;

        for (alpha, beta) in [(0.5f32, 1.0f32), (-2.0, 0.0), (1.0, 0.3)] {
            let (mut y, mut gy) = (b.to_ctx(&cpu).unwrap(), up(&gpu, &b, oy));
            ops::axpby(&cpu, alpha, &a, beta, &mut y).unwrap();
            ops::axpby(&gpu, alpha, &ga, beta, &mut gy).unwrap();
            res.cmp("axpby", dt, &gy, &y)?;
        }
        Ok(())
    });
}

// ------------------------------------------------------------------- gemm

#[derive(Debug, Clone)]
struct GemmCase {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    g: Gemm,
    b_batched: bool,
    dts: (DType, DType),
    offs: (usize, usize, usize),
    seed: u64,
}

fn gemm_case(offs: BoxedStrategy<usize>) -> impl Strategy<Value = GemmCase> {
    let dims = (1usize..=3, mat_dim(), mat_dim(), mat_dim());
    let flags = (any::<bool>(), any::<bool>(), any::<bool>());
    let scales = select(vec![(1.0f32, 0.0f32), (0.5, 1.0), (-1.5, 0.25)]);
    let dts = select(vec![
        (DType::F32, DType::F32),
        (DType::BF16, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::F16, DType::F16),
        (DType::F16, DType::F32),
    ]);
    let offs = (offs.clone(), offs.clone(), offs);
    (dims, flags, scales, dts, offs, any::<u64>()).prop_map(
        |((batch, m, n, k), (ta, tb, bb), (alpha, beta), dts, offs, seed)| GemmCase {
            batch,
            m,
            n,
            k,
            g: Gemm {
                trans_a: ta,
                trans_b: tb,
                alpha,
                beta,
            },
            b_batched: bb && batch > 1,
            dts,
            offs,
            seed,
        },
    )
}

fn check_gemm(gpu: &Ctx, res: &Results, op: &str, c: GemmCase) -> CaseResult {
    let mut rng = SeedRng::new(c.seed);
    let (bt, m, n, k) = (c.batch, c.m, c.n, c.k);
    let lead = |r: usize, s: usize, batched: bool| {
        if batched && bt > 1 {
            vec![bt, r, s]
        } else {
            vec![r, s]
        }
    };
    let a_shape = if c.g.trans_a {
        lead(k, m, true)
    } else {
        lead(m, k, true)
    };
    let b_shape = if c.g.trans_b {
        lead(n, k, c.b_batched)
    } else {
        lead(k, n, c.b_batched)
    };
    let c_shape = lead(m, n, true);
    let (idt, cdt) = c.dts;
    let a = host(&rng.normals(numel(&a_shape), 1.0), idt, &a_shape);
    let b = host(&rng.normals(numel(&b_shape), 1.0), idt, &b_shape);
    let mut cc = host(&rng.normals(numel(&c_shape), 1.0), cdt, &c_shape);
    let mut gc = up(gpu, &cc, c.offs.2);
    let (ga, gb) = (up(gpu, &a, c.offs.0), up(gpu, &b, c.offs.1));
    ops::gemm(&Ctx::cpu(), &a, &b, &mut cc, c.g).unwrap();
    ops::gemm(gpu, &ga, &gb, &mut gc, c.g).map_err(|e| TestCaseError::fail(format!("{e}")))?;
    res.cmp(&format!("{op}_{idt}_in"), cdt, &gc, &cc)
}

#[test]
fn gemm_aligned() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    run(64, gemm_case(Just(0usize).boxed()), |c| {
        check_gemm(&gpu, &res, "gemm", c)
    });
}

#[test]
fn gemm_unaligned_views() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    run(48, gemm_case(odd_offset().boxed()), |c| {
        check_gemm(&gpu, &res, "gemm_unaligned", c)
    });
}

// ---------------------------------------------------------------- rmsnorm

#[test]
fn rmsnorm_fwd_bwd() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    // Many rows with a narrow D exercise the backward's row loop per block.
    let shape = prop_oneof![4 => (1usize..=4, row_dim()), 1 => (Just(1500usize), 1usize..=24)];
    let strat = (shape, float_dtype(), offset(), any::<bool>(), any::<u64>());
    run(48, strat, |((rows, d), dt, off, with_dw, seed)| {
        let mut rng = SeedRng::new(seed);
        let cpu = Ctx::cpu();
        let x = host(&rng.normals(rows * d, 2.0), dt, &[rows, d]);
        let w = host(&rng.normals(d, 1.0), dt, &[d]);
        let dy = host(&rng.normals(rows * d, 1.0), dt, &[rows, d]);
        let (gx, gw, gdy) = (up(&gpu, &x, off), up(&gpu, &w, off), up(&gpu, &dy, off));
        let (mut y, mut r) = (host_zeros(dt, &[rows, d]), host_zeros(DType::F32, &[rows]));
        let mut gy = gzeros(&gpu, dt, &[rows, d], off);
        let mut gr = gzeros(&gpu, DType::F32, &[rows], off);
        ops::rmsnorm_fwd(&cpu, &x, &w, 1e-5, &mut y, &mut r).unwrap();
        ops::rmsnorm_fwd(&gpu, &gx, &gw, 1e-5, &mut gy, &mut gr).unwrap();
        res.cmp("rmsnorm_fwd", dt, &gy, &y)?;
        res.vals("rmsnorm_fwd_rstd", dt, &f64s(&gr), &f64s(&r), 1e-5)?;

        // The backward gets the same saved rstd on both sides.
        let gr = up(&gpu, &r, off);
        let dw0 = host(&rng.normals(d, 0.1), DType::F32, &[d]);
        let (mut dx, mut dw) = (host_zeros(dt, &[rows, d]), dw0.to_ctx(&cpu).unwrap());
        let (mut gdx, mut gdw) = (gzeros(&gpu, dt, &[rows, d], off), up(&gpu, &dw0, off));
        let (dw_c, dw_g) = if with_dw {
            (Some(&mut dw), Some(&mut gdw))
        } else {
            (None, None)
        };
        ops::rmsnorm_bwd(&cpu, &dy, &x, &w, &r, &mut dx, dw_c).unwrap();
        ops::rmsnorm_bwd(&gpu, &gdy, &gx, &gw, &gr, &mut gdx, dw_g).unwrap();
        res.cmp("rmsnorm_bwd_dx", dt, &gdx, &dx)?;
        if with_dw {
            res.vals("rmsnorm_bwd_dw", dt, &f64s(&gdw), &f64s(&dw), 1e-5)?;
        }
        Ok(())
    });
}

// ------------------------------------------------------------------- rope

#[test]
fn rope_fwd_bwd() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let strat = (
        (1usize..=40, 1usize..=8, 1usize..=128),
        float_dtype(),
        offset(),
        any::<u64>(),
    );
    run(32, strat, |((t, h, half), dt, off, seed)| {
        let mut rng = SeedRng::new(seed);
        let cpu = Ctx::cpu();
        let shape = [t, h, 2 * half];
        let x = host(&rng.normals(numel(&shape), 1.0), dt, &shape);
        let pos: Vec<i32> = (0..t).map(|_| rng.below(131_072) as i32).collect();
        let pos = host_i32(&pos, &[t]);
        let inv = host(
            &ops::rope_inv_freq(2 * half, 500_000.0, scaling),
            DType::F32,
            &[half],
        );
        let (gx, gpos, ginv) = (up(&gpu, &x, off), up(&gpu, &pos, off), up(&gpu, &inv, off));
        let (mut y, mut gy) = (host_zeros(dt, &shape), gzeros(&gpu, dt, &shape, off));
        ops::rope_fwd(&cpu, &x, &pos, &inv, &mut y).unwrap();
        ops::rope_fwd(&gpu, &gx, &gpos, &ginv, &mut gy).unwrap();
        res.cmp("rope_fwd", dt, &gy, &y)?;
        ops::rope_bwd(&cpu, &x, &pos, &inv, &mut y).unwrap();
        ops::rope_bwd(&gpu, &gx, &gpos, &ginv, &mut gy).unwrap();
        res.cmp("rope_bwd", dt, &gy, &y)
    });
}

// ----------------------------------------------------------------- swiglu

#[test]
fn swiglu_fwd_bwd() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    run(
        48,
        (flat_len(), float_dtype(), offset(), any::<u64>()),
        |(n, dt, off, seed)| {
            let mut rng = SeedRng::new(seed);
            let cpu = Ctx::cpu();
            let g = host(&rng.normals(n, 3.0), dt, &[n]);
            let u = host(&rng.normals(n, 1.0), dt, &[n]);
            let dy = host(&rng.normals(n, 1.0), dt, &[n]);
            let (gg, gu, gdy) = (up(&gpu, &g, off), up(&gpu, &u, off), up(&gpu, &dy, off));
            let (mut y, mut gy) = (host_zeros(dt, &[n]), gzeros(&gpu, dt, &[n], off));
            ops::swiglu_fwd(&cpu, &g, &u, &mut y).unwrap();
            ops::swiglu_fwd(&gpu, &gg, &gu, &mut gy).unwrap();
            res.cmp("swiglu_fwd", dt, &gy, &y)?;
            let (mut dg, mut du) = (host_zeros(dt, &[n]), host_zeros(dt, &[n]));
            let (mut gdg, mut gdu) = (gzeros(&gpu, dt, &[n], off), gzeros(&gpu, dt, &[n], off));
            ops::swiglu_bwd(&cpu, &dy, &g, &u, &mut dg, &mut du).unwrap();
            ops::swiglu_bwd(&gpu, &gdy, &gg, &gu, &mut gdg, &mut gdu).unwrap();
            res.cmp("swiglu_bwd_dgate", dt, &gdg, &dg)?;
            res.cmp("swiglu_bwd_dup", dt, &gdu, &du)
        },
    );
}

// ---------------------------------------------------------------- softmax

#[test]
fn softmax_causal_fwd_bwd() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let dims = (
        1usize..=2,
        1usize..=3,
        1usize..=64,
        prop_oneof![0usize..=8, 0usize..=600],
    );
    let strat = (
        dims,
        any::<bool>(),
        select(vec![1.0f32, 0.125]),
        float_dtype(),
        offset(),
    );
    run(
        40,
        (strat, any::<u64>()),
        |(((b, h, tq, extra), with_seg, scale, dt, off), seed)| {
            let tk = tq + extra;
            let shape = [b, h, tq, tk];
            let mut rng = SeedRng::new(seed);
            let cpu = Ctx::cpu();
            let s = host(&rng.normals(numel(&shape), 3.0), dt, &shape);
            let segv: Vec<i32> = (0..b * tk)
                .map(|i| ((i % tk) / (1 + i % 7)) as i32)
                .collect();
            let seg = host_i32(&segv, &[b, tk]);
            let (gs, gseg) = (up(&gpu, &s, off), up(&gpu, &seg, off));
            let (seg, gseg) = if with_seg {
                (Some(&seg), Some(&gseg))
            } else {
                (None, None)
            };
            let (mut p, mut gp) = (host_zeros(dt, &shape), gzeros(&gpu, dt, &shape, off));
            ops::softmax_causal_fwd(&cpu, &s, seg, scale, &mut p).unwrap();
            ops::softmax_causal_fwd(&gpu, &gs, gseg, scale, &mut gp).unwrap();
            res.cmp("softmax_causal_fwd", dt, &gp, &p)?;

            let dp = host(&rng.normals(numel(&shape), 1.0), dt, &shape);
            let (gp, gdp) = (up(&gpu, &p, off), up(&gpu, &dp, off));
            let (mut ds, mut gds) = (host_zeros(dt, &shape), gzeros(&gpu, dt, &shape, off));
            ops::softmax_causal_bwd(&cpu, &p, &dp, scale, &mut ds).unwrap();
            ops::softmax_causal_bwd(&gpu, &gp, &gdp, scale, &mut gds).unwrap();
            res.cmp("softmax_causal_bwd", dt, &gds, &ds)
        },
    );
}

// -------------------------------------------------------------- embedding

#[test]
fn embedding_fwd_bwd() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let strat = (
        (1usize..=64, 1usize..=50, row_dim()),
        float_dtype(),
        offset(),
        any::<u64>(),
    );
    run(32, strat, |((n, v, d), dt, off, seed)| {
        let mut rng = SeedRng::new(seed);
        let cpu = Ctx::cpu();
        let table = host(&rng.normals(v * d, 1.0), dt, &[v, d]);
        let ids: Vec<i32> = (0..n).map(|_| rng.below(v) as i32).collect();
        let ids = host_i32(&ids, &[n]);
        let (gt, gids) = (up(&gpu, &table, off), up(&gpu, &ids, off));
        let (mut y, mut gy) = (host_zeros(dt, &[n, d]), gzeros(&gpu, dt, &[n, d], off));
        ops::embedding_fwd(&cpu, &ids, &table, &mut y).unwrap();
        ops::embedding_fwd(&gpu, &gids, &gt, &mut gy).unwrap();
        res.exact("embedding_fwd", dt, &gy, &y)?;

        let dy = host(&rng.normals(n * d, 1.0), dt, &[n, d]);
        let dt0 = host(&rng.normals(v * d, 1.0), DType::F32, &[v, d]);
        let (mut dtab, mut gdtab) = (dt0.to_ctx(&cpu).unwrap(), up(&gpu, &dt0, off));
        ops::embedding_bwd(&cpu, &ids, &dy, &mut dtab).unwrap();
        ops::embedding_bwd(&gpu, &gids, &up(&gpu, &dy, off), &mut gdtab).unwrap();
        res.vals("embedding_bwd", dt, &f64s(&gdtab), &f64s(&dtab), 1e-5)
    });
}

// ------------------------------------------------ LM head + cross-entropy

fn lm_grads<'a>(dh: &'a mut Tensor, dw: &'a mut Tensor, with_dw: bool) -> LmHeadGrads<'a> {
    LmHeadGrads {
        dh,
        dw: with_dw.then_some(dw),
    }
}

#[test]
fn lm_head_cross_entropy_loss_and_grads() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let dims = (
        1usize..=40,
        prop_oneof![1usize..=64, select(vec![128usize, 255, 256])],
        prop_oneof![1usize..=300, select(vec![512usize, 1000, 1023])],
    );
    let opts = (
        select(vec![0usize, 1, 3, 7, 16, 64]),
        select(vec![None, Some(11.0f32)]),
        select(vec![0.0f64, 0.3]),
    );
    // dw: none, f32, or w's dtype.
    let dw_mode = select(vec![0u8, 1, 2]);
    let strat = (dims, opts, float_dtype(), dw_mode, offset(), any::<u64>());
    run(
        32,
        strat,
        |((n, d, v), (chunk, normalizer, ignore), dt, dw_mode, off, seed)| {
            let mut rng = SeedRng::new(seed);
            let cpu = Ctx::cpu();
            let h = host(&rng.normals(n * d, 1.0), dt, &[n, d]);
            let w = host(&rng.normals(v * d, 0.3), dt, &[v, d]);
            let labels: Vec<i32> = (0..n)
                .map(|_| {
                    if rng.uniform() < ignore {
                        -100
                    } else {
                        rng.below(v) as i32
                    }
                })
                .collect();
            let labels = host_i32(&labels, &[n]);
            let (gh, gw, gl) = (up(&gpu, &h, off), up(&gpu, &w, off), up(&gpu, &labels, off));
            let o = CrossEntropyOpts {
                chunk_rows: chunk,
                normalizer,
                ..Default::default()
            };
            let dw_dt = if dw_mode == 1 { DType::F32 } else { dt };
            let dw0 = host(&rng.normals(v * d, 0.01), dw_dt, &[v, d]);
            let (mut dh, mut gdh) = (host_zeros(dt, &[n, d]), gzeros(&gpu, dt, &[n, d], off));
            let (mut dw, mut gdw) = (dw0.to_ctx(&cpu).unwrap(), up(&gpu, &dw0, off));
            let st = ops::lm_head_cross_entropy(
                &cpu,
                &h,
                &w,
                &labels,
                &o,
                Some(lm_grads(&mut dh, &mut dw, dw_mode != 0)),
            )
            .unwrap();
            let gst = ops::lm_head_cross_entropy(
                &gpu,
                &gh,
                &gw,
                &gl,
                &o,
                Some(lm_grads(&mut gdh, &mut gdw, dw_mode != 0)),
            )
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert_eq!(st.tokens, gst.tokens);
            // A row's loss is a difference of f32 logits of size up to its largest
            // |logit|: two valid f32 computations differ by a few ulps of that,
            // which is large next to a small loss.
            let (hv, wv, lv) = (f64s(&h), f64s(&w), labels.to_vec::<i32>().unwrap());
            let scale: f64 = (0..n)
                .filter(|&i| lv[i] != -100)
                .map(|i| {
                    let hr = &hv[i * d..(i + 1) * d];
                    (0..v)
                        .map(|j| dot(hr, &wv[j * d..(j + 1) * d]).abs())
                        .fold(0.0, f64::max)
                })
                .sum();
            let norm = normalizer.map(f64::from).unwrap_or(st.tokens.max(1) as f64);
            let tol = if dt == DType::F32 { 1e-5 } else { 1e-4 };
            let den = st.loss.abs() + 8.0 * f32::EPSILON as f64 * scale / norm / tol;
            let diff = (gst.loss - st.loss).abs();
            let err = if den > 0.0 { diff / den } else { diff };
            res.record("cross_entropy_loss", dt, err);
            prop_assert!(
                err <= tol,
                "loss {} on CUDA, {} on the CPU",
                gst.loss,
                st.loss
            );
            res.cmp("cross_entropy_dh", dt, &gdh, &dh)?;
            if dw_mode != 0 {
                res.cmp(&format!("cross_entropy_dw_{dw_dt}"), dt, &gdw, &dw)?;
            }
            Ok(())
        },
    );
}

/// Vocabularies of real models and the edges of the sm_90 kernel's
/// instantiations (16384·k logits per row), where one row spans a cluster of
/// blocks, plus the one-block fallback above the largest (vectorized and not).
#[test]
fn lm_head_cross_entropy_large_vocab() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let (n, d) = (6usize, 8usize);
    for v in [16384usize, 16388, 32000, 128256, 151936, 262148, 128257] {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let mut rng = SeedRng::new(v as u64);
            let cpu = Ctx::cpu();
            let h = host(&rng.normals(n * d, 1.0), dt, &[n, d]);
            let w = host(&rng.normals(v * d, 0.5), dt, &[v, d]);
            // First, last and random labels; one ignored row.
            let lv: Vec<i32> = vec![
                0,
                (v - 1) as i32,
                -100,
                rng.below(v) as i32,
                5,
                (v / 2) as i32,
            ];
            let labels = host_i32(&lv, &[n]);
            let (gh, gw, gl) = (up(&gpu, &h, 0), up(&gpu, &w, 0), up(&gpu, &labels, 0));
            let o = CrossEntropyOpts {
                chunk_rows: 4,
                ..Default::default()
            };
            let (mut dh, mut gdh) = (host_zeros(dt, &[n, d]), gzeros(&gpu, dt, &[n, d], 0));
            let (mut dw, mut gdw) = (
                host_zeros(DType::F32, &[v, d]),
                gzeros(&gpu, DType::F32, &[v, d], 0),
            );
            let st = ops::lm_head_cross_entropy(
                &cpu,
                &h,
                &w,
                &labels,
                &o,
                Some(lm_grads(&mut dh, &mut dw, true)),
            )
            .unwrap();
            let gst = ops::lm_head_cross_entropy(
                &gpu,
                &gh,
                &gw,
                &gl,
                &o,
                Some(lm_grads(&mut gdh, &mut gdw, true)),
            )
            .unwrap();
            let nograd = ops::lm_head_cross_entropy(&gpu, &gh, &gw, &gl, &o, None).unwrap();
            assert_eq!(st.tokens, gst.tokens);
            let err = (gst.loss - st.loss).abs() / st.loss.abs().max(1e-6);
            res.record("cross_entropy_large_vocab_loss", dt, err);
            assert!(
                err <= 1e-4,
                "V = {v} {dt}: loss {} on CUDA, {} on the CPU",
                gst.loss,
                st.loss
            );
            assert_eq!(
                gst.loss, nograd.loss,
                "V = {v} {dt}: the loss without gradients differs"
            );
            // dh sums over the whole vocabulary (up to 262k terms), in
            // cuBLASLt's split-K order on CUDA: f32 gets 1e-4, not 1e-5.
            let tol = if dt == DType::F32 { 1e-4 } else { tol_for(dt) };
            for (what, g, c) in [("dh", &gdh, &dh), ("dw", &gdw, &dw)] {
                res.vals(
                    &format!("cross_entropy_large_vocab_{what}"),
                    dt,
                    &f64s(g),
                    &f64s(c),
                    tol,
                )
                .unwrap_or_else(|e| panic!("V = {v}: {e:?}"));
            }
        }
    }
}

// ------------------------------------------------------------------ adamw

#[test]
fn adamw() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let strat = (
        flat_len(),
        1u64..=3,
        float_dtype(),
        any::<bool>(),
        offset(),
        any::<u64>(),
    );
    run(32, strat, |(n, steps, gdt, with_p16, off, seed)| {
        let mut rng = SeedRng::new(seed);
        let cpu = Ctx::cpu();
        let p0 = host(&rng.normals(n, 1.0), DType::F32, &[n]);
        let (mut p, mut gp) = (p0.to_ctx(&cpu).unwrap(), up(&gpu, &p0, off));
        let z = host_zeros(DType::F32, &[n]);
        let (mut m, mut v) = (z.to_ctx(&cpu).unwrap(), z.to_ctx(&cpu).unwrap());
        let (mut gm, mut gv) = (up(&gpu, &z, off), up(&gpu, &z, off));
        let (mut p16, mut gp16) = (
            host_zeros(DType::BF16, &[n]),
            gzeros(&gpu, DType::BF16, &[n], off),
        );
        for step in 1..=steps {
            let g = host(&rng.normals(n, 0.1), gdt, &[n]);
            let hp = AdamWParams {
                lr: 0.01,
                weight_decay: 0.1,
                step,
                grad_scale: 0.5,
                ..Default::default()
            };
            let (c16, g16) = if with_p16 {
                (Some(&mut p16), Some(&mut gp16))
            } else {
                (None, None)
            };
            ops::adamw_step(&cpu, &mut p, &g, &mut m, &mut v, &hp, c16).unwrap();
            ops::adamw_step(
                &gpu,
                &mut gp,
                &up(&gpu, &g, off),
                &mut gm,
                &mut gv,
                &hp,
                g16,
            )
            .unwrap();
        }
        res.cmp("adamw_param", gdt, &gp, &p)?;
        let tol = tol_for(DType::F32);
        res.vals("adamw_m", gdt, &f64s(&gm), &f64s(&m), tol)?;
        res.vals("adamw_v", gdt, &f64s(&gv), &f64s(&v), tol)?;
        if with_p16 {
            res.cmp("adamw_param_bf16", DType::BF16, &gp16, &p16)?;
        }
        Ok(())
    });
}

// ------------------------------------------------------ sums of squares

#[test]
fn sum_squares_and_global_grad_norm() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let n = prop_oneof![flat_len(), select(vec![100_000usize, 1 << 20])];
    run(
        24,
        (n, float_dtype(), offset(), any::<u64>()),
        |(n, dt, off, seed)| {
            let mut rng = SeedRng::new(seed);
            let cpu = Ctx::cpu();
            let x = host(&rng.normals(n, 0.5), dt, &[n]);
            let gx = up(&gpu, &x, off);
            let acc0 = host(&[1.5], DType::F32, &[1]);
            let (mut acc, mut gacc) = (acc0.to_ctx(&cpu).unwrap(), up(&gpu, &acc0, off));
            ops::sum_squares(&cpu, &x, &mut acc).unwrap();
            ops::sum_squares(&gpu, &gx, &mut gacc).unwrap();
            res.vals("sum_squares", dt, &f64s(&gacc), &f64s(&acc), 1e-5)?;
            let y = host(&rng.normals(777, 2.0), DType::F32, &[777]);
            let gy = up(&gpu, &y, 1);
            let c = ops::global_grad_norm(&cpu, &[&x, &y]).unwrap() as f64;
            let g = ops::global_grad_norm(&gpu, &[&gx, &gy]).unwrap() as f64;
            res.vals("global_grad_norm", dt, &[g], &[c], 1e-5)
        },
    );
}

// ------------------------------------------- multi-tensor optimizer ops

/// Tensor lengths of a multi-tensor case: empty ones, small ones and ones
/// past a chunk (4096 elements).
fn multi_lens() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(
        prop_oneof![
            3 => 0usize..=300,
            1 => Just(0usize),
            2 => select(vec![4095usize, 4096, 4097, 12_345, 65_537]),
        ],
        0..=9,
    )
}

/// The elements of all `ts`, concatenated, as f64.
fn cat(ts: &[Tensor]) -> Vec<f64> {
    ts.iter().flat_map(f64s).collect()
}

#[test]
fn sum_squares_multi_and_cached_grad_norm() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let kinds = proptest::collection::vec((float_dtype(), offset()), 9);
    run(
        24,
        (multi_lens(), kinds, any::<bool>(), any::<u64>()),
        |(lens, kinds, one_dtype, seed)| {
            let mut rng = SeedRng::new(seed);
            let cpu = Ctx::cpu();
            let dt_of = |i: usize| if one_dtype { DType::F32 } else { kinds[i].0 };
            let xs: Vec<Tensor> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| host(&rng.normals(n, 0.5 + i as f64), dt_of(i), &[n]))
                .collect();
            let gxs: Vec<Tensor> = xs
                .iter()
                .enumerate()
                .map(|(i, x)| up(&gpu, x, kinds[i].1))
                .collect();
            let (cr, gr): (Vec<&Tensor>, Vec<&Tensor>) =
                (xs.iter().collect(), gxs.iter().collect());
            let acc0 = host(&[1.5], DType::F32, &[1]);
            let (mut acc, mut gacc) = (acc0.to_ctx(&cpu).unwrap(), up(&gpu, &acc0, 0));
            ops::sum_squares_multi(&cpu, &cr, &mut acc, None).unwrap();
            ops::sum_squares_multi(&gpu, &gr, &mut gacc, None).unwrap();
            res.vals(
                "sum_squares_multi",
                DType::F32,
                &f64s(&gacc),
                &f64s(&acc),
                1e-5,
            )?;
            // The cached table is reused on the second call, with the same
            // result, bit for bit (no order-dependent atomics).
            let c = ops::global_grad_norm(&cpu, &cr).unwrap() as f64;
            let mut cache = TableCache::new();
            let mut seen = Vec::new();
            for _ in 0..3 {
                let g = ops::global_grad_norm_cached(&gpu, &gr, Some(&mut cache)).unwrap();
                res.vals(
                    "global_grad_norm_multi",
                    DType::F32,
                    &[g as f64],
                    &[c],
                    1e-5,
                )?;
                seen.push(g.to_bits());
            }
            prop_assert!(
                seen.iter().all(|&b| b == seen[0]),
                "the norm varies between calls"
            );
            if one_dtype {
                let want = u64::from(lens.iter().any(|&n| n > 0));
                prop_assert_eq!(cache.uploads(), want);
            }
            Ok(())
        },
    );
}

#[test]
fn adamw_step_multi_matches_cpu_and_single_tensor_kernel() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let strat = (
        multi_lens(),
        float_dtype(),
        1u64..=3,
        offset(),
        any::<bool>(),
        any::<u64>(),
    );
    run(24, strat, |(lens, gdt, steps, off, zero, seed)| {
        let mut rng = SeedRng::new(seed);
        let cpu = Ctx::cpu();
        let t = lens.len();
        let p0: Vec<Tensor> = lens
            .iter()
            .map(|&n| host(&rng.normals(n, 1.0), DType::F32, &[n]))
            .collect();
        let zs = |ctx: Option<&Ctx>| -> Vec<Tensor> {
            lens.iter()
                .map(|&n| match ctx {
                    None => host_zeros(DType::F32, &[n]),
                    Some(g) => gzeros(g, DType::F32, &[n], off),
                })
                .collect()
        };
        // CPU; CUDA multi-tensor; CUDA single-tensor.
        let mut p: Vec<Tensor> = p0.iter().map(|x| x.to_ctx(&cpu).unwrap()).collect();
        let (mut m, mut v) = (zs(None), zs(None));
        let mut gp: Vec<Tensor> = p0.iter().map(|x| up(&gpu, x, off)).collect();
        let (mut gm, mut gv) = (zs(Some(&gpu)), zs(Some(&gpu)));
        let mut sp: Vec<Tensor> = p0.iter().map(|x| up(&gpu, x, off)).collect();
        let (mut sm, mut sv) = (zs(Some(&gpu)), zs(Some(&gpu)));
        // Gradient buffers kept across steps, so the cached table is reused.
        let mut gg: Vec<Tensor> = lens.iter().map(|&n| gzeros(&gpu, gdt, &[n], off)).collect();
        let mut cache = TableCache::new();
        for step in 1..=steps {
            let hp = AdamWParams {
                lr: 0.01,
                weight_decay: [0.0, 0.1][step as usize % 2],
                step,
                grad_scale: 0.5,
                ..Default::default()
            };
            let g: Vec<Tensor> = lens
                .iter()
                .map(|&n| host(&rng.normals(n, 0.1), gdt, &[n]))
                .collect();
            for i in 0..t {
                ops::adamw_step(&cpu, &mut p[i], &g[i], &mut m[i], &mut v[i], &hp, None).unwrap();
                gg[i].copy_from(&gpu, &g[i]).unwrap();
                ops::adamw_step(&gpu, &mut sp[i], &gg[i], &mut sm[i], &mut sv[i], &hp, None)
                    .unwrap();
            }
            {
                let mut pr: Vec<&mut Tensor> = gp.iter_mut().collect();
                let mut gr: Vec<&mut Tensor> = gg.iter_mut().collect();
                let mut mr: Vec<&mut Tensor> = gm.iter_mut().collect();
                let mut vr: Vec<&mut Tensor> = gv.iter_mut().collect();
                ops::adamw_step_multi(
                    &gpu,
                    &mut pr,
                    &mut gr,
                    &mut mr,
                    &mut vr,
                    &hp,
                    zero,
                    Some(&mut cache),
                )
                .unwrap();
            }
            let want: Vec<f64> = if zero {
                vec![0.0; lens.iter().sum()]
            } else {
                cat(&g)
            };
            res.exact_vals("adamw_multi_grad_after", gdt, &cat(&gg), &want)?;
        }
        let tol = tol_for(DType::F32);
        res.vals("adamw_multi_param", gdt, &cat(&gp), &cat(&p), tol)?;
        res.vals("adamw_multi_m", gdt, &cat(&gm), &cat(&m), tol)?;
        res.vals("adamw_multi_v", gdt, &cat(&gv), &cat(&v), tol)?;
        // Same per-element code as the single-tensor kernel: same bits.
        res.exact_vals("adamw_multi_vs_single_param", gdt, &cat(&gp), &cat(&sp))?;
        res.exact_vals("adamw_multi_vs_single_m", gdt, &cat(&gm), &cat(&sm))?;
        res.exact_vals("adamw_multi_vs_single_v", gdt, &cat(&gv), &cat(&sv))?;
        let want = u64::from(lens.iter().any(|&n| n > 0));
        prop_assert_eq!(cache.uploads(), want);
        Ok(())
    });
}

#[test]
fn fill_multi_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let dts = select(vec![DType::F32, DType::BF16, DType::F16, DType::I32]);
    let kinds = proptest::collection::vec((dts, offset()), 9);
    run(
        24,
        (multi_lens(), kinds, any::<u64>()),
        |(lens, kinds, seed)| {
            let mut rng = SeedRng::new(seed);
            let mut ys: Vec<Tensor> = Vec::new();
            let mut gys: Vec<Tensor> = Vec::new();
            for (i, &n) in lens.iter().enumerate() {
                let (dt, off) = kinds[i];
                let y = match dt {
                    DType::I32 => host_i32(&vec![3; n], &[n]),
                    _ => host(&rng.normals(n, 1.0), dt, &[n]),
                };
                gys.push(up(&gpu, &y, off));
                ys.push(y);
            }
            let mut cr: Vec<&mut Tensor> = ys.iter_mut().collect();
            ops::fill_multi(&Ctx::cpu(), &mut cr, -2.0, None).unwrap();
            let mut gr: Vec<&mut Tensor> = gys.iter_mut().collect();
            ops::fill_multi(&gpu, &mut gr, -2.0, None).unwrap();
            res.exact_vals("fill_multi", DType::F32, &cat(&gys), &cat(&ys))
        },
    );
}

// -------------------------------------------------------------------- rng

#[test]
fn rng_uniform_normal_dropout() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let strat = (
        flat_len(),
        float_dtype(),
        offset(),
        select(vec![0.0f32, 0.1, 0.5]),
    );
    run(32, (strat, any::<u64>()), |((n, dt, off, p), seed)| {
        let cpu = Ctx::cpu();
        let (mut y, mut gy) = (host_zeros(dt, &[n]), gzeros(&gpu, dt, &[n], off));
        ops::fill_uniform(&cpu, &mut y, seed, -1.0, 3.0).unwrap();
        ops::fill_uniform(&gpu, &mut gy, seed, -1.0, 3.0).unwrap();
        res.cmp("fill_uniform", dt, &gy, &y)?;
        ops::fill_normal(&cpu, &mut y, seed, 0.5, 2.0).unwrap();
        ops::fill_normal(&gpu, &mut gy, seed, 0.5, 2.0).unwrap();
        res.cmp("fill_normal", dt, &gy, &y)?;

        let mut rng = SeedRng::new(seed);
        let x = host(&rng.uniforms(n, 0.5, 2.0), dt, &[n]);
        ops::dropout(&cpu, &x, p, seed, &mut y).unwrap();
        ops::dropout(&gpu, &up(&gpu, &x, off), p, seed, &mut gy).unwrap();
        let (c, g) = (f64s(&y), f64s(&gy));
        if let Some(i) = (0..n).find(|&i| (c[i] == 0.0) != (g[i] == 0.0)) {
            return Err(TestCaseError::fail(format!("dropout mask differs at {i}")));
        }
        res.vals("dropout", dt, &g, &c, tol_for(dt))
    });
}

// ---------------------------------------------------------------- permute

#[test]
fn permute_0213() {
    let Some(gpu) = gpu() else { return };
    let res = Results::default();
    let d = prop_oneof![1usize..=40, select(vec![8usize, 16, 64, 128])];
    let strat = (
        (1usize..=3, 1usize..=9, 1usize..=9, d),
        float_dtype(),
        offset(),
        any::<u64>(),
    );
    run(32, strat, |((a, b, c, d), dt, off, seed)| {
        let mut rng = SeedRng::new(seed);
        let x = host(&rng.normals(a * b * c * d, 1.0), dt, &[a, b, c, d]);
        let mut y = host_zeros(dt, &[a, c, b, d]);
        let mut gy = gzeros(&gpu, dt, &[a, c, b, d], off);
        ops::permute_0213(&Ctx::cpu(), &x, &mut y).unwrap();
        ops::permute_0213(&gpu, &up(&gpu, &x, off), &mut gy).unwrap();
        res.exact("permute_0213", dt, &gy, &y)
    });
}

// ------------------------------------------- memory, copies and errors

/// Ops on tensors with no rows must not write outside them. Each output is
/// a view in the middle of a sentinel-filled buffer.
#[test]
fn ops_on_empty_tensors_write_nothing() {
    let Some(gpu) = gpu() else { return };
    let f = DType::F32;
    let d = 64;
    let sentinel = host(&vec![7.0; 4 * d], f, &[4 * d]);
    let guarded = |shape: &[usize]| {
        let big = up(&gpu, &sentinel, 0);
        let v = big.view(d, shape).unwrap();
        (big, v)
    };
    let untouched = |what: &str, big: &Tensor| {
        assert!(
            big.to_vec::<f32>().unwrap().iter().all(|&x| x == 7.0),
            "{what} on an empty tensor wrote outside it"
        );
    };
    let x = up(&gpu, &sentinel, 0);
    let w = x.view(0, &[d]).unwrap();

    let (ybig, mut y) = guarded(&[0, d]);
    let (rbig, mut r) = guarded(&[0]);
    ops::rmsnorm_fwd(&gpu, &x.view(0, &[0, d]).unwrap(), &w, 1e-5, &mut y, &mut r).unwrap();
    untouched("rmsnorm_fwd y", &ybig);
    untouched("rmsnorm_fwd rstd", &rbig);

    let (dxbig, mut dx) = guarded(&[0, d]);
    let e = x.view(0, &[0, d]).unwrap();
    ops::rmsnorm_bwd(&gpu, &e, &e, &w, &r, &mut dx, None).unwrap();
    untouched("rmsnorm_bwd dx", &dxbig);

    for shape in [[1, 2, 0, 8], [0, 2, 8, 8]] {
        let s = x.view(0, &shape).unwrap();
        let (pbig, mut p) = guarded(&shape);
        ops::softmax_causal_fwd(&gpu, &s, None, 1.0, &mut p).unwrap();
        untouched("softmax_causal_fwd", &pbig);
        ops::softmax_causal_bwd(&gpu, &s, &s, 1.0, &mut p).unwrap();
        untouched("softmax_causal_bwd", &pbig);
    }

    let (ybig, mut y) = guarded(&[0]);
    let e = x.view(0, &[0]).unwrap();
    ops::swiglu_fwd(&gpu, &e, &e, &mut y).unwrap();
    ops::add(&gpu, &e, &e, &mut y).unwrap();
    ops::cast(&gpu, &e, &mut y).unwrap();
    ops::dropout(&gpu, &e, 0.5, 1, &mut y).unwrap();
    untouched("element-wise ops", &ybig);

    let ids = up(&gpu, &host_i32(&[], &[0]), 0);
    let (ybig, mut y) = guarded(&[0, d]);
    ops::embedding_fwd(&gpu, &ids, &x.view(0, &[2, d]).unwrap(), &mut y).unwrap();
    untouched("embedding_fwd", &ybig);
    let (ybig, mut y) = guarded(&[0, 2, 8]);
    ops::rope_fwd(
        &gpu,
        &x.view(0, &[0, 2, 8]).unwrap(),
        &ids,
        &w.view(0, &[4]).unwrap(),
        &mut y,
    )
    .unwrap();
    untouched("rope_fwd", &ybig);
}

#[test]
fn absurd_allocation_is_out_of_memory() {
    let Some(gpu) = gpu() else { return };
    let pib = 1usize << 50;
    match Tensor::zeros(&gpu, DType::U8, &[pib]) {
        Err(Error::OutOfMemory {
            requested, total, ..
        }) => {
            assert_eq!(requested, pib);
            assert!(total > 0);
        }
        other => panic!("expected Error::OutOfMemory, got {other:?}"),
    }
    let alloc = gpu.cuda_ctx().unwrap().allocator();
    assert!(matches!(alloc.alloc(pib), Err(Error::OutOfMemory { .. })));
    // The context still works afterwards.
    let t = Tensor::from_f32(&gpu, &[1.0, 2.0], DType::F32, &[2]).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
}

#[test]
fn caching_allocator_reuses_blocks() {
    let Some(gpu) = gpu() else { return };
    let alloc = gpu.cuda_ctx().unwrap().allocator().clone();
    for shape in [[3usize, 1000, 333], [1, 1, 1000]] {
        drop(Tensor::zeros(&gpu, DType::F32, &shape).unwrap());
        let before = alloc.stats();
        for _ in 0..100 {
            let t = Tensor::zeros(&gpu, DType::F32, &shape).unwrap();
            drop(t);
        }
        let after = alloc.stats();
        assert_eq!(
            after.device_mallocs, before.device_mallocs,
            "{shape:?}: cudaMalloc called again for a cached size"
        );
        assert_eq!(
            after.in_use, before.in_use,
            "{shape:?}: blocks not returned"
        );
        assert!(after.cached >= 4 * numel(&shape));
    }
    gpu.synchronize().unwrap();
}

#[test]
fn host_device_copies_round_trip() {
    let Some(gpu) = gpu() else { return };
    let v: Vec<f32> = (0..1001).map(|i| i as f32 * 0.5 - 3.0).collect();
    for off in [0, 1, 3] {
        let t = host(&v, DType::F32, &[1001]);
        let g = up(&gpu, &t, off);
        assert_eq!(g.to_vec::<f32>().unwrap(), v);
        let mut pinned = Tensor::zeros_pinned(&gpu, DType::F32, &[1001]).unwrap();
        assert!(pinned.is_pinned());
        pinned.copy_from(&gpu, &g).unwrap();
        gpu.synchronize().unwrap();
        assert_eq!(pinned.to_vec::<f32>().unwrap(), v);
        // Device to device, between views.
        let mut g2 = gzeros(&gpu, DType::F32, &[1001], 3 - off);
        g2.copy_from(&gpu, &g).unwrap();
        assert_eq!(g2.to_vec::<f32>().unwrap(), v);
    }
}

#[test]
fn tensors_on_another_device_are_errors() {
    let Some(gpu) = gpu() else { return };
    let c = host(&[1.0; 4], DType::F32, &[4]);
    let g = up(&gpu, &c, 0);
    let mut out = gzeros(&gpu, DType::F32, &[4], 0);
    match ops::add(&gpu, &c, &g, &mut out) {
        Err(Error::Device { got, expected, .. }) => {
            assert_eq!((got, expected), (Device::Cpu, Device::Cuda(0)))
        }
        other => panic!("expected Error::Device, got {other:?}"),
    }
    let mut host_out = host_zeros(DType::F32, &[4]);
    assert!(matches!(
        ops::add(&Ctx::cpu(), &c, &g, &mut host_out),
        Err(Error::Device { .. })
    ));
    assert!(g.as_slice::<f32>().is_err());
}
