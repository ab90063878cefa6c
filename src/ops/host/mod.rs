//! The backend interface ([`crate::backend::kernels::Kernels`]) on the CPU: [`Host`], f32
//! activations in host memory, built from the CPU kernels the ops on the tape run (the threaded
//! GEMM, the vector row kernels of `backend::cpu::simd`, the tiled attention). The tape's ops
//! stay the gradient oracle of the model written over this interface (tests/net.rs).

mod ffn;
mod loss;
mod pool;

use super::attention::{attention_backward_into, attention_forward_into};
use super::RopeTable;
use crate::backend::cpu::{matmul, simd, sq_norm, sum_sq};
use crate::backend::kernels::{AdamWHyper, AdamWSlot, Buf, CeStats, Elem, Float, Kernels, R, W};
use crate::backend::shapes::AttnShape;
use crate::ensure;
use crate::error::Result;
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::any::TypeId;
use std::sync::Arc;

pub use ffn::HostPerm;
pub use loss::HostCe;
pub use pool::{cached_bytes, release_cached, HostVec};

/// The CPU as a backend of the model: f32 everywhere, buffers in host memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct Host;

/// Rows per rayon task of the row-wise kernels.
const ROWS: usize = 16;

fn s<'a, T: Elem>(r: R<'a, Host, T>) -> &'a [T] {
    &r.mem[r.range()]
}

fn sm<'a, T: Elem>(w: W<'a, Host, T>) -> &'a mut [T] {
    let range = w.range();
    &mut w.mem[range]
}

/// `x` as f32 values when its element type is f32.
fn as_f32<T: Elem>(x: &[T]) -> Option<&[f32]> {
    (TypeId::of::<T>() == TypeId::of::<f32>())
        // SAFETY: T is f32.
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) })
}

fn as_f32_mut<T: Elem>(x: &mut [T]) -> Option<&mut [f32]> {
    (TypeId::of::<T>() == TypeId::of::<f32>())
        // SAFETY: T is f32.
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) })
}

fn to_f32s<T: Float>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

impl Kernels for Host {
    type A = f32;
    type Mem<T: Elem> = HostVec<T>;
    type Rope = Arc<RopeTable>;
    type Perm = HostPerm;
    type Ce = HostCe;

    fn kind(&self) -> &'static str {
        "cpu"
    }
    fn release_cached(&self) {
        pool::release_cached();
    }

    fn mem_len<T: Elem>(m: &HostVec<T>) -> usize {
        m.len()
    }
    fn alloc<T: Elem>(&self, len: usize) -> Result<Buf<Self, T>> {
        Ok(Buf(HostVec::take(len)))
    }
    fn zeros<T: Elem>(&self, len: usize) -> Result<Buf<Self, T>> {
        let mut b = HostVec::take(len);
        b.par_chunks_mut(1 << 16)
            .for_each(|c| c.iter_mut().for_each(|x| *x = T::default()));
        Ok(Buf(b))
    }
    fn upload<T: Elem>(&self, data: &[T]) -> Result<Buf<Self, T>> {
        let mut b = HostVec::take(data.len());
        b.copy_from_slice(data);
        Ok(Buf(b))
    }
    fn download<T: Elem>(&self, x: R<'_, Self, T>) -> Result<Vec<T>> {
        Ok(s(x).to_vec())
    }
    fn copy<T: Elem>(&self, x: R<'_, Self, T>, y: W<'_, Self, T>) -> Result<()> {
        ensure!(x.len == y.len, "copy: {} elements into {}", x.len, y.len);
        sm(y)
            .par_chunks_mut(1 << 15)
            .zip(s(x).par_chunks(1 << 15))
            .for_each(|(y, x)| y.copy_from_slice(x));
        Ok(())
    }
    fn upload_f32_act(&self, data: &[f32]) -> Result<Buf<Self, f32>> {
        self.upload(data)
    }
    fn upload_tensors_act(&self, parts: &[&Tensor]) -> Result<Buf<Self, f32>> {
        let mut all: Vec<f32> = Vec::with_capacity(parts.iter().map(|t| t.numel()).sum());
        for t in parts {
            match t.bf16_data() {
                Some(d) => all.extend(d.iter().map(|x| x.to_f32())),
                None => all.extend_from_slice(t.data()),
            }
        }
        Ok(Buf(HostVec::from_vec(all)))
    }
    fn download_act_f32(&self, x: R<'_, Self, f32>) -> Result<Vec<f32>> {
        Ok(s(x).to_vec())
    }

    fn f32_as_act(x: R<'_, Self, f32>) -> Option<R<'_, Self, f32>> {
        Some(x)
    }
    fn act_as_f32(x: R<'_, Self, f32>) -> Option<R<'_, Self, f32>> {
        Some(x)
    }
    fn act_to_f32(&self, x: R<'_, Self, f32>, y: W<'_, Self, f32>) -> Result<()> {
        self.copy(x, y)
    }
    fn f32_to_act(&self, x: R<'_, Self, f32>, y: W<'_, Self, f32>) -> Result<()> {
        self.copy(x, y)
    }
    fn add_scaled<T: Float>(
        &self,
        a: R<'_, Self, T>,
        b: R<'_, Self, T>,
        y: W<'_, Self, T>,
        alpha: f32,
    ) -> Result<()> {
        ensure!(
            a.len == b.len && a.len == y.len,
            "add_scaled: sizes {}, {}, {}",
            a.len,
            b.len,
            y.len
        );
        let (a, b, y) = (s(a), s(b), sm(y));
        const CH: usize = 1 << 14;
        match (as_f32(a), as_f32(b), as_f32_mut(y)) {
            (Some(a), Some(b), Some(y)) => y
                .par_chunks_mut(CH)
                .zip(a.par_chunks(CH).zip(b.par_chunks(CH)))
                .for_each(|(y, (a, b))| simd::add_scaled_into(y, a, b, alpha)),
            _ => {
                for i in 0..y.len() {
                    y[i] = T::from_f32(a[i].to_f32() + alpha * b[i].to_f32());
                }
            }
        }
        Ok(())
    }
    fn scale<T: Float>(&self, a: R<'_, Self, T>, y: W<'_, Self, T>, f: f32) -> Result<()> {
        ensure!(a.len == y.len, "scale: sizes {}, {}", a.len, y.len);
        let (a, y) = (s(a), sm(y));
        y.par_iter_mut()
            .zip(a.par_iter())
            .with_min_len(1 << 12)
            .for_each(|(y, a)| *y = T::from_f32(a.to_f32() * f));
        Ok(())
    }

    fn gemm<A: Float, C: Float>(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: R<'_, Self, A>,
        a_t: bool,
        b: R<'_, Self, A>,
        b_t: bool,
        c: W<'_, Self, C>,
        accumulate: bool,
    ) -> Result<()> {
        ensure!(
            a.len == m * k && b.len == k * n && c.len == m * n,
            "gemm {m}x{n}x{k}: operands of {}, {} and {} elements",
            a.len,
            b.len,
            c.len
        );
        let (a, b, c) = (s(a), s(b), sm(c));
        match (as_f32(a), as_f32(b), as_f32_mut(c)) {
            (Some(a), Some(b), Some(c)) => matmul(m, n, k, a, a_t, b, b_t, c, accumulate),
            (_, _, c32) => {
                let (a, b) = (to_f32s(a), to_f32s(b));
                match c32 {
                    Some(c) => matmul(m, n, k, &a, a_t, &b, b_t, c, accumulate),
                    None => {
                        let mut out = to_f32s(c);
                        matmul(m, n, k, &a, a_t, &b, b_t, &mut out, accumulate);
                        c.iter_mut().zip(out).for_each(|(c, x)| *c = C::from_f32(x));
                    }
                }
            }
        }
        Ok(())
    }

    fn rmsnorm_fwd(
        &self,
        x: R<'_, Self, f32>,
        w: R<'_, Self, f32>,
        y: W<'_, Self, f32>,
        rstd: W<'_, Self, f32>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        ensure!(
            x.len == n * d && y.len == n * d && w.len == d && rstd.len == n,
            "rmsnorm: sizes do not match {n} rows of {d}"
        );
        let (x, w) = (s(x), s(w));
        sm(y)
            .par_chunks_mut(d.max(1))
            .zip(sm(rstd).par_iter_mut())
            .with_min_len(ROWS)
            .enumerate()
            .for_each(|(i, (y, r))| {
                let row = &x[i * d..(i + 1) * d];
                *r = 1.0 / (sum_sq(row) / d as f32 + eps).sqrt();
                simd::rms_scale(y, w, row, *r);
            });
        Ok(())
    }
    fn rmsnorm_bwd_dx(
        &self,
        x: R<'_, Self, f32>,
        w: R<'_, Self, f32>,
        dy: R<'_, Self, f32>,
        rstd: R<'_, Self, f32>,
        dx: W<'_, Self, f32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        ensure!(
            x.len == n * d && dy.len == n * d && dx.len == n * d && w.len == d && rstd.len == n,
            "rmsnorm backward: sizes do not match {n} rows of {d}"
        );
        let (x, w, dy, rstd) = (s(x), s(w), s(dy), s(rstd));
        sm(dx)
            .par_chunks_mut(d.max(1))
            .with_min_len(ROWS)
            .enumerate()
            .for_each(|(i, dx)| {
                let (x, gy, r) = (&x[i * d..(i + 1) * d], &dy[i * d..(i + 1) * d], rstd[i]);
                let c = simd::dot3(w, gy, x) * r * r / d as f32;
                simd::rms_dx(dx, w, gy, x, r, c);
            });
        Ok(())
    }
    fn rmsnorm_bwd_dw(
        &self,
        x: R<'_, Self, f32>,
        dy: R<'_, Self, f32>,
        rstd: R<'_, Self, f32>,
        dw: W<'_, Self, f32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        ensure!(
            x.len == n * d && dy.len == n * d && dw.len == d && rstd.len == n,
            "rmsnorm backward: sizes do not match {n} rows of {d}"
        );
        let (x, dy, rstd) = (s(x), s(dy), s(rstd));
        // Fixed row partition, partial sums reduced in order: deterministic.
        let parts: Vec<Vec<f32>> =
            crate::backend::cpu::chunks(n, crate::backend::cpu::REDUCE_CHUNKS)
                .into_par_iter()
                .map(|rows| {
                    let mut acc = vec![0f32; d];
                    for i in rows {
                        simd::acc_mul(
                            &mut acc,
                            &dy[i * d..(i + 1) * d],
                            &x[i * d..(i + 1) * d],
                            rstd[i],
                        );
                    }
                    acc
                })
                .collect();
        let dw = sm(dw);
        dw.iter_mut().for_each(|v| *v = 0.0);
        for p in parts {
            for j in 0..d {
                dw[j] += p[j];
            }
        }
        Ok(())
    }

    fn rope_table(&self, hd: usize, theta: f64, max_pos: usize) -> Result<Arc<RopeTable>> {
        Ok(Arc::new(RopeTable::new(hd, theta, max_pos)))
    }
    fn rope(
        &self,
        x: R<'_, Self, f32>,
        y: W<'_, Self, f32>,
        table: &Arc<RopeTable>,
        rows: usize,
        width: usize,
        t_len: usize,
        offset: usize,
        inverse: bool,
    ) -> Result<()> {
        ensure!(
            x.len == rows * width && y.len == rows * width,
            "rope: sizes do not match {rows} rows of {width}"
        );
        table.rotate_rows(s(x), sm(y), width, t_len, offset, inverse);
        Ok(())
    }

    fn attention_fwd(
        &self,
        q: R<'_, Self, f32>,
        k: R<'_, Self, f32>,
        v: R<'_, Self, f32>,
        sh: AttnShape,
        out: W<'_, Self, f32>,
        lse: W<'_, Self, f32>,
    ) -> Result<()> {
        ensure!(
            out.len == sh.b * sh.tq * sh.q_width() && lse.len == sh.b * sh.nh * sh.tq,
            "attention: output sizes do not match {sh:?}"
        );
        attention_forward_into(s(q), s(k), s(v), sh, sm(out), sm(lse));
        Ok(())
    }
    fn attention_decode(
        &self,
        q: R<'_, Self, f32>,
        k: R<'_, Self, f32>,
        v: R<'_, Self, f32>,
        sh: AttnShape,
        out: W<'_, Self, f32>,
        lse: W<'_, Self, f32>,
    ) -> Result<()> {
        self.attention_fwd(q, k, v, sh, out, lse)
    }
    fn attention_bwd(
        &self,
        q: R<'_, Self, f32>,
        k: R<'_, Self, f32>,
        v: R<'_, Self, f32>,
        out: R<'_, Self, f32>,
        lse: R<'_, Self, f32>,
        dout: R<'_, Self, f32>,
        sh: AttnShape,
        dq: W<'_, Self, f32>,
        dk: W<'_, Self, f32>,
        dv: W<'_, Self, f32>,
    ) -> Result<()> {
        ensure!(
            dq.len == q.len && dk.len == k.len && dv.len == v.len,
            "attention backward: gradient sizes do not match {sh:?}"
        );
        attention_backward_into(
            s(q),
            s(k),
            s(v),
            s(out),
            s(lse),
            s(dout),
            sh,
            sm(dq),
            sm(dk),
            sm(dv),
        );
        Ok(())
    }

    fn embedding_fwd(
        &self,
        w: R<'_, Self, f32>,
        vocab: usize,
        h: usize,
        ids: &[u32],
        y: W<'_, Self, f32>,
    ) -> Result<()> {
        ensure!(
            w.len == vocab * h && y.len == ids.len() * h,
            "embedding: sizes do not match"
        );
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            crate::bail!("embedding: id {bad} out of range (vocab {vocab})");
        }
        let w = s(w);
        sm(y)
            .par_chunks_mut(h.max(1))
            .zip(ids.par_iter())
            .with_min_len(ROWS)
            .for_each(|(y, &id)| y.copy_from_slice(&w[id as usize * h..(id as usize + 1) * h]));
        Ok(())
    }
    fn embedding_bwd(
        &self,
        dy: R<'_, Self, f32>,
        ids: &[u32],
        vocab: usize,
        h: usize,
        dw: W<'_, Self, f32>,
    ) -> Result<()> {
        ensure!(
            dw.len == vocab * h && dy.len == ids.len() * h,
            "embedding backward: sizes do not match"
        );
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            crate::bail!("embedding backward: id {bad} out of range (vocab {vocab})");
        }
        let (dy, dw) = (s(dy), sm(dw));
        dw.iter_mut().for_each(|v| *v = 0.0);
        for (n, &id) in ids.iter().enumerate() {
            let row = &mut dw[id as usize * h..(id as usize + 1) * h];
            for (a, b) in row.iter_mut().zip(&dy[n * h..(n + 1) * h]) {
                *a += b;
            }
        }
        Ok(())
    }

    fn route(
        &self,
        z: R<'_, Self, f32>,
        bias: Option<R<'_, Self, f32>>,
        n: usize,
        e: usize,
        k: usize,
        renorm: bool,
        probs: W<'_, Self, f32>,
        weights: W<'_, Self, f32>,
        indices: W<'_, Self, u32>,
    ) -> Result<()> {
        ffn::route(
            s(z),
            bias.map(s),
            n,
            e,
            k,
            renorm,
            sm(probs),
            sm(weights),
            sm(indices),
        )
    }
    fn route_bwd(
        &self,
        probs: R<'_, Self, f32>,
        weights: R<'_, Self, f32>,
        indices: R<'_, Self, u32>,
        gw: R<'_, Self, f32>,
        n: usize,
        e: usize,
        k: usize,
        renorm: bool,
        dz: W<'_, Self, f32>,
    ) -> Result<()> {
        ensure!(
            probs.len == n * e
                && dz.len == n * e
                && weights.len == n * k
                && gw.len == n * k
                && indices.len == n * k,
            "route backward: sizes do not match {n} x {e} (top {k})"
        );
        super::router::route_bwd_rows(
            s(probs),
            s(weights),
            s(indices),
            s(gw),
            e,
            k,
            renorm,
            sm(dz),
        );
        Ok(())
    }
    fn route_bias_grad(
        &self,
        dz: R<'_, Self, f32>,
        bias: R<'_, Self, f32>,
        n: usize,
        e: usize,
        db: W<'_, Self, f32>,
    ) -> Result<()> {
        ensure!(
            dz.len == n * e && bias.len == e && db.len == e,
            "route bias gradient: sizes do not match"
        );
        super::router::route_bias_grad_into(s(dz), s(bias), sm(db));
        Ok(())
    }

    fn moe_permutation(
        &self,
        indices: R<'_, Self, u32>,
        n: usize,
        k: usize,
        e: usize,
    ) -> Result<HostPerm> {
        HostPerm::new(s(indices), n, k, e)
    }
    fn perm_offsets(p: &HostPerm) -> R<'_, Self, u32> {
        R {
            mem: &p.offsets,
            off: 0,
            len: p.offsets.len(),
        }
    }
    fn moe_permute(
        &self,
        x: R<'_, Self, f32>,
        perm: &HostPerm,
        h: usize,
        xp: W<'_, Self, f32>,
    ) -> Result<()> {
        perm.permute(s(x), h, sm(xp))
    }
    fn moe_permute_bwd(
        &self,
        dxp: R<'_, Self, f32>,
        perm: &HostPerm,
        h: usize,
        dx: W<'_, Self, f32>,
    ) -> Result<()> {
        perm.permute_bwd(s(dxp), h, sm(dx))
    }
    fn moe_combine(
        &self,
        outs: R<'_, Self, f32>,
        w: R<'_, Self, f32>,
        perm: &HostPerm,
        h: usize,
        y: W<'_, Self, f32>,
    ) -> Result<()> {
        perm.combine(s(outs), s(w), h, sm(y))
    }
    fn moe_combine_bwd(
        &self,
        dy: R<'_, Self, f32>,
        outs: R<'_, Self, f32>,
        w: R<'_, Self, f32>,
        perm: &HostPerm,
        h: usize,
        douts: W<'_, Self, f32>,
        dw: W<'_, Self, f32>,
    ) -> Result<()> {
        perm.combine_bwd(s(dy), s(outs), s(w), h, sm(douts), sm(dw))
    }

    fn grouped_gateup_fwd(
        &self,
        x: R<'_, Self, f32>,
        offsets: R<'_, Self, u32>,
        wg: R<'_, Self, f32>,
        wu: R<'_, Self, f32>,
        e: usize,
        h: usize,
        i: usize,
        act: W<'_, Self, f32>,
        saved: Option<(W<'_, Self, f32>, W<'_, Self, f32>)>,
    ) -> Result<()> {
        ffn::gateup_fwd(
            s(x),
            s(offsets),
            s(wg),
            s(wu),
            e,
            h,
            i,
            sm(act),
            saved.map(|(g, u)| (sm(g), sm(u))),
        )
    }
    fn grouped_nt(
        &self,
        a: R<'_, Self, f32>,
        offsets: R<'_, Self, u32>,
        w: R<'_, Self, f32>,
        e: usize,
        k: usize,
        n: usize,
        y: W<'_, Self, f32>,
    ) -> Result<()> {
        ffn::grouped_nt(s(a), s(offsets), s(w), e, k, n, sm(y))
    }
    fn grouped_nn_swiglu_bwd(
        &self,
        dy: R<'_, Self, f32>,
        offsets: R<'_, Self, u32>,
        wd: R<'_, Self, f32>,
        gate: R<'_, Self, f32>,
        up: R<'_, Self, f32>,
        e: usize,
        h: usize,
        i: usize,
        dgate: W<'_, Self, f32>,
        dup: W<'_, Self, f32>,
    ) -> Result<()> {
        ffn::nn_swiglu_bwd(
            s(dy),
            s(offsets),
            s(wd),
            s(gate),
            s(up),
            e,
            h,
            i,
            sm(dgate),
            sm(dup),
        )
    }
    fn grouped_nn(
        &self,
        dy: R<'_, Self, f32>,
        offsets: R<'_, Self, u32>,
        w: R<'_, Self, f32>,
        second: Option<(R<'_, Self, f32>, R<'_, Self, f32>)>,
        e: usize,
        k: usize,
        n: usize,
        dx: W<'_, Self, f32>,
    ) -> Result<()> {
        ffn::grouped_nn(
            s(dy),
            s(offsets),
            s(w),
            second.map(|(a, b)| (s(a), s(b))),
            e,
            k,
            n,
            sm(dx),
        )
    }
    fn grouped_wgrad(
        &self,
        dy: R<'_, Self, f32>,
        x: R<'_, Self, f32>,
        offsets: R<'_, Self, u32>,
        second: Option<(R<'_, Self, f32>, W<'_, Self, f32>)>,
        e: usize,
        n: usize,
        k: usize,
        dw: W<'_, Self, f32>,
    ) -> Result<()> {
        let offsets = s(offsets);
        ffn::wgrad(s(dy), s(x), offsets, e, n, k, sm(dw))?;
        if let Some((dy2, dw2)) = second {
            ffn::wgrad(s(dy2), s(x), offsets, e, n, k, sm(dw2))?;
        }
        Ok(())
    }

    fn cross_entropy(
        &self,
        logits: R<'_, Self, f32>,
        n: usize,
        v: usize,
        targets: &[u32],
        z_coef: f32,
    ) -> Result<HostCe> {
        HostCe::new(s(logits), n, v, targets, z_coef)
    }
    fn ce_stats(c: &HostCe) -> CeStats {
        c.stats
    }
    fn cross_entropy_bwd(
        &self,
        logits: R<'_, Self, f32>,
        saved: &HostCe,
        dloss: f32,
        dlogits: W<'_, Self, f32>,
    ) -> Result<()> {
        saved.backward(s(logits), dloss, sm(dlogits))
    }
    fn router_zloss(
        &self,
        z: R<'_, Self, f32>,
        n: usize,
        e: usize,
        lse: W<'_, Self, f32>,
    ) -> Result<f32> {
        loss::router_zloss(s(z), n, e, sm(lse))
    }
    fn router_zloss_bwd(
        &self,
        z: R<'_, Self, f32>,
        lse: R<'_, Self, f32>,
        n: usize,
        e: usize,
        dloss: f32,
        dz: W<'_, Self, f32>,
    ) -> Result<()> {
        loss::router_zloss_bwd(s(z), s(lse), n, e, dloss, sm(dz))
    }
    fn router_ce(
        &self,
        z: R<'_, Self, f32>,
        targets: &[u32],
        n: usize,
        e: usize,
        coef: f32,
        dz: W<'_, Self, f32>,
    ) -> Result<f32> {
        loss::router_ce(s(z), targets, n, e, coef, sm(dz))
    }
    fn rel_sq_err(
        &self,
        a: R<'_, Self, f32>,
        b: R<'_, Self, f32>,
        mask: R<'_, Self, u32>,
        n: usize,
        h: usize,
    ) -> Result<(f32, Buf<Self, f64>)> {
        let (value, sums) = loss::rel_sq_err(s(a), s(b), s(mask), n, h)?;
        Ok((value, Buf(HostVec::from_vec(sums.to_vec()))))
    }
    fn rel_sq_err_bwd(
        &self,
        a: R<'_, Self, f32>,
        b: R<'_, Self, f32>,
        mask: R<'_, Self, u32>,
        sums: R<'_, Self, f64>,
        n: usize,
        h: usize,
        coef: f32,
        da: W<'_, Self, f32>,
        db: W<'_, Self, f32>,
    ) -> Result<()> {
        loss::rel_sq_err_bwd(s(a), s(b), s(mask), s(sums), n, h, coef, sm(da), sm(db))
    }

    fn grad_norm(&self, grads: &[R<'_, Self, f32>], max_norm: f32) -> Result<Buf<Self, f32>> {
        let norm = grads.iter().map(|g| sq_norm(s(*g))).sum::<f64>().sqrt() as f32;
        let coef = if max_norm > 0.0 && norm > max_norm {
            max_norm / (norm + 1e-6)
        } else {
            1.0
        };
        Ok(Buf(HostVec::from_vec(vec![norm, coef])))
    }
    fn adamw_step(
        &self,
        slots: &mut [AdamWSlot<'_, Self>],
        hp: AdamWHyper,
        grad_scale: Option<R<'_, Self, f32>>,
    ) -> Result<()> {
        let gs = grad_scale.map_or(1.0, |g| s(g)[0]);
        let bc1 = 1.0 - hp.beta1.powi(hp.step as i32);
        let bc2 = 1.0 - hp.beta2.powi(hp.step as i32);
        for slot in slots.iter_mut() {
            let n = slot.param.len;
            ensure!(
                slot.grad.len == n && slot.m.len == n && slot.v.len == n,
                "adamw: a slot's gradient and moments differ in size from its weight"
            );
            let w = sm(slot.param.re());
            let (g, m, v) = (s(slot.grad), sm(slot.m.re()), sm(slot.v.re()));
            let target = slot.decay_to.map(s);
            let wd = slot.weight_decay;
            const CH: usize = 1 << 14;
            w.par_chunks_mut(CH)
                .zip(m.par_chunks_mut(CH))
                .zip(v.par_chunks_mut(CH))
                .zip(g.par_chunks(CH))
                .enumerate()
                .for_each(|(ci, (((w, m), v), g))| {
                    let t = target.map(|t| &t[ci * CH..ci * CH + w.len()]);
                    for i in 0..w.len() {
                        let g = if gs == 1.0 { g[i] } else { g[i] * gs };
                        m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * g;
                        v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * g * g;
                        let mh = m[i] / bc1;
                        let vh = v[i] / bc2;
                        w[i] -= hp.lr * wd * (w[i] - t.map_or(0.0, |t| t[i]));
                        w[i] -= hp.lr * mh / (vh.sqrt() + hp.eps);
                    }
                });
            if let Some(p) = slot.param_act.as_mut() {
                ensure!(p.len == n, "adamw: the weight's copy differs in size");
                sm(p.re()).copy_from_slice(w);
            }
        }
        Ok(())
    }
}
