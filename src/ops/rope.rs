//! Rotary position embedding, rotate-half (NeoX) layout, on `[B*T, heads*hd]` activations.
//! `inv_freq_i = theta^(-2i/hd)`; angles and cos/sin in f32 like the reference implementation.

use crate::autograd::{Backward, Tape, Var};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::sync::Arc;

/// cos/sin for positions `0..max_pos`, `[max_pos, hd/2]` each.
pub struct RopeTable {
    pub hd: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    max_pos: usize,
}

impl RopeTable {
    pub fn new(hd: usize, theta: f64, max_pos: usize) -> Self {
        let half = hd / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / hd as f64)) as f32)
            .collect();
        let mut cos = vec![0f32; max_pos * half];
        let mut sin = vec![0f32; max_pos * half];
        for p in 0..max_pos {
            for i in 0..half {
                let a = p as f32 * inv[i];
                cos[p * half + i] = a.cos();
                sin[p * half + i] = a.sin();
            }
        }
        RopeTable {
            hd,
            cos,
            sin,
            max_pos,
        }
    }

    pub fn max_pos(&self) -> usize {
        self.max_pos
    }

    /// Rotate one row `[heads * hd]` in place as position `pos` (the arithmetic of [`rope`]).
    pub fn apply_row(&self, x: &mut [f32], pos: usize) {
        let (hd, half) = (self.hd, self.hd / 2);
        assert!(
            pos < self.max_pos,
            "rope: position {pos} beyond table {}",
            self.max_pos
        );
        let (c, s) = (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
        for h in x.chunks_mut(hd) {
            let (x1, x2) = h.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}

/// Apply RoPE to `x` `[B*T, heads*hd]` with positions `offset + t` (t = row index within a sequence).
pub fn rope(tape: &mut Tape, x: Var, table: &Arc<RopeTable>, t_len: usize, offset: usize) -> Var {
    let xv = tape.value(x);
    let y = apply(xv, table, t_len, offset, false);
    let op = RopeBack {
        table: table.clone(),
        t_len,
        offset,
    };
    tape.push(y, &[x], op)
}

fn apply(x: &Tensor, table: &RopeTable, t_len: usize, offset: usize, inverse: bool) -> Tensor {
    let mut y = vec![0f32; x.numel()];
    table.rotate_rows(x.data(), &mut y, x.cols(), t_len, offset, inverse);
    Tensor::from_vec(y, x.shape())
}

impl RopeTable {
    /// `y` = the rows of `x` (`[rows, width]`, heads of `hd`) rotated as positions
    /// `offset + row % t_len`; `inverse` rotates by the negated angle (the backward).
    pub(crate) fn rotate_rows(
        &self,
        x: &[f32],
        y: &mut [f32],
        width: usize,
        t_len: usize,
        offset: usize,
        inverse: bool,
    ) {
        let hd = self.hd;
        let half = hd / 2;
        assert_eq!(
            width % hd,
            0,
            "rope: width {width} not a multiple of head dim {hd}"
        );
        assert!(hd.is_multiple_of(2), "rope: head dim {hd} must be even");
        assert!(
            offset + t_len <= self.max_pos,
            "rope: position {} beyond table {}",
            offset + t_len,
            self.max_pos
        );
        assert_eq!(x.len(), y.len(), "rope: input and output sizes differ");
        let sign = if inverse { -1.0 } else { 1.0 };
        y.par_chunks_mut(width.max(1))
            .zip(x.par_chunks(width.max(1)))
            .with_min_len(16)
            .enumerate()
            .for_each(|(r, (y, x))| {
                let p = offset + r % t_len;
                let (c, s) = (
                    &self.cos[p * half..(p + 1) * half],
                    &self.sin[p * half..(p + 1) * half],
                );
                for (yh, xh) in y.chunks_mut(hd).zip(x.chunks(hd)) {
                    let (y1, y2) = yh.split_at_mut(half);
                    let (x1, x2) = xh.split_at(half);
                    for i in 0..half {
                        let si = sign * s[i];
                        y1[i] = x1[i] * c[i] - x2[i] * si;
                        y2[i] = x2[i] * c[i] + x1[i] * si;
                    }
                }
            });
    }
}

struct RopeBack {
    table: Arc<RopeTable>,
    t_len: usize,
    offset: usize,
}

impl Backward for RopeBack {
    fn backward(&self, g: &Tensor, _needs: &[bool]) -> Vec<Option<Tensor>> {
        // The rotation is orthogonal: its transpose is the rotation by the negated angle.
        vec![Some(apply(g, &self.table, self.t_len, self.offset, true))]
    }
}
