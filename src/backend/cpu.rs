//! CPU primitives: a threaded GEMM (the `gemm` crate's runtime-dispatched AVX2/AVX-512 kernels;
//! parallel calls give each rayon thread one block of rows), a strided single-threaded GEMM for
//! kernels that parallelise over their own tasks (attention tiles), vector row kernels
//! ([`simd`]: fast `exp`, softmax pieces, SwiGLU, norms), allocation helpers that skip the
//! zero-fill of op outputs, and the allocator setup for training ([`tune_allocator`]).

use gemm::Parallelism;

#[path = "simd/mod.rs"]
pub mod simd;

#[path = "rowdot.rs"]
pub mod rowdot;
pub use rowdot::rows_abt;

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
    assert_eq!(c.len(), m * n, "matmul dst size");
    // SAFETY: `c` holds m*n initialised elements and is a distinct &mut borrow.
    unsafe { matmul_raw(m, n, k, a, a_t, b, b_t, c.as_mut_ptr(), accumulate) }
}

/// `a[m,k] @ b[k,n]` into a new `[m, n]` buffer (layout flags as in [`matmul`]).
///
/// The GEMM stores every element, so unlike `vec![0.0; m*n]` + [`matmul`] there is no zero-fill
/// pass over the output (a serial memset on the calling thread: ~3% of a moe_small step).
pub fn matmul_new(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
) -> Vec<f32> {
    if k == 0 {
        return vec![0f32; m * n];
    }
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: capacity for m*n elements; with k > 0 and accumulate == false the GEMM writes
    // every one of them (dst := lhs @ rhs, dst is not read), after which they are initialised.
    unsafe {
        matmul_raw(m, n, k, a, a_t, b, b_t, c.as_mut_ptr(), false);
        c.set_len(m * n);
    }
    c
}

/// # Safety
/// `c` must be valid for writes of `m*n` elements (and initialised when `accumulate`), and must
/// not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_raw(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    c: *mut f32,
    accumulate: bool,
) {
    assert_eq!(a.len(), m * k, "matmul lhs size");
    assert_eq!(b.len(), k * n, "matmul rhs size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            std::ptr::write_bytes(c, 0, m * n);
        }
        return;
    }
    if !a_t && b_t && n <= SKINNY_MAX_N {
        skinny_abt(m, n, k, a, b, c, accumulate);
        return;
    }
    let (a_rs, a_cs) = if a_t {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (b_rs, b_cs) = if b_t {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    let threads = rayon::current_num_threads();
    let parallel = m * n * k >= GEMM_PARALLEL_MIN_FLOPS && threads > 1;
    if parallel && m >= 2 * SPLIT_MIN_ROWS {
        // One single-threaded GEMM per thread on a contiguous block of rows of c.
        use rayon::prelude::*;
        let parts = threads.min(m / SPLIT_MIN_ROWS);
        let rows = m.div_ceil(parts);
        let c = SendPtr(c);
        (0..parts).into_par_iter().for_each(|p| {
            let (r0, r1) = (p * rows, ((p + 1) * rows).min(m));
            // SAFETY: rows r0..r1 of a/c lie inside the checked extents; the blocks of c are
            // disjoint between tasks.
            unsafe {
                gemm::gemm(
                    r1 - r0,
                    n,
                    k,
                    c.get().add(r0 * n),
                    1,
                    n as isize,
                    accumulate,
                    a.as_ptr().offset(r0 as isize * a_rs),
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
                    Parallelism::None,
                )
            };
        });
        return;
    }
    let par = if parallel {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // The slices were checked to hold exactly the strided extents described above.
    gemm::gemm(
        m,
        n,
        k,
        c,
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

/// Parallel GEMMs give each thread one contiguous block of at least this many rows of `c`, run
/// single-threaded (`gemm`'s own rayon split is 6-15% slower on the moe_small shapes, most on
/// the `dW = dY^T X` forms). A row of `c` comes out bit-identical whatever block holds it once
/// blocks have >= 64 rows (checked by a test), so results do not depend on the thread count.
const SPLIT_MIN_ROWS: usize = 64;

/// `a @ b^T` with at most this many columns (the MoE router's logits, `n` = experts) runs as
/// row dot products: the GEMM microkernel needs 64-row blocks along `n` and runs ~16x below
/// peak there.
const SKINNY_MAX_N: usize = 16;

/// `c (+)= a[m,k] @ b[n,k]^T` as dot products, rows in parallel.
///
/// # Safety
/// As [`matmul_raw`] (with `a`/`b` sizes already checked).
unsafe fn skinny_abt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    accumulate: bool,
) {
    use rayon::prelude::*;
    let c = SendPtr(c);
    let rows_per_task = (GEMM_PARALLEL_MIN_FLOPS / (n * k).max(1)).max(16);
    (0..m)
        .into_par_iter()
        .with_min_len(rows_per_task)
        .for_each(|i| {
            let ai = &a[i * k..(i + 1) * k];
            for j in 0..n {
                let v = simd::dot(ai, &b[j * k..(j + 1) * k]);
                // SAFETY: element (i, j) lies inside the m*n destination; row i is this task's.
                unsafe {
                    let p = c.get().add(i * n + j);
                    if accumulate {
                        *p += v;
                    } else {
                        p.write(v);
                    }
                }
            }
        });
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint rows of one destination to rayon tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Elements per task of [`add_assign`] and [`sq_norm`]: fixed, so results do not depend on the
/// thread count.
const ELEMWISE_CHUNK: usize = 1 << 15;

/// `dst += src`, in parallel (for gradient accumulation on the tape).
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    assert_eq!(dst.len(), src.len(), "add_assign: length mismatch");
    dst.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(src.par_chunks(ELEMWISE_CHUNK))
        .for_each(|(d, s)| {
            for (x, y) in d.iter_mut().zip(s) {
                *x += y;
            }
        });
}

/// `sum x^2` in f64, in parallel: f32 partial sums over fixed 32K-element chunks (16 lanes
/// each), combined in f64 in chunk order, so the result is deterministic. For the global
/// gradient norm (`grad_norm` sums `x as f64` squares serially: ~2% of a moe_small step).
pub fn sq_norm(x: &[f32]) -> f64 {
    use rayon::prelude::*;
    let parts: Vec<f64> = x
        .par_chunks(ELEMWISE_CHUNK)
        .map(|c| simd::dot(c, c) as f64)
        .collect();
    parts.iter().sum()
}

/// A strided f32 matrix operand of [`gemm_strided`]: element `(i, j)` is at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy, Debug)]
pub struct MatPtr {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// Destination of [`gemm_strided`]: element `(i, j)` is at `ptr + i*rs + j`.
#[derive(Clone, Copy, Debug)]
pub struct DstPtr {
    pub ptr: *mut f32,
    pub rs: isize,
}

// SAFETY: plain addresses; the functions that dereference them state the aliasing rules.
impl DstPtr {
    /// The same destination moved by `offset` elements (a method, so that closures capture the
    /// whole `Send + Sync` struct rather than its raw-pointer field).
    ///
    /// # Safety
    /// The result must stay inside the allocation `ptr` points into.
    #[inline]
    pub unsafe fn offset(self, offset: isize) -> DstPtr {
        DstPtr {
            ptr: self.ptr.offset(offset),
            rs: self.rs,
        }
    }
}

unsafe impl Send for MatPtr {}
unsafe impl Sync for MatPtr {}
unsafe impl Send for DstPtr {}
unsafe impl Sync for DstPtr {}

/// Single-threaded strided GEMM for kernels that parallelise over their own tasks (attention):
/// `dst (+)= beta * lhs[m,k] @ rhs[k,n]`, accumulating when `accumulate`.
///
/// # Safety
/// Every element addressed by `lhs` (`m x k`), `rhs` (`k x n`) and `dst` (`m x n`) must be valid
/// for reads (writes for `dst`), and `dst` must not overlap `lhs`, `rhs` or memory another
/// thread accesses during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: DstPtr,
    accumulate: bool,
    lhs: MatPtr,
    rhs: MatPtr,
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(dst.ptr.offset(i as isize * dst.rs), 0, n);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        1,
        dst.rs,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        beta,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// Configure the C allocator (glibc) for training workloads; idempotent, call it before the
/// first parallel op (worker threads pick their malloc arena on their first allocation).
///
/// Every op output is a fresh `Vec`, and most are 0.5-34 MB. With glibc's defaults those sizes
/// go to `mmap` or to the top of the heap, and are returned to the kernel when freed, so every
/// step faults all its activation and gradient pages in again (~30k page faults per moe_small
/// step, with TLB-shootdown IPIs when a zero page is read before it is written). This keeps freed
/// memory in the process instead: no mmap for large blocks (`M_MMAP_MAX = 0`), no trimming
/// (`M_TRIM_THRESHOLD`), and one arena (`M_ARENA_MAX = 1`) so buffers freed by any thread serve
/// the next step's allocations on any other. The cost is that the resident size stays at the
/// step's peak. Returns whether the settings were applied (false off glibc, or when
/// `FLEXRUN_DEFAULT_MALLOC` is set to keep glibc's defaults).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::sync::OnceLock;
        static DONE: OnceLock<bool> = OnceLock::new();
        *DONE.get_or_init(|| {
            extern "C" {
                fn mallopt(param: i32, value: i32) -> i32;
            }
            const M_TRIM_THRESHOLD: i32 = -1;
            const M_MMAP_MAX: i32 = -4;
            const M_ARENA_MAX: i32 = -8;
            if std::env::var_os("FLEXRUN_DEFAULT_MALLOC").is_some() {
                return false;
            }
            // SAFETY: mallopt only changes allocator parameters; these are valid values.
            unsafe {
                mallopt(M_ARENA_MAX, 1) == 1
                    && mallopt(M_MMAP_MAX, 0) == 1
                    && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1
            }
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// A fresh `Vec<f32>` of length `n` initialised by `fill`, without a zero-fill pass first.
///
/// Op outputs are usually written in full by their kernel, and with the allocator keeping freed
/// buffers (see [`tune_allocator`]) `vec![0.0; n]` costs a memset of every output: ~6% of a
/// moe_small step. `fill` gets the uninitialised slots (use [`simd::Out`] kernels or
/// `MaybeUninit::write`).
///
/// # Safety
/// `fill` must initialise every element of the slice it is given.
pub unsafe fn alloc_init(
    n: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the caller guarantees that `fill` initialised all `n` elements.
    v.set_len(n);
    v
}

/// Dot product (AVX-512 when available; a fixed reduction order either way).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    simd::dot(a, b)
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
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 65),
            (64, 48, 129),
            (300, 4, 256),
            (70, 16, 9),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.2)
                .collect();
            for at in [false, true] {
                for bt in [false, true] {
                    let mut c = vec![1.0; m * n];
                    matmul(m, n, k, &a, at, &b, bt, &mut c, false);
                    let r = naive(m, n, k, &a, at, &b, bt);
                    for (x, y) in c.iter().zip(&r) {
                        assert!(
                            (x - y).abs() < 1e-4,
                            "{m}x{n}x{k} at={at} bt={bt}: {x} vs {y}"
                        );
                    }
                    let mut c2 = r.clone();
                    matmul(m, n, k, &a, at, &b, bt, &mut c2, true);
                    for (x, y) in c2.iter().zip(&r) {
                        assert!((x - 2.0 * y).abs() < 1e-4);
                    }
                    let c3 = matmul_new(m, n, k, &a, at, &b, bt);
                    assert_eq!(c3, c, "matmul_new equals matmul into zeros");
                }
            }
        }
    }

    #[test]
    fn parallel_reductions_are_exact_enough_and_deterministic() {
        let x: Vec<f32> = (0..100_003)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
            .collect();
        let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        let got = sq_norm(&x);
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| sq_norm(&x));
        assert_eq!(got, one);
        let mut d = x.clone();
        add_assign(&mut d, &x);
        assert!(d.iter().zip(&x).all(|(a, b)| *a == 2.0 * b));
        assert_eq!(matmul_new(3, 2, 0, &[], false, &[], false), vec![0.0; 6]);
    }

    #[test]
    fn row_split_gemm_is_thread_count_invariant() {
        use crate::tensor::Tensor;
        use rand::{rngs::StdRng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(9);
        for &(m, n, k, at, bt) in &[
            (600, 96, 300, false, true),
            (300, 200, 700, true, false),
            (260, 130, 90, false, false),
        ] {
            let a = Tensor::randn(&[m * k], 1.0, &mut rng);
            let b = Tensor::randn(&[k * n], 1.0, &mut rng);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| matmul_new(m, n, k, a.data(), at, b.data(), bt))
            };
            let one = run(1);
            for threads in [2, 3, 4] {
                assert!(
                    run(threads) == one,
                    "{m}x{n}x{k} at={at} bt={bt}: {threads} threads differ from 1"
                );
            }
            let want = naive(m, n, k, a.data(), at, b.data(), bt);
            for (x, y) in one.iter().zip(&want) {
                assert!((x - y).abs() < 1e-3, "{x} vs {y}");
            }
        }
    }
}
