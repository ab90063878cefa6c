//! Dense GEMM through cuBLAS, with the row-major semantics of `backend::cpu::matmul`.

use super::{Device, DeviceRead, DeviceType, DeviceWrite};
use crate::ensure;
use crate::error::{Error, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use half::bf16;

/// Element types cuBLAS multiplies here.
pub trait GemmType: DeviceType {
    const CUDA: cudaDataType;
}
impl GemmType for f32 {
    const CUDA: cudaDataType = cudaDataType::CUDA_R_32F;
}
impl GemmType for bf16 {
    const CUDA: cudaDataType = cudaDataType::CUDA_R_16BF;
}

impl Device {
    /// `c[m,n] (+)= a[m,k] @ b[k,n]`, all row-major, exactly the arguments of
    /// `backend::cpu::matmul`: `a_t` means `a` is stored as `[k,m]`, `b_t` that `b` is stored as
    /// `[n,k]`; with `accumulate` the product is added to `c`. Inputs f32 or bf16 (both the same),
    /// output f32 or bf16; accumulation in f32 (no TF32).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<A: GemmType, C: GemmType>(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &impl DeviceRead<A>,
        a_t: bool,
        b: &impl DeviceRead<A>,
        b_t: bool,
        c: &mut impl DeviceWrite<C>,
        accumulate: bool,
    ) -> Result<()> {
        ensure!(
            a.len() == m * k,
            "gemm: lhs holds {} values, not {m}x{k}",
            a.len()
        );
        ensure!(
            b.len() == k * n,
            "gemm: rhs holds {} values, not {k}x{n}",
            b.len()
        );
        ensure!(
            c.len() == m * n,
            "gemm: dst holds {} values, not {m}x{n}",
            c.len()
        );
        ensure!(
            !(A::CUDA == cudaDataType::CUDA_R_32F && C::CUDA == cudaDataType::CUDA_R_16BF),
            "gemm: f32 inputs with a bf16 output are not supported"
        );
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            return if accumulate {
                Ok(())
            } else {
                self.memset_zero(c)
            };
        }
        let dim = |x: usize| {
            i32::try_from(x).map_err(|_| Error(format!("gemm: dimension {x} too large for cuBLAS")))
        };
        let (mi, ni, ki) = (dim(m)?, dim(n)?, dim(k)?);
        // Row-major C = A B is column-major C^T = B^T A^T: cuBLAS computes an [n, m] column-major
        // result from B (as the first operand) and A. A row-major [r, c] matrix is a column-major
        // [c, r] one with leading dimension c.
        let (op_b, ldb) = if b_t {
            (cublasOperation_t::CUBLAS_OP_T, ki)
        } else {
            (cublasOperation_t::CUBLAS_OP_N, ni)
        };
        let (op_a, lda) = if a_t {
            (cublasOperation_t::CUBLAS_OP_T, mi)
        } else {
            (cublasOperation_t::CUBLAS_OP_N, ki)
        };
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        self.with_blas(|blas| {
            // SAFETY: the operand sizes were checked above against the dimensions and leading
            // dimensions passed; alpha/beta are host f32 (the default pointer mode) matching
            // CUBLAS_COMPUTE_32F; the handle is bound to this device's stream.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    op_b,
                    op_a,
                    ni,
                    mi,
                    ki,
                    &alpha as *const f32 as *const _,
                    b.dptr() as *const _,
                    A::CUDA,
                    ldb,
                    a.dptr() as *const _,
                    A::CUDA,
                    lda,
                    &beta as *const f32 as *const _,
                    c.dptr() as *mut _,
                    C::CUDA,
                    ni,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }?;
            Ok(())
        })
    }
}
