//! The backend interface: the kernel families the model is written over ([`Kernels`]), and the
//! buffers they read and write ([`Buf`], [`R`], [`W`]).
//!
//! `model::net` writes the transformer's forward, backward, loss terms and training step once,
//! as calls to these primitives. Two backends implement them: `backend::cuda::Device` (flexrun's
//! CUDA kernels, bf16 activations, f32 statistics) and `ops::host::Host` (the CPU kernels the
//! ops on the autograd tape run, all f32). Each primitive keeps the argument meanings of its
//! CUDA wrapper (`src/backend/cuda/<family>.rs`), where the shapes are documented.

use crate::backend::cuda::{DeviceType, FloatType, GemmType};
use crate::backend::shapes::AttnShape;
use crate::error::Result;
use crate::tensor::Tensor;
use half::bf16;
use std::ops::{Bound, Range, RangeBounds};

/// Element types of backend buffers.
pub trait Elem: DeviceType {}
impl<T: DeviceType> Elem for T {}

/// Floating-point elements: f32 and bf16.
pub trait Float: Elem + GemmType + FloatType {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}
impl Float for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl Float for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// A buffer owned by backend `K`.
pub struct Buf<K: Kernels, T: Elem>(pub K::Mem<T>);

/// A window of a buffer to read.
pub struct R<'a, K: Kernels, T: Elem> {
    pub mem: &'a K::Mem<T>,
    pub off: usize,
    pub len: usize,
}

/// A window of a buffer to write.
pub struct W<'a, K: Kernels, T: Elem> {
    pub mem: &'a mut K::Mem<T>,
    pub off: usize,
    pub len: usize,
}

impl<K: Kernels, T: Elem> Clone for R<'_, K, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K: Kernels, T: Elem> Copy for R<'_, K, T> {}

fn bounds(r: impl RangeBounds<usize>, len: usize) -> Range<usize> {
    let s = match r.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let e = match r.end_bound() {
        Bound::Included(&e) => e + 1,
        Bound::Excluded(&e) => e,
        Bound::Unbounded => len,
    };
    assert!(s <= e && e <= len, "window {s}..{e} of a buffer of {len}");
    s..e
}

impl<K: Kernels, T: Elem> Buf<K, T> {
    pub fn len(&self) -> usize {
        K::mem_len(&self.0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// All of it, to read.
    pub fn r(&self) -> R<'_, K, T> {
        R {
            mem: &self.0,
            off: 0,
            len: self.len(),
        }
    }
    /// Elements `range`, to read.
    pub fn at(&self, range: impl RangeBounds<usize>) -> R<'_, K, T> {
        self.r().at(range)
    }
    /// All of it, to write.
    pub fn w(&mut self) -> W<'_, K, T> {
        let len = self.len();
        W {
            mem: &mut self.0,
            off: 0,
            len,
        }
    }
    /// Elements `range`, to write.
    pub fn w_at(&mut self, range: impl RangeBounds<usize>) -> W<'_, K, T> {
        let r = bounds(range, self.len());
        W {
            mem: &mut self.0,
            off: r.start,
            len: r.len(),
        }
    }
}

impl<'a, K: Kernels, T: Elem> R<'a, K, T> {
    /// Elements `range` of this window.
    pub fn at(self, range: impl RangeBounds<usize>) -> R<'a, K, T> {
        let r = bounds(range, self.len);
        R {
            mem: self.mem,
            off: self.off + r.start,
            len: r.len(),
        }
    }
    pub fn range(&self) -> Range<usize> {
        self.off..self.off + self.len
    }
}

impl<K: Kernels, T: Elem> W<'_, K, T> {
    pub fn r(&self) -> R<'_, K, T> {
        R {
            mem: self.mem,
            off: self.off,
            len: self.len,
        }
    }
    /// The same window, borrowed again (to pass on and keep).
    pub fn re(&mut self) -> W<'_, K, T> {
        W {
            mem: self.mem,
            off: self.off,
            len: self.len,
        }
    }
    pub fn range(&self) -> Range<usize> {
        self.off..self.off + self.len
    }
}

/// One tensor of an AdamW step (see `backend::cuda::AdamWSlot`): f32 master weight, gradient
/// and moments of equal length, its weight decay and decay target, and optionally the
/// activation-precision copy of the weight to refresh (None where the weight is its master).
pub struct AdamWSlot<'a, K: Kernels> {
    pub param: W<'a, K, f32>,
    pub grad: R<'a, K, f32>,
    pub m: W<'a, K, f32>,
    pub v: W<'a, K, f32>,
    pub weight_decay: f32,
    pub decay_to: Option<R<'a, K, f32>>,
    pub param_act: Option<W<'a, K, K::A>>,
}

pub use crate::backend::cuda::AdamWHyper;

/// The scalars of a cross-entropy forward (the backend keeps what its backward needs).
#[derive(Clone, Copy, Debug)]
pub struct CeStats {
    /// `mean(ce) + z_coef * mean(lse^2)` over the valid rows.
    pub loss: f32,
    /// Mean cross-entropy alone.
    pub ce: f32,
    pub n_valid: usize,
}

/// The kernel families of the model: what a backend implements so that `model::net` runs on it.
/// Outputs are overwritten unless a primitive says it accumulates.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub trait Kernels: Sized + Send + Sync {
    /// The element type of weights and of the activations between kernels (bf16 on the GPU,
    /// f32 on the CPU). The residual stream, statistics, router and gradients of weights are
    /// f32 everywhere.
    type A: Float;
    /// A buffer's storage.
    type Mem<T: Elem>: Send + Sync;
    /// RoPE's cos/sin table.
    type Rope: Send + Sync;
    /// The grouping of token copies by expert ([`Kernels::moe_permutation`]).
    type Perm: Send + Sync;
    /// What the cross-entropy's backward needs.
    type Ce: Send + Sync;

    /// A short name for messages ("cpu", "cuda").
    fn kind(&self) -> &'static str;
    /// Refuse model widths the backend's kernels do not take (one-line error).
    fn check_widths(&self, _hidden: usize, _intermediate: usize) -> Result<()> {
        Ok(())
    }
    /// Give cached free buffers back to the system (between phases of work of other sizes).
    fn release_cached(&self) {}

    // Memory.
    fn mem_len<T: Elem>(m: &Self::Mem<T>) -> usize;
    /// A buffer of `len` elements whose contents are unspecified (every user writes it first).
    fn alloc<T: Elem>(&self, len: usize) -> Result<Buf<Self, T>>;
    fn zeros<T: Elem>(&self, len: usize) -> Result<Buf<Self, T>>;
    fn upload<T: Elem>(&self, data: &[T]) -> Result<Buf<Self, T>>;
    fn download<T: Elem>(&self, x: R<'_, Self, T>) -> Result<Vec<T>>;
    fn copy<T: Elem>(&self, x: R<'_, Self, T>, y: W<'_, Self, T>) -> Result<()>;
    /// Host f32 values as activations (rounded to bf16 on the GPU).
    fn upload_f32_act(&self, data: &[f32]) -> Result<Buf<Self, Self::A>>;
    /// Host tensors (f32 or bf16 storage) concatenated into one buffer of activations: a
    /// weight, or the experts' weights stacked `[E, out, in]`. bf16 storage goes to the GPU as
    /// it is, without an f32 copy on the host.
    fn upload_tensors_act(&self, parts: &[&Tensor]) -> Result<Buf<Self, Self::A>>;
    /// Activations as host f32 values.
    fn download_act_f32(&self, x: R<'_, Self, Self::A>) -> Result<Vec<f32>>;

    /// `x` as activations without a copy, where activations are f32 (the CPU); None elsewhere.
    fn f32_as_act(x: R<'_, Self, f32>) -> Option<R<'_, Self, Self::A>>;
    /// Activations as f32 without a copy, where they are f32; None elsewhere.
    fn act_as_f32(x: R<'_, Self, Self::A>) -> Option<R<'_, Self, f32>>;

    // Elementwise.
    /// `y = f32(x)`.
    fn act_to_f32(&self, x: R<'_, Self, Self::A>, y: W<'_, Self, f32>) -> Result<()>;
    /// `y = act(x)` (round to nearest even on the GPU).
    fn f32_to_act(&self, x: R<'_, Self, f32>, y: W<'_, Self, Self::A>) -> Result<()>;
    /// `y = a + alpha * b`.
    fn add_scaled<T: Float>(
        &self,
        a: R<'_, Self, T>,
        b: R<'_, Self, T>,
        y: W<'_, Self, T>,
        alpha: f32,
    ) -> Result<()>;
    /// `y = s * a`.
    fn scale<T: Float>(&self, a: R<'_, Self, T>, y: W<'_, Self, T>, s: f32) -> Result<()>;

    /// `c[m,n] (+)= a[m,k] @ b[k,n]`, row-major; `a_t`: `a` stored `[k,m]`, `b_t`: `b` stored
    /// `[n,k]`; accumulation in f32.
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
    ) -> Result<()>;

    // RMSNorm over rows of width d.
    fn rmsnorm_fwd(
        &self,
        x: R<'_, Self, Self::A>,
        w: R<'_, Self, Self::A>,
        y: W<'_, Self, Self::A>,
        rstd: W<'_, Self, f32>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()>;
    fn rmsnorm_bwd_dx(
        &self,
        x: R<'_, Self, Self::A>,
        w: R<'_, Self, Self::A>,
        dy: R<'_, Self, Self::A>,
        rstd: R<'_, Self, f32>,
        dx: W<'_, Self, Self::A>,
        n: usize,
        d: usize,
    ) -> Result<()>;
    fn rmsnorm_bwd_dw(
        &self,
        x: R<'_, Self, Self::A>,
        dy: R<'_, Self, Self::A>,
        rstd: R<'_, Self, f32>,
        dw: W<'_, Self, f32>,
        n: usize,
        d: usize,
    ) -> Result<()>;

    // Rotary embedding (rotate-half), positions `offset + row % t_len`; `inverse`: the backward.
    fn rope_table(&self, hd: usize, theta: f64, max_pos: usize) -> Result<Self::Rope>;
    fn rope(
        &self,
        x: R<'_, Self, Self::A>,
        y: W<'_, Self, Self::A>,
        table: &Self::Rope,
        rows: usize,
        width: usize,
        t_len: usize,
        offset: usize,
        inverse: bool,
    ) -> Result<()>;

    // Causal attention (GQA), the log-sum-exp `[b, nh, tq]` saved for the backward.
    fn attention_fwd(
        &self,
        q: R<'_, Self, Self::A>,
        k: R<'_, Self, Self::A>,
        v: R<'_, Self, Self::A>,
        s: AttnShape,
        out: W<'_, Self, Self::A>,
        lse: W<'_, Self, f32>,
    ) -> Result<()>;
    /// One new query per sequence against a KV cache.
    fn attention_decode(
        &self,
        q: R<'_, Self, Self::A>,
        k: R<'_, Self, Self::A>,
        v: R<'_, Self, Self::A>,
        s: AttnShape,
        out: W<'_, Self, Self::A>,
        lse: W<'_, Self, f32>,
    ) -> Result<()>;
    fn attention_bwd(
        &self,
        q: R<'_, Self, Self::A>,
        k: R<'_, Self, Self::A>,
        v: R<'_, Self, Self::A>,
        out: R<'_, Self, Self::A>,
        lse: R<'_, Self, f32>,
        dout: R<'_, Self, Self::A>,
        s: AttnShape,
        dq: W<'_, Self, Self::A>,
        dk: W<'_, Self, Self::A>,
        dv: W<'_, Self, Self::A>,
    ) -> Result<()>;

    // Embedding: rows of `w [vocab, h]`; the backward sums rows per id (overwrites `dw`).
    fn embedding_fwd(
        &self,
        w: R<'_, Self, Self::A>,
        vocab: usize,
        h: usize,
        ids: &[u32],
        y: W<'_, Self, Self::A>,
    ) -> Result<()>;
    fn embedding_bwd(
        &self,
        dy: R<'_, Self, Self::A>,
        ids: &[u32],
        vocab: usize,
        h: usize,
        dw: W<'_, Self, f32>,
    ) -> Result<()>;

    // Routing: softmax of `z + min(bias, 0)`, top-k, optional renormalisation.
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
    ) -> Result<()>;
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
    ) -> Result<()>;
    /// Column sums of `dz`, zero where `bias > 0`.
    fn route_bias_grad(
        &self,
        dz: R<'_, Self, f32>,
        bias: R<'_, Self, f32>,
        n: usize,
        e: usize,
        db: W<'_, Self, f32>,
    ) -> Result<()>;

    // The token copies grouped by expert (tokens ascending within an expert).
    fn moe_permutation(
        &self,
        indices: R<'_, Self, u32>,
        n: usize,
        k: usize,
        e: usize,
    ) -> Result<Self::Perm>;
    /// `[e + 1]` start of each expert's rows in the grouped layout.
    fn perm_offsets(p: &Self::Perm) -> R<'_, Self, u32>;
    fn moe_permute(
        &self,
        x: R<'_, Self, Self::A>,
        perm: &Self::Perm,
        h: usize,
        xp: W<'_, Self, Self::A>,
    ) -> Result<()>;
    fn moe_permute_bwd(
        &self,
        dxp: R<'_, Self, Self::A>,
        perm: &Self::Perm,
        h: usize,
        dx: W<'_, Self, Self::A>,
    ) -> Result<()>;
    fn moe_combine(
        &self,
        outs: R<'_, Self, Self::A>,
        w: R<'_, Self, f32>,
        perm: &Self::Perm,
        h: usize,
        y: W<'_, Self, Self::A>,
    ) -> Result<()>;
    fn moe_combine_bwd(
        &self,
        dy: R<'_, Self, Self::A>,
        outs: R<'_, Self, Self::A>,
        w: R<'_, Self, f32>,
        perm: &Self::Perm,
        h: usize,
        douts: W<'_, Self, Self::A>,
        dw: W<'_, Self, f32>,
    ) -> Result<()>;

    // The experts' FFN over the grouped rows (segments `offsets[e]..offsets[e+1]`).
    /// `act = silu(x wg_e^T) * (x wu_e^T)`; `saved`: also the pre-activations (gate, up).
    fn grouped_gateup_fwd(
        &self,
        x: R<'_, Self, Self::A>,
        offsets: R<'_, Self, u32>,
        wg: R<'_, Self, Self::A>,
        wu: R<'_, Self, Self::A>,
        e: usize,
        h: usize,
        i: usize,
        act: W<'_, Self, Self::A>,
        saved: Option<(W<'_, Self, Self::A>, W<'_, Self, Self::A>)>,
    ) -> Result<()>;
    /// `y[seg] = a[seg] w_e^T` (w `[e, n, k]`).
    fn grouped_nt(
        &self,
        a: R<'_, Self, Self::A>,
        offsets: R<'_, Self, u32>,
        w: R<'_, Self, Self::A>,
        e: usize,
        k: usize,
        n: usize,
        y: W<'_, Self, Self::A>,
    ) -> Result<()>;
    /// Through the down projection and the SwiGLU: `dgate`, `dup` from `dy wd_e` and the saved
    /// pre-activations.
    fn grouped_nn_swiglu_bwd(
        &self,
        dy: R<'_, Self, Self::A>,
        offsets: R<'_, Self, u32>,
        wd: R<'_, Self, Self::A>,
        gate: R<'_, Self, Self::A>,
        up: R<'_, Self, Self::A>,
        e: usize,
        h: usize,
        i: usize,
        dgate: W<'_, Self, Self::A>,
        dup: W<'_, Self, Self::A>,
    ) -> Result<()>;
    /// `dx[seg] = dy[seg] w_e (+ dy2[seg] w2_e)` (w `[e, k, n]`).
    fn grouped_nn(
        &self,
        dy: R<'_, Self, Self::A>,
        offsets: R<'_, Self, u32>,
        w: R<'_, Self, Self::A>,
        second: Option<(R<'_, Self, Self::A>, R<'_, Self, Self::A>)>,
        e: usize,
        k: usize,
        n: usize,
        dx: W<'_, Self, Self::A>,
    ) -> Result<()>;
    /// `dw[e] = dy[seg]^T x[seg]` (f32 `[e, n, k]`; zeros for an expert without rows);
    /// `second`: `dw2` from `dy2` with the same x.
    fn grouped_wgrad(
        &self,
        dy: R<'_, Self, Self::A>,
        x: R<'_, Self, Self::A>,
        offsets: R<'_, Self, u32>,
        second: Option<(R<'_, Self, Self::A>, W<'_, Self, f32>)>,
        e: usize,
        n: usize,
        k: usize,
        dw: W<'_, Self, f32>,
    ) -> Result<()>;

    // Losses.
    /// Cross-entropy of `logits [n, v]` against `targets` plus `z_coef * lse^2`, averaged over
    /// the rows whose target is not `IGNORE`.
    fn cross_entropy(
        &self,
        logits: R<'_, Self, Self::A>,
        n: usize,
        v: usize,
        targets: &[u32],
        z_coef: f32,
    ) -> Result<Self::Ce>;
    fn ce_stats(c: &Self::Ce) -> CeStats;
    fn cross_entropy_bwd(
        &self,
        logits: R<'_, Self, Self::A>,
        saved: &Self::Ce,
        dloss: f32,
        dlogits: W<'_, Self, Self::A>,
    ) -> Result<()>;
    /// `mean_n lse(z_n)^2`, the per-row lse kept for the backward.
    fn router_zloss(
        &self,
        z: R<'_, Self, f32>,
        n: usize,
        e: usize,
        lse: W<'_, Self, f32>,
    ) -> Result<f32>;
    fn router_zloss_bwd(
        &self,
        z: R<'_, Self, f32>,
        lse: R<'_, Self, f32>,
        n: usize,
        e: usize,
        dloss: f32,
        dz: W<'_, Self, f32>,
    ) -> Result<()>;
    /// `coef * mean(ce(z, targets))` over valid rows; its gradient is added to `dz`.
    fn router_ce(
        &self,
        z: R<'_, Self, f32>,
        targets: &[u32],
        n: usize,
        e: usize,
        coef: f32,
        dz: W<'_, Self, f32>,
    ) -> Result<f32>;
    /// `S / T` over the rows `mask` marks; `[S, T]` (f64) kept for the backward.
    fn rel_sq_err(
        &self,
        a: R<'_, Self, Self::A>,
        b: R<'_, Self, Self::A>,
        mask: R<'_, Self, u32>,
        n: usize,
        h: usize,
    ) -> Result<(f32, Buf<Self, f64>)>;
    /// `da += coef d/da` (f32), `db = coef d/db`.
    fn rel_sq_err_bwd(
        &self,
        a: R<'_, Self, Self::A>,
        b: R<'_, Self, Self::A>,
        mask: R<'_, Self, u32>,
        sums: R<'_, Self, f64>,
        n: usize,
        h: usize,
        coef: f32,
        da: W<'_, Self, f32>,
        db: W<'_, Self, Self::A>,
    ) -> Result<()>;

    // The optimizer.
    /// `[norm, clip coefficient]` of the global L2 norm of `grads` (see
    /// `backend::cuda::Device::grad_norm`).
    fn grad_norm(&self, grads: &[R<'_, Self, f32>], max_norm: f32) -> Result<Buf<Self, f32>>;
    fn adamw_step(
        &self,
        slots: &mut [AdamWSlot<'_, Self>],
        hp: AdamWHyper,
        grad_scale: Option<R<'_, Self, f32>>,
    ) -> Result<()>;
}
