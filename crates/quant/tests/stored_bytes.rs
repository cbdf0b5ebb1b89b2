//! `QuantConfig::stored_bytes` (the plan offload checks host memory with)
//! bounds what quantizing really stores, within a small slack.
use llmft_quant::{QuantConfig, QuantizedTensor};
use llmft_tensor::{ops, Ctx, DType, Tensor};

#[test]
fn stored_bytes_bounds_the_quantized_size() {
    let ctx = Ctx::cpu();
    for shape in [[128usize, 256], [64, 640], [256, 192]] {
        let mut w = Tensor::zeros(&ctx, DType::F32, &shape).unwrap();
        ops::fill_normal(&ctx, &mut w, 7, 0.0, 0.02).unwrap();
        for cfg in [
            QuantConfig::nf4(),
            QuantConfig::nf4_double_quant(),
            QuantConfig::fp4(),
            QuantConfig::int8(),
            QuantConfig::hqq(4),
            QuantConfig::hqq(3),
            QuantConfig::hqq(2),
        ] {
            let q = QuantizedTensor::quantize(&ctx, &w, &cfg).unwrap();
            let real: usize = q.parts().iter().map(|(_, t)| t.bytes()).sum();
            let planned = cfg.stored_bytes(&shape);
            assert!(
                planned >= real && planned <= real + 2048,
                "{cfg:?} {shape:?}: planned {planned}, stored {real}"
            );
        }
    }
}
