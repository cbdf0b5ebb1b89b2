//! Property tests (CPU): round trips for every format and size, error
//! bounds, and malformed inputs giving typed errors.
use llmft_quant::{
    bnb, hqq, io, Absmax, Code4, Error, HqqConfig, HqqStat, Packed, QuantConfig, QuantizedTensor,
};
use llmft_tensor::{Ctx, DType, Tensor};
use proptest::prelude::*;

fn quant(x: &[f32], shape: &[usize], cfg: &QuantConfig) -> (QuantizedTensor, Vec<f32>) {
    let ctx = Ctx::cpu();
    let w = Tensor::from_f32(&ctx, x, DType::F32, shape).unwrap();
    let q = QuantizedTensor::quantize(&ctx, &w, cfg).unwrap();
    let mut out = Tensor::zeros(&ctx, DType::F32, shape).unwrap();
    q.dequantize(&ctx, &mut out).unwrap();
    (q, out.to_vec::<f32>().unwrap())
}

fn values(max_n: usize) -> impl Strategy<Value = Vec<f32>> {
    (1..max_n).prop_flat_map(|n| proptest::collection::vec(-2.0f32..2.0, n))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn bnb4_round_trip(x in values(1500), bs_i in 0usize..8, nf4 in any::<bool>(), dq in any::<bool>()) {
        let blocksize = bnb::BNB4_BLOCKSIZES[bs_i];
        let code = if nf4 { Code4::Nf4 } else { Code4::Fp4 };
        let cfg = QuantConfig::Bnb4 { code, blocksize, double_quant: dq };
        let (q, y) = quant(&x, &[x.len()], &cfg);
        let Packed::Bnb4(b) = &q.packed else { unreachable!() };
        prop_assert_eq!(b.packed.numel(), x.len().div_ceil(2));
        let gmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (blk, chunk) in x.chunks(blocksize).enumerate() {
            let am = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Half the widest gap of the code (NF4 0.139, FP4 0.167) of absmax,
            // plus the 8-bit absmax error with double quant.
            let bound = am * 0.17 + if dq { 0.02 * gmax } else { 0.0 } + 1e-6;
            for (i, v) in chunk.iter().enumerate() {
                let e = (v - y[blk * blocksize + i]).abs();
                prop_assert!(e <= bound, "{} vs {} (bound {})", v, y[blk * blocksize + i], bound);
            }
        }
        if !dq {
            let Absmax::F32(a) = &b.absmax else { unreachable!() };
            prop_assert_eq!(a.numel(), x.len().div_ceil(blocksize));
        }
    }

    #[test]
    fn int8_round_trip(rows in 1usize..12, cols in 1usize..90, seed in any::<u64>()) {
        let x: Vec<f32> = (0..rows * cols).map(|i| (((i as u64 ^ seed).wrapping_mul(2654435761) % 2001) as f32 - 1000.0) / 700.0).collect();
        let (_, y) = quant(&x, &[rows, cols], &QuantConfig::int8());
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let am = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            for c in 0..cols {
                prop_assert!((row[c] - y[r * cols + c]).abs() <= am / 127.0 * 0.5 + am * 1e-6 + 1e-7);
            }
        }
    }

    #[test]
    fn hqq_round_trip(groups in 1usize..40, gs_i in 0usize..3, nb_i in 0usize..5, axis in 0u32..2, optimize in any::<bool>(), seed in any::<u64>()) {
        let gs = [8usize, 32, 64][gs_i];
        let nbits = [8u32, 4, 3, 2, 1][nb_i];
        let n = groups * gs;
        let x: Vec<f32> = (0..n).map(|i| (((i as u64 ^ seed).wrapping_mul(2654435761) % 1999) as f32 - 999.0) / 3000.0).collect();
        let cfg = HqqConfig { group_size: gs, axis, optimize, round_zero: false, ..HqqConfig::new(nbits) };
        let (q, y) = quant(&x, &[n], &QuantConfig::Hqq(cfg));
        let Packed::Hqq(h) = &q.packed else { unreachable!() };
        let (rows, cols) = h.layout();
        let wq = h.w_q.as_bytes().unwrap().to_vec();
        let un = hqq::unpack(&wq, rows, cols, nbits);
        prop_assert_eq!(hqq::pack(&un, rows, cols, nbits), wq);
        let rtn = quant(&x, &[n], &QuantConfig::Hqq(HqqConfig { optimize: false, ..cfg })).1;
        let mae = |v: &[f32]| v.iter().zip(&x).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / n as f64;
        if optimize {
            prop_assert!(mae(&y) <= mae(&rtn) * 1.5 + 1e-3);
        } else {
            // Round to nearest: every value within half a step of its group.
            let (_, cols) = hqq::layout(n, gs, axis);
            let ng = n / gs;
            let maxv = ((1u32 << nbits) - 1) as f32;
            for g in 0..ng {
                let idx: Vec<usize> = (0..gs).map(|j| if axis == 1 { g * cols + j } else { j * cols + g }).collect();
                let lo = idx.iter().map(|&i| x[i]).fold(f32::INFINITY, f32::min);
                let hi = idx.iter().map(|&i| x[i]).fold(f32::NEG_INFINITY, f32::max);
                let step = (hi - lo) / maxv;
                for &i in &idx {
                    prop_assert!((x[i] - y[i]).abs() <= step * 0.5001 + 1e-5, "{} vs {}", x[i], y[i]);
                }
            }
        }
    }

    #[test]
    fn hqq_pack_round_trip(rows in 1usize..50, cols in 1usize..20, nb_i in 0usize..5, seed in any::<u8>()) {
        let nbits = [8u32, 4, 3, 2, 1][nb_i];
        let q: Vec<u8> = (0..rows * cols).map(|i| ((i as u8).wrapping_mul(31) ^ seed) & ((1u16 << nbits) - 1) as u8).collect();
        prop_assert_eq!(hqq::unpack(&hqq::pack(&q, rows, cols, nbits), rows, cols, nbits), q);
    }

    #[test]
    fn malformed_bnb4_lengths_are_errors(n in 1usize..500, cut in 1usize..20, which in 0usize..3) {
        let x: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
        let (mut q, _) = quant(&x, &[n], &QuantConfig::nf4_double_quant());
        let cpu = Ctx::cpu();
        let Packed::Bnb4(b) = &mut q.packed else { unreachable!() };
        let bad = |len: usize, dt: DType| Tensor::zeros(&cpu, dt, &[len]).unwrap();
        match which {
            0 => b.packed = bad(n.div_ceil(2) + cut, DType::U8),
            1 => b.quant_map = bad(16 + cut, DType::F32),
            _ => if let Absmax::Nested { q, .. } = &mut b.absmax { *q = bad(n.div_ceil(64) + cut, DType::U8) },
        }
        let mut out = Tensor::zeros(&cpu, DType::BF16, &[n]).unwrap();
        let r = q.dequantize(&cpu, &mut out);
        prop_assert!(matches!(r, Err(Error::Length { .. })), "{:?}", r.err());
        let mut out = Tensor::zeros(&cpu, DType::BF16, &[n + cut]).unwrap();
        prop_assert!(q.dequantize(&cpu, &mut out).is_err());
    }
}

#[test]
fn bad_parameters_are_errors() {
    let ctx = Ctx::cpu();
    let w = Tensor::from_f32(&ctx, &[0.5; 96], DType::F32, &[96]).unwrap();
    let q = |c: QuantConfig| QuantizedTensor::quantize(&ctx, &w, &c);
    assert!(matches!(
        q(QuantConfig::Bnb4 {
            code: Code4::Nf4,
            blocksize: 48,
            double_quant: false
        }),
        Err(Error::Param(_))
    ));
    assert!(matches!(
        q(QuantConfig::Hqq(HqqConfig::new(5))),
        Err(Error::Param(_))
    ));
    assert!(matches!(
        q(QuantConfig::Hqq(HqqConfig {
            group_size: 64,
            ..HqqConfig::new(4)
        })),
        Err(Error::Param(_))
    ));
    assert!(matches!(
        q(QuantConfig::Hqq(HqqConfig {
            axis: 2,
            group_size: 32,
            ..HqqConfig::new(4)
        })),
        Err(Error::Param(_))
    ));
    assert!(matches!(
        q(QuantConfig::Int8 { threshold: -1.0 }),
        Err(Error::Param(_))
    ));
    assert!(matches!(
        q(QuantConfig::Int8 {
            threshold: f32::NAN
        }),
        Err(Error::Param(_))
    ));
    let e = Tensor::zeros(&ctx, DType::F32, &[0]).unwrap();
    assert!(matches!(
        QuantizedTensor::quantize(&ctx, &e, &QuantConfig::nf4()),
        Err(Error::Shape { .. })
    ));
    let i = Tensor::zeros(&ctx, DType::I32, &[64]).unwrap();
    assert!(matches!(
        QuantizedTensor::quantize(&ctx, &i, &QuantConfig::nf4()),
        Err(Error::DType { .. })
    ));
    assert!(matches!(
        "nf5".parse::<Code4>(),
        Err(Error::UnknownFormat(_))
    ));
    assert!(
        llmft_quant::quantize_bytes(&ctx, &[0u8; 7], DType::BF16, &[4], &QuantConfig::nf4())
            .is_err()
    );
    // HQQ stats of the wrong length
    let w = Tensor::from_f32(&ctx, &[0.25; 128], DType::F32, &[128]).unwrap();
    let mut h = QuantizedTensor::quantize(&ctx, &w, &QuantConfig::hqq(4)).unwrap();
    if let Packed::Hqq(hq) = &mut h.packed {
        hq.scale = HqqStat::Plain(Tensor::zeros(&ctx, DType::F16, &[3]).unwrap());
    }
    let mut out = Tensor::zeros(&ctx, DType::F32, &[128]).unwrap();
    assert!(matches!(
        h.dequantize(&ctx, &mut out),
        Err(Error::Length { .. })
    ));
}

fn st_bytes(tensors: &[(String, io::RawTensor)]) -> Vec<u8> {
    let views: Vec<_> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn checkpoint_round_trip_and_malformed() {
    let ctx = Ctx::cpu();
    let x: Vec<f32> = (0..48 * 64)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 5000.0)
        .collect();
    let w = Tensor::from_f32(&ctx, &x, DType::BF16, &[48, 64]).unwrap();
    let key = "model.layers.3.mlp.up_proj.weight";
    for cfg in [
        QuantConfig::nf4(),
        QuantConfig::nf4_double_quant(),
        QuantConfig::fp4(),
        QuantConfig::int8(),
    ] {
        let q = QuantizedTensor::quantize(&ctx, &w, &cfg).unwrap();
        let sd = io::bnb_state_dict(key, &q).unwrap();
        let bytes = st_bytes(&sd);
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let back = io::load_bnb(&ctx, &st, key).unwrap();
        assert_eq!(back.config(), cfg);
        assert_eq!(
            back.dequantize_f32_host().unwrap(),
            q.dequantize_f32_host().unwrap()
        );
        // Every key missing in turn: an error naming it, never a panic.
        for skip in 0..sd.len() {
            let part: Vec<_> = sd
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, t)| t.clone())
                .collect();
            let b = st_bytes(&part);
            let st = safetensors::SafeTensors::deserialize(&b).unwrap();
            let r = io::load_bnb(&ctx, &st, key);
            if sd[skip].0.ends_with("weight_format") {
                continue;
            }
            assert!(r.is_err(), "{cfg:?} without {}", sd[skip].0);
        }
    }
    // Broken quant_state JSON, unknown quant_type, wrong lengths.
    let q = QuantizedTensor::quantize(&ctx, &w, &QuantConfig::nf4()).unwrap();
    let sd = io::bnb_state_dict(key, &q).unwrap();
    let qs = format!("{key}.quant_state.bitsandbytes__nf4");
    for (json, what) in [
        ("{not json", "json"),
        ("{\"quant_type\": \"nf5\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [48, 64]}", "tag"),
        ("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat17\", \"shape\": [48, 64]}", "dtype"),
        ("{\"quant_type\": \"nf4\", \"blocksize\": 48, \"dtype\": \"bfloat16\", \"shape\": [48, 64]}", "blocksize"),
        ("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [49, 64]}", "shape"),
        ("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": \"x\"}", "shape type"),
        ("{\"quant_type\": \"nf4\", \"dtype\": \"bfloat16\", \"shape\": [48, 64]}", "no blocksize"),
    ] {
        let mut sd2 = sd.clone();
        for (k, t) in sd2.iter_mut() {
            if *k == qs {
                t.data = json.as_bytes().to_vec();
                t.shape = vec![t.data.len()];
            }
        }
        let b = st_bytes(&sd2);
        let st = safetensors::SafeTensors::deserialize(&b).unwrap();
        assert!(io::load_bnb(&ctx, &st, key).is_err(), "{what}");
    }
    let h = QuantizedTensor::quantize(&ctx, &w, &QuantConfig::hqq(4)).unwrap();
    assert!(matches!(
        io::bnb_state_dict(key, &h),
        Err(Error::UnknownFormat(_))
    ));
}

#[test]
fn written_file_loads() {
    let ctx = Ctx::cpu();
    let x: Vec<f32> = (0..4096).map(|i| (i as f32).sin() * 0.02).collect();
    let w = Tensor::from_f32(&ctx, &x, DType::BF16, &[64, 64]).unwrap();
    let q = QuantizedTensor::quantize(&ctx, &w, &QuantConfig::nf4_double_quant()).unwrap();
    let dir = std::env::temp_dir().join(format!("llmft-quant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("model.safetensors");
    io::write_safetensors(&p, &io::bnb_state_dict("a.weight", &q).unwrap()).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(io::is_bnb_quantized(&st, "a.weight"));
    let back = io::load_bnb(&ctx, &st, "a.weight").unwrap();
    assert_eq!(
        back.dequantize_f32_host().unwrap(),
        q.dequantize_f32_host().unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
