//! NCCL collectives (all-reduce, reduce-scatter, all-gather, broadcast) on a dedicated communication
//! stream, so gradient reduction of layer L overlaps the backward of layer L-1 on the compute stream.
//! Ordering: `after_compute` makes the comm stream wait for work queued so far on the compute stream
//! (the gradients are ready); `before_compute` makes the compute stream wait for the collectives
//! (the optimizer reads reduced gradients). Both are device-side waits (events), not host syncs.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaStream;
use cudarc::nccl::{result as nc, sys};

use crate::blas::Elem;
use crate::error::{CudaError, Result};
use crate::gpu::{drv_err, Gpu};

fn nccl_err(call: &'static str) -> impl Fn(nc::NcclError) -> CudaError {
    move |e| CudaError::Nccl { call, message: format!("{e:?}") }
}

fn dtype(e: Elem) -> sys::ncclDataType_t {
    match e {
        Elem::BF16 => sys::ncclDataType_t::ncclBfloat16,
        Elem::F32 => sys::ncclDataType_t::ncclFloat32,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Avg,
}

impl ReduceOp {
    fn nccl(self) -> sys::ncclRedOp_t {
        match self {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        }
    }
}

/// Whether libnccl can be loaded.
pub fn nccl_available() -> bool {
    // SAFETY: only probes dlopen.
    unsafe { sys::is_culib_present() }
}

/// The 128-byte id rank 0 creates and the launcher distributes to every rank (the operator passes it
/// through the job's rendezvous; see worker/comms).
pub fn unique_id() -> Result<[u8; 128]> {
    if !nccl_available() {
        return Err(CudaError::Nccl { call: "dlopen", message: "libnccl.so.2 not found (pip nvidia-nccl-cu12)".into() });
    }
    let id = nc::get_uniqueid().map_err(nccl_err("ncclGetUniqueId"))?;
    let mut out = [0u8; 128];
    for (o, c) in out.iter_mut().zip(id.internal.iter()) {
        *o = *c as u8;
    }
    Ok(out)
}

/// The raw communicator, shared with [`AbortHandle`]s. `live` is false once the communicator has
/// been aborted or destroyed: the lock orders abort against the async-error polls, so neither
/// touches a freed communicator.
struct RawComm {
    comm: sys::ncclComm_t,
    live: Mutex<bool>,
}

// SAFETY: the pointer is only dereferenced by NCCL; abort/destroy/async-error queries are
// serialised by `live`.
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

/// Aborts a communicator from another thread (the watchdog), e.g. while its owner is blocked in a
/// collective whose peer died: `ncclCommAbort` makes the pending operations return.
#[derive(Clone)]
pub struct AbortHandle(Arc<RawComm>);

impl AbortHandle {
    /// Aborts once; later calls (and the owner's drop) do nothing.
    pub fn abort(&self) -> Result<()> {
        let mut live = self.0.live.lock().unwrap_or_else(|p| p.into_inner());
        if !*live {
            return Ok(());
        }
        *live = false;
        // SAFETY: the communicator is live (checked under the lock) and is never used by this
        // module again once `live` is false.
        unsafe { nc::comm_abort(self.0.comm) }.map(|_| ()).map_err(nccl_err("ncclCommAbort"))
    }

    pub fn is_aborted(&self) -> bool {
        !*self.0.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Communicator {
    gpu: Arc<Gpu>,
    comm: sys::ncclComm_t,
    raw: Arc<RawComm>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls are not concurrent;
// the &mut/&self methods here are driven by the single training thread.
unsafe impl Send for Communicator {}
unsafe impl Sync for Communicator {}

impl Communicator {
    /// Collective: every rank calls this with the same id and world size.
    pub fn new(gpu: Arc<Gpu>, id: &[u8; 128], rank: usize, world: usize) -> Result<Self> {
        if !nccl_available() {
            return Err(CudaError::Nccl { call: "dlopen", message: "libnccl.so.2 not found (pip nvidia-nccl-cu12)".into() });
        }
        if rank >= world {
            return Err(CudaError::Invalid(format!("NCCL rank {rank} >= world size {world}")));
        }
        gpu.context().bind_to_thread().map_err(drv_err("cuCtxSetCurrent"))?;
        let stream = gpu.context().new_stream().map_err(drv_err("cuStreamCreate"))?;
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(id.iter()) {
            *d = *s as _;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: comm is a valid out-pointer; the id comes from ncclGetUniqueId on rank 0.
        unsafe { nc::comm_init_rank(&mut comm, world as i32, uid, rank as i32) }.map_err(nccl_err("ncclCommInitRank"))?;
        let raw = Arc::new(RawComm { comm, live: Mutex::new(true) });
        Ok(Communicator { gpu, comm, raw, stream, rank, world })
    }

    /// A handle that can abort this communicator from another thread.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle(self.raw.clone())
    }

    /// The first asynchronous error NCCL recorded (a peer's connection broke, a remote rank
    /// failed), if any. `Err` also when the communicator was aborted.
    pub fn async_error(&self) -> Result<()> {
        let live = self.raw.live.lock().unwrap_or_else(|p| p.into_inner());
        if !*live {
            return Err(CudaError::Nccl { call: "ncclCommGetAsyncError", message: "communicator was aborted".into() });
        }
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: live communicator (checked under the lock), valid out-pointer.
        unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) }
            .result()
            .map_err(nccl_err("ncclCommGetAsyncError"))?;
        state.result().map(|_| ()).map_err(nccl_err("asynchronous NCCL error"))
    }

    /// Blocks until every collective queued on the communication stream has finished, polling
    /// NCCL's asynchronous error state meanwhile, so a peer that died turns into an error here
    /// (instead of a stream that never drains). The caller's watchdog bounds the total wait.
    pub fn wait(&self) -> Result<()> {
        let mut spins = 0u32;
        loop {
            // SAFETY: the stream is alive for self's lifetime.
            let r = unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) };
            match r {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => return Ok(()),
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(CudaError::Driver { call: "cuStreamQuery", message: format!("{e:?}") }),
            }
            self.async_error()?;
            // Small collectives finish in microseconds: spin briefly before sleeping.
            spins += 1;
            if spins < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
    }
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.world
    }

    /// Comm stream waits for everything queued on the compute stream so far.
    pub fn after_compute(&self) -> Result<()> {
        self.stream.join(self.gpu.stream()).map_err(drv_err("cuStreamWaitEvent"))
    }

    /// Compute stream waits for every collective queued so far.
    pub fn before_compute(&self) -> Result<()> {
        self.gpu.stream().join(&self.stream).map_err(drv_err("cuStreamWaitEvent"))
    }

    fn s(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    /// In place when send == recv.
    pub fn all_reduce(&self, send: u64, recv: u64, count: usize, t: Elem, op: ReduceOp) -> Result<()> {
        // SAFETY: send/recv hold `count` elements of `t` on this rank's device.
        unsafe { nc::all_reduce(send as *const c_void, recv as *mut c_void, count, dtype(t), op.nccl(), self.comm, self.s()) }
            .map(|_| ())
            .map_err(nccl_err("ncclAllReduce"))
    }

    /// send holds world * recv_count elements; rank r receives the reduced slice r. Same
    /// equal-count contract as `onevision_comms::Communicator::reduce_scatter_sum_f32` (ZeRO-1
    /// pads the flattened gradients to a multiple of the world size first).
    pub fn reduce_scatter(&self, send: u64, recv: u64, recv_count: usize, t: Elem, op: ReduceOp) -> Result<()> {
        // SAFETY: buffer sizes as documented above.
        unsafe { nc::reduce_scatter(send as *const c_void, recv as *mut c_void, recv_count, dtype(t), op.nccl(), self.comm, self.s()) }
            .map(|_| ())
            .map_err(nccl_err("ncclReduceScatter"))
    }

    /// recv holds world * send_count elements, rank-major (`Communicator::all_gather_f32`).
    pub fn all_gather(&self, send: u64, recv: u64, send_count: usize, t: Elem) -> Result<()> {
        // SAFETY: buffer sizes as documented above.
        unsafe { nc::all_gather(send as *const c_void, recv as *mut c_void, send_count, dtype(t), self.comm, self.s()) }
            .map(|_| ())
            .map_err(nccl_err("ncclAllGather"))
    }

    /// `bytes` bytes of root's buffer to everyone (untyped: `ncclUint8`).
    pub fn broadcast_bytes(&self, send: u64, recv: u64, bytes: usize, root: usize) -> Result<()> {
        // SAFETY: send/recv hold `bytes` bytes on this rank's device.
        unsafe {
            nc::broadcast(
                send as *const c_void,
                recv as *mut c_void,
                bytes,
                sys::ncclDataType_t::ncclUint8,
                root as i32,
                self.comm,
                self.s(),
            )
        }
        .map(|_| ())
        .map_err(nccl_err("ncclBroadcast"))
    }

    /// Weight sync (trainer -> rollout ranks): root's buffer to everyone.
    pub fn broadcast(&self, send: u64, recv: u64, count: usize, t: Elem, root: usize) -> Result<()> {
        // SAFETY: send/recv hold `count` elements of `t`.
        unsafe { nc::broadcast(send as *const c_void, recv as *mut c_void, count, dtype(t), root as i32, self.comm, self.s()) }
            .map(|_| ())
            .map_err(nccl_err("ncclBroadcast"))
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        let mut live = self.raw.live.lock().unwrap_or_else(|p| p.into_inner());
        if !*live {
            return; // aborted: NCCL already freed it
        }
        *live = false;
        let _ = self.stream.synchronize();
        // SAFETY: created in new(), destroyed once (live was true) after its stream drained.
        let _ = unsafe { nc::comm_destroy(self.comm) };
    }
}
