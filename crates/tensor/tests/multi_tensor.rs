//! The multi-tensor ops on the CPU against the single-tensor ops called in
//! sequence: results must be bit-identical (the trainer's bit-exact resume
//! and the PyTorch parity checks rely on it), for any number of tensors,
//! empty ones included. Also their argument checks.
mod common;

use common::*;
use llmft_tensor::ops::{self, AdamWParams, TableCache};
use llmft_tensor::{Ctx, DType, Error, Tensor};
use proptest::prelude::*;
use proptest::sample::select;

fn cpu() -> Ctx {
    Ctx::cpu()
}

/// Element counts: mostly small, some empty, some past a chunk (4096).
fn len() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..=300,
        2 => Just(0usize),
        1 => select(vec![4095usize, 4096, 4097, 9000]),
    ]
}

fn float_dtype() -> impl Strategy<Value = DType> {
    select(vec![DType::F32, DType::BF16, DType::F16])
}

/// The raw bytes of a host tensor.
fn bits(t: &Tensor) -> Vec<u8> {
    t.as_bytes().unwrap().to_vec()
}

/// A deep copy of a host tensor.
fn copy(t: &Tensor) -> Tensor {
    t.to_ctx(&cpu()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn sum_squares_multi_is_bit_identical_to_the_sequence(
        tensors in proptest::collection::vec((len(), float_dtype()), 0..=12),
        seed in any::<u64>(),
    ) {
        let mut rng = SeedRng::new(seed);
        let xs: Vec<Tensor> = tensors
            .iter()
            .enumerate()
            .map(|(i, &(n, dt))| host(&rng.normals(n, 0.1 + i as f64), dt, &[n]))
            .collect();
        let refs: Vec<&Tensor> = xs.iter().collect();
        let mut single = host(&[0.75], DType::F32, &[1]);
        for x in &refs {
            ops::sum_squares(&cpu(), x, &mut single).unwrap();
        }
        let mut multi = host(&[0.75], DType::F32, &[1]);
        ops::sum_squares_multi(&cpu(), &refs, &mut multi, None).unwrap();
        prop_assert_eq!(bits(&multi), bits(&single));

        let mut seq = host(&[0.0], DType::F32, &[1]);
        for x in &refs {
            ops::sum_squares(&cpu(), x, &mut seq).unwrap();
        }
        let want = seq.to_vec::<f32>().unwrap()[0].sqrt();
        let mut cache = TableCache::new();
        let got = ops::global_grad_norm_cached(&cpu(), &refs, Some(&mut cache)).unwrap();
        prop_assert_eq!(got.to_bits(), want.to_bits());
        prop_assert_eq!(ops::global_grad_norm(&cpu(), &refs).unwrap().to_bits(), want.to_bits());
    }

    #[test]
    fn adamw_step_multi_is_bit_identical_to_the_sequence(
        lens in proptest::collection::vec(len(), 0..=10),
        gdt in float_dtype(),
        steps in 1u64..=3,
        zero in any::<bool>(),
        wd in select(vec![0.0f32, 0.1]),
        seed in any::<u64>(),
    ) {
        let mut rng = SeedRng::new(seed);
        let t = lens.len();
        let mk = |rng: &mut SeedRng, std: f64| -> Vec<Tensor> {
            lens.iter().map(|&n| host(&rng.normals(n, std), DType::F32, &[n])).collect()
        };
        // Single-tensor state and a deep copy for the multi-tensor op.
        let mut p1 = mk(&mut rng, 1.0);
        let mut m1 = mk(&mut rng, 0.01);
        let mut v1: Vec<Tensor> = mk(&mut rng, 0.01)
            .iter()
            .map(|v| host(&v.to_vec::<f32>().unwrap().iter().map(|x| x * x).collect::<Vec<_>>(),
                          DType::F32, v.shape()))
            .collect();
        let (mut p2, mut m2, mut v2): (Vec<Tensor>, Vec<Tensor>, Vec<Tensor>) = (
            p1.iter().map(copy).collect(),
            m1.iter().map(copy).collect(),
            v1.iter().map(copy).collect(),
        );
        let mut cache = TableCache::new();
        for step in 1..=steps {
            let hp = AdamWParams {
                lr: 0.01,
                weight_decay: wd,
                step,
                grad_scale: [1.0, 0.37, 1.0 / 1024.0][step as usize % 3],
                ..Default::default()
            };
            let mut g1: Vec<Tensor> = lens
                .iter()
                .map(|&n| host(&rng.normals(n, 0.1), gdt, &[n]))
                .collect();
            let mut g2: Vec<Tensor> = g1.iter().map(copy).collect();
            for i in 0..t {
                ops::adamw_step(&cpu(), &mut p1[i], &g1[i], &mut m1[i], &mut v1[i], &hp, None)
                    .unwrap();
                if zero {
                    ops::fill(&cpu(), &mut g1[i], 0.0).unwrap();
                }
            }
            let mut pr: Vec<&mut Tensor> = p2.iter_mut().collect();
            let mut gr: Vec<&mut Tensor> = g2.iter_mut().collect();
            let mut mr: Vec<&mut Tensor> = m2.iter_mut().collect();
            let mut vr: Vec<&mut Tensor> = v2.iter_mut().collect();
            ops::adamw_step_multi(&cpu(), &mut pr, &mut gr, &mut mr, &mut vr, &hp, zero,
                                  Some(&mut cache)).unwrap();
            for i in 0..t {
                prop_assert_eq!(bits(&g2[i]), bits(&g1[i]), "grad {}", i);
            }
        }
        for i in 0..t {
            prop_assert_eq!(bits(&p2[i]), bits(&p1[i]), "param {}", i);
            prop_assert_eq!(bits(&m2[i]), bits(&m1[i]), "m {}", i);
            prop_assert_eq!(bits(&v2[i]), bits(&v1[i]), "v {}", i);
        }
    }

    #[test]
    fn fill_multi_is_bit_identical_to_the_sequence(
        tensors in proptest::collection::vec(
            (len(), select(vec![DType::F32, DType::BF16, DType::F16, DType::I32])), 0..=8),
        value in select(vec![0.0f32, -3.0, 7.0]),
        seed in any::<u64>(),
    ) {
        let mut rng = SeedRng::new(seed);
        let mut one: Vec<Tensor> = tensors
            .iter()
            .map(|&(n, dt)| match dt {
                DType::I32 => host_i32(&vec![5; n], &[n]),
                _ => host(&rng.normals(n, 1.0), dt, &[n]),
            })
            .collect();
        let mut many: Vec<Tensor> = one.iter().map(copy).collect();
        for y in one.iter_mut() {
            ops::fill(&cpu(), y, value).unwrap();
        }
        let mut refs: Vec<&mut Tensor> = many.iter_mut().collect();
        ops::fill_multi(&cpu(), &mut refs, value, None).unwrap();
        for (a, b) in many.iter().zip(&one) {
            prop_assert_eq!(bits(a), bits(b));
        }
    }
}

#[test]
fn multi_ops_check_their_arguments() {
    let z = |dt: DType, n: usize| host_zeros(dt, &[n]);
    let f = DType::F32;
    let hp = AdamWParams::default();
    // Lists of different lengths.
    let (mut p, mut g, mut m) = (z(f, 3), z(f, 3), z(f, 3));
    let r = ops::adamw_step_multi(
        &cpu(),
        &mut [&mut p],
        &mut [&mut g],
        &mut [&mut m],
        &mut [],
        &hp,
        false,
        None,
    );
    assert!(matches!(r, Err(Error::Invalid { .. })), "{r:?}");
    // A shape mismatch in the second tuple leaves the first untouched.
    let (mut p0, mut g0, mut m0, mut v0) = (z(f, 3), host(&[1.0; 3], f, &[3]), z(f, 3), z(f, 3));
    let (mut p1, mut g1, mut m1, mut v1) = (z(f, 4), z(f, 3), z(f, 3), z(f, 3));
    let r = ops::adamw_step_multi(
        &cpu(),
        &mut [&mut p0, &mut p1],
        &mut [&mut g0, &mut g1],
        &mut [&mut m0, &mut m1],
        &mut [&mut v0, &mut v1],
        &hp,
        true,
        None,
    );
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    assert_eq!(g0.to_vec::<f32>().unwrap(), vec![1.0; 3]);
    assert_eq!(m0.to_vec::<f32>().unwrap(), vec![0.0; 3]);
    // Gradients of two dtypes in one call.
    let (mut g1, mut p1) = (z(DType::BF16, 3), z(f, 3));
    let r = ops::adamw_step_multi(
        &cpu(),
        &mut [&mut p0, &mut p1],
        &mut [&mut g0, &mut g1],
        &mut [&mut m0, &mut m1],
        &mut [&mut v0, &mut v1],
        &hp,
        false,
        None,
    );
    assert!(matches!(r, Err(Error::DType { .. })), "{r:?}");
    // sum_squares_multi: `out` must be f32 [1]; inputs floats.
    let x = z(f, 5);
    let r = ops::sum_squares_multi(&cpu(), &[&x], &mut z(f, 2), None);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    let r = ops::sum_squares_multi(&cpu(), &[&x, &z(DType::I32, 2)], &mut z(f, 1), None);
    assert!(matches!(r, Err(Error::DType { .. })), "{r:?}");
    // fill_multi: i32 tensors take integers only; nothing is written.
    let (mut a, mut b) = (z(f, 2), z(DType::I32, 2));
    let r = ops::fill_multi(&cpu(), &mut [&mut a, &mut b], 0.5, None);
    assert!(matches!(r, Err(Error::Invalid { .. })), "{r:?}");
    assert_eq!(a.to_vec::<f32>().unwrap(), vec![0.0; 2]);
    // Empty lists are no-ops.
    let mut acc = host(&[2.0], f, &[1]);
    ops::sum_squares_multi(&cpu(), &[], &mut acc, None).unwrap();
    assert_eq!(acc.to_vec::<f32>().unwrap(), vec![2.0]);
    assert_eq!(ops::global_grad_norm(&cpu(), &[]).unwrap(), 0.0);
    ops::adamw_step_multi(&cpu(), &mut [], &mut [], &mut [], &mut [], &hp, true, None).unwrap();
    ops::fill_multi(&cpu(), &mut [], 1.0, None).unwrap();
}
