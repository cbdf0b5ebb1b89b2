//! llmft-tensor: the thin tensor layer of llmft.
//!
//! Contiguous row-major [`Tensor`]s over host memory or CUDA device memory,
//! a per-device [`Ctx`] (streams, cuBLASLt, NVRTC kernel cache, caching
//! allocator) and [`ops`]: free functions that write into outputs the caller
//! provides. Every op has a CPU path (the reference, used where no GPU
//! exists) and a CUDA path; the context picks one.
//!
//! ```
//! use llmft_tensor::{ops, Ctx, DType, Tensor};
//! let ctx = Ctx::best(); // CUDA device 0 if one is usable, else the CPU
//! let a = Tensor::from_f32(&ctx, &[1.0, 2.0, 3.0, 4.0], DType::F32, &[2, 2])?;
//! let b = Tensor::from_f32(&ctx, &[1.0, 0.0, 0.0, 1.0], DType::F32, &[2, 2])?;
//! let mut c = Tensor::zeros(&ctx, DType::F32, &[2, 2])?;
//! ops::gemm(&ctx, &a, &b, &mut c, ops::Gemm::default())?;
//! assert_eq!(c.to_vec::<f32>()?, vec![1.0, 2.0, 3.0, 4.0]);
//! # Ok::<(), llmft_tensor::Error>(())
//! ```
// The CPU reference loops index several arrays by one position, as the kernels do.
#![allow(clippy::needless_range_loop)]

pub mod cuda;
mod device;
mod dtype;
mod error;
pub mod ops;
mod pinned;
pub mod store;
mod tensor;
pub mod testing;

pub use cuda::StreamKind;
pub use device::{cuda_device_count, Ctx, Device, Event};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use pinned::PinnedPool;
pub use tensor::{numel, Tensor};
