//! Gradients and scalars across data-parallel ranks: a fixed layout (sorted trainable names) so
//! every rank flattens the same way, and one reduction per step for the gradients: an all-reduce
//! (with the step's scalars appended to the same buffer), or under ZeRO-1 a reduce-scatter that
//! leaves each rank only the summed gradient of its own shard (the scalars then take a second,
//! tiny all-reduce).

use onevision_comms::Communicator;
use onevision_train::{FlatLayout, Tensor, TensorMap};

use super::{Result, RuntimeError};
use crate::training::{Freeze, ReducedGrads, Trainer};

/// Names and shapes of the trainable parameters, in a fixed order, and whether gradients are
/// reduce-scattered (ZeRO-1) or all-reduced.
#[derive(Debug, Clone)]
pub struct GradLayout {
    flat: FlatLayout,
    /// `(rank, world)` under ZeRO-1.
    zero1: Option<(usize, usize)>,
}

impl GradLayout {
    /// Every parameter of `master` that `freeze` does not freeze; gradients all-reduced.
    pub fn new(master: &TensorMap, freeze: Freeze) -> Self {
        let flat = FlatLayout::new(
            master.iter().filter(|(n, _)| !freeze.is_frozen(n)).map(|(n, t)| (n.clone(), t.shape.clone())),
        );
        GradLayout { flat, zero1: None }
    }

    /// The layout `trainer` steps on: its trainable parameters, reduce-scattered when it is a
    /// ZeRO-1 trainer.
    pub fn for_trainer(trainer: &Trainer) -> Self {
        GradLayout { flat: trainer.layout().clone(), zero1: trainer.zero1() }
    }

    /// Elements of all trainable parameters.
    pub fn len(&self) -> usize {
        self.flat.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flat.is_empty()
    }

    /// Flatten `grads` (missing names count as zero) followed by `extra`.
    pub fn flatten(&self, grads: &TensorMap, extra: &[f32]) -> Result<Vec<f32>> {
        let mut flat = Vec::with_capacity(self.flat.len() + extra.len());
        for e in self.flat.entries() {
            match grads.get(&e.name) {
                Some(g) if g.shape == e.shape => flat.extend_from_slice(&g.data),
                Some(g) => {
                    return Err(RuntimeError::Config(format!(
                        "gradient `{}` has shape {:?}, the parameter {:?}",
                        e.name, g.shape, e.shape
                    )))
                }
                None => flat.extend(std::iter::repeat_n(0.0, e.numel())),
            }
        }
        flat.extend_from_slice(extra);
        Ok(flat)
    }

    /// The inverse of [`flatten`](Self::flatten): the gradients and the trailing extras.
    pub fn unflatten(&self, flat: Vec<f32>) -> (TensorMap, Vec<f32>) {
        let mut out = TensorMap::new();
        for e in self.flat.entries() {
            out.insert(e.name.clone(), Tensor { shape: e.shape.clone(), data: flat[e.range()].to_vec() });
        }
        (out, flat[self.flat.len()..].to_vec())
    }
}

/// Sums `grads` and `extra` over all ranks; `extra` is summed in place on every rank. Unsharded
/// layouts: one all-reduce, every rank gets the full gradients. ZeRO-1: a padded reduce-scatter
/// of the flattened gradients (each rank gets the sum of its shard only) and an all-reduce of
/// `extra`.
pub fn all_reduce_grads(
    comm: &dyn Communicator,
    layout: &GradLayout,
    grads: &TensorMap,
    extra: &mut [f32],
) -> Result<ReducedGrads> {
    let Some((rank, world)) = layout.zero1 else {
        let mut flat = layout.flatten(grads, extra)?;
        comm.all_reduce_sum_f32(&mut flat)?;
        let (g, e) = layout.unflatten(flat);
        extra.copy_from_slice(&e);
        return Ok(ReducedGrads::Full(g));
    };
    if (comm.rank(), comm.world_size()) != (rank, world) {
        return Err(RuntimeError::Config(format!(
            "ZeRO-1 layout of rank {rank}/{world} used with a communicator of rank {}/{}",
            comm.rank(),
            comm.world_size()
        )));
    }
    let flat = layout.flatten(grads, &[])?;
    let mut shard = vec![0f32; layout.flat.shard_len(world)];
    comm.reduce_scatter_sum_padded_f32(&flat, &mut shard)?;
    // The padding of the last ranks is not part of any parameter.
    shard.truncate(layout.flat.shard_range(rank, world).len());
    if !extra.is_empty() {
        comm.all_reduce_sum_f32(extra)?;
    }
    Ok(ReducedGrads::Shard(shard))
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
