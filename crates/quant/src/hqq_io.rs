//! HQQ checkpoints in safetensors, with the keys hqq 0.2.8's
//! `HQQLinear.state_dict()` writes (its "encoded" state dict, the one
//! `save_to_safetensors` and transformers' `save_pretrained` store), so a
//! model quantized by llmft loads in hqq and a model hqq saved loads in llmft.
//!
//! For a weight key `M.weight` the module prefix is `M.` and the keys are:
//! `M.W_q` (packed as hqq packs: u8 `[rows/k, cols]`, i32 for 3 bits, see
//! [`crate::hqq`]), `M.scale` and `M.zero` (`[groups, 1]` for axis 1,
//! `[1, groups]` for axis 0), `M.shape` (i64, the weight's shape), ints as
//! i32 scalars (`nbits`, `group_size`, `axis`), bools as u8 scalars
//! (`channel_wise`, `optimize`, `round_zero`, `view_as_float`,
//! `quant_scale`, `quant_zero`, `offload_meta`, `encoded_state_dict`,
//! `stores_quant_config`) and strings as u8 character codes (`packing`,
//! `unpack_view_dtype`, `compute_dtype`, e.g. `4bit_u8`, `torch.uint8`,
//! `torch.bfloat16`). There is no `M.weight`. A bias stays `M.bias`.
//!
//! llmft writes scale and zero in the dtype it holds them in (f16 after the
//! solver, f32 without); hqq casts them to its compute dtype when it loads
//! them. It reads f16, f32 and bf16 (bf16 widened to f32, exactly).
use llmft_tensor::{Ctx, DType, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::hqq::{self, HqqConfig};
use crate::io::{get, meta_err, tensor_from_view, torch_name, RawTensor};
use crate::quantized::{host_bytes, Hqq, HqqStat, Packed, QuantizedTensor};
use crate::{Error, Result};

/// The key `field` of the HQQ module that stands for `weight_key`
/// (`...q_proj.weight`, `W_q` -> `...q_proj.W_q`).
pub fn hqq_module_key(weight_key: &str, field: &str) -> String {
    match weight_key.strip_suffix("weight") {
        Some(prefix) if prefix.is_empty() || prefix.ends_with('.') => format!("{prefix}{field}"),
        _ => format!("{weight_key}.{field}"),
    }
}

/// hqq's packing name (`Quantizer.bit_to_packing`) and its
/// `unpack_view_dtype` for `nbits`.
fn packing_name(nbits: u32) -> Option<(&'static str, &'static str)> {
    Some(match nbits {
        8 => ("8bit_u8", "torch.uint8"),
        4 => ("4bit_u8", "torch.uint8"),
        3 => ("3bit_32", "torch.int32"),
        2 => ("2bit_u8", "torch.uint8"),
        1 => ("1bit_u8", "torch.uint8"),
        _ => return None,
    })
}

fn scalar_i32(v: i32) -> RawTensor {
    RawTensor {
        dtype: Dtype::I32,
        shape: vec![],
        data: v.to_le_bytes().to_vec(),
    }
}

fn scalar_bool(v: bool) -> RawTensor {
    RawTensor {
        dtype: Dtype::U8,
        shape: vec![],
        data: vec![v as u8],
    }
}

fn string(s: &str) -> RawTensor {
    RawTensor {
        dtype: Dtype::U8,
        shape: vec![s.len()],
        data: s.as_bytes().to_vec(),
    }
}

fn stat_raw(t: &Tensor, shape: &[usize]) -> Result<RawTensor> {
    Ok(RawTensor {
        dtype: match t.dtype() {
            DType::F16 => Dtype::F16,
            _ => Dtype::F32,
        },
        shape: shape.to_vec(),
        data: host_bytes(t)?,
    })
}

/// The tensors hqq's `HQQLinear.state_dict()` holds for a quantized weight
/// (`weight_key` is the dense weight's key, `...q_proj.weight`). Only what
/// hqq itself can serialize is accepted: a 2-D weight, plain scale / zero
/// (hqq 0.2.8 refuses quantized ones), and as many reshaped rows as the
/// packing takes at once (hqq's 4-, 2- and 1-bit packers need a multiple of
/// 2, 4 and 8; 3 bits pad).
pub fn hqq_state_dict(weight_key: &str, qt: &QuantizedTensor) -> Result<Vec<(String, RawTensor)>> {
    qt.validate()?;
    let h = match &qt.packed {
        Packed::Hqq(h) => h,
        _ => {
            return Err(Error::UnknownFormat(format!(
                "{weight_key}: only hqq weights have an hqq checkpoint format"
            )))
        }
    };
    let c = &h.config;
    let bad = |msg: String| meta_err(weight_key, msg);
    if qt.shape.len() != 2 {
        return Err(bad(format!(
            "hqq stores linear weights (2-D); the shape is {:?}",
            qt.shape
        )));
    }
    let (packing, view_dtype) =
        packing_name(c.nbits).ok_or_else(|| bad(format!("no hqq packing for {} bits", c.nbits)))?;
    let (rows, cols) = h.layout();
    let k = hqq::packing(c.nbits).0;
    if c.nbits != 3 && rows % k != 0 {
        return Err(bad(format!(
            "hqq's {}-bit packer takes rows {k} at a time; this weight reshapes to {rows} rows \
             of {cols} (group_size {}, axis {})",
            c.nbits, c.group_size, c.axis
        )));
    }
    let (scale, zero) = match (&h.scale, &h.zero) {
        (HqqStat::Plain(s), HqqStat::Plain(z)) => (s, z),
        _ => {
            return Err(bad(
                "quantized scale / zero cannot be serialized (hqq 0.2.8 refuses them too)".into(),
            ))
        }
    };
    let groups = h.groups();
    let stat_shape = if c.axis == 1 {
        [groups, 1]
    } else {
        [1, groups]
    };
    let key = |f: &str| hqq_module_key(weight_key, f);
    let shape: Vec<u8> = qt
        .shape
        .iter()
        .flat_map(|&d| (d as i64).to_le_bytes())
        .collect();
    let w_q = RawTensor {
        dtype: if c.nbits == 3 { Dtype::I32 } else { Dtype::U8 },
        shape: vec![hqq::packed_rows(rows, c.nbits), cols],
        data: host_bytes(&h.w_q)?,
    };
    Ok(vec![
        (key("W_q"), w_q),
        (key("scale"), stat_raw(scale, &stat_shape)?),
        (key("zero"), stat_raw(zero, &stat_shape)?),
        (
            key("shape"),
            RawTensor {
                dtype: Dtype::I64,
                shape: vec![qt.shape.len()],
                data: shape,
            },
        ),
        (key("nbits"), scalar_i32(c.nbits as i32)),
        (key("group_size"), scalar_i32(c.group_size as i32)),
        (key("axis"), scalar_i32(c.axis as i32)),
        (key("channel_wise"), scalar_bool(true)),
        (key("optimize"), scalar_bool(c.optimize)),
        (key("round_zero"), scalar_bool(c.round_zero)),
        (key("view_as_float"), scalar_bool(false)),
        (key("quant_scale"), scalar_bool(false)),
        (key("quant_zero"), scalar_bool(false)),
        (key("offload_meta"), scalar_bool(false)),
        (key("encoded_state_dict"), scalar_bool(true)),
        (key("stores_quant_config"), scalar_bool(true)),
        (key("packing"), string(packing)),
        (key("unpack_view_dtype"), string(view_dtype)),
        (
            key("compute_dtype"),
            string(&format!("torch.{}", torch_name(qt.dtype))),
        ),
    ])
}

/// The `quantization_config` block of config.json that transformers writes
/// for an HQQ model (`HqqConfig` after `prepare_for_hqq_linear`): hqq's
/// `BaseQuantizeConfig` under `quant_config`, and the skipped modules.
pub fn hqq_quantization_config(c: &HqqConfig, skip_modules: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "quant_method": "hqq",
        "quant_config": {
            "weight_quant_params": {
                "nbits": c.nbits,
                "channel_wise": true,
                "group_size": c.group_size,
                "optimize": c.optimize,
                "round_zero": c.round_zero,
                "axis": c.axis,
                "view_as_float": false,
            },
            "scale_quant_params": null,
            "zero_quant_params": null,
            "offload_meta": false,
        },
        "skip_modules": skip_modules,
    })
}

/// Whether the file holds `weight_key` as an hqq module (its `W_q` key).
pub fn is_hqq_quantized(st: &SafeTensors<'_>, weight_key: &str) -> bool {
    st.tensor(&hqq_module_key(weight_key, "W_q")).is_ok()
}

/// The integers of a small integer tensor.
fn ints(key: &str, v: &TensorView<'_>) -> Result<Vec<i64>> {
    let d = v.data();
    let out: Vec<i64> = match v.dtype() {
        Dtype::U8 | Dtype::BOOL => d.iter().map(|&b| b as i64).collect(),
        Dtype::I8 => d.iter().map(|&b| b as i8 as i64).collect(),
        Dtype::I16 => d
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
            .collect(),
        Dtype::I32 => d
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
            .collect(),
        Dtype::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        other => {
            return Err(meta_err(
                key,
                format!("expected an integer tensor, got {other:?}"),
            ))
        }
    };
    Ok(out)
}

/// Reads an hqq module (hqq's encoded `HQQLinear.state_dict()`, as
/// [`hqq_state_dict`] writes it, or hqq / transformers saved it) onto
/// `ctx`'s device. Every missing key, bad dtype, length or unsupported
/// setting is an error naming the key at fault.
pub fn load_hqq(ctx: &Ctx, st: &SafeTensors<'_>, weight_key: &str) -> Result<QuantizedTensor> {
    let key = |f: &str| hqq_module_key(weight_key, f);
    let int = |f: &str| -> Result<i64> {
        let k = key(f);
        match ints(&k, &get(st, &k)?)?.as_slice() {
            [v] => Ok(*v),
            other => Err(meta_err(
                &k,
                format!("expected one integer, got {}", other.len()),
            )),
        }
    };
    let flag = |f: &str, default: bool| -> Result<bool> {
        if st.tensor(&key(f)).is_err() {
            return Ok(default);
        }
        Ok(int(f)? != 0)
    };
    let text = |f: &str| -> Result<Option<String>> {
        let k = key(f);
        let Ok(v) = st.tensor(&k) else {
            return Ok(None);
        };
        let bytes: Vec<u8> = ints(&k, &v)?
            .into_iter()
            .map(|c| u8::try_from(c).map_err(|_| meta_err(&k, "not a string of bytes")))
            .collect::<Result<_>>()?;
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| meta_err(&k, "not UTF-8 text"))
    };
    let count = |f: &str| -> Result<usize> {
        let v = int(f)?;
        usize::try_from(v).map_err(|_| meta_err(&key(f), format!("{v} is negative")))
    };

    let nbits = count("nbits")? as u32;
    let group_size = count("group_size")?;
    let axis = match count("axis")? {
        a @ (0 | 1) => a as u32,
        a => return Err(meta_err(&key("axis"), format!("axis {a}, expected 0 or 1"))),
    };
    let shape_key = key("shape");
    let shape: Vec<usize> = ints(&shape_key, &get(st, &shape_key)?)?
        .into_iter()
        .map(|d| usize::try_from(d).map_err(|_| meta_err(&shape_key, "negative dimension")))
        .collect::<Result<_>>()?;
    if !flag("channel_wise", true)? {
        return Err(meta_err(
            &key("channel_wise"),
            "channel_wise = false (one group for the whole tensor) is not supported",
        ));
    }
    for f in ["quant_scale", "quant_zero", "offload_meta"] {
        if flag(f, false)? {
            return Err(meta_err(&key(f), format!("{f} = true is not supported")));
        }
    }
    let (packing, view_dtype) = packing_name(nbits)
        .ok_or_else(|| meta_err(&key("nbits"), format!("no hqq packing for {nbits} bits")))?;
    let packing_key = key("packing");
    match text("packing")? {
        Some(p) if p == packing => {}
        Some(p) => {
            return Err(meta_err(
                &packing_key,
                format!("`{p}` is not {nbits}-bit hqq's `{packing}`"),
            ))
        }
        None => return Err(Error::Missing(packing_key)),
    }
    if let Some(v) = text("unpack_view_dtype")? {
        if v != view_dtype {
            return Err(meta_err(
                &key("unpack_view_dtype"),
                format!("`{v}`, expected `{view_dtype}` for `{packing}`"),
            ));
        }
    }
    let dtype = match text("compute_dtype")?.as_deref() {
        None | Some("torch.float16") => DType::F16,
        Some("torch.bfloat16") => DType::BF16,
        Some("torch.float32") => DType::F32,
        Some(other) => {
            return Err(meta_err(
                &key("compute_dtype"),
                format!("`{other}` is not torch.float16, torch.bfloat16 or torch.float32"),
            ))
        }
    };
    let config = HqqConfig {
        nbits,
        group_size,
        axis,
        optimize: flag("optimize", true)?,
        round_zero: flag("round_zero", false)?,
        ..HqqConfig::new(nbits)
    };
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| meta_err(&shape_key, format!("{shape:?} overflows")))?;
    config
        .check(numel)
        .map_err(|e| meta_err(&key("group_size"), e.to_string()))?;
    let (rows, cols) = hqq::layout(numel, group_size, axis);
    let groups = numel / group_size;

    // W_q: the packed words, as raw bytes (`view_as_float` stores the same
    // bytes under a float dtype).
    let wq_key = key("W_q");
    let wq = get(st, &wq_key)?;
    let (word, word_dtype) = if nbits == 3 {
        (Dtype::I32, DType::I32)
    } else {
        (Dtype::U8, DType::U8)
    };
    let prow = hqq::packed_rows(rows, nbits);
    if !flag("view_as_float", false)? && wq.dtype() != word {
        return Err(meta_err(
            &wq_key,
            format!("dtype {:?}, expected {word:?} for `{packing}`", wq.dtype()),
        ));
    }
    let wq_bytes = prow * cols * word_dtype.size();
    if wq.data().len() != wq_bytes {
        return Err(meta_err(
            &wq_key,
            format!(
                "{} bytes, expected {wq_bytes} ({prow} x {cols} packed words for shape {shape:?}, \
                 group_size {group_size}, axis {axis})",
                wq.data().len()
            ),
        ));
    }
    let mut host = Tensor::zeros(&Ctx::cpu(), word_dtype, &[prow, cols])?;
    host.as_bytes_mut()?.copy_from_slice(wq.data());
    let w_q = host.to_ctx(ctx)?;

    let stat = |f: &str| -> Result<HqqStat> {
        let k = key(f);
        let v = get(st, &k)?;
        let want = if axis == 1 { [groups, 1] } else { [1, groups] };
        if v.shape() != want {
            return Err(meta_err(
                &k,
                format!("shape {:?}, expected {want:?} (axis {axis})", v.shape()),
            ));
        }
        let t = tensor_from_view(ctx, &k, &v)?.reshape(&[groups])?;
        Ok(HqqStat::Plain(match t.dtype() {
            DType::F16 | DType::F32 => t,
            DType::BF16 => {
                let f = t.to_f32_vec()?;
                Tensor::from_slice(&Ctx::cpu(), &f, &[groups])?.to_ctx(ctx)?
            }
            other => {
                return Err(meta_err(
                    &k,
                    format!("dtype {other}, expected f16, bf16 or f32"),
                ))
            }
        }))
    };
    let qt = QuantizedTensor {
        shape,
        dtype,
        packed: Packed::Hqq(Hqq {
            config,
            numel,
            w_q,
            scale: stat("scale")?,
            zero: stat("zero")?,
        }),
    };
    qt.validate()
        .map_err(|e| meta_err(&wq_key, e.to_string()))?;
    Ok(qt)
}
