//! Named parameters with a trainable flag. Frozen parameters are tape constants: they get no
//! gradient buffer and no optimizer state.

use crate::autograd::{Tape, Var};
use crate::tensor::Tensor;
use std::collections::HashMap;

#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub value: Tensor,
    pub trainable: bool,
    /// What weight decay pulls this parameter toward: zero when None; for an expert FFN that
    /// starts as a copy of the public FFN, that copy (the expert then only moves where its data
    /// asks it to).
    pub decay_to: Option<Tensor>,
}

#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    pub params: Vec<Param>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    pub fn add(&mut self, name: impl Into<String>, value: Tensor) -> usize {
        let name = name.into();
        assert!(
            !self.index.contains_key(&name),
            "duplicate parameter {name}"
        );
        self.index.insert(name.clone(), self.params.len());
        self.params.push(Param {
            name,
            value,
            trainable: true,
            decay_to: None,
        });
        self.params.len() - 1
    }

    pub fn id(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub fn get(&self, id: usize) -> &Param {
        &self.params[id]
    }

    pub fn value(&self, id: usize) -> &Tensor {
        &self.params[id].value
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    pub fn set_all_trainable(&mut self, trainable: bool) {
        self.params.iter_mut().for_each(|p| p.trainable = trainable);
    }

    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.value.numel()).sum()
    }

    pub fn trainable_numel(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.value.numel())
            .sum()
    }
}

/// Lazily registers parameters on a tape, once each per forward pass.
pub struct ParamVars {
    vars: Vec<Option<Var>>,
}

impl ParamVars {
    pub fn new(store: &ParamStore) -> Self {
        ParamVars {
            vars: vec![None; store.len()],
        }
    }

    pub fn get(&mut self, tape: &mut Tape, store: &ParamStore, id: usize) -> Var {
        *self.vars[id].get_or_insert_with(|| {
            let p = &store.params[id];
            tape.param(id, &p.value, p.trainable)
        })
    }
}
