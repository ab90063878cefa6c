//! Causal scaled-dot-product attention with GQA, flash-style on the CPU.
//!
//! Layout: q `[B, Tq, nh, hd]`, k/v `[B, Tk_stride, nkv, hd]` (only the first Tk positions of each
//! sequence are read, so a preallocated KV cache works as-is), out `[B, Tq, nh, hd]`. Query `i`
//! sits at absolute position `Tk - Tq + i` and sees keys `0..=Tk - Tq + i`.
//!
//! Work happens on tiles of `Q_TILE` queries x `KEY_TILE` keys with GEMMs (the `gemm` crate's
//! AVX-512 kernels, single-threaded inside each task): no `T x T` matrix per head ever exists.
//! Forward, per (batch, head, query tile): `S = scale Q K^T` on the causal key range, an online
//! softmax across key tiles (running max and sum, fast vector `exp`), `O += P V`; it saves the
//! per-row logsumexp. Backward recomputes `P = exp(S - lse)` per tile, with `D_i = dO_i . O_i`,
//! one task per (batch, kv head) so that the dK/dV of a kv head are owned by one thread
//! (deterministic, no atomics): `dV += P^T dO`, `dP = dO V^T`, `dS = P (dP - D) scale`,
//! `dQ += dS K`, `dK += dS^T Q`. moe_small (B=8, T=256, 4 heads, hd=64): ~2 ms forward and
//! ~6.5 ms forward+backward per layer on 2 cores (~130-145 GFLOP/s of causal work).

use crate::autograd::{Backward, Tape, Var};
use crate::backend::cpu::{gemm_strided, simd, DstPtr, MatPtr};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Keys per tile of the online softmax: a 64 x 256 score tile (64 KiB) stays in L2, and a
/// training sequence of up to 256 tokens needs a single key tile (no rescaling passes).
const KEY_TILE: usize = 256;

pub use crate::backend::shapes::AttnShape;

/// Query rows per tile: the score tile `[Q_TILE, KEY_TILE]` and the GEMM operands stay in L2,
/// and 64 rows keep the GEMM microkernel's row blocks full.
const Q_TILE: usize = 64;

/// Per-thread scratch of the tiled kernels.
struct Scratch {
    s: Vec<f32>,
    dp: Vec<f32>,
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    /// Backward: this task's dK and dV, `[tk, hd]`, copied out once at the end.
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl Scratch {
    fn new(hd: usize) -> Self {
        Scratch {
            s: vec![0f32; Q_TILE * KEY_TILE],
            dp: vec![0f32; Q_TILE * KEY_TILE],
            o: vec![0f32; Q_TILE * hd],
            m: vec![0f32; Q_TILE],
            l: vec![0f32; Q_TILE],
            dk: Vec::new(),
            dv: Vec::new(),
        }
    }
}

/// Geometry of one query tile: rows `i0..i1` of a sequence, which see keys `0..kend`; row `i`
/// sees keys `0..=off + i`.
#[derive(Clone, Copy)]
struct QTile {
    i0: usize,
    rows: usize,
    off: usize,
    kend: usize,
}

impl QTile {
    fn new(s: &AttnShape, qt: usize) -> Self {
        let i0 = qt * Q_TILE;
        let i1 = (i0 + Q_TILE).min(s.tq);
        let off = s.tk - s.tq;
        QTile {
            i0,
            rows: i1 - i0,
            off,
            kend: off + i1,
        }
    }
    /// Keys of tile `j0..j0+kt` that row `r` sees: `0..lim` within the tile.
    fn visible(&self, r: usize, j0: usize, kt: usize) -> usize {
        (self.off + self.i0 + r + 1).saturating_sub(j0).min(kt)
    }
}

fn n_qtiles(s: &AttnShape) -> usize {
    s.tq.div_ceil(Q_TILE)
}

/// Forward without the tape: returns `(out [B*Tq, nh*hd], lse [B, nh, Tq])`.
///
/// One task per (batch, head, query tile). For each key tile: `S = scale * Q K^T` and
/// `O += P V` are GEMMs on the tile; the softmax between them is the online (running max/sum)
/// update, so only `[Q_TILE, KEY_TILE]` scores exist at a time.
pub fn attention_forward(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> (Vec<f32>, Vec<f32>) {
    // Every element of out and lse is written (tasks partition (b, h, query row)).
    let mut out: Vec<f32> = Vec::with_capacity(s.b * s.tq * s.q_width());
    let mut lse: Vec<f32> = Vec::with_capacity(s.b * s.nh * s.tq);
    // SAFETY: capacity for every element, each written below before set_len.
    unsafe {
        forward_to(q, k, v, s, out.as_mut_ptr(), lse.as_mut_ptr());
        out.set_len(s.b * s.tq * s.q_width());
        lse.set_len(s.b * s.nh * s.tq);
    }
    (out, lse)
}

/// [`attention_forward`] into `out [B*Tq, nh*hd]` and `lse [B, nh, Tq]`.
pub fn attention_forward_into(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    out: &mut [f32],
    lse: &mut [f32],
) {
    assert_eq!(
        out.len(),
        s.b * s.tq * s.q_width(),
        "attention: output size"
    );
    assert_eq!(lse.len(), s.b * s.nh * s.tq, "attention: lse size");
    // SAFETY: the sizes were checked.
    unsafe { forward_to(q, k, v, s, out.as_mut_ptr(), lse.as_mut_ptr()) }
}

/// The forward, writing every element of `out` and `lse` (sized as in
/// [`attention_forward_into`]).
unsafe fn forward_to(q: &[f32], k: &[f32], v: &[f32], s: AttnShape, out: *mut f32, lse: *mut f32) {
    s.check(q.len(), k.len(), v.len());
    let (hd, qw, kvw) = (s.hd, s.q_width() as isize, s.kv_width() as isize);
    let scale = 1.0 / (hd as f32).sqrt();
    let nqt = n_qtiles(&s);
    let out_p = DstPtr { ptr: out, rs: qw };
    let lse_p = DstPtr { ptr: lse, rs: 0 };
    (0..s.b * s.nh * nqt).into_par_iter().for_each_init(
        || Scratch::new(hd),
        |sc, task| {
            let (bh, qt) = (task / nqt, task % nqt);
            let (b, h) = (bh / s.nh, bh % s.nh);
            let kh = h / s.group();
            let t = QTile::new(&s, qt);
            let rows = t.rows;
            let qm = MatPtr {
                ptr: q[((b * s.tq + t.i0) * s.q_width() + h * hd)..].as_ptr(),
                rs: qw,
                cs: 1,
            };
            let kv0 = (b * s.tk_stride) * s.kv_width() + kh * hd;
            sc.m[..rows].fill(f32::NEG_INFINITY);
            sc.l[..rows].fill(0.0);
            let mut j0 = 0;
            while j0 < t.kend {
                let kt = (t.kend - j0).min(KEY_TILE);
                let kbase = kv0 + j0 * s.kv_width();
                let st = DstPtr {
                    ptr: sc.s.as_mut_ptr(),
                    rs: kt as isize,
                };
                // SAFETY: q/k tiles lie inside the checked q/k slices (rows < tq, keys < tk);
                // the score tile is this task's scratch.
                unsafe {
                    let kmat = MatPtr {
                        ptr: k[kbase..].as_ptr(),
                        rs: 1,
                        cs: kvw,
                    };
                    gemm_strided(rows, kt, hd, st, false, qm, kmat, scale);
                }
                for r in 0..rows {
                    let row = &mut sc.s[r * kt..(r + 1) * kt];
                    let lim = t.visible(r, j0, kt);
                    if lim == 0 {
                        row.fill(0.0);
                        continue;
                    }
                    let m_old = sc.m[r];
                    let m_new = m_old.max(simd::max(&row[..lim]));
                    if m_old != m_new && m_old != f32::NEG_INFINITY {
                        let corr = simd::exp(m_old - m_new);
                        sc.l[r] *= corr;
                        sc.o[r * hd..(r + 1) * hd]
                            .iter_mut()
                            .for_each(|x| *x *= corr);
                    }
                    sc.l[r] += simd::exp_affine_inplace_sum(&mut row[..lim], 1.0, m_new);
                    row[lim..].fill(0.0);
                    sc.m[r] = m_new;
                }
                // SAFETY: v tile inside the checked v slice; o is this task's scratch.
                unsafe {
                    let pm = MatPtr {
                        ptr: sc.s.as_ptr(),
                        rs: kt as isize,
                        cs: 1,
                    };
                    let vm = MatPtr {
                        ptr: v[kbase..].as_ptr(),
                        rs: kvw,
                        cs: 1,
                    };
                    let od = DstPtr {
                        ptr: sc.o.as_mut_ptr(),
                        rs: hd as isize,
                    };
                    gemm_strided(rows, hd, kt, od, j0 > 0, pm, vm, 1.0);
                }
                j0 += kt;
            }
            for r in 0..rows {
                let inv = 1.0 / sc.l[r];
                let i = t.i0 + r;
                // SAFETY: row (b, i), columns of head h, and lse entry (b, h, i) are written by
                // this task only (tasks partition (b, h, query tile)).
                unsafe {
                    let dst = out_p
                        .offset((b * s.tq + i) as isize * qw + (h * hd) as isize)
                        .ptr;
                    for d in 0..hd {
                        *dst.add(d) = sc.o[r * hd + d] * inv;
                    }
                    *lse_p.offset(((b * s.nh + h) * s.tq + i) as isize).ptr =
                        sc.m[r] + sc.l[r].ln();
                }
            }
        },
    );
}

/// Causal attention on the tape. q `[B*T, nh*hd]`, k/v `[B*T, nkv*hd]`.
pub fn attention(tape: &mut Tape, q: Var, k: Var, v: Var, s: AttnShape) -> Var {
    let (qv, kv, vv) = (tape.value(q), tape.value(k), tape.value(v));
    let (out, lse) = attention_forward(qv.data(), kv.data(), vv.data(), s);
    let out = Tensor::from_vec(out, &[s.b * s.tq, s.q_width()]);
    let op = AttnBack {
        q: qv.clone(),
        k: kv.clone(),
        v: vv.clone(),
        out: out.clone(),
        lse,
        s,
    };
    tape.push(out, &[q, k, v], op)
}

struct AttnBack {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Vec<f32>,
    s: AttnShape,
}

/// Gradients `(dq, dk, dv)` of attention, laid out like q, k, v (dk/dv zero past `tk`).
///
/// One task per (batch, kv head) owns the dK/dV rows of that head and the dQ columns of its
/// query heads, so every gradient element is accumulated by one thread in a fixed order.
/// Per query tile and key tile, with `P = exp(S - lse)` recomputed from the saved logsumexp:
/// `dV += P^T dO`, `dP = dO V^T`, `dS = P (dP - D) scale` with `D_i = dO_i . O_i`,
/// `dQ += dS K`, `dK += dS^T Q` -- five GEMMs on tiles.
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    go: &[f32],
    s: AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dq: Vec<f32> = Vec::with_capacity(q.len());
    let mut dk: Vec<f32> = Vec::with_capacity(k.len());
    let mut dv: Vec<f32> = Vec::with_capacity(v.len());
    // SAFETY: capacity for every element; the backward stores all of them (see backward_to).
    unsafe {
        backward_to(
            q,
            k,
            v,
            o,
            lse,
            go,
            s,
            [dq.as_mut_ptr(), dk.as_mut_ptr(), dv.as_mut_ptr()],
        );
        dq.set_len(q.len());
        dk.set_len(k.len());
        dv.set_len(v.len());
    }
    (dq, dk, dv)
}

/// [`attention_backward`] into `dq`, `dk`, `dv` (laid out like q, k, v).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_into(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    go: &[f32],
    s: AttnShape,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    assert!(
        dq.len() == q.len() && dk.len() == k.len() && dv.len() == v.len(),
        "attention backward: gradient sizes"
    );
    // SAFETY: the sizes were checked.
    unsafe {
        backward_to(
            q,
            k,
            v,
            o,
            lse,
            go,
            s,
            [dq.as_mut_ptr(), dk.as_mut_ptr(), dv.as_mut_ptr()],
        )
    }
}

/// The backward, storing every element of `d[0..3]` (dq, dk, dv; sized as q, k, v): dq by the
/// first key tile of its query tile (a non-accumulating GEMM), dk/dv copied out of each task's
/// accumulators or zeroed (cache slots past tk).
#[allow(clippy::too_many_arguments)]
unsafe fn backward_to(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    go: &[f32],
    s: AttnShape,
    d: [*mut f32; 3],
) {
    s.check(q.len(), k.len(), v.len());
    assert_eq!(o.len(), q.len(), "attention backward: out size");
    assert_eq!(go.len(), q.len(), "attention backward: grad size");
    assert_eq!(lse.len(), s.b * s.nh * s.tq, "attention backward: lse size");
    let (hd, qw, kvw, grp) = (s.hd, s.q_width() as isize, s.kv_width() as isize, s.group());
    let scale = 1.0 / (hd as f32).sqrt();
    let (dq_p, dk_p, dv_p) = (
        DstPtr { ptr: d[0], rs: qw },
        DstPtr { ptr: d[1], rs: kvw },
        DstPtr { ptr: d[2], rs: kvw },
    );
    let nqt = n_qtiles(&s);
    (0..s.b * s.nkv).into_par_iter().for_each_init(
        || Scratch::new(hd),
        |sc, bg| {
            let (b, kh) = (bg / s.nkv, bg % s.nkv);
            let kv0 = (b * s.tk_stride) * s.kv_width() + kh * hd;
            sc.dk.clear();
            sc.dk.resize(s.tk * hd, 0.0);
            sc.dv.clear();
            sc.dv.resize(s.tk * hd, 0.0);
            for hh in 0..grp {
                let h = kh * grp + hh;
                for qt in 0..nqt {
                    let t = QTile::new(&s, qt);
                    let rows = t.rows;
                    let q0 = (b * s.tq + t.i0) * s.q_width() + h * hd;
                    let qm = MatPtr {
                        ptr: q[q0..].as_ptr(),
                        rs: qw,
                        cs: 1,
                    };
                    let gm = MatPtr {
                        ptr: go[q0..].as_ptr(),
                        rs: qw,
                        cs: 1,
                    };
                    let lse_row = &lse[(b * s.nh + h) * s.tq + t.i0..][..rows];
                    for r in 0..rows {
                        let at = q0 + r * s.q_width();
                        sc.m[r] = simd::dot(&go[at..at + hd], &o[at..at + hd]);
                    }
                    let mut j0 = 0;
                    while j0 < t.kend {
                        let kt = (t.kend - j0).min(KEY_TILE);
                        let kbase = kv0 + j0 * s.kv_width();
                        let km = MatPtr {
                            ptr: k[kbase..].as_ptr(),
                            rs: kvw,
                            cs: 1,
                        };
                        let kmt = MatPtr {
                            ptr: km.ptr,
                            rs: 1,
                            cs: kvw,
                        };
                        let vmt = MatPtr {
                            ptr: v[kbase..].as_ptr(),
                            rs: 1,
                            cs: kvw,
                        };
                        let st = DstPtr {
                            ptr: sc.s.as_mut_ptr(),
                            rs: kt as isize,
                        };
                        let dpt = DstPtr {
                            ptr: sc.dp.as_mut_ptr(),
                            rs: kt as isize,
                        };
                        // SAFETY (all GEMMs below): operands are tiles inside the checked q, k,
                        // v, go slices; s/dp are this task's scratch; dq columns of head h and
                        // dk/dv rows of kv head kh in sequence b are written by this task only.
                        unsafe {
                            gemm_strided(rows, kt, hd, st, false, qm, kmt, scale);
                            gemm_strided(rows, kt, hd, dpt, false, gm, vmt, 1.0);
                        }
                        for (r, &lse_r) in lse_row.iter().enumerate() {
                            let lim = t.visible(r, j0, kt);
                            let (prow, dprow) = (
                                &mut sc.s[r * kt..(r + 1) * kt],
                                &mut sc.dp[r * kt..(r + 1) * kt],
                            );
                            simd::exp_affine_inplace_sum(&mut prow[..lim], 1.0, lse_r);
                            prow[lim..].fill(0.0);
                            simd::softmax_grad_inplace(dprow, prow, sc.m[r], scale);
                        }
                        let pt = MatPtr {
                            ptr: sc.s.as_ptr(),
                            rs: 1,
                            cs: kt as isize,
                        };
                        let ds = MatPtr {
                            ptr: sc.dp.as_ptr(),
                            rs: kt as isize,
                            cs: 1,
                        };
                        let dst_t = MatPtr {
                            ptr: sc.dp.as_ptr(),
                            rs: 1,
                            cs: kt as isize,
                        };
                        unsafe {
                            let dvd = DstPtr {
                                ptr: sc.dv.as_mut_ptr().add(j0 * hd),
                                rs: hd as isize,
                            };
                            gemm_strided(kt, hd, rows, dvd, true, pt, gm, 1.0);
                            // The first key tile stores dQ (no read of the fresh buffer).
                            let dqd = dq_p.offset(q0 as isize);
                            gemm_strided(rows, hd, kt, dqd, j0 > 0, ds, km, 1.0);
                            let dkd = DstPtr {
                                ptr: sc.dk.as_mut_ptr().add(j0 * hd),
                                rs: hd as isize,
                            };
                            gemm_strided(kt, hd, rows, dkd, true, dst_t, qm, 1.0);
                        }
                        j0 += kt;
                    }
                }
            }
            for j in 0..s.tk_stride {
                let at = kv0 as isize + (j * s.kv_width()) as isize;
                // SAFETY: rows (b, j) of kv head kh belong to this task only.
                unsafe {
                    if j < s.tk {
                        std::ptr::copy_nonoverlapping(
                            sc.dk.as_ptr().add(j * hd),
                            dk_p.offset(at).ptr,
                            hd,
                        );
                        std::ptr::copy_nonoverlapping(
                            sc.dv.as_ptr().add(j * hd),
                            dv_p.offset(at).ptr,
                            hd,
                        );
                    } else {
                        std::ptr::write_bytes(dk_p.offset(at).ptr, 0, hd);
                        std::ptr::write_bytes(dv_p.offset(at).ptr, 0, hd);
                    }
                }
            }
        },
    );
}

impl Backward for AttnBack {
    fn backward(&self, g: &Tensor, _needs: &[bool]) -> Vec<Option<Tensor>> {
        let (dq, dk, dv) = attention_backward(
            self.q.data(),
            self.k.data(),
            self.v.data(),
            self.out.data(),
            &self.lse,
            g.data(),
            self.s,
        );
        vec![
            Some(Tensor::from_vec(dq, self.q.shape())),
            Some(Tensor::from_vec(dk, self.k.shape())),
            Some(Tensor::from_vec(dv, self.v.shape())),
        ]
    }
}

/// Naive reference (materialises each score row): used by tests to check the tiled path.
pub fn attention_reference(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> Vec<f32> {
    let (hd, qw, kvw) = (s.hd, s.q_width(), s.kv_width());
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0f32; s.b * s.tq * qw];
    for b in 0..s.b {
        for h in 0..s.nh {
            let kh = h / s.group();
            for i in 0..s.tq {
                let last = s.tk - s.tq + i;
                let qi = &q[(b * s.tq + i) * qw + h * hd..][..hd];
                let sc: Vec<f64> = (0..=last)
                    .map(|j| {
                        let kj = &k[(b * s.tk_stride + j) * kvw + kh * hd..][..hd];
                        qi.iter()
                            .zip(kj)
                            .map(|(a, c)| *a as f64 * *c as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for (j, x) in sc.iter().enumerate() {
                    let p = (x - m).exp() / z;
                    let vj = &v[(b * s.tk_stride + j) * kvw + kh * hd..][..hd];
                    for d in 0..hd {
                        out[(b * s.tq + i) * qw + h * hd + d] += (p * vj[d] as f64) as f32;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    /// f64 reference gradients (materialises each probability row).
    fn backward_reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        go: &[f32],
        s: AttnShape,
    ) -> [Vec<f64>; 3] {
        let (hd, qw, kvw) = (s.hd, s.q_width(), s.kv_width());
        let scale = 1.0 / (hd as f64).sqrt();
        let (mut dq, mut dk, mut dv) = (
            vec![0f64; q.len()],
            vec![0f64; k.len()],
            vec![0f64; v.len()],
        );
        let f =
            |x: &[f32], a: usize| -> Vec<f64> { x[a..a + hd].iter().map(|&y| y as f64).collect() };
        for b in 0..s.b {
            for h in 0..s.nh {
                let kh = h / s.group();
                for i in 0..s.tq {
                    let qa = (b * s.tq + i) * qw + h * hd;
                    let (qi, gi) = (f(q, qa), f(go, qa));
                    let keys: Vec<usize> = (0..=s.tk - s.tq + i)
                        .map(|j| (b * s.tk_stride + j) * kvw + kh * hd)
                        .collect();
                    let sc: Vec<f64> = keys
                        .iter()
                        .map(|&ka| {
                            f(k, ka).iter().zip(&qi).map(|(a, b)| a * b).sum::<f64>() * scale
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                    let p: Vec<f64> = sc.iter().map(|x| (x - m).exp() / z).collect();
                    let dp: Vec<f64> = keys
                        .iter()
                        .map(|&ka| f(v, ka).iter().zip(&gi).map(|(a, b)| a * b).sum::<f64>())
                        .collect();
                    let dd: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    for (j, &ka) in keys.iter().enumerate() {
                        let ds = p[j] * (dp[j] - dd) * scale;
                        let kj = f(k, ka);
                        for d in 0..hd {
                            dv[ka + d] += p[j] * gi[d];
                            dq[qa + d] += ds * kj[d];
                            dk[ka + d] += ds * qi[d];
                        }
                    }
                }
            }
        }
        [dq, dk, dv]
    }

    const SHAPES: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
        (1, 1, 1, 1, 1, 1, 8),
        (2, 17, 17, 17, 4, 2, 16),
        (1, 3, 130, 140, 4, 1, 8),
        (2, 70, 70, 70, 2, 2, 12),
        (1, 130, 130, 130, 4, 2, 64),
        (1, 1, 17, 20, 2, 1, 16),
        (2, 70, 300, 300, 2, 1, 32),
        (1, 300, 300, 301, 2, 2, 16),
    ];

    /// A shape of SHAPES and random q, k, v for it.
    fn random_qkv(
        (b, tq, tk, stride, nh, nkv, hd): (usize, usize, usize, usize, usize, usize, usize),
        rng: &mut StdRng,
    ) -> (AttnShape, Tensor, Tensor, Tensor) {
        let s = AttnShape {
            b,
            tq,
            tk,
            tk_stride: stride,
            nh,
            nkv,
            hd,
        };
        let q = Tensor::randn(&[b * tq * nh * hd], 1.0, rng);
        let k = Tensor::randn(&[b * stride * nkv * hd], 1.0, rng);
        let v = Tensor::randn(&[b * stride * nkv * hd], 1.0, rng);
        (s, q, k, v)
    }

    #[test]
    fn tiled_forward_matches_reference_with_cache_stride() {
        let mut rng = StdRng::seed_from_u64(1);
        for &shape in SHAPES {
            let (s, q, k, v) = random_qkv(shape, &mut rng);
            let (o, lse) = attention_forward(q.data(), k.data(), v.data(), s);
            let r = attention_reference(q.data(), k.data(), v.data(), s);
            let err = o
                .iter()
                .zip(&r)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 2e-5, "{s:?}: max err {err}");
            assert!(lse.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn tiled_backward_matches_reference_at_ragged_shapes() {
        let mut rng = StdRng::seed_from_u64(2);
        for &shape in SHAPES {
            let (s, q, k, v) = random_qkv(shape, &mut rng);
            let (b, tq, tk, stride, nh, nkv, hd) = shape;
            let go = Tensor::randn(&[b * tq * nh * hd], 1.0, &mut rng);
            let (o, lse) = attention_forward(q.data(), k.data(), v.data(), s);
            let got = attention_backward(q.data(), k.data(), v.data(), &o, &lse, go.data(), s);
            let want = backward_reference(q.data(), k.data(), v.data(), go.data(), s);
            for (name, g, w) in [
                ("dq", &got.0, &want[0]),
                ("dk", &got.1, &want[1]),
                ("dv", &got.2, &want[2]),
            ] {
                let err = g
                    .iter()
                    .zip(w)
                    .map(|(a, b)| (*a as f64 - b).abs())
                    .fold(0f64, f64::max);
                let mag = w.iter().map(|x| x.abs()).fold(0f64, f64::max);
                assert!(
                    err <= 1e-4 * mag.max(1.0),
                    "{s:?} {name}: max err {err} (max |grad| {mag})"
                );
            }
            // Cache slots past tk receive exactly zero gradient.
            for bi in 0..b {
                let tail = &got.1[(bi * stride + tk) * nkv * hd..(bi + 1) * stride * nkv * hd];
                assert!(tail.iter().all(|&x| x == 0.0));
            }
        }
    }

    #[test]
    fn kernels_are_deterministic() {
        let mut rng = StdRng::seed_from_u64(3);
        let s = AttnShape::causal(3, 150, 4, 2, 16);
        let q = Tensor::randn(&[3 * 150 * 64], 1.0, &mut rng);
        let k = Tensor::randn(&[3 * 150 * 32], 1.0, &mut rng);
        let v = Tensor::randn(&[3 * 150 * 32], 1.0, &mut rng);
        let go = Tensor::randn(&[3 * 150 * 64], 1.0, &mut rng);
        let run = || {
            let (o, lse) = attention_forward(q.data(), k.data(), v.data(), s);
            let g = attention_backward(q.data(), k.data(), v.data(), &o, &lse, go.data(), s);
            (o, g)
        };
        let a = run();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        assert!(
            a.0 == one.0 && a.1 == one.1,
            "results depend on the thread count"
        );
    }
}
