//! Flash attention on the GPU (kernels/flash_attention.cu, wrapper src/backend/cuda/flash.rs)
//! against the CPU reference (src/ops/attention.rs: `attention_forward` for out and lse, the tape's
//! attention backward for dq/dk/dv), evaluated on bf16-rounded inputs so that the tolerances
//! measure kernel error, not the rounding of inputs.
//!
//! Shapes cover T = 1, 17, 1000 and 4096 (4096 with few heads, to keep the CPU reference short),
//! head dims 64 and 128 (exact kernels), 80, 200 and 256 (generic 128 / 256 buckets), 12 (generic
//! with plain 2-byte loads), GQA, several sequences, queries fewer than keys and a KV cache longer
//! than the keys. The GPU tests print "SKIP: no CUDA device" and pass without a GPU or without
//! kernels in the build, and fail instead when FLEXRUN_REQUIRE_GPU=1 (as tests/gpu_kernels.rs).
//! The host-only tests (variant choice, shared-memory budgets, decode plans) always run.

use flexrun::autograd::Tape;
use flexrun::backend::cuda::flash::{self, Pass, DECODE_MIN_CHUNK, FLASH_MAX_HD, VARIANTS};
use flexrun::backend::cuda::{Buf, Device, DeviceRead, KernelPath};
use flexrun::ops::{self, AttnShape};
use flexrun::tensor::Tensor;
use half::bf16;
use rand::{rngs::StdRng, SeedableRng};

mod common;
use common::R;

// ---------------------------------------------------------------------------------------------
// Tolerances: |got - want| <= rtol * |want| + atol_frac * max|want| + floor per element.

#[derive(Clone, Copy, Debug)]
struct Tol {
    rtol: f32,
    atol_frac: f32,
    /// Absolute floor for outputs that are exactly zero in the reference: with one visible key
    /// (T = 1) dQ = dK = 0 because dS = P (dP - D) with dP = D, but the GPU forms dP = dO . V and
    /// D = dO . O in different f32 summation orders, leaving O(1e-8) (values here are O(1)).
    floor: f32,
}

/// bf16 outputs (out, dV): one output rounding is 2^-9 relative and P enters the P V product as
/// bf16 (2^-9 per term, averaging out over keys); 2^-7 leaves room for summation order, and the
/// scale term covers entries near zero after cancellation.
const OUT_TOL: Tol = Tol {
    rtol: 1.0 / 128.0,
    atol_frac: 1.0 / 256.0,
    floor: 1e-6,
};
/// dQ and dK: dS is rounded to bf16 before its GEMM and D = dO . O uses the GPU's bf16 O, whose
/// error does not average out where p spreads over many keys (as BF16_CHAIN_TOL in gpu_kernels).
const GRAD_TOL: Tol = Tol {
    rtol: 1.0 / 64.0,
    atol_frac: 1.0 / 64.0,
    floor: 1e-6,
};
/// Absolute error of the logsumexp (f32 statistics of scores that are exact products of bf16
/// inputs summed in f32 in another order, and the ulps of exp2/log2): values are O(1..10).
const LSE_ATOL: f32 = 2e-3;

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: Tol) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length {} vs {}",
        got.len(),
        want.len()
    );
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut worst = (0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let lim = tol.rtol * w.abs() + tol.atol_frac * scale + tol.floor;
        let err = (g - w).abs();
        if err > lim || err.is_nan() {
            panic!("{what}: element {i}: got {g}, want {w} (|err| {err:e}, limit {lim:e}, scale {scale:e})");
        }
        if err > worst.0 {
            worst = (err, i);
        }
    }
    if std::env::var_os("FLEXRUN_GPU_TEST_VERBOSE").is_some() {
        println!(
            "{what}: max |err| {:e} at {} (scale {scale:e})",
            worst.0, worst.1
        );
    }
}

fn assert_lse(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= LSE_ATOL,
            "{what}: lse {i}: got {g}, want {w}"
        );
    }
}

cuda_tests!(
    forward,
    backward,
    decode,
    unaligned_views,
    deterministic,
    forward_sm90,
    backward_sm90,
    decode_sm90
);

// ---------------------------------------------------------------------------------------------
// Helpers.

/// (batch, tq, tk, tk_stride, heads, kv heads, head dim)
type Shape = (usize, usize, usize, usize, usize, usize, usize);

fn shape(t: Shape) -> AttnShape {
    let (b, tq, tk, tk_stride, nh, nkv, hd) = t;
    AttnShape {
        b,
        tq,
        tk,
        tk_stride,
        nh,
        nkv,
        hd,
    }
}

/// Normal(0, 1) values rounded to bf16 (kept in f32).
fn randn(n: usize, r: &mut StdRng) -> Tensor {
    Tensor::randn(&[n], 1.0, r).round_bf16()
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
}

fn inputs(s: &AttnShape, seed: u64) -> Inputs {
    let mut r = StdRng::seed_from_u64(seed);
    let nq = s.b * s.tq * s.nh * s.hd;
    let nk = s.b * s.tk_stride * s.nkv * s.hd;
    Inputs {
        q: randn(nq, &mut r),
        k: randn(nk, &mut r),
        v: randn(nk, &mut r),
        dout: randn(nq, &mut r),
    }
}

fn up(dev: &Device, t: &Tensor) -> flexrun::Result<Buf<bf16>> {
    dev.upload_f32_as_bf16(t.data())
}

fn down(dev: &Device, x: &impl DeviceRead<bf16>) -> flexrun::Result<Vec<f32>> {
    dev.download_bf16_as_f32(x)
}

/// CPU gradients (dq, dk, dv) through the tape's attention backward.
fn cpu_grads(x: &Inputs, s: AttnShape) -> [Vec<f32>; 3] {
    let mut tape = Tape::new();
    let q = tape.leaf(x.q.reshape(&[s.b * s.tq, s.nh * s.hd]));
    let k = tape.leaf(x.k.reshape(&[s.b * s.tk_stride, s.nkv * s.hd]));
    let v = tape.leaf(x.v.reshape(&[s.b * s.tk_stride, s.nkv * s.hd]));
    let out = ops::attention(&mut tape, q, k, v, s);
    let g = tape.backward_with(out, x.dout.reshape(&[s.b * s.tq, s.nh * s.hd]));
    let grad = |var, n: usize| {
        g.get(var)
            .map(|t| t.data().to_vec())
            .unwrap_or_else(|| vec![0.0; n])
    };
    [
        grad(q, x.q.numel()),
        grad(k, x.k.numel()),
        grad(v, x.v.numel()),
    ]
}

/// GPU forward: (out, lse).
fn gpu_forward(dev: &Device, x: &Inputs, s: AttnShape) -> flexrun::Result<(Vec<f32>, Vec<f32>)> {
    let (q, k, v) = (up(dev, &x.q)?, up(dev, &x.k)?, up(dev, &x.v)?);
    let mut out = dev.alloc::<bf16>(q.len())?;
    let mut lse = dev.alloc::<f32>(s.b * s.nh * s.tq)?;
    dev.flash_attention_fwd(&q, &k, &v, s, &mut out, &mut lse)?;
    Ok((down(dev, &out)?, dev.download(&lse)?))
}

/// (out, lse, [dq, dk, dv]) of one GPU forward and backward.
type FwdBwd = (Vec<f32>, Vec<f32>, [Vec<f32>; 3]);

/// GPU forward then backward.
fn gpu_fwd_bwd(dev: &Device, x: &Inputs, s: AttnShape) -> flexrun::Result<FwdBwd> {
    let (q, k, v, dout) = (
        up(dev, &x.q)?,
        up(dev, &x.k)?,
        up(dev, &x.v)?,
        up(dev, &x.dout)?,
    );
    let mut out = dev.alloc::<bf16>(q.len())?;
    let mut lse = dev.alloc::<f32>(s.b * s.nh * s.tq)?;
    dev.flash_attention_fwd(&q, &k, &v, s, &mut out, &mut lse)?;
    let (mut dq, mut dk, mut dv) = (
        dev.alloc::<bf16>(q.len())?,
        dev.alloc::<bf16>(k.len())?,
        dev.alloc::<bf16>(v.len())?,
    );
    dev.flash_attention_bwd(&q, &k, &v, &out, &lse, &dout, s, &mut dq, &mut dk, &mut dv)?;
    Ok((
        down(dev, &out)?,
        dev.download(&lse)?,
        [down(dev, &dq)?, down(dev, &dk)?, down(dev, &dv)?],
    ))
}

// ---------------------------------------------------------------------------------------------
// GPU test bodies.

/// Forward shapes (b, tq, tk, tk_stride, nh, nkv, hd).
const FWD_SHAPES: &[Shape] = &[
    (1, 1, 1, 1, 1, 1, 64),
    (2, 17, 17, 17, 4, 2, 64),
    (2, 17, 17, 17, 4, 4, 128),
    (2, 1, 5, 5, 2, 1, 128),
    (1, 3, 130, 140, 4, 1, 128),
    (1, 70, 300, 333, 2, 1, 64),
    (1, 1000, 1000, 1000, 4, 2, 64),
    (1, 1000, 1000, 1000, 2, 1, 128),
    (1, 4096, 4096, 4096, 2, 1, 128),
    (1, 4096, 4096, 4096, 1, 1, 64),
    (2, 17, 17, 17, 4, 2, 80),
    (1, 1000, 1000, 1000, 2, 1, 80),
    (1, 33, 33, 33, 2, 1, 12),
    (1, 65, 65, 70, 3, 3, 200),
    (1, 130, 130, 130, 2, 1, 256),
];

fn forward(dev: &Device) -> R {
    for (n, &t) in FWD_SHAPES.iter().enumerate() {
        let s = shape(t);
        let x = inputs(&s, 100 + n as u64);
        let (o, lse) = ops::attention_forward(x.q.data(), x.k.data(), x.v.data(), s);
        let (go, glse) = gpu_forward(dev, &x, s)?;
        let what = format!("flash forward {s:?}");
        assert_close(&format!("{what} out"), &go, &o, OUT_TOL);
        assert_lse(&what, &glse, &lse);
    }
    Ok(())
}

/// Shapes for the Hopper forward beyond [`FWD_SHAPES`]: several 128-row query blocks with ragged
/// ends, tiles of keys past the last query's position, new tokens against a longer KV cache,
/// more query heads per KV head.
const SM90_SHAPES: &[Shape] = &[
    (1, 129, 129, 129, 2, 2, 64),
    (2, 300, 300, 300, 4, 2, 128),
    (1, 2, 700, 1024, 8, 2, 128),
    (2, 200, 777, 800, 4, 1, 64),
    (3, 513, 513, 520, 8, 8, 64),
    (1, 2048, 2048, 2048, 8, 1, 128),
];

/// The Hopper forward (kernels/flash_attention_sm90.cu) on every forward shape: against the CPU
/// reference where it applies (head dims 64 and 128), bit-identical over two runs. Other head
/// dims take the sm_80 kernels on the same call. Needs a compute capability 9.0 GPU.
fn forward_sm90(dev: &Device) -> R {
    if !common::hopper(dev, "forward_sm90")? {
        return Ok(());
    }
    for (n, &t) in FWD_SHAPES.iter().chain(SM90_SHAPES).enumerate() {
        let s = shape(t);
        let x = inputs(&s, 600 + n as u64);
        let (o, lse) = ops::attention_forward(x.q.data(), x.k.data(), x.v.data(), s);
        let (q, k, v) = (up(dev, &x.q)?, up(dev, &x.k)?, up(dev, &x.v)?);
        let hopper = flash::sm90_applies(&s, &[q.dptr(), k.dptr(), v.dptr()]);
        assert_eq!(hopper, s.hd == 64 || s.hd == 128, "{s:?}");
        let run = || -> flexrun::Result<(Vec<f32>, Vec<f32>)> {
            let mut out = dev.alloc::<bf16>(q.len())?;
            let mut glse = dev.alloc::<f32>(s.b * s.nh * s.tq)?;
            dev.flash_attention_fwd_on(KernelPath::Sm90, &q, &k, &v, s, &mut out, &mut glse)?;
            Ok((down(dev, &out)?, dev.download(&glse)?))
        };
        let (go, glse) = run()?;
        let what = format!("flash forward sm90 {s:?}");
        assert_close(&format!("{what} out"), &go, &o, OUT_TOL);
        assert_lse(&what, &glse, &lse);
        assert!(run()? == (go, glse), "{what}: results differ between runs");
    }
    Ok(())
}

/// The Hopper backward (kernels/flash_attention_sm90.cu's dK/dV and dQ kernels) on every backward
/// shape and the Hopper forward's extra shapes: dq, dk, dv against the CPU tape (their forward
/// on the same path), exact zeros past tk, bit-identical over two runs. Other head dims take the
/// sm_80 kernels on the same call. Needs a compute capability 9.0 GPU.
fn backward_sm90(dev: &Device) -> R {
    if !common::hopper(dev, "backward_sm90")? {
        return Ok(());
    }
    for (n, &t) in BWD_SHAPES.iter().chain(SM90_SHAPES).enumerate() {
        let s = shape(t);
        let x = inputs(&s, 700 + n as u64);
        let want = cpu_grads(&x, s);
        let (q, k, v, dout) = (
            up(dev, &x.q)?,
            up(dev, &x.k)?,
            up(dev, &x.v)?,
            up(dev, &x.dout)?,
        );
        let run = || -> flexrun::Result<[Vec<f32>; 3]> {
            let path = KernelPath::Sm90;
            let mut out = dev.alloc::<bf16>(q.len())?;
            let mut lse = dev.alloc::<f32>(s.b * s.nh * s.tq)?;
            dev.flash_attention_fwd_on(path, &q, &k, &v, s, &mut out, &mut lse)?;
            let (mut dq, mut dk, mut dv) = (
                dev.alloc::<bf16>(q.len())?,
                dev.alloc::<bf16>(k.len())?,
                dev.alloc::<bf16>(v.len())?,
            );
            dev.flash_attention_bwd_on(
                path, &q, &k, &v, &out, &lse, &dout, s, &mut dq, &mut dk, &mut dv,
            )?;
            Ok([down(dev, &dq)?, down(dev, &dk)?, down(dev, &dv)?])
        };
        let got = run()?;
        let what = format!("flash backward sm90 {s:?}");
        assert_close(&format!("{what} dq"), &got[0], &want[0], GRAD_TOL);
        assert_close(&format!("{what} dk"), &got[1], &want[1], GRAD_TOL);
        assert_close(&format!("{what} dv"), &got[2], &want[2], OUT_TOL);
        let row = s.nkv * s.hd;
        for b in 0..s.b {
            for g in [&got[1], &got[2]] {
                let tail = &g[(b * s.tk_stride + s.tk) * row..(b + 1) * s.tk_stride * row];
                assert!(
                    tail.iter().all(|&x| x == 0.0),
                    "{what}: nonzero gradient past tk"
                );
            }
        }
        assert!(run()? == got, "{what}: results differ between runs");
    }
    Ok(())
}

/// Backward shapes: as the forward, with one T = 4096 case.
const BWD_SHAPES: &[Shape] = &[
    (1, 1, 1, 1, 1, 1, 64),
    (2, 17, 17, 17, 4, 2, 64),
    (2, 17, 17, 17, 4, 4, 128),
    (2, 1, 5, 5, 2, 1, 128),
    (1, 3, 130, 140, 4, 1, 128),
    (1, 70, 300, 333, 2, 1, 64),
    (1, 1000, 1000, 1000, 4, 2, 64),
    (1, 1000, 1000, 1000, 2, 1, 128),
    (1, 4096, 4096, 4096, 2, 1, 128),
    (2, 17, 17, 17, 4, 2, 80),
    (1, 1000, 1000, 1000, 2, 1, 80),
    (1, 33, 33, 33, 2, 1, 12),
    (1, 65, 65, 70, 3, 3, 200),
    (1, 130, 130, 130, 2, 1, 256),
];

fn backward(dev: &Device) -> R {
    for (n, &t) in BWD_SHAPES.iter().enumerate() {
        let s = shape(t);
        let x = inputs(&s, 200 + n as u64);
        let want = cpu_grads(&x, s);
        let (_, _, got) = gpu_fwd_bwd(dev, &x, s)?;
        let what = format!("flash backward {s:?}");
        assert_close(&format!("{what} dq"), &got[0], &want[0], GRAD_TOL);
        assert_close(&format!("{what} dk"), &got[1], &want[1], GRAD_TOL);
        assert_close(&format!("{what} dv"), &got[2], &want[2], OUT_TOL);
        // Cache slots past tk get exactly zero gradient.
        let row = s.nkv * s.hd;
        for b in 0..s.b {
            for g in [&got[1], &got[2]] {
                let tail = &g[(b * s.tk_stride + s.tk) * row..(b + 1) * s.tk_stride * row];
                assert!(
                    tail.iter().all(|&x| x == 0.0),
                    "{what}: nonzero gradient past tk"
                );
            }
        }
    }
    Ok(())
}

/// Decode shapes: new tokens (tq, mostly 1) against a KV cache.
const DECODE_SHAPES: &[Shape] = &[
    (2, 1, 1, 8, 4, 2, 64),
    (1, 1, 1000, 1024, 8, 2, 128),
    (2, 1, 4096, 4096, 4, 1, 128),
    (1, 1, 5000, 5000, 1, 1, 64),
    (3, 1, 17, 40, 4, 4, 80),
    (1, 1, 300, 301, 2, 1, 12),
    (1, 1, 129, 200, 2, 2, 256),
    (1, 3, 500, 512, 4, 2, 64),
];

fn decode(dev: &Device) -> R {
    for (n, &t) in DECODE_SHAPES.iter().enumerate() {
        let s = shape(t);
        let x = inputs(&s, 300 + n as u64);
        let (o, lse) = ops::attention_forward(x.q.data(), x.k.data(), x.v.data(), s);
        let (q, k, v) = (up(dev, &x.q)?, up(dev, &x.k)?, up(dev, &x.v)?);
        let mut out = dev.alloc::<bf16>(q.len())?;
        let mut glse = dev.alloc::<f32>(s.b * s.nh * s.tq)?;
        dev.flash_attention_decode(&q, &k, &v, s, &mut out, &mut glse)?;
        let what = format!("flash decode {s:?}");
        assert_close(&format!("{what} out"), &down(dev, &out)?, &o, OUT_TOL);
        assert_lse(&what, &dev.download(&glse)?, &lse);
    }
    Ok(())
}

/// The Hopper decode (keys staged in shared memory by TMA) on every decode shape: against the CPU
/// reference where it applies (head dims 64 and 128), bit-identical over two runs. Needs a compute
/// capability 9.0 GPU.
fn decode_sm90(dev: &Device) -> R {
    if !common::hopper(dev, "decode_sm90")? {
        return Ok(());
    }
    // Beyond DECODE_SHAPES: chunks of several 64-key sub-tiles (the ring wraps), chunks that
    // are not a multiple of 64 keys, hd 64 and 128, one, two and four heads per CTA (MHA, GQA
    // groups of 2, 4, 6 and 8), and rows with no key in some chunks.
    const MORE: &[Shape] = &[
        (1, 1, 2600, 2600, 32, 8, 128),
        (4, 1, 8192, 8192, 32, 8, 128),
        (2, 1, 8192, 8192, 16, 4, 64),
        (1, 4, 130, 130, 2, 1, 64),
        (1, 4, 130, 130, 8, 2, 128),
        (1, 2, 300, 300, 4, 4, 128),
        (1, 1, 1000, 1000, 4, 2, 128),
        (1, 1, 700, 700, 6, 1, 64),
    ];
    for (n, &t) in DECODE_SHAPES.iter().chain(MORE).enumerate() {
        let s = shape(t);
        let x = inputs(&s, 800 + n as u64);
        let (o, lse) = ops::attention_forward(x.q.data(), x.k.data(), x.v.data(), s);
        let (q, k, v) = (up(dev, &x.q)?, up(dev, &x.k)?, up(dev, &x.v)?);
        let run = || -> flexrun::Result<(Vec<f32>, Vec<f32>)> {
            let mut out = dev.alloc::<bf16>(q.len())?;
            let mut glse = dev.alloc::<f32>(s.b * s.nh * s.tq)?;
            dev.flash_attention_decode_on(KernelPath::Sm90, &q, &k, &v, s, &mut out, &mut glse)?;
            Ok((down(dev, &out)?, dev.download(&glse)?))
        };
        let (go, glse) = run()?;
        let what = format!("flash decode sm90 {s:?}");
        assert_close(&format!("{what} out"), &go, &o, OUT_TOL);
        assert_lse(&what, &glse, &lse);
        // The sm_80 kernel does the same arithmetic (its chunks are multiples of 32 keys, the
        // Hopper kernel's of 64, so only the merge order of the partials differs): the two agree
        // to about a bf16 rounding, a bound much tighter than the CPU's that a wrong TMA layout
        // would not meet.
        let mut out80 = dev.alloc::<bf16>(q.len())?;
        let mut lse80 = dev.alloc::<f32>(s.b * s.nh * s.tq)?;
        dev.flash_attention_decode_on(KernelPath::Sm80, &q, &k, &v, s, &mut out80, &mut lse80)?;
        let tight = Tol {
            rtol: 1.0 / 128.0,
            atol_frac: 1.0 / 1024.0,
            floor: 1e-6,
        };
        assert_close(&format!("{what} vs sm80"), &go, &down(dev, &out80)?, tight);
        assert!(run()? == (go, glse), "{what}: results differ between runs");
    }
    Ok(())
}

/// Buffers at an odd element offset (views) take the generic kernels with plain 2-byte loads,
/// even at head dims 64 and 128.
fn unaligned_views(dev: &Device) -> R {
    for (n, &t) in [(2, 40, 40, 45, 4, 2, 64), (1, 70, 70, 70, 2, 1, 128)]
        .iter()
        .enumerate()
    {
        let s = shape(t);
        let x = inputs(&s, 400 + n as u64);
        let (o, lse) = ops::attention_forward(x.q.data(), x.k.data(), x.v.data(), s);
        let want = cpu_grads(&x, s);
        // One extra leading element shifts every buffer by 2 bytes.
        let shifted = |t: &Tensor| -> flexrun::Result<Buf<bf16>> {
            let mut v = vec![0f32];
            v.extend_from_slice(t.data());
            dev.upload_f32_as_bf16(&v)
        };
        let (q, k, v, dout) = (
            shifted(&x.q)?,
            shifted(&x.k)?,
            shifted(&x.v)?,
            shifted(&x.dout)?,
        );
        let (nq, nk) = (x.q.numel(), x.k.numel());
        let mut out = dev.alloc::<bf16>(nq + 1)?;
        let mut glse = dev.alloc::<f32>(s.b * s.nh * s.tq)?;
        let (mut dq, mut dk, mut dv) = (
            dev.alloc::<bf16>(nq + 1)?,
            dev.alloc::<bf16>(nk + 1)?,
            dev.alloc::<bf16>(nk + 1)?,
        );
        assert!(!flash::vectorizable(s.hd, &[q.view(1..).dptr()]));
        dev.flash_attention_fwd(
            &q.view(1..),
            &k.view(1..),
            &v.view(1..),
            s,
            &mut out.view_mut(1..),
            &mut glse,
        )?;
        dev.flash_attention_bwd(
            &q.view(1..),
            &k.view(1..),
            &v.view(1..),
            &out.view(1..),
            &glse,
            &dout.view(1..),
            s,
            &mut dq.view_mut(1..),
            &mut dk.view_mut(1..),
            &mut dv.view_mut(1..),
        )?;
        let what = format!("flash unaligned {s:?}");
        assert_close(
            &format!("{what} out"),
            &down(dev, &out.view(1..))?,
            &o,
            OUT_TOL,
        );
        assert_lse(&what, &dev.download(&glse)?, &lse);
        assert_close(
            &format!("{what} dq"),
            &down(dev, &dq.view(1..))?,
            &want[0],
            GRAD_TOL,
        );
        assert_close(
            &format!("{what} dk"),
            &down(dev, &dk.view(1..))?,
            &want[1],
            GRAD_TOL,
        );
        assert_close(
            &format!("{what} dv"),
            &down(dev, &dv.view(1..))?,
            &want[2],
            OUT_TOL,
        );
    }
    Ok(())
}

/// No atomics: two runs give identical bits (forward, backward, decode).
fn deterministic(dev: &Device) -> R {
    let s = shape((2, 300, 300, 300, 4, 2, 64));
    let x = inputs(&s, 500);
    let a = gpu_fwd_bwd(dev, &x, s)?;
    let b = gpu_fwd_bwd(dev, &x, s)?;
    assert!(
        a.0 == b.0 && a.1 == b.1 && a.2 == b.2,
        "flash attention results differ between runs"
    );
    let s = shape((1, 1, 3000, 3000, 4, 1, 128));
    let x = inputs(&s, 501);
    let (q, k, v) = (up(dev, &x.q)?, up(dev, &x.k)?, up(dev, &x.v)?);
    let run = || -> flexrun::Result<(Vec<f32>, Vec<f32>)> {
        let mut out = dev.alloc::<bf16>(q.len())?;
        let mut lse = dev.alloc::<f32>(s.b * s.nh * s.tq)?;
        dev.flash_attention_decode(&q, &k, &v, s, &mut out, &mut lse)?;
        Ok((down(dev, &out)?, dev.download(&lse)?))
    };
    assert!(run()? == run()?, "flash decode results differ between runs");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Host-only tests (no GPU needed).

/// Opt-in shared memory per block of the target GPUs (bytes).
const A100_SMEM: usize = 166_912;
const H100_SMEM: usize = 232_448;

#[test]
fn variant_selection() {
    let pick = |pass, hd, vec| flash::select(pass, hd, vec).unwrap();
    for pass in [Pass::Fwd, Pass::BwdDkdv, Pass::BwdDq] {
        let v = pick(pass, 64, true);
        assert!(v.exact && v.hd == 64, "{v:?}");
        let v = pick(pass, 128, true);
        assert!(v.exact && v.hd == 128, "{v:?}");
        assert_eq!(pick(pass, 64, false).hd, 64);
        assert!(!pick(pass, 64, false).exact);
        assert!(!pick(pass, 128, false).exact);
        for (hd, bucket) in [
            (1, 64),
            (12, 64),
            (63, 64),
            (65, 128),
            (80, 128),
            (96, 128),
            (129, 256),
            (200, 256),
            (256, 256),
        ] {
            let v = pick(pass, hd, hd.is_multiple_of(8));
            assert!(
                !v.exact && v.hd == bucket && v.pass == pass,
                "hd {hd}: {v:?}"
            );
        }
        assert!(flash::select(pass, 0, true).is_err());
        assert!(flash::select(pass, FLASH_MAX_HD + 1, true).is_err());
    }
    assert!(flash::vectorizable(64, &[0, 16, 4096]));
    assert!(!flash::vectorizable(64, &[0, 2]));
    assert!(!flash::vectorizable(12, &[0]));
}

#[test]
fn variants_fit_the_target_gpus() {
    for v in VARIANTS {
        assert!(v.threads % 32 == 0 && v.threads <= 1024, "{v:?}");
        assert!(
            v.rows % 16 == 0 && v.stream % 16 == 0,
            "{v:?}: tiles are whole MMA blocks"
        );
        assert!(
            v.smem <= H100_SMEM,
            "{v:?} exceeds the H100's shared memory"
        );
        if v.hd <= 128 {
            // Two CTAs per SM on an A100 for the common head dims.
            assert!(
                2 * v.smem <= A100_SMEM,
                "{v:?}: fewer than two CTAs per A100 SM"
            );
        } else {
            assert!(
                v.smem <= A100_SMEM,
                "{v:?} exceeds the A100's shared memory"
            );
        }
    }
    // Every (pass, bucket, exact) used by `select` exists exactly once.
    for v in VARIANTS {
        assert_eq!(
            VARIANTS
                .iter()
                .filter(|w| w.pass == v.pass && w.hd == v.hd && w.exact == v.exact)
                .count(),
            1
        );
    }
}

#[test]
fn sm90_kernels_fit_the_h100() {
    for hd in [64, 128] {
        let smem = flash::sm90_smem(hd);
        assert!(smem <= H100_SMEM, "hd {hd}: {smem} bytes of shared memory");
        assert!(flash::sm90_keys_per_tile(hd).is_multiple_of(16));
    }
    let s = AttnShape::causal(1, 100, 4, 2, 128);
    assert!(flash::sm90_applies(&s, &[0, 16, 256]));
    assert!(!flash::sm90_applies(&s, &[0, 2]));
    assert!(!flash::sm90_applies(
        &AttnShape::causal(1, 100, 4, 2, 80),
        &[0]
    ));
    // The Hopper decode's query heads per CTA: the largest of 4, 2, 1 dividing the GQA group.
    for (group, hpc) in [(1, 1), (2, 2), (3, 1), (4, 4), (6, 2), (8, 4), (32, 4)] {
        assert_eq!(flash::decode_heads_per_cta(group), hpc, "group {group}");
    }
    // No query rows: the sm_80 path, which zeroes dK and dV of the whole cache.
    let empty = AttnShape::cached(1, 0, 10, 16, 4, 2, 128);
    assert!(!flash::sm90_applies(&empty, &[0]));
    for hd in [64, 128] {
        let smem = flash::sm90_bwd_smem(hd);
        assert!(smem <= H100_SMEM, "backward hd {hd}: {smem} bytes");
        // Three decode CTAs per SM.
        let smem = flash::sm90_decode_smem(hd);
        assert!(3 * smem <= H100_SMEM, "decode hd {hd}: {smem} bytes");
    }
}

#[test]
fn decode_plans_cover_the_cache() {
    for &(rows, tk) in &[
        (1, 1),
        (1, 63),
        (1, 64),
        (1, 65),
        (2, 1000),
        (32, 4096),
        (8, 100_000),
        (4096, 17),
        (1, 1 << 20),
    ] {
        for sms in [1, 108, 132] {
            let p = flash::decode_plan(rows, tk, 128, true, sms);
            assert!(
                p.chunk >= DECODE_MIN_CHUNK && p.chunk.is_multiple_of(32),
                "{p:?}"
            );
            assert!(
                p.nchunks >= 1 && p.nchunks * p.chunk >= tk && (p.nchunks - 1) * p.chunk < tk,
                "rows {rows} tk {tk}: {p:?}"
            );
        }
    }
    assert_eq!(
        flash::decode_plan(1, 100, 64, true, 132).kernel,
        "flash_decode_v8l8_bf16"
    );
    assert_eq!(
        flash::decode_plan(1, 100, 80, true, 132).kernel,
        "flash_decode_v8l16_bf16"
    );
    assert_eq!(
        flash::decode_plan(1, 100, 256, true, 132).kernel,
        "flash_decode_v8l32_bf16"
    );
    assert_eq!(
        flash::decode_plan(1, 100, 128, false, 132).kernel,
        "flash_decode_s1_bf16"
    );
}

#[test]
fn causal_flop_count() {
    // Tq = Tk = 4: 1 + 2 + 3 + 4 visible pairs.
    assert_eq!(flash::causal_pairs(&AttnShape::causal(1, 4, 1, 1, 8)), 10.0);
    // Two new tokens against 5 keys: 4 + 5 pairs.
    let s = AttnShape {
        b: 2,
        tq: 2,
        tk: 5,
        tk_stride: 8,
        nh: 3,
        nkv: 1,
        hd: 16,
    };
    assert_eq!(flash::causal_pairs(&s), 9.0);
    assert_eq!(
        flash::causal_attention_flops(&s),
        4.0 * 2.0 * 3.0 * 16.0 * 9.0
    );
}
