//! HQQ checkpoints (hqq's `HQQLinear.state_dict()` keys): quantize -> state
//! dict -> safetensors -> load gives back the very same tensor, for 8/4/3/2/1
//! bits, both axes and odd shapes; malformed modules give one error naming
//! the key. Every module of `fixtures/hqq_saved.safetensors`, which hqq
//! 0.2.8.post1 itself saved (scripts/fixtures/hqq_load_check.py; another
//! such file can be given with `LLMFT_HQQ_FOREIGN`), loads and dequantizes
//! to hqq's own `W_r` stored beside it.
use llmft_quant::io::{hqq_state_dict, is_hqq_quantized, load_hqq, write_safetensors, RawTensor};
use llmft_quant::{Error, HqqConfig, Packed, QuantConfig, QuantizedTensor};
use llmft_tensor::{Ctx, DType, Tensor};
use proptest::prelude::*;
use safetensors::SafeTensors;

const KEY: &str = "model.layers.0.mlp.down_proj.weight";

fn serialize(tensors: &[(String, RawTensor)]) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("llmft-hqq-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!(
        "{}.safetensors",
        std::thread::current()
            .name()
            .unwrap_or("t")
            .replace("::", "-")
    ));
    write_safetensors(&path, tensors).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    bytes
}

fn quantize(x: &[f32], shape: &[usize], dtype: DType, cfg: HqqConfig) -> QuantizedTensor {
    let ctx = Ctx::cpu();
    let w = Tensor::from_f32(&ctx, x, dtype, shape).unwrap();
    QuantizedTensor::quantize(&ctx, &w, &QuantConfig::Hqq(cfg)).unwrap()
}

fn round_trip(q: &QuantizedTensor) -> QuantizedTensor {
    let bytes = serialize(&hqq_state_dict(KEY, q).unwrap());
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(is_hqq_quantized(&st, KEY));
    load_hqq(&Ctx::cpu(), &st, KEY).unwrap()
}

/// Rows hqq's packer takes at once (3 bits pad, so any count).
fn rows_step(nbits: u32) -> usize {
    match nbits {
        4 => 2,
        2 => 4,
        1 => 8,
        _ => 1,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn state_dict_round_trips_exactly(
        nbits_i in 0usize..5,
        axis in 0u32..2,
        gs_i in 0usize..3,
        out_i in 1usize..12,
        in_i in 1usize..9,
        optimize in any::<bool>(),
        dtype_i in 0usize..3,
        seed in any::<u32>(),
    ) {
        let nbits = [8, 4, 3, 2, 1][nbits_i];
        let group_size = [8, 16, 64][gs_i];
        let dtype = [DType::F32, DType::BF16, DType::F16][dtype_i];
        // Odd shapes, e.g. 7 x 24: the group divides the element count and
        // (axis 1) the reshaped rows are a multiple of the packer's step.
        let step = if axis == 1 { rows_step(nbits) } else { 1 };
        let (out_f, in_f) = (out_i * 2 + 1, in_i * group_size * step);
        let n = out_f * in_f;
        let mut s = seed;
        let x: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        let cfg = HqqConfig { group_size, axis, optimize, ..HqqConfig::new(nbits) };
        let q = quantize(&x, &[out_f, in_f], dtype, cfg);
        let back = round_trip(&q);
        prop_assert_eq!(&back.shape, &q.shape);
        prop_assert_eq!(back.dtype, q.dtype);
        let (Packed::Hqq(a), Packed::Hqq(b)) = (&q.packed, &back.packed) else {
            panic!("not hqq")
        };
        prop_assert_eq!(a.config.nbits, b.config.nbits);
        prop_assert_eq!(a.config.group_size, b.config.group_size);
        prop_assert_eq!(a.config.axis, b.config.axis);
        prop_assert_eq!(a.config.optimize, b.config.optimize);
        prop_assert_eq!(a.config.round_zero, b.config.round_zero);
        prop_assert_eq!(a.w_q.as_bytes().unwrap(), b.w_q.as_bytes().unwrap());
        let (x0, x1) = (q.dequantize_f32_host().unwrap(), back.dequantize_f32_host().unwrap());
        prop_assert_eq!(x0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        x1.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }
}

fn sample(nbits: u32) -> (QuantizedTensor, Vec<(String, RawTensor)>) {
    let x: Vec<f32> = (0..32 * 64)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0)
        .collect();
    let q = quantize(&x, &[32, 64], DType::BF16, HqqConfig::new(nbits));
    let sd = hqq_state_dict(KEY, &q).unwrap();
    (q, sd)
}

#[test]
fn state_dict_has_hqqs_keys_dtypes_and_shapes() {
    let (_, sd) = sample(4);
    let m = "model.layers.0.mlp.down_proj.";
    let find = |f: &str| {
        &sd.iter()
            .find(|(k, _)| *k == format!("{m}{f}"))
            .unwrap_or_else(|| panic!("no {f}"))
            .1
    };
    let mut keys: Vec<&str> = sd.iter().map(|(k, _)| k.strip_prefix(m).unwrap()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "W_q",
            "axis",
            "channel_wise",
            "compute_dtype",
            "encoded_state_dict",
            "group_size",
            "nbits",
            "offload_meta",
            "optimize",
            "packing",
            "quant_scale",
            "quant_zero",
            "round_zero",
            "scale",
            "shape",
            "stores_quant_config",
            "unpack_view_dtype",
            "view_as_float",
            "zero",
        ]
    );
    use safetensors::Dtype;
    let w_q = find("W_q");
    assert_eq!((w_q.dtype, w_q.shape.clone()), (Dtype::U8, vec![16, 64]));
    assert_eq!(find("scale").shape, vec![32, 1]);
    assert_eq!(find("zero").dtype, Dtype::F16);
    assert_eq!(
        find("shape").data,
        [32i64, 64].map(i64::to_le_bytes).concat()
    );
    assert_eq!(find("nbits").dtype, Dtype::I32);
    assert!(find("nbits").shape.is_empty());
    assert_eq!(find("packing").data, b"4bit_u8");
    assert_eq!(find("unpack_view_dtype").data, b"torch.uint8");
    assert_eq!(find("compute_dtype").data, b"torch.bfloat16");
    assert_eq!(find("round_zero").data, [1]);
    let (_, sd3) = sample(3);
    let w_q = &sd3.iter().find(|(k, _)| k.ends_with("W_q")).unwrap().1;
    assert_eq!((w_q.dtype, w_q.shape.clone()), (Dtype::I32, vec![4, 64]));
}

#[test]
fn bf16_stats_as_transformers_casts_them_load_widened() {
    let (q, mut sd) = sample(4);
    for (k, t) in sd.iter_mut() {
        if k.ends_with(".scale") || k.ends_with(".zero") {
            let v: Vec<u8> = t
                .data
                .chunks_exact(2)
                .flat_map(|c| {
                    let f = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                    half::bf16::from_f32(f).to_le_bytes()
                })
                .collect();
            *t = RawTensor {
                dtype: safetensors::Dtype::BF16,
                shape: t.shape.clone(),
                data: v,
            };
        }
    }
    let bytes = serialize(&sd);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let back = load_hqq(&Ctx::cpu(), &st, KEY).unwrap();
    let (a, b) = (
        q.dequantize_f32_host().unwrap(),
        back.dequantize_f32_host().unwrap(),
    );
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.02, "bf16 stats drift {worst}");
}

fn load_err(sd: &[(String, RawTensor)]) -> String {
    let bytes = serialize(sd);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    load_hqq(&Ctx::cpu(), &st, KEY).unwrap_err().to_string()
}

#[test]
fn malformed_modules_name_the_key() {
    let (_, sd) = sample(4);
    let m = "model.layers.0.mlp.down_proj.";
    let without = |f: &str| -> Vec<(String, RawTensor)> {
        sd.iter()
            .filter(|(k, _)| *k != format!("{m}{f}"))
            .cloned()
            .collect()
    };
    let with = |f: &str, t: RawTensor| -> Vec<(String, RawTensor)> {
        let mut v = without(f);
        v.push((format!("{m}{f}"), t));
        v
    };
    let u8s = |d: &[u8]| RawTensor {
        dtype: safetensors::Dtype::U8,
        shape: vec![d.len()],
        data: d.to_vec(),
    };
    let i32s = |v: i32| RawTensor {
        dtype: safetensors::Dtype::I32,
        shape: vec![],
        data: v.to_le_bytes().to_vec(),
    };
    for f in [
        "W_q",
        "scale",
        "zero",
        "shape",
        "nbits",
        "group_size",
        "axis",
        "packing",
    ] {
        let e = load_err(&without(f));
        assert!(e.contains(&format!("{m}{f}")), "{f}: {e}");
    }
    let cases = [
        ("packing", u8s(b"2bit_u8"), "4bit_u8"),
        ("nbits", i32s(5), "no hqq packing"),
        ("group_size", i32s(48), "must divide"),
        ("axis", i32s(2), "axis"),
        ("compute_dtype", u8s(b"torch.float64"), "torch.float64"),
        ("quant_scale", u8s(&[1]), "quant_scale"),
        ("channel_wise", u8s(&[0]), "channel_wise"),
        ("W_q", u8s(&[0; 7]), "bytes"),
        (
            "scale",
            RawTensor {
                dtype: safetensors::Dtype::F16,
                shape: vec![1, 32],
                data: vec![0; 64],
            },
            "expected [32, 1]",
        ),
        (
            "zero",
            RawTensor {
                dtype: safetensors::Dtype::I32,
                shape: vec![32, 1],
                data: vec![0; 128],
            },
            "expected f16, bf16 or f32",
        ),
    ];
    for (f, t, want) in cases {
        let e = load_err(&with(f, t));
        assert!(e.contains(m) && e.contains(want), "{f}: {e}");
    }
}

#[test]
fn what_hqq_cannot_hold_is_refused() {
    // 4-bit, axis 1: 3 x 64 reshapes to 3 rows, which hqq's packer cannot pair.
    let x: Vec<f32> = (0..192).map(|i| i as f32 / 192.0).collect();
    let q = quantize(&x, &[3, 64], DType::F32, HqqConfig::new(4));
    let e = hqq_state_dict(KEY, &q).unwrap_err().to_string();
    assert!(e.contains(KEY) && e.contains("3 rows"), "{e}");
    let q = quantize(&x, &[192], DType::F32, HqqConfig::new(3));
    assert!(matches!(
        hqq_state_dict(KEY, &q),
        Err(Error::Metadata { .. })
    ));
    let cfg = HqqConfig {
        quant_scale: true,
        ..HqqConfig::new(4)
    };
    // Quantized stats take groups of 128: 128 rows of one group each.
    let x: Vec<f32> = (0..128 * 64).map(|i| (i % 17) as f32).collect();
    let q = quantize(&x, &[128, 64], DType::F32, cfg);
    let e = hqq_state_dict(KEY, &q).unwrap_err().to_string();
    assert!(e.contains("quantized scale"), "{e}");
    let nf4 = QuantizedTensor::quantize(
        &Ctx::cpu(),
        &Tensor::from_f32(&Ctx::cpu(), &x, DType::F32, &[128, 64]).unwrap(),
        &QuantConfig::nf4(),
    )
    .unwrap();
    assert!(matches!(
        hqq_state_dict(KEY, &nf4),
        Err(Error::UnknownFormat(_))
    ));
}

/// A file hqq saved: `<module>.*` from `HQQLinear.state_dict()` plus
/// `<module>.W_r`, hqq's own dequantization in f32.
#[test]
fn loads_what_hqq_saved() {
    let path = std::env::var("LLMFT_HQQ_FOREIGN").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/hqq_saved.safetensors"
        )
        .to_string()
    });
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut n = 0;
    for name in st.names() {
        let Some(module) = name.strip_suffix(".W_r") else {
            continue;
        };
        let key = format!("{module}.weight");
        let q = load_hqq(&Ctx::cpu(), &st, &key).unwrap();
        let got = q.dequantize_f32_host().unwrap();
        let want: Vec<f32> = st
            .tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{module}: {:?}, max |llmft - hqq| = {worst:e}", q.config());
        assert_eq!(got.len(), want.len());
        assert!(worst <= 1e-6, "{module}: {worst}");
        n += 1;
    }
    assert!(n > 0, "{path} holds no `<module>.W_r`");
}
