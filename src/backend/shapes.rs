//! Shapes and constants that kernels and the layers above them share: they live at the bottom,
//! so that no backend module depends on the model or the ops.

/// Target id that contributes no loss (padding).
pub const IGNORE: u32 = u32::MAX;

/// The shape of one attention call: `b` sequences of `tq` queries against `tk` keys (stored with
/// a stride of `tk_stride` positions per sequence), `nh` query heads sharing `nkv` key/value
/// heads (GQA), head dimension `hd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub b: usize,
    pub tq: usize,
    pub tk: usize,
    /// Positions allocated per sequence in k/v (>= tk).
    pub tk_stride: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
}

impl AttnShape {
    /// Training shape: queries and keys of the same `t` positions.
    pub fn causal(b: usize, t: usize, nh: usize, nkv: usize, hd: usize) -> Self {
        AttnShape {
            b,
            tq: t,
            tk: t,
            tk_stride: t,
            nh,
            nkv,
            hd,
        }
    }
    /// `t` new tokens per sequence after `offset` cached ones, against a KV cache of `capacity`
    /// slots per sequence (the new tokens' K/V already written at `offset..offset + t`).
    pub fn cached(
        b: usize,
        t: usize,
        offset: usize,
        capacity: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
    ) -> Self {
        AttnShape {
            b,
            tq: t,
            tk: offset + t,
            tk_stride: capacity,
            nh,
            nkv,
            hd,
        }
    }
    pub fn q_width(&self) -> usize {
        self.nh * self.hd
    }
    pub fn kv_width(&self) -> usize {
        self.nkv * self.hd
    }
    pub fn group(&self) -> usize {
        self.nh / self.nkv
    }
    pub fn check(&self, q: usize, k: usize, v: usize) {
        assert!(
            self.nkv > 0 && self.nh.is_multiple_of(self.nkv),
            "attention: kv heads must divide heads"
        );
        assert!(
            self.tq <= self.tk && self.tk <= self.tk_stride,
            "attention: bad lengths {self:?}"
        );
        assert_eq!(q, self.b * self.tq * self.q_width(), "attention: q size");
        assert_eq!(
            k,
            self.b * self.tk_stride * self.kv_width(),
            "attention: k size"
        );
        assert_eq!(v, k, "attention: v size");
    }
}
