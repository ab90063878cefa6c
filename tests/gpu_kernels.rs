//! CPU-vs-GPU parity of every CUDA kernel (kernels/*.cu, wrappers in src/backend/cuda/).
//!
//! Each test body runs once per backend (the `backend_tests!` macro writes a `cpu` and a `cuda`
//! variant) and compares that backend's result with the CPU reference ops (`flexrun::ops`,
//! `backend::cpu::matmul`, `train::optim`) evaluated on bf16-rounded inputs, so the tolerances
//! measure kernel error rather than the rounding of inputs. The `cpu` variant must match the
//! reference bit for bit (it checks the harness and the determinism of the CPU ops); the `cuda`
//! variant prints "SKIP: no CUDA device" and passes where there is no GPU or the build has no
//! kernels, and fails instead when FLEXRUN_REQUIRE_GPU=1.
//!
//! Shapes are chosen ragged: T = 1 and 17, widths that are not multiples of 32/128/256, a key
//! cache longer than the keys, experts that receive no tokens, ignored targets.

use flexrun::autograd::Tape;
use flexrun::backend::cpu::matmul;
use flexrun::backend::cuda::{AdamWHyper, AdamWSlot, Buf, Device, DeviceRead};
use flexrun::model::ParamStore;
use flexrun::ops::{self, AttnShape, RopeTable, IGNORE};
use flexrun::tensor::{DType, Tensor};
use flexrun::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::Arc;

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
/// bf16 outputs: one rounding is 2^-9 relative; 2^-7 leaves room for f32 summation order
/// flipping a rounding, and the scale term covers entries near zero after cancellation.
const BF16_TOL: Tol = Tol {
    rtol: 1.0 / 128.0,
    atol_frac: 1.0 / 256.0,
};
/// Gradients computed from bf16-stored intermediates of the GPU forward (attention's O feeds
/// D = dO.O, whose rounding error does not average out as p spreads over many keys).
const BF16_CHAIN_TOL: Tol = Tol {
    rtol: 1.0 / 64.0,
    atol_frac: 1.0 / 64.0,
};
/// f32 results: other summation orders and the ulps of expf/logf.
const F32_TOL: Tol = Tol {
    rtol: 1e-4,
    atol_frac: 1e-5,
};
/// f32 sums of many terms with cancellation (column sums, dot products over the width).
const F32_SUM_TOL: Tol = Tol {
    rtol: 1e-4,
    atol_frac: 1e-4,
};
/// cuBLAS: split-K and tensor-core accumulation orders over k terms.
const GEMM_TOL: Tol = Tol {
    rtol: 1e-3,
    atol_frac: 1e-4,
};
/// Scalars reduced in f64 (losses, norms): only the f32 per-row/per-thread parts differ.
const SCALAR_RTOL: f32 = 1e-5;
/// AdamW in f32: FMA contraction changes the last bit of m and v; the update divides by
/// sqrt(v) so a relative error of a few ulps stays a few ulps of lr.
const ADAMW_TOL: Tol = Tol {
    rtol: 1e-5,
    atol_frac: 1e-6,
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
        let ok = if b.is_cpu() {
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

fn assert_scalar(b: &Backend, what: &str, got: f32, want: f32) {
    let ok = if b.is_cpu() {
        got.to_bits() == want.to_bits()
    } else {
        (got - want).abs() <= SCALAR_RTOL * want.abs().max(1e-6)
    };
    assert!(ok, "{}: {what}: got {got}, want {want}", b.name());
}

backend_tests!(
    rmsnorm,
    rope,
    add_scaled_and_scale,
    swiglu,
    cast,
    embedding,
    cross_entropy,
    router_zloss,
    router_ce,
    rel_sq_err,
    router,
    gather_rows,
    moe_permute_combine,
    attention,
    adamw_and_grad_norm,
    gemm,
);

// ---------------------------------------------------------------------------------------------
// Helpers.

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Normal(0, std) values rounded to bf16 (kept in f32 storage).
fn randn(shape: &[usize], std: f32, r: &mut StdRng) -> Tensor {
    Tensor::randn(shape, std, r).round_bf16()
}

fn up(dev: &Device, t: &Tensor) -> flexrun::Result<Buf<bf16>> {
    dev.upload_f32_as_bf16(t.data())
}

fn up32(dev: &Device, t: &Tensor) -> flexrun::Result<Buf<f32>> {
    dev.upload(t.data())
}

fn down(dev: &Device, x: &impl DeviceRead<bf16>) -> flexrun::Result<Vec<f32>> {
    dev.download_bf16_as_f32(x)
}

/// Value and input gradients of `f` on the CPU tape, seeded with `seed` as output gradient.
fn cpu_grads(
    inputs: &[&Tensor],
    seed: &Tensor,
    f: impl FnOnce(&mut Tape, &[flexrun::autograd::Var]) -> flexrun::autograd::Var,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut tape = Tape::new();
    let vars: Vec<_> = inputs.iter().map(|t| tape.leaf((*t).clone())).collect();
    let out = f(&mut tape, &vars);
    let value = tape.value(out).data().to_vec();
    let g = tape.backward_with(out, seed.clone());
    let grads = vars
        .iter()
        .zip(inputs)
        .map(|(v, t)| {
            g.get(*v)
                .map(|x| x.data().to_vec())
                .unwrap_or_else(|| vec![0.0; t.numel()])
        })
        .collect();
    (value, grads)
}

// ---------------------------------------------------------------------------------------------
// Test bodies.

const EPS: f32 = 1e-6;

fn rmsnorm(b: &Backend) -> R {
    let mut r = rng(1);
    for &(n, d) in &[(1, 8), (17, 64), (33, 100), (5, 4099), (300, 33)] {
        let x = randn(&[n, d], 1.0, &mut r);
        let w = Tensor::from_vec(
            randn(&[d], 0.2, &mut r)
                .data()
                .iter()
                .map(|v| 1.0 + v)
                .collect(),
            &[d],
        )
        .round_bf16();
        let gy = randn(&[n, d], 1.0, &mut r);
        let cpu = || cpu_grads(&[&x, &w], &gy, |t, v| ops::rmsnorm(t, v[0], v[1], EPS));
        let (y, g) = cpu();
        let (gy_, gg) = match b {
            Backend::Cpu => cpu(),
            Backend::Cuda(dev) => {
                let (xd, wd, gd) = (up(dev, &x)?, up(dev, &w)?, up(dev, &gy)?);
                let mut yd = dev.alloc::<bf16>(n * d)?;
                let mut rstd = dev.alloc::<f32>(n)?;
                dev.rmsnorm_fwd(&xd, &wd, &mut yd, &mut rstd, n, d, EPS)?;
                let mut dx = dev.alloc::<bf16>(n * d)?;
                dev.rmsnorm_bwd_dx(&xd, &wd, &gd, &rstd, &mut dx, n, d)?;
                let mut dw = dev.alloc::<f32>(d)?;
                dev.rmsnorm_bwd_dw(&xd, &gd, &rstd, &mut dw, n, d)?;
                (down(dev, &yd)?, vec![down(dev, &dx)?, dev.download(&dw)?])
            }
        };
        assert_close(b, &format!("rmsnorm y {n}x{d}"), &gy_, &y, BF16_TOL);
        assert_close(b, &format!("rmsnorm dx {n}x{d}"), &gg[0], &g[0], BF16_TOL);
        assert_close(
            b,
            &format!("rmsnorm dw {n}x{d}"),
            &gg[1],
            &g[1],
            F32_SUM_TOL,
        );
    }
    Ok(())
}

fn rope(b: &Backend) -> R {
    let mut r = rng(2);
    for &(bs, t, heads, hd, offset, theta) in &[
        (1, 1, 1, 8, 0, 500000.0),
        (2, 17, 3, 16, 5, 10000.0),
        (1, 33, 2, 64, 0, 500000.0),
        (3, 5, 1, 130, 2, 1e4),
    ] {
        let width = heads * hd;
        let max_pos = offset + t + 3;
        let x = randn(&[bs * t, width], 1.0, &mut r);
        let gy = randn(&[bs * t, width], 1.0, &mut r);
        let table = Arc::new(RopeTable::new(hd, theta, max_pos));
        let cpu = || cpu_grads(&[&x], &gy, |tp, v| ops::rope(tp, v[0], &table, t, offset));
        let (y, g) = cpu();
        let (y2, g2) = match b {
            Backend::Cpu => cpu(),
            Backend::Cuda(dev) => {
                let tab = dev.rope_table(hd, theta, max_pos)?;
                let (xd, gd) = (up(dev, &x)?, up(dev, &gy)?);
                let mut yd = dev.alloc::<bf16>(x.numel())?;
                dev.rope(&xd, &mut yd, &tab, bs * t, width, t, offset, false)?;
                let mut dx = dev.alloc::<bf16>(x.numel())?;
                dev.rope(&gd, &mut dx, &tab, bs * t, width, t, offset, true)?;
                (down(dev, &yd)?, vec![down(dev, &dx)?])
            }
        };
        assert_close(
            b,
            &format!("rope y {bs}x{t}x{heads}x{hd}"),
            &y2,
            &y,
            BF16_TOL,
        );
        assert_close(
            b,
            &format!("rope dx {bs}x{t}x{heads}x{hd}"),
            &g2[0],
            &g[0],
            BF16_TOL,
        );
    }
    Ok(())
}

fn add_scaled_and_scale(b: &Backend) -> R {
    let mut r = rng(3);
    for &n in &[1usize, 31, 1000, 70001] {
        let a = randn(&[n], 1.0, &mut r);
        let c = randn(&[n], 1.0, &mut r);
        let cpu = || {
            let mut tape = Tape::new();
            let (av, cv) = (tape.leaf(a.clone()), tape.leaf(c.clone()));
            let y = ops::add_scaled(&mut tape, av, cv, -0.7);
            let s = ops::scale(&mut tape, av, 1.3);
            (tape.value(y).data().to_vec(), tape.value(s).data().to_vec())
        };
        let (y, s) = cpu();
        let (y2, s2, y32) = match b {
            Backend::Cpu => {
                let (y2, s2) = cpu();
                (y2.clone(), s2, y2)
            }
            Backend::Cuda(dev) => {
                let (ad, cd) = (up(dev, &a)?, up(dev, &c)?);
                let mut yd = dev.alloc::<bf16>(n)?;
                dev.add_scaled(&ad, &cd, &mut yd, -0.7)?;
                let mut sd = dev.alloc::<bf16>(n)?;
                dev.scale(&ad, &mut sd, 1.3)?;
                let (a32, c32) = (up32(dev, &a)?, up32(dev, &c)?);
                let mut y32 = dev.alloc::<f32>(n)?;
                dev.add_scaled(&a32, &c32, &mut y32, -0.7)?;
                (down(dev, &yd)?, down(dev, &sd)?, dev.download(&y32)?)
            }
        };
        assert_close(b, &format!("add_scaled bf16 {n}"), &y2, &y, BF16_TOL);
        assert_close(b, &format!("scale bf16 {n}"), &s2, &s, BF16_TOL);
        assert_close(b, &format!("add_scaled f32 {n}"), &y32, &y, F32_TOL);
    }
    Ok(())
}

fn swiglu(b: &Backend) -> R {
    let mut r = rng(4);
    for &n in &[1usize, 17, 4099] {
        let g = randn(&[n], 2.0, &mut r);
        let u = randn(&[n], 1.0, &mut r);
        let gy = randn(&[n], 1.0, &mut r);
        let cpu = || cpu_grads(&[&g, &u], &gy, |t, v| ops::swiglu(t, v[0], v[1]));
        let (y, gr) = cpu();
        let (y2, gr2) = match b {
            Backend::Cpu => cpu(),
            Backend::Cuda(dev) => {
                let (gd, ud, dyd) = (up(dev, &g)?, up(dev, &u)?, up(dev, &gy)?);
                let mut yd = dev.alloc::<bf16>(n)?;
                dev.swiglu_fwd(&gd, &ud, &mut yd)?;
                let (mut dg, mut du) = (dev.alloc::<bf16>(n)?, dev.alloc::<bf16>(n)?);
                dev.swiglu_bwd(&gd, &ud, &dyd, &mut dg, &mut du)?;
                (down(dev, &yd)?, vec![down(dev, &dg)?, down(dev, &du)?])
            }
        };
        assert_close(b, &format!("swiglu y {n}"), &y2, &y, BF16_TOL);
        assert_close(b, &format!("swiglu dgate {n}"), &gr2[0], &gr[0], BF16_TOL);
        assert_close(b, &format!("swiglu dup {n}"), &gr2[1], &gr[1], BF16_TOL);
    }
    Ok(())
}

fn cast(b: &Backend) -> R {
    let mut r = rng(5);
    // Unrounded f32 values, plus exact ties, subnormals and large magnitudes.
    let mut v: Vec<f32> = Tensor::randn(&[1001], 3.0, &mut r).into_vec();
    v.extend([
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -0.0,
        1e-40,
        -3e-39,
        3.0e38,
        65504.0,
        1.0e-8,
    ]);
    let t = Tensor::from_vec(v.clone(), &[v.len()]);
    let want = t.to_dtype(DType::BF16).to_dtype(DType::F32).into_vec();
    let got = match b {
        Backend::Cpu => t.round_bf16().into_vec(),
        Backend::Cuda(dev) => {
            let x = dev.upload(&v)?;
            let mut y = dev.alloc::<bf16>(v.len())?;
            dev.cast_f32_to_bf16(&x, &mut y)?;
            let mut back = dev.alloc::<f32>(v.len())?;
            dev.cast_bf16_to_f32(&y, &mut back)?;
            dev.download(&back)?
        }
    };
    // Rounding must agree bit for bit on every backend.
    let bits_ok = got
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(
        bits_ok,
        "{}: f32 -> bf16 -> f32 differs from half::bf16 rounding",
        b.name()
    );
    Ok(())
}

fn embedding(b: &Backend) -> R {
    let mut r = rng(6);
    for &(vocab, h, n) in &[(50, 1, 1), (50, 7, 17), (1000, 130, 300)] {
        let w = randn(&[vocab, h], 1.0, &mut r);
        // Repeated ids (several per row of dW) and ids that never occur.
        let ids: Vec<u32> = (0..n)
            .map(|_| r.random_range(0..(vocab as u32 / 2).max(1)))
            .collect();
        let gy = randn(&[n, h], 1.0, &mut r);
        let cpu = || cpu_grads(&[&w], &gy, |t, v| ops::embedding(t, v[0], &ids));
        let (y, g) = cpu();
        let (y2, g2, y32) = match b {
            Backend::Cpu => {
                let (y2, g2) = cpu();
                (y2.clone(), g2, y2)
            }
            Backend::Cuda(dev) => {
                let wd = up(dev, &w)?;
                let mut yd = dev.alloc::<bf16>(n * h)?;
                dev.embedding_fwd(&wd, vocab, h, &ids, &mut yd)?;
                let w32 = up32(dev, &w)?;
                let mut y32 = dev.alloc::<bf16>(n * h)?;
                dev.embedding_fwd(&w32, vocab, h, &ids, &mut y32)?;
                let gd = up(dev, &gy)?;
                let mut dw = dev.alloc::<f32>(vocab * h)?;
                dev.embedding_bwd(&gd, &ids, vocab, h, &mut dw)?;
                (down(dev, &yd)?, vec![dev.download(&dw)?], down(dev, &y32)?)
            }
        };
        assert_close(b, &format!("embedding y {vocab}x{h} n={n}"), &y2, &y, EXACT);
        assert_close(
            b,
            &format!("embedding y (f32 table) {vocab}x{h} n={n}"),
            &y32,
            &y,
            EXACT,
        );
        // Same summation order as the CPU loop over bf16 values: exact in f32.
        assert_close(
            b,
            &format!("embedding dW {vocab}x{h} n={n}"),
            &g2[0],
            &g[0],
            EXACT,
        );
    }
    Ok(())
}

fn cross_entropy(b: &Backend) -> R {
    let mut r = rng(7);
    for &(n, v, ignore_every) in &[(1, 5, 0), (17, 1000, 3), (64, 4099, 5), (3, 10, 1)] {
        let logits = randn(&[n, v], 2.0, &mut r);
        let targets: Vec<u32> = (0..n)
            .map(|i| {
                if ignore_every > 0 && i % ignore_every == 0 {
                    IGNORE
                } else {
                    r.random_range(0..v as u32)
                }
            })
            .collect();
        let z = 1e-3;
        let dloss = 0.75;
        let cpu = || {
            let mut tape = Tape::new();
            let lv = tape.leaf(logits.clone());
            let out = ops::cross_entropy(&mut tape, lv, &targets, z);
            let loss = tape.value(out.loss).data()[0];
            let g = tape.backward_with(out.loss, Tensor::scalar(dloss));
            let d = g
                .get(lv)
                .map(|t| t.data().to_vec())
                .unwrap_or_else(|| vec![0.0; n * v]);
            (loss, out.ce, out.n_valid, d)
        };
        let want = cpu();
        let got = match b {
            Backend::Cpu => cpu(),
            Backend::Cuda(dev) => {
                let ld = up(dev, &logits)?;
                let out = dev.cross_entropy(&ld, n, v, &targets, z)?;
                let mut d = dev.alloc::<bf16>(n * v)?;
                dev.cross_entropy_bwd(&ld, &out, dloss, &mut d)?;
                (out.loss, out.ce, out.n_valid, down(dev, &d)?)
            }
        };
        let what = format!("cross_entropy {n}x{v}");
        assert_scalar(b, &format!("{what} loss"), got.0, want.0);
        assert_scalar(b, &format!("{what} ce"), got.1, want.1);
        assert_eq!(got.2, want.2, "{what} n_valid");
        assert_close(b, &format!("{what} dlogits"), &got.3, &want.3, BF16_TOL);
    }
    Ok(())
}

fn router_zloss(b: &Backend) -> R {
    let mut r = rng(8);
    for &(n, e) in &[(1, 2), (17, 8), (300, 7)] {
        let z = randn(&[n, e], 3.0, &mut r);
        let dloss = 1.5;
        let cpu = || {
            let mut tape = Tape::new();
            let zv = tape.leaf(z.clone());
            let l = ops::logsumexp_sq_mean(&mut tape, zv);
            let loss = tape.value(l).data()[0];
            let g = tape.backward_with(l, Tensor::scalar(dloss));
            (loss, g.get(zv).unwrap().data().to_vec())
        };
        let want = cpu();
        let got = match b {
            Backend::Cpu => cpu(),
            Backend::Cuda(dev) => {
                let zd = up32(dev, &z)?;
                let mut lse = dev.alloc::<f32>(n)?;
                let loss = dev.router_zloss(&zd, n, e, &mut lse)?;
                let mut dz = dev.alloc::<f32>(n * e)?;
                dev.router_zloss_bwd(&zd, &lse, n, e, dloss, &mut dz)?;
                (loss, dev.download(&dz)?)
            }
        };
        assert_scalar(b, &format!("router z-loss {n}x{e}"), got.0, want.0);
        assert_close(
            b,
            &format!("router z-loss dz {n}x{e}"),
            &got.1,
            &want.1,
            F32_TOL,
        );
    }
    Ok(())
}

/// Expert training's router cross-entropy (own-text and public-text losses): the loss
/// `coef * mean(ce)` over the valid rows and its gradient added to a `dz` that already holds
/// values (the routing's gradient); rows with IGNORE, and a batch with no valid row.
fn router_ce(b: &Backend) -> R {
    let mut r = rng(81);
    for &(n, e, ignore_every) in &[(1, 2, 0), (17, 2, 3), (300, 7, 4), (5, 4, 1)] {
        let z = randn(&[n, e], 2.0, &mut r);
        let dz0 = randn(&[n, e], 0.1, &mut r);
        let targets: Vec<u32> = (0..n)
            .map(|i| {
                if ignore_every > 0 && i % ignore_every == 0 {
                    IGNORE
                } else {
                    r.random_range(0..e as u32)
                }
            })
            .collect();
        let coef = 0.3;
        let cpu = || {
            let mut tape = Tape::new();
            let zv = tape.leaf(z.clone());
            let out = ops::cross_entropy(&mut tape, zv, &targets, 0.0);
            let valid = out.n_valid > 0;
            let loss = if valid {
                coef * tape.value(out.loss).data()[0]
            } else {
                0.0
            };
            let g = tape.backward_with(out.loss, Tensor::scalar(coef));
            let d = match (valid, g.get(zv)) {
                (true, Some(t)) => t
                    .data()
                    .iter()
                    .zip(dz0.data())
                    .map(|(a, b)| b + a)
                    .collect(),
                _ => dz0.data().to_vec(),
            };
            (loss, d)
        };
        let want = cpu();
        let got = match b {
            Backend::Cpu => cpu(),
            Backend::Cuda(dev) => {
                let zd = up32(dev, &z)?;
                let mut dz = up32(dev, &dz0)?;
                let loss = dev.router_ce(&zd, &targets, n, e, coef, &mut dz)?;
                (loss, dev.download(&dz)?)
            }
        };
        let what = format!("router cross-entropy {n}x{e}");
        assert_scalar(b, &format!("{what} loss"), got.0, want.0);
        assert_close(b, &format!("{what} dz"), &got.1, &want.1, F32_TOL);
    }
    Ok(())
}

/// The public anchor's relative squared error over marked rows (bf16 operands): the value,
/// `da` accumulated onto existing values, `db` (bf16); ragged widths, one row, no marked row.
fn rel_sq_err(b: &Backend) -> R {
    let mut r = rng(82);
    for &(n, h, mark) in &[(1, 8, 1), (37, 24, 2), (300, 64, 3), (9, 16, 0)] {
        let x = randn(&[n, h], 1.0, &mut r);
        let y = randn(&[n, h], 1.0, &mut r);
        let da0 = randn(&[n, h], 0.1, &mut r);
        let rows: Vec<bool> = (0..n).map(|i| mark > 0 && i % mark == 0).collect();
        let coef = 2.5;
        let cpu = || {
            let mut tape = Tape::new();
            let (a, bb) = (tape.leaf(x.clone()), tape.leaf(y.clone()));
            let l = ops::rel_sq_err(&mut tape, a, bb, &std::sync::Arc::new(rows.clone()));
            let value = tape.value(l).data()[0];
            let g = tape.backward_with(l, Tensor::scalar(coef));
            let da: Vec<f32> = g
                .get(a)
                .unwrap()
                .data()
                .iter()
                .zip(da0.data())
                .map(|(g, d)| d + g)
                .collect();
            (value, da, g.get(bb).unwrap().data().to_vec())
        };
        let want = cpu();
        let got = match b {
            Backend::Cpu => cpu(),
            Backend::Cuda(dev) => {
                let (xd, yd) = (up(dev, &x)?, up(dev, &y)?);
                let mask = dev.upload(&rows.iter().map(|&m| u32::from(m)).collect::<Vec<_>>())?;
                let (value, sums) = dev.rel_sq_err(&xd, &yd, &mask, n, h)?;
                let mut da = up32(dev, &da0)?;
                let mut db = dev.alloc::<bf16>(n * h)?;
                dev.rel_sq_err_bwd(&xd, &yd, &mask, &sums, n, h, coef, &mut da, &mut db)?;
                (value, dev.download(&da)?, down(dev, &db)?)
            }
        };
        let what = format!("relative error {n}x{h}");
        assert_scalar(b, &format!("{what} value"), got.0, want.0);
        assert_close(b, &format!("{what} da"), &got.1, &want.1, F32_TOL);
        assert_close(b, &format!("{what} db"), &got.2, &want.2, BF16_TOL);
    }
    Ok(())
}

/// Router logits on a grid of 1/4: rows have exact ties (broken to the lower expert on every
/// backend) and non-tied probabilities differ by at least e^(1/4), far beyond rounding.
fn quantized(shape: &[usize], std: f32, r: &mut StdRng) -> Tensor {
    let t = Tensor::randn(shape, std, r);
    Tensor::from_vec(
        t.data().iter().map(|x| (x * 4.0).round() / 4.0).collect(),
        shape,
    )
}

/// Routing configurations: (tokens, experts, top-k, renorm, bias). Expert 3's bias of -100
/// keeps it from receiving any token when k < e.
const ROUTES: &[(usize, usize, usize, bool, bool)] = &[
    (1, 2, 2, false, false),
    (17, 8, 2, false, true),
    (300, 7, 5, true, true),
    (64, 8, 1, true, false),
    (5, 4, 4, false, true),
];

fn router_bias(e: usize, r: &mut StdRng) -> Tensor {
    let mut b = quantized(&[e], 1.0, r).into_vec();
    if e > 3 {
        b[3] = -100.0;
    }
    Tensor::from_vec(b, &[e])
}

fn router(b: &Backend) -> R {
    let mut r = rng(9);
    for &(n, e, k, renorm, with_bias) in ROUTES {
        let z = quantized(&[n, e], 1.0, &mut r);
        let bias = router_bias(e, &mut r);
        let gw = randn(&[n, k], 1.0, &mut r);
        let bias_opt = with_bias.then_some(&bias);
        let cpu = || {
            let (probs, weights, routing) =
                ops::route_values(&z, bias_opt.map(|t| t.data()), k, renorm);
            let mut tape = Tape::new();
            let zv = tape.leaf(z.clone());
            let bv = bias_opt.map(|t| tape.leaf(t.clone()));
            let (w, _) = ops::route(&mut tape, zv, bv, k, renorm);
            let g = tape.backward_with(w, gw.clone());
            let dz = g.get(zv).unwrap().data().to_vec();
            let db = bv
                .and_then(|v| g.get(v))
                .map(|t| t.data().to_vec())
                .unwrap_or_default();
            (probs, weights, routing.indices, dz, db)
        };
        let want = cpu();
        let got = match b {
            Backend::Cpu => cpu(),
            Backend::Cuda(dev) => {
                let zd = up32(dev, &z)?;
                let bd = up32(dev, &bias)?;
                let (mut p, mut w, mut idx) = (
                    dev.alloc::<f32>(n * e)?,
                    dev.alloc::<f32>(n * k)?,
                    dev.alloc::<u32>(n * k)?,
                );
                dev.route(
                    &zd,
                    with_bias.then(|| bd.as_view()),
                    n,
                    e,
                    k,
                    renorm,
                    &mut p,
                    &mut w,
                    &mut idx,
                )?;
                let gd = up32(dev, &gw)?;
                let mut dz = dev.alloc::<f32>(n * e)?;
                dev.route_bwd(&p, &w, &idx, &gd, n, e, k, renorm, &mut dz)?;
                let db = if with_bias {
                    let mut db = dev.alloc::<f32>(e)?;
                    dev.route_bias_grad(&dz, &bd, n, e, &mut db)?;
                    dev.download(&db)?
                } else {
                    Vec::new()
                };
                (
                    dev.download(&p)?,
                    dev.download(&w)?,
                    dev.download(&idx)?,
                    dev.download(&dz)?,
                    db,
                )
            }
        };
        let what = format!("router n={n} e={e} k={k} renorm={renorm} bias={with_bias}");
        assert_close(b, &format!("{what} probs"), &got.0, &want.0, F32_TOL);
        assert_close(b, &format!("{what} weights"), &got.1, &want.1, F32_TOL);
        assert_eq!(got.2, want.2, "{}: {what} indices", b.name());
        assert_close(b, &format!("{what} dz"), &got.3, &want.3, F32_TOL);
        assert_close(b, &format!("{what} db"), &got.4, &want.4, F32_SUM_TOL);
    }
    Ok(())
}

fn gather_rows(b: &Backend) -> R {
    let mut r = rng(10);
    for &(n, h, m) in &[(1, 1, 1), (17, 33, 40), (300, 130, 77)] {
        let x = randn(&[n, h], 1.0, &mut r);
        let rows: Vec<u32> = (0..m).map(|_| r.random_range(0..n as u32)).collect();
        let gy = randn(&[m, h], 1.0, &mut r);
        let rows_arc = Arc::new(rows.clone());
        let cpu = || cpu_grads(&[&x], &gy, |t, v| ops::gather_rows(t, v[0], &rows_arc));
        let (y, g) = cpu();
        let (y2, g2) = match b {
            Backend::Cpu => cpu(),
            Backend::Cuda(dev) => {
                let xd = up(dev, &x)?;
                let mut yd = dev.alloc::<bf16>(m * h)?;
                dev.gather_rows(&xd, n, h, &rows, &mut yd)?;
                let gd = up(dev, &gy)?;
                let mut dx = dev.alloc::<bf16>(n * h)?;
                dev.gather_rows_bwd(&gd, &rows, n, h, &mut dx)?;
                (down(dev, &yd)?, vec![down(dev, &dx)?])
            }
        };
        assert_close(
            b,
            &format!("gather_rows y n={n} h={h} m={m}"),
            &y2,
            &y,
            EXACT,
        );
        assert_close(
            b,
            &format!("gather_rows dx n={n} h={h} m={m}"),
            &g2[0],
            &g[0],
            BF16_TOL,
        );
    }
    Ok(())
}

/// Permute, combine and their backwards against the CPU's per-expert gather_rows + moe_combine,
/// on routings with an expert that receives no tokens.
fn moe_permute_combine(b: &Backend) -> R {
    let mut r = rng(11);
    for &(n, e, k, renorm, with_bias) in ROUTES {
        let h = [1usize, 33, 130][n % 3];
        let z = quantized(&[n, e], 1.0, &mut r);
        let bias = router_bias(e, &mut r);
        let (_, weights, routing) =
            ops::route_values(&z, with_bias.then(|| bias.data()), k, renorm);
        let routing = Arc::new(routing);
        let hist = routing.histogram();
        let x = randn(&[n, h], 1.0, &mut r);
        let w = Tensor::from_vec(weights, &[n, k]);
        // Expert outputs in the permuted layout: expert 0's rows, then expert 1's, ...
        let outs = randn(&[n * k, h], 1.0, &mut r);
        let dxp = randn(&[n * k, h], 1.0, &mut r);
        let dy = randn(&[n, h], 1.0, &mut r);
        let what = format!("moe n={n} e={e} k={k} h={h} hist={hist:?}");
        if with_bias && k < e {
            assert_eq!(hist[3], 0, "{what}: expert 3 should receive no tokens");
        }
        let cpu = || {
            // Permutation: the concatenated per-expert gathers.
            let (xp, dx) = {
                let mut tape = Tape::new();
                let xv = tape.leaf(x.clone());
                let parts: Vec<_> = routing
                    .expert_tokens
                    .iter()
                    .filter(|t| !t.is_empty())
                    .map(|t| ops::gather_rows(&mut tape, xv, &Arc::new(t.clone())))
                    .collect();
                let cat = ops::cat_rows(&mut tape, &parts);
                let xp = tape.value(cat).data().to_vec();
                let g = tape.backward_with(cat, dxp.clone());
                (xp, g.get(xv).unwrap().data().to_vec())
            };
            // Combine.
            let mut tape = Tape::new();
            let mut start = 0;
            let mut out_vars = Vec::new();
            let mut leaves = Vec::new();
            for &c in &hist {
                if c == 0 {
                    out_vars.push(None);
                } else {
                    let v = tape.leaf(outs.slice_rows(start, c));
                    leaves.push(v);
                    out_vars.push(Some(v));
                }
                start += c;
            }
            let wv = tape.leaf(w.clone());
            let y = ops::moe_combine(&mut tape, &out_vars, wv, &routing);
            let yv = tape.value(y).data().to_vec();
            let g = tape.backward_with(y, dy.clone());
            let douts: Vec<f32> = leaves
                .iter()
                .flat_map(|v| g.get(*v).unwrap().data().to_vec())
                .collect();
            let dw = g.get(wv).unwrap().data().to_vec();
            (xp, dx, yv, douts, dw, Vec::<u32>::new(), Vec::<u32>::new())
        };
        let mut want = cpu();
        want.5 = routing.expert_tokens.concat();
        want.6 = routing.row_of.clone();
        let got = match b {
            Backend::Cpu => {
                let mut g = cpu();
                g.5 = routing.expert_tokens.concat();
                g.6 = routing.row_of.clone();
                g
            }
            Backend::Cuda(dev) => {
                let idx = dev.upload(&routing.indices)?;
                let perm = dev.moe_permutation(&idx, n, k, e)?;
                assert_eq!(perm.histogram(dev)?, hist, "{what}: histogram");
                let xd = up(dev, &x)?;
                let mut xp = dev.alloc::<bf16>(n * k * h)?;
                dev.moe_permute(&xd, &perm, h, &mut xp)?;
                let dxpd = up(dev, &dxp)?;
                let mut dx = dev.alloc::<bf16>(n * h)?;
                dev.moe_permute_bwd(&dxpd, &perm, h, &mut dx)?;
                let (od, wd) = (up(dev, &outs)?, up32(dev, &w)?);
                let mut y = dev.alloc::<bf16>(n * h)?;
                dev.moe_combine(&od, &wd, &perm, h, &mut y)?;
                let dyd = up(dev, &dy)?;
                let (mut douts, mut dw) = (dev.alloc::<bf16>(n * k * h)?, dev.alloc::<f32>(n * k)?);
                dev.moe_combine_bwd(&dyd, &od, &wd, &perm, h, &mut douts, &mut dw)?;
                (
                    down(dev, &xp)?,
                    down(dev, &dx)?,
                    down(dev, &y)?,
                    down(dev, &douts)?,
                    dev.download(&dw)?,
                    dev.download(&perm.sorted_tokens)?,
                    dev.download(&perm.row_of)?,
                )
            }
        };
        assert_eq!(
            got.5,
            want.5,
            "{}: {what}: sorted tokens (expert_tokens)",
            b.name()
        );
        assert_eq!(got.6, want.6, "{}: {what}: row_of", b.name());
        assert_close(b, &format!("{what} permute"), &got.0, &want.0, EXACT);
        assert_close(
            b,
            &format!("{what} permute backward"),
            &got.1,
            &want.1,
            BF16_TOL,
        );
        assert_close(b, &format!("{what} combine"), &got.2, &want.2, BF16_TOL);
        assert_close(
            b,
            &format!("{what} combine d_outs"),
            &got.3,
            &want.3,
            BF16_TOL,
        );
        assert_close(
            b,
            &format!("{what} combine d_weights"),
            &got.4,
            &want.4,
            F32_SUM_TOL,
        );
    }
    Ok(())
}

fn attention(b: &Backend) -> R {
    let mut r = rng(12);
    let shapes = [
        (1, 1, 1, 1, 1, 1, 8),
        (2, 17, 17, 17, 4, 2, 16),
        (1, 3, 130, 140, 4, 1, 8),
        (2, 70, 70, 70, 2, 2, 12),
        (1, 33, 33, 33, 3, 1, 64),
        (1, 9, 9, 9, 2, 2, 256),
    ];
    for &(bs, tq, tk, stride, nh, nkv, hd) in &shapes {
        let s = AttnShape {
            b: bs,
            tq,
            tk,
            tk_stride: stride,
            nh,
            nkv,
            hd,
        };
        let q = randn(&[bs * tq, nh * hd], 1.0, &mut r);
        let k = randn(&[bs * stride, nkv * hd], 1.0, &mut r);
        let v = randn(&[bs * stride, nkv * hd], 1.0, &mut r);
        let dout = randn(&[bs * tq, nh * hd], 1.0, &mut r);
        let cpu = || {
            cpu_grads(&[&q, &k, &v], &dout, |t, x| {
                ops::attention(t, x[0], x[1], x[2], s)
            })
        };
        let (o, g) = cpu();
        let (o2, g2) = match b {
            Backend::Cpu => cpu(),
            Backend::Cuda(dev) => {
                let (qd, kd, vd, dod) = (up(dev, &q)?, up(dev, &k)?, up(dev, &v)?, up(dev, &dout)?);
                let mut od = dev.alloc::<bf16>(q.numel())?;
                let mut lse = dev.alloc::<f32>(bs * nh * tq)?;
                dev.attention_fwd(&qd, &kd, &vd, s, &mut od, &mut lse)?;
                let (mut dq, mut dk, mut dv) = (
                    dev.alloc::<bf16>(q.numel())?,
                    dev.alloc::<bf16>(k.numel())?,
                    dev.alloc::<bf16>(v.numel())?,
                );
                dev.attention_bwd(&qd, &kd, &vd, &od, &lse, &dod, s, &mut dq, &mut dk, &mut dv)?;
                (
                    down(dev, &od)?,
                    vec![down(dev, &dq)?, down(dev, &dk)?, down(dev, &dv)?],
                )
            }
        };
        let what = format!("attention {s:?}");
        assert_close(b, &format!("{what} out"), &o2, &o, BF16_TOL);
        assert_close(b, &format!("{what} dq"), &g2[0], &g[0], BF16_CHAIN_TOL);
        assert_close(b, &format!("{what} dk"), &g2[1], &g[1], BF16_CHAIN_TOL);
        assert_close(b, &format!("{what} dv"), &g2[2], &g[2], BF16_TOL);
    }
    Ok(())
}

/// The CPU optimizer's weight-decay rule (matrices only).
fn decays(shape: &[usize]) -> bool {
    shape.len() >= 2 && shape.iter().all(|&d| d > 1)
}

fn adamw_and_grad_norm(b: &Backend) -> R {
    let mut r = rng(13);
    // A norm-like vector, a matrix, a [1, n] row (no decay) and one tensor spanning two blocks.
    let shapes: [&[usize]; 5] = [&[7], &[3, 5], &[1, 4], &[70001], &[33, 65]];
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let lr = 1e-2;
    let max_norm = 5.0;
    let steps = 3;
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(s, 1.0, &mut r))
        .collect();
    // The [33, 65] matrix decays toward a target (an expert's copy of the public FFN), not 0.
    let target = Tensor::randn(shapes[4], 1.0, &mut r);
    let grads: Vec<Vec<Tensor>> = (0..steps)
        .map(|step| {
            shapes
                .iter()
                .map(|s| Tensor::randn(s, if step == 1 { 0.01 } else { 1.0 }, &mut r))
                .collect()
        })
        .collect();
    let cpu = || {
        let mut ps = ParamStore::default();
        for (i, t) in init.iter().enumerate() {
            ps.add(format!("p{i}"), t.clone());
        }
        ps.params[4].decay_to = Some(target.clone());
        let mut opt = AdamW::new(cfg, shapes.len());
        let mut norms = Vec::new();
        for g in &grads {
            let mut gs: Vec<(usize, Tensor)> = g.iter().cloned().enumerate().collect();
            norms.push(clip_grad_norm(&mut gs, max_norm));
            opt.update(&mut ps, &gs, lr);
        }
        let params: Vec<Vec<f32>> = ps.params.iter().map(|p| p.value.data().to_vec()).collect();
        let moments: Vec<(Vec<f32>, Vec<f32>)> =
            opt.moments.into_iter().map(|m| m.unwrap()).collect();
        (norms, params, moments, Vec::<Vec<f32>>::new())
    };
    let want = cpu();
    let got = match b {
        Backend::Cpu => {
            let mut g = cpu();
            g.3 =
                g.1.iter()
                    .map(|p| {
                        Tensor::from_vec(p.clone(), &[p.len()])
                            .round_bf16()
                            .into_vec()
                    })
                    .collect();
            g
        }
        Backend::Cuda(dev) => {
            let mut p: Vec<Buf<f32>> = init
                .iter()
                .map(|t| up32(dev, t))
                .collect::<flexrun::Result<_>>()?;
            let mut m: Vec<Buf<f32>> = shapes
                .iter()
                .map(|s| dev.zeros(s.iter().product()))
                .collect::<flexrun::Result<_>>()?;
            let mut v: Vec<Buf<f32>> = shapes
                .iter()
                .map(|s| dev.zeros(s.iter().product()))
                .collect::<flexrun::Result<_>>()?;
            let mut p16: Vec<Buf<bf16>> = shapes
                .iter()
                .map(|s| dev.alloc(s.iter().product()))
                .collect::<flexrun::Result<_>>()?;
            let target_d = up32(dev, &target)?;
            let mut norms = Vec::new();
            for (step, g) in grads.iter().enumerate() {
                let gd: Vec<Buf<f32>> = g
                    .iter()
                    .map(|t| up32(dev, t))
                    .collect::<flexrun::Result<_>>()?;
                let views: Vec<_> = gd.iter().map(|x| x.as_view()).collect();
                let nrm = dev.grad_norm(&views, max_norm)?;
                norms.push(dev.download(&nrm)?[0]);
                let mut slots: Vec<AdamWSlot> = p
                    .iter_mut()
                    .zip(m.iter_mut())
                    .zip(v.iter_mut())
                    .zip(p16.iter_mut())
                    .zip(&gd)
                    .zip(&shapes)
                    .enumerate()
                    .map(|(i, (((((p, m), v), p16), g), s))| AdamWSlot {
                        param: p.view_mut(..),
                        grad: g.as_view(),
                        m: m.view_mut(..),
                        v: v.view_mut(..),
                        weight_decay: if decays(s) { cfg.weight_decay } else { 0.0 },
                        decay_to: (i == 4).then(|| target_d.as_view()),
                        param_bf16: Some(p16.view_mut(..)),
                    })
                    .collect();
                let hp = AdamWHyper {
                    lr,
                    beta1: cfg.beta1,
                    beta2: cfg.beta2,
                    eps: cfg.eps,
                    step: step as u64 + 1,
                };
                dev.adamw_step(&mut slots, hp, Some(nrm.view(1..2)))?;
            }
            let params = p
                .iter()
                .map(|x| dev.download(x))
                .collect::<flexrun::Result<Vec<_>>>()?;
            let moments = m
                .iter()
                .zip(&v)
                .map(|(m, v)| Ok((dev.download(m)?, dev.download(v)?)))
                .collect::<flexrun::Result<Vec<_>>>()?;
            let p16 = p16
                .iter()
                .map(|x| down(dev, x))
                .collect::<flexrun::Result<Vec<_>>>()?;
            (norms, params, moments, p16)
        }
    };
    for (s, (gn, wn)) in got.0.iter().zip(&want.0).enumerate() {
        assert_scalar(b, &format!("grad norm step {s}"), *gn, *wn);
    }
    for (i, shape) in shapes.iter().enumerate() {
        let what = format!("adamw tensor {i} {shape:?}");
        assert_close(
            b,
            &format!("{what} param"),
            &got.1[i],
            &want.1[i],
            ADAMW_TOL,
        );
        assert_close(
            b,
            &format!("{what} m"),
            &got.2[i].0,
            &want.2[i].0,
            ADAMW_TOL,
        );
        assert_close(
            b,
            &format!("{what} v"),
            &got.2[i].1,
            &want.2[i].1,
            ADAMW_TOL,
        );
        // The bf16 copy is the rounding of the f32 weight the kernel itself wrote.
        let own = Tensor::from_vec(got.1[i].clone(), &[got.1[i].len()])
            .round_bf16()
            .into_vec();
        assert_close(b, &format!("{what} bf16 copy"), &got.3[i], &own, EXACT);
    }
    Ok(())
}

fn gemm(b: &Backend) -> R {
    let mut r = rng(14);
    for &(m, n, k) in &[
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 65),
        (64, 48, 129),
        (5, 3, 0),
        (130, 1, 257),
    ] {
        let a = randn(&[m * k], 1.0, &mut r);
        let bm = randn(&[k * n], 1.0, &mut r);
        let c0 = randn(&[m * n], 1.0, &mut r);
        for a_t in [false, true] {
            for b_t in [false, true] {
                for acc in [false, true] {
                    let mut want = c0.data().to_vec();
                    matmul(m, n, k, a.data(), a_t, bm.data(), b_t, &mut want, acc);
                    let (g32, g16_32, g16) = match b {
                        Backend::Cpu => {
                            let mut c = c0.data().to_vec();
                            matmul(m, n, k, a.data(), a_t, bm.data(), b_t, &mut c, acc);
                            (
                                c.clone(),
                                c.clone(),
                                Tensor::from_vec(c, &[m * n]).round_bf16().into_vec(),
                            )
                        }
                        Backend::Cuda(dev) => {
                            let (a32, b32, a16, b16) =
                                (up32(dev, &a)?, up32(dev, &bm)?, up(dev, &a)?, up(dev, &bm)?);
                            let mut c32 = up32(dev, &c0)?;
                            dev.gemm(m, n, k, &a32, a_t, &b32, b_t, &mut c32, acc)?;
                            let mut c16_32 = up32(dev, &c0)?;
                            dev.gemm(m, n, k, &a16, a_t, &b16, b_t, &mut c16_32, acc)?;
                            let mut c16 = up(dev, &c0)?;
                            dev.gemm(m, n, k, &a16, a_t, &b16, b_t, &mut c16, acc)?;
                            (
                                dev.download(&c32)?,
                                dev.download(&c16_32)?,
                                down(dev, &c16)?,
                            )
                        }
                    };
                    let what = format!("gemm {m}x{n}x{k} a_t={a_t} b_t={b_t} acc={acc}");
                    assert_close(b, &format!("{what} f32"), &g32, &want, GEMM_TOL);
                    assert_close(b, &format!("{what} bf16->f32"), &g16_32, &want, GEMM_TOL);
                    let want16 = Tensor::from_vec(want.clone(), &[m * n])
                        .round_bf16()
                        .into_vec();
                    let tol = if b.is_cpu() { EXACT } else { BF16_TOL };
                    assert_close(b, &format!("{what} bf16"), &g16, &want16, tol);
                }
            }
        }
    }
    Ok(())
}
