//! `y = x W^T` (no bias): x `[N, K]`, W `[M, K]` (PyTorch/HF layout), y `[N, M]`.

use crate::autograd::{Backward, Tape, Var};
use crate::backend::cpu::matmul;
use crate::tensor::Tensor;

pub fn linear(tape: &mut Tape, x: Var, w: Var) -> Var {
    let (xv, wv) = (tape.value(x), tape.value(w));
    let (n, k) = (xv.rows(), xv.cols());
    let m = wv.rows();
    assert_eq!(wv.cols(), k, "linear: x has {k} features, weight {:?}", wv.shape());
    let mut y = vec![0f32; n * m];
    matmul(n, m, k, xv.data(), false, wv.data(), true, &mut y, false);
    let op = LinearBack { x: xv.clone(), w: wv.clone() };
    tape.push(Tensor::from_vec(y, &[n, m]), &[x, w], op)
}

struct LinearBack {
    x: Tensor,
    w: Tensor,
}

impl Backward for LinearBack {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Vec<Option<Tensor>> {
        let (n, k, m) = (self.x.rows(), self.x.cols(), self.w.rows());
        let dx = needs[0].then(|| {
            let mut dx = vec![0f32; n * k];
            matmul(n, k, m, g.data(), false, self.w.data(), false, &mut dx, false);
            Tensor::from_vec(dx, self.x.shape())
        });
        let dw = needs[1].then(|| {
            let mut dw = vec![0f32; m * k];
            matmul(m, k, n, g.data(), true, self.x.data(), false, &mut dw, false);
            Tensor::from_vec(dw, self.w.shape())
        });
        vec![dx, dw]
    }
}
