//! CPU primitives: a threaded GEMM (the `gemm` crate, runtime-dispatched AVX2/AVX-512 kernels on
//! rayon's pool) and small vectorisable reductions used by the op kernels.

use gemm::Parallelism;

/// Below this many multiply-adds a GEMM runs on the calling thread: threading costs more.
const GEMM_PARALLEL_MIN_FLOPS: usize = 1 << 16;

/// `c[m,n] (+)= a[m,k] @ b[k,n]`, all row-major. `a_t` means `a` is stored as `[k,m]`, `b_t` that
/// `b` is stored as `[n,k]`. With `accumulate` the product is added to `c`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    c: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(a.len(), m * k, "matmul lhs size");
    assert_eq!(b.len(), k * n, "matmul rhs size");
    assert_eq!(c.len(), m * n, "matmul dst size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let (a_rs, a_cs) = if a_t { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if b_t { (1, k as isize) } else { (n as isize, 1) };
    let par = if m * n * k >= GEMM_PARALLEL_MIN_FLOPS {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: the slices were checked to hold exactly the strided extents described above, and
    // `c` does not alias `a` or `b` (it is a distinct &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Dot product with eight independent accumulators (vectorises without fast-math).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// Sum of squares in f32 with eight accumulators.
#[inline]
pub fn sum_sq(a: &[f32]) -> f32 {
    dot(a, a)
}

/// Split `0..n` into `parts` contiguous, nearly equal ranges (deterministic for a given n, parts).
pub fn chunks(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    let base = n / parts;
    let extra = n % parts;
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 0..parts {
        let len = base + usize::from(p < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// Number of chunks used for deterministic parallel reductions over rows: fixed, so results do
/// not depend on the number of threads.
pub const REDUCE_CHUNKS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], at: bool, b: &[f32], bt: bool) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for l in 0..k {
                    let av = if at { a[l * m + i] } else { a[i * k + l] };
                    let bv = if bt { b[j * k + l] } else { b[l * n + j] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn matmul_all_transposes_match_naive() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 33, 65), (64, 48, 129)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.2).collect();
            for at in [false, true] {
                for bt in [false, true] {
                    let mut c = vec![1.0; m * n];
                    matmul(m, n, k, &a, at, &b, bt, &mut c, false);
                    let r = naive(m, n, k, &a, at, &b, bt);
                    for (x, y) in c.iter().zip(&r) {
                        assert!((x - y).abs() < 1e-4, "{m}x{n}x{k} at={at} bt={bt}: {x} vs {y}");
                    }
                    let mut c2 = r.clone();
                    matmul(m, n, k, &a, at, &b, bt, &mut c2, true);
                    for (x, y) in c2.iter().zip(&r) {
                        assert!((x - 2.0 * y).abs() < 1e-4);
                    }
                }
            }
        }
    }
}
