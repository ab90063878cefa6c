//! The autograd tape.
//!
//! Every op appends one node holding its output value and, when any input needs a gradient, a
//! [`Backward`] closure-object that maps the output gradient to input gradients. Leaves are
//! constants, trainable parameters or frozen parameters: frozen parameters never receive a
//! gradient buffer, and ops skip the work for inputs that do not need one (`needs[i] == false`).
//! `backward` walks the nodes in reverse, accumulating gradients and freeing each node's gradient
//! as soon as it has been propagated.

pub mod gradcheck;

use crate::tensor::Tensor;

/// Handle to a node of a [`Tape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub(crate) usize);

/// Backward of one op: gradients for each input (in the order given to [`Tape::push`]); entries
/// whose `needs` flag is false may be `None` and should not be computed.
pub trait Backward: Send + Sync {
    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Vec<Option<Tensor>>;
}

struct Node {
    value: Tensor,
    parents: Vec<usize>,
    op: Option<Box<dyn Backward>>,
    requires_grad: bool,
    param: Option<usize>,
}

#[derive(Default)]
pub struct Tape {
    nodes: Vec<Node>,
    no_grad: bool,
}

/// Gradients produced by [`Tape::backward`]: per parameter id, and per leaf variable.
#[derive(Default)]
pub struct Grads {
    pub params: Vec<(usize, Tensor)>,
    leaves: Vec<(Var, Tensor)>,
}

impl Grads {
    pub fn get(&self, v: Var) -> Option<&Tensor> {
        self.leaves.iter().find(|(w, _)| *w == v).map(|(_, t)| t)
    }
    pub fn param(&self, id: usize) -> Option<&Tensor> {
        self.params.iter().find(|(p, _)| *p == id).map(|(_, t)| t)
    }
}

impl Tape {
    pub fn new() -> Self {
        Self::default()
    }

    /// A tape that records no backward information (inference).
    pub fn inference() -> Self {
        Tape {
            nodes: Vec::new(),
            no_grad: true,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn leaf_node(&mut self, value: Tensor, requires_grad: bool, param: Option<usize>) -> Var {
        self.nodes.push(Node {
            value,
            parents: Vec::new(),
            op: None,
            requires_grad: requires_grad && !self.no_grad,
            param,
        });
        Var(self.nodes.len() - 1)
    }

    /// A value that never needs a gradient.
    pub fn constant(&mut self, value: Tensor) -> Var {
        self.leaf_node(value, false, None)
    }

    /// A free leaf (used by gradient checks): its gradient is returned by [`Grads::get`].
    pub fn leaf(&mut self, value: Tensor) -> Var {
        self.leaf_node(value, true, None)
    }

    /// A model parameter; `trainable == false` makes it a frozen constant with no gradient.
    pub fn param(&mut self, id: usize, value: &Tensor, trainable: bool) -> Var {
        self.leaf_node(value.clone(), trainable, Some(id))
    }

    pub fn value(&self, v: Var) -> &Tensor {
        &self.nodes[v.0].value
    }

    pub fn requires_grad(&self, v: Var) -> bool {
        self.nodes[v.0].requires_grad
    }

    /// Append an op's output. The backward object is kept only when some input needs a gradient.
    pub fn push<B: Backward + 'static>(&mut self, value: Tensor, parents: &[Var], op: B) -> Var {
        let requires_grad = !self.no_grad && parents.iter().any(|p| self.nodes[p.0].requires_grad);
        self.nodes.push(Node {
            value,
            parents: parents.iter().map(|p| p.0).collect(),
            op: if requires_grad {
                Some(Box::new(op))
            } else {
                None
            },
            requires_grad,
            param: None,
        });
        Var(self.nodes.len() - 1)
    }

    /// Whether any of `vars` needs a gradient (ops use this to skip saving tensors).
    pub fn any_requires_grad(&self, vars: &[Var]) -> bool {
        vars.iter().any(|v| self.nodes[v.0].requires_grad)
    }

    /// Backpropagate from a scalar `loss` (seed gradient 1).
    pub fn backward(&mut self, loss: Var) -> Grads {
        self.backward_with(loss, Tensor::full(self.value(loss).shape(), 1.0))
    }

    /// Backpropagate from `out` with the given output gradient.
    pub fn backward_with(&mut self, out: Var, seed: Tensor) -> Grads {
        let n = self.nodes.len();
        let mut grads: Vec<Option<Tensor>> = (0..n).map(|_| None).collect();
        let mut result = Grads::default();
        if !self.nodes[out.0].requires_grad {
            return result;
        }
        grads[out.0] = Some(seed);
        for i in (0..=out.0).rev() {
            let Some(g) = grads[i].take() else { continue };
            let node = &self.nodes[i];
            if let Some(op) = &node.op {
                let needs: Vec<bool> = node
                    .parents
                    .iter()
                    .map(|&p| self.nodes[p].requires_grad)
                    .collect();
                let pg = op.backward(&g, &needs);
                debug_assert_eq!(pg.len(), node.parents.len());
                for ((&p, gp), need) in node.parents.iter().zip(pg).zip(needs) {
                    let Some(gp) = gp else { continue };
                    if !need {
                        continue;
                    }
                    debug_assert_eq!(
                        gp.shape(),
                        self.nodes[p].value.shape(),
                        "grad shape of node {p}"
                    );
                    accumulate(&mut grads[p], gp);
                }
            } else if node.requires_grad {
                match node.param {
                    Some(id) => result.params.push((id, g)),
                    None => result.leaves.push((Var(i), g)),
                }
            }
        }
        result.params.sort_by_key(|(id, _)| *id);
        result
    }
}

fn accumulate(slot: &mut Option<Tensor>, g: Tensor) {
    match slot {
        None => *slot = Some(g),
        Some(acc) => {
            let a = acc.data_mut();
            for (x, y) in a.iter_mut().zip(g.data()) {
                *x += y;
            }
        }
    }
}
