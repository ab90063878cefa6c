//! Row lookup: `y[n] = W[ids[n]]`, W `[V, H]`. Ids are validated by the caller (model input
//! checks); an out-of-range id here is a programming error. W may be stored in bf16 (inference
//! only): the looked-up rows are converted to f32.

use crate::autograd::{Backward, Tape, Var};
use crate::tensor::{DType, Tensor};
use std::sync::Arc;

pub fn embedding(tape: &mut Tape, w: Var, ids: &[u32]) -> Var {
    let wv = tape.value(w);
    let (v, h) = (wv.rows(), wv.cols());
    assert!(
        wv.dtype() == DType::F32 || !tape.requires_grad(w),
        "embedding: a bf16 table cannot be trained (bf16 weights are inference-only; load with keep_bf16 = false to train)"
    );
    let mut y = vec![0f32; ids.len() * h];
    for (n, &id) in ids.iter().enumerate() {
        assert!(
            (id as usize) < v,
            "embedding: id {id} out of range (vocab {v})"
        );
        wv.rows_to_f32(id as usize, 1, &mut y[n * h..(n + 1) * h]);
    }
    let op = EmbeddingBack {
        ids: Arc::new(ids.to_vec()),
        vocab: v,
    };
    tape.push(Tensor::from_vec(y, &[ids.len(), h]), &[w], op)
}

struct EmbeddingBack {
    ids: Arc<Vec<u32>>,
    vocab: usize,
}

impl Backward for EmbeddingBack {
    fn backward(&self, g: &Tensor, _needs: &[bool]) -> Vec<Option<Tensor>> {
        let h = g.cols();
        let mut dw = vec![0f32; self.vocab * h];
        for (n, &id) in self.ids.iter().enumerate() {
            let row = &mut dw[id as usize * h..(id as usize + 1) * h];
            for (a, b) in row.iter_mut().zip(g.row(n)) {
                *a += b;
            }
        }
        vec![Some(Tensor::from_vec(dw, &[self.vocab, h]))]
    }
}
