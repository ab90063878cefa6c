//! `y = x W^T` (no bias): x `[N, K]`, W `[M, K]` (PyTorch/HF layout), y `[N, M]`.
//!
//! W may be stored in bf16 (a model loaded with `keep_bf16`): the forward then converts W to f32
//! one tile of rows at a time, so a bf16 model never holds an f32 copy of a whole matrix. bf16
//! weights are inference-only: they cannot receive a gradient (the input still can).

use crate::autograd::{Backward, Tape, Var};
use crate::backend::cpu::{matmul, matmul_new};
use crate::tensor::{DType, Tensor};
use rayon::prelude::*;

/// f32 values of a bf16 weight converted per tile of the forward (4 MiB: small next to any
/// matrix worth keeping in bf16, large enough that each tile is still an efficient GEMM).
const BF16_TILE_ELEMS: usize = 1 << 20;

pub fn linear(tape: &mut Tape, x: Var, w: Var) -> Var {
    let (xv, wv) = (tape.value(x), tape.value(w));
    let (n, k) = (xv.rows(), xv.cols());
    let m = wv.rows();
    assert_eq!(
        wv.cols(),
        k,
        "linear: x has {k} features, weight {:?}",
        wv.shape()
    );
    // The GEMM writes every element of a fresh output: no zero-fill first (`matmul_new`).
    let y = match wv.dtype() {
        DType::F32 => matmul_new(n, m, k, xv.data(), false, wv.data(), true),
        DType::BF16 => {
            assert!(
                !tape.requires_grad(w),
                "linear: a bf16 weight {:?} cannot be trained (bf16 weights are inference-only; load with keep_bf16 = false to train)",
                wv.shape()
            );
            let mut y = vec![0f32; n * m];
            linear_bf16(xv.data(), wv, n, k, &mut y);
            y
        }
    };
    let op = LinearBack {
        x: xv.clone(),
        w: wv.clone(),
    };
    tape.push(Tensor::from_vec(y, &[n, m]), &[x, w], op)
}

/// `y = x W^T` for a bf16 `W [M, K]`: each tile of W's rows is converted to f32 and multiplied,
/// and its `[N, tile]` result block is copied into the columns of `y`.
fn linear_bf16(x: &[f32], w: &Tensor, n: usize, k: usize, y: &mut [f32]) {
    let m = w.rows();
    let tile = (BF16_TILE_ELEMS / k.max(1)).clamp(1, m.max(1));
    let mut wt = vec![0f32; tile * k];
    let mut yt = vec![0f32; n * tile];
    for m0 in (0..m).step_by(tile) {
        let mt = tile.min(m - m0);
        let (wt, yt) = (&mut wt[..mt * k], &mut yt[..n * mt]);
        wt.par_chunks_mut(k)
            .enumerate()
            .for_each(|(r, row)| w.rows_to_f32(m0 + r, 1, row));
        matmul(n, mt, k, x, false, wt, true, yt, false);
        for (yr, tr) in y.chunks_exact_mut(m).zip(yt.chunks_exact(mt)) {
            yr[m0..m0 + mt].copy_from_slice(tr);
        }
    }
}

struct LinearBack {
    x: Tensor,
    w: Tensor,
}

impl Backward for LinearBack {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Vec<Option<Tensor>> {
        let (n, k, m) = (self.x.rows(), self.x.cols(), self.w.rows());
        let dx = needs[0].then(|| {
            // A bf16 (frozen) weight is converted whole here: backward is a training path, and
            // training keeps weights in f32 anyway.
            let w = self.w.to_dtype(DType::F32);
            let dx = matmul_new(n, k, m, g.data(), false, w.data(), false);
            Tensor::from_vec(dx, self.x.shape())
        });
        let dw = needs[1].then(|| {
            let dw = matmul_new(m, k, n, g.data(), true, self.x.data(), false);
            Tensor::from_vec(dw, self.w.shape())
        });
        vec![dx, dw]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    /// Forward and input gradient through a bf16 weight equal those through the same values in
    /// f32, with several row tiles (the last one partial).
    #[test]
    fn bf16_weight_matches_f32_weight_across_tiles() {
        let mut rng = StdRng::seed_from_u64(5);
        let (n, k, m) = (3, 3000, 2 * BF16_TILE_ELEMS / 3000 + 17);
        let x = Tensor::randn(&[n, k], 1.0, &mut rng);
        let w32 = Tensor::randn(&[m, k], 0.05, &mut rng).round_bf16();
        let w16 = w32.to_dtype(DType::BF16);
        let g = Tensor::randn(&[n, m], 1.0, &mut rng);
        let run = |w: &Tensor| {
            let mut tape = Tape::new();
            let xv = tape.leaf(x.clone());
            let wv = tape.param(0, w, false);
            let y = linear(&mut tape, xv, wv);
            let out = tape.value(y).clone();
            let dx = tape.backward_with(y, g.clone()).get(xv).unwrap().clone();
            (out, dx)
        };
        let ((y32, dx32), (y16, dx16)) = (run(&w32), run(&w16));
        assert!(
            y32.max_abs_diff(&y16) <= 1e-5,
            "forward {}",
            y32.max_abs_diff(&y16)
        );
        assert!(
            dx32.max_abs_diff(&dx16) <= 1e-5,
            "dx {}",
            dx32.max_abs_diff(&dx16)
        );
    }

    #[test]
    #[should_panic(expected = "bf16 weights are inference-only")]
    fn trainable_bf16_weight_is_refused() {
        let mut tape = Tape::new();
        let x = tape.leaf(Tensor::full(&[1, 4], 1.0));
        let w = tape.param(0, &Tensor::full(&[2, 4], 0.5).to_dtype(DType::BF16), true);
        linear(&mut tape, x, w);
    }
}
