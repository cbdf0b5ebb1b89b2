//! cuBLASLt matrix products: bf16/f16 (or f32) inputs, fp32 accumulation.
use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::sys as lt;

use super::{alloc::DeviceBlock, CudaCtx};
use crate::{DType, Error, Result};

const WORKSPACE: usize = 32 << 20;

/// One column-major cuBLASLt problem (see `ops::gemm` for the row-major mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct LtProblem {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
    pub batch: i32,
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
    pub in_dtype: DType,
    pub out_dtype: DType,
    /// Byte alignment of the A, B and C pointers (≤ 256): cuBLASLt assumes
    /// 256 unless told, and views at odd offsets are less aligned.
    pub align: [u32; 3],
}

/// The largest power of two (at most 256) that divides the address.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

pub(crate) struct Blas {
    handle: lt::cublasLtHandle_t,
    workspace: DeviceBlock,
    algos: HashMap<LtProblem, lt::cublasLtMatmulAlgo_t>,
}

// SAFETY: the handle is used only under the context's mutex.
unsafe impl Send for Blas {}

fn ck(call: &'static str, s: lt::cublasStatus_t) -> Result<()> {
    if s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::cuda(call, s))
    }
}

fn cuda_type(d: DType) -> Result<lt::cudaDataType> {
    Ok(match d {
        DType::F32 => lt::cudaDataType::CUDA_R_32F,
        DType::BF16 => lt::cudaDataType::CUDA_R_16BF,
        DType::F16 => lt::cudaDataType::CUDA_R_16F,
        other => {
            return Err(Error::DType {
                op: "gemm",
                what: "operand",
                got: other,
                expected: "f32, bf16 or f16".into(),
            })
        }
    })
}

struct Layouts {
    desc: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    c: lt::cublasLtMatrixLayout_t,
}

impl Drop for Layouts {
    fn drop(&mut self) {
        // SAFETY: each handle was created by the matching create call below.
        unsafe {
            lt::cublasLtMatrixLayoutDestroy(self.a);
            lt::cublasLtMatrixLayoutDestroy(self.b);
            lt::cublasLtMatrixLayoutDestroy(self.c);
            lt::cublasLtMatmulDescDestroy(self.desc);
        }
    }
}

fn set_attr<T>(
    layout: lt::cublasLtMatrixLayout_t,
    attr: lt::cublasLtMatrixLayoutAttribute_t,
    v: &T,
) -> Result<()> {
    // SAFETY: v is a valid value of the attribute's type.
    ck("cublasLtMatrixLayoutSetAttribute", unsafe {
        lt::cublasLtMatrixLayoutSetAttribute(
            layout,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    })
}

impl Blas {
    pub(crate) fn new(cu: &CudaCtx) -> Result<Self> {
        // SAFETY: only tries to dlopen libcublasLt.
        if !unsafe { lt::is_culib_present() } {
            return Err(Error::NoCuda(
                "cuBLASLt (libcublasLt.so) was not found; put the CUDA toolkit's lib folder on \
                 LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        cu.bind()?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: out-pointer is valid.
        ck("cublasLtCreate", unsafe { lt::cublasLtCreate(&mut handle) })?;
        let workspace = cu.allocator().alloc(WORKSPACE)?;
        Ok(Self {
            handle,
            workspace,
            algos: HashMap::new(),
        })
    }

    fn layouts(&self, p: &LtProblem) -> Result<Layouts> {
        // Plain fp32 accumulation for every input type (no TF32 for f32 inputs).
        let compute = lt::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let mut l = Layouts {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
        };
        let it = cuda_type(p.in_dtype)?;
        let ot = cuda_type(p.out_dtype)?;
        let (ar, ac) = if p.trans_a { (p.k, p.m) } else { (p.m, p.k) };
        let (br, bc) = if p.trans_b { (p.n, p.k) } else { (p.k, p.n) };
        // SAFETY: out-pointers are valid; created handles are destroyed by Layouts' Drop.
        unsafe {
            ck(
                "cublasLtMatmulDescCreate",
                lt::cublasLtMatmulDescCreate(&mut l.desc, compute, lt::cudaDataType::CUDA_R_32F),
            )?;
            ck(
                "cublasLtMatrixLayoutCreate",
                lt::cublasLtMatrixLayoutCreate(&mut l.a, it, ar, ac, p.lda),
            )?;
            ck(
                "cublasLtMatrixLayoutCreate",
                lt::cublasLtMatrixLayoutCreate(&mut l.b, it, br, bc, p.ldb),
            )?;
            ck(
                "cublasLtMatrixLayoutCreate",
                lt::cublasLtMatrixLayoutCreate(&mut l.c, ot, p.m, p.n, p.ldc),
            )?;
        }
        // cublasOperation_t as an i32: 0 = N, 1 = T.
        let op = |t: bool| t as i32;
        for (attr, v) in [
            (
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                op(p.trans_a),
            ),
            (
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                op(p.trans_b),
            ),
        ] {
            // SAFETY: the attribute takes a cublasOperation_t.
            ck("cublasLtMatmulDescSetAttribute", unsafe {
                lt::cublasLtMatmulDescSetAttribute(
                    l.desc,
                    attr,
                    &v as *const _ as *const c_void,
                    std::mem::size_of_val(&v),
                )
            })?;
        }
        if p.batch > 1 {
            use lt::cublasLtMatrixLayoutAttribute_t as A;
            for (layout, stride) in [(l.a, p.stride_a), (l.b, p.stride_b), (l.c, p.stride_c)] {
                set_attr(layout, A::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &p.batch)?;
                set_attr(
                    layout,
                    A::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &stride,
                )?;
            }
        }
        Ok(l)
    }

    fn algo(&mut self, p: &LtProblem, l: &Layouts) -> Result<lt::cublasLtMatmulAlgo_t> {
        if let Some(a) = self.algos.get(p) {
            return Ok(*a);
        }
        let mut pref = std::ptr::null_mut();
        let mut result = std::mem::MaybeUninit::<lt::cublasLtMatmulHeuristicResult_t>::uninit();
        let mut count = 0;
        let ws = WORKSPACE as u64;
        // SAFETY: out-pointers valid; pref destroyed below.
        unsafe {
            ck(
                "cublasLtMatmulPreferenceCreate",
                lt::cublasLtMatmulPreferenceCreate(&mut pref),
            )?;
            let r = ck(
                "cublasLtMatmulPreferenceSetAttribute",
                lt::cublasLtMatmulPreferenceSetAttribute(
                    pref,
                    lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const c_void,
                    8,
                ),
            )
            .and_then(|_| {
                use lt::cublasLtMatmulPreferenceAttributes_t as P;
                for (attr, v) in [
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, p.align[0]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, p.align[1]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, p.align[2]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, p.align[2]),
                ] {
                    ck(
                        "cublasLtMatmulPreferenceSetAttribute",
                        lt::cublasLtMatmulPreferenceSetAttribute(
                            pref,
                            attr,
                            &v as *const u32 as *const c_void,
                            4,
                        ),
                    )?;
                }
                ck(
                    "cublasLtMatmulAlgoGetHeuristic",
                    lt::cublasLtMatmulAlgoGetHeuristic(
                        self.handle,
                        l.desc,
                        l.a,
                        l.b,
                        l.c,
                        l.c,
                        pref,
                        1,
                        result.as_mut_ptr(),
                        &mut count,
                    ),
                )
            });
            lt::cublasLtMatmulPreferenceDestroy(pref);
            r?;
            if count == 0 {
                return Err(Error::cuda(
                    "cublasLtMatmulAlgoGetHeuristic",
                    format!("no algorithm for {p:?}"),
                ));
            }
            let algo = result.assume_init().algo;
            self.algos.insert(*p, algo);
            Ok(algo)
        }
    }

    /// D = alpha·op(A)·op(B) + beta·C (column-major, C = D in place).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul(
        &mut self,
        cu: &CudaCtx,
        p: &LtProblem,
        a: u64,
        b: u64,
        c: u64,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        cu.bind()?;
        let p = &LtProblem {
            align: [alignment(a), alignment(b), alignment(c)],
            ..*p
        };
        let l = self.layouts(p)?;
        let algo = self.algo(p, &l)?;
        // SAFETY: pointers are live device allocations sized for the problem
        // (checked by ops::gemm); layouts and algo match the problem.
        ck("cublasLtMatmul", unsafe {
            lt::cublasLtMatmul(
                self.handle,
                l.desc,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                l.a,
                b as *const c_void,
                l.b,
                &beta as *const f32 as *const c_void,
                c as *const c_void,
                l.c,
                c as *mut c_void,
                l.c,
                &algo,
                self.workspace.ptr() as *mut c_void,
                WORKSPACE,
                cu.compute().cu_stream() as lt::cudaStream_t,
            )
        })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle came from cublasLtCreate.
        unsafe {
            lt::cublasLtDestroy(self.handle);
        }
    }
}
