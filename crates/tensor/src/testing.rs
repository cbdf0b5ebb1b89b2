//! For the tests of llmft's crates: the GPU of a test that needs one.
//!
//! CI machines have no GPU, so a CUDA test skips there (saying so on
//! stderr) and passes. On a GPU machine that would hide a broken driver or
//! library path, so with [`REQUIRE_GPU_VAR`] set (to any value;
//! `scripts/gpu/run.sh` sets it) a missing GPU fails the test instead.
//!
//! ```
//! // The body of a test with a CUDA case:
//! let Some(ctx) = llmft_tensor::testing::gpu() else { return };
//! assert_eq!(ctx.device(), llmft_tensor::Device::Cuda(0));
//! ```
use crate::{cuda_device_count, Ctx};

/// The variable that makes a missing GPU a test failure rather than a skip.
pub const REQUIRE_GPU_VAR: &str = "LLMFT_REQUIRE_GPU";

/// CUDA device 0's context, or `None` after printing that the calling
/// test's CUDA part is skipped. Panics when there is no GPU and
/// [`REQUIRE_GPU_VAR`] is set, or when a GPU is reported but no context
/// can be made on it.
pub fn gpu() -> Option<Ctx> {
    if cuda_device_count() == 0 {
        no_gpu(std::env::var_os(REQUIRE_GPU_VAR).is_some());
        return None;
    }
    Some(Ctx::cuda(0).expect("a CUDA device is reported, but no context can be made on it"))
}

/// Where there is no GPU: fails when one is `required`, else says which
/// test skips its CUDA part (libtest names a test's thread after it).
fn no_gpu(required: bool) {
    assert!(
        !required,
        "{REQUIRE_GPU_VAR} is set but no CUDA GPU was found"
    );
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("this test");
    eprintln!(
        "{test}: no CUDA GPU, its CUDA part is skipped (set {REQUIRE_GPU_VAR}=1 to fail instead)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_gpu_is_a_skip_unless_required() {
        no_gpu(false);
        let e = std::panic::catch_unwind(|| no_gpu(true)).unwrap_err();
        let msg = e.downcast_ref::<String>().unwrap();
        assert_eq!(msg, "LLMFT_REQUIRE_GPU is set but no CUDA GPU was found");
    }
}
