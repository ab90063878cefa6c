//! CPU-vs-GPU parity of the grouped expert GEMMs (kernels/grouped_gemm.cu, wrappers in
//! src/backend/cuda/grouped.rs): the MoE FFN of every expert over its contiguous segment of the
//! expert-permuted rows, forward (fused gate/up + SwiGLU, down) and backward (SwiGLU backward
//! fused into dA = dY Wd, dX = dG Wg + dU Wu, weight gradients with a frozen-expert mask and
//! accumulation).
//!
//! The reference is the CPU's per-expert path of src/model/mod.rs (swiglu_ffn: `ops::linear`,
//! `ops::swiglu` and their tape backwards) on each expert's rows. Every kernel is checked on its
//! own against a CPU reference evaluated on bf16-rounded inputs (the GPU kernel of each stage is
//! fed the rounded CPU values of the previous stage), so the tolerances measure the kernel's
//! error, not the rounding of the stage before.
//!
//! As in tests/gpu_kernels.rs, each body runs once per backend: the `cpu` variant re-runs the
//! reference and must match it bit for bit (a harness and determinism check); the `cuda`
//! variant prints "SKIP: no CUDA device" and passes where there is no GPU or the build has no
//! kernels, and fails instead when FLEXRUN_REQUIRE_GPU=1.
//!
//! Routings are adversarial: ragged segments (1, 17, 130 rows), empty experts (first, middle,
//! last), every token to one expert, E = 64 with top-8 from a real routing of random logits,
//! a segment of many m-tiles (more than one raster group), widths that are multiples of 8 but
//! not of the 32/64/128 tiles.

use flexrun::autograd::Tape;
use flexrun::backend::cuda::KernelPath;
use flexrun::backend::cuda::{Buf, Device, DeviceRead};
use flexrun::ops;
use flexrun::tensor::Tensor;
use half::bf16;
use rand::{rngs::StdRng, SeedableRng};

mod common;
use common::{Backend, R};

// ---------------------------------------------------------------------------------------------
// Tolerances: |got - want| <= rtol * |want| + atol_frac * max|want| per element.

#[derive(Clone, Copy, Debug)]
struct Tol {
    rtol: f32,
    atol_frac: f32,
}

/// The `cpu` variant runs the reference itself: bit-identical results.
const EXACT: Tol = Tol {
    rtol: 0.0,
    atol_frac: 0.0,
};
/// bf16 outputs of an f32-accumulated GEMM (gate, up, act, y, dA, dX, and dgate/dup computed from
/// the f32 dA): one rounding is 2^-9 relative; 2^-7 leaves room for a different f32 summation
/// order flipping a rounding, and the scale term covers entries near zero after cancellation.
const BF16_TOL: Tol = Tol {
    rtol: 1.0 / 128.0,
    atol_frac: 1.0 / 256.0,
};
/// f32 weight gradients: sums over up to ~1100 segment rows of exact bf16 products, in tensor-core
/// order (k16 blocks, then BK-row tiles) instead of the CPU GEMM's; as the cuBLAS GEMM_TOL of
/// tests/gpu_kernels.rs.
const WGRAD_TOL: Tol = Tol {
    rtol: 1e-3,
    atol_frac: 1e-4,
};

fn assert_close(b: &Backend, what: &str, got: &[f32], want: &[f32], tol: Tol) {
    let tol = if b.is_cpu() { EXACT } else { tol };
    assert_eq!(
        got.len(),
        want.len(),
        "{}: {what}: length {} vs {}",
        b.name(),
        got.len(),
        want.len()
    );
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut worst = (0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let lim = tol.rtol * w.abs() + tol.atol_frac * scale;
        let err = (g - w).abs();
        let ok = if tol.rtol == 0.0 && tol.atol_frac == 0.0 {
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())
        } else {
            err <= lim
        };
        if !ok {
            panic!("{}: {what}: element {i}: got {g}, want {w} (|err| {err:e}, limit {lim:e}, scale {scale:e})", b.name());
        }
        if err > worst.0 {
            worst = (err, i);
        }
    }
    if !b.is_cpu() && std::env::var_os("FLEXRUN_GPU_TEST_VERBOSE").is_some() {
        println!(
            "{what}: max |err| {:e} at {} (scale {scale:e})",
            worst.0, worst.1
        );
    }
}

backend_tests!(
    grouped_forward,
    grouped_backward,
    grouped_wgrad_mask_accumulate,
    grouped_shape_checks,
    grouped_bench_smoke
);

/// The Hopper (wgmma, TMA) kernels against the CPU reference and the sm_80 kernels, each run twice
/// for bit-identical results: the down projection, gate/up with the SwiGLU epilogue, the input
/// gradients (dA = dY Wd_e, its fused SwiGLU backward, dX = dG Wg_e + dU Wu_e) and the weight
/// gradients (dWd; dWg and dWu in one launch; segments ending inside a 64-row slice), on every case
/// (ragged segments, empty experts, E = 64, widths from 8 to 1000: K not a multiple of its 64-wide
/// slices and past the 4-stage ring, N not a multiple of the 256-wide tiles). On a GPU that is not
/// compute capability 9.0 it prints SKIP (the path does not exist there).
#[test]
fn grouped_sm90() {
    common::with_cuda("grouped_sm90", |dev| {
        if !common::hopper(dev, "grouped_sm90")? {
            return Ok(());
        }
        let b = Backend::Cuda(dev);
        for (ci, c) in cases().iter().enumerate() {
            let (m, e, h, i) = (c.m(), c.e(), c.h, c.i);
            let inp = inputs(c, 100 + ci as u64);
            let rf = reference(c, &inp);
            let what = format!("sm90 {} (E={e} m={m} h={h} i={i})", c.name);
            let off = dev.upload(&c.offsets())?;
            let (act_r, wd) = (up(dev, &rf.act_r)?, up(dev, &inp.wd)?);
            let run = |path: KernelPath| -> flexrun::Result<Vec<f32>> {
                let mut y = dev.alloc::<bf16>(m * h)?;
                dev.grouped_nt_on(path, &act_r, &off, &wd, e, i, h, &mut y)?;
                down(dev, &y)
            };
            let (y90, y80) = (run(KernelPath::Sm90)?, run(KernelPath::Sm80)?);
            assert_close(&b, &what, &y90, &rf.y, BF16_TOL);
            assert_close(&b, &format!("{what} vs sm80"), &y90, &y80, BF16_TOL);
            assert_eq!(run(KernelPath::Sm90)?, y90, "{what}: not deterministic");
            // Gate/up with the SwiGLU epilogue, with and without the saved pre-activations.
            let (x, wg, wu) = (up(dev, &inp.x)?, up(dev, &inp.wg)?, up(dev, &inp.wu)?);
            let mut act = dev.alloc::<bf16>(m * i)?;
            let mut gate = dev.alloc::<bf16>(m * i)?;
            let mut upb = dev.alloc::<bf16>(m * i)?;
            let saved = Some((gate.view_mut(..), upb.view_mut(..)));
            dev.grouped_gateup_fwd_on(
                KernelPath::Sm90,
                &x,
                &off,
                &wg,
                &wu,
                e,
                h,
                i,
                &mut act,
                saved,
            )?;
            let mut act2 = dev.alloc::<bf16>(m * i)?;
            dev.grouped_gateup_fwd_on(
                KernelPath::Sm90,
                &x,
                &off,
                &wg,
                &wu,
                e,
                h,
                i,
                &mut act2,
                None,
            )?;
            assert_eq!(
                down(dev, &act)?,
                down(dev, &act2)?,
                "{what}: act without saving gate/up"
            );
            assert_close(
                &b,
                &format!("gate {what}"),
                &down(dev, &gate)?,
                &rf.gate,
                BF16_TOL,
            );
            assert_close(
                &b,
                &format!("up {what}"),
                &down(dev, &upb)?,
                &rf.up,
                BF16_TOL,
            );
            assert_close(
                &b,
                &format!("act {what}"),
                &down(dev, &act)?,
                &rf.act,
                BF16_TOL,
            );
            // The input gradients: dA = dY Wd_e, the fused SwiGLU backward, dX = dG Wg_e + dU Wu_e.
            let (wg_, wu_, dy) = (up(dev, &inp.wg)?, up(dev, &inp.wu)?, up(dev, &inp.dy)?);
            let (gate_r, up_r) = (up(dev, &rf.gate_r)?, up(dev, &rf.up_r)?);
            let (dgate_r, dup_r) = (up(dev, &rf.dgate_r)?, up(dev, &rf.dup_r)?);
            let bwd = |path: KernelPath| -> flexrun::Result<[Vec<f32>; 4]> {
                let mut da = dev.alloc::<bf16>(m * i)?;
                dev.grouped_nn_on(path, &dy, &off, &wd, None, e, h, i, &mut da)?;
                let (mut dgate, mut dup) = (dev.alloc::<bf16>(m * i)?, dev.alloc::<bf16>(m * i)?);
                dev.grouped_nn_swiglu_bwd_on(
                    path, &dy, &off, &wd, &gate_r, &up_r, e, h, i, &mut dgate, &mut dup,
                )?;
                let mut dx = dev.alloc::<bf16>(m * h)?;
                let second = Some((dup_r.as_view(), wu_.as_view()));
                dev.grouped_nn_on(path, &dgate_r, &off, &wg_, second, e, i, h, &mut dx)?;
                Ok([
                    down(dev, &da)?,
                    down(dev, &dgate)?,
                    down(dev, &dup)?,
                    down(dev, &dx)?,
                ])
            };
            let (g90, g80) = (bwd(KernelPath::Sm90)?, bwd(KernelPath::Sm80)?);
            let want = [&rf.da, &rf.dgate, &rf.dup, &rf.dx];
            for (j, name) in ["dA", "dgate", "dup", "dX"].iter().enumerate() {
                assert_close(&b, &format!("{name} {what}"), &g90[j], want[j], BF16_TOL);
                assert_close(
                    &b,
                    &format!("{name} {what} vs sm80"),
                    &g90[j],
                    &g80[j],
                    BF16_TOL,
                );
            }
            assert!(
                bwd(KernelPath::Sm90)? == g90,
                "{what}: backward not deterministic"
            );
            // The weight gradients (NaN-filled first: trainable experts with no rows get zeros).
            let (x, act_r2) = (up(dev, &inp.x)?, up(dev, &rf.act_r)?);
            let wgrad = |path: KernelPath| -> flexrun::Result<[Vec<f32>; 3]> {
                let mut dwd = dev.upload(&vec![f32::NAN; e * h * i])?;
                dev.grouped_wgrad_on(
                    path, &dy, &act_r2, &off, None, None, e, h, i, false, &mut dwd,
                )?;
                let mut dwg = dev.upload(&vec![f32::NAN; e * i * h])?;
                let mut dwu = dev.upload(&vec![f32::NAN; e * i * h])?;
                let second = Some((dup_r.as_view(), dwu.view_mut(..)));
                dev.grouped_wgrad_on(
                    path, &dgate_r, &x, &off, None, second, e, i, h, false, &mut dwg,
                )?;
                Ok([
                    dev.download(&dwd)?,
                    dev.download(&dwg)?,
                    dev.download(&dwu)?,
                ])
            };
            let (w90, w80) = (wgrad(KernelPath::Sm90)?, wgrad(KernelPath::Sm80)?);
            let want = [&rf.dwd, &rf.dwg, &rf.dwu];
            for (j, name) in ["dWd", "dWg", "dWu"].iter().enumerate() {
                assert_close(&b, &format!("{name} {what}"), &w90[j], want[j], WGRAD_TOL);
                assert_close(
                    &b,
                    &format!("{name} {what} vs sm80"),
                    &w90[j],
                    &w80[j],
                    WGRAD_TOL,
                );
            }
            assert!(
                wgrad(KernelPath::Sm90)? == w90,
                "{what}: weight gradients not deterministic"
            );
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Cases, inputs and the CPU reference.

struct Case {
    name: String,
    /// Rows of each expert's segment (the routing's histogram).
    counts: Vec<usize>,
    h: usize,
    i: usize,
}

impl Case {
    fn e(&self) -> usize {
        self.counts.len()
    }
    fn m(&self) -> usize {
        self.counts.iter().sum()
    }
    fn offsets(&self) -> Vec<u32> {
        let mut o = vec![0u32];
        for &c in &self.counts {
            o.push(o.last().unwrap() + c as u32);
        }
        o
    }
}

fn cases() -> Vec<Case> {
    let case = |name: &str, counts: Vec<usize>, h, i| Case {
        name: name.to_string(),
        counts,
        h,
        i,
    };
    // E = 64, top-8 of a real routing: 96 tokens, the last 4 experts pushed out by a bias, so the
    // histogram is ragged and has empty experts.
    let (n, e, k) = (96, 64, 8);
    let z = Tensor::randn(&[n, e], 2.0, &mut StdRng::seed_from_u64(11));
    let bias: Vec<f32> = (0..e)
        .map(|j| if j >= e - 4 { -30.0 } else { 0.0 })
        .collect();
    let (_, _, routing) = ops::route_values(&z, Some(&bias), k, false);
    let hist = routing.histogram();
    assert!(
        hist[e - 4..].iter().all(|&c| c == 0),
        "the biased experts get no tokens"
    );
    vec![
        case(
            "ragged 1/17/130 with empty experts",
            vec![0, 1, 17, 0, 130, 3],
            136,
            200,
        ),
        case(
            "every token to one expert",
            vec![0, 0, 0, 0, 0, 300, 0, 0],
            64,
            96,
        ),
        case("E=64 top-8 routing", hist, 40, 56),
        case("one segment of 9 m-tiles", vec![0, 1100, 5], 32, 136),
        case(
            "three n-tiles of the hidden width",
            vec![130, 129, 0, 1],
            264,
            72,
        ),
        case("smallest widths", vec![3, 0], 8, 8),
        // 16 and 14 slices of 64 along K, neither a multiple of 64: the Hopper kernels' 6-stage
        // ring wraps twice (the producer waits on released stages, parity 1 and 0 again).
        case("K past the pipeline ring", vec![70, 0, 140], 1000, 840),
    ]
}

struct Inputs {
    x: Tensor,  // [m, h]
    wg: Tensor, // [e * i, h]
    wu: Tensor, // [e * i, h]
    wd: Tensor, // [e * h, i]
    dy: Tensor, // [m, h]
}

fn inputs(c: &Case, seed: u64) -> Inputs {
    let mut r = StdRng::seed_from_u64(seed);
    let (m, e, h, i) = (c.m(), c.e(), c.h, c.i);
    let mut randn = |shape: &[usize], std: f32| Tensor::randn(shape, std, &mut r).round_bf16();
    Inputs {
        x: randn(&[m, h], 1.0),
        wg: randn(&[e * i, h], 1.0 / (h as f32).sqrt()),
        wu: randn(&[e * i, h], 1.0 / (h as f32).sqrt()),
        wd: randn(&[e * h, i], 1.0 / (i as f32).sqrt()),
        dy: randn(&[m, h], 1.0),
    }
}

/// The per-expert CPU reference of every stage. `*_r` are the bf16-rounded values the GPU kernels
/// of the next stage are fed.
struct Reference {
    gate: Vec<f32>,  // [m, i]
    up: Vec<f32>,    // [m, i]
    act: Vec<f32>,   // [m, i]
    act_r: Tensor,   // [m, i]
    gate_r: Tensor,  // [m, i]
    up_r: Tensor,    // [m, i]
    y: Vec<f32>,     // [m, h] = act_r wd_e^T
    da: Vec<f32>,    // [m, i] = dy wd_e
    dgate: Vec<f32>, // [m, i] SwiGLU backward of da at (gate_r, up_r)
    dup: Vec<f32>,   // [m, i]
    dgate_r: Tensor, // [m, i]
    dup_r: Tensor,   // [m, i]
    dx: Vec<f32>,    // [m, h] = dgate_r wg_e + dup_r wu_e
    dwg: Vec<f32>,   // [e, i, h] = dgate_r^T x (zeros for an expert with no rows)
    dwu: Vec<f32>,   // [e, i, h]
    dwd: Vec<f32>,   // [e, h, i] = dy^T act_r
}

fn grads_of(
    tape: &mut Tape,
    out: flexrun::autograd::Var,
    seed: Tensor,
    leaves: &[flexrun::autograd::Var],
) -> Vec<Vec<f32>> {
    let g = tape.backward_with(out, seed);
    leaves
        .iter()
        .map(|v| g.get(*v).expect("leaf gradient").data().to_vec())
        .collect()
}

/// `[rows, a] ++ [rows, b]` column-wise into `[rows, a + b]`.
fn cat_cols(x: &Tensor, y: &Tensor) -> Tensor {
    let rows = x.rows();
    let mut v = Vec::with_capacity(x.numel() + y.numel());
    for r in 0..rows {
        v.extend_from_slice(x.row(r));
        v.extend_from_slice(y.row(r));
    }
    Tensor::from_vec(v, &[rows, x.cols() + y.cols()])
}

fn reference(c: &Case, inp: &Inputs) -> Reference {
    let (m, e, h, i) = (c.m(), c.e(), c.h, c.i);
    let off = c.offsets();
    let mut rf = Reference {
        gate: vec![0.0; m * i],
        up: vec![0.0; m * i],
        act: vec![0.0; m * i],
        act_r: Tensor::zeros(&[m, i]),
        gate_r: Tensor::zeros(&[m, i]),
        up_r: Tensor::zeros(&[m, i]),
        y: vec![0.0; m * h],
        da: vec![0.0; m * i],
        dgate: vec![0.0; m * i],
        dup: vec![0.0; m * i],
        dgate_r: Tensor::zeros(&[m, i]),
        dup_r: Tensor::zeros(&[m, i]),
        dx: vec![0.0; m * h],
        dwg: vec![0.0; e * i * h],
        dwu: vec![0.0; e * i * h],
        dwd: vec![0.0; e * h * i],
    };
    let mut act_r = vec![0.0; m * i];
    let mut gate_r = vec![0.0; m * i];
    let mut up_r = vec![0.0; m * i];
    let mut dgate_r = vec![0.0; m * i];
    let mut dup_r = vec![0.0; m * i];
    for (ex, (&r0, &n)) in off.iter().zip(&c.counts).enumerate() {
        let r0 = r0 as usize;
        if n == 0 {
            continue;
        }
        let (ai, ah) = (r0 * i..(r0 + n) * i, r0 * h..(r0 + n) * h);
        let x = inp.x.slice_rows(r0, n);
        let (wg, wu, wd) = (
            inp.wg.slice_rows(ex * i, i),
            inp.wu.slice_rows(ex * i, i),
            inp.wd.slice_rows(ex * h, h),
        );
        let dy = inp.dy.slice_rows(r0, n);

        // Forward gate/up + SwiGLU (model::swiglu_ffn's first half).
        let mut t = Tape::new();
        let (xv, wgv, wuv) = (t.leaf(x.clone()), t.leaf(wg.clone()), t.leaf(wu.clone()));
        let g = ops::linear(&mut t, xv, wgv);
        let u = ops::linear(&mut t, xv, wuv);
        let a = ops::swiglu(&mut t, g, u);
        rf.gate[ai.clone()].copy_from_slice(t.value(g).data());
        rf.up[ai.clone()].copy_from_slice(t.value(u).data());
        rf.act[ai.clone()].copy_from_slice(t.value(a).data());
        let a_r = t.value(a).round_bf16();
        let g_r = t.value(g).round_bf16();
        let u_r = t.value(u).round_bf16();
        act_r[ai.clone()].copy_from_slice(a_r.data());
        gate_r[ai.clone()].copy_from_slice(g_r.data());
        up_r[ai.clone()].copy_from_slice(u_r.data());

        // Down projection on the rounded activation: y, dA, dWd.
        let mut t = Tape::new();
        let (av, wdv) = (t.leaf(a_r.clone()), t.leaf(wd.clone()));
        let y = ops::linear(&mut t, av, wdv);
        rf.y[ah.clone()].copy_from_slice(t.value(y).data());
        let gr = grads_of(&mut t, y, dy.clone(), &[av, wdv]);
        rf.da[ai.clone()].copy_from_slice(&gr[0]);
        rf.dwd[ex * h * i..(ex + 1) * h * i].copy_from_slice(&gr[1]);

        // SwiGLU backward at the rounded pre-activations, from the f32 dA.
        let mut t = Tape::new();
        let (gv, uv) = (t.leaf(g_r.clone()), t.leaf(u_r.clone()));
        let a = ops::swiglu(&mut t, gv, uv);
        let wdc = t.constant(wd.clone());
        let y = ops::linear(&mut t, a, wdc);
        let gr = grads_of(&mut t, y, dy.clone(), &[gv, uv]);
        rf.dgate[ai.clone()].copy_from_slice(&gr[0]);
        rf.dup[ai.clone()].copy_from_slice(&gr[1]);
        let dg_r = Tensor::from_vec(gr[0].clone(), &[n, i]).round_bf16();
        let du_r = Tensor::from_vec(gr[1].clone(), &[n, i]).round_bf16();
        dgate_r[ai.clone()].copy_from_slice(dg_r.data());
        dup_r[ai.clone()].copy_from_slice(du_r.data());

        // Gate/up backward from the rounded dgate/dup: x [wg; wu]^T is [gate | up] column-wise.
        let mut t = Tape::new();
        let (xv, wgv, wuv) = (t.leaf(x.clone()), t.leaf(wg.clone()), t.leaf(wu.clone()));
        let w = ops::cat_rows(&mut t, &[wgv, wuv]);
        let z = ops::linear(&mut t, xv, w);
        let gr = grads_of(&mut t, z, cat_cols(&dg_r, &du_r), &[xv, wgv, wuv]);
        rf.dx[ah].copy_from_slice(&gr[0]);
        rf.dwg[ex * i * h..(ex + 1) * i * h].copy_from_slice(&gr[1]);
        rf.dwu[ex * i * h..(ex + 1) * i * h].copy_from_slice(&gr[2]);
    }
    rf.act_r = Tensor::from_vec(act_r, &[m, i]);
    rf.gate_r = Tensor::from_vec(gate_r, &[m, i]);
    rf.up_r = Tensor::from_vec(up_r, &[m, i]);
    rf.dgate_r = Tensor::from_vec(dgate_r, &[m, i]);
    rf.dup_r = Tensor::from_vec(dup_r, &[m, i]);
    rf
}

fn up(dev: &Device, t: &Tensor) -> flexrun::Result<Buf<bf16>> {
    dev.upload_f32_as_bf16(t.data())
}

fn down(dev: &Device, x: &impl DeviceRead<bf16>) -> flexrun::Result<Vec<f32>> {
    dev.download_bf16_as_f32(x)
}

// ---------------------------------------------------------------------------------------------
// Test bodies.

fn grouped_forward(b: &Backend) -> R {
    for (ci, c) in cases().iter().enumerate() {
        let (m, e, h, i) = (c.m(), c.e(), c.h, c.i);
        let inp = inputs(c, 100 + ci as u64);
        let rf = reference(c, &inp);
        let what = format!("{} (E={e} m={m} h={h} i={i} hist={:?})", c.name, c.counts);
        let (gate, upv, act, y) = match b {
            Backend::Cpu => {
                let r2 = reference(c, &inp);
                (r2.gate, r2.up, r2.act, r2.y)
            }
            Backend::Cuda(dev) => {
                let off = dev.upload(&c.offsets())?;
                let (x, wg, wu, wd) = (
                    up(dev, &inp.x)?,
                    up(dev, &inp.wg)?,
                    up(dev, &inp.wu)?,
                    up(dev, &inp.wd)?,
                );
                let mut act = dev.alloc::<bf16>(m * i)?;
                let mut gate = dev.alloc::<bf16>(m * i)?;
                let mut upb = dev.alloc::<bf16>(m * i)?;
                dev.grouped_gateup_fwd(
                    &x,
                    &off,
                    &wg,
                    &wu,
                    e,
                    h,
                    i,
                    &mut act,
                    Some((gate.view_mut(..), upb.view_mut(..))),
                )?;
                // Without the saved pre-activations (inference): the same activation, and
                // deterministic (bit-identical on a second run).
                let mut act2 = dev.alloc::<bf16>(m * i)?;
                dev.grouped_gateup_fwd(&x, &off, &wg, &wu, e, h, i, &mut act2, None)?;
                let (a1, a2) = (dev.download(&act)?, dev.download(&act2)?);
                assert!(
                    a1.iter().zip(&a2).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{what}: act differs without saving gate/up"
                );
                let act_r = up(dev, &rf.act_r)?;
                let mut y = dev.alloc::<bf16>(m * h)?;
                dev.grouped_nt(&act_r, &off, &wd, e, i, h, &mut y)?;
                (
                    down(dev, &gate)?,
                    down(dev, &upb)?,
                    down(dev, &act)?,
                    down(dev, &y)?,
                )
            }
        };
        assert_close(b, &format!("gate {what}"), &gate, &rf.gate, BF16_TOL);
        assert_close(b, &format!("up {what}"), &upv, &rf.up, BF16_TOL);
        assert_close(b, &format!("act {what}"), &act, &rf.act, BF16_TOL);
        assert_close(b, &format!("y {what}"), &y, &rf.y, BF16_TOL);
    }
    Ok(())
}

fn grouped_backward(b: &Backend) -> R {
    for (ci, c) in cases().iter().enumerate() {
        let (m, e, h, i) = (c.m(), c.e(), c.h, c.i);
        let inp = inputs(c, 100 + ci as u64);
        let rf = reference(c, &inp);
        let what = format!("{} (E={e} m={m} h={h} i={i} hist={:?})", c.name, c.counts);
        let got: [Vec<f32>; 7] = match b {
            Backend::Cpu => {
                let r2 = reference(c, &inp);
                [r2.da, r2.dgate, r2.dup, r2.dx, r2.dwd, r2.dwg, r2.dwu]
            }
            Backend::Cuda(dev) => {
                let off = dev.upload(&c.offsets())?;
                let (x, wg, wu, wd, dy) = (
                    up(dev, &inp.x)?,
                    up(dev, &inp.wg)?,
                    up(dev, &inp.wu)?,
                    up(dev, &inp.wd)?,
                    up(dev, &inp.dy)?,
                );
                let (act_r, gate_r, up_r) = (
                    up(dev, &rf.act_r)?,
                    up(dev, &rf.gate_r)?,
                    up(dev, &rf.up_r)?,
                );
                let (dgate_r, dup_r) = (up(dev, &rf.dgate_r)?, up(dev, &rf.dup_r)?);
                // dA = dY Wd_e alone (the plain NN kernel), then fused with the SwiGLU backward.
                let mut da = dev.alloc::<bf16>(m * i)?;
                dev.grouped_nn(&dy, &off, &wd, None, e, h, i, &mut da)?;
                let (mut dgate, mut dup) = (dev.alloc::<bf16>(m * i)?, dev.alloc::<bf16>(m * i)?);
                dev.grouped_nn_swiglu_bwd(
                    &dy, &off, &wd, &gate_r, &up_r, e, h, i, &mut dgate, &mut dup,
                )?;
                // dX = dG Wg_e + dU Wu_e in one pass.
                let mut dx = dev.alloc::<bf16>(m * h)?;
                dev.grouped_nn(
                    &dgate_r,
                    &off,
                    &wg,
                    Some((dup_r.as_view(), wu.as_view())),
                    e,
                    i,
                    h,
                    &mut dx,
                )?;
                // Weight gradients (garbage-filled first: empty experts must be written as zeros).
                let mut dwd = dev.upload(&vec![f32::NAN; e * h * i])?;
                dev.grouped_wgrad(&dy, &act_r, &off, None, None, e, h, i, false, &mut dwd)?;
                let mut dwg = dev.upload(&vec![f32::NAN; e * i * h])?;
                let mut dwu = dev.upload(&vec![f32::NAN; e * i * h])?;
                dev.grouped_wgrad(
                    &dgate_r,
                    &x,
                    &off,
                    None,
                    Some((dup_r.as_view(), dwu.view_mut(..))),
                    e,
                    i,
                    h,
                    false,
                    &mut dwg,
                )?;
                [
                    down(dev, &da)?,
                    down(dev, &dgate)?,
                    down(dev, &dup)?,
                    down(dev, &dx)?,
                    dev.download(&dwd)?,
                    dev.download(&dwg)?,
                    dev.download(&dwu)?,
                ]
            }
        };
        assert_close(b, &format!("dA {what}"), &got[0], &rf.da, BF16_TOL);
        assert_close(b, &format!("dgate {what}"), &got[1], &rf.dgate, BF16_TOL);
        assert_close(b, &format!("dup {what}"), &got[2], &rf.dup, BF16_TOL);
        assert_close(b, &format!("dX {what}"), &got[3], &rf.dx, BF16_TOL);
        assert_close(b, &format!("dWd {what}"), &got[4], &rf.dwd, WGRAD_TOL);
        assert_close(b, &format!("dWg {what}"), &got[5], &rf.dwg, WGRAD_TOL);
        assert_close(b, &format!("dWu {what}"), &got[6], &rf.dwu, WGRAD_TOL);
        // Experts with no rows: exact zeros.
        for (ex, &n) in c.counts.iter().enumerate() {
            if n == 0 {
                let z = |v: &[f32], len: usize| {
                    v[ex * len..(ex + 1) * len].iter().all(|x| x.to_bits() == 0)
                };
                assert!(
                    z(&got[4], h * i) && z(&got[5], i * h) && z(&got[6], i * h),
                    "{what}: expert {ex} has no rows but nonzero dW"
                );
            }
        }
    }
    Ok(())
}

/// Frozen experts (mask 0) keep their weight-gradient slices untouched (bit for bit), trainable
/// ones get the gradient (zeros when they have no rows); with `accumulate` the gradient is added
/// and an empty trainable expert is left as is.
fn grouped_wgrad_mask_accumulate(b: &Backend) -> R {
    // Expert 0 (the public one) frozen with rows, expert 4 frozen with rows, 2 frozen and empty,
    // 1 and 5 trainable and empty.
    let c = Case {
        name: "mask".into(),
        counts: vec![40, 0, 0, 17, 130, 0, 1],
        h: 48,
        i: 40,
    };
    let mask: Vec<u32> = vec![0, 1, 0, 1, 0, 1, 1];
    let (m, e, h, i) = (c.m(), c.e(), c.h, c.i);
    let inp = inputs(&c, 7);
    let rf = reference(&c, &inp);
    let base = Tensor::randn(&[e * i * h], 1.0, &mut StdRng::seed_from_u64(8)).into_vec();
    let base_d = Tensor::randn(&[e * h * i], 1.0, &mut StdRng::seed_from_u64(9)).into_vec();
    // Expected results: per expert slice, frozen -> base, else (base if accumulate) + reference.
    let expect = |reference: &[f32], base: &[f32], accumulate: bool| -> Vec<f32> {
        let len = reference.len() / e;
        (0..e * len)
            .map(|j| {
                let ex = j / len;
                if mask[ex] == 0 {
                    base[j]
                } else if accumulate {
                    base[j] + reference[j]
                } else {
                    reference[j]
                }
            })
            .collect()
    };
    for accumulate in [false, true] {
        let want = [
            expect(&rf.dwg, &base, accumulate),
            expect(&rf.dwu, &base, accumulate),
            expect(&rf.dwd, &base_d, accumulate),
        ];
        let got: [Vec<f32>; 3] = match b {
            Backend::Cpu => [
                expect(&rf.dwg, &base, accumulate),
                expect(&rf.dwu, &base, accumulate),
                expect(&rf.dwd, &base_d, accumulate),
            ],
            Backend::Cuda(dev) => {
                let off = dev.upload(&c.offsets())?;
                let md = dev.upload(&mask)?;
                let (x, dy, act_r) = (up(dev, &inp.x)?, up(dev, &inp.dy)?, up(dev, &rf.act_r)?);
                let (dgate_r, dup_r) = (up(dev, &rf.dgate_r)?, up(dev, &rf.dup_r)?);
                let mut dwg = dev.upload(&base)?;
                let mut dwu = dev.upload(&base)?;
                let mut dwd = dev.upload(&base_d)?;
                dev.grouped_wgrad(
                    &dgate_r,
                    &x,
                    &off,
                    Some(md.as_view()),
                    Some((dup_r.as_view(), dwu.view_mut(..))),
                    e,
                    i,
                    h,
                    accumulate,
                    &mut dwg,
                )?;
                dev.grouped_wgrad(
                    &dy,
                    &act_r,
                    &off,
                    Some(md.as_view()),
                    None,
                    e,
                    h,
                    i,
                    accumulate,
                    &mut dwd,
                )?;
                [
                    dev.download(&dwg)?,
                    dev.download(&dwu)?,
                    dev.download(&dwd)?,
                ]
            }
        };
        for (k, name) in ["dWg", "dWu", "dWd"].iter().enumerate() {
            let what = format!(
                "{name} mask={mask:?} hist={:?} accumulate={accumulate} (m={m})",
                c.counts
            );
            let len = want[k].len() / e;
            for (ex, (&trainable, &rows)) in mask.iter().zip(&c.counts).enumerate() {
                let s = ex * len..(ex + 1) * len;
                // Frozen slices and empty trainable ones are exact; the rest within WGRAD_TOL of
                // the reference (measured against the whole tensor's scale).
                if trainable == 0 || rows == 0 {
                    assert_close(
                        b,
                        &format!("{what} expert {ex} (untouched/zero)"),
                        &got[k][s.clone()],
                        &want[k][s],
                        EXACT,
                    );
                }
            }
            assert_close(b, &what, &got[k], &want[k], WGRAD_TOL);
        }
    }
    Ok(())
}

/// The wrappers refuse what the kernels cannot do: widths not multiples of 8, more than 64
/// experts, offsets of the wrong length, misaligned operands.
fn grouped_shape_checks(b: &Backend) -> R {
    let Backend::Cuda(dev) = b else { return Ok(()) };
    let (e, m) = (2usize, 4usize);
    let off = dev.upload(&[0u32, 3, 4])?;
    let err = |r: flexrun::Result<()>, what: &str| match r {
        Err(e) => assert!(
            e.to_string().contains("grouped"),
            "{what}: unexpected error {e}"
        ),
        Ok(()) => panic!("{what}: accepted"),
    };
    // h = 12 is not a multiple of 8.
    let (h, i) = (12, 16);
    let (x, wg, wu) = (
        dev.zeros::<bf16>(m * h)?,
        dev.zeros::<bf16>(e * i * h)?,
        dev.zeros::<bf16>(e * i * h)?,
    );
    let mut act = dev.zeros::<bf16>(m * i)?;
    err(
        dev.grouped_gateup_fwd(&x, &off, &wg, &wu, e, h, i, &mut act, None),
        "h = 12",
    );
    // 65 experts.
    let (h, i, e65) = (8, 8, 65);
    let off65 = dev.zeros::<u32>(e65 + 1)?;
    let (x, w) = (dev.zeros::<bf16>(m * i)?, dev.zeros::<bf16>(e65 * h * i)?);
    let mut y = dev.zeros::<bf16>(m * h)?;
    err(
        dev.grouped_nt(&x, &off65, &w, e65, i, h, &mut y),
        "65 experts",
    );
    // Offsets of the wrong length.
    let w2 = dev.zeros::<bf16>(e * h * i)?;
    err(
        dev.grouped_nt(&x, &off65, &w2, e, i, h, &mut y),
        "offsets of 66 for 2 experts",
    );
    // A view starting one element in: not 16-byte aligned.
    let xb = dev.zeros::<bf16>(m * i + 8)?;
    err(
        dev.grouped_nt(&xb.view(1..1 + m * i), &off, &w2, e, i, h, &mut y),
        "misaligned a",
    );
    // The valid call goes through.
    dev.grouped_nt(&xb.view(8..8 + m * i), &off, &w2, e, i, h, &mut y)?;
    assert!(down(dev, &y)?.iter().all(|&v| v == 0.0));
    Ok(())
}

/// `bench_grouped` (behind `flexrun bench moe --device cuda`) runs on a small problem and reports
/// a positive, finite rate for every operation.
fn grouped_bench_smoke(b: &Backend) -> R {
    let Backend::Cuda(dev) = b else { return Ok(()) };
    let r = flexrun::bench::moe::bench_grouped(dev, 3, 40, 64, 96, 2, 1)?;
    assert_eq!(r.rows, 120);
    for op in &r.ops {
        assert!(
            op.ms > 0.0 && op.tflops.is_finite() && op.tflops > 0.0,
            "bench op {op:?}"
        );
    }
    assert!(serde_json::to_string(&r).is_ok());
    Ok(())
}
