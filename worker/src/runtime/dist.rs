//! Gradients and scalars across data-parallel ranks: a fixed layout (sorted trainable names) so
//! every rank flattens the same way, and one reduction per step for the gradients: an all-reduce
//! (with the step's scalars appended to the same buffer), or under ZeRO-1 a reduce-scatter that
//! leaves each rank only the summed gradient of its own shard (the scalars then take a second,
//! tiny all-reduce).
//!
//! Also which [`Communicator`] a rank uses ([`select_comm`]): NCCL on GPU jobs, the TCP ring
//! otherwise, `ONEVISION_COMM=ring|nccl` to force one; and connecting the NCCL one
//! ([`connect_nccl`]).

use std::sync::Arc;

use onevision_comms::coordinator::CoordinatorClient;
use onevision_comms::{rendezvous_nccl, Communicator, RendezvousOptions};
use onevision_cuda::gpu::Gpu;
use onevision_cuda::nccl_comm::{NcclCommunicator, NcclOptions};
use onevision_proto::v1;
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

/// `ring` or `nccl`: forces the communicator (tests, debugging); unset = chosen from the job.
pub const COMM_ENV: &str = "ONEVISION_COMM";
/// The CUDA device of this rank on its node (a per-GPU launcher sets it); default 0.
pub const LOCAL_RANK_ENV: &str = "LOCAL_RANK";

/// The value of [`COMM_ENV`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommOverride {
    Ring,
    Nccl,
}

impl CommOverride {
    /// `None` or blank: no override. Anything but `ring`/`nccl` (any case) is a permanent error.
    pub fn parse(value: Option<&str>) -> Result<Option<Self>> {
        match value.map(|v| v.trim().to_ascii_lowercase()).filter(|v| !v.is_empty()).as_deref() {
            None => Ok(None),
            Some("ring") => Ok(Some(CommOverride::Ring)),
            Some("nccl") => Ok(Some(CommOverride::Nccl)),
            Some(v) => Err(RuntimeError::Config(format!("{COMM_ENV}={v:?} must be `ring` or `nccl` (or unset)"))),
        }
    }
}

/// Which communicator a rank connects.
#[derive(Debug, PartialEq)]
pub enum CommSelection<G> {
    /// The TCP ring ([`onevision_comms::LocalCommunicator`] for a world of one). `fallback` says
    /// why a GPU job is not using NCCL (logged as a warning).
    Ring { fallback: Option<String> },
    /// NCCL on the device the probe opened.
    Nccl(G),
}

/// Chooses the communicator. NCCL when forced by `ONEVISION_COMM=nccl` (an unusable CUDA/NCCL
/// is then a permanent error), or when the job asks for GPUs (`trainer.gpusPerNode > 0`), has more
/// than one rank and `probe` (opening this rank's CUDA device and finding libnccl) succeeds; the
/// ring otherwise. A GPU job whose probe fails falls back to the ring, because the local runner
/// runs GPU manifests on CPU-only machines. `probe` runs only when NCCL is a candidate.
pub fn select_comm<G>(
    forced: Option<CommOverride>,
    gpus_per_node: i32,
    world_size: u32,
    probe: impl FnOnce() -> std::result::Result<G, String>,
) -> Result<CommSelection<G>> {
    match forced {
        Some(CommOverride::Ring) => Ok(CommSelection::Ring { fallback: None }),
        Some(CommOverride::Nccl) => probe().map(CommSelection::Nccl).map_err(|why| {
            RuntimeError::Config(format!(
                "{COMM_ENV}=nccl, but NCCL cannot run on this machine: {why}. Run on a node with an \
                 NVIDIA GPU, driver and libnccl, or set {COMM_ENV}=ring (or unset it) to use the CPU ring"
            ))
        }),
        None if gpus_per_node <= 0 || world_size <= 1 => Ok(CommSelection::Ring { fallback: None }),
        None => Ok(match probe() {
            Ok(g) => CommSelection::Nccl(g),
            Err(why) => CommSelection::Ring {
                fallback: Some(format!(
                    "trainer.gpusPerNode={gpus_per_node} but NCCL is unavailable ({why}); using the CPU ring"
                )),
            },
        }),
    }
}

/// The CUDA ordinal of this rank: `$LOCAL_RANK`, default 0.
pub fn local_rank(value: Option<&str>) -> Result<usize> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(0),
        Some(v) => v
            .parse()
            .map_err(|_| RuntimeError::Config(format!("{LOCAL_RANK_ENV}={v:?} is not a device ordinal"))),
    }
}

/// The real probe: open CUDA device `ordinal`, then check that libnccl loads.
pub fn probe_nccl(ordinal: usize) -> std::result::Result<Arc<Gpu>, String> {
    let gpu = Gpu::new(ordinal).map_err(|e| format!("CUDA device {ordinal}: {e}"))?;
    if !onevision_cuda::nccl::nccl_available() {
        return Err("libnccl.so.2 not found (install NCCL, e.g. pip nvidia-nccl-cu12, on the loader path)".into());
    }
    Ok(gpu)
}

/// NCCL timeouts from `$ONEVISION_COMM_TIMEOUT_SECS` (a bad value is a permanent error).
pub fn nccl_options(value: Option<&str>) -> Result<NcclOptions> {
    NcclOptions::from_timeout_value(value).map_err(|e| RuntimeError::Config(e.to_string()))
}

/// The NCCL half of the rendezvous: rank 0 creates the unique id and publishes it in its Join;
/// every rank gets it back and initialises its communicator on `gpu`. `before_init` runs between
/// the two (the trainer starts its heartbeat there: init waits for every rank).
pub fn connect_nccl(
    rt: &tokio::runtime::Runtime,
    client: &CoordinatorClient,
    opts: RendezvousOptions,
    gpu: Arc<Gpu>,
    nccl: NcclOptions,
    before_init: impl FnOnce(&v1::JoinResponse),
) -> Result<(v1::JoinResponse, Box<dyn Communicator>)> {
    let (rank, world) = (opts.rank as usize, opts.world_size as usize);
    let id = if rank == 0 {
        Some(onevision_cuda::nccl::unique_id().map_err(|e| {
            onevision_comms::CommError::Device { backend: "NCCL", op: "ncclGetUniqueId", rank, detail: e.to_string() }
        })?)
    } else {
        None
    };
    let (join, id) = rt.block_on(rendezvous_nccl(client, opts, id))?;
    before_init(&join);
    let comm = NcclCommunicator::new(gpu, id, rank, world, nccl)?;
    Ok((join, Box::new(comm)))
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
    use std::cell::Cell;

    #[test]
    fn comm_override_parses_and_rejects() {
        assert_eq!(CommOverride::parse(None).unwrap(), None);
        assert_eq!(CommOverride::parse(Some(" ")).unwrap(), None);
        assert_eq!(CommOverride::parse(Some("ring")).unwrap(), Some(CommOverride::Ring));
        assert_eq!(CommOverride::parse(Some(" NCCL ")).unwrap(), Some(CommOverride::Nccl));
        let e = CommOverride::parse(Some("gloo")).unwrap_err();
        assert!(e.is_permanent() && e.to_string().contains("ONEVISION_COMM"), "{e}");
        assert_eq!(local_rank(None).unwrap(), 0);
        assert_eq!(local_rank(Some("3")).unwrap(), 3);
        assert!(local_rank(Some("-1")).unwrap_err().is_permanent());
        assert!(nccl_options(Some("0")).unwrap_err().is_permanent());
    }

    /// (override, gpusPerNode, world, probe works) -> Some(true) = NCCL, Some(false) = ring,
    /// None = permanent error; plus whether the probe may run and whether a fallback is reported.
    #[test]
    fn comm_selection_table() {
        use CommOverride::*;
        type Row = (Option<CommOverride>, i32, u32, bool, Option<bool>, bool, bool);
        #[rustfmt::skip]
        let table: &[Row] = &[
            // forced,   gpus, world, probe ok, -> nccl?,      probe runs, fallback
            (None,        0,    4,    true,     Some(false),   false,      false),
            (None,        0,    1,    true,     Some(false),   false,      false),
            (None,        8,    1,    true,     Some(false),   false,      false), // nothing to reduce
            (None,        1,    2,    true,     Some(true),    true,       false),
            (None,        8,   16,    true,     Some(true),    true,       false),
            (None,        1,    2,    false,    Some(false),   true,       true),  // local runner on CPU
            (None,       -1,    2,    true,     Some(false),   false,      false),
            (Some(Ring),  8,   16,    true,     Some(false),   false,      false),
            (Some(Nccl),  0,    1,    true,     Some(true),    true,       false),
            (Some(Nccl),  0,    2,    true,     Some(true),    true,       false),
            (Some(Nccl),  8,    2,    false,    None,          true,       false),
            (Some(Nccl),  0,    1,    false,    None,          true,       false),
        ];
        for (i, &(forced, gpus, world, ok, want, want_probe, want_fallback)) in table.iter().enumerate() {
            let probed = Cell::new(false);
            let got = select_comm(forced, gpus, world, || {
                probed.set(true);
                if ok { Ok(7u8) } else { Err("no CUDA driver".to_string()) }
            });
            assert_eq!(probed.get(), want_probe, "row {i}: probe ran");
            match (got, want) {
                (Ok(CommSelection::Nccl(g)), Some(true)) => assert_eq!(g, 7, "row {i}"),
                (Ok(CommSelection::Ring { fallback }), Some(false)) => {
                    assert_eq!(fallback.is_some(), want_fallback, "row {i}: {fallback:?}");
                    if let Some(f) = fallback {
                        assert!(f.contains("no CUDA driver") && f.contains("gpusPerNode"), "row {i}: {f}");
                    }
                }
                (Err(e), None) => {
                    assert!(e.is_permanent(), "row {i}: {e}");
                    let m = e.to_string();
                    assert!(m.contains("ONEVISION_COMM=nccl") && m.contains("no CUDA driver"), "row {i}: {m}");
                }
                (got, want) => panic!("row {i}: got {got:?}, want {want:?}"),
            }
        }
    }

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
