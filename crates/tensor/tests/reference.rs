//! Every op's CPU path against a naive f64 reference written here.
//! f32 results must be within 1e-5 relative L2 of the reference; results
//! stored as bf16/f16 within the rounding of that type.
// References index several arrays by one position, as the ops do.
#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use llmft_tensor::ops::{self, AdamWParams, CrossEntropyOpts, Gemm, LmHeadGrads, RopeScaling};
use llmft_tensor::{bf16, f16, Ctx, DType, Tensor};
use proptest::prelude::*;
use proptest::sample::select;

const TOL: f64 = 1e-5;

fn cpu() -> Ctx {
    Ctx::cpu()
}

/// Sizes that hit the edge cases: 1, odd, and around multiples of 8/64/128.
fn dim(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 1..=max.min(40),
        1 => select(
            [1usize, 7, 9, 63, 65, 127, 129, 200, 257]
                .into_iter()
                .filter(|&d| d <= max)
                .collect::<Vec<_>>()
        ),
    ]
}

fn float_dtype() -> impl Strategy<Value = DType> {
    select(vec![DType::F32, DType::BF16, DType::F16])
}

// ---------------------------------------------------------------- cast, fill

/// bf16 round-to-nearest-even by bit manipulation (finite or infinite x).
fn bf16_rne(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn cast_inputs(rng: &mut SeedRng, n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n)
        .map(|i| {
            let scale = [1e-6, 1e-3, 1.0, 300.0, 7e4, 1e-40][i % 6];
            (rng.normal() * scale) as f32
        })
        .collect();
    // Exact ties of bf16 (1 + 2^-8, 1 + 3·2^-8) and f16 (1 + 2^-11), signed
    // zeros, infinities, and the largest finite values.
    v.extend([
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -(1.0 + 1.0 / 2048.0),
        1.0 + 3.0 / 2048.0,
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        65504.0,
        65520.0,
        f32::MAX,
        f32::MIN_POSITIVE,
    ]);
    v
}

/// The f32 value of `x` cast to `d` by an independent rule.
fn cast_ref(x: f32, d: DType) -> f32 {
    match d {
        DType::F32 => x,
        DType::BF16 => f32::from_bits((bf16_rne(x) as u32) << 16),
        DType::F16 => f16::from_f64(x as f64).to_f32(),
        _ => unreachable!(),
    }
}

#[test]
fn cast_rounds_to_nearest_even_between_all_float_types() {
    let floats = [DType::F32, DType::BF16, DType::F16];
    let mut rng = SeedRng::new(1);
    let src = cast_inputs(&mut rng, 300);
    let n = src.len();
    for from in floats {
        // The source tensor holds `src` already rounded to `from`.
        let xs: Vec<f32> = src.iter().map(|&x| cast_ref(x, from)).collect();
        let x = host(&xs, from, &[n]);
        assert_eq!(
            x.to_f32_vec()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            xs.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "from_f32 to {from} is not round-to-nearest-even"
        );
        for to in floats {
            let mut y = host_zeros(to, &[n]);
            ops::cast(&cpu(), &x, &mut y).unwrap();
            let got = y.to_f32_vec().unwrap();
            for i in 0..n {
                let want = cast_ref(xs[i], to);
                assert_eq!(
                    got[i].to_bits(),
                    want.to_bits(),
                    "cast {from}->{to} of {:e}: got {:e}, want {:e}",
                    xs[i],
                    got[i],
                    want
                );
            }
        }
    }
}

#[test]
fn fill_sets_every_element() {
    for (d, value) in [
        (DType::F32, 0.1f32),
        (DType::BF16, 0.1),
        (DType::F16, -3.3),
        (DType::I32, 7.0),
    ] {
        let mut y = host_zeros(d, &[3, 37]);
        ops::fill(&cpu(), &mut y, value).unwrap();
        let want = if d == DType::I32 {
            value
        } else {
            round_to(d, &[value])[0]
        };
        assert!(
            y.to_f32_vec().unwrap().iter().all(|&v| v == want),
            "fill {d}"
        );
    }
}

// ------------------------------------------------------ add, axpby, mul

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn elementwise_match_f64(n in dim(300), dt in float_dtype(), seed in any::<u64>(),
                             alpha in select(vec![1.0f32, -0.5, 2.25]),
                             beta in select(vec![0.0f32, 1.0, 0.3])) {
        let mut rng = SeedRng::new(seed);
        let a = round_to(dt, &rng.normals(n, 1.0));
        let b = round_to(dt, &rng.normals(n, 1.0));
        let (ta, tb) = (host(&a, dt, &[n]), host(&b, dt, &[n]));
        let tol = tol_for(dt) / 2.0;

        let mut y = host_zeros(dt, &[n]);
        ops::add(&cpu(), &ta, &tb, &mut y).unwrap();
        let want: Vec<f64> = a.iter().zip(&b).map(|(x, z)| *x as f64 + *z as f64).collect();
        assert_close("add", &f64s(&y), &want, tol);

        ops::mul(&cpu(), &ta, &tb, &mut y).unwrap();
        let want: Vec<f64> = a.iter().zip(&b).map(|(x, z)| *x as f64 * *z as f64).collect();
        assert_close("mul", &f64s(&y), &want, tol);

        let mut y = host(&b, dt, &[n]);
        ops::axpby(&cpu(), alpha, &ta, beta, &mut y).unwrap();
        let want: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(x, z)| alpha as f64 * *x as f64 + beta as f64 * *z as f64)
            .collect();
        assert_close("axpby", &f64s(&y), &want, tol);
    }
}

#[test]
fn axpby_with_beta_zero_ignores_nan_in_y() {
    let x = host(&[1.0, 2.0, 3.0], DType::F32, &[3]);
    let mut y = host(&[f32::NAN, f32::INFINITY, 1.0], DType::F32, &[3]);
    ops::axpby(&cpu(), 2.0, &x, 0.0, &mut y).unwrap();
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![2.0, 4.0, 6.0]);
}

// ------------------------------------------------------------------- gemm

struct GemmCase {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    g: Gemm,
    /// B has a batch dimension (otherwise a 2-D B is shared by the batch).
    b_batched: bool,
    /// A (and C) are 2-D (batch must be 1).
    two_d: bool,
    in_dt: DType,
    c_dt: DType,
}

/// Runs `gemm` on random data and checks it against an f64 triple loop.
fn check_gemm(c: &GemmCase, seed: u64) {
    let mut rng = SeedRng::new(seed);
    let (bt, m, n, k) = (c.batch, c.m, c.n, c.k);
    let a = round_to(c.in_dt, &rng.normals(bt * m * k, 1.0));
    let bn = if c.b_batched { bt } else { 1 };
    let b = round_to(c.in_dt, &rng.normals(bn * k * n, 1.0));
    let c0 = round_to(c.c_dt, &rng.normals(bt * m * n, 1.0));
    let lead = |r: usize, s: usize| -> Vec<usize> {
        if c.two_d {
            vec![r, s]
        } else {
            vec![bt, r, s]
        }
    };
    let a_shape = if c.g.trans_a { lead(k, m) } else { lead(m, k) };
    let b_inner = if c.g.trans_b { [n, k] } else { [k, n] };
    let b_shape: Vec<usize> = if c.b_batched {
        [vec![bt], b_inner.to_vec()].concat()
    } else {
        b_inner.to_vec()
    };
    let ta = host(&a, c.in_dt, &a_shape);
    let tb = host(&b, c.in_dt, &b_shape);
    let mut tc = host(&c0, c.c_dt, &lead(m, n));
    ops::gemm(&cpu(), &ta, &tb, &mut tc, c.g).unwrap();

    let mut want = vec![0f64; bt * m * n];
    for bi in 0..bt {
        let bo = if c.b_batched { bi * k * n } else { 0 };
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let av = if c.g.trans_a {
                        a[bi * m * k + p * m + i]
                    } else {
                        a[bi * m * k + i * k + p]
                    };
                    let bv = if c.g.trans_b {
                        b[bo + j * k + p]
                    } else {
                        b[bo + p * n + j]
                    };
                    s += av as f64 * bv as f64;
                }
                let o = bi * m * n + i * n + j;
                want[o] = c.g.alpha as f64 * s + c.g.beta as f64 * c0[o] as f64;
            }
        }
    }
    let tol = tol_for(c.c_dt) / 2.0;
    assert_close(
        &format!(
            "gemm b={bt} m={m} n={n} k={k} {:?} b_batched={} {}->{}",
            c.g, c.b_batched, c.in_dt, c.c_dt
        ),
        &f64s(&tc),
        &want,
        tol,
    );
}

#[test]
fn gemm_every_transpose_scale_batch_and_dtype_combination() {
    let mut seed = 0;
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (-1.5, 0.25)] {
                for (batch, b_batched, two_d) in
                    [(1, false, true), (3, false, false), (3, true, false)]
                {
                    for (in_dt, c_dt) in [
                        (DType::F32, DType::F32),
                        (DType::BF16, DType::F32),
                        (DType::F16, DType::F32),
                        (DType::BF16, DType::BF16),
                    ] {
                        seed += 1;
                        let g = Gemm {
                            trans_a,
                            trans_b,
                            alpha,
                            beta,
                        };
                        let case = GemmCase {
                            batch,
                            m: 13,
                            n: 9,
                            k: 70,
                            g,
                            b_batched,
                            two_d,
                            in_dt,
                            c_dt,
                        };
                        check_gemm(&case, seed);
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn gemm_matches_f64(batch in 1usize..=3, m in dim(40), n in dim(40), k in dim(140),
                        trans_a in any::<bool>(), trans_b in any::<bool>(),
                        b_batched in any::<bool>(),
                        alpha in select(vec![1.0f32, 0.5, -2.0]),
                        beta in select(vec![0.0f32, 1.0, 0.75]),
                        dts in select(vec![(DType::F32, DType::F32), (DType::BF16, DType::F32),
                                           (DType::BF16, DType::BF16), (DType::F16, DType::F16)]),
                        seed in any::<u64>()) {
        let case = GemmCase {
            batch,
            m,
            n,
            k,
            g: Gemm { trans_a, trans_b, alpha, beta },
            b_batched: b_batched && batch > 1,
            two_d: batch == 1 && !b_batched,
            in_dt: dts.0,
            c_dt: dts.1,
        };
        check_gemm(&case, seed);
    }
}

#[test]
fn gemm_with_empty_inner_dimension_scales_c() {
    for beta in [0.0f32, 0.5] {
        let a = host_zeros(DType::F32, &[3, 0]);
        let b = host_zeros(DType::F32, &[0, 4]);
        let c0: Vec<f32> = (0..12).map(|i| i as f32 - 5.0).collect();
        let mut c = host(&c0, DType::F32, &[3, 4]);
        let g = Gemm {
            beta,
            ..Gemm::default()
        };
        ops::gemm(&cpu(), &a, &b, &mut c, g).unwrap();
        let want: Vec<f32> = c0.iter().map(|v| v * beta).collect();
        assert_eq!(c.to_vec::<f32>().unwrap(), want, "beta {beta}");
    }
}

// ---------------------------------------------------------------- rmsnorm

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn rmsnorm_fwd_matches_f64(rows in 1usize..=6, d in dim(300), dt in float_dtype(),
                               eps in select(vec![1e-6f32, 1e-5, 0.1]), seed in any::<u64>()) {
        let mut rng = SeedRng::new(seed);
        let x = round_to(dt, &rng.normals(rows * d, 2.0));
        let w = round_to(dt, &rng.normals(d, 1.0));
        let mut y = host_zeros(dt, &[rows, d]);
        let mut rstd = host_zeros(DType::F32, &[rows]);
        ops::rmsnorm_fwd(&cpu(), &host(&x, dt, &[rows, d]), &host(&w, dt, &[d]), eps, &mut y,
                         &mut rstd).unwrap();
        let mut want_y = vec![0f64; rows * d];
        let mut want_r = vec![0f64; rows];
        for r in 0..rows {
            let row = &x[r * d..(r + 1) * d];
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            want_r[r] = 1.0 / (ms + eps as f64).sqrt();
            for j in 0..d {
                want_y[r * d + j] = row[j] as f64 * want_r[r] * w[j] as f64;
            }
        }
        assert_close("rmsnorm rstd", &f64s(&rstd), &want_r, TOL);
        assert_close("rmsnorm y", &f64s(&y), &want_y, tol_for(dt) / 2.0);
    }
}

// ------------------------------------------------------------------- rope

/// transformers' inverse frequencies `1 / θ^(2i/d)`, then the llama3 rule of
/// `_compute_llama3_parameters`, in f64 except the exponent: transformers
/// divides `arange(0, d, 2).float()` by `d` in f32 (with `f32_exponent`).
/// The llama3 ramp amplifies a relative change of θ^-e up to ~10x, so the
/// f32 exponent alone moves some frequencies by ~2e-6.
fn inv_freq_ref(head_dim: usize, theta: f64, scaling: RopeScaling, f32_exponent: bool) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| {
            let e = if f32_exponent {
                ((2 * i) as f32 / head_dim as f32) as f64
            } else {
                (2 * i) as f64 / head_dim as f64
            };
            let f = 1.0 / theta.powf(e);
            match scaling {
                RopeScaling::Default => f,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: old,
                } => {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let low_freq_wavelen = old / low_freq_factor;
                    let high_freq_wavelen = old / high_freq_factor;
                    let scaled = if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        f
                    };
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium {
                        smoothed
                    } else {
                        scaled
                    }
                }
            }
        })
        .collect()
}

fn llama3(factor: f64, old: f64) -> RopeScaling {
    RopeScaling::Llama3 {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: old,
    }
}

#[test]
fn rope_inv_freq_of_llama_3_1() {
    let f = ops::rope_inv_freq(128, 500_000.0, llama3(8.0, 8192.0));
    assert_eq!(f.len(), 64);
    assert_eq!(f[0], 1.0);
    let plain = ops::rope_inv_freq(128, 500_000.0, RopeScaling::Default);
    // The lowest frequencies (wavelength > 8192) are divided by the factor.
    assert!((f[63] as f64 / (plain[63] as f64 / 8.0) - 1.0).abs() < 1e-6);
    // The highest (wavelength < 2048) are unchanged.
    assert_eq!(f[..10], plain[..10]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn rope_inv_freq_matches_f64(half in 1usize..=128,
                                 theta in select(vec![10_000.0f64, 500_000.0, 1_000_000.0]),
                                 scaling in select(vec![RopeScaling::Default, llama3(8.0, 8192.0),
                                                        llama3(32.0, 8192.0), llama3(4.0, 2048.0)])) {
        let hd = 2 * half;
        let got = ops::rope_inv_freq(hd, theta, scaling);
        let want = inv_freq_ref(hd, theta, scaling, true);
        let exact = inv_freq_ref(hd, theta, scaling, false);
        assert_eq!(got.len(), want.len());
        for (i, g) in got.iter().enumerate() {
            let g = *g as f64;
            // f32 rounding of the result, amplified by the llama3 ramp.
            assert!((g / want[i] - 1.0).abs() < 1e-6, "inv_freq[{i}] = {g}, want {}", want[i]);
            assert!((g / exact[i] - 1.0).abs() < 1e-5, "inv_freq[{i}] = {g}, f64 {}", exact[i]);
        }
    }

    #[test]
    fn rope_fwd_matches_f64(t in 1usize..=6, h in 1usize..=4, half in dim(64),
                            theta in select(vec![10_000.0f64, 500_000.0]),
                            scaling in select(vec![RopeScaling::Default, llama3(8.0, 8192.0)]),
                            dt in float_dtype(), seed in any::<u64>()) {
        let mut rng = SeedRng::new(seed);
        let dh = 2 * half;
        let x = round_to(dt, &rng.normals(t * h * dh, 1.0));
        let pos: Vec<i32> = (0..t).map(|_| rng.below(8193) as i32).collect();
        let inv = ops::rope_inv_freq(dh, theta, scaling);
        let mut y = host_zeros(dt, &[t, h, dh]);
        ops::rope_fwd(&cpu(), &host(&x, dt, &[t, h, dh]), &host_i32(&pos, &[t]),
                      &host(&inv, DType::F32, &[half]), &mut y).unwrap();
        let mut want = vec![0f64; t * h * dh];
        for ti in 0..t {
            for i in 0..half {
                // The angle is an f32 product, as in transformers.
                let a = (pos[ti] as f32 * inv[i]) as f64;
                for hi in 0..h {
                    let o = (ti * h + hi) * dh + i;
                    let (u, v) = (x[o] as f64, x[o + half] as f64);
                    want[o] = u * a.cos() - v * a.sin();
                    want[o + half] = v * a.cos() + u * a.sin();
                }
            }
        }
        assert_close("rope_fwd", &f64s(&y), &want, tol_for(dt) / 2.0);
    }
}

// ----------------------------------------------------------------- swiglu

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn swiglu_fwd_matches_f64(n in dim(300), dt in float_dtype(), seed in any::<u64>()) {
        let mut rng = SeedRng::new(seed);
        let g = round_to(dt, &rng.normals(n, 3.0));
        let u = round_to(dt, &rng.normals(n, 1.0));
        let mut y = host_zeros(dt, &[n]);
        ops::swiglu_fwd(&cpu(), &host(&g, dt, &[n]), &host(&u, dt, &[n]), &mut y).unwrap();
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| {
                let g = g as f64;
                g / (1.0 + (-g).exp()) * u as f64
            })
            .collect();
        assert_close("swiglu_fwd", &f64s(&y), &want, tol_for(dt) / 2.0);
    }
}

// ---------------------------------------------------------------- softmax

/// Segment ids of packed rows: non-decreasing, random boundaries.
fn packed_segments(rng: &mut SeedRng, b: usize, tk: usize) -> Vec<i32> {
    let mut seg = Vec::with_capacity(b * tk);
    for _ in 0..b {
        let mut id = 0;
        for _ in 0..tk {
            if rng.uniform() < 0.2 {
                id += 1;
            }
            seg.push(id);
        }
    }
    seg
}

/// f64 causal softmax: `[B, H, Tq, Tk]`, queries at the last Tq positions.
fn softmax_ref(s: &[f32], seg: Option<&[i32]>, dims: [usize; 4], scale: f64) -> Vec<f64> {
    let [_, h, tq, tk] = dims;
    let mut out = vec![0f64; s.len()];
    for (row, (orow, srow)) in out.chunks_mut(tk).zip(s.chunks(tk)).enumerate() {
        let qp = row % tq + tk - tq;
        let bi = row / tq / h;
        let vis = |j: usize| j <= qp && seg.is_none_or(|sg| sg[bi * tk + j] == sg[bi * tk + qp]);
        let mx = (0..tk)
            .filter(|&j| vis(j))
            .map(|j| scale * srow[j] as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = (0..tk)
            .filter(|&j| vis(j))
            .map(|j| (scale * srow[j] as f64 - mx).exp())
            .sum();
        for j in (0..tk).filter(|&j| vis(j)) {
            orow[j] = (scale * srow[j] as f64 - mx).exp() / z;
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn softmax_causal_fwd_matches_f64(b in 1usize..=2, h in 1usize..=3, tq in dim(20),
                                      extra in 0usize..=9, with_seg in any::<bool>(),
                                      scale in select(vec![1.0f32, 0.125, 0.3]),
                                      dt in float_dtype(), seed in any::<u64>()) {
        let tk = tq + extra;
        let mut rng = SeedRng::new(seed);
        let s = round_to(dt, &rng.normals(b * h * tq * tk, 4.0));
        let seg = with_seg.then(|| packed_segments(&mut rng, b, tk));
        let seg_t = seg.as_ref().map(|v| host_i32(v, &[b, tk]));
        let mut p = host(&vec![f32::NAN; s.len()], dt, &[b, h, tq, tk]);
        ops::softmax_causal_fwd(&cpu(), &host(&s, dt, &[b, h, tq, tk]), seg_t.as_ref(), scale,
                                &mut p).unwrap();
        let want = softmax_ref(&s, seg.as_deref(), [b, h, tq, tk], scale as f64);
        let got = f64s(&p);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if *w == 0.0 {
                assert_eq!(*g, 0.0, "masked entry {i} is not 0");
            }
        }
        assert_close("softmax_causal_fwd", &got, &want, tol_for(dt) / 2.0);
    }
}

// -------------------------------------------------------------- embedding

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn embedding_fwd_gathers_rows(n in 0usize..=30, v in 1usize..=20, d in dim(70),
                                  dt in float_dtype(), seed in any::<u64>()) {
        let mut rng = SeedRng::new(seed);
        let table = round_to(dt, &rng.normals(v * d, 1.0));
        let ids: Vec<i32> = (0..n).map(|_| rng.below(v) as i32).collect();
        let mut y = host_zeros(dt, &[n, d]);
        ops::embedding_fwd(&cpu(), &host_i32(&ids, &[n]), &host(&table, dt, &[v, d]), &mut y)
            .unwrap();
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&id| table[id as usize * d..(id as usize + 1) * d].to_vec())
            .collect();
        assert_eq!(y.to_f32_vec().unwrap(), want);
    }
}

// ------------------------------------------------ LM head + cross-entropy

struct CeRef {
    loss_sum: f64,
    /// Σ over counted rows of max |logit|: f32 logits make each row's loss
    /// uncertain by a few ulps of its largest logit.
    logit_scale: f64,
    tokens: usize,
    dh: Vec<f64>,
    dw: Vec<f64>,
}

/// Full-logits f64 cross-entropy of `h·wᵀ` and its gradients (divided by `norm`).
fn ce_ref(h: &[f32], w: &[f32], labels: &[i32], n: usize, d: usize, v: usize) -> CeRef {
    let mut r = CeRef {
        loss_sum: 0.0,
        logit_scale: 0.0,
        tokens: 0,
        dh: vec![0.0; n * d],
        dw: vec![0.0; v * d],
    };
    for i in 0..n {
        if labels[i] == -100 {
            continue;
        }
        r.tokens += 1;
        let logits: Vec<f64> = (0..v)
            .map(|j| {
                (0..d)
                    .map(|p| h[i * d + p] as f64 * w[j * d + p] as f64)
                    .sum()
            })
            .collect();
        let mx = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
        r.loss_sum += z.ln() + mx - logits[labels[i] as usize];
        r.logit_scale += logits.iter().fold(0f64, |a, l| a.max(l.abs()));
        for j in 0..v {
            let g = (logits[j] - mx).exp() / z - if j as i32 == labels[i] { 1.0 } else { 0.0 };
            for p in 0..d {
                r.dh[i * d + p] += g * w[j * d + p] as f64;
                r.dw[j * d + p] += g * h[i * d + p] as f64;
            }
        }
    }
    r
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn lm_head_cross_entropy_matches_full_logits_f64(
        n in 1usize..=13, d in dim(40), v in dim(70),
        chunk in select(vec![0usize, 1, 2, 3, 5, 64]),
        normalizer in select(vec![None, Some(7.5f32)]),
        ignore_frac in select(vec![0.0f64, 0.3, 1.0]),
        seed in any::<u64>())
    {
        let mut rng = SeedRng::new(seed);
        let h = rng.normals(n * d, 1.0);
        let w = rng.normals(v * d, 0.5);
        let labels: Vec<i32> = (0..n)
            .map(|_| if rng.uniform() < ignore_frac { -100 } else { rng.below(v) as i32 })
            .collect();
        let dw0 = rng.normals(v * d, 0.01);
        let (th, tw) = (host(&h, DType::F32, &[n, d]), host(&w, DType::F32, &[v, d]));
        let tl = host_i32(&labels, &[n]);
        // chunk 0 with a small byte bound exercises the automatic chunk size.
        let opts = CrossEntropyOpts {
            chunk_rows: chunk,
            max_chunk_bytes: if chunk == 0 { 4 * v * 3 + 1 } else { 256 << 20 },
            normalizer,
            ..Default::default()
        };
        let mut dh = host(&vec![f32::NAN; n * d], DType::F32, &[n, d]);
        let mut dw = host(&dw0, DType::F32, &[v, d]);
        let grads = LmHeadGrads { dh: &mut dh, dw: Some(&mut dw) };
        let st = ops::lm_head_cross_entropy(&cpu(), &th, &tw, &tl, &opts, Some(grads)).unwrap();
        let no_grad = ops::lm_head_cross_entropy(&cpu(), &th, &tw, &tl, &opts, None).unwrap();
        assert_eq!(st, no_grad, "the loss does not depend on asking for gradients");

        let r = ce_ref(&h, &w, &labels, n, d, v);
        let norm = normalizer.map(f64::from).unwrap_or(r.tokens.max(1) as f64);
        assert_eq!(st.tokens, r.tokens);
        let slack = 4.0 * f32::EPSILON as f64 * r.logit_scale;
        let close = |g: f64, w: f64, s: f64| (g - w).abs() <= TOL * w.abs() + s;
        assert!(close(st.loss_sum, r.loss_sum, slack), "loss_sum {} vs {}", st.loss_sum, r.loss_sum);
        assert!(close(st.loss, r.loss_sum / norm, slack / norm), "loss {} vs {}", st.loss,
                r.loss_sum / norm);
        let want_dh: Vec<f64> = r.dh.iter().map(|g| g / norm).collect();
        let want_dw: Vec<f64> = r.dw.iter().zip(&dw0).map(|(g, w0)| g / norm + *w0 as f64).collect();
        assert_close("dh", &f64s(&dh), &want_dh, TOL);
        assert_close("dw (accumulated)", &f64s(&dw), &want_dw, TOL);
    }
}

#[test]
fn lm_head_cross_entropy_with_bf16_weights_and_gradients() {
    let (n, d, v) = (9, 24, 37);
    let mut rng = SeedRng::new(7);
    let h = round_to(DType::BF16, &rng.normals(n * d, 1.0));
    let w = round_to(DType::BF16, &rng.normals(v * d, 0.5));
    let labels: Vec<i32> = (0..n)
        .map(|i| if i == 4 { -100 } else { rng.below(v) as i32 })
        .collect();
    let th = host(&h, DType::BF16, &[n, d]);
    let tw = host(&w, DType::BF16, &[v, d]);
    let opts = CrossEntropyOpts {
        chunk_rows: 4,
        ..Default::default()
    };
    for dw_dt in [DType::F32, DType::BF16] {
        let mut dh = host_zeros(DType::BF16, &[n, d]);
        let mut dw = host_zeros(dw_dt, &[v, d]);
        let grads = LmHeadGrads {
            dh: &mut dh,
            dw: Some(&mut dw),
        };
        let st = ops::lm_head_cross_entropy(
            &cpu(),
            &th,
            &tw,
            &host_i32(&labels, &[n]),
            &opts,
            Some(grads),
        )
        .unwrap();
        let r = ce_ref(&h, &w, &labels, n, d, v);
        let norm = r.tokens as f64;
        assert!((st.loss - r.loss_sum / norm).abs() < 1e-5 * r.loss_sum / norm);
        let want_dh: Vec<f64> = r.dh.iter().map(|g| g / norm).collect();
        let want_dw: Vec<f64> = r.dw.iter().map(|g| g / norm).collect();
        assert_close("dh bf16", &f64s(&dh), &want_dh, 1e-2);
        assert_close(&format!("dw {dw_dt}"), &f64s(&dw), &want_dw, 1e-2);
    }
}

// ------------------------------------------------------------------ adamw

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn adamw_matches_pytorch_order_in_f64(
        n in dim(100), steps in 1u64..=6,
        lr in select(vec![1e-3f32, 0.05]), wd in select(vec![0.0f32, 0.1]),
        betas in select(vec![(0.9f32, 0.999f32), (0.8, 0.95)]),
        eps in select(vec![1e-8f32, 1e-6]), grad_scale in select(vec![1.0f32, 0.25]),
        gdt in float_dtype(), seed in any::<u64>())
    {
        let mut rng = SeedRng::new(seed);
        let p0 = rng.normals(n, 1.0);
        let mut param = host(&p0, DType::F32, &[n]);
        let mut m = host_zeros(DType::F32, &[n]);
        let mut vv = host_zeros(DType::F32, &[n]);
        let mut p16 = host_zeros(DType::BF16, &[n]);
        let (mut rp, mut rm, mut rv) = (wide(&p0), vec![0f64; n], vec![0f64; n]);
        let (b1, b2) = (betas.0 as f64, betas.1 as f64);
        for step in 1..=steps {
            // Gradients of a few sizes, including ones far below eps.
            let gs = [1.0, 1e-3, 1e-9][step as usize % 3];
            let g = round_to(gdt, &rng.normals(n, gs));
            let hp = AdamWParams {
                lr,
                beta1: betas.0,
                beta2: betas.1,
                eps,
                weight_decay: wd,
                step,
                grad_scale,
            };
            ops::adamw_step(&cpu(), &mut param, &host(&g, gdt, &[n]), &mut m, &mut vv, &hp,
                            Some(&mut p16)).unwrap();
            // torch.optim.AdamW (single-tensor): decay, moments, bias-corrected step.
            let (lr, wd, eps) = (lr as f64, wd as f64, eps as f64);
            let bc1 = 1.0 - b1.powi(step as i32);
            let bc2 = 1.0 - b2.powi(step as i32);
            for i in 0..n {
                let gi = g[i] as f64 * grad_scale as f64;
                rp[i] *= 1.0 - lr * wd;
                rm[i] = b1 * rm[i] + (1.0 - b1) * gi;
                rv[i] = b2 * rv[i] + (1.0 - b2) * gi * gi;
                let denom = rv[i].sqrt() / bc2.sqrt() + eps;
                rp[i] -= lr / bc1 * rm[i] / denom;
            }
        }
        assert_close("adamw param", &f64s(&param), &rp, 1e-6);
        assert_close("adamw m", &f64s(&m), &rm, TOL);
        assert_close("adamw v", &f64s(&vv), &rv, TOL);
        // The update itself, to 1e-3 of its size, beyond the f32 rounding
        // of the parameter at each step.
        let got = f64s(&param);
        for i in 0..n {
            let update = rp[i] - p0[i] as f64;
            let slack = (steps + 1) as f64 * f32::EPSILON as f64 * rp[i].abs().max(p0[i].abs() as f64);
            assert!((got[i] - rp[i]).abs() <= 1e-3 * update.abs() + slack,
                    "adamw param[{i}] {} vs {} (update {update:e})", got[i], rp[i]);
        }
        assert_eq!(p16.to_f32_vec().unwrap(), round_to(DType::BF16, &param.to_vec::<f32>().unwrap()));
    }
}

// ------------------------------------------------------ sums of squares

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn sum_squares_and_global_norm_match_f64(sizes in proptest::collection::vec(0usize..=600, 1..=4),
                                             seed in any::<u64>()) {
        let mut rng = SeedRng::new(seed);
        let dts = [DType::F32, DType::BF16, DType::F16, DType::F32];
        let data: Vec<(Vec<f32>, DType)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (round_to(dts[i], &rng.normals(n, 0.1 + i as f64)), dts[i]))
            .collect();
        let tensors: Vec<Tensor> = data.iter().map(|(v, dt)| host(v, *dt, &[v.len()])).collect();
        let total: f64 = data.iter().flat_map(|(v, _)| v.iter()).map(|&x| (x as f64).powi(2)).sum();

        let mut acc = host(&[2.5], DType::F32, &[1]);
        for t in &tensors {
            ops::sum_squares(&cpu(), t, &mut acc).unwrap();
        }
        assert_close("sum_squares", &f64s(&acc), &[2.5 + total], TOL);
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let gn = ops::global_grad_norm(&cpu(), &refs).unwrap() as f64;
        assert_close("global_grad_norm", &[gn], &[total.sqrt()], TOL);
    }
}

// -------------------------------------------------------------------- rng

#[test]
fn uniform_statistics_and_values() {
    let n = 200_000;
    let (lo, hi) = (-2.0f32, 3.0f32);
    let mut y = host_zeros(DType::F32, &[n]);
    ops::fill_uniform(&cpu(), &mut y, 42, lo, hi).unwrap();
    let v = y.to_vec::<f32>().unwrap();
    assert!(
        v.iter().all(|&x| (lo..hi).contains(&x)),
        "value outside [lo, hi)"
    );
    for (i, &x) in v.iter().enumerate().step_by(997) {
        assert_eq!(x, lo + (hi - lo) * ops::uniform01(42, i as u64));
    }
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    let sd_mean = (25.0f64 / 12.0 / n as f64).sqrt();
    assert!((mean - 0.5).abs() < 5.0 * sd_mean, "mean {mean}");
    assert!((var / (25.0 / 12.0) - 1.0).abs() < 0.02, "variance {var}");
    // Ten equal bins, each within 5σ of n/10.
    let mut bins = [0usize; 10];
    for &x in &v {
        bins[((((x - lo) / (hi - lo)) * 10.0) as usize).min(9)] += 1;
    }
    let (e, sd) = (n as f64 / 10.0, (n as f64 * 0.1 * 0.9).sqrt());
    for (i, &b) in bins.iter().enumerate() {
        assert!((b as f64 - e).abs() < 5.0 * sd, "bin {i} has {b}");
    }
    // uniform01 is on the 2^-24 grid of [0, 1).
    for i in 0..10_000u64 {
        let u = ops::uniform01(7, i);
        assert!((0.0..1.0).contains(&u));
        assert_eq!((u * 16_777_216.0).fract(), 0.0);
    }
}

#[test]
fn normal_statistics() {
    let n = 200_000;
    let (mean, std) = (1.0f32, 2.0f32);
    let mut y = host_zeros(DType::F32, &[n]);
    ops::fill_normal(&cpu(), &mut y, 9, mean, std).unwrap();
    let z: Vec<f64> = y
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&x| (x as f64 - mean as f64) / std as f64)
        .collect();
    assert!(z.iter().all(|x| x.is_finite()));
    let nf = n as f64;
    let m1 = z.iter().sum::<f64>() / nf;
    let m2 = z.iter().map(|x| x * x).sum::<f64>() / nf;
    let m3 = z.iter().map(|x| x.powi(3)).sum::<f64>() / nf;
    let m4 = z.iter().map(|x| x.powi(4)).sum::<f64>() / nf;
    let within1 = z.iter().filter(|x| x.abs() < 1.0).count() as f64 / nf;
    assert!(m1.abs() < 5.0 / nf.sqrt(), "mean {m1}");
    assert!((m2 - 1.0).abs() < 5.0 * (2.0 / nf).sqrt(), "variance {m2}");
    assert!(m3.abs() < 5.0 * (15.0 / nf).sqrt(), "skewness {m3}");
    assert!((m4 - 3.0).abs() < 5.0 * (96.0 / nf).sqrt(), "kurtosis {m4}");
    assert!((within1 - 0.682_689).abs() < 0.006, "P(|z|<1) = {within1}");
}

#[test]
fn rng_is_deterministic_and_seeded() {
    for dt in [DType::F32, DType::BF16] {
        let draw = |seed: u64, n: usize, normal: bool| {
            let mut y = host_zeros(dt, &[n]);
            if normal {
                ops::fill_normal(&cpu(), &mut y, seed, 0.0, 1.0).unwrap();
            } else {
                ops::fill_uniform(&cpu(), &mut y, seed, 0.0, 1.0).unwrap();
            }
            y.to_f32_vec().unwrap()
        };
        for normal in [false, true] {
            assert_eq!(draw(5, 1000, normal), draw(5, 1000, normal));
            assert_ne!(draw(5, 1000, normal), draw(6, 1000, normal));
        }
        // Element i of a uniform fill depends only on (seed, i).
        assert_eq!(draw(5, 1000, false)[..100], draw(5, 100, false)[..]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn dropout_mask_is_the_uniform01_rule(n in dim(2000), p in select(vec![0.0f32, 0.1, 0.5, 0.9]),
                                         seed in any::<u64>(), dt in float_dtype()) {
        let mut rng = SeedRng::new(seed);
        let x = round_to(dt, &rng.uniforms(n, 0.5, 2.0));
        let mut y = host_zeros(dt, &[n]);
        ops::dropout(&cpu(), &host(&x, dt, &[n]), p, seed, &mut y).unwrap();
        let got = f64s(&y);
        let scale = 1.0 / (1.0 - p as f64);
        let want: Vec<f64> = (0..n)
            .map(|i| if ops::uniform01(seed, i as u64) >= p { x[i] as f64 * scale } else { 0.0 })
            .collect();
        for i in 0..n {
            assert_eq!(got[i] == 0.0, want[i] == 0.0, "mask differs at {i}");
        }
        assert_close("dropout", &got, &want, tol_for(dt) / 2.0);
    }
}

#[test]
fn dropout_drops_a_fraction_p() {
    let n = 100_000;
    let x = host(&vec![1.0; n], DType::F32, &[n]);
    let mut y = host_zeros(DType::F32, &[n]);
    for p in [0.1f32, 0.5] {
        ops::dropout(&cpu(), &x, p, 3, &mut y).unwrap();
        let dropped = y
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .filter(|&&v| v == 0.0)
            .count();
        let sd = (n as f64 * p as f64 * (1.0 - p as f64)).sqrt();
        assert!(
            (dropped as f64 - n as f64 * p as f64).abs() < 5.0 * sd,
            "p {p}: {dropped}"
        );
    }
}

// ---------------------------------------------------------------- permute

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn permute_0213_swaps_middle_axes(a in 1usize..=3, b in 1usize..=5, c in 1usize..=5,
                                      d in dim(20), dt in float_dtype(), seed in any::<u64>()) {
        let mut rng = SeedRng::new(seed);
        let x = round_to(dt, &rng.normals(a * b * c * d, 1.0));
        let mut y = host_zeros(dt, &[a, c, b, d]);
        ops::permute_0213(&cpu(), &host(&x, dt, &[a, b, c, d]), &mut y).unwrap();
        let got = y.to_f32_vec().unwrap();
        for ai in 0..a {
            for bi in 0..b {
                for ci in 0..c {
                    for di in 0..d {
                        assert_eq!(got[((ai * c + ci) * b + bi) * d + di],
                                   x[((ai * b + bi) * c + ci) * d + di]);
                    }
                }
            }
        }
    }
}

#[test]
fn bf16_and_f16_inputs_round_as_half_does() {
    // The helpers above rely on from_f32 rounding like `half`.
    let v = [1.0f32 + 1.0 / 256.0, -3.3, 65520.0];
    let t = host(&v, DType::BF16, &[3]);
    let want: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    assert_eq!(t.to_vec::<bf16>().unwrap(), want);
}
