//! Causal scaled-dot-product attention with GQA, flash-style on the CPU.
//!
//! Layout: q `[B, Tq, nh, hd]`, k/v `[B, Tk_stride, nkv, hd]` (only the first Tk positions of each
//! sequence are read, so a preallocated KV cache works as-is), out `[B, Tq, nh, hd]`. Query `i`
//! sits at absolute position `Tk - Tq + i` and sees keys `0..=Tk - Tq + i`.
//!
//! Forward streams key tiles with an online softmax (running max and sum), never materialising a
//! score matrix, and saves the per-row logsumexp. Backward recomputes probabilities from it
//! (`p = exp(s - lse)`), with `D_i = dO_i . O_i`, one task per (batch, kv head) so that the dK/dV
//! of a kv head are owned by one thread (deterministic, no atomics).

use crate::autograd::{Backward, Tape, Var};
use crate::backend::cpu::{axpy, dot};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Keys per tile of the online softmax: a tile's scores stay in L1.
const KEY_TILE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub b: usize,
    pub tq: usize,
    pub tk: usize,
    /// Positions allocated per sequence in k/v (>= tk).
    pub tk_stride: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
}

impl AttnShape {
    /// Training shape: queries and keys of the same `t` positions.
    pub fn causal(b: usize, t: usize, nh: usize, nkv: usize, hd: usize) -> Self {
        AttnShape { b, tq: t, tk: t, tk_stride: t, nh, nkv, hd }
    }
    fn q_width(&self) -> usize {
        self.nh * self.hd
    }
    fn kv_width(&self) -> usize {
        self.nkv * self.hd
    }
    fn group(&self) -> usize {
        self.nh / self.nkv
    }
    fn check(&self, q: usize, k: usize, v: usize) {
        assert!(self.nkv > 0 && self.nh % self.nkv == 0, "attention: kv heads must divide heads");
        assert!(self.tq <= self.tk && self.tk <= self.tk_stride, "attention: bad lengths {self:?}");
        assert_eq!(q, self.b * self.tq * self.q_width(), "attention: q size");
        assert_eq!(k, self.b * self.tk_stride * self.kv_width(), "attention: k size");
        assert_eq!(v, k, "attention: v size");
    }
}

/// Forward without the tape: returns `(out [B*Tq, nh*hd], lse [B, nh, Tq])`.
pub fn attention_forward(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> (Vec<f32>, Vec<f32>) {
    s.check(q.len(), k.len(), v.len());
    let (hd, qw, kvw) = (s.hd, s.q_width(), s.kv_width());
    let scale = 1.0 / (hd as f32).sqrt();
    let blocks: Vec<(Vec<f32>, Vec<f32>)> = (0..s.b * s.nh)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / s.nh, bh % s.nh);
            let kh = h / s.group();
            let mut out = vec![0f32; s.tq * hd];
            let mut lse = vec![0f32; s.tq];
            let mut scores = [0f32; KEY_TILE];
            for i in 0..s.tq {
                let qi = &q[(b * s.tq + i) * qw + h * hd..][..hd];
                let o = &mut out[i * hd..(i + 1) * hd];
                let last = s.tk - s.tq + i; // inclusive
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                let mut j0 = 0;
                while j0 <= last {
                    let j1 = (j0 + KEY_TILE).min(last + 1);
                    let mut tile_max = f32::NEG_INFINITY;
                    for j in j0..j1 {
                        let kj = &k[(b * s.tk_stride + j) * kvw + kh * hd..][..hd];
                        let sc = dot(qi, kj) * scale;
                        scores[j - j0] = sc;
                        tile_max = tile_max.max(sc);
                    }
                    let m_new = m.max(tile_max);
                    let corr = (m - m_new).exp();
                    if corr != 1.0 {
                        l *= corr;
                        o.iter_mut().for_each(|x| *x *= corr);
                    }
                    for j in j0..j1 {
                        let p = (scores[j - j0] - m_new).exp();
                        l += p;
                        axpy(p, &v[(b * s.tk_stride + j) * kvw + kh * hd..][..hd], o);
                    }
                    m = m_new;
                    j0 = j1;
                }
                let inv = 1.0 / l;
                o.iter_mut().for_each(|x| *x *= inv);
                lse[i] = m + l.ln();
            }
            (out, lse)
        })
        .collect();
    let mut out = vec![0f32; s.b * s.tq * qw];
    let mut lse = vec![0f32; s.b * s.nh * s.tq];
    for (bh, (o, l)) in blocks.into_iter().enumerate() {
        let (b, h) = (bh / s.nh, bh % s.nh);
        for i in 0..s.tq {
            out[(b * s.tq + i) * qw + h * hd..][..hd].copy_from_slice(&o[i * hd..(i + 1) * hd]);
        }
        lse[bh * s.tq..(bh + 1) * s.tq].copy_from_slice(&l);
    }
    (out, lse)
}

/// Causal attention on the tape. q `[B*T, nh*hd]`, k/v `[B*T, nkv*hd]`.
pub fn attention(tape: &mut Tape, q: Var, k: Var, v: Var, s: AttnShape) -> Var {
    let (qv, kv, vv) = (tape.value(q), tape.value(k), tape.value(v));
    let (out, lse) = attention_forward(qv.data(), kv.data(), vv.data(), s);
    let out = Tensor::from_vec(out, &[s.b * s.tq, s.q_width()]);
    let op = AttnBack { q: qv.clone(), k: kv.clone(), v: vv.clone(), out: out.clone(), lse, s };
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

impl Backward for AttnBack {
    fn backward(&self, g: &Tensor, _needs: &[bool]) -> Vec<Option<Tensor>> {
        let s = self.s;
        let (hd, qw, kvw, grp) = (s.hd, s.q_width(), s.kv_width(), s.group());
        let scale = 1.0 / (hd as f32).sqrt();
        let (q, k, v, o, go) = (self.q.data(), self.k.data(), self.v.data(), self.out.data(), g.data());
        // One task per (batch, kv head): dq of its query heads, dk/dv of its kv head.
        let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..s.b * s.nkv)
            .into_par_iter()
            .map(|bg| {
                let (b, kh) = (bg / s.nkv, bg % s.nkv);
                let mut dq = vec![0f32; grp * s.tq * hd];
                let mut dk = vec![0f32; s.tk * hd];
                let mut dv = vec![0f32; s.tk * hd];
                for hh in 0..grp {
                    let h = kh * grp + hh;
                    for i in 0..s.tq {
                        let row = (b * s.tq + i) * qw + h * hd;
                        let (qi, oi, gi) = (&q[row..row + hd], &o[row..row + hd], &go[row..row + hd]);
                        let lse = self.lse[(b * s.nh + h) * s.tq + i];
                        let d_i = dot(gi, oi);
                        let dqi = &mut dq[(hh * s.tq + i) * hd..][..hd];
                        for j in 0..=(s.tk - s.tq + i) {
                            let kr = (b * s.tk_stride + j) * kvw + kh * hd;
                            let (kj, vj) = (&k[kr..kr + hd], &v[kr..kr + hd]);
                            let p = (dot(qi, kj) * scale - lse).exp();
                            axpy(p, gi, &mut dv[j * hd..(j + 1) * hd]);
                            let ds = p * (dot(gi, vj) - d_i) * scale;
                            axpy(ds, kj, dqi);
                            axpy(ds, qi, &mut dk[j * hd..(j + 1) * hd]);
                        }
                    }
                }
                (dq, dk, dv)
            })
            .collect();
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; k.len()];
        let mut dv = vec![0f32; v.len()];
        for (bg, (pq, pk, pv)) in parts.into_iter().enumerate() {
            let (b, kh) = (bg / s.nkv, bg % s.nkv);
            for hh in 0..grp {
                let h = kh * grp + hh;
                for i in 0..s.tq {
                    dq[(b * s.tq + i) * qw + h * hd..][..hd].copy_from_slice(&pq[(hh * s.tq + i) * hd..][..hd]);
                }
            }
            for j in 0..s.tk {
                let r = (b * s.tk_stride + j) * kvw + kh * hd;
                dk[r..r + hd].copy_from_slice(&pk[j * hd..(j + 1) * hd]);
                dv[r..r + hd].copy_from_slice(&pv[j * hd..(j + 1) * hd]);
            }
        }
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
                        qi.iter().zip(kj).map(|(a, c)| *a as f64 * *c as f64).sum::<f64>() * scale
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

    #[test]
    fn tiled_forward_matches_reference_with_cache_stride() {
        let mut rng = StdRng::seed_from_u64(1);
        for &(b, tq, tk, stride, nh, nkv, hd) in
            &[(1, 1, 1, 1, 1, 1, 8), (2, 17, 17, 17, 4, 2, 16), (1, 3, 130, 140, 4, 1, 8), (2, 70, 70, 70, 2, 2, 12)]
        {
            let s = AttnShape { b, tq, tk, tk_stride: stride, nh, nkv, hd };
            let q = Tensor::randn(&[b * tq * nh * hd], 1.0, &mut rng);
            let k = Tensor::randn(&[b * stride * nkv * hd], 1.0, &mut rng);
            let v = Tensor::randn(&[b * stride * nkv * hd], 1.0, &mut rng);
            let (o, _) = attention_forward(q.data(), k.data(), v.data(), s);
            let r = attention_reference(q.data(), k.data(), v.data(), s);
            let err = o.iter().zip(&r).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-5, "{s:?}: max err {err}");
        }
    }
}
