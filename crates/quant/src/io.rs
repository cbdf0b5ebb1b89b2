//! bitsandbytes checkpoints in safetensors, with the key names transformers
//! writes, so a model quantized once loads in llmft and in transformers.
//!
//! 4-bit, for a weight key `W` (e.g. `model.layers.0.mlp.down_proj.weight`):
//! `W` (u8 `[ceil(n/2), 1]`), `W.absmax` (f32, or u8 with double quant),
//! `W.quant_map` (f32 `[16]`), `W.nested_absmax`, `W.nested_quant_map`
//! (double quant only) and `W.quant_state.bitsandbytes__nf4` (or `__fp4`):
//! u8 bytes of a JSON object with `quant_type`, `blocksize`, `dtype`,
//! `shape` and, with double quant, `nested_blocksize`, `nested_dtype`,
//! `nested_offset`. int8, for module `M`: `M.weight` (i8), `M.SCB` (f32),
//! `M.weight_format` (u8 0 = row-major).
//!
//! HQQ checkpoints (hqq's `HQQLinear.state_dict()` keys) are read and
//! written by [`hqq_state_dict`] and [`load_hqq`].
use std::collections::HashMap;
use std::path::Path;

use llmft_tensor::{Ctx, DType, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::bnb::{Code4, NESTED_BLOCKSIZE};
use crate::quantized::{host_bytes, Absmax, Bnb4, Int8, Packed, QuantizedTensor};
use crate::{Error, Result};

pub use crate::hqq_io::{
    hqq_module_key, hqq_quantization_config, hqq_state_dict, is_hqq_quantized, load_hqq,
};

/// A tensor ready to be written: safetensors dtype, shape, bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::U8 => Dtype::U8,
        DType::I8 => Dtype::I8,
        DType::I32 => Dtype::I32,
    }
}

fn our_dtype(d: Dtype, key: &str) -> Result<DType> {
    Ok(match d {
        Dtype::F32 => DType::F32,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::U8 => DType::U8,
        Dtype::I8 => DType::I8,
        Dtype::I32 => DType::I32,
        other => {
            return Err(Error::DType {
                what: key.to_string(),
                got: format!("{other:?}"),
                expected: "f32, bf16, f16, u8, i8 or i32".into(),
            })
        }
    })
}

pub(crate) fn torch_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::U8 => "uint8",
        DType::I8 => "int8",
        DType::I32 => "int32",
    }
}

fn raw(t: &Tensor, shape: &[usize]) -> Result<RawTensor> {
    Ok(RawTensor {
        dtype: st_dtype(t.dtype()),
        shape: shape.to_vec(),
        data: host_bytes(t)?,
    })
}

/// A float as Python's `repr` writes it (`0.0`, `0.078...`).
fn py_float(v: f64) -> String {
    let s = format!("{v}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// The tensors transformers writes for a quantized weight. `weight_key` is
/// the weight's key for 4-bit (`...q_proj.weight`); for int8 the module
/// prefix is taken from it (`...q_proj.`).
pub fn bnb_state_dict(weight_key: &str, qt: &QuantizedTensor) -> Result<Vec<(String, RawTensor)>> {
    qt.validate()?;
    let mut out = Vec::new();
    match &qt.packed {
        Packed::Bnb4(b) => {
            let n = qt.numel();
            out.push((weight_key.to_string(), raw(&b.packed, &[n.div_ceil(2), 1])?));
            let shape_json: Vec<String> = qt.shape.iter().map(|d| d.to_string()).collect();
            let mut json = format!(
                "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
                b.code.name(),
                b.blocksize,
                torch_name(qt.dtype),
                shape_json.join(", ")
            );
            match &b.absmax {
                Absmax::F32(t) => out.push((format!("{weight_key}.absmax"), raw(t, &[t.numel()])?)),
                Absmax::Nested {
                    q,
                    nested_absmax,
                    code,
                    offset,
                } => {
                    out.push((format!("{weight_key}.absmax"), raw(q, &[q.numel()])?));
                    out.push((
                        format!("{weight_key}.nested_absmax"),
                        raw(nested_absmax, &[nested_absmax.numel()])?,
                    ));
                    out.push((format!("{weight_key}.nested_quant_map"), raw(code, &[256])?));
                    json.push_str(&format!(
                        ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                        py_float(*offset as f64)
                    ));
                }
            }
            json.push('}');
            out.push((format!("{weight_key}.quant_map"), raw(&b.quant_map, &[16])?));
            let data = json.into_bytes();
            out.push((
                format!("{weight_key}.quant_state.bitsandbytes__{}", b.code.name()),
                RawTensor {
                    dtype: Dtype::U8,
                    shape: vec![data.len()],
                    data,
                },
            ));
        }
        Packed::Int8(i) => {
            let module = weight_key.strip_suffix("weight").unwrap_or(weight_key);
            out.push((weight_key.to_string(), raw(&i.q, &qt.shape)?));
            out.push((format!("{module}SCB"), raw(&i.scb, &[i.scb.numel()])?));
            out.push((
                format!("{module}weight_format"),
                RawTensor {
                    dtype: Dtype::U8,
                    shape: vec![],
                    data: vec![0],
                },
            ));
        }
        Packed::Hqq(_) => {
            return Err(Error::UnknownFormat(
                "hqq has no bitsandbytes checkpoint format".into(),
            ))
        }
    }
    Ok(out)
}

/// Writes tensors to a safetensors file (to a temporary name, then renamed).
pub fn write_safetensors(path: &Path, tensors: &[(String, RawTensor)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(k, t)| {
            TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::SafeTensors(format!("{k}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes =
        safetensors::serialize(views, None).map_err(|e| Error::SafeTensors(e.to_string()))?;
    let tmp = path.with_extension("safetensors.tmp");
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A tensor of a safetensors file, on `ctx`'s device.
pub fn tensor_from_view(ctx: &Ctx, key: &str, v: &TensorView<'_>) -> Result<Tensor> {
    let dtype = our_dtype(v.dtype(), key)?;
    let shape = v.shape().to_vec();
    let mut host = Tensor::zeros(&Ctx::cpu(), dtype, &shape)?;
    crate::error::len_check(key, v.data().len(), host.bytes())?;
    host.as_bytes_mut()?.copy_from_slice(v.data());
    Ok(host.to_ctx(ctx)?)
}

pub(crate) fn get<'a>(st: &'a SafeTensors<'a>, key: &str) -> Result<TensorView<'a>> {
    st.tensor(key).map_err(|_| Error::Missing(key.to_string()))
}

pub(crate) fn meta_err(key: &str, msg: impl Into<String>) -> Error {
    Error::Metadata {
        key: key.to_string(),
        msg: msg.into(),
    }
}

fn parse_dtype(key: &str, s: &str) -> Result<DType> {
    Ok(match s {
        "float32" => DType::F32,
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        other => return Err(meta_err(key, format!("unknown dtype `{other}`"))),
    })
}

/// Whether `weight_key` of this file is a bitsandbytes-quantized weight.
pub fn is_bnb_quantized(st: &SafeTensors<'_>, weight_key: &str) -> bool {
    let module = weight_key.strip_suffix("weight").unwrap_or(weight_key);
    st.names().iter().any(|k| {
        k.starts_with(&format!("{weight_key}.quant_state.bitsandbytes__"))
            || **k == format!("{module}SCB")
    })
}

/// Reads a bitsandbytes-quantized weight (4-bit or int8) as transformers
/// wrote it, onto `ctx`'s device. Missing keys, bad lengths and unknown
/// tags are errors.
pub fn load_bnb(ctx: &Ctx, st: &SafeTensors<'_>, weight_key: &str) -> Result<QuantizedTensor> {
    let names = st.names();
    let qs_prefix = format!("{weight_key}.quant_state.bitsandbytes__");
    let module = weight_key.strip_suffix("weight").unwrap_or(weight_key);
    if let Some(qs_key) = names.iter().find(|k| k.starts_with(&qs_prefix)) {
        let tag = &qs_key[qs_prefix.len()..];
        let code: Code4 = tag.parse()?;
        let qs = get(st, qs_key)?;
        let json: HashMap<String, serde_json::Value> =
            serde_json::from_slice(qs.data()).map_err(|e| meta_err(qs_key, e.to_string()))?;
        let field = |k: &str| {
            json.get(k)
                .ok_or_else(|| meta_err(qs_key, format!("no `{k}`")))
        };
        let qt_name = field("quant_type")?.as_str().unwrap_or_default();
        if qt_name != tag {
            return Err(Error::UnknownFormat(qt_name.to_string()));
        }
        let blocksize = field("blocksize")?
            .as_u64()
            .ok_or_else(|| meta_err(qs_key, "blocksize is not an integer"))?
            as usize;
        let dtype = parse_dtype(qs_key, field("dtype")?.as_str().unwrap_or_default())?;
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .ok_or_else(|| meta_err(qs_key, "shape is not a list"))?
            .iter()
            .map(|v| v.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| meta_err(qs_key, "shape holds a non-integer"))?;
        let t = |k: String| -> Result<Tensor> {
            let v = get(st, &k)?;
            tensor_from_view(ctx, &k, &v)
        };
        let packed_t = t(weight_key.to_string())?;
        let packed = packed_t.reshape(&[packed_t.numel()])?;
        let absmax_t = t(format!("{weight_key}.absmax"))?;
        let absmax = if json.contains_key("nested_offset") {
            let bs = field("nested_blocksize")?.as_u64().unwrap_or(0) as usize;
            if bs != NESTED_BLOCKSIZE {
                return Err(meta_err(
                    qs_key,
                    format!("nested_blocksize {bs} (only 256 is written by bnb)"),
                ));
            }
            let offset = field("nested_offset")?
                .as_f64()
                .ok_or_else(|| meta_err(qs_key, "nested_offset is not a number"))?
                as f32;
            Absmax::Nested {
                q: absmax_t,
                nested_absmax: t(format!("{weight_key}.nested_absmax"))?,
                code: t(format!("{weight_key}.nested_quant_map"))?,
                offset,
            }
        } else {
            Absmax::F32(absmax_t)
        };
        let qt = QuantizedTensor {
            shape,
            dtype,
            packed: Packed::Bnb4(Bnb4 {
                code,
                blocksize,
                packed,
                absmax,
                quant_map: t(format!("{weight_key}.quant_map"))?,
            }),
        };
        qt.validate()?;
        return Ok(qt);
    }
    let scb_key = format!("{module}SCB");
    if names.iter().any(|k| **k == scb_key) {
        let w = get(st, weight_key)?;
        let q = tensor_from_view(ctx, weight_key, &w)?;
        let shape = q.shape().to_vec();
        let qt = QuantizedTensor {
            shape,
            dtype: DType::F16,
            packed: Packed::Int8(Int8 {
                q,
                scb: tensor_from_view(ctx, &scb_key, &get(st, &scb_key)?)?,
                threshold: 0.0,
                outlier_cols: Vec::new(),
            }),
        };
        qt.validate()?;
        return Ok(qt);
    }
    Err(Error::Missing(format!("{qs_prefix}nf4|fp4 or {scb_key}")))
}
