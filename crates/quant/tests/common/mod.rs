//! Fixture access shared by the integration tests.
#![allow(dead_code)]
use std::collections::HashMap;

use llmft_tensor::{Ctx, DType, Tensor};
use safetensors::SafeTensors;

pub fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn meta() -> serde_json::Value {
    serde_json::from_slice(&fixture("quant.json")).unwrap()
}

/// All tensors of a fixture as (dtype, shape, bytes).
pub struct Fix(pub HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>);

impl Fix {
    pub fn load(name: &str) -> Self {
        let bytes = fixture(name);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        Fix(st
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect())
    }
    pub fn has(&self, k: &str) -> bool {
        self.0.contains_key(k)
    }
    pub fn bytes(&self, k: &str) -> &[u8] {
        &self.0.get(k).unwrap_or_else(|| panic!("no {k}")).2
    }
    pub fn shape(&self, k: &str) -> Vec<usize> {
        self.0[k].1.clone()
    }
    pub fn dtype(&self, k: &str) -> DType {
        match self.0[k].0 {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::U8 => DType::U8,
            safetensors::Dtype::I8 => DType::I8,
            safetensors::Dtype::I32 => DType::I32,
            d => panic!("{d:?}"),
        }
    }
    /// Values as f32 (floats converted exactly).
    pub fn f32(&self, k: &str) -> Vec<f32> {
        let b = self.bytes(k);
        match self.dtype(k) {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::U8 => b.iter().map(|&v| v as f32).collect(),
            DType::I8 => b.iter().map(|&v| v as i8 as f32).collect(),
            DType::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
        }
    }
    /// The tensor on `ctx`, with its own dtype.
    pub fn tensor(&self, ctx: &Ctx, k: &str) -> Tensor {
        let mut t = Tensor::zeros(&Ctx::cpu(), self.dtype(k), &self.shape(k)).unwrap();
        t.as_bytes_mut().unwrap().copy_from_slice(self.bytes(k));
        t.to_ctx(ctx).unwrap()
    }
}

/// Distance in units of the last place of `dtype` between two values
/// representable in it.
pub fn ulps(a: f32, b: f32, dtype: DType) -> u32 {
    let key = |v: f32| -> i64 {
        let bits = match dtype {
            DType::BF16 => half::bf16::from_f32(v).to_bits() as i64,
            DType::F16 => half::f16::from_f32(v).to_bits() as i64,
            _ => v.to_bits() as i64,
        };
        let sign = match dtype {
            DType::F32 => 1i64 << 31,
            _ => 1i64 << 15,
        };
        if bits & sign != 0 {
            -(bits & (sign - 1))
        } else {
            bits
        }
    };
    (key(a) - key(b)).unsigned_abs() as u32
}

pub use llmft_tensor::testing::gpu;
