//! Grouped expert GEMM wrappers (kernels/grouped_gemm.cu): one launch runs every expert's GEMM
//! over its contiguous segment of the expert-permuted rows (`offsets [e+1]` from
//! [`Device::moe_permutation`]: expert e's rows are `offsets[e]..offsets[e+1]`). Their benchmark,
//! `flexrun bench moe`, is `crate::bench::moe`.
//!
//! CPU reference: per expert, `model::swiglu_ffn` (`ops::linear` + `ops::swiglu`) on the rows
//! `ops::gather_rows` picks. Test: tests/gpu_grouped.rs.
//!
//! The MoE FFN on the permuted rows `xp [m, h]` with the stacked expert weights in the HF layout
//! (`wg`, `wu [e, i, h]`, `wd [e, h, i]`, bf16):
//! - forward: [`Device::grouped_gateup_fwd`] (act, and the saved gate/up), then
//!   [`Device::grouped_nt`] (`y = act @ wd_e^T`);
//! - backward from `dy [m, h]`: [`Device::grouped_nn_swiglu_bwd`] (dgate, dup),
//!   [`Device::grouped_nn`] with the second pair (`dxp = dgate @ wg_e + dup @ wu_e`),
//!   [`Device::grouped_wgrad`] twice (`dwd = dy^T act`; `dwg, dwu` from `dgate, dup` and `xp` in
//!   one launch), with a per-expert mask that skips frozen experts.
//!
//! Every width must be a multiple of 8 and every bf16 operand 16-byte aligned (the kernels copy
//! 16-byte chunks); f32 gradients must be 8-byte aligned. The offsets are read on the device
//! only (no synchronisation): they must be non-decreasing with `offsets[e] <= m` (the kernels
//! clamp rows to `0..m`, so bad offsets give wrong results, never out-of-bounds accesses). Rows
//! outside `offsets[0]..offsets[e]` of an output are not written.

use super::tma::{matrix_map, stacked_map};
use super::{int, launch, Device, DeviceRead, DeviceWrite, KernelPath, View, ViewMut};
use crate::ensure;
use crate::error::Result;
use half::bf16;

/// Most experts one launch handles (the device-side scheduler scans two experts per lane of one
/// warp); kernels/grouped_gemm.cu MAX_EXPERTS.
pub const GROUPED_MAX_EXPERTS: usize = 64;
/// CTA tile rows and columns of the kernels (grouped_gemm.cu BM, BN).
const TILE_M: usize = 128;
const TILE_N: usize = 128;
/// Intermediate columns per CTA of the fused gate/up kernel (64 gate + 64 up), GATEUP_BN.
const GATEUP_TILE_N: usize = 64;
/// Threads per CTA (grouped_gemm.cu THREADS).
const THREADS: u32 = 256;
/// Dynamic shared memory per CTA (grouped_gemm.cu SMEM_BYTES): STAGES (4) stages of two
/// [128, BK + 8] bf16 operand tiles with BK = 32.
const SMEM_BYTES: usize = 4 * 2 * 128 * (32 + 8) * 2;

/// The Hopper kernels' CTA tile (grouped_gemm_sm90.cu BM, BN): 128 rows x 256 columns (128
/// gate + 128 up columns of the fused gate/up kernel).
const SM90_TILE_M: usize = 128;
const SM90_TILE_N: usize = 256;
/// K per pipeline stage of the Hopper kernels (BK): the NN kernels' weight boxes are BK rows.
const SM90_BK: usize = 64;
/// Dynamic shared memory of the Hopper kernels (grouped_gemm_sm90.cu SMEM_BYTES): 4 stages of a
/// [128, 64] and a [256, 64] bf16 tile, 8 mbarriers, and 1024 bytes to align the base.
const SM90_SMEM_BYTES: usize = 4 * (SM90_TILE_M + SM90_TILE_N) * 64 * 2 + 8 * 8 + 1024;
/// Threads of the Hopper kernels: a producer and two consumer warpgroups.
const SM90_THREADS: u32 = 384;

pub(crate) fn check_width(x: usize, what: &str) -> Result<()> {
    ensure!(
        x > 0 && x.is_multiple_of(8),
        "grouped GEMM: {what} = {x} must be a positive multiple of 8"
    );
    Ok(())
}

fn check_align(ptr: u64, align: u64, what: &str) -> Result<()> {
    ensure!(
        ptr.is_multiple_of(align),
        "grouped GEMM: {what} at {ptr:#x} is not {align}-byte aligned"
    );
    Ok(())
}

fn check_experts(e: usize, offsets: &impl DeviceRead<u32>) -> Result<()> {
    ensure!(
        (1..=GROUPED_MAX_EXPERTS).contains(&e),
        "grouped GEMM: {e} experts (1..={GROUPED_MAX_EXPERTS} supported)"
    );
    ensure!(
        offsets.len() == e + 1,
        "grouped GEMM: offsets hold {}, not {} experts + 1",
        offsets.len(),
        e
    );
    Ok(())
}

/// Rows of a `[m, width]` operand, or an error when its length is not a multiple of the width.
fn rows_of(len: usize, width: usize, what: &str) -> Result<usize> {
    ensure!(
        len.is_multiple_of(width),
        "grouped GEMM: {what} holds {len} values, not rows of {width}"
    );
    Ok(len / width)
}

/// Grid of the offset-scheduled kernels: an upper bound on the tiles, `(ceil(m/128) + e) * n_tiles`
/// (sum over experts of ceil(rows_e / 128) < m/128 + e), so the offsets never go to the host.
fn sched_grid(m: usize, e: usize, n_tiles: usize) -> Result<(u32, u32, u32)> {
    sched_grid_rows(m, TILE_M, e, n_tiles)
}

/// [`sched_grid`] for kernels whose CTA tile has `bm` rows.
fn sched_grid_rows(m: usize, bm: usize, e: usize, n_tiles: usize) -> Result<(u32, u32, u32)> {
    let x = (m.div_ceil(bm) + e) * n_tiles;
    ensure!(
        x <= i32::MAX as usize,
        "grouped GEMM: {x} tiles exceed the grid limit"
    );
    Ok((x as u32, 1, 1))
}

impl Device {
    /// Fused gate/up projection and SwiGLU per expert segment:
    /// `act[seg] = silu(x[seg] wg_e^T) * (x[seg] wu_e^T)`. x `[m, h]`, wg / wu `[e, i, h]`,
    /// act `[m, i]` (all bf16); `saved = Some((gate, up))` also stores the pre-activations
    /// `[m, i]` that [`Device::grouped_nn_swiglu_bwd`] needs (None for inference).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_gateup_fwd(
        &self,
        x: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        wg: &impl DeviceRead<bf16>,
        wu: &impl DeviceRead<bf16>,
        e: usize,
        h: usize,
        i: usize,
        act: &mut impl DeviceWrite<bf16>,
        saved: Option<(ViewMut<'_, bf16>, ViewMut<'_, bf16>)>,
    ) -> Result<()> {
        self.grouped_gateup_fwd_on(self.kernel_path(), x, offsets, wg, wu, e, h, i, act, saved)
    }

    /// [`Device::grouped_gateup_fwd`] on the given path (see [`Device::grouped_nt_on`]).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_gateup_fwd_on(
        &self,
        path: KernelPath,
        x: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        wg: &impl DeviceRead<bf16>,
        wu: &impl DeviceRead<bf16>,
        e: usize,
        h: usize,
        i: usize,
        act: &mut impl DeviceWrite<bf16>,
        saved: Option<(ViewMut<'_, bf16>, ViewMut<'_, bf16>)>,
    ) -> Result<()> {
        check_experts(e, offsets)?;
        check_width(h, "hidden")?;
        check_width(i, "intermediate")?;
        let m = rows_of(x.len(), h, "x")?;
        ensure!(
            wg.len() == e * i * h && wu.len() == e * i * h,
            "grouped gate/up: weights are not [{e}, {i}, {h}]"
        );
        ensure!(
            act.len() == m * i,
            "grouped gate/up: act holds {}, not [{m}, {i}]",
            act.len()
        );
        let (gp, up) = match &saved {
            Some((g, u)) => {
                ensure!(
                    g.len() == m * i && u.len() == m * i,
                    "grouped gate/up: saved gate/up are not [{m}, {i}]"
                );
                (g.dptr(), u.dptr())
            }
            None => (0, 0),
        };
        for (p, what) in [
            (x.dptr(), "x"),
            (wg.dptr(), "wg"),
            (wu.dptr(), "wu"),
            (act.dptr(), "act"),
            (gp, "gate"),
            (up, "up"),
        ] {
            check_align(p, 16, what)?;
        }
        match path {
            KernelPath::Sm80 => {
                let grid = sched_grid(m, e, i.div_ceil(GATEUP_TILE_N))?;
                launch!(self, "grouped_gemm", "grouped_gateup_fwd_bf16", grid, THREADS, smem = SMEM_BYTES;
                x.dptr(), wg.dptr(), wu.dptr(), offsets.dptr(), act.dptr(), gp, up, int(m, "rows")?, int(e, "experts")?,
                int(h, "hidden")?, int(i, "intermediate")?)
            }
            KernelPath::Sm90 => {
                self.require_sm90("grouped GEMM")?;
                if m == 0 {
                    return Ok(()); // no rows: nothing to write (and TMA maps need rows)
                }
                let what = "grouped gate/up (Hopper)";
                let grid = sched_grid_rows(m, SM90_TILE_M, e, i.div_ceil(SM90_TILE_N / 2))?;
                let tm_x = matrix_map(x.dptr(), m, h, SM90_TILE_M, what)?;
                let tm_wg = matrix_map(wg.dptr(), e * i, h, SM90_TILE_N / 2, what)?;
                let tm_wu = matrix_map(wu.dptr(), e * i, h, SM90_TILE_N / 2, what)?;
                launch!(self, "grouped_gemm_sm90", "grouped_gateup_fwd_sm90_bf16", grid, SM90_THREADS, smem = SM90_SMEM_BYTES;
                    tm_x, tm_wg, tm_wu, offsets.dptr(), act.dptr(), gp, up, int(m, "rows")?, int(e, "experts")?,
                    int(h, "hidden")?, int(i, "intermediate")?)
            }
        }
    }

    /// `y[seg] = a[seg] w_e^T` per expert segment: a `[m, k]`, w `[e, n, k]`, y `[m, n]` (bf16).
    /// The down projection's forward (k = I, n = H), on [`Device::kernel_path`].
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_nt(
        &self,
        a: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        w: &impl DeviceRead<bf16>,
        e: usize,
        k: usize,
        n: usize,
        y: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        self.grouped_nt_on(self.kernel_path(), a, offsets, w, e, k, n, y)
    }

    /// [`Device::grouped_nt`] on the given path (tests and benchmarks compare the two); the
    /// Hopper path is an error on any other GPU.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_nt_on(
        &self,
        path: KernelPath,
        a: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        w: &impl DeviceRead<bf16>,
        e: usize,
        k: usize,
        n: usize,
        y: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        check_experts(e, offsets)?;
        check_width(k, "k")?;
        check_width(n, "n")?;
        let m = rows_of(a.len(), k, "a")?;
        ensure!(
            w.len() == e * n * k,
            "grouped NT: weights are not [{e}, {n}, {k}]"
        );
        ensure!(
            y.len() == m * n,
            "grouped NT: output holds {}, not [{m}, {n}]",
            y.len()
        );
        for (p, what) in [(a.dptr(), "a"), (w.dptr(), "w"), (y.dptr(), "y")] {
            check_align(p, 16, what)?;
        }
        match path {
            KernelPath::Sm80 => {
                let grid = sched_grid(m, e, n.div_ceil(TILE_N))?;
                launch!(self, "grouped_gemm", "grouped_nt_bf16", grid, THREADS, smem = SMEM_BYTES;
                a.dptr(), w.dptr(), offsets.dptr(), y.dptr(), int(m, "rows")?, int(e, "experts")?, int(k, "k")?, int(n, "n")?)
            }
            KernelPath::Sm90 => {
                self.require_sm90("grouped GEMM")?;
                if m == 0 {
                    return Ok(()); // no rows: nothing to write (and TMA maps need rows)
                }
                let what = "grouped NT (Hopper)";
                let grid = sched_grid_rows(m, SM90_TILE_M, e, n.div_ceil(SM90_TILE_N))?;
                let tm_a = matrix_map(a.dptr(), m, k, SM90_TILE_M, what)?;
                let tm_w = matrix_map(w.dptr(), e * n, k, SM90_TILE_N, what)?;
                launch!(self, "grouped_gemm_sm90", "grouped_nt_sm90_bf16", grid, SM90_THREADS, smem = SM90_SMEM_BYTES;
                    tm_a, tm_w, offsets.dptr(), y.dptr(), int(m, "rows")?, int(e, "experts")?, int(k, "k")?, int(n, "n")?)
            }
        }
    }

    /// Input gradient per expert segment: `dx[seg] = dy[seg] w_e (+ dy2[seg] w2_e)`: dy `[m, k]`,
    /// w `[e, k, n]` (the forward's weight, HF layout `[out, in]` with k = out), dx `[m, n]`.
    /// `second = Some((dy2, w2))` adds a second product in the same pass (gate and up:
    /// `dxp = dgate wg_e + dup wu_e`).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_nn(
        &self,
        dy: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        w: &impl DeviceRead<bf16>,
        second: Option<(View<'_, bf16>, View<'_, bf16>)>,
        e: usize,
        k: usize,
        n: usize,
        dx: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        self.grouped_nn_on(self.kernel_path(), dy, offsets, w, second, e, k, n, dx)
    }

    /// [`Device::grouped_nn`] on the given path (tests and benchmarks compare the two).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_nn_on(
        &self,
        path: KernelPath,
        dy: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        w: &impl DeviceRead<bf16>,
        second: Option<(View<'_, bf16>, View<'_, bf16>)>,
        e: usize,
        k: usize,
        n: usize,
        dx: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        check_experts(e, offsets)?;
        check_width(k, "k")?;
        check_width(n, "n")?;
        let m = rows_of(dy.len(), k, "dy")?;
        ensure!(
            w.len() == e * k * n,
            "grouped NN: weights are not [{e}, {k}, {n}]"
        );
        ensure!(
            dx.len() == m * n,
            "grouped NN: output holds {}, not [{m}, {n}]",
            dx.len()
        );
        let (dy2, w2) = match &second {
            Some((d2, w2)) => {
                ensure!(
                    d2.len() == m * k && w2.len() == e * k * n,
                    "grouped NN: the second pair is not [{m}, {k}] x [{e}, {k}, {n}]"
                );
                (d2.dptr(), w2.dptr())
            }
            None => (0, 0),
        };
        for (p, what) in [
            (dy.dptr(), "dy"),
            (w.dptr(), "w"),
            (dy2, "dy2"),
            (w2, "w2"),
            (dx.dptr(), "dx"),
        ] {
            check_align(p, 16, what)?;
        }
        match path {
            KernelPath::Sm80 => {
                let grid = sched_grid(m, e, n.div_ceil(TILE_N))?;
                launch!(self, "grouped_gemm", "grouped_nn_bf16", grid, THREADS, smem = SMEM_BYTES;
                    dy.dptr(), w.dptr(), dy2, w2, offsets.dptr(), dx.dptr(), int(m, "rows")?, int(e, "experts")?,
                    int(k, "k")?, int(n, "n")?)
            }
            KernelPath::Sm90 => {
                self.require_sm90("grouped GEMM")?;
                if m == 0 {
                    return Ok(()); // no rows: nothing to write (and TMA maps need rows)
                }
                let what = "grouped NN (Hopper)";
                let grid = sched_grid_rows(m, SM90_TILE_M, e, n.div_ceil(SM90_TILE_N))?;
                let tm_dy = matrix_map(dy.dptr(), m, k, SM90_TILE_M, what)?;
                let tm_w = stacked_map(w.dptr(), e, k, n, SM90_BK, what)?;
                let (tm_dy2, tm_w2, has_second) = if dy2 != 0 {
                    (
                        matrix_map(dy2, m, k, SM90_TILE_M, what)?,
                        stacked_map(w2, e, k, n, SM90_BK, what)?,
                        1i32,
                    )
                } else {
                    (tm_dy, tm_w, 0i32)
                };
                launch!(self, "grouped_gemm_sm90", "grouped_nn_sm90_bf16", grid, SM90_THREADS, smem = SM90_SMEM_BYTES;
                    tm_dy, tm_w, tm_dy2, tm_w2, has_second, offsets.dptr(), dx.dptr(), int(m, "rows")?,
                    int(e, "experts")?, int(k, "k")?, int(n, "n")?)
            }
        }
    }

    /// Backward through the down projection and the SwiGLU in one pass:
    /// `da = dy[seg] wd_e` (f32, not stored), then `dgate`, `dup` from the saved `gate`, `up`.
    /// dy `[m, h]`, wd `[e, h, i]`, gate / up / dgate / dup `[m, i]` (bf16).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_nn_swiglu_bwd(
        &self,
        dy: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        wd: &impl DeviceRead<bf16>,
        gate: &impl DeviceRead<bf16>,
        up: &impl DeviceRead<bf16>,
        e: usize,
        h: usize,
        i: usize,
        dgate: &mut impl DeviceWrite<bf16>,
        dup: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        self.grouped_nn_swiglu_bwd_on(
            self.kernel_path(),
            dy,
            offsets,
            wd,
            gate,
            up,
            e,
            h,
            i,
            dgate,
            dup,
        )
    }

    /// [`Device::grouped_nn_swiglu_bwd`] on the given path.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_nn_swiglu_bwd_on(
        &self,
        path: KernelPath,
        dy: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        wd: &impl DeviceRead<bf16>,
        gate: &impl DeviceRead<bf16>,
        up: &impl DeviceRead<bf16>,
        e: usize,
        h: usize,
        i: usize,
        dgate: &mut impl DeviceWrite<bf16>,
        dup: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        check_experts(e, offsets)?;
        check_width(h, "hidden")?;
        check_width(i, "intermediate")?;
        let m = rows_of(dy.len(), h, "dy")?;
        ensure!(
            wd.len() == e * h * i,
            "grouped SwiGLU backward: down weights are not [{e}, {h}, {i}]"
        );
        ensure!(
            gate.len() == m * i && up.len() == m * i && dgate.len() == m * i && dup.len() == m * i,
            "grouped SwiGLU backward: gate/up/dgate/dup are not [{m}, {i}]"
        );
        for (p, what) in [
            (dy.dptr(), "dy"),
            (wd.dptr(), "wd"),
            (gate.dptr(), "gate"),
            (up.dptr(), "up"),
            (dgate.dptr(), "dgate"),
            (dup.dptr(), "dup"),
        ] {
            check_align(p, 16, what)?;
        }
        match path {
            KernelPath::Sm80 => {
                let grid = sched_grid(m, e, i.div_ceil(TILE_N))?;
                launch!(self, "grouped_gemm", "grouped_nn_swiglu_bwd_bf16", grid, THREADS, smem = SMEM_BYTES;
                    dy.dptr(), wd.dptr(), gate.dptr(), up.dptr(), offsets.dptr(), dgate.dptr(), dup.dptr(),
                    int(m, "rows")?, int(e, "experts")?, int(h, "k")?, int(i, "n")?)
            }
            KernelPath::Sm90 => {
                self.require_sm90("grouped GEMM")?;
                if m == 0 {
                    return Ok(()); // no rows: nothing to write (and TMA maps need rows)
                }
                let what = "grouped SwiGLU backward (Hopper)";
                let grid = sched_grid_rows(m, SM90_TILE_M, e, i.div_ceil(SM90_TILE_N))?;
                let tm_dy = matrix_map(dy.dptr(), m, h, SM90_TILE_M, what)?;
                let tm_wd = stacked_map(wd.dptr(), e, h, i, SM90_BK, what)?;
                launch!(self, "grouped_gemm_sm90", "grouped_nn_swiglu_bwd_sm90_bf16", grid, SM90_THREADS,
                    smem = SM90_SMEM_BYTES;
                    tm_dy, tm_wd, gate.dptr(), up.dptr(), offsets.dptr(), dgate.dptr(), dup.dptr(),
                    int(m, "rows")?, int(e, "experts")?, int(h, "k")?, int(i, "n")?)
            }
        }
    }

    /// Weight gradients per expert: `dw[e] (+)= dy[seg]^T x[seg]` (f32 `[e, n, k]`), dy `[m, n]`,
    /// x `[m, k]` (bf16). `second = Some((dy2, dw2))` computes `dw2` from `dy2` with the same x in
    /// the same launch (gate and up). `mask` (`[e]`, nonzero = trainable; None = all) skips frozen
    /// experts: their slices of dw / dw2 are not touched. A trainable expert with no rows gets
    /// zeros, or is left as is with `accumulate` (which adds into dw instead of overwriting).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_wgrad(
        &self,
        dy: &impl DeviceRead<bf16>,
        x: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        mask: Option<View<'_, u32>>,
        second: Option<(View<'_, bf16>, ViewMut<'_, f32>)>,
        e: usize,
        n: usize,
        k: usize,
        accumulate: bool,
        dw: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        self.grouped_wgrad_on(
            self.kernel_path(),
            dy,
            x,
            offsets,
            mask,
            second,
            e,
            n,
            k,
            accumulate,
            dw,
        )
    }

    /// [`Device::grouped_wgrad`] on the given path.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_wgrad_on(
        &self,
        path: KernelPath,
        dy: &impl DeviceRead<bf16>,
        x: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        mask: Option<View<'_, u32>>,
        second: Option<(View<'_, bf16>, ViewMut<'_, f32>)>,
        e: usize,
        n: usize,
        k: usize,
        accumulate: bool,
        dw: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        check_experts(e, offsets)?;
        check_width(n, "n")?;
        check_width(k, "k")?;
        let m = rows_of(dy.len(), n, "dy")?;
        ensure!(
            x.len() == m * k,
            "grouped weight gradient: x holds {}, not [{m}, {k}]",
            x.len()
        );
        ensure!(
            dw.len() == e * n * k,
            "grouped weight gradient: dw holds {}, not [{e}, {n}, {k}]",
            dw.len()
        );
        let (dy2, dw2, problems) = match &second {
            Some((d2, w2)) => {
                ensure!(
                    d2.len() == m * n && w2.len() == e * n * k,
                    "grouped weight gradient: the second pair is not [{m}, {n}] -> [{e}, {n}, {k}]"
                );
                (d2.dptr(), w2.dptr(), 2)
            }
            None => (0, 0, 1),
        };
        let mp = match &mask {
            Some(v) => {
                ensure!(
                    v.len() == e,
                    "grouped weight gradient: mask holds {}, not {e}",
                    v.len()
                );
                v.dptr()
            }
            None => 0,
        };
        for (p, what) in [(dy.dptr(), "dy"), (x.dptr(), "x"), (dy2, "dy2")] {
            check_align(p, 16, what)?;
        }
        check_align(dw.dptr(), 8, "dw")?;
        check_align(dw2, 8, "dw2")?;
        if path == KernelPath::Sm90 {
            self.require_sm90("grouped GEMM")?;
        }
        // With no rows at all the sm_80 kernel writes the zeros (TMA maps need rows).
        if path == KernelPath::Sm90 && m > 0 {
            let tiles = n.div_ceil(SM90_TILE_M) * k.div_ceil(SM90_TILE_N);
            ensure!(
                tiles <= i32::MAX as usize,
                "grouped weight gradient: {tiles} tiles exceed the grid limit"
            );
            let what = "grouped weight gradient (Hopper)";
            let tm_dy = matrix_map(dy.dptr(), m, n, SM90_BK, what)?;
            let tm_x = matrix_map(x.dptr(), m, k, SM90_BK, what)?;
            let tm_dy2 = if dy2 != 0 {
                matrix_map(dy2, m, n, SM90_BK, what)?
            } else {
                tm_dy
            };
            return launch!(self, "grouped_gemm_sm90", "grouped_wgrad_sm90_f32", (tiles as u32, e as u32, problems),
                SM90_THREADS, smem = SM90_SMEM_BYTES;
                tm_dy, tm_x, tm_dy2, dw.dptr(), dw2, offsets.dptr(), mp, int(m, "rows")?, int(e, "experts")?,
                int(n, "n")?, int(k, "k")?, i32::from(accumulate));
        }
        let tiles = n.div_ceil(TILE_M) * k.div_ceil(TILE_N);
        ensure!(
            tiles <= i32::MAX as usize,
            "grouped weight gradient: {tiles} tiles exceed the grid limit"
        );
        launch!(self, "grouped_gemm", "grouped_wgrad_f32", (tiles as u32, e as u32, problems), THREADS, smem = SMEM_BYTES;
            dy.dptr(), x.dptr(), dy2, dw.dptr(), dw2, offsets.dptr(), mp, int(m, "rows")?, int(e, "experts")?,
            int(n, "n")?, int(k, "k")?, i32::from(accumulate))
    }
}
