//! Fused causal attention (`flash_attn_fwd`/`flash_attn_bwd`): the CPU op
//! against a materialized f64 reference (GQA, packed segments, proptest
//! shapes), its backward against finite differences, and CUDA against CPU in
//! bf16 and f16 (head dims 16-128, sequences up to 1100). Without a CUDA GPU
//! the CUDA tests print "skipping: no CUDA GPU" and pass (they fail instead
//! under LLMFT_REQUIRE_GPU=1).
mod common;

use common::*;
use llmft_tensor::ops;
use llmft_tensor::{Ctx, DType, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// One attention problem: shapes, inputs (f32, already rounded to `dt`),
/// optional segment ids.
#[derive(Debug, Clone)]
struct Case {
    b: usize,
    hq: usize,
    hkv: usize,
    t: usize,
    d: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_out: Vec<f32>,
    seg: Option<Vec<i32>>,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn new(
        seed: u64,
        dt: DType,
        b: usize,
        hq: usize,
        hkv: usize,
        t: usize,
        d: usize,
        segmented: bool,
    ) -> Self {
        let mut r = SeedRng::new(seed);
        let (nq, nk) = (b * hq * t * d, b * hkv * t * d);
        let seg = segmented.then(|| {
            // Contiguous runs of example ids per row, like packed batches.
            let mut s = Vec::with_capacity(b * t);
            for _ in 0..b {
                let mut id = 0;
                for i in 0..t {
                    if i > 0 && r.below(5) == 0 {
                        id += 1;
                    }
                    s.push(id);
                }
            }
            s
        });
        Self {
            b,
            hq,
            hkv,
            t,
            d,
            q: round_to(dt, &r.normals(nq, 1.5)),
            k: round_to(dt, &r.normals(nk, 1.0)),
            v: round_to(dt, &r.normals(nk, 1.0)),
            d_out: round_to(dt, &r.normals(nq, 1.0)),
            seg,
        }
    }

    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    fn qshape(&self) -> [usize; 4] {
        [self.b, self.hq, self.t, self.d]
    }

    fn kshape(&self) -> [usize; 4] {
        [self.b, self.hkv, self.t, self.d]
    }

    fn visible(&self, bi: usize, i: usize, j: usize) -> bool {
        j <= i
            && self
                .seg
                .as_ref()
                .is_none_or(|s| s[bi * self.t + j] == s[bi * self.t + i])
    }
}

/// The materialized f64 reference: out, lse, and the gradients dq, dk, dv
/// of `Σ d_out ∘ out`.
struct Reference {
    out: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

fn reference(c: &Case) -> Reference {
    let (t, d) = (c.t, c.d);
    let rep = c.hq / c.hkv;
    let sc = c.scale() as f64;
    let mut r = Reference {
        out: vec![0.0; c.q.len()],
        lse: vec![0.0; c.b * c.hq * t],
        dq: vec![0.0; c.q.len()],
        dk: vec![0.0; c.k.len()],
        dv: vec![0.0; c.k.len()],
    };
    let at = |v: &[f32], base: usize, row: usize, x: usize| v[base + row * d + x] as f64;
    for bi in 0..c.b {
        for h in 0..c.hq {
            let qh = (bi * c.hq + h) * t * d;
            let kh = (bi * c.hkv + h / rep) * t * d;
            // P [T, T] for this head, masked entries 0.
            let mut p = vec![0f64; t * t];
            for i in 0..t {
                let s: Vec<f64> = (0..t)
                    .map(|j| {
                        if c.visible(bi, i, j) {
                            sc * (0..d)
                                .map(|x| at(&c.q, qh, i, x) * at(&c.k, kh, j, x))
                                .sum::<f64>()
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                r.lse[(bi * c.hq + h) * t + i] = mx + sum.ln();
                for j in 0..t {
                    p[i * t + j] = (s[j] - mx).exp() / sum;
                }
                for x in 0..d {
                    r.out[qh + i * d + x] = (0..t).map(|j| p[i * t + j] * at(&c.v, kh, j, x)).sum();
                }
            }
            for i in 0..t {
                let dp: Vec<f64> = (0..t)
                    .map(|j| {
                        (0..d)
                            .map(|x| at(&c.d_out, qh, i, x) * at(&c.v, kh, j, x))
                            .sum()
                    })
                    .collect();
                let dot: f64 = (0..t).map(|j| p[i * t + j] * dp[j]).sum();
                for j in 0..t {
                    let pij = p[i * t + j];
                    let ds = pij * (dp[j] - dot);
                    for x in 0..d {
                        r.dq[qh + i * d + x] += sc * ds * at(&c.k, kh, j, x);
                        r.dk[kh + j * d + x] += sc * ds * at(&c.q, qh, i, x);
                        r.dv[kh + j * d + x] += pij * at(&c.d_out, qh, i, x);
                    }
                }
            }
        }
    }
    r
}

/// The op's results on `ctx`: out, lse, dq, dk, dv.
struct Fused {
    out: Tensor,
    lse: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
}

/// Whether the fused kernels of head dim `d` run on `g`'s kernel path; says
/// so where they do not (the path's shared memory is too small: the sm_61
/// path for head dim 128; models then take the materialized attention).
fn runs_here(g: &Ctx, dt: DType, d: usize) -> bool {
    let ok = ops::flash_attn_supported(g, dt, d);
    if !ok {
        let p = g.cuda_ctx().map(|c| c.path_arch()).unwrap_or((0, 0));
        eprintln!(
            "skipped: head dim {d} {dt} has no fused kernel on the sm_{}{} path",
            p.0, p.1
        );
    }
    ok
}

fn fused(ctx: &Ctx, c: &Case, dt: DType) -> Fused {
    run_fused(ctx, c, dt, false)
}

/// [`fused`] through the token-major API (`[B, T, H, D]` tensors, made and
/// read back with exact transposes on `ctx`), in head-major layout.
fn fused_tokens(ctx: &Ctx, c: &Case, dt: DType) -> Fused {
    run_fused(ctx, c, dt, true)
}

fn run_fused(ctx: &Ctx, c: &Case, dt: DType, tokens: bool) -> Fused {
    // [B, H, T, D] <-> [B, T, H, D] (its own inverse).
    let swap = |x: &Tensor| {
        if !tokens {
            return x.clone();
        }
        let s = x.shape().to_vec();
        let mut y = Tensor::zeros(ctx, x.dtype(), &[s[0], s[2], s[1], s[3]]).unwrap();
        ops::permute_0213(ctx, x, &mut y).unwrap();
        y
    };
    let (qs, ks) = (c.qshape(), c.kshape());
    let q = swap(&tensor(ctx, &c.q, dt, &qs));
    let k = swap(&tensor(ctx, &c.k, dt, &ks));
    let v = swap(&tensor(ctx, &c.v, dt, &ks));
    let d_out = swap(&tensor(ctx, &c.d_out, dt, &qs));
    let seg = c
        .seg
        .as_ref()
        .map(|s| Tensor::from_slice(ctx, s, &[c.b, c.t]).unwrap());
    let (fwd, bwd) = if tokens {
        (
            ops::flash_attn_fwd_tokens as FwdFn,
            ops::flash_attn_bwd_tokens as BwdFn,
        )
    } else {
        (ops::flash_attn_fwd as FwdFn, ops::flash_attn_bwd as BwdFn)
    };
    let mut out = Tensor::zeros(ctx, dt, q.shape()).unwrap();
    let mut lse = Tensor::zeros(ctx, DType::F32, &[c.b, c.hq, c.t]).unwrap();
    fwd(ctx, &q, &k, &v, seg.as_ref(), c.scale(), &mut out, &mut lse).unwrap();
    let mut dq = Tensor::zeros(ctx, dt, q.shape()).unwrap();
    let mut dk = Tensor::zeros(ctx, dt, k.shape()).unwrap();
    let mut dv = Tensor::zeros(ctx, dt, k.shape()).unwrap();
    bwd(
        ctx,
        &q,
        &k,
        &v,
        &out,
        &d_out,
        &lse,
        seg.as_ref(),
        c.scale(),
        &mut dq,
        &mut dk,
        &mut dv,
    )
    .unwrap();
    Fused {
        out: swap(&out),
        lse,
        dq: swap(&dq),
        dk: swap(&dk),
        dv: swap(&dv),
    }
}

type FwdFn = fn(
    &Ctx,
    &Tensor,
    &Tensor,
    &Tensor,
    Option<&Tensor>,
    f32,
    &mut Tensor,
    &mut Tensor,
) -> llmft_tensor::Result<()>;
type BwdFn = fn(
    &Ctx,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    Option<&Tensor>,
    f32,
    &mut Tensor,
    &mut Tensor,
    &mut Tensor,
) -> llmft_tensor::Result<()>;

#[test]
fn token_major_layout_matches_head_major() {
    let cpu = Ctx::cpu();
    for (i, &(b, hq, hkv, t, d, seg)) in [(2, 4, 2, 19, 16, true), (1, 2, 1, 33, 64, false)]
        .iter()
        .enumerate()
    {
        let c = Case::new(60 + i as u64, DType::F32, b, hq, hkv, t, d, seg);
        let (h, tk) = (
            fused(&cpu, &c, DType::F32),
            fused_tokens(&cpu, &c, DType::F32),
        );
        for (what, a, bb) in [
            ("out", &h.out, &tk.out),
            ("lse", &h.lse, &tk.lse),
            ("dq", &h.dq, &tk.dq),
            ("dk", &h.dk, &tk.dk),
            ("dv", &h.dv, &tk.dv),
        ] {
            assert_eq!(f64s(a), f64s(bb), "{what} for {c:?}");
        }
    }
}

fn check_against_reference(c: &Case, tol: f64) -> Result<(), String> {
    let f = fused(&Ctx::cpu(), c, DType::F32);
    let r = reference(c);
    for (what, got, want) in [
        ("out", f64s(&f.out), &r.out),
        ("lse", f64s(&f.lse), &r.lse),
        ("dq", f64s(&f.dq), &r.dq),
        ("dk", f64s(&f.dk), &r.dk),
        ("dv", f64s(&f.dv), &r.dv),
    ] {
        let e = rel_l2(&got, want);
        if e.is_nan() || e > tol {
            return Err(format!("{what}: relative L2 {e:.3e} > {tol:.0e} for {c:?}"));
        }
    }
    Ok(())
}

#[test]
fn cpu_matches_reference_with_gqa_and_segments() {
    for (seed, (b, hq, hkv, t, d, seg)) in [
        (2, 4, 2, 9, 8, true),
        (1, 3, 3, 7, 5, false),
        (2, 6, 1, 12, 16, true),
        (1, 2, 1, 1, 4, true),
    ]
    .into_iter()
    .enumerate()
    {
        let c = Case::new(seed as u64, DType::F32, b, hq, hkv, t, d, seg);
        check_against_reference(&c, 1e-5).unwrap();
    }
}

#[test]
fn segments_hide_other_examples() {
    // The same query and keys, split into two examples at position 3: the
    // second example's outputs equal those of attending over it alone.
    let mut c = Case::new(7, DType::F32, 1, 2, 1, 8, 4, false);
    c.seg = Some(vec![0, 0, 0, 1, 1, 1, 1, 1]);
    let f = fused(&Ctx::cpu(), &c, DType::F32);
    let tail = |v: &[f32], h: usize| v[(h * 8 + 3) * 4..(h * 8 + 8) * 4].to_vec();
    let alone = Case {
        t: 5,
        q: [tail(&c.q, 0), tail(&c.q, 1)].concat(),
        k: tail(&c.k, 0),
        v: tail(&c.v, 0),
        d_out: [tail(&c.d_out, 0), tail(&c.d_out, 1)].concat(),
        seg: None,
        ..c.clone()
    };
    let g = fused(&Ctx::cpu(), &alone, DType::F32);
    let out = f.out.to_f32_vec().unwrap();
    let got = [tail(&out, 0), tail(&out, 1)].concat();
    assert_close("segment 1 out", &wide(&got), &f64s(&g.out), 1e-6);
    let dk = f.dk.to_f32_vec().unwrap();
    assert_close("segment 1 dk", &wide(&tail(&dk, 0)), &f64s(&g.dk), 1e-6);
}

#[test]
fn backward_matches_finite_differences() {
    let c = Case::new(11, DType::F32, 1, 4, 2, 6, 3, true);
    let f = fused(&Ctx::cpu(), &c, DType::F32);
    // L = Σ d_out ∘ out, evaluated in f64 from the op's f32 outputs.
    let loss = |c: &Case| -> f64 {
        let ctx = Ctx::cpu();
        let (qs, ks) = (c.qshape(), c.kshape());
        let seg = c.seg.as_ref().map(|s| host_i32(s, &[c.b, c.t]));
        let mut out = host_zeros(DType::F32, &qs);
        let mut lse = host_zeros(DType::F32, &[c.b, c.hq, c.t]);
        ops::flash_attn_fwd(
            &ctx,
            &host(&c.q, DType::F32, &qs),
            &host(&c.k, DType::F32, &ks),
            &host(&c.v, DType::F32, &ks),
            seg.as_ref(),
            c.scale(),
            &mut out,
            &mut lse,
        )
        .unwrap();
        dot(&f64s(&out), &wide(&c.d_out))
    };
    let eps = 1e-3f32;
    for (what, analytic, pick) in [
        ("dq", f64s(&f.dq), 0usize),
        ("dk", f64s(&f.dk), 1),
        ("dv", f64s(&f.dv), 2),
    ] {
        let mut numeric = Vec::with_capacity(analytic.len());
        for i in 0..analytic.len() {
            let mut lo = c.clone();
            let mut hi = c.clone();
            let (l, h) = match pick {
                0 => (&mut lo.q, &mut hi.q),
                1 => (&mut lo.k, &mut hi.k),
                _ => (&mut lo.v, &mut hi.v),
            };
            l[i] -= eps;
            h[i] += eps;
            numeric.push((loss(&hi) - loss(&lo)) / (2.0 * eps as f64));
        }
        assert_close(what, &analytic, &numeric, 1e-3);
    }
}

#[test]
fn proptest_shapes_match_reference() {
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let shapes = (
        1usize..3,
        1usize..3,
        1usize..4,
        1usize..20,
        1usize..10,
        any::<bool>(),
        any::<u64>(),
    );
    let r = runner.run(&shapes, |(b, hkv, rep, t, d, seg, seed)| {
        let c = Case::new(seed, DType::F32, b, hkv * rep, hkv, t, d, seg);
        check_against_reference(&c, 1e-5).map_err(TestCaseError::fail)
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

#[test]
fn rejects_bad_shapes() {
    let ctx = Ctx::cpu();
    let q = host_zeros(DType::F32, &[1, 3, 4, 8]);
    let k = host_zeros(DType::F32, &[1, 2, 4, 8]);
    let mut out = host_zeros(DType::F32, &[1, 3, 4, 8]);
    let mut lse = host_zeros(DType::F32, &[1, 3, 4]);
    // 3 query heads over 2 kv heads.
    assert!(ops::flash_attn_fwd(&ctx, &q, &k, &k, None, 1.0, &mut out, &mut lse).is_err());
    let k = host_zeros(DType::F32, &[1, 1, 4, 8]);
    let mut lse_bad = host_zeros(DType::F32, &[1, 3, 5]);
    assert!(ops::flash_attn_fwd(&ctx, &q, &k, &k, None, 1.0, &mut out, &mut lse_bad).is_err());
    let seg = host_i32(&[0, 0, 1], &[1, 3]);
    assert!(ops::flash_attn_fwd(&ctx, &q, &k, &k, Some(&seg), 1.0, &mut out, &mut lse).is_err());
    assert!(ops::flash_attn_fwd(&ctx, &q, &k, &k, None, 1.0, &mut out, &mut lse).is_ok());
}

// ------------------------------------------------------------------- CUDA

#[test]
fn cuda_matches_cpu() {
    let Some(g) = gpu() else { return };
    let cpu = Ctx::cpu();
    let mut worst = 0f64;
    for dt in [DType::BF16, DType::F16] {
        for (i, &(b, hq, hkv, t, d, seg)) in [
            (2, 4, 2, 77, 64, true),
            (1, 8, 2, 1, 64, false),
            (2, 4, 1, 200, 128, true),
            (1, 2, 2, 130, 16, true),
            (1, 3, 1, 65, 32, false),
            (1, 4, 1, 1100, 128, true),
            (1, 2, 1, 1024, 64, false),
        ]
        .iter()
        .enumerate()
        {
            if !runs_here(&g, dt, d) {
                continue;
            }
            let c = Case::new(100 + i as u64, dt, b, hq, hkv, t, d, seg);
            let want = fused(&cpu, &c, dt);
            let (got, got_tok) = (fused(&g, &c, dt), fused_tokens(&g, &c, dt));
            for (what, gt, ct) in [
                ("out", &got.out, &want.out),
                ("lse", &got.lse, &want.lse),
                ("dq", &got.dq, &want.dq),
                ("dk", &got.dk, &want.dk),
                ("dv", &got.dv, &want.dv),
                ("out (token-major)", &got_tok.out, &want.out),
                ("lse (token-major)", &got_tok.lse, &want.lse),
                ("dq (token-major)", &got_tok.dq, &want.dq),
                ("dk (token-major)", &got_tok.dk, &want.dk),
                ("dv (token-major)", &got_tok.dv, &want.dv),
            ] {
                let e = rel_l2(&f64s(gt), &f64s(ct));
                println!(
                    "RESULT op=flash_attn {what} dtype={dt} b={b} hq={hq} hkv={hkv} t={t} d={d} \
                     rel_l2={e:.3e}"
                );
                assert!(
                    e <= tol_for(dt),
                    "flash_attn {what} {dt} {c_shape:?}: CUDA vs CPU relative L2 {e:.3e}",
                    c_shape = (b, hq, hkv, t, d, seg)
                );
                worst = worst.max(e);
            }
        }
    }
    println!("RESULT op=flash_attn worst rel_l2={worst:.3e}");
}

/// Packed rows with long examples (whole key and query tiles outside a
/// block's examples, which the kernels skip) and rows whose ids are not one
/// run per example (no skipping: the result must stay exact).
#[test]
fn cuda_matches_cpu_for_packed_and_unsorted_segments() {
    let Some(g) = gpu() else { return };
    let cpu = Ctx::cpu();
    let t = 1100;
    let runs: Vec<i32> = (0..t as i32).map(|i| i / 300 + (i / 700)).collect();
    let unsorted: Vec<i32> = (0..t as i32).map(|i| ((i / 150) * 7) % 4).collect();
    for (name, ids) in [("long runs", runs), ("unsorted ids", unsorted)] {
        for d in [64, 128] {
            if !runs_here(&g, DType::BF16, d) {
                continue;
            }
            let mut c = Case::new(7, DType::BF16, 1, 4, 2, t, d, true);
            c.seg = Some(ids.clone());
            let want = fused(&cpu, &c, DType::BF16);
            let (got, tok) = (
                fused(&g, &c, DType::BF16),
                fused_tokens(&g, &c, DType::BF16),
            );
            for (what, a, bb, w) in [
                ("out", &got.out, &tok.out, &want.out),
                ("lse", &got.lse, &tok.lse, &want.lse),
                ("dq", &got.dq, &tok.dq, &want.dq),
                ("dk", &got.dk, &tok.dk, &want.dk),
                ("dv", &got.dv, &tok.dv, &want.dv),
            ] {
                for (layout, x) in [("head-major", a), ("token-major", bb)] {
                    let e = rel_l2(&f64s(x), &f64s(w));
                    println!("RESULT op=flash_attn {name} {what} {layout} d={d} rel_l2={e:.3e}");
                    assert!(
                        e <= tol_for(DType::BF16),
                        "{name} d={d} {what} {layout}: {e:.3e}"
                    );
                }
            }
        }
    }
}

/// With `set_deterministic_attention`, the backward's dq (added by many key
/// blocks) is the same bit for bit from call to call, and still right.
#[test]
fn cuda_deterministic_backward_repeats_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let cpu = Ctx::cpu();
    ops::set_deterministic_attention(true);
    for (d, seg) in [(128, false), (64, true)] {
        if !runs_here(&g, DType::BF16, d) {
            continue;
        }
        let c = Case::new(21, DType::BF16, 2, 8, 2, 1100, d, seg);
        let want = fused(&cpu, &c, DType::BF16);
        let runs: Vec<Fused> = (0..3).map(|_| fused_tokens(&g, &c, DType::BF16)).collect();
        for r in &runs[1..] {
            for (what, a, b) in [("dq", &r.dq, &runs[0].dq), ("dk", &r.dk, &runs[0].dk)] {
                let (x, y) = (f64s(a), f64s(b));
                assert!(
                    x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "d={d}: {what} differs between deterministic runs"
                );
            }
        }
        let e = rel_l2(&f64s(&runs[0].dq), &f64s(&want.dq));
        println!("RESULT op=flash_attn deterministic dq d={d} rel_l2={e:.3e}");
        assert!(e <= tol_for(DType::BF16), "d={d}: deterministic dq {e:.3e}");
    }
    ops::set_deterministic_attention(false);
}

#[test]
fn cuda_rejects_unsupported_head_dim() {
    let Some(g) = gpu() else { return };
    assert!(!ops::flash_attn_supported(&g, DType::BF16, 24));
    assert!(!ops::flash_attn_supported(&g, DType::F32, 64));
    // The backward takes the largest tiles the path's shared memory allows
    // (bytes per block, worked out from flash_attn.cu's layout): 128 keys ×
    // 64 queries, then 64 × 32, then (head dim 128 only) 64 × 16.
    let cu = g.cuda_ctx().unwrap();
    let max = cu.max_shared_per_block();
    let pick = |sizes: &[(usize, (usize, usize))]| sizes.iter().find(|s| s.0 <= max).map(|s| s.1);
    let want128 = pick(&[(159_232, (128, 64)), (75_520, (64, 32)), (55_680, (64, 16))]);
    let want64 = pick(&[(93_696, (128, 64)), (42_752, (64, 32))]);
    println!(
        "RESULT op=flash_attn bwd_tiles path=sm_{}{} max_smem={max} d64={want64:?} d128={want128:?}",
        cu.path_arch().0,
        cu.path_arch().1
    );
    assert_eq!(ops::flash_attn_bwd_tiles(&g, 128), want128);
    assert_eq!(ops::flash_attn_bwd_tiles(&g, 64), want64);
    assert_eq!(ops::flash_attn_bwd_tiles(&g, 32), None);
    assert_eq!(ops::flash_attn_bwd_tiles(&Ctx::cpu(), 128), None);
    // The forward for head dim 128 takes 51.1 KiB.
    assert_eq!(
        ops::flash_attn_supported(&g, DType::BF16, 128),
        want128.is_some() && max >= 52_352
    );
    assert_eq!(
        ops::flash_attn_supported(&g, DType::BF16, 64),
        want64.is_some()
    );
    assert!(ops::flash_attn_supported(&g, DType::F16, 32));
    let q = Tensor::zeros(&g, DType::BF16, &[1, 1, 4, 24]).unwrap();
    let mut out = Tensor::zeros(&g, DType::BF16, &[1, 1, 4, 24]).unwrap();
    let mut lse = Tensor::zeros(&g, DType::F32, &[1, 1, 4]).unwrap();
    assert!(ops::flash_attn_fwd(&g, &q, &q, &q, None, 1.0, &mut out, &mut lse).is_err());
}
