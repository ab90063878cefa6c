//! The mixture-of-experts FFN on the CPU: routing, the grouping of token copies by expert, and
//! the grouped SwiGLU FFN's forward and backward, one expert's segment at a time through the
//! threaded GEMM (the same GEMM and SwiGLU row kernels as the tape's `linear` and `swiglu`).

use crate::backend::cpu::{dot, matmul, simd};
use crate::ensure;
use crate::error::Result;
use rayon::prelude::*;

/// Softmax of `z + min(bias, 0)` per row, the top-k experts (descending probability, ties to
/// the lower id) and their weights, renormalised when `renorm` (the tape's `route_values`).
#[allow(clippy::too_many_arguments)]
pub(super) fn route(
    z: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    e: usize,
    k: usize,
    renorm: bool,
    probs: &mut [f32],
    weights: &mut [f32],
    indices: &mut [u32],
) -> Result<()> {
    ensure!(k >= 1 && k <= e, "route: top-k {k} of {e} experts");
    ensure!(
        z.len() == n * e
            && probs.len() == n * e
            && weights.len() == n * k
            && indices.len() == n * k,
        "route: sizes do not match {n} x {e} (top {k})"
    );
    if let Some(b) = bias {
        ensure!(
            b.len() == e,
            "route: bias has {} entries for {e} experts",
            b.len()
        );
    }
    crate::ops::router::route_rows(z, bias, e, k, renorm, probs, weights, indices);
    Ok(())
}

/// The token copies grouped by expert: copy `(t, s)` (token t's slot s) is row `pos[t*k + s]`
/// of the grouped layout, expert e's rows are `offsets[e]..offsets[e+1]`, tokens ascending
/// within an expert (the tape's `Routing::expert_tokens` concatenated).
pub struct HostPerm {
    pub n: usize,
    pub k: usize,
    pub e: usize,
    pub offsets: super::HostVec<u32>,
    pub pos: Vec<u32>,
    /// The token of each grouped row.
    pub sorted_tokens: Vec<u32>,
}

impl HostPerm {
    pub(super) fn new(indices: &[u32], n: usize, k: usize, e: usize) -> Result<HostPerm> {
        ensure!(
            indices.len() == n * k,
            "moe permutation: {} indices for {n} x {k}",
            indices.len()
        );
        if let Some(bad) = indices.iter().find(|&&x| x as usize >= e) {
            crate::bail!("moe permutation: expert {bad} out of range ({e} experts)");
        }
        let mut offsets = vec![0u32; e + 1];
        for &x in indices {
            offsets[x as usize + 1] += 1;
        }
        for j in 0..e {
            offsets[j + 1] += offsets[j];
        }
        let mut next: Vec<u32> = offsets[..e].to_vec();
        let mut pos = vec![0u32; n * k];
        let mut sorted_tokens = vec![0u32; n * k];
        for t in 0..n {
            for s in 0..k {
                let x = indices[t * k + s] as usize;
                pos[t * k + s] = next[x];
                sorted_tokens[next[x] as usize] = t as u32;
                next[x] += 1;
            }
        }
        Ok(HostPerm {
            n,
            k,
            e,
            offsets: super::HostVec::from_vec(offsets),
            pos,
            sorted_tokens,
        })
    }

    fn check(&self, what: &str, tokens: usize, rows: usize, h: usize) -> Result<()> {
        ensure!(
            tokens == self.n * h && rows == self.n * self.k * h,
            "{what}: sizes do not match {} tokens x {} copies of width {h}",
            self.n,
            self.k
        );
        Ok(())
    }

    /// `xp[row] = x[token of row]`.
    pub(super) fn permute(&self, x: &[f32], h: usize, xp: &mut [f32]) -> Result<()> {
        self.check("moe permute", x.len(), xp.len(), h)?;
        xp.par_chunks_mut(h.max(1))
            .zip(self.sorted_tokens.par_iter())
            .with_min_len(16)
            .for_each(|(y, &t)| y.copy_from_slice(&x[t as usize * h..(t as usize + 1) * h]));
        Ok(())
    }

    /// `dx[t] = sum_s dxp[pos(t, s)]`, slots in order.
    pub(super) fn permute_bwd(&self, dxp: &[f32], h: usize, dx: &mut [f32]) -> Result<()> {
        self.check("moe permute backward", dx.len(), dxp.len(), h)?;
        let k = self.k;
        dx.par_chunks_mut(h.max(1))
            .enumerate()
            .with_min_len(16)
            .for_each(|(t, d)| {
                for s in 0..k {
                    let r = self.pos[t * k + s] as usize;
                    let src = &dxp[r * h..(r + 1) * h];
                    if s == 0 {
                        d.copy_from_slice(src);
                    } else {
                        d.iter_mut().zip(src).for_each(|(a, b)| *a += b);
                    }
                }
            });
        Ok(())
    }

    /// `y[t] = sum_s w[t, s] * outs[pos(t, s)]` (the tape's `moe_combine`).
    pub(super) fn combine(&self, outs: &[f32], w: &[f32], h: usize, y: &mut [f32]) -> Result<()> {
        self.check("moe combine", y.len(), outs.len(), h)?;
        ensure!(
            w.len() == self.n * self.k,
            "moe combine: {} weights",
            w.len()
        );
        let k = self.k;
        y.par_chunks_mut(h.max(1))
            .enumerate()
            .with_min_len(16)
            .for_each(|(t, y)| {
                for s in 0..k {
                    let r = self.pos[t * k + s] as usize;
                    let (src, wt) = (&outs[r * h..(r + 1) * h], w[t * k + s]);
                    if s == 0 {
                        y.iter_mut().zip(src).for_each(|(a, b)| *a = wt * b);
                    } else {
                        y.iter_mut().zip(src).for_each(|(a, b)| *a += wt * b);
                    }
                }
            });
        Ok(())
    }

    /// Backward of [`HostPerm::combine`]: `douts[pos(t, s)] = w[t, s] dy[t]`,
    /// `dw[t, s] = dy[t] . outs[pos(t, s)]`.
    pub(super) fn combine_bwd(
        &self,
        dy: &[f32],
        outs: &[f32],
        w: &[f32],
        h: usize,
        douts: &mut [f32],
        dw: &mut [f32],
    ) -> Result<()> {
        self.check("moe combine backward", dy.len(), outs.len(), h)?;
        ensure!(
            douts.len() == outs.len() && w.len() == self.n * self.k && dw.len() == w.len(),
            "moe combine backward: sizes do not match"
        );
        let k = self.k;
        douts
            .par_chunks_mut(h.max(1))
            .zip(self.sorted_tokens.par_iter())
            .enumerate()
            .with_min_len(16)
            .for_each(|(r, (d, &t))| {
                let t = t as usize;
                let s = (0..k)
                    .find(|&s| self.pos[t * k + s] as usize == r)
                    .expect("the permutation is consistent");
                let wt = w[t * k + s];
                d.iter_mut()
                    .zip(&dy[t * h..(t + 1) * h])
                    .for_each(|(a, b)| *a = wt * b);
            });
        dw.par_chunks_mut(k).enumerate().for_each(|(t, dwr)| {
            for (d, &r) in dwr.iter_mut().zip(&self.pos[t * k..(t + 1) * k]) {
                let r = r as usize;
                *d = dot(&dy[t * h..(t + 1) * h], &outs[r * h..(r + 1) * h]);
            }
        });
        Ok(())
    }
}

/// The segments of the grouped rows: `(expert, first row, rows)` of each expert with rows.
fn segments(offsets: &[u32], e: usize, total: usize) -> Result<Vec<(usize, usize, usize)>> {
    ensure!(
        offsets.len() > e,
        "grouped FFN: {} offsets for {e} experts",
        offsets.len()
    );
    let mut out = Vec::new();
    for x in 0..e {
        let (a, b) = (offsets[x] as usize, offsets[x + 1] as usize);
        ensure!(
            a <= b && b <= total,
            "grouped FFN: expert {x} rows {a}..{b} of {total}"
        );
        if b > a {
            out.push((x, a, b - a));
        }
    }
    Ok(out)
}

/// `act[seg] = silu(x[seg] wg_e^T) * (x[seg] wu_e^T)`, the pre-activations kept in `saved`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gateup_fwd(
    x: &[f32],
    offsets: &[u32],
    wg: &[f32],
    wu: &[f32],
    e: usize,
    h: usize,
    i: usize,
    act: &mut [f32],
    saved: Option<(&mut [f32], &mut [f32])>,
) -> Result<()> {
    let rows = x.len() / h.max(1);
    ensure!(
        x.len() == rows * h
            && act.len() == rows * i
            && wg.len() == e * i * h
            && wu.len() == wg.len(),
        "grouped gate/up: sizes do not match"
    );
    let (mut own_g, mut own_u);
    let (gate, up): (&mut [f32], &mut [f32]) = match saved {
        Some((g, u)) => {
            ensure!(
                g.len() == rows * i && u.len() == rows * i,
                "grouped gate/up: saved sizes"
            );
            (g, u)
        }
        None => {
            own_g = vec![0f32; rows * i];
            own_u = vec![0f32; rows * i];
            (&mut own_g, &mut own_u)
        }
    };
    for (x_e, r0, m) in segments(offsets, e, rows)? {
        let xs = &x[r0 * h..(r0 + m) * h];
        let w = x_e * i * h..(x_e + 1) * i * h;
        let (g, u) = (
            &mut gate[r0 * i..(r0 + m) * i],
            &mut up[r0 * i..(r0 + m) * i],
        );
        matmul(m, i, h, xs, false, &wg[w.clone()], true, g, false);
        matmul(m, i, h, xs, false, &wu[w], true, u, false);
        const CH: usize = 1 << 14;
        act[r0 * i..(r0 + m) * i]
            .par_chunks_mut(CH)
            .zip(g.par_chunks(CH).zip(u.par_chunks(CH)))
            .for_each(|(y, (g, u))| simd::swiglu_fwd(y, g, u));
    }
    Ok(())
}

/// `y[seg] = a[seg] w_e^T` (a `[rows, k]`, w `[e, n, k]`).
pub(super) fn grouped_nt(
    a: &[f32],
    offsets: &[u32],
    w: &[f32],
    e: usize,
    k: usize,
    n: usize,
    y: &mut [f32],
) -> Result<()> {
    let rows = a.len() / k.max(1);
    ensure!(
        a.len() == rows * k && y.len() == rows * n && w.len() == e * n * k,
        "grouped GEMM: sizes do not match"
    );
    for (x_e, r0, m) in segments(offsets, e, rows)? {
        matmul(
            m,
            n,
            k,
            &a[r0 * k..(r0 + m) * k],
            false,
            &w[x_e * n * k..(x_e + 1) * n * k],
            true,
            &mut y[r0 * n..(r0 + m) * n],
            false,
        );
    }
    Ok(())
}

/// `da = dy[seg] wd_e`, then the SwiGLU's gradients from the saved pre-activations.
#[allow(clippy::too_many_arguments)]
pub(super) fn nn_swiglu_bwd(
    dy: &[f32],
    offsets: &[u32],
    wd: &[f32],
    gate: &[f32],
    up: &[f32],
    e: usize,
    h: usize,
    i: usize,
    dgate: &mut [f32],
    dup: &mut [f32],
) -> Result<()> {
    let rows = dy.len() / h.max(1);
    ensure!(
        dy.len() == rows * h
            && wd.len() == e * h * i
            && gate.len() == rows * i
            && up.len() == rows * i
            && dgate.len() == rows * i
            && dup.len() == rows * i,
        "grouped SwiGLU backward: sizes do not match"
    );
    for (x_e, r0, m) in segments(offsets, e, rows)? {
        let mut da = vec![0f32; m * i];
        matmul(
            m,
            i,
            h,
            &dy[r0 * h..(r0 + m) * h],
            false,
            &wd[x_e * h * i..(x_e + 1) * h * i],
            false,
            &mut da,
            false,
        );
        let seg = r0 * i..(r0 + m) * i;
        const CH: usize = 1 << 14;
        dgate[seg.clone()]
            .par_chunks_mut(CH)
            .zip(dup[seg.clone()].par_chunks_mut(CH))
            .enumerate()
            .for_each(|(c, (dg, du))| {
                let r = seg.start + c * CH..seg.start + c * CH + dg.len();
                simd::swiglu_bwd(
                    dg,
                    du,
                    &gate[r.clone()],
                    &up[r],
                    &da[c * CH..c * CH + dg.len()],
                );
            });
    }
    Ok(())
}

/// `dx[seg] = dy[seg] w_e (+ dy2[seg] w2_e)` (dy `[rows, k]`, w `[e, k, n]`).
#[allow(clippy::too_many_arguments)]
pub(super) fn grouped_nn(
    dy: &[f32],
    offsets: &[u32],
    w: &[f32],
    second: Option<(&[f32], &[f32])>,
    e: usize,
    k: usize,
    n: usize,
    dx: &mut [f32],
) -> Result<()> {
    let rows = dy.len() / k.max(1);
    ensure!(
        dy.len() == rows * k && dx.len() == rows * n && w.len() == e * k * n,
        "grouped input gradient: sizes do not match"
    );
    if let Some((dy2, w2)) = second {
        ensure!(
            dy2.len() == dy.len() && w2.len() == w.len(),
            "grouped input gradient: second operand sizes"
        );
    }
    let segs = segments(offsets, e, rows)?;
    // Rows no expert holds (none, for a routing's offsets) are zero.
    let covered = offsets[e] as usize - offsets[0] as usize;
    if covered < rows {
        let mut held = vec![false; rows];
        for &(_, r0, m) in &segs {
            held[r0..r0 + m].iter_mut().for_each(|h| *h = true);
        }
        for (r, _) in held.iter().enumerate().filter(|(_, h)| !**h) {
            dx[r * n..(r + 1) * n].iter_mut().for_each(|v| *v = 0.0);
        }
    }
    for (x_e, r0, m) in segs {
        let (ws, out) = (
            x_e * k * n..(x_e + 1) * k * n,
            &mut dx[r0 * n..(r0 + m) * n],
        );
        matmul(
            m,
            n,
            k,
            &dy[r0 * k..(r0 + m) * k],
            false,
            &w[ws.clone()],
            false,
            out,
            false,
        );
        if let Some((dy2, w2)) = second {
            matmul(
                m,
                n,
                k,
                &dy2[r0 * k..(r0 + m) * k],
                false,
                &w2[ws],
                false,
                out,
                true,
            );
        }
    }
    Ok(())
}

/// `dw[e] = dy[seg]^T x[seg]` (`[e, n, k]`, zeros for an expert without rows); `offsets` may be
/// a suffix of the routing's (the trained experts only: rows stay absolute).
pub(super) fn wgrad(
    dy: &[f32],
    x: &[f32],
    offsets: &[u32],
    e: usize,
    n: usize,
    k: usize,
    dw: &mut [f32],
) -> Result<()> {
    let rows = x.len() / k.max(1);
    ensure!(
        x.len() == rows * k && dy.len() == rows * n && dw.len() == e * n * k,
        "grouped weight gradient: sizes do not match"
    );
    let segs = segments(offsets, e, rows)?;
    // An expert without rows gets zeros.
    for x_e in 0..e {
        if !segs.iter().any(|&(s, _, _)| s == x_e) {
            dw[x_e * n * k..(x_e + 1) * n * k]
                .par_iter_mut()
                .for_each(|v| *v = 0.0);
        }
    }
    for (x_e, r0, m) in segs {
        matmul(
            n,
            k,
            m,
            &dy[r0 * n..(r0 + m) * n],
            true,
            &x[r0 * k..(r0 + m) * k],
            false,
            &mut dw[x_e * n * k..(x_e + 1) * n * k],
            false,
        );
    }
    Ok(())
}
