//! Bad arguments give errors, never panics: shape and dtype mismatches,
//! views out of range, ids and labels outside the vocabulary, a missing GPU.
mod common;

use common::*;
use llmft_tensor::ops::{self, AdamWParams, CrossEntropyOpts, Gemm, LmHeadGrads};
use llmft_tensor::{Ctx, DType, Device, Error, Tensor};

fn cpu() -> Ctx {
    Ctx::cpu()
}

fn z(dtype: DType, shape: &[usize]) -> Tensor {
    host_zeros(dtype, shape)
}

/// Asserts a shape error naming both shapes (in the value and the message).
#[track_caller]
fn assert_shape_err(r: llmft_tensor::Result<impl std::fmt::Debug>, got: &[usize], want: &[usize]) {
    match r {
        Err(e @ Error::Shape { .. }) => {
            let Error::Shape {
                got: g,
                expected: x,
                ..
            } = &e
            else {
                unreachable!()
            };
            assert_eq!((g.as_slice(), x.as_slice()), (got, want), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{got:?}")) && msg.contains(&format!("{want:?}")),
                "message does not name both shapes: {msg}"
            );
        }
        other => panic!("expected Error::Shape, got {other:?}"),
    }
}

#[track_caller]
fn assert_dtype_err(r: llmft_tensor::Result<impl std::fmt::Debug>, got: DType) {
    match r {
        Err(Error::DType { got: g, .. }) => assert_eq!(g, got),
        other => panic!("expected Error::DType, got {other:?}"),
    }
}

#[track_caller]
fn assert_invalid(r: llmft_tensor::Result<impl std::fmt::Debug>, needle: &str) {
    match r {
        Err(e @ Error::Invalid { .. }) => {
            assert!(
                e.to_string().contains(needle),
                "message `{e}` lacks `{needle}`"
            )
        }
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
}

#[test]
fn shape_mismatches_name_both_shapes() {
    let f = DType::F32;
    let (a, b) = (z(f, &[2, 3]), z(f, &[3, 2]));
    assert_shape_err(
        ops::add(&cpu(), &a, &b, &mut z(f, &[2, 3])),
        &[3, 2],
        &[2, 3],
    );
    assert_shape_err(ops::add(&cpu(), &a, &a, &mut z(f, &[6])), &[6], &[2, 3]);
    assert_shape_err(
        ops::mul(&cpu(), &a, &b, &mut z(f, &[2, 3])),
        &[3, 2],
        &[2, 3],
    );
    assert_shape_err(
        ops::axpby(&cpu(), 1.0, &a, 1.0, &mut z(f, &[3, 2])),
        &[3, 2],
        &[2, 3],
    );
    assert_shape_err(
        ops::cast(&cpu(), &a, &mut z(DType::BF16, &[3, 3])),
        &[3, 3],
        &[2, 3],
    );
    // Inner dimensions differ: b is [4, 5] where [3, 5] is needed.
    let r = ops::gemm(
        &cpu(),
        &a,
        &z(f, &[4, 5]),
        &mut z(f, &[2, 5]),
        Gemm::default(),
    );
    assert_shape_err(r, &[4, 5], &[3, 5]);
    let r = ops::gemm(&cpu(), &a, &z(f, &[5, 4]), &mut z(f, &[2, 5]), Gemm::nt());
    assert_shape_err(r, &[5, 4], &[5, 3]);
    let r = ops::gemm(
        &cpu(),
        &a,
        &z(f, &[3, 5]),
        &mut z(f, &[2, 4]),
        Gemm::default(),
    );
    assert_shape_err(r, &[2, 4], &[2, 5]);
    // A batched B whose batch differs from A's.
    let r = ops::gemm(
        &cpu(),
        &z(f, &[2, 4, 3]),
        &z(f, &[3, 3, 5]),
        &mut z(f, &[2, 4, 5]),
        Gemm::default(),
    );
    assert!(matches!(r, Err(Error::Shape { what: "b", .. })), "{r:?}");
    // 1-D operands.
    let r = ops::gemm(&cpu(), &z(f, &[3]), &b, &mut z(f, &[1, 2]), Gemm::default());
    assert_shape_err(r, &[3], &[0, 0]);

    let x = z(f, &[4, 8]);
    let r = ops::rmsnorm_fwd(
        &cpu(),
        &x,
        &z(f, &[7]),
        1e-5,
        &mut z(f, &[4, 8]),
        &mut z(f, &[4]),
    );
    assert_shape_err(r, &[7], &[8]);
    let r = ops::rmsnorm_fwd(
        &cpu(),
        &x,
        &z(f, &[8]),
        1e-5,
        &mut z(f, &[4, 8]),
        &mut z(f, &[3]),
    );
    assert_shape_err(r, &[3], &[4]);
    let r = ops::rmsnorm_bwd(
        &cpu(),
        &z(f, &[4, 8]),
        &x,
        &z(f, &[8]),
        &z(f, &[4]),
        &mut z(f, &[4, 8]),
        Some(&mut z(f, &[9])),
    );
    assert_shape_err(r, &[9], &[8]);
    let r = ops::swiglu_fwd(&cpu(), &x, &z(f, &[4, 9]), &mut z(f, &[4, 8]));
    assert_shape_err(r, &[4, 9], &[4, 8]);
    let pos = host_i32(&[0, 1], &[2]);
    let r = ops::rope_fwd(
        &cpu(),
        &z(f, &[3, 2, 4]),
        &pos,
        &z(f, &[2]),
        &mut z(f, &[3, 2, 4]),
    );
    assert_shape_err(r, &[2], &[3]);
    let s = z(f, &[1, 2, 3, 4]);
    let r = ops::softmax_causal_fwd(
        &cpu(),
        &s,
        Some(&host_i32(&[0; 3], &[1, 3])),
        1.0,
        &mut z(f, &[1, 2, 3, 4]),
    );
    assert_shape_err(r, &[1, 3], &[1, 4]);
    let ids = host_i32(&[0, 1, 2], &[3]);
    let r = ops::embedding_fwd(&cpu(), &ids, &z(f, &[5, 4]), &mut z(f, &[3, 5]));
    assert_shape_err(r, &[3, 5], &[3, 4]);
    let labels = host_i32(&[0, 1, 2], &[3]);
    let r = ops::lm_head_cross_entropy(
        &cpu(),
        &z(f, &[4, 8]),
        &z(f, &[10, 8]),
        &labels,
        &CrossEntropyOpts::default(),
        None,
    );
    assert_shape_err(r, &[3], &[4]);
    let r = ops::adamw_step(
        &cpu(),
        &mut z(f, &[5]),
        &z(f, &[6]),
        &mut z(f, &[6]),
        &mut z(f, &[6]),
        &AdamWParams::default(),
        None,
    );
    assert_shape_err(r, &[5], &[6]);
    let r = ops::sum_squares(&cpu(), &x, &mut z(f, &[2]));
    assert_shape_err(r, &[2], &[1]);
    let r = ops::permute_0213(&cpu(), &z(f, &[1, 2, 3, 4]), &mut z(f, &[1, 2, 3, 4]));
    assert_shape_err(r, &[1, 2, 3, 4], &[1, 3, 2, 4]);
    let r = ops::dropout(&cpu(), &x, 0.1, 0, &mut z(f, &[8, 4]));
    assert_shape_err(r, &[8, 4], &[4, 8]);
}

#[test]
fn dtype_mismatches_are_errors() {
    let (f, h) = (DType::F32, DType::BF16);
    let a = z(f, &[4]);
    assert_dtype_err(ops::add(&cpu(), &a, &z(h, &[4]), &mut z(f, &[4])), h);
    assert_dtype_err(ops::add(&cpu(), &a, &a, &mut z(h, &[4])), h);
    assert_dtype_err(
        ops::add(&cpu(), &z(DType::I32, &[4]), &a, &mut z(f, &[4])),
        DType::I32,
    );
    let r = ops::gemm(
        &cpu(),
        &z(f, &[2, 2]),
        &z(h, &[2, 2]),
        &mut z(f, &[2, 2]),
        Gemm::default(),
    );
    assert_dtype_err(r, h);
    // C may be f32 or the inputs' dtype, nothing else.
    let r = ops::gemm(
        &cpu(),
        &z(h, &[2, 2]),
        &z(h, &[2, 2]),
        &mut z(DType::F16, &[2, 2]),
        Gemm::default(),
    );
    assert_dtype_err(r, DType::F16);
    let r = ops::rmsnorm_fwd(
        &cpu(),
        &z(f, &[2, 4]),
        &z(f, &[4]),
        1e-5,
        &mut z(f, &[2, 4]),
        &mut z(h, &[2]),
    );
    assert_dtype_err(r, h);
    let ids_f = z(f, &[3]);
    assert_dtype_err(
        ops::embedding_fwd(&cpu(), &ids_f, &z(f, &[5, 4]), &mut z(f, &[3, 4])),
        f,
    );
    let r = ops::embedding_bwd(
        &cpu(),
        &host_i32(&[0], &[1]),
        &z(f, &[1, 4]),
        &mut z(h, &[5, 4]),
    );
    assert_dtype_err(r, h);
    let pos_f = z(f, &[3]);
    let r = ops::rope_fwd(
        &cpu(),
        &z(f, &[3, 1, 4]),
        &pos_f,
        &z(f, &[2]),
        &mut z(f, &[3, 1, 4]),
    );
    assert_dtype_err(r, f);
    let r = ops::adamw_step(
        &cpu(),
        &mut z(h, &[3]),
        &z(f, &[3]),
        &mut z(f, &[3]),
        &mut z(f, &[3]),
        &AdamWParams::default(),
        None,
    );
    assert_dtype_err(r, h);
    assert_dtype_err(ops::fill(&cpu(), &mut z(DType::U8, &[3]), 1.0), DType::U8);
    assert_dtype_err(ops::sum_squares(&cpu(), &a, &mut z(h, &[1])), h);
    assert_dtype_err(a.as_slice::<i32>(), f);
    assert_dtype_err(a.to_vec::<llmft_tensor::bf16>(), f);
    let mut dst = z(h, &[4]);
    assert_dtype_err(dst.copy_from(&cpu(), &a), f);
}

#[test]
fn cuda_context_without_a_gpu_is_an_error() {
    if llmft_tensor::cuda_device_count() == 0 {
        match Ctx::cuda(0) {
            Err(Error::NoCuda(msg)) => assert!(!msg.is_empty()),
            other => panic!("expected Error::NoCuda, got {other:?}"),
        }
        assert!(matches!(Ctx::new(Device::Cuda(0)), Err(Error::NoCuda(_))));
        // Ctx::best falls back to the CPU.
        assert_eq!(Ctx::best().device(), Device::Cpu);
    }
    // An ordinal past the last device is NoCuda either way.
    assert!(matches!(Ctx::cuda(4096), Err(Error::NoCuda(_))));
    assert!(
        llmft_tensor::cuda::driver_version().is_some() == (llmft_tensor::cuda_device_count() > 0)
    );
}

#[test]
fn device_names_parse_or_error() {
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
    assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
    assert_invalid("tpu".parse::<Device>(), "tpu");
    assert_invalid("cuda:x".parse::<Device>(), "cuda:x");
}

#[test]
fn tensor_views_out_of_range_are_errors() {
    let t = host(
        &(0..12).map(|i| i as f32).collect::<Vec<_>>(),
        DType::F32,
        &[3, 4],
    );
    assert_invalid(t.view(9, &[4]), "9..13");
    assert_invalid(t.view(0, &[13]), "0..13");
    assert_invalid(t.view(13, &[0]), "13..13");
    assert_invalid(t.view(usize::MAX / 8, &[2]), "view");
    // A view of a view is bounded by the inner view, not the storage.
    let v = t.view(4, &[4]).unwrap();
    assert_eq!(v.to_vec::<f32>().unwrap(), vec![4.0, 5.0, 6.0, 7.0]);
    assert_invalid(v.view(1, &[4]), "1..5");
    assert_shape_err(t.reshape(&[5, 2]), &[5, 2], &[3, 4]);
    assert_invalid(t.reinterpret(DType::BF16, &[12]), "bytes");
    assert_shape_err(Tensor::from_slice(&cpu(), &[1.0f32, 2.0], &[3]), &[2], &[3]);
    assert_shape_err(
        t.clone().copy_from_host_bytes(&cpu(), &[0u8; 5]),
        &[5],
        &[48],
    );
    // Device pointers of host tensors are errors, not panics.
    assert_invalid(t.device_ptr(), "host");
}

#[test]
fn ids_and_labels_outside_the_vocabulary_are_errors() {
    let f = DType::F32;
    let table = host(&[1.0; 20], f, &[5, 4]);
    for bad in [5, -1, i32::MAX, i32::MIN] {
        let ids = host_i32(&[0, bad, 2], &[3]);
        let mut y = host(&[7.0; 12], f, &[3, 4]);
        assert_invalid(
            ops::embedding_fwd(&cpu(), &ids, &table, &mut y),
            &bad.to_string(),
        );
        // Nothing was written.
        assert_eq!(y.to_vec::<f32>().unwrap(), vec![7.0; 12]);
        let mut dt = z(f, &[5, 4]);
        assert_invalid(
            ops::embedding_bwd(&cpu(), &ids, &z(f, &[3, 4]), &mut dt),
            &bad.to_string(),
        );
        assert_eq!(dt.to_vec::<f32>().unwrap(), vec![0.0; 20]);
    }
    let (h, w) = (z(f, &[2, 4]), z(f, &[5, 4]));
    for bad in [5, -1, -99] {
        let labels = host_i32(&[0, bad], &[2]);
        let mut dh = z(f, &[2, 4]);
        let grads = LmHeadGrads {
            dh: &mut dh,
            dw: None,
        };
        let r = ops::lm_head_cross_entropy(
            &cpu(),
            &h,
            &w,
            &labels,
            &CrossEntropyOpts::default(),
            Some(grads),
        );
        assert_invalid(r, &format!("label {bad}"));
    }
}

#[test]
fn other_bad_arguments_are_errors() {
    let f = DType::F32;
    let x = z(f, &[4]);
    for p in [1.0, 1.5, -0.1, f32::NAN] {
        assert_invalid(
            ops::dropout(&cpu(), &x, p, 0, &mut z(f, &[4])),
            "probability",
        );
    }
    // Odd head_dim, or not [T, H, Dh].
    let pos = host_i32(&[0, 1], &[2]);
    let r = ops::rope_fwd(
        &cpu(),
        &z(f, &[2, 1, 5]),
        &pos,
        &z(f, &[2]),
        &mut z(f, &[2, 1, 5]),
    );
    assert_invalid(r, "head_dim");
    let r = ops::rope_fwd(
        &cpu(),
        &z(f, &[2, 4]),
        &pos,
        &z(f, &[2]),
        &mut z(f, &[2, 4]),
    );
    assert_invalid(r, "head_dim");
    // More queries than keys, or not 4-D.
    let r = ops::softmax_causal_fwd(
        &cpu(),
        &z(f, &[1, 1, 5, 4]),
        None,
        1.0,
        &mut z(f, &[1, 1, 5, 4]),
    );
    assert_invalid(r, "q_len <= k_len");
    let r = ops::softmax_causal_bwd(
        &cpu(),
        &z(f, &[4, 4]),
        &z(f, &[4, 4]),
        1.0,
        &mut z(f, &[4, 4]),
    );
    assert_invalid(r, "probs must be");
    let r = ops::rmsnorm_fwd(
        &cpu(),
        &z(f, &[3, 0]),
        &z(f, &[0]),
        1e-5,
        &mut z(f, &[3, 0]),
        &mut z(f, &[3]),
    );
    assert_invalid(r, "last dimension is 0");
    let r = ops::permute_0213(&cpu(), &z(f, &[2, 3, 4]), &mut z(f, &[2, 3, 4]));
    assert_invalid(r, "4 dimensions");
    let r = ops::embedding_fwd(
        &cpu(),
        &host_i32(&[0, 1], &[1, 2]),
        &z(f, &[5, 4]),
        &mut z(f, &[2, 4]),
    );
    assert_invalid(r, "ids must be [N]");
}

#[test]
fn empty_tensors_are_fine() {
    let f = DType::F32;
    let e = z(f, &[0]);
    ops::add(&cpu(), &e, &e, &mut z(f, &[0])).unwrap();
    ops::cast(&cpu(), &e, &mut z(DType::BF16, &[0])).unwrap();
    ops::fill(&cpu(), &mut z(f, &[0]), 1.0).unwrap();
    ops::swiglu_fwd(&cpu(), &e, &e, &mut z(f, &[0])).unwrap();
    ops::dropout(&cpu(), &e, 0.5, 1, &mut z(f, &[0])).unwrap();
    let mut acc = z(f, &[1]);
    ops::sum_squares(&cpu(), &e, &mut acc).unwrap();
    assert_eq!(ops::global_grad_norm(&cpu(), &[&e]).unwrap(), 0.0);
    // Zero rows.
    ops::rmsnorm_fwd(
        &cpu(),
        &z(f, &[0, 8]),
        &z(f, &[8]),
        1e-5,
        &mut z(f, &[0, 8]),
        &mut z(f, &[0]),
    )
    .unwrap();
    let ids = host_i32(&[], &[0]);
    ops::embedding_fwd(&cpu(), &ids, &z(f, &[5, 4]), &mut z(f, &[0, 4])).unwrap();
    ops::embedding_bwd(&cpu(), &ids, &z(f, &[0, 4]), &mut z(f, &[5, 4])).unwrap();
    let st = ops::lm_head_cross_entropy(
        &cpu(),
        &z(f, &[0, 4]),
        &z(f, &[5, 4]),
        &ids,
        &CrossEntropyOpts::default(),
        None,
    )
    .unwrap();
    assert_eq!((st.tokens, st.loss), (0, 0.0));
    ops::gemm(
        &cpu(),
        &z(f, &[0, 3]),
        &z(f, &[3, 2]),
        &mut z(f, &[0, 2]),
        Gemm::default(),
    )
    .unwrap();
    ops::rope_fwd(
        &cpu(),
        &z(f, &[0, 2, 4]),
        &ids,
        &z(f, &[2]),
        &mut z(f, &[0, 2, 4]),
    )
    .unwrap();
    // Zero queries, zero keys, zero heads, zero-width embeddings.
    for shape in [[1, 2, 0, 3], [1, 1, 0, 0], [0, 2, 3, 3], [1, 0, 2, 2]] {
        let s = z(f, &shape);
        ops::softmax_causal_fwd(&cpu(), &s, None, 1.0, &mut z(f, &shape)).unwrap();
        ops::softmax_causal_bwd(&cpu(), &s, &s, 1.0, &mut z(f, &shape)).unwrap();
    }
    let ids = host_i32(&[1, 2], &[2]);
    ops::embedding_fwd(&cpu(), &ids, &z(f, &[5, 0]), &mut z(f, &[2, 0])).unwrap();
    ops::embedding_bwd(&cpu(), &ids, &z(f, &[2, 0]), &mut z(f, &[5, 0])).unwrap();
}

// Tensor::view computes `offset * size` and `offset + numel` unchecked: in
// release they wrap and the view is Ok (and out of bounds); in debug they panic.
#[test]
fn view_offsets_that_overflow_are_errors() {
    let t = host(&[1.0; 12], DType::F32, &[3, 4]);
    for (offset, shape) in [
        (usize::MAX, vec![1]),
        (usize::MAX / 2, vec![2]),
        (1, vec![usize::MAX]),
    ] {
        assert!(
            matches!(t.view(offset, &shape), Err(Error::Invalid { .. })),
            "view({offset}, {shape:?}) of a [3, 4] tensor is not an error"
        );
    }
}
