//! Deterministic shuffling, sharding by rank, batching and resumable positions.
//!
//! Everything is a pure function of (seed, epoch, rank, world size, lengths), so a run resumed from
//! a [`Position`] sees exactly the batches it would have seen.

use crate::DataError;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Where a cursor is: the epoch and the index of the next batch within it (this rank's batches).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u64,
    pub index: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardConfig {
    pub seed: u64,
    pub shuffle: bool,
    pub rank: usize,
    pub world_size: usize,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            shuffle: true,
            rank: 0,
            world_size: 1,
        }
    }
}

impl ShardConfig {
    fn validate(&self) -> Result<(), DataError> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(DataError::Config(format!(
                "rank {} must be < world_size {} (and world_size ≥ 1)",
                self.rank, self.world_size
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Batching {
    /// `batch_size` samples per batch; `drop_last` drops a final short batch.
    Fixed { batch_size: usize, drop_last: bool },
    /// Length-bucketed: within windows of `window` consecutive (shuffled) samples, sort by length
    /// and pack so that `batch_len · longest ≤ max_tokens` (the padded size). A sample longer than
    /// `max_tokens` forms a batch alone. Batch order is shuffled again so long ones are not first.
    ByTokens { max_tokens: usize, window: usize },
    /// Packing: within windows of `window` samples, first-fit-decreasing into packs whose summed
    /// length is ≤ `max_tokens` (one row of concatenated samples, no padding; the model must keep
    /// attention within each sample, see [`cu_seqlens`]). An over-long sample is packed alone.
    Packed { max_tokens: usize, window: usize },
}

/// Cumulative sequence boundaries `[0, l0, l0+l1, …]` of a pack, for varlen attention that must not
/// cross samples.
pub fn cu_seqlens(lengths: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(lengths.len() + 1);
    out.push(0);
    for l in lengths {
        out.push(out.last().copied().unwrap_or(0) + l);
    }
    out
}

fn pack(order: &[usize], lengths: &[usize], max_tokens: usize, window: usize) -> Vec<Vec<usize>> {
    let mut packs = Vec::new();
    for chunk in order.chunks(window) {
        let mut w = chunk.to_vec();
        w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
        for i in w {
            let l = lengths[i];
            match bins.iter_mut().find(|(used, _)| used + l <= max_tokens) {
                Some((used, items)) => {
                    *used += l;
                    items.push(i);
                }
                None => bins.push((l, vec![i])),
            }
        }
        packs.extend(bins.into_iter().map(|(_, items)| items));
    }
    packs
}

/// RNG for (seed, epoch, stream): one independent ChaCha8 stream per purpose.
fn rng(seed: u64, epoch: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.set_stream(stream);
    r
}

/// Fisher–Yates over ChaCha8's u64 stream. Written out (rather than `SliceRandom::shuffle`) so the
/// order depends only on ChaCha's specified output, not on a `rand` version's sampling algorithm:
/// checkpoints must resume to the same order after a dependency upgrade. Modulo bias is < n/2^64.
fn shuffle<T>(v: &mut [T], r: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        let j = (r.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

fn order_for(n: usize, epoch: u64, cfg: &ShardConfig, rank: usize) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    if cfg.shuffle {
        shuffle(&mut perm, &mut rng(cfg.seed, epoch, 0));
    }
    // Equal shares with no duplicates: the n mod world_size leftovers sit out this epoch (they
    // differ each epoch when shuffling).
    let per_rank = n / cfg.world_size;
    perm.truncate(per_rank * cfg.world_size);
    perm.into_iter()
        .skip(rank)
        .step_by(cfg.world_size)
        .collect()
}

/// This rank's sample indices for `epoch`: a seeded permutation of 0..n, cut to a multiple of the
/// world size, interleaved across ranks.
pub fn epoch_order(n: usize, epoch: u64, cfg: &ShardConfig) -> Result<Vec<usize>, DataError> {
    cfg.validate()?;
    Ok(order_for(n, epoch, cfg, cfg.rank))
}

fn bucket(order: &[usize], lengths: &[usize], max_tokens: usize, window: usize) -> Vec<Vec<usize>> {
    let mut batches = Vec::new();
    for chunk in order.chunks(window) {
        let mut w = chunk.to_vec();
        w.sort_by_key(|&i| std::cmp::Reverse(lengths[i])); // stable: ties keep shuffled order
        let mut cur: Vec<usize> = Vec::new();
        let mut longest = 0;
        for i in w {
            let l = lengths[i].max(1);
            let new_longest = longest.max(l);
            if !cur.is_empty() && (cur.len() + 1) * new_longest > max_tokens {
                batches.push(std::mem::take(&mut cur));
                longest = 0;
            }
            longest = longest.max(l);
            cur.push(i);
        }
        if !cur.is_empty() {
            batches.push(cur);
        }
    }
    batches
}

/// This rank's batches (of sample indices) for `epoch`. Every rank gets the same number of batches
/// (needed for collective ops), so with bucketing each rank computes all ranks' plans and keeps the
/// minimum count.
pub fn epoch_batches(
    n: usize,
    lengths: Option<&[usize]>,
    epoch: u64,
    cfg: &ShardConfig,
    batching: &Batching,
) -> Result<Vec<Vec<usize>>, DataError> {
    cfg.validate()?;
    match *batching {
        Batching::Fixed {
            batch_size,
            drop_last,
        } => {
            if batch_size == 0 {
                return Err(DataError::Config("batch_size must be ≥ 1".into()));
            }
            let order = order_for(n, epoch, cfg, cfg.rank);
            let mut b: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
            if drop_last && b.last().is_some_and(|x| x.len() < batch_size) {
                b.pop();
            }
            Ok(b)
        }
        Batching::ByTokens { max_tokens, window } | Batching::Packed { max_tokens, window } => {
            let lengths = lengths.ok_or_else(|| {
                DataError::Config("token batching needs per-sample lengths".into())
            })?;
            if lengths.len() != n {
                return Err(DataError::Config(format!(
                    "{} lengths for {n} samples",
                    lengths.len()
                )));
            }
            if max_tokens == 0 || window == 0 {
                return Err(DataError::Config(
                    "max_tokens and window must be ≥ 1".into(),
                ));
            }
            let mut mine = Vec::new();
            let mut min_count = usize::MAX;
            for r in 0..cfg.world_size {
                let order = order_for(n, epoch, cfg, r);
                let mut b = match batching {
                    Batching::Packed { .. } => pack(&order, lengths, max_tokens, window),
                    _ => bucket(&order, lengths, max_tokens, window),
                };
                if cfg.shuffle {
                    shuffle(&mut b, &mut rng(cfg.seed, epoch, 1 + r as u64));
                }
                min_count = min_count.min(b.len());
                if r == cfg.rank {
                    mine = b;
                }
            }
            mine.truncate(min_count);
            Ok(mine)
        }
    }
}

/// Iterates batches across epochs from a resumable [`Position`].
#[derive(Debug, Clone)]
pub struct BatchCursor {
    n: usize,
    lengths: Option<Vec<usize>>,
    cfg: ShardConfig,
    batching: Batching,
    pos: Position,
    cache: Option<(u64, Vec<Vec<usize>>)>,
}

impl BatchCursor {
    pub fn new(
        n: usize,
        lengths: Option<Vec<usize>>,
        cfg: ShardConfig,
        batching: Batching,
        start: Position,
    ) -> Result<Self, DataError> {
        // Validate once up front so next_batch only fails for an empty plan.
        epoch_batches(n, lengths.as_deref(), start.epoch, &cfg, &batching)?;
        Ok(Self {
            n,
            lengths,
            cfg,
            batching,
            pos: start,
            cache: None,
        })
    }

    /// Position of the next batch (save this in checkpoints).
    pub fn position(&self) -> Position {
        self.pos
    }

    /// The next batch of sample indices and the position it came from; rolls over epochs.
    pub fn next_batch(&mut self) -> Result<(Position, Vec<usize>), DataError> {
        for _ in 0..2 {
            if self
                .cache
                .as_ref()
                .is_none_or(|(e, _)| *e != self.pos.epoch)
            {
                let b = epoch_batches(
                    self.n,
                    self.lengths.as_deref(),
                    self.pos.epoch,
                    &self.cfg,
                    &self.batching,
                )?;
                self.cache = Some((self.pos.epoch, b));
            }
            let (_, batches) = self.cache.as_ref().expect("filled above");
            if let Some(b) = batches.get(self.pos.index as usize) {
                let at = self.pos;
                self.pos.index += 1;
                return Ok((at, b.clone()));
            }
            if batches.is_empty() {
                break;
            }
            self.pos = Position {
                epoch: self.pos.epoch + 1,
                index: 0,
            };
        }
        Err(DataError::Config(format!(
            "no batches: {} samples for world size {} with {:?}",
            self.n, self.cfg.world_size, self.batching
        )))
    }
}
