//! The host AdamW against llmft's CPU reference `adamw_step`: bit for bit.
use half::{bf16, f16};
use llmft_offload::{AdamWTensor, CpuAdamW, Error, Grad, GradElement};
use llmft_tensor::ops::{adamw_step, adamw_step_multi, AdamWParams};
use llmft_tensor::{Ctx, Element, Tensor};
use proptest::prelude::*;

/// A deterministic pseudo-random value in [-1, 1) from `seed` and `i`.
fn noise(seed: u64, i: usize) -> f32 {
    let mut x = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Gradient values of one tensor, spanning several orders of magnitude.
fn grads<G: GradElement + Element>(seed: u64, n: usize) -> Vec<G> {
    (0..n)
        .map(|i| G::from_f32(noise(seed, i) * 10f32.powi((i % 7) as i32 - 4)))
        .collect()
}

/// The state of one tensor: f32 params and moments.
#[derive(Clone)]
struct State {
    p: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl State {
    fn new(seed: u64, n: usize) -> Self {
        Self {
            p: (0..n).map(|i| noise(seed + 1, i)).collect(),
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn assert_same(ours: &State, theirs: &State) {
    assert_eq!(bits(&ours.p), bits(&theirs.p), "param");
    assert_eq!(bits(&ours.m), bits(&theirs.m), "m");
    assert_eq!(bits(&ours.v), bits(&theirs.v), "v");
}

/// One reference step on the CPU context; returns the bf16 copy too.
fn reference_step<G: Element>(s: &mut State, g: &[G], hp: &AdamWParams) -> Vec<bf16> {
    let ctx = Ctx::cpu();
    let n = g.len();
    let t = |x: &[f32]| Tensor::from_slice(&ctx, x, &[n]).unwrap();
    let (mut p, mut m, mut v) = (t(&s.p), t(&s.m), t(&s.v));
    let grad = Tensor::from_slice(&ctx, g, &[n]).unwrap();
    let mut p16 = Tensor::from_slice(&ctx, &vec![bf16::ZERO; n], &[n]).unwrap();
    adamw_step(&ctx, &mut p, &grad, &mut m, &mut v, hp, Some(&mut p16)).unwrap();
    s.p = p.to_vec().unwrap();
    s.m = m.to_vec().unwrap();
    s.v = v.to_vec().unwrap();
    p16.to_vec().unwrap()
}

fn hp_at(base: &AdamWParams, step: u64) -> AdamWParams {
    AdamWParams { step, ..*base }
}

/// `steps` steps of ours and of the reference, each with fresh gradients.
fn compare<G: GradElement + Element>(
    opt: &CpuAdamW,
    n: usize,
    hp: &AdamWParams,
    steps: u64,
    seed: u64,
) {
    let mut ours = State::new(seed, n);
    let mut theirs = ours.clone();
    for s in 1..=steps {
        let hp = hp_at(hp, hp.step + s - 1);
        let g: Vec<G> = grads(seed + s, n);
        let want16 = reference_step(&mut theirs, &g, &hp);
        let mut got16 = vec![bf16::ZERO; n];
        let State { p, m, v } = &mut ours;
        opt.step(
            &hp,
            AdamWTensor::new(p, Grad::Keep(&g), m, v).with_bf16_copy(&mut got16),
        )
        .unwrap();
        assert_same(&ours, &theirs);
        assert_eq!(got16, want16, "bf16 copy");
    }
}

fn hyper() -> AdamWParams {
    AdamWParams {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
        grad_scale: 0.5,
    }
}

#[test]
fn matches_reference_f32_bf16_f16_several_steps() {
    let opt = CpuAdamW::with_threads(4).unwrap();
    let small = CpuAdamW::with_threads(3).unwrap().with_tile(100).unwrap();
    for n in [0, 1, 7, 8, 17, 4095, 4096, 4097, 10_007] {
        for o in [&opt, &small] {
            compare::<f32>(o, n, &hyper(), 4, 1);
            compare::<bf16>(o, n, &hyper(), 4, 2);
            compare::<f16>(o, n, &hyper(), 4, 3);
        }
    }
}

#[test]
fn matches_reference_across_tiles() {
    // Several default tiles, uneven last one, on a small pool.
    let opt = CpuAdamW::with_threads(2).unwrap();
    let n = 3 * llmft_offload::cpu_adam::DEFAULT_TILE + 12_345;
    compare::<bf16>(&opt, n, &hyper(), 2, 5);
    compare::<f32>(&opt, n, &AdamWParams::default(), 2, 6);
}

/// Every bf16 / f16 bit pattern (NaN, infinities, subnormals included) as
/// a gradient.
#[test]
fn matches_reference_on_every_half_bit_pattern() {
    let opt = CpuAdamW::with_threads(2).unwrap().with_tile(1000).unwrap();
    let hp = AdamWParams {
        grad_scale: 1.0,
        ..hyper()
    };
    let n = 1 << 16;
    let gb: Vec<bf16> = (0..n).map(|i| bf16::from_bits(i as u16)).collect();
    let gh: Vec<f16> = (0..n).map(|i| f16::from_bits(i as u16)).collect();
    let mut ours = State::new(9, n);
    let mut theirs = ours.clone();
    reference_step(&mut theirs, &gb, &hp);
    let State { p, m, v } = &mut ours;
    opt.step(&hp, AdamWTensor::new(p, Grad::Keep(&gb), m, v))
        .unwrap();
    assert_same(&ours, &theirs);

    let mut ours = State::new(10, n);
    let mut theirs = ours.clone();
    reference_step(&mut theirs, &gh, &hp);
    let State { p, m, v } = &mut ours;
    opt.step(&hp, AdamWTensor::new(p, Grad::Keep(&gh), m, v))
        .unwrap();
    assert_same(&ours, &theirs);
}

#[test]
fn bf16_copy_is_from_f32_of_params() {
    let opt = CpuAdamW::with_threads(2).unwrap().with_tile(333).unwrap();
    let n = 5000;
    let mut s = State::new(11, n);
    let g: Vec<f32> = grads(12, n);
    let mut out = vec![bf16::ZERO; n];
    let State { p, m, v } = &mut s;
    opt.step(
        &hyper(),
        AdamWTensor::new(p, Grad::Keep(&g), m, v).with_bf16_copy(&mut out),
    )
    .unwrap();
    let want: Vec<bf16> = s.p.iter().map(|&x| bf16::from_f32(x)).collect();
    assert_eq!(out, want);
}

#[test]
fn zero_grad_zeroes_after_reading() {
    let opt = CpuAdamW::with_threads(2).unwrap().with_tile(700).unwrap();
    let n = 9000;
    let g: Vec<bf16> = grads(13, n);
    let mut kept = State::new(14, n);
    let mut zeroed = kept.clone();
    let State { p, m, v } = &mut kept;
    opt.step(&hyper(), AdamWTensor::new(p, Grad::Keep(&g), m, v))
        .unwrap();
    let mut g2 = g.clone();
    let State { p, m, v } = &mut zeroed;
    opt.step(&hyper(), AdamWTensor::new(p, Grad::Zero(&mut g2), m, v))
        .unwrap();
    assert_same(&zeroed, &kept);
    assert!(g2.iter().all(|x| x.to_bits() == 0));
}

/// Tensors of several lengths: one `step_multi` equals `step` on each, and
/// equals the reference `adamw_step_multi` with `zero_grads`.
#[test]
fn multi_equals_one_by_one_and_reference() {
    let opt = CpuAdamW::with_threads(3).unwrap().with_tile(512).unwrap();
    let lens = [0usize, 1, 513, 4096, 7, 20_000, 1024, 3];
    let hp = hyper();
    let mut multi: Vec<State> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| State::new(20 + i as u64, n))
        .collect();
    let mut single = multi.clone();
    let mut reference = multi.clone();
    for step in 1..=3u64 {
        let hp = hp_at(&hp, step);
        let gs: Vec<Vec<f16>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| grads(100 * step + i as u64, n))
            .collect();

        let mut gm = gs.clone();
        let mut ts: Vec<AdamWTensor<'_, f16>> = multi
            .iter_mut()
            .zip(gm.iter_mut())
            .map(|(s, g)| AdamWTensor::new(&mut s.p, Grad::Zero(g), &mut s.m, &mut s.v))
            .collect();
        opt.step_multi(&hp, &mut ts).unwrap();
        drop(ts);
        assert!(gm.iter().flatten().all(|x| x.to_bits() == 0));

        for (s, g) in single.iter_mut().zip(&gs) {
            let State { p, m, v } = s;
            opt.step(&hp, AdamWTensor::new(p, Grad::Keep(g), m, v))
                .unwrap();
        }

        let ctx = Ctx::cpu();
        let t = |x: &[f32]| Tensor::from_slice(&ctx, x, &[x.len()]).unwrap();
        let mut p: Vec<Tensor> = reference.iter().map(|s| t(&s.p)).collect();
        let mut m: Vec<Tensor> = reference.iter().map(|s| t(&s.m)).collect();
        let mut v: Vec<Tensor> = reference.iter().map(|s| t(&s.v)).collect();
        let mut g: Vec<Tensor> = gs
            .iter()
            .map(|g| Tensor::from_slice(&ctx, g, &[g.len()]).unwrap())
            .collect();
        adamw_step_multi(
            &ctx,
            &mut p.iter_mut().collect::<Vec<_>>(),
            &mut g.iter_mut().collect::<Vec<_>>(),
            &mut m.iter_mut().collect::<Vec<_>>(),
            &mut v.iter_mut().collect::<Vec<_>>(),
            &hp,
            true,
            None,
        )
        .unwrap();
        for (i, s) in reference.iter_mut().enumerate() {
            s.p = p[i].to_vec().unwrap();
            s.m = m[i].to_vec().unwrap();
            s.v = v[i].to_vec().unwrap();
        }
        for i in 0..lens.len() {
            assert_same(&multi[i], &single[i]);
            assert_same(&multi[i], &reference[i]);
        }
    }
}

#[test]
fn length_mismatch_is_an_error_and_writes_nothing() {
    let opt = CpuAdamW::with_threads(2).unwrap();
    let g = vec![1.0f32; 10];
    let (mut p, mut m, mut v) = (vec![1.0f32; 10], vec![0.0f32; 10], vec![0.0f32; 9]);
    let err = opt
        .step(
            &hyper(),
            AdamWTensor::new(&mut p, Grad::Keep(&g), &mut m, &mut v),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert!(err.to_string().contains("v has 9"), "{err}");

    let mut v = vec![0.0f32; 10];
    let mut out = vec![bf16::ZERO; 11];
    let err = opt
        .step(
            &hyper(),
            AdamWTensor::new(&mut p, Grad::Keep(&g), &mut m, &mut v).with_bf16_copy(&mut out),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");

    // A bad second tensor: the first is not written either.
    let (mut p2, mut m2, mut v2) = (vec![1.0f32; 3], vec![0.0f32; 4], vec![0.0f32; 3]);
    let g2 = vec![1.0f32; 3];
    let mut ts = vec![
        AdamWTensor::new(&mut p, Grad::Keep(&g), &mut m, &mut v),
        AdamWTensor::new(&mut p2, Grad::Keep(&g2), &mut m2, &mut v2),
    ];
    let err = opt.step_multi(&hyper(), &mut ts).unwrap_err();
    assert!(err.to_string().contains("tensor 1"), "{err}");
    drop(ts);
    assert!(p.iter().all(|&x| x == 1.0) && m.iter().all(|&x| x == 0.0));

    assert!(matches!(CpuAdamW::with_threads(0), Err(Error::Invalid(_))));
    assert!(matches!(
        CpuAdamW::with_threads(1).unwrap().with_tile(0),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn default_pool_uses_available_parallelism() {
    let opt = CpuAdamW::new().unwrap();
    let n = std::thread::available_parallelism().unwrap().get();
    assert_eq!(opt.threads(), n);
    assert!(["avx2", "baseline"].contains(&opt.simd()));
}

fn hp_strategy() -> impl Strategy<Value = AdamWParams> {
    (
        1e-6f32..1e-1,
        0.0f32..0.999,
        0.9f32..0.99999,
        prop_oneof![Just(1e-8f32), Just(1e-6), 1e-12f32..1e-3],
        0.0f32..0.5,
        1u64..5000,
        prop_oneof![Just(1.0f32), 1e-4f32..4.0],
    )
        .prop_map(
            |(lr, beta1, beta2, eps, weight_decay, step, grad_scale)| AdamWParams {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                step,
                grad_scale,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn prop_matches_reference(
        n in 0usize..5000,
        hp in hp_strategy(),
        seed in any::<u64>(),
        tile in prop_oneof![Just(llmft_offload::cpu_adam::DEFAULT_TILE), 1usize..2000],
        threads in 1usize..4,
    ) {
        let opt = CpuAdamW::with_threads(threads).unwrap().with_tile(tile).unwrap();
        compare::<f32>(&opt, n, &hp, 2, seed);
        compare::<bf16>(&opt, n, &hp, 2, seed ^ 1);
        compare::<f16>(&opt, n, &hp, 2, seed ^ 2);
    }
}
