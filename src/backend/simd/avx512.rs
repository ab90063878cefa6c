//! The AVX-512 bodies of the kernels in `simd` (16 lanes, masked tails), chosen at run time
//! when the CPU has AVX-512F; the portable bodies in mod.rs compute the same polynomial.

use super::*;

#[inline(always)]
pub unsafe fn exp16(x: __m512) -> __m512 {
    // max/min return the second operand when one is NaN: NaN propagates, -inf clamps.
    let x = _mm512_max_ps(_mm512_set1_ps(EXP_LO), x);
    let x = _mm512_min_ps(_mm512_set1_ps(EXP_HI), x);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P5));
    let y = _mm512_fmadd_ps(
        p,
        _mm512_mul_ps(r, r),
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(y, n)
}

#[inline(always)]
fn tail_mask(rem: usize) -> __mmask16 {
    ((1u32 << rem) - 1) as __mmask16
}

#[target_feature(enable = "avx512f")]
pub unsafe fn exp_slice(x: &mut [f32]) {
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i + 16 <= n {
        _mm512_storeu_ps(p.add(i), exp16(_mm512_loadu_ps(p.add(i))));
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        _mm512_mask_storeu_ps(p.add(i), m, exp16(_mm512_maskz_loadu_ps(m, p.add(i))));
    }
}

#[target_feature(enable = "avx512f")]
pub unsafe fn max(x: &[f32]) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i + 16 <= n {
        acc = _mm512_max_ps(acc, _mm512_loadu_ps(p.add(i)));
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        acc = _mm512_mask_max_ps(acc, m, acc, _mm512_maskz_loadu_ps(m, p.add(i)));
    }
    _mm512_reduce_max_ps(acc)
}

#[target_feature(enable = "avx512f")]
pub unsafe fn exp_affine_inplace_sum(x: &mut [f32], mul: f32, sub: f32) -> f32 {
    let n = x.len();
    let p = x.as_mut_ptr();
    let (vm, vs) = (_mm512_set1_ps(mul), _mm512_set1_ps(sub));
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        let e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(p.add(i)), vm, vs));
        _mm512_storeu_ps(p.add(i), e);
        acc = _mm512_add_ps(acc, e);
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        let e = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), vm, vs));
        _mm512_mask_storeu_ps(p.add(i), m, e);
        acc = _mm512_mask_add_ps(acc, m, acc, e);
    }
    _mm512_reduce_add_ps(acc)
}

#[target_feature(enable = "avx512f")]
pub unsafe fn exp_sub_sum(x: &[f32], sub: f32) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    let vs = _mm512_set1_ps(sub);
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        a0 = _mm512_add_ps(a0, exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vs)));
        a1 = _mm512_add_ps(a1, exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i + 16)), vs)));
        i += 32;
    }
    while i + 16 <= n {
        a0 = _mm512_add_ps(a0, exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vs)));
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), vs));
        a1 = _mm512_mask_add_ps(a1, m, a1, e);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
}

#[target_feature(enable = "avx512f")]
pub unsafe fn exp_sub_scale_into(d: *mut f32, x: &[f32], sub: f32, f: f32) {
    let n = x.len();
    let p = x.as_ptr();
    let (vs, vf) = (_mm512_set1_ps(sub), _mm512_set1_ps(f));
    let mut i = 0;
    while i + 16 <= n {
        let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vs));
        _mm512_storeu_ps(d.add(i), _mm512_mul_ps(e, vf));
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), vs));
        _mm512_mask_storeu_ps(d.add(i), m, _mm512_mul_ps(e, vf));
    }
}

/// sigmoid(g) = 1 / (1 + exp(-g)), with an exact division.
#[inline(always)]
unsafe fn sigmoid16(g: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_div_ps(one, _mm512_add_ps(one, e))
}

#[target_feature(enable = "avx512f")]
pub unsafe fn swiglu_fwd(yp: *mut f32, g: &[f32], u: &[f32]) {
    let n = g.len();
    let (gp, up) = (g.as_ptr(), u.as_ptr());
    let mut i = 0;
    while i + 16 <= n {
        let gv = _mm512_loadu_ps(gp.add(i));
        let s = sigmoid16(gv);
        _mm512_storeu_ps(
            yp.add(i),
            _mm512_mul_ps(_mm512_mul_ps(gv, s), _mm512_loadu_ps(up.add(i))),
        );
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        let gv = _mm512_maskz_loadu_ps(m, gp.add(i));
        let s = sigmoid16(gv);
        let r = _mm512_mul_ps(_mm512_mul_ps(gv, s), _mm512_maskz_loadu_ps(m, up.add(i)));
        _mm512_mask_storeu_ps(yp.add(i), m, r);
    }
}

#[inline(always)]
unsafe fn swiglu_bwd16(gv: __m512, uv: __m512, gy: __m512) -> (__m512, __m512) {
    let one = _mm512_set1_ps(1.0);
    let s = sigmoid16(gv);
    let xs = _mm512_mul_ps(gv, s);
    // dg = gy * u * s * (1 + x (1 - s)), du = gy * x * s
    let t = _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one);
    let dg = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(gy, uv), s), t);
    (dg, _mm512_mul_ps(gy, xs))
}

#[target_feature(enable = "avx512f")]
pub unsafe fn swiglu_bwd(dgp: *mut f32, dup: *mut f32, g: &[f32], u: &[f32], gy: &[f32]) {
    let n = g.len();
    let (gp, up, yp) = (g.as_ptr(), u.as_ptr(), gy.as_ptr());
    let mut i = 0;
    while i + 16 <= n {
        let (a, b) = swiglu_bwd16(
            _mm512_loadu_ps(gp.add(i)),
            _mm512_loadu_ps(up.add(i)),
            _mm512_loadu_ps(yp.add(i)),
        );
        _mm512_storeu_ps(dgp.add(i), a);
        _mm512_storeu_ps(dup.add(i), b);
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        let (a, b) = swiglu_bwd16(
            _mm512_maskz_loadu_ps(m, gp.add(i)),
            _mm512_maskz_loadu_ps(m, up.add(i)),
            _mm512_maskz_loadu_ps(m, yp.add(i)),
        );
        _mm512_mask_storeu_ps(dgp.add(i), m, a);
        _mm512_mask_storeu_ps(dup.add(i), m, b);
    }
}

#[target_feature(enable = "avx512f")]
pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(ap.add(i)), _mm512_loadu_ps(bp.add(i)), a0);
        a1 = _mm512_fmadd_ps(
            _mm512_loadu_ps(ap.add(i + 16)),
            _mm512_loadu_ps(bp.add(i + 16)),
            a1,
        );
        i += 32;
    }
    while i + 16 <= n {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(ap.add(i)), _mm512_loadu_ps(bp.add(i)), a0);
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        a1 = _mm512_fmadd_ps(
            _mm512_maskz_loadu_ps(m, ap.add(i)),
            _mm512_maskz_loadu_ps(m, bp.add(i)),
            a1,
        );
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
}

/// `y = a + alpha * b`
#[target_feature(enable = "avx512f")]
pub unsafe fn add_scaled_into(yp: *mut f32, a: &[f32], b: &[f32], alpha: f32) {
    let n = a.len();
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let va = _mm512_set1_ps(alpha);
    let mut i = 0;
    while i + 16 <= n {
        _mm512_storeu_ps(
            yp.add(i),
            _mm512_fmadd_ps(_mm512_loadu_ps(bp.add(i)), va, _mm512_loadu_ps(ap.add(i))),
        );
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        let r = _mm512_fmadd_ps(
            _mm512_maskz_loadu_ps(m, bp.add(i)),
            va,
            _mm512_maskz_loadu_ps(m, ap.add(i)),
        );
        _mm512_mask_storeu_ps(yp.add(i), m, r);
    }
}

/// `sum_i a[i] * b[i] * c[i]`
#[target_feature(enable = "avx512f")]
pub unsafe fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let n = a.len();
    let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_ptr());
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        let ab = _mm512_mul_ps(_mm512_loadu_ps(ap.add(i)), _mm512_loadu_ps(bp.add(i)));
        a0 = _mm512_fmadd_ps(ab, _mm512_loadu_ps(cp.add(i)), a0);
        let ab = _mm512_mul_ps(
            _mm512_loadu_ps(ap.add(i + 16)),
            _mm512_loadu_ps(bp.add(i + 16)),
        );
        a1 = _mm512_fmadd_ps(ab, _mm512_loadu_ps(cp.add(i + 16)), a1);
        i += 32;
    }
    while i + 16 <= n {
        let ab = _mm512_mul_ps(_mm512_loadu_ps(ap.add(i)), _mm512_loadu_ps(bp.add(i)));
        a0 = _mm512_fmadd_ps(ab, _mm512_loadu_ps(cp.add(i)), a0);
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        let ab = _mm512_mul_ps(
            _mm512_maskz_loadu_ps(m, ap.add(i)),
            _mm512_maskz_loadu_ps(m, bp.add(i)),
        );
        a1 = _mm512_fmadd_ps(ab, _mm512_maskz_loadu_ps(m, cp.add(i)), a1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
}

/// `y = w * (x * r)`
#[target_feature(enable = "avx512f")]
pub unsafe fn rms_scale(yp: *mut f32, w: &[f32], x: &[f32], r: f32) {
    let n = x.len();
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let vr = _mm512_set1_ps(r);
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_mul_ps(
            _mm512_loadu_ps(wp.add(i)),
            _mm512_mul_ps(_mm512_loadu_ps(xp.add(i)), vr),
        );
        _mm512_storeu_ps(yp.add(i), v);
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        let v = _mm512_mul_ps(
            _mm512_maskz_loadu_ps(m, wp.add(i)),
            _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xp.add(i)), vr),
        );
        _mm512_mask_storeu_ps(yp.add(i), m, v);
    }
}

/// `dx = r * (w * g - x * c)`
#[target_feature(enable = "avx512f")]
pub unsafe fn rms_dx(dxp: *mut f32, w: &[f32], g: &[f32], x: &[f32], r: f32, c: f32) {
    let n = x.len();
    let (wp, gp, xp) = (w.as_ptr(), g.as_ptr(), x.as_ptr());
    let (vr, vc) = (_mm512_set1_ps(r), _mm512_set1_ps(c));
    let mut i = 0;
    while i + 16 <= n {
        let wg = _mm512_mul_ps(_mm512_loadu_ps(wp.add(i)), _mm512_loadu_ps(gp.add(i)));
        let v = _mm512_mul_ps(vr, _mm512_fnmadd_ps(_mm512_loadu_ps(xp.add(i)), vc, wg));
        _mm512_storeu_ps(dxp.add(i), v);
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        let wg = _mm512_mul_ps(
            _mm512_maskz_loadu_ps(m, wp.add(i)),
            _mm512_maskz_loadu_ps(m, gp.add(i)),
        );
        let v = _mm512_mul_ps(
            vr,
            _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(m, xp.add(i)), vc, wg),
        );
        _mm512_mask_storeu_ps(dxp.add(i), m, v);
    }
}

/// `acc += a * b * r`
#[target_feature(enable = "avx512f")]
pub unsafe fn acc_mul(acc: &mut [f32], a: &[f32], b: &[f32], r: f32) {
    let n = acc.len();
    let (pp, ap, bp) = (acc.as_mut_ptr(), a.as_ptr(), b.as_ptr());
    let vr = _mm512_set1_ps(r);
    let mut i = 0;
    while i + 16 <= n {
        let ab = _mm512_mul_ps(
            _mm512_mul_ps(_mm512_loadu_ps(ap.add(i)), _mm512_loadu_ps(bp.add(i))),
            vr,
        );
        _mm512_storeu_ps(pp.add(i), _mm512_add_ps(_mm512_loadu_ps(pp.add(i)), ab));
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        let ab = _mm512_mul_ps(
            _mm512_mul_ps(
                _mm512_maskz_loadu_ps(m, ap.add(i)),
                _mm512_maskz_loadu_ps(m, bp.add(i)),
            ),
            vr,
        );
        _mm512_mask_storeu_ps(
            pp.add(i),
            m,
            _mm512_add_ps(_mm512_maskz_loadu_ps(m, pp.add(i)), ab),
        );
    }
}

/// `p[i] = p[i] * (dp[i] - d) * scale`, in place on `dp`.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_grad_inplace(dp: &mut [f32], p: &[f32], d: f32, scale: f32) {
    let n = dp.len();
    let (dpp, pp) = (dp.as_mut_ptr(), p.as_ptr());
    let (vd, vsc) = (_mm512_set1_ps(d), _mm512_set1_ps(scale));
    let mut i = 0;
    while i + 16 <= n {
        let t = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(dpp.add(i)), vd), vsc);
        _mm512_storeu_ps(dpp.add(i), _mm512_mul_ps(_mm512_loadu_ps(pp.add(i)), t));
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        let t = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, dpp.add(i)), vd), vsc);
        _mm512_mask_storeu_ps(
            dpp.add(i),
            m,
            _mm512_mul_ps(_mm512_maskz_loadu_ps(m, pp.add(i)), t),
        );
    }
}
