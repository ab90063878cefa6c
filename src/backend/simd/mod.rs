//! Vector kernels for the CPU backend: a fast, branch-free `exp` and the row loops built on it
//! (softmax pieces, SwiGLU), plus dot products and fused elementwise updates.
//!
//! Every public function dispatches at run time: an AVX-512 body (`std::arch` intrinsics, 16
//! lanes, masked tails) when the CPU has AVX-512F, else a portable body that uses the same
//! polynomial and range reduction. Both are deterministic (fixed lane assignment and reduction
//! order for a given length), so results do not depend on threads, only on the instruction set.
//!
//! `exp` accuracy: `x` is split as `n ln2 + r` with `n = round(x log2 e)` (two-constant Cody-Waite
//! reduction, `|r| <= ln2/2`), `e^r` is the degree-6 Cephes `expf` polynomial, and the result is
//! scaled by `2^n` (`vscalefps` on AVX-512, exponent arithmetic in the portable body). Measured
//! max relative error vs f64 `exp` over `[-87, 88]` (2M points): 0.99 x 2^-23 on AVX-512,
//! 0.67 x 2^-23 portable (the test bounds it at 2). Inputs below
//! [`EXP_LO`] return 0 (the true value is under the smallest f32 denormal) and `-inf` returns 0;
//! `+inf` and overflow return `+inf`; NaN propagates.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Below this, `exp(x)` is under half the smallest positive f32 denormal: the result is 0.
pub const EXP_LO: f32 = -104.0;
/// Above this, `exp(x)` overflows f32: the result is +inf.
const EXP_HI: f32 = 88.8;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `n * LN2_HI` is exact for |n| < 2^9 (Cephes constants).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes `expf` minimax coefficients: `e^r ~ 1 + r + r^2 (P0 r^5 + ... + P5)`.
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5; // Cephes 5.0000001201e-1 rounds to 0.5 in f32

/// True when the AVX-512 bodies can run (checked once, then a relaxed atomic load). Setting
/// `FLEXRUN_NO_AVX512` forces the portable bodies (to test them on an AVX-512 machine).
#[inline]
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicU8, Ordering};
        static STATE: AtomicU8 = AtomicU8::new(0);
        match STATE.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let yes = std::is_x86_feature_detected!("avx512f")
                    && std::env::var_os("FLEXRUN_NO_AVX512").is_none();
                STATE.store(if yes { 1 } else { 2 }, Ordering::Relaxed);
                yes
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A destination of the row kernels: initialised f32 or uninitialised slots (for fresh op
/// outputs, so that they need no zero-fill pass). Kernels write every element they are given.
pub trait Out {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn out_ptr(&mut self) -> *mut f32;
}

impl Out for [f32] {
    #[inline]
    fn len(&self) -> usize {
        <[f32]>::len(self)
    }
    #[inline]
    fn out_ptr(&mut self) -> *mut f32 {
        self.as_mut_ptr()
    }
}

impl Out for [std::mem::MaybeUninit<f32>] {
    #[inline]
    fn len(&self) -> usize {
        <[std::mem::MaybeUninit<f32>]>::len(self)
    }
    #[inline]
    fn out_ptr(&mut self) -> *mut f32 {
        self.as_mut_ptr().cast()
    }
}

/// Scalar fast `exp` (portable body; the AVX-512 body agrees to within 1 ulp).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let xc = x.clamp(EXP_LO, EXP_HI);
    // Round to nearest with the 1.5 * 2^23 trick (exact for |v| < 2^22), vectorisable.
    const MAGIC: f32 = 12_582_912.0;
    let n = (xc * LOG2E + MAGIC) - MAGIC;
    let r = xc - n * LN2_HI;
    let r = r - n * LN2_LO;
    let mut p = P0;
    p = p * r + P1;
    p = p * r + P2;
    p = p * r + P3;
    p = p * r + P4;
    p = p * r + P5;
    let y = p * (r * r) + r + 1.0;
    // 2^n in two steps so that n down to -150 yields denormals and n = 128 yields inf.
    let ni = n as i32;
    let n1 = ni / 2;
    let n2 = ni - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    y * s1 * s2
}

#[cfg(target_arch = "x86_64")]
mod avx512;

macro_rules! dispatch {
    ($avx:expr, $portable:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx512() {
                // SAFETY: the CPU supports AVX-512F (checked at run time); the bodies only access
                // memory inside the slices they are given, whose lengths the callers checked.
                #[allow(unused_unsafe)]
                return unsafe { $avx };
            }
        }
        $portable
    }};
}

/// `x[i] = exp(x[i])`.
pub fn exp_inplace(x: &mut [f32]) {
    dispatch!(
        avx512::exp_slice(x),
        x.iter_mut().for_each(|v| *v = exp(*v))
    )
}

/// Maximum of `x` (`-inf` when empty; NaN entries are skipped on AVX-512 and by `f32::max`).
pub fn max(x: &[f32]) -> f32 {
    dispatch!(
        avx512::max(x),
        x.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
    )
}

/// `x[i] = exp(x[i] * mul - sub)`; returns the sum of the new values.
pub fn exp_affine_inplace_sum(x: &mut [f32], mul: f32, sub: f32) -> f32 {
    dispatch!(avx512::exp_affine_inplace_sum(x, mul, sub), {
        let mut acc = [0f32; 16];
        for (i, v) in x.iter_mut().enumerate() {
            *v = exp(*v * mul - sub);
            acc[i % 16] += *v;
        }
        acc.iter().sum()
    })
}

/// `sum_i exp(x[i] - sub)`.
pub fn exp_sub_sum(x: &[f32], sub: f32) -> f32 {
    dispatch!(avx512::exp_sub_sum(x, sub), {
        let mut acc = [0f32; 16];
        for (i, v) in x.iter().enumerate() {
            acc[i % 16] += exp(*v - sub);
        }
        acc.iter().sum()
    })
}

/// `dst[i] = f * exp(x[i] - sub)`.
pub fn exp_sub_scale_into(dst: &mut (impl Out + ?Sized), x: &[f32], sub: f32, f: f32) {
    assert_eq!(dst.len(), x.len());
    let d = dst.out_ptr();
    dispatch!(avx512::exp_sub_scale_into(d, x, sub, f), {
        for (i, v) in x.iter().enumerate() {
            // SAFETY: i < dst.len().
            unsafe { d.add(i).write(exp(*v - sub) * f) };
        }
    })
}

/// `log(sum_i exp(x[i]))`, computed as `m + ln(sum exp(x - m))` with `m = max(x)`.
pub fn logsumexp(x: &[f32]) -> f32 {
    let m = max(x);
    if m == f32::NEG_INFINITY || m.is_nan() {
        return m;
    }
    m + exp_sub_sum(x, m).ln()
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `y = silu(g) * u = g * sigmoid(g) * u`.
pub fn swiglu_fwd(y: &mut (impl Out + ?Sized), g: &[f32], u: &[f32]) {
    assert!(g.len() == y.len() && u.len() == y.len());
    let yp = y.out_ptr();
    dispatch!(avx512::swiglu_fwd(yp, g, u), {
        for i in 0..g.len() {
            // SAFETY: i < y.len().
            unsafe { yp.add(i).write(g[i] * sigmoid(g[i]) * u[i]) };
        }
    })
}

/// Gradients of [`swiglu_fwd`]: `dg = gy u s (1 + g (1 - s))`, `du = gy g s`, `s = sigmoid(g)`.
pub fn swiglu_bwd(
    dg: &mut (impl Out + ?Sized),
    du: &mut (impl Out + ?Sized),
    g: &[f32],
    u: &[f32],
    gy: &[f32],
) {
    let n = dg.len();
    assert!(du.len() == n && g.len() == n && u.len() == n && gy.len() == n);
    let (dgp, dup) = (dg.out_ptr(), du.out_ptr());
    dispatch!(avx512::swiglu_bwd(dgp, dup, g, u, gy), {
        for i in 0..n {
            let (x, uu, y) = (g[i], u[i], gy[i]);
            let s = sigmoid(x);
            // SAFETY: i < n = dg.len() = du.len().
            unsafe {
                dgp.add(i).write(y * uu * s * (1.0 + x * (1.0 - s)));
                dup.add(i).write(y * x * s);
            }
        }
    })
}

/// Dot product (16 lanes x 2 accumulators on AVX-512, 8 accumulators otherwise).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    dispatch!(avx512::dot(a, b), {
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
    })
}

/// `y = a + alpha * b`.
pub fn add_scaled_into(y: &mut (impl Out + ?Sized), a: &[f32], b: &[f32], alpha: f32) {
    assert!(a.len() == y.len() && b.len() == y.len());
    let yp = y.out_ptr();
    dispatch!(avx512::add_scaled_into(yp, a, b, alpha), {
        for i in 0..a.len() {
            // SAFETY: i < y.len().
            unsafe { yp.add(i).write(a[i] + alpha * b[i]) };
        }
    })
}

/// `sum_i a[i] * b[i] * c[i]`.
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    assert!(a.len() == b.len() && a.len() == c.len());
    dispatch!(avx512::dot3(a, b, c), {
        let mut acc = [0f32; 16];
        for (i, ((x, y), z)) in a.iter().zip(b).zip(c).enumerate() {
            acc[i % 16] += x * y * z;
        }
        acc.iter().sum()
    })
}

/// RMSNorm row forward: `y = w * (x * r)`.
pub fn rms_scale(y: &mut (impl Out + ?Sized), w: &[f32], x: &[f32], r: f32) {
    assert!(w.len() == x.len() && y.len() == x.len());
    let yp = y.out_ptr();
    dispatch!(avx512::rms_scale(yp, w, x, r), {
        for i in 0..x.len() {
            // SAFETY: i < y.len().
            unsafe { yp.add(i).write(w[i] * (x[i] * r)) };
        }
    })
}

/// RMSNorm row backward: `dx = r * (w * g - x * c)`.
pub fn rms_dx(dx: &mut (impl Out + ?Sized), w: &[f32], g: &[f32], x: &[f32], r: f32, c: f32) {
    assert!(w.len() == x.len() && g.len() == x.len() && dx.len() == x.len());
    let dp = dx.out_ptr();
    dispatch!(avx512::rms_dx(dp, w, g, x, r, c), {
        for i in 0..x.len() {
            // SAFETY: i < dx.len().
            unsafe { dp.add(i).write(r * (w[i] * g[i] - x[i] * c)) };
        }
    })
}

/// `acc[i] += a[i] * b[i] * r`.
pub fn acc_mul(acc: &mut [f32], a: &[f32], b: &[f32], r: f32) {
    assert!(a.len() == acc.len() && b.len() == acc.len());
    dispatch!(avx512::acc_mul(acc, a, b, r), {
        for i in 0..acc.len() {
            acc[i] += a[i] * b[i] * r;
        }
    })
}

/// Softmax backward on one row, in place: `dp[i] = p[i] * (dp[i] - d) * scale`.
pub fn softmax_grad_inplace(dp: &mut [f32], p: &[f32], d: f32, scale: f32) {
    assert_eq!(dp.len(), p.len());
    dispatch!(avx512::softmax_grad_inplace(dp, p, d, scale), {
        for (x, pi) in dp.iter_mut().zip(p) {
            *x = pi * ((*x - d) * scale);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulp_err(got: f32, x: f32) -> f64 {
        let want = (x as f64).exp();
        ((got as f64 - want) / want).abs() / f32::EPSILON as f64
    }

    #[test]
    fn fast_exp_relative_error_is_a_few_ulp() {
        // Dense sweep over the normal output range, both bodies.
        let xs: Vec<f32> = (0..2_000_001)
            .map(|i| -87.0 + 175.0 * i as f32 / 2_000_000.0)
            .collect();
        let mut v = xs.clone();
        exp_inplace(&mut v);
        let (mut worst_v, mut worst_s) = (0f64, 0f64);
        for (&x, &y) in xs.iter().zip(&v) {
            worst_v = worst_v.max(ulp_err(y, x));
            worst_s = worst_s.max(ulp_err(exp(x), x));
        }
        eprintln!("fast exp max error over [-87, 88]: dispatched {worst_v:.2} ulp, portable {worst_s:.2} ulp");
        assert!(worst_v < 2.0, "dispatched exp: {worst_v} ulp");
        assert!(worst_s < 3.0, "portable exp: {worst_s} ulp");
        // Small |x| (where exp ~ 1 + x) and every exponent boundary region.
        for i in -2000..=2000 {
            let x = i as f32 * 1e-4;
            let mut one = [x];
            exp_inplace(&mut one);
            assert!(
                ulp_err(one[0], x) < 2.0 && ulp_err(exp(x), x) < 3.0,
                "x = {x}"
            );
        }
    }

    #[test]
    fn fast_exp_special_values() {
        let xs = [
            f32::NEG_INFINITY,
            -1e30,
            -200.0,
            -104.5,
            0.0,
            -0.0,
            89.0,
            1e30,
            f32::INFINITY,
        ];
        let want = [
            0.0,
            0.0,
            0.0,
            0.0,
            1.0,
            1.0,
            f32::INFINITY,
            f32::INFINITY,
            f32::INFINITY,
        ];
        let mut v = xs.to_vec();
        exp_inplace(&mut v);
        for ((&x, &got), &w) in xs.iter().zip(&v).zip(&want) {
            assert_eq!(got, w, "vector exp({x})");
            assert_eq!(exp(x), w, "scalar exp({x})");
        }
        let mut nan = [f32::NAN; 3];
        exp_inplace(&mut nan);
        assert!(nan.iter().all(|x| x.is_nan()) && exp(f32::NAN).is_nan());
        // Denormal results stay close to the truth (absolute error below the denormal step).
        for x in [-88.0f32, -95.0, -100.0, -103.0] {
            let mut v = [x];
            exp_inplace(&mut v);
            let want = (x as f64).exp();
            assert!(
                (v[0] as f64 - want).abs() <= 1.5e-45,
                "exp({x}) = {} vs {want}",
                v[0]
            );
            assert!(
                (exp(x) as f64 - want).abs() <= 1.5e-45,
                "scalar exp({x}) = {} vs {want}",
                exp(x)
            );
        }
    }

    #[test]
    fn row_kernels_match_scalar_formulas_at_ragged_lengths() {
        for n in [0usize, 1, 5, 15, 16, 17, 31, 33, 100, 257] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
                .collect();
            let y: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.21).collect();
            let m = max(&x);
            let want_max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(m, want_max);
            let want_sum: f64 = x.iter().map(|&v| ((v - 1.5) as f64).exp()).sum();
            assert!((exp_sub_sum(&x, 1.5) as f64 - want_sum).abs() <= 1e-5 * want_sum.max(1.0));
            let mut z = x.clone();
            let s = exp_affine_inplace_sum(&mut z, 0.5, 0.25);
            let mut zs = 0f64;
            for (a, b) in z.iter().zip(&x) {
                let w = ((0.5 * b - 0.25) as f64).exp();
                zs += w;
                assert!((*a as f64 - w).abs() <= 2e-6 * w);
            }
            assert!((s as f64 - zs).abs() <= 1e-5 * zs.max(1.0));
            let mut d = vec![0f32; n];
            exp_sub_scale_into(&mut d[..], &x, 0.5, 3.0);
            for (a, b) in d.iter().zip(&x) {
                let w = 3.0 * ((b - 0.5) as f64).exp();
                assert!((*a as f64 - w).abs() <= 2e-6 * w);
            }
            let want_dot: f64 = x.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!((dot(&x, &y) as f64 - want_dot).abs() < 1e-4);
            let (mut yg, mut dg, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            swiglu_fwd(&mut yg[..], &x, &y);
            swiglu_bwd(&mut dg[..], &mut du[..], &x, &y, &y);
            for i in 0..n {
                let (g, u) = (x[i] as f64, y[i] as f64);
                let s = 1.0 / (1.0 + (-g).exp());
                assert!((yg[i] as f64 - g * s * u).abs() < 1e-6);
                assert!((dg[i] as f64 - u * u * s * (1.0 + g * (1.0 - s))).abs() < 1e-5);
                assert!((du[i] as f64 - u * g * s).abs() < 1e-5);
            }
            let mut a = vec![0f32; n];
            add_scaled_into(&mut a[..], &x, &y, -0.5);
            for i in 0..n {
                assert!((a[i] - (x[i] - 0.5 * y[i])).abs() < 1e-6);
            }
            let w: Vec<f32> = (0..n).map(|i| 1.0 + (i % 5) as f32 * 0.1).collect();
            let want3: f64 = (0..n)
                .map(|i| w[i] as f64 * x[i] as f64 * y[i] as f64)
                .sum();
            assert!((dot3(&w, &x, &y) as f64 - want3).abs() < 1e-4);
            let (mut ys, mut dx) = (vec![0f32; n], vec![0f32; n]);
            rms_scale(&mut ys[..], &w, &x, 0.7);
            rms_dx(&mut dx[..], &w, &y, &x, 0.7, 0.3);
            let mut acc = vec![1f32; n];
            acc_mul(&mut acc, &x, &y, 0.5);
            for i in 0..n {
                assert!((ys[i] - w[i] * x[i] * 0.7).abs() < 1e-6);
                assert!((dx[i] - 0.7 * (w[i] * y[i] - x[i] * 0.3)).abs() < 1e-5);
                assert!((acc[i] - (1.0 + x[i] * y[i] * 0.5)).abs() < 1e-5);
            }
        }
        assert_eq!(
            logsumexp(&[f32::NEG_INFINITY, f32::NEG_INFINITY]),
            f32::NEG_INFINITY
        );
        assert!((logsumexp(&[1000.0, 1000.0]) - (1000.0 + 2f32.ln())).abs() < 1e-3);
    }
}
