//! The backend interface ([`crate::backend::kernels::Kernels`]) on the GPU: each primitive is
//! the wrapper of its kernel family in this folder, with bf16 activations.

use super::{AdamWSlot as CudaSlot, Buf as CudaBuf, CrossEntropyGpu, Device, MoePermutation};
use super::{RopeTableGpu, View, ViewMut};
use crate::backend::kernels::{AdamWHyper, AdamWSlot, Buf, CeStats, Elem, Float, Kernels, R, W};
use crate::backend::shapes::AttnShape;
use crate::ensure;
use crate::error::Result;
use crate::tensor::Tensor;
use half::bf16;

fn v<'a, T: Elem>(r: R<'a, Device, T>) -> View<'a, T> {
    r.mem.view(r.range())
}

fn vm<'a, T: Elem>(w: W<'a, Device, T>) -> ViewMut<'a, T> {
    let range = w.range();
    w.mem.view_mut(range)
}

/// The whole buffer behind `r` (for the wrappers that take a buffer).
fn whole<'a, T: Elem>(r: R<'a, Device, T>, what: &str) -> Result<&'a CudaBuf<T>> {
    ensure!(
        r.off == 0 && r.len == r.mem.len(),
        "{what}: a window of a buffer where the whole buffer is needed"
    );
    Ok(r.mem)
}

impl Kernels for Device {
    type A = bf16;
    type Mem<T: Elem> = CudaBuf<T>;
    type Rope = RopeTableGpu;
    type Perm = MoePermutation;
    type Ce = CrossEntropyGpu;

    fn kind(&self) -> &'static str {
        "cuda"
    }
    fn check_widths(&self, h: usize, inter: usize) -> Result<()> {
        ensure!(
            h % 8 == 0 && inter % 8 == 0,
            "the CUDA kernels need hidden ({h}) and intermediate ({inter}) sizes that are multiples of 8"
        );
        Ok(())
    }

    fn mem_len<T: Elem>(m: &CudaBuf<T>) -> usize {
        m.len()
    }
    fn alloc<T: Elem>(&self, len: usize) -> Result<Buf<Self, T>> {
        Ok(Buf(Device::alloc(self, len)?))
    }
    fn zeros<T: Elem>(&self, len: usize) -> Result<Buf<Self, T>> {
        Ok(Buf(Device::zeros(self, len)?))
    }
    fn upload<T: Elem>(&self, data: &[T]) -> Result<Buf<Self, T>> {
        Ok(Buf(Device::upload(self, data)?))
    }
    fn download<T: Elem>(&self, x: R<'_, Self, T>) -> Result<Vec<T>> {
        Device::download(self, &v(x))
    }
    fn copy<T: Elem>(&self, x: R<'_, Self, T>, y: W<'_, Self, T>) -> Result<()> {
        Device::copy(self, &v(x), &mut vm(y))
    }
    fn upload_f32_act(&self, data: &[f32]) -> Result<Buf<Self, bf16>> {
        Ok(Buf(self.upload_f32_as_bf16(data)?))
    }
    fn upload_tensors_act(&self, parts: &[&Tensor]) -> Result<Buf<Self, bf16>> {
        if let [t] = parts {
            if let Some(d) = t.bf16_data() {
                return Ok(Buf(Device::upload(self, d)?));
            }
        }
        let mut all: Vec<bf16> = Vec::with_capacity(parts.iter().map(|t| t.numel()).sum());
        for t in parts {
            match t.bf16_data() {
                Some(d) => all.extend_from_slice(d),
                None => all.extend(t.data().iter().map(|&x| bf16::from_f32(x))),
            }
        }
        Ok(Buf(Device::upload(self, &all)?))
    }
    fn download_act_f32(&self, x: R<'_, Self, bf16>) -> Result<Vec<f32>> {
        self.download_bf16_as_f32(&v(x))
    }

    fn f32_as_act(_: R<'_, Self, f32>) -> Option<R<'_, Self, bf16>> {
        None
    }
    fn act_as_f32(_: R<'_, Self, bf16>) -> Option<R<'_, Self, f32>> {
        None
    }
    fn act_to_f32(&self, x: R<'_, Self, bf16>, y: W<'_, Self, f32>) -> Result<()> {
        self.cast_bf16_to_f32(&v(x), &mut vm(y))
    }
    fn f32_to_act(&self, x: R<'_, Self, f32>, y: W<'_, Self, bf16>) -> Result<()> {
        self.cast_f32_to_bf16(&v(x), &mut vm(y))
    }
    fn add_scaled<T: Float>(
        &self,
        a: R<'_, Self, T>,
        b: R<'_, Self, T>,
        y: W<'_, Self, T>,
        alpha: f32,
    ) -> Result<()> {
        Device::add_scaled(self, &v(a), &v(b), &mut vm(y), alpha)
    }
    fn scale<T: Float>(&self, a: R<'_, Self, T>, y: W<'_, Self, T>, s: f32) -> Result<()> {
        Device::scale(self, &v(a), &mut vm(y), s)
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
        Device::gemm(
            self,
            m,
            n,
            k,
            &v(a),
            a_t,
            &v(b),
            b_t,
            &mut vm(c),
            accumulate,
        )
    }

    fn rmsnorm_fwd(
        &self,
        x: R<'_, Self, bf16>,
        w: R<'_, Self, bf16>,
        y: W<'_, Self, bf16>,
        rstd: W<'_, Self, f32>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        Device::rmsnorm_fwd(self, &v(x), &v(w), &mut vm(y), &mut vm(rstd), n, d, eps)
    }
    fn rmsnorm_bwd_dx(
        &self,
        x: R<'_, Self, bf16>,
        w: R<'_, Self, bf16>,
        dy: R<'_, Self, bf16>,
        rstd: R<'_, Self, f32>,
        dx: W<'_, Self, bf16>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        Device::rmsnorm_bwd_dx(self, &v(x), &v(w), &v(dy), &v(rstd), &mut vm(dx), n, d)
    }
    fn rmsnorm_bwd_dw(
        &self,
        x: R<'_, Self, bf16>,
        dy: R<'_, Self, bf16>,
        rstd: R<'_, Self, f32>,
        dw: W<'_, Self, f32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        Device::rmsnorm_bwd_dw(self, &v(x), &v(dy), &v(rstd), &mut vm(dw), n, d)
    }

    fn rope_table(&self, hd: usize, theta: f64, max_pos: usize) -> Result<RopeTableGpu> {
        Device::rope_table(self, hd, theta, max_pos)
    }
    fn rope(
        &self,
        x: R<'_, Self, bf16>,
        y: W<'_, Self, bf16>,
        table: &RopeTableGpu,
        rows: usize,
        width: usize,
        t_len: usize,
        offset: usize,
        inverse: bool,
    ) -> Result<()> {
        Device::rope(
            self,
            &v(x),
            &mut vm(y),
            table,
            rows,
            width,
            t_len,
            offset,
            inverse,
        )
    }

    fn attention_fwd(
        &self,
        q: R<'_, Self, bf16>,
        k: R<'_, Self, bf16>,
        val: R<'_, Self, bf16>,
        s: AttnShape,
        out: W<'_, Self, bf16>,
        lse: W<'_, Self, f32>,
    ) -> Result<()> {
        self.flash_attention_fwd(&v(q), &v(k), &v(val), s, &mut vm(out), &mut vm(lse))
    }
    fn attention_decode(
        &self,
        q: R<'_, Self, bf16>,
        k: R<'_, Self, bf16>,
        val: R<'_, Self, bf16>,
        s: AttnShape,
        out: W<'_, Self, bf16>,
        lse: W<'_, Self, f32>,
    ) -> Result<()> {
        self.flash_attention_decode(&v(q), &v(k), &v(val), s, &mut vm(out), &mut vm(lse))
    }
    fn attention_bwd(
        &self,
        q: R<'_, Self, bf16>,
        k: R<'_, Self, bf16>,
        val: R<'_, Self, bf16>,
        out: R<'_, Self, bf16>,
        lse: R<'_, Self, f32>,
        dout: R<'_, Self, bf16>,
        s: AttnShape,
        dq: W<'_, Self, bf16>,
        dk: W<'_, Self, bf16>,
        dv: W<'_, Self, bf16>,
    ) -> Result<()> {
        self.flash_attention_bwd(
            &v(q),
            &v(k),
            &v(val),
            &v(out),
            &v(lse),
            &v(dout),
            s,
            &mut vm(dq),
            &mut vm(dk),
            &mut vm(dv),
        )
    }

    fn embedding_fwd(
        &self,
        w: R<'_, Self, bf16>,
        vocab: usize,
        h: usize,
        ids: &[u32],
        y: W<'_, Self, bf16>,
    ) -> Result<()> {
        Device::embedding_fwd(self, &v(w), vocab, h, ids, &mut vm(y))
    }
    fn embedding_bwd(
        &self,
        dy: R<'_, Self, bf16>,
        ids: &[u32],
        vocab: usize,
        h: usize,
        dw: W<'_, Self, f32>,
    ) -> Result<()> {
        Device::embedding_bwd(self, &v(dy), ids, vocab, h, &mut vm(dw))
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
        Device::route(
            self,
            &v(z),
            bias.map(v),
            n,
            e,
            k,
            renorm,
            &mut vm(probs),
            &mut vm(weights),
            &mut vm(indices),
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
        Device::route_bwd(
            self,
            &v(probs),
            &v(weights),
            &v(indices),
            &v(gw),
            n,
            e,
            k,
            renorm,
            &mut vm(dz),
        )
    }
    fn route_bias_grad(
        &self,
        dz: R<'_, Self, f32>,
        bias: R<'_, Self, f32>,
        n: usize,
        e: usize,
        db: W<'_, Self, f32>,
    ) -> Result<()> {
        Device::route_bias_grad(self, &v(dz), &v(bias), n, e, &mut vm(db))
    }

    fn moe_permutation(
        &self,
        indices: R<'_, Self, u32>,
        n: usize,
        k: usize,
        e: usize,
    ) -> Result<MoePermutation> {
        Device::moe_permutation(self, &v(indices), n, k, e)
    }
    fn perm_offsets(p: &MoePermutation) -> R<'_, Self, u32> {
        R {
            mem: &p.offsets,
            off: 0,
            len: p.offsets.len(),
        }
    }
    fn moe_permute(
        &self,
        x: R<'_, Self, bf16>,
        perm: &MoePermutation,
        h: usize,
        xp: W<'_, Self, bf16>,
    ) -> Result<()> {
        Device::moe_permute(self, &v(x), perm, h, &mut vm(xp))
    }
    fn moe_permute_bwd(
        &self,
        dxp: R<'_, Self, bf16>,
        perm: &MoePermutation,
        h: usize,
        dx: W<'_, Self, bf16>,
    ) -> Result<()> {
        Device::moe_permute_bwd(self, &v(dxp), perm, h, &mut vm(dx))
    }
    fn moe_combine(
        &self,
        outs: R<'_, Self, bf16>,
        w: R<'_, Self, f32>,
        perm: &MoePermutation,
        h: usize,
        y: W<'_, Self, bf16>,
    ) -> Result<()> {
        Device::moe_combine(self, &v(outs), &v(w), perm, h, &mut vm(y))
    }
    fn moe_combine_bwd(
        &self,
        dy: R<'_, Self, bf16>,
        outs: R<'_, Self, bf16>,
        w: R<'_, Self, f32>,
        perm: &MoePermutation,
        h: usize,
        douts: W<'_, Self, bf16>,
        dw: W<'_, Self, f32>,
    ) -> Result<()> {
        Device::moe_combine_bwd(
            self,
            &v(dy),
            &v(outs),
            &v(w),
            perm,
            h,
            &mut vm(douts),
            &mut vm(dw),
        )
    }

    fn grouped_gateup_fwd(
        &self,
        x: R<'_, Self, bf16>,
        offsets: R<'_, Self, u32>,
        wg: R<'_, Self, bf16>,
        wu: R<'_, Self, bf16>,
        e: usize,
        h: usize,
        i: usize,
        act: W<'_, Self, bf16>,
        saved: Option<(W<'_, Self, bf16>, W<'_, Self, bf16>)>,
    ) -> Result<()> {
        Device::grouped_gateup_fwd(
            self,
            &v(x),
            &v(offsets),
            &v(wg),
            &v(wu),
            e,
            h,
            i,
            &mut vm(act),
            saved.map(|(g, u)| (vm(g), vm(u))),
        )
    }
    fn grouped_nt(
        &self,
        a: R<'_, Self, bf16>,
        offsets: R<'_, Self, u32>,
        w: R<'_, Self, bf16>,
        e: usize,
        k: usize,
        n: usize,
        y: W<'_, Self, bf16>,
    ) -> Result<()> {
        Device::grouped_nt(self, &v(a), &v(offsets), &v(w), e, k, n, &mut vm(y))
    }
    fn grouped_nn_swiglu_bwd(
        &self,
        dy: R<'_, Self, bf16>,
        offsets: R<'_, Self, u32>,
        wd: R<'_, Self, bf16>,
        gate: R<'_, Self, bf16>,
        up: R<'_, Self, bf16>,
        e: usize,
        h: usize,
        i: usize,
        dgate: W<'_, Self, bf16>,
        dup: W<'_, Self, bf16>,
    ) -> Result<()> {
        Device::grouped_nn_swiglu_bwd(
            self,
            &v(dy),
            &v(offsets),
            &v(wd),
            &v(gate),
            &v(up),
            e,
            h,
            i,
            &mut vm(dgate),
            &mut vm(dup),
        )
    }
    fn grouped_nn(
        &self,
        dy: R<'_, Self, bf16>,
        offsets: R<'_, Self, u32>,
        w: R<'_, Self, bf16>,
        second: Option<(R<'_, Self, bf16>, R<'_, Self, bf16>)>,
        e: usize,
        k: usize,
        n: usize,
        dx: W<'_, Self, bf16>,
    ) -> Result<()> {
        Device::grouped_nn(
            self,
            &v(dy),
            &v(offsets),
            &v(w),
            second.map(|(a, b)| (v(a), v(b))),
            e,
            k,
            n,
            &mut vm(dx),
        )
    }
    fn grouped_wgrad(
        &self,
        dy: R<'_, Self, bf16>,
        x: R<'_, Self, bf16>,
        offsets: R<'_, Self, u32>,
        second: Option<(R<'_, Self, bf16>, W<'_, Self, f32>)>,
        e: usize,
        n: usize,
        k: usize,
        dw: W<'_, Self, f32>,
    ) -> Result<()> {
        Device::grouped_wgrad(
            self,
            &v(dy),
            &v(x),
            &v(offsets),
            None,
            second.map(|(a, b)| (v(a), vm(b))),
            e,
            n,
            k,
            false,
            &mut vm(dw),
        )
    }

    fn cross_entropy(
        &self,
        logits: R<'_, Self, bf16>,
        n: usize,
        vocab: usize,
        targets: &[u32],
        z_coef: f32,
    ) -> Result<CrossEntropyGpu> {
        Device::cross_entropy(self, &v(logits), n, vocab, targets, z_coef)
    }
    fn ce_stats(c: &CrossEntropyGpu) -> CeStats {
        CeStats {
            loss: c.loss,
            ce: c.ce,
            n_valid: c.n_valid,
        }
    }
    fn cross_entropy_bwd(
        &self,
        logits: R<'_, Self, bf16>,
        saved: &CrossEntropyGpu,
        dloss: f32,
        dlogits: W<'_, Self, bf16>,
    ) -> Result<()> {
        Device::cross_entropy_bwd(self, &v(logits), saved, dloss, &mut vm(dlogits))
    }
    fn router_zloss(
        &self,
        z: R<'_, Self, f32>,
        n: usize,
        e: usize,
        lse: W<'_, Self, f32>,
    ) -> Result<f32> {
        Device::router_zloss(self, &v(z), n, e, &mut vm(lse))
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
        Device::router_zloss_bwd(self, &v(z), &v(lse), n, e, dloss, &mut vm(dz))
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
        Device::router_ce(self, &v(z), targets, n, e, coef, &mut vm(dz))
    }
    fn rel_sq_err(
        &self,
        a: R<'_, Self, bf16>,
        b: R<'_, Self, bf16>,
        mask: R<'_, Self, u32>,
        n: usize,
        h: usize,
    ) -> Result<(f32, Buf<Self, f64>)> {
        let (value, sums) =
            Device::rel_sq_err(self, &v(a), &v(b), whole(mask, "rel_sq_err mask")?, n, h)?;
        Ok((value, Buf(sums)))
    }
    fn rel_sq_err_bwd(
        &self,
        a: R<'_, Self, bf16>,
        b: R<'_, Self, bf16>,
        mask: R<'_, Self, u32>,
        sums: R<'_, Self, f64>,
        n: usize,
        h: usize,
        coef: f32,
        da: W<'_, Self, f32>,
        db: W<'_, Self, bf16>,
    ) -> Result<()> {
        Device::rel_sq_err_bwd(
            self,
            &v(a),
            &v(b),
            whole(mask, "rel_sq_err mask")?,
            whole(sums, "rel_sq_err sums")?,
            n,
            h,
            coef,
            &mut vm(da),
            &mut vm(db),
        )
    }

    fn grad_norm(&self, grads: &[R<'_, Self, f32>], max_norm: f32) -> Result<Buf<Self, f32>> {
        let views: Vec<View<'_, f32>> = grads.iter().map(|g| v(*g)).collect();
        Ok(Buf(Device::grad_norm(self, &views, max_norm)?))
    }
    fn adamw_step(
        &self,
        slots: &mut [AdamWSlot<'_, Self>],
        hp: AdamWHyper,
        grad_scale: Option<R<'_, Self, f32>>,
    ) -> Result<()> {
        let mut cuda: Vec<CudaSlot<'_>> = slots
            .iter_mut()
            .map(|s| CudaSlot {
                param: vm(s.param.re()),
                grad: v(s.grad),
                m: vm(s.m.re()),
                v: vm(s.v.re()),
                weight_decay: s.weight_decay,
                decay_to: s.decay_to.map(v),
                param_bf16: s.param_act.as_mut().map(|p| vm(p.re())),
            })
            .collect();
        Device::adamw_step(self, &mut cuda, hp, grad_scale.map(v))
    }
}
