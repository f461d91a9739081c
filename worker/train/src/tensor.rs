//! Named f32 tensors: how weights, gradients and optimizer moments cross crate boundaries.

use std::collections::BTreeMap;

/// A dense row-major f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// `None` when `data.len()` is not the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Option<Self> {
        (shape.iter().product::<usize>() == data.len()).then_some(Self { shape, data })
    }
    pub fn zeros(shape: &[usize]) -> Self {
        Self {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Tensors by name, sorted (deterministic iteration for reductions and files).
pub type TensorMap = BTreeMap<String, Tensor>;
