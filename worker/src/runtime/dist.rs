//! Gradients and scalars across data-parallel ranks: a fixed layout (sorted trainable names) so
//! every rank flattens the same way, one all-reduce per step for the gradients plus the step's
//! scalars appended to the same buffer.

use onevision_comms::Communicator;
use onevision_train::{Tensor, TensorMap};

use super::{Result, RuntimeError};
use crate::training::Freeze;

/// Names and shapes of the trainable parameters, in a fixed order.
#[derive(Debug, Clone)]
pub struct GradLayout {
    entries: Vec<(String, Vec<usize>)>,
    total: usize,
}

impl GradLayout {
    /// Every parameter of `master` that `freeze` does not freeze.
    pub fn new(master: &TensorMap, freeze: Freeze) -> Self {
        let entries: Vec<(String, Vec<usize>)> = master
            .iter()
            .filter(|(n, _)| !freeze.is_frozen(n))
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect();
        let total = entries.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        GradLayout { entries, total }
    }

    /// Elements of all trainable parameters.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Flatten `grads` (missing names count as zero) followed by `extra`.
    pub fn flatten(&self, grads: &TensorMap, extra: &[f32]) -> Result<Vec<f32>> {
        let mut flat = Vec::with_capacity(self.total + extra.len());
        for (name, shape) in &self.entries {
            match grads.get(name) {
                Some(g) if &g.shape == shape => flat.extend_from_slice(&g.data),
                Some(g) => {
                    return Err(RuntimeError::Config(format!(
                        "gradient `{name}` has shape {:?}, the parameter {shape:?}",
                        g.shape
                    )))
                }
                None => flat.extend(std::iter::repeat_n(0.0, shape.iter().product())),
            }
        }
        flat.extend_from_slice(extra);
        Ok(flat)
    }

    /// The inverse of [`flatten`](Self::flatten): the gradients and the trailing extras.
    pub fn unflatten(&self, flat: Vec<f32>) -> (TensorMap, Vec<f32>) {
        let mut out = TensorMap::new();
        let mut at = 0;
        for (name, shape) in &self.entries {
            let n: usize = shape.iter().product();
            out.insert(name.clone(), Tensor { shape: shape.clone(), data: flat[at..at + n].to_vec() });
            at += n;
        }
        (out, flat[at..].to_vec())
    }
}

/// Sums `grads` and `extra` over all ranks in one collective; every rank gets the same result.
pub fn all_reduce_grads(
    comm: &dyn Communicator,
    layout: &GradLayout,
    grads: &TensorMap,
    extra: &mut [f32],
) -> Result<TensorMap> {
    let mut flat = layout.flatten(grads, extra)?;
    comm.all_reduce_sum_f32(&mut flat)?;
    let (g, e) = layout.unflatten(flat);
    extra.copy_from_slice(&e);
    Ok(g)
}

/// Element-wise sum of a few scalars over all ranks (counts, statistics, flags).
pub fn all_reduce_scalars(comm: &dyn Communicator, v: &mut [f64]) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let mut buf: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    comm.all_reduce_sum_f32(&mut buf)?;
    for (d, s) in v.iter_mut().zip(buf) {
        *d = s as f64;
    }
    Ok(())
}

/// Adds `src` into `acc` (same names and shapes; new names are inserted).
pub fn add_into(acc: &mut TensorMap, src: TensorMap) {
    for (name, t) in src {
        match acc.get_mut(&name) {
            Some(a) if a.data.len() == t.data.len() => {
                a.data.iter_mut().zip(&t.data).for_each(|(x, y)| *x += y);
            }
            _ => {
                acc.insert(name, t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_roundtrip_fills_missing_and_skips_frozen() {
        let mut m = TensorMap::new();
        m.insert("a".into(), Tensor { shape: vec![2], data: vec![1.0, 2.0] });
        m.insert("visual.blocks.0.w".into(), Tensor { shape: vec![1], data: vec![9.0] });
        m.insert("b".into(), Tensor { shape: vec![1, 2], data: vec![3.0, 4.0] });
        let layout = GradLayout::new(&m, Freeze { vision_tower: true, merger: false });
        assert_eq!(layout.len(), 4);
        let mut g = TensorMap::new();
        g.insert("b".into(), Tensor { shape: vec![1, 2], data: vec![5.0, 6.0] });
        let flat = layout.flatten(&g, &[7.0]).unwrap();
        assert_eq!(flat, vec![0.0, 0.0, 5.0, 6.0, 7.0]);
        let (back, extra) = layout.unflatten(flat);
        assert_eq!(back["b"].data, vec![5.0, 6.0]);
        assert_eq!(back["a"].data, vec![0.0, 0.0]);
        assert_eq!(extra, vec![7.0]);
        g.insert("a".into(), Tensor { shape: vec![3], data: vec![0.0; 3] });
        assert!(layout.flatten(&g, &[]).is_err());
    }
}
