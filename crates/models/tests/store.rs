//! Every pass goes through the weight store: a model loaded into an
//! offloaded store (units in host memory, fetched into reused buffers) gives
//! the logits, the forward-only loss, the training gradients and the
//! generated tokens of the resident model bit for bit, for a tied head
//! (qwen2) and an untied one (llama3), quantized and dense; and the
//! forward-only loss equals the loss of the full forward + backward.
use std::path::Path;

use llmft_lora::LoraConfig;
use llmft_models::{GenerateOpts, Grads, Model, ModelBatch, QuantConfig, Resident, Unit};
use llmft_offload::{Offloaded, OffloadedConfig};
use llmft_tensor::{Ctx, DType};

fn load(kind: &str, quant: Option<&QuantConfig>, offloaded: Option<usize>) -> Model {
    let ctx = Ctx::cpu();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(kind);
    let mut m = Model::from_dir_into(&dir, &ctx, DType::F32, quant, &mut |n| {
        Ok(match offloaded {
            None => Resident::builder(&ctx, n),
            Some(lookahead) => Offloaded::builder(
                &ctx,
                n,
                OffloadedConfig {
                    lookahead,
                    ..Default::default()
                },
            )
            .unwrap(),
        })
    })
    .unwrap();
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(llmft_lora::NamesOrPattern::Pattern("all-linear".into())),
        ..LoraConfig::default()
    };
    let adapter = m.new_adapter(lora, 5).unwrap();
    m.attach_adapter(adapter);
    m.checkpointing = true;
    m
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Logits, forward-only loss, forward+backward loss and adapter gradients,
/// generated tokens.
fn everything(m: &Model) -> (Vec<u32>, u64, u64, Vec<Vec<u32>>, Vec<i32>) {
    let ctx = m.ctx().clone();
    let ids: Vec<i32> = (0..16).map(|i| (i * 11 + 3) % 96).collect();
    let batch = ModelBatch::from_host(&ctx, 2, 8, &ids, None, None, None).unwrap();
    let logits = bits(&m.logits(&batch).unwrap().to_vec::<f32>().unwrap());
    let eval = m.forward_loss(&batch, None).unwrap().loss;
    let mut g = Grads::for_adapter(m).unwrap();
    let train = m.forward_backward(&batch, None, Some(&mut g)).unwrap().loss;
    let grads = g
        .lora_all()
        .values()
        .flat_map(|l| l.tensors())
        .map(|t| bits(&t.to_f32_vec().unwrap()))
        .collect();
    let opts = GenerateOpts {
        max_new_tokens: 6,
        ..Default::default()
    };
    let gen = m.generate(&[5, 9, 17], &opts).unwrap();
    (logits, eval.to_bits(), train.to_bits(), grads, gen)
}

#[test]
fn offloaded_store_gives_the_resident_results() {
    for kind in ["llama3", "qwen2"] {
        for quant in [None, Some(QuantConfig::nf4())] {
            let want = everything(&load(kind, quant.as_ref(), None));
            assert_eq!(want.1, want.2, "{kind}: forward-only loss = training loss");
            for lookahead in [0, 1, 2] {
                let m = load(kind, quant.as_ref(), Some(lookahead));
                assert!(m.store().bytes().host > 0);
                let got = everything(&m);
                assert!(got == want, "{kind} {quant:?} lookahead {lookahead}");
                // Quantized weights are parts of the unit blob.
                if quant.is_some() {
                    let u = m.unit(Unit::Layer(0)).unwrap();
                    let name = "model.layers.0.mlp.down_proj.weight";
                    assert!(u.quantized(name).is_some());
                    assert!(u.layout().contains(&llmft_models::part_key(name, "packed")));
                }
            }
        }
    }
}
