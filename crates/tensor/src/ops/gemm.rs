//! Matrix products: `C = alpha·op(A)·op(B) + beta·C`, row-major, batched.
use super::{dtype_in, on_ctx, read_f32, write_f32, FLOATS};
use crate::cuda::LtProblem;
use crate::{Ctx, DType, Error, Result, Tensor};

/// Options of [`gemm()`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    /// Use Aᵀ: `a` is stored `[.., k, m]`.
    pub trans_a: bool,
    /// Use Bᵀ: `b` is stored `[.., n, k]` (the layout of a linear layer's weight).
    pub trans_b: bool,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the existing `C` (0 overwrites, 1 accumulates).
    pub beta: f32,
}

impl Default for Gemm {
    fn default() -> Self {
        Self {
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
        }
    }
}

impl Gemm {
    /// `C = A·Bᵀ` (a linear layer: x·Wᵀ).
    pub fn nt() -> Self {
        Self {
            trans_b: true,
            ..Self::default()
        }
    }
    /// `C = Aᵀ·B` (a weight gradient: dyᵀ·x).
    pub fn tn() -> Self {
        Self {
            trans_a: true,
            ..Self::default()
        }
    }
    /// The same product, accumulated into C (`beta = 1`).
    pub fn accumulate(self) -> Self {
        Self { beta: 1.0, ..self }
    }
}

struct Dims {
    batch: usize,
    b_batched: bool,
    m: usize,
    n: usize,
    k: usize,
}

fn split(t: &Tensor) -> (usize, usize, usize) {
    let s = t.shape();
    let r = s.len();
    (s[..r - 2].iter().product(), s[r - 2], s[r - 1])
}

fn dims(a: &Tensor, b: &Tensor, c: &Tensor, g: &Gemm) -> Result<Dims> {
    for (what, t) in [("a", a), ("b", b), ("c", c)] {
        if t.shape().len() < 2 {
            return Err(Error::Shape {
                op: "gemm",
                what,
                got: t.shape().to_vec(),
                expected: vec![0, 0],
            });
        }
    }
    let (ba, ar, ac) = split(a);
    let (bb, br, bc) = split(b);
    let (m, k) = if g.trans_a { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if g.trans_b { (bc, br) } else { (br, bc) };
    if k != k2 || (bb != 1 && bb != ba) {
        return Err(Error::Shape {
            op: "gemm",
            what: "b",
            got: b.shape().to_vec(),
            expected: if g.trans_b { vec![n, k] } else { vec![k, n] },
        });
    }
    let mut want = a.shape()[..a.shape().len() - 2].to_vec();
    want.extend([m, n]);
    if c.shape() != want.as_slice() {
        return Err(Error::Shape {
            op: "gemm",
            what: "c",
            got: c.shape().to_vec(),
            expected: want,
        });
    }
    Ok(Dims {
        batch: ba,
        b_batched: bb > 1,
        m,
        n,
        k,
    })
}

/// `C = alpha·op(A)·op(B) + beta·C` for row-major `A [.., m, k]` (or
/// `[.., k, m]` with `trans_a`), `B [k, n]` or `[.., k, n]` (or transposed with
/// `trans_b`), `C [.., m, n]`. Leading dimensions are a batch (strided-batched
/// on CUDA); a 2-D `B` is shared by the whole batch. A and B have one float
/// dtype; C has that dtype or f32. Accumulation is fp32 (cuBLASLt on CUDA,
/// the `gemm` crate on CPU).
pub fn gemm(ctx: &Ctx, a: &Tensor, b: &Tensor, c: &mut Tensor, g: Gemm) -> Result<()> {
    on_ctx(ctx, "gemm", &[("a", a), ("b", b), ("c", c)])?;
    dtype_in("gemm", "a", a, FLOATS)?;
    dtype_in("gemm", "b", b, &[a.dtype()])?;
    dtype_in("gemm", "c", c, &[a.dtype(), DType::F32])?;
    let d = dims(a, b, c, &g)?;
    if d.m == 0 || d.n == 0 || d.batch == 0 {
        return Ok(());
    }
    match ctx.cuda_ctx() {
        None => gemm_cpu(a, b, c, &g, &d),
        Some(cu) => {
            if d.k == 0 {
                return super::axpby(ctx, 0.0, &c.clone(), g.beta, c);
            }
            // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ:
            // cuBLASLt's A is our B and its B is our A, with the same flags.
            let (ba_ld, aa_ld) = (
                b.shape()[b.shape().len() - 1],
                a.shape()[a.shape().len() - 1],
            );
            // A shared 2-D B with an untransposed A folds the batch into m;
            // with a transposed A each batch entry is its own product.
            let fold = !d.b_batched && !g.trans_a;
            let (m_rows, batch, calls) = match (fold, d.b_batched) {
                (true, _) => (d.m * d.batch, 1, 1),
                (false, true) => (d.m, d.batch, 1),
                (false, false) => (d.m, 1, d.batch),
            };
            let p = LtProblem {
                m: d.n as u64,
                n: m_rows as u64,
                k: d.k as u64,
                trans_a: g.trans_b,
                trans_b: g.trans_a,
                lda: ba_ld as i64,
                ldb: aa_ld as i64,
                ldc: d.n as i64,
                batch: batch as i32,
                stride_a: (d.k * d.n) as i64,
                stride_b: (d.m * d.k) as i64,
                stride_c: (d.m * d.n) as i64,
                in_dtype: a.dtype(),
                out_dtype: c.dtype(),
                align: [256; 3],
            };
            let (ap, bp, cp) = (a.device_ptr()?, b.device_ptr()?, c.device_ptr()?);
            let (ea, ec) = (a.dtype().size() as u64, c.dtype().size() as u64);
            cu.with_blas(|blas| {
                for i in 0..calls as u64 {
                    let (ao, co) = (i * (d.m * d.k) as u64 * ea, i * (d.m * d.n) as u64 * ec);
                    blas.matmul(cu, &p, bp, ap + ao, cp + co, g.alpha, g.beta)?;
                }
                Ok(())
            })
        }
    }
}

fn gemm_cpu(a: &Tensor, b: &Tensor, c: &mut Tensor, g: &Gemm, d: &Dims) -> Result<()> {
    let (va, vb) = (read_f32(a)?, read_f32(b)?);
    let (m, n, k) = (d.m, d.n, d.k);
    let (lhs_rs, lhs_cs) = if g.trans_a {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (rhs_rs, rhs_cs) = if g.trans_b {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    write_f32(c, |vc| {
        for bi in 0..d.batch {
            let a_off = bi * m * k;
            let b_off = if d.b_batched { bi * k * n } else { 0 };
            let dst = &mut vc[bi * m * n..(bi + 1) * m * n];
            if g.beta == 0.0 {
                dst.fill(0.0);
            }
            // SAFETY: every index the strides reach lies inside the slices
            // (m·k, k·n and m·n elements from the offsets, checked by `dims`).
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    g.beta != 0.0,
                    va[a_off..].as_ptr(),
                    lhs_cs,
                    lhs_rs,
                    vb[b_off..].as_ptr(),
                    rhs_cs,
                    rhs_rs,
                    g.beta,
                    g.alpha,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
    })
}
