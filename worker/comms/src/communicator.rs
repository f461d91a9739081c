//! The [`Communicator`] trait used by data-parallel trainer ranks, and [`LocalCommunicator`] for a
//! world of one.

use crate::CommError;

/// Collective operations across the trainer ranks of one job.
///
/// Every rank must call the same collectives in the same order with the same sizes (as with NCCL
/// or MPI); a mismatch is detected where possible and reported as [`CommError::Mismatch`].
/// Implementations never block forever: a dead or hung peer yields an error within a timeout.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// In place: `buf` becomes the element-wise sum of every rank's `buf`. All ranks get
    /// bit-identical results.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), CommError>;

    /// `input.len() == output.len() * world_size`; rank `r` gets the element-wise sum over ranks
    /// of `input[r * k..(r + 1) * k]` with `k = output.len()` (ZeRO-1 gradient sharding).
    fn reduce_scatter_sum_f32(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;

    /// `output.len() == input.len() * world_size`; `output[r * k..(r + 1) * k]` is rank `r`'s
    /// `input` (ZeRO-1 parameter gathering).
    fn all_gather_f32(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;

    /// `buf` on every rank becomes `root`'s `buf`.
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<(), CommError>;

    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<(), CommError>;

    /// `buf` on every rank becomes `root`'s `buf`.
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        self.broadcast_bytes(bytemuck::cast_slice_mut(buf), root)
    }

    /// [`reduce_scatter_sum_f32`](Self::reduce_scatter_sum_f32) of a buffer of any length (ZeRO-1
    /// over a flattened parameter vector): `input` is zero-padded to `world_size * k` with
    /// `k = shard_len(input.len(), world_size)`, and `output` (length `k`) receives this rank's
    /// summed shard `[rank * k, (rank + 1) * k)`; positions past the end of `input` come back 0.
    fn reduce_scatter_sum_padded_f32(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let n = self.world_size();
        let k = shard_len(input.len(), n);
        check_padded_shard("reduce_scatter_padded", input.len(), output.len(), k)?;
        if input.len() == k * n {
            return self.reduce_scatter_sum_f32(input, output);
        }
        let mut padded = Vec::with_capacity(k * n);
        padded.extend_from_slice(input);
        padded.resize(k * n, 0.0);
        self.reduce_scatter_sum_f32(&padded, output)
    }

    /// The inverse of [`reduce_scatter_sum_padded_f32`](Self::reduce_scatter_sum_padded_f32):
    /// every rank passes its shard of `k = shard_len(output.len(), world_size)` elements and
    /// `output[r * k..]` receives rank `r`'s shard; what falls past `output.len()` (the padding of
    /// the last ranks) is dropped.
    fn all_gather_padded_f32(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let n = self.world_size();
        let k = shard_len(output.len(), n);
        check_padded_shard("all_gather_padded", output.len(), input.len(), k)?;
        if output.len() == k * n {
            return self.all_gather_f32(input, output);
        }
        let mut full = vec![0f32; k * n];
        self.all_gather_f32(input, &mut full)?;
        let len = output.len();
        output.copy_from_slice(&full[..len]);
        Ok(())
    }

    /// Element-wise mean over ranks (sum, then scaled by `1 / world_size`): gradient averaging.
    fn all_reduce_mean_f32(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce_sum_f32(buf)?;
        let n = self.world_size();
        if n > 1 {
            let inv = 1.0 / n as f32;
            buf.iter_mut().for_each(|x| *x *= inv);
        }
        Ok(())
    }
}

/// Length of a shard when `len` elements are padded to a multiple of `world_size` for
/// [`Communicator::reduce_scatter_sum_f32`] / [`Communicator::all_gather_f32`].
pub fn shard_len(len: usize, world_size: usize) -> usize {
    len.div_ceil(world_size.max(1))
}

fn check_padded_shard(op: &'static str, full: usize, shard: usize, want: usize) -> Result<(), CommError> {
    if shard != want {
        return Err(CommError::InvalidArgument {
            op,
            detail: format!("a buffer of {full} elements needs shards of {want} elements, got {shard}"),
        });
    }
    Ok(())
}

/// `Err(InvalidArgument)` unless `root` is a rank of the world (shared by every implementation).
pub fn check_root(op: &'static str, root: usize, world_size: usize) -> Result<(), CommError> {
    if root >= world_size {
        return Err(CommError::InvalidArgument {
            op,
            detail: format!("root {root} is not a rank of a world of size {world_size}"),
        });
    }
    Ok(())
}

/// `Err(InvalidArgument)` unless `long == short * world_size` (reduce-scatter input / all-gather
/// output against the shard), shared by every implementation.
pub fn check_scatter_lens(
    op: &'static str,
    long: usize,
    short: usize,
    world_size: usize,
) -> Result<(), CommError> {
    if short.checked_mul(world_size) != Some(long) {
        return Err(CommError::InvalidArgument {
            op,
            detail: format!(
                "buffer of {long} elements must be world_size ({world_size}) x shard of {short}"
            ),
        });
    }
    Ok(())
}

/// The communicator of a single-process job: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalCommunicator;

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn reduce_scatter_sum_f32(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        check_scatter_lens("reduce_scatter", input.len(), output.len(), 1)?;
        output.copy_from_slice(input);
        Ok(())
    }
    fn all_gather_f32(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        check_scatter_lens("all_gather", output.len(), input.len(), 1)?;
        output.copy_from_slice(input);
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut [u8], root: usize) -> Result<(), CommError> {
        check_root("broadcast", root, 1)
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_communicator_is_identity_and_checks_sizes() {
        let c = LocalCommunicator;
        let mut v = vec![1.5f32, -2.0];
        c.all_reduce_sum_f32(&mut v).unwrap();
        c.all_reduce_mean_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        let mut out = [0.0f32; 2];
        c.reduce_scatter_sum_f32(&v, &mut out).unwrap();
        assert_eq!(out, [1.5, -2.0]);
        let mut bad = [0.0f32; 3];
        assert!(matches!(
            c.all_gather_f32(&v, &mut bad),
            Err(CommError::InvalidArgument { .. })
        ));
        assert!(matches!(c.broadcast_bytes(&mut [1, 2], 1), Err(CommError::InvalidArgument { .. })));
        assert_eq!(shard_len(10, 4), 3);
        // Padded variants in a world of one: the shard is the whole buffer.
        let mut one = [0.0f32; 2];
        c.reduce_scatter_sum_padded_f32(&v, &mut one).unwrap();
        assert_eq!(one, [1.5, -2.0]);
        let mut back = [0.0f32; 2];
        c.all_gather_padded_f32(&one, &mut back).unwrap();
        assert_eq!(back, [1.5, -2.0]);
        assert!(matches!(
            c.reduce_scatter_sum_padded_f32(&v, &mut bad),
            Err(CommError::InvalidArgument { .. })
        ));
    }
}
