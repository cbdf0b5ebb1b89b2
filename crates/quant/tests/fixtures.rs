//! CPU (and, where a GPU exists, CUDA) results against bitsandbytes 0.50.2
//! and hqq 0.2.8.post1, from crates/quant/fixtures (made by
//! scripts/fixtures/quant_make_fixtures.py on an H100).
mod common;

use common::{gpu, meta, ulps, Fix};
use llmft_quant::{bnb, hqq, io, Absmax, Code4, HqqConfig, Packed, QuantConfig, QuantizedTensor};
use llmft_tensor::{Ctx, DType, Tensor};

fn bnb_case(ctx: &Ctx, fx: &Fix, case: &str, info: &serde_json::Value) {
    let input = info["input"].as_str().unwrap();
    let code: Code4 = info["quant_type"].as_str().unwrap().parse().unwrap();
    let blocksize = info["blocksize"].as_u64().unwrap() as usize;
    let dq = info["double_quant"].as_bool().unwrap();
    let x = fx.tensor(ctx, &format!("input.{input}"));
    let cfg = QuantConfig::Bnb4 {
        code,
        blocksize,
        double_quant: dq,
    };
    let q = QuantizedTensor::quantize(ctx, &x, &cfg).unwrap();
    let Packed::Bnb4(b) = &q.packed else { panic!() };
    let packed = b.packed.to_vec::<u8>().unwrap();
    first_diff(
        &packed,
        fx.bytes(&format!("{case}.packed")),
        &format!("{case}: packed bytes"),
    );
    match &b.absmax {
        Absmax::F32(t) => {
            let a: Vec<u32> = t
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let e: Vec<u32> = fx
                .f32(&format!("{case}.absmax"))
                .iter()
                .map(|v| v.to_bits())
                .collect();
            first_diff(&a, &e, &format!("{case}: absmax"));
        }
        Absmax::Nested {
            q: qa,
            nested_absmax,
            code: map,
            offset,
        } => {
            let bnb_off = fx.f32(&format!("{case}.offset"))[0];
            assert!(
                ulps(*offset, bnb_off, DType::F32) <= 2,
                "{case}: offset {offset} vs bnb {bnb_off}"
            );
            let map = map.to_vec::<f32>().unwrap();
            assert_eq!(
                map.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                fx.f32(&format!("{case}.nested_code"))
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "{case}: dynamic map"
            );
            // With bnb's own offset (a CUDA mean, order-dependent) the codes
            // and nested absmax are bit-exact.
            let absmax = fx.f32(&format!("{case}.absmax_f32"));
            let centered: Vec<f32> = absmax.iter().map(|&a| a - bnb_off).collect();
            let map_arr: [f32; 256] = map.clone().try_into().unwrap();
            let (eq, en) = bnb::quantize_8bit(&centered, 256, &map_arr);
            assert_eq!(
                eq,
                fx.bytes(&format!("{case}.absmax")),
                "{case}: nested codes (bnb offset)"
            );
            assert_eq!(
                en.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                fx.f32(&format!("{case}.nested_absmax"))
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "{case}: nested absmax (bnb offset)"
            );
            if offset.to_bits() == bnb_off.to_bits() {
                assert_eq!(qa.to_vec::<u8>().unwrap(), eq, "{case}: nested codes");
                assert_eq!(
                    nested_absmax
                        .to_vec::<f32>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    en.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }
    // Dequantize bnb's own bytes and statistics: equal to bnb's output.
    let mut bq = q.clone();
    if let Packed::Bnb4(b) = &mut bq.packed {
        if let Absmax::Nested {
            q,
            nested_absmax,
            offset,
            ..
        } = &mut b.absmax
        {
            *q = fx.tensor(ctx, &format!("{case}.absmax"));
            *nested_absmax = fx.tensor(ctx, &format!("{case}.nested_absmax"));
            *offset = fx.f32(&format!("{case}.offset"))[0];
        }
    }
    let dt = x.dtype();
    let mut out = Tensor::zeros(ctx, dt, x.shape()).unwrap();
    bq.dequantize(ctx, &mut out).unwrap();
    let got = out.to_f32_vec().unwrap();
    let want = fx.f32(&format!("{case}.dequant"));
    let worst = got
        .iter()
        .zip(&want)
        .map(|(&a, &b)| ulps(a, b, dt))
        .max()
        .unwrap();
    assert!(worst <= 1, "{case}: dequant differs by {worst} ulp");
}

/// Asserts equality, naming the first differing position (not the whole vectors).
fn first_diff<T: PartialEq + std::fmt::Debug>(a: &[T], b: &[T], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
        let n = (0..a.len()).filter(|&i| a[i] != b[i]).count();
        panic!("{what}: {n} differ, first at {i}: {:?} vs {:?}", a[i], b[i]);
    }
}

fn all_bnb(ctx: &Ctx) {
    let fx = Fix::load("bnb.safetensors");
    let m = meta();
    let cases = m["bnb"].as_object().unwrap();
    assert!(cases.len() >= 10);
    for (case, info) in cases {
        bnb_case(ctx, &fx, case, info);
    }
}

#[test]
fn bnb_4bit_cpu_equals_bitsandbytes() {
    all_bnb(&Ctx::cpu());
}

#[test]
fn bnb_4bit_cuda_equals_bitsandbytes() {
    if let Some(ctx) = gpu() {
        all_bnb(&ctx);
    }
}

#[test]
fn dynamic_map_equals_bitsandbytes() {
    let fx = Fix::load("bnb.safetensors");
    let want = fx.f32("dynamic_map");
    let got = bnb::dynamic_map();
    let bad: Vec<_> = (0..256)
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    assert!(
        bad.is_empty(),
        "differ at {bad:?}: {:?}",
        bad.iter().map(|&i| (got[i], want[i])).collect::<Vec<_>>()
    );
    assert_eq!(fx.f32("nf4_code"), bnb::NF4_CODE.to_vec());
    let fp4: Vec<u32> = fx.f32("fp4_code").iter().map(|v| v.to_bits()).collect();
    assert_eq!(
        fp4,
        bnb::FP4_CODE
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    );
}

fn int8_cases(ctx: &Ctx) {
    let fx = Fix::load("bnb.safetensors");
    let x = fx.tensor(ctx, "input.int8");
    for thr in [0.0f32, 6.0] {
        let case = format!("int8_t{}", thr as i32);
        let q = QuantizedTensor::quantize(ctx, &x, &QuantConfig::Int8 { threshold: thr }).unwrap();
        let Packed::Int8(i) = &q.packed else { panic!() };
        let got: Vec<u8> =
            i.q.to_vec::<i8>()
                .unwrap()
                .iter()
                .map(|&v| v as u8)
                .collect();
        let want = fx.bytes(&format!("{case}.cb"));
        let diff = got.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{case}: {diff} int8 values differ");
        let scb: Vec<u32> = i
            .scb
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let e: Vec<u32> = fx
            .f32(&format!("{case}.scb"))
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(scb, e, "{case}: SCB");
        if fx.has(&format!("{case}.outlier_cols")) {
            let cols: Vec<i32> = fx
                .f32(&format!("{case}.outlier_cols"))
                .iter()
                .map(|&v| v as i32)
                .collect();
            assert_eq!(i.outlier_cols, cols);
        }
        let mut out = Tensor::zeros(ctx, DType::F32, &q.shape).unwrap();
        q.dequantize(ctx, &mut out).unwrap();
        let got = out.to_vec::<f32>().unwrap();
        let want = fx.f32(&format!("{case}.dequant"));
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{case}: dequant"
        );
    }
}

#[test]
fn int8_cpu_equals_bitsandbytes() {
    int8_cases(&Ctx::cpu());
}

#[test]
fn int8_cuda_equals_bitsandbytes() {
    if let Some(ctx) = gpu() {
        int8_cases(&ctx);
    }
}

fn fro(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn hqq_cases(ctx: &Ctx) {
    let fx = Fix::load("hqq.safetensors");
    let m = meta();
    let w = fx.tensor(ctx, "W");
    let wf = fx.f32("W");
    for (case, info) in m["hqq"].as_object().unwrap() {
        let nbits = info["nbits"].as_u64().unwrap() as u32;
        let axis = info["axis"].as_u64().unwrap() as u32;
        let optimize = info["optimize"].as_bool().unwrap();
        let cfg = HqqConfig {
            nbits,
            axis,
            optimize,
            round_zero: info["round_zero"].as_bool().unwrap(),
            ..HqqConfig::new(nbits)
        };
        let q = QuantizedTensor::quantize(ctx, &w, &QuantConfig::Hqq(cfg)).unwrap();
        let Packed::Hqq(h) = &q.packed else { panic!() };
        let (rows, cols) = h.layout();
        let got_q = hqq::unpack(&llmft_quant_bytes(&h.w_q), rows, cols, nbits);
        let want_q = hqq::unpack(fx.bytes(&format!("{case}.W_q")), rows, cols, nbits);
        let same =
            got_q.iter().zip(&want_q).filter(|(a, b)| a == b).count() as f64 / got_q.len() as f64;
        let mut out = Tensor::zeros(ctx, DType::F32, &q.shape).unwrap();
        q.dequantize(ctx, &mut out).unwrap();
        let err = fro(&wf, &out.to_vec::<f32>().unwrap());
        let hqq_err = info["err_fro_f32"].as_f64().unwrap();
        eprintln!(
            "hqq {case} on {:?}: ours {err:.6} hqq {hqq_err:.6} W_q agree {:.4}",
            ctx.device(),
            same
        );
        assert!(
            err <= hqq_err * 1.01,
            "{case}: error {err} > hqq's {hqq_err} * 1.01"
        );
        let ls = |t: &llmft_quant::HqqStat| match t {
            llmft_quant::HqqStat::Plain(t) => t.to_f32_vec().unwrap(),
            _ => unreachable!(),
        };
        if !optimize {
            // Round to nearest is deterministic: W_q, scale and zero exactly hqq's.
            first_diff(&got_q, &want_q, &format!("{case}: W_q"));
            let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            first_diff(
                &bits(ls(&h.scale)),
                &bits(fx.f32(&format!("{case}.scale"))),
                &format!("{case}: scale"),
            );
            first_diff(
                &bits(ls(&h.zero)),
                &bits(fx.f32(&format!("{case}.zero"))),
                &format!("{case}: zero"),
            );
        } else {
            // hqq runs its solver in f16 on CUDA, llmft in f32: most codes agree.
            assert!(same > 0.97, "{case}: only {same} of W_q agree");
            // Dequantizing hqq's own W_q/scale/zero gives hqq's f32 error.
            let s = fx.f32(&format!("{case}.scale"));
            let z = fx.f32(&format!("{case}.zero"));
            let mut r = vec![0f32; wf.len()];
            hqq::dequantize(&want_q, &s, &z, 64, axis, &mut r);
            assert!((fro(&wf, &r) - hqq_err).abs() <= 1e-4 * hqq_err);
        }
    }
}

fn llmft_quant_bytes(t: &Tensor) -> Vec<u8> {
    t.to_ctx(&Ctx::cpu()).unwrap().as_bytes().unwrap().to_vec()
}

#[test]
fn hqq_cpu_matches_hqq() {
    hqq_cases(&Ctx::cpu());
}

#[test]
fn hqq_cuda_matches_hqq() {
    if let Some(ctx) = gpu() {
        hqq_cases(&ctx);
    }
}

fn linear4bit(ctx: &Ctx) {
    let bytes = common::fixture("bnb_linear4bit.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let fx = Fix::load("bnb_linear4bit.safetensors");
    for (proj, cfg) in [
        ("q_proj", QuantConfig::nf4_double_quant()),
        ("k_proj", QuantConfig::fp4()),
    ] {
        let key = format!("model.layers.0.self_attn.{proj}.weight");
        assert!(io::is_bnb_quantized(&st, &key));
        let q = io::load_bnb(ctx, &st, &key).unwrap();
        assert_eq!(q.config(), cfg);
        let mut out = Tensor::zeros(ctx, DType::BF16, &q.shape).unwrap();
        q.dequantize(ctx, &mut out).unwrap();
        let want = fx.f32(&format!("model.layers.0.self_attn.{proj}.weight_dequant"));
        let got = out.to_f32_vec().unwrap();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(&a, &b)| ulps(a, b, DType::BF16) <= 1),
            "{proj}"
        );
        // Writing gives transformers' keys and bytes back.
        let written = io::bnb_state_dict(&key, &q).unwrap();
        for (k, t) in &written {
            assert_eq!(t.data, fx.bytes(k), "{k}");
            assert_eq!(t.shape, fx.shape(k), "{k}");
        }
        let expected_keys = fx
            .0
            .keys()
            .filter(|k| k.starts_with(&key) && !k.ends_with("_orig") && !k.ends_with("_dequant"))
            .count();
        assert_eq!(written.len(), expected_keys);
        // Quantizing the original weight gives the same checkpoint (offset aside).
        let w = fx.tensor(ctx, &format!("model.layers.0.self_attn.{proj}.weight_orig"));
        let ours = QuantizedTensor::quantize(ctx, &w, &cfg).unwrap();
        let Packed::Bnb4(b) = &ours.packed else {
            panic!()
        };
        first_diff(&b.packed.to_vec::<u8>().unwrap(), fx.bytes(&key), &key);
    }
}

#[test]
fn bnb_linear4bit_checkpoint_cpu() {
    linear4bit(&Ctx::cpu());
}

#[test]
fn bnb_linear4bit_checkpoint_cuda() {
    if let Some(ctx) = gpu() {
        linear4bit(&ctx);
    }
}

#[test]
fn rcp_approx_table_is_the_hardwares() {
    let fx = Fix::load("bnb.safetensors");
    if !fx.has("rcp_approx_e127") {
        eprintln!("skipped: fixture without the rcp table");
        return;
    }
    for e in [100u32, 120, 127, 135, 150] {
        let want = fx.f32(&format!("rcp_approx_e{e}"));
        for k in 0..1024u32 {
            let x = f32::from_bits((e << 23) | (k << 13));
            assert_eq!(
                bnb::rcp_approx(x).to_bits(),
                want[k as usize].to_bits(),
                "rcp({x})"
            );
        }
    }
}
