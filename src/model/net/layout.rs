//! How a [`Net`]'s weights map to the host model's parameters: the fixed order of its weights
//! and the host ids behind each (stacked experts split per expert), which of them train
//! ([`Net::train_as`]), and gradients and values moved between the two layouts.

use super::train::NetGrads;
use super::Net;
use crate::backend::kernels::{Kernels, R};
use crate::bail;
use crate::error::Result;
use crate::model::{Ffn, Model};
use crate::tensor::Tensor;

impl<K: Kernels> Net<'_, K> {
    /// Compute gradients only for `model`'s trainable parameters (the model this was uploaded
    /// from). A stacked weight (experts, router rows, biases) may be trained for a suffix of
    /// its experts only, e.g. [public FFN (frozen), new FFN (trained)] in expert training, or
    /// every router row and no FFN in router tuning.
    pub fn train_as(&mut self, model: &Model) -> Result<()> {
        self.grad_from = grad_from(model)?;
        let layout = self.host_layout();
        let trained = |idx: usize| self.grad_from[idx] < layout[idx].len();
        self.below = (0..self.layers.len())
            .map(|li| trained(0) || (3..self.layer_base(li)).any(trained))
            .collect();
        Ok(())
    }

    /// The host parameter ids behind each weight, in [`NetGrads`] order: one id for a plain
    /// weight, E for the experts' stacked weights, router rows and biases (equal segments; None
    /// for an expert without a bias, whose segment holds 0).
    pub fn host_layout(&self) -> Vec<Vec<Option<usize>>> {
        layout_of(
            [self.embed_id, self.final_norm_id, self.lm_head_id],
            &self.layer_ids,
        )
    }

    /// The gradients as host tensors keyed by the host model's parameter ids (stacked expert
    /// weights split per expert), in the shapes of the parameters, sorted by id.
    pub fn grads_to_host(&self, g: &NetGrads<K>, model: &Model) -> Result<Vec<(usize, Tensor)>> {
        let mut out = Vec::new();
        for ((ids, buf), &from) in self.host_layout().iter().zip(&g.grads).zip(&self.grad_from) {
            let Some(buf) = buf else { continue };
            for (id, seg) in split_to_host(self.dev, buf.r(), &ids[from..])? {
                out.push((id, Tensor::from_vec(seg, model.params.value(id).shape())));
            }
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }
}

/// The host parameter ids behind each weight of a model with these embedding, final norm and
/// LM head ids and layers, in [`NetGrads`] order (see [`Net::host_layout`]).
fn layout_of(top: [usize; 3], layers: &[crate::model::Layer]) -> Vec<Vec<Option<usize>>> {
    let one = |id: usize| vec![Some(id)];
    let mut out: Vec<Vec<Option<usize>>> = top.iter().map(|&id| one(id)).collect();
    for l in layers {
        for id in [
            l.q,
            l.k,
            l.v,
            l.o,
            l.q_norm,
            l.k_norm,
            l.post_attn_norm,
            l.post_ffn_norm,
        ] {
            out.push(one(id));
        }
        match &l.ffn {
            Ffn::Dense(f) => out.extend([one(f.gate), one(f.up), one(f.down)]),
            Ffn::Moe(experts) => {
                let all = |pick: &dyn Fn(&crate::model::Expert) -> Option<usize>| {
                    experts.iter().map(pick).collect::<Vec<_>>()
                };
                out.push(all(&|x| Some(x.ffn.gate)));
                out.push(all(&|x| Some(x.ffn.up)));
                out.push(all(&|x| Some(x.ffn.down)));
                out.push(all(&|x| Some(x.router)));
                if experts.iter().any(|x| x.bias.is_some()) {
                    out.push(all(&|x| x.bias));
                }
            }
        }
    }
    out
}

/// Per weight of `model` in [`NetGrads`] order, the first expert whose part of it trains (see
/// `Net::grad_from`), or a one-line error for a set of trained parameters the model cannot
/// train: the trained experts of a stacked weight must be its last ones (expert training's
/// [public frozen, new trained]; router tuning trains them all). Checked before any work.
pub fn grad_from(model: &Model) -> Result<Vec<usize>> {
    let layout = layout_of(
        [model.embed, model.final_norm, model.lm_head],
        &model.layers,
    );
    let names = |ids: &[Option<usize>]| -> Vec<String> {
        ids.iter()
            .flatten()
            .map(|&id| model.params.params[id].name.clone())
            .collect()
    };
    let mut from = Vec::with_capacity(layout.len());
    for ids in &layout {
        let trained: Vec<bool> = ids
            .iter()
            .map(|id| id.is_some_and(|id| model.params.params[id].trainable))
            .collect();
        let Some(f) = trained_suffix(&trained) else {
            bail!(
                "cannot train this set of parameters: the trained experts of a stacked weight \
                 must be its last ones ({:?})",
                names(ids)
            );
        };
        from.push(f);
    }
    Ok(from)
}

/// Where the trained segments of a stacked weight start, when they are its last ones
/// (`trained[f..]` all true, `trained[..f]` all false; `trained.len()` when none is); None
/// otherwise.
fn trained_suffix(trained: &[bool]) -> Option<usize> {
    let f = trained.iter().position(|&t| t).unwrap_or(trained.len());
    trained[f..].iter().all(|&t| t).then_some(f)
}

/// `buf` brought to the host and cut into `ids.len()` equal segments, one per id (None: skipped).
pub(super) fn split_to_host<K: Kernels>(
    dev: &K,
    buf: R<'_, K, f32>,
    ids: &[Option<usize>],
) -> Result<Vec<(usize, Vec<f32>)>> {
    let all = dev.download(buf)?;
    let per = all.len() / ids.len().max(1);
    Ok(ids
        .iter()
        .zip(all.chunks(per.max(1)))
        .filter_map(|(id, c)| id.map(|id| (id, c.to_vec())))
        .collect())
}

/// The host values of `ids` (f32; None: zeros of the segment size `per`) concatenated.
pub(super) fn concat_from_host(
    ids: &[Option<usize>],
    per: usize,
    value: impl Fn(usize) -> Vec<f32>,
) -> Vec<f32> {
    let mut all = Vec::with_capacity(per * ids.len());
    for id in ids {
        match id {
            Some(id) => all.extend(value(*id)),
            None => all.extend(std::iter::repeat_n(0.0, per)),
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::trained_suffix;

    #[test]
    fn trained_experts_must_be_the_last_ones() {
        assert_eq!(trained_suffix(&[true]), Some(0));
        assert_eq!(trained_suffix(&[false]), Some(1));
        assert_eq!(trained_suffix(&[false, true]), Some(1));
        assert_eq!(trained_suffix(&[true, true, true]), Some(0));
        assert_eq!(trained_suffix(&[false, false, false]), Some(3));
        assert_eq!(trained_suffix(&[false, true, true]), Some(1));
        assert_eq!(trained_suffix(&[true, false]), None);
        assert_eq!(trained_suffix(&[false, true, false, true]), None);
        assert_eq!(trained_suffix(&[]), Some(0));
    }
}
