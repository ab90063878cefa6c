//! Dense, row-major tensors on the CPU with f32 or bf16 storage.
//!
//! Storage is reference counted, so cloning a tensor (for example to save it for backward) costs
//! no copy; writing through [`Tensor::data_mut`] copies only when the storage is shared.
//! Compute is f32: bf16 is a storage format (checkpoints, memory-mapped weights) converted with
//! [`Tensor::to_dtype`].

use half::bf16;
use rand::Rng;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Storage {
    F32(Arc<Vec<f32>>),
    BF16(Arc<Vec<bf16>>),
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Self {
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "tensor data length does not match shape {shape:?}"
        );
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::F32(Arc::new(data)),
        }
    }

    pub fn from_bf16(data: Vec<bf16>, shape: &[usize]) -> Self {
        assert_eq!(data.len(), shape.iter().product::<usize>());
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::BF16(Arc::new(data)),
        }
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Self::full(shape, 0.0)
    }

    pub fn full(shape: &[usize], v: f32) -> Self {
        Self::from_vec(vec![v; shape.iter().product()], shape)
    }

    pub fn scalar(v: f32) -> Self {
        Self::from_vec(vec![v], &[1])
    }

    /// Normal(0, std) entries drawn with Box-Muller from `rng`.
    pub fn randn(shape: &[usize], std: f32, rng: &mut impl Rng) -> Self {
        let n: usize = shape.iter().product();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let u1: f64 = rng.random::<f64>().max(1e-300);
            let u2: f64 = rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            v.push((r * t.cos()) as f32 * std);
            if v.len() < n {
                v.push((r * t.sin()) as f32 * std);
            }
        }
        Self::from_vec(v, shape)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        match self.storage {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
        }
    }

    /// Size of the last dimension (the row length of a row-major matrix view).
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    /// Number of rows when the tensor is viewed as `[numel / cols, cols]`.
    pub fn rows(&self) -> usize {
        let c = self.cols();
        if c == 0 {
            0
        } else {
            self.numel() / c
        }
    }

    /// The f32 values. Compute tensors are always f32; a bf16 tensor must be converted first.
    pub fn data(&self) -> &[f32] {
        match &self.storage {
            Storage::F32(v) => v,
            Storage::BF16(_) => panic!("f32 view of a bf16 tensor: convert with to_dtype first"),
        }
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        match &mut self.storage {
            Storage::F32(v) => Arc::make_mut(v).as_mut_slice(),
            Storage::BF16(_) => panic!("f32 view of a bf16 tensor: convert with to_dtype first"),
        }
    }

    pub fn bf16_data(&self) -> Option<&[bf16]> {
        match &self.storage {
            Storage::BF16(v) => Some(v),
            Storage::F32(_) => None,
        }
    }

    pub fn into_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::F32(v) => Arc::try_unwrap(v).unwrap_or_else(|a| (*a).clone()),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        match (&self.storage, dtype) {
            (Storage::F32(_), DType::F32) | (Storage::BF16(_), DType::BF16) => self.clone(),
            (Storage::F32(v), DType::BF16) => {
                Tensor::from_bf16(v.iter().map(|&x| bf16::from_f32(x)).collect(), &self.shape)
            }
            (Storage::BF16(v), DType::F32) => {
                Tensor::from_vec(v.iter().map(|x| x.to_f32()).collect(), &self.shape)
            }
        }
    }

    /// The same values rounded to bf16 precision, kept in f32 storage.
    pub fn round_bf16(&self) -> Tensor {
        self.to_dtype(DType::BF16).to_dtype(DType::F32)
    }

    /// A view with another shape of the same element count (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Tensor {
        assert_eq!(
            self.numel(),
            shape.iter().product::<usize>(),
            "reshape {:?} -> {shape:?}",
            self.shape
        );
        Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
        }
    }

    /// Row `i` of the `[rows, cols]` view.
    pub fn row(&self, i: usize) -> &[f32] {
        let c = self.cols();
        &self.data()[i * c..(i + 1) * c]
    }

    /// Copy rows `[start, start+n)` of the `[rows, cols]` view into a new `[n, cols]` tensor.
    pub fn slice_rows(&self, start: usize, n: usize) -> Tensor {
        let c = self.cols();
        Tensor::from_vec(self.data()[start * c..(start + n) * c].to_vec(), &[n, c])
    }

    /// Write rows `[start, start+n)` of the `[rows, cols]` view into `out` (`n * cols` values) as
    /// f32, converting bf16 storage: lets ops read bf16 weights a tile at a time.
    pub fn rows_to_f32(&self, start: usize, n: usize, out: &mut [f32]) {
        let c = self.cols();
        assert_eq!(
            out.len(),
            n * c,
            "rows_to_f32: output holds {} values for {n} rows of {c}",
            out.len()
        );
        match &self.storage {
            Storage::F32(v) => out.copy_from_slice(&v[start * c..(start + n) * c]),
            Storage::BF16(v) => {
                for (o, x) in out.iter_mut().zip(&v[start * c..(start + n) * c]) {
                    *o = x.to_f32();
                }
            }
        }
    }

    /// Stack `[r_i, c]` tensors along the first dimension.
    pub fn cat_rows(parts: &[&Tensor]) -> Tensor {
        let c = parts[0].cols();
        let mut v = Vec::new();
        let mut rows = 0;
        for p in parts {
            assert_eq!(p.cols(), c);
            v.extend_from_slice(p.data());
            rows += p.rows();
        }
        Tensor::from_vec(v, &[rows, c])
    }

    pub fn sum(&self) -> f64 {
        self.data().iter().map(|&x| x as f64).sum()
    }

    pub fn sq_norm(&self) -> f64 {
        self.data().iter().map(|&x| (x as f64) * (x as f64)).sum()
    }

    pub fn max_abs_diff(&self, other: &Tensor) -> f32 {
        assert_eq!(self.shape, other.shape);
        self.data()
            .iter()
            .zip(other.data())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    /// Storage identity: true when both tensors share one buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        match (&self.storage, &other.storage) {
            (Storage::F32(a), Storage::F32(b)) => Arc::ptr_eq(a, b),
            (Storage::BF16(a), Storage::BF16(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}
