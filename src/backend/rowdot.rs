//! The batch-invariant product `y = x W^T`: every element is one dot product of its input row
//! and weight row, summed in one fixed order (8 lanes, one fused multiply-add per lane per
//! 8 inputs, a masked tail, a fixed reduction tree), whatever the number of rows, their
//! position in the batch, the blocking or the thread count. A row's result is therefore
//! bit-identical alone and in any batch: the serving engine's linear layers (`model::infer`).
//!
//! Speed comes from register blocking: 3 input rows x 4 weight rows per AVX2 micro-kernel call
//! (12 accumulators), each loaded vector used 3 or 4 times. Edge rows and columns use the same
//! micro-kernel at 1 row or 1 column, which performs the very same operations per element; the
//! portable kernel (no AVX2) performs them too, so every path gives the same bits. What batch
//! invariance costs against a GEMM: no blocking along `k` across calls, and a horizontal
//! reduction per element (a sixth more work at k = 256, little at k = 4096). Measured against
//! the tape's GEMM on the decode benchmark: BENCHMARKS.md, "CPU decoding and serving".

use crate::tensor::{DType, Tensor};
use rayon::prelude::*;

/// Lanes of one accumulator.
const L: usize = 8;
/// Output columns per task: their weight rows stay in L2 while every input row passes.
const COLS: usize = 64;
/// Below this many multiply-adds the product runs on the calling thread (one-row products of
/// the small configs are 1.5-3x faster so: they are memory-bound, and a fork costs more).
const PARALLEL_MIN: usize = 1 << 20;

#[derive(Clone, Copy)]
struct P(*mut f32);
// SAFETY: used only to hand disjoint columns of one output to rayon tasks.
unsafe impl Send for P {}
unsafe impl Sync for P {}
impl P {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `y[m, n] = x[m, k] @ w[n, k]^T`, batch-invariant (see the module docs); `w` in f32 or bf16.
pub fn rows_abt(x: &[f32], m: usize, w: &Tensor) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    assert_eq!(
        x.len(),
        m * k,
        "rows_abt: x holds {} values for {m} x {k}",
        x.len()
    );
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let yp = P(y.as_mut_ptr());
    let kernel = Kernel::detect();
    let block = |j0: usize| {
        let j1 = (j0 + COLS).min(n);
        let mut buf = Vec::new();
        let wf: &[f32] = match w.dtype() {
            DType::F32 => &w.data()[j0 * k..j1 * k],
            DType::BF16 => {
                buf.resize((j1 - j0) * k, 0f32);
                w.rows_to_f32(j0, j1 - j0, &mut buf);
                &buf
            }
        };
        // SAFETY: columns j0..j1 of y belong to this task; x and wf hold the rows read.
        unsafe { kernel.run(x, m, wf, j1 - j0, k, yp.get().add(j0), n) };
    };
    let starts = (0..n).step_by(COLS);
    if m * n * k < PARALLEL_MIN {
        starts.for_each(block);
    } else {
        starts.collect::<Vec<_>>().into_par_iter().for_each(block);
    }
    // SAFETY: the column blocks cover every element of every row, each written once.
    unsafe { y.set_len(m * n) };
    y
}

#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

/// Rows of x per micro-kernel tile.
const R: usize = 3;

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Kernel::Avx2;
        }
        Kernel::Portable
    }

    /// `y[i, j] = x_i . w_j` for `m` rows of x and `n` rows of w; y's rows are `ldy` apart.
    ///
    /// # Safety
    /// `y` must be valid for writes at `i * ldy + j` for every i < m, j < n.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        self,
        x: &[f32],
        m: usize,
        w: &[f32],
        n: usize,
        k: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        macro_rules! tiles {
            ($f:ident) => {{
                let (mr, n4) = (m - m % R, n - n % 4);
                for i in (0..mr).step_by(R) {
                    for j in (0..n4).step_by(4) {
                        $f::<R, 4>(x, i, w, j, k, y, ldy);
                    }
                    for j in n4..n {
                        $f::<R, 1>(x, i, w, j, k, y, ldy);
                    }
                }
                for i in mr..m {
                    for j in (0..n4).step_by(4) {
                        $f::<1, 4>(x, i, w, j, k, y, ldy);
                    }
                    for j in n4..n {
                        $f::<1, 1>(x, i, w, j, k, y, ldy);
                    }
                }
            }};
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => tiles!(tile_avx2),
            Kernel::Portable => tiles!(tile_portable),
        }
    }
}

/// RR rows of x (from `i`) against C rows of w (from `j`), AVX2 + FMA: RR x C accumulators of
/// 8 lanes (3 x 4 = 12 of the 16 vector registers, with 3 for x and 1 for w).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn tile_avx2<const RR: usize, const C: usize>(
    x: &[f32],
    i: usize,
    w: &[f32],
    j: usize,
    k: usize,
    y: *mut f32,
    ldy: usize,
) {
    use std::arch::x86_64::*;
    let xp = x.as_ptr().add(i * k);
    let wp = w.as_ptr().add(j * k);
    let mut acc = [[_mm256_setzero_ps(); C]; RR];
    let full = k / L;
    for c in 0..full {
        let mut xv = [_mm256_setzero_ps(); RR];
        for (r, v) in xv.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(xp.add(r * k + c * L));
        }
        for cc in 0..C {
            let wv = _mm256_loadu_ps(wp.add(cc * k + c * L));
            for r in 0..RR {
                acc[r][cc] = _mm256_fmadd_ps(xv[r], wv, acc[r][cc]);
            }
        }
    }
    let t = k - full * L;
    if t > 0 {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(t as i32), idx);
        for cc in 0..C {
            let wv = _mm256_maskload_ps(wp.add(cc * k + full * L), mask);
            for r in 0..RR {
                let xv = _mm256_maskload_ps(xp.add(r * k + full * L), mask);
                acc[r][cc] = _mm256_fmadd_ps(xv, wv, acc[r][cc]);
            }
        }
    }
    for r in 0..RR {
        for cc in 0..C {
            let mut lanes = [0f32; L];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][cc]);
            *y.add((i + r) * ldy + j + cc) = reduce(&lanes);
        }
    }
}

/// The same arithmetic without AVX2 (lane by lane, fused multiply-adds): the same bits.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn tile_portable<const RR: usize, const C: usize>(
    x: &[f32],
    i: usize,
    w: &[f32],
    j: usize,
    k: usize,
    y: *mut f32,
    ldy: usize,
) {
    let mut acc = [[[0f32; L]; C]; RR];
    let full = k / L;
    let chunk = |rows: &[f32], row: usize, c: usize| -> [f32; L] {
        let mut v = [0f32; L];
        let s = &rows[row * k + c * L..];
        let len = L.min(k - c * L);
        v[..len].copy_from_slice(&s[..len]);
        v
    };
    for c in 0..full + usize::from(!k.is_multiple_of(L)) {
        for cc in 0..C {
            let wv = chunk(w, j + cc, c);
            for r in 0..RR {
                let xv = chunk(x, i + r, c);
                for l in 0..L {
                    acc[r][cc][l] = xv[l].mul_add(wv[l], acc[r][cc][l]);
                }
            }
        }
    }
    for r in 0..RR {
        for cc in 0..C {
            *y.add((i + r) * ldy + j + cc) = reduce(&acc[r][cc]);
        }
    }
}

/// The fixed reduction tree of the 8 lanes.
#[inline(always)]
fn reduce(a: &[f32; L]) -> f32 {
    let mut s = *a;
    let mut h = L / 2;
    while h > 0 {
        for l in 0..h {
            s[l] += s[l + h];
        }
        h /= 2;
    }
    s[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Each row is bit-identical alone and in any batch, in f32 and bf16 storage, for ragged
    /// shapes (k not a multiple of 16, rows and columns not multiples of 4); the portable kernel
    /// gives the same bits as AVX-512; and the result is the product.
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let mut r = rand::rngs::StdRng::seed_from_u64(3);
        for (m, n, k) in [
            (1, 1, 1),
            (7, 45, 33),
            (70, 100, 129),
            (3, 600, 64),
            (5, 9, 16),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| r.random_range(-1.0..1.0)).collect();
            let w = Tensor::randn(&[n, k], 1.0, &mut r);
            for w in [w.clone(), w.to_dtype(DType::BF16)] {
                let all = rows_abt(&x, m, &w);
                let wf = w.to_dtype(DType::F32);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|t| x[i * k + t] as f64 * wf.data()[j * k + t] as f64)
                            .sum();
                        let got = all[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{m}x{n}x{k}"
                        );
                    }
                }
                for i in [0, m / 2, m - 1] {
                    let one = rows_abt(&x[i * k..(i + 1) * k], 1, &w);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&one),
                        bits(&all[i * n..(i + 1) * n]),
                        "{m}x{n}x{k} row {i}"
                    );
                }
                let mut portable = vec![0f32; m * n];
                unsafe { Kernel::Portable.run(&x, m, wf.data(), n, k, portable.as_mut_ptr(), n) };
                assert_eq!(
                    portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    all.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{m}x{n}x{k}: portable vs detected kernel"
                );
            }
        }
    }
}
