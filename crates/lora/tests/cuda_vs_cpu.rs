//! The CUDA paths against the CPU reference: forward, backward and merge of
//! plain LoRA, DoRA and dropout, in f32 and bf16. Skipped (with a message)
//! where no GPU exists, unless LLMFT_REQUIRE_GPU is set, which makes a
//! missing GPU a failure.
mod common;

use common::*;
use llmft_lora::Mode;
use llmft_tensor::testing::gpu;
use llmft_tensor::{Ctx, DType};

fn compare(what: &str, gpu: &[f32], cpu: &[f32], tol: f64) {
    let e = rel_err(gpu, cpu, 1e-6);
    assert!(
        e <= tol,
        "{what}: CUDA differs from CPU by {e:e} (tol {tol:e})"
    );
}

#[test]
fn forward_backward_match_cpu() {
    let Some(cu) = gpu() else { return };
    let cpu = Ctx::cpu();
    for (dora, p) in [(false, 0.0), (true, 0.0), (false, 0.2), (true, 0.2)] {
        for (n, i, o, r) in [(37, 72, 40, 8), (5, 13, 7, 3), (128, 256, 96, 16)] {
            let pr = Problem::random(n as u64, n, i, o, r, false, dora, p);
            for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
                let mode = Mode::Train { seed: 5 };
                let (g, c) = (run(&cu, &pr, dtype, mode), run(&cpu, &pr, dtype, mode));
                let tag = format!("dora {dora} p {p} [{n},{i},{o},{r}] {dtype}");
                compare(&format!("{tag} y"), &g.y, &c.y, tol);
                compare(&format!("{tag} dx"), &g.dx, &c.dx, tol);
                compare(&format!("{tag} dA"), &g.da, &c.da, tol);
                compare(&format!("{tag} dB"), &g.db, &c.db, tol);
                compare(&format!("{tag} dm"), &g.dm, &c.dm, tol);
            }
        }
    }
}

#[test]
fn merge_and_magnitude_init_match_cpu() {
    let Some(cu) = gpu() else { return };
    let cpu = Ctx::cpu();
    let pr = Problem::random(4, 3, 200, 64, 8, false, true, 0.0);
    let mut out = vec![];
    for ctx in [&cu, &cpu] {
        let mut lora = pr.lora(ctx, &pr.a, &pr.b, &pr.m);
        let mut w = llmft_tensor::Tensor::from_f32(ctx, &pr.w, DType::BF16, &[pr.o, pr.i]).unwrap();
        lora.init_magnitude(ctx, &w).unwrap();
        let m = lora.magnitude.as_ref().unwrap().to_f32_vec().unwrap();
        lora.merge_into(ctx, &mut w).unwrap();
        out.push((m, w.to_f32_vec().unwrap()));
    }
    compare("magnitude", &out[0].0, &out[1].0, 1e-5);
    compare("merged", &out[0].1, &out[1].1, 1e-2);
}
