//! [`NcclCommunicator`]: the trainer's [`onevision_comms::Communicator`] trait on NCCL, one GPU per
//! rank.
//!
//! **Host buffers, first step.** The CPU model keeps parameters and gradients on the host, so each
//! collective copies its host buffer to the device, runs NCCL there and copies the result back. The
//! device-resident path (gradients reduced where the CUDA backend computed them, overlapping the
//! backward pass: [`crate::nccl::Communicator`] with `after_compute`/`before_compute`) comes with the
//! CUDA trainer; this type is what lets GPU nodes use NCCL links (NVLink, InfiniBand) today.
//!
//! **Watchdog.** Every NCCL call runs on one dedicated thread (which owns the CUDA context binding
//! and the communicator); the caller waits for its answer at most the configured timeout. Past it,
//! the communicator is aborted (`ncclCommAbort`, which makes NCCL's pending operations return), this
//! communicator refuses further work, and the caller gets [`CommError::CollectiveTimeout`] naming
//! the collective, the rank and the timeout, so a dead peer ends the gang (the operator restarts it)
//! instead of hanging it. While waiting, the thread also polls NCCL's asynchronous error state, so a
//! peer whose connection breaks usually fails the collective long before the timeout.
//!
//! Unlike the TCP ring, NCCL cannot detect ranks calling different collectives or sizes; such a bug
//! shows up as a timeout (or wrong sums), never as [`CommError::Mismatch`].

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use onevision_comms::{check_root, check_scatter_lens, CommError, Communicator};

use crate::blas::Elem;
use crate::error::CudaError;
use crate::gpu::Gpu;
use crate::nccl::{self, AbortHandle, ReduceOp};

/// Seconds a collective may take before the communicator is aborted (`ONEVISION_COMM_TIMEOUT_SECS`).
pub const TIMEOUT_ENV: &str = "ONEVISION_COMM_TIMEOUT_SECS";
/// Default collective timeout: the TCP ring's default op timeout, long enough for uneven GRPO steps
/// (rank 0 waiting on rollout workers while the others wait in the all-reduce).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

const BACKEND: &str = "NCCL";

/// Timeouts of an [`NcclCommunicator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NcclOptions {
    /// Bound on each collective (copies included).
    pub timeout: Duration,
    /// Bound on `ncclCommInitRank`, which waits for every rank to initialise.
    pub init_timeout: Duration,
}

impl Default for NcclOptions {
    fn default() -> Self {
        NcclOptions { timeout: DEFAULT_TIMEOUT, init_timeout: DEFAULT_TIMEOUT }
    }
}

impl NcclOptions {
    /// Both timeouts from the value of [`TIMEOUT_ENV`] (`None` or blank: [`DEFAULT_TIMEOUT`]).
    pub fn from_timeout_value(value: Option<&str>) -> Result<Self, CommError> {
        let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(NcclOptions::default());
        };
        match v.parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs > 0.0 => {
                let t = Duration::from_secs_f64(secs);
                Ok(NcclOptions { timeout: t, init_timeout: t })
            }
            _ => Err(CommError::Config(format!("{TIMEOUT_ENV}={v:?} must be a positive number of seconds"))),
        }
    }
}

/// Element counts one host-path collective moves through the device, after the same argument
/// checks the TCP ring makes (so both implementations accept and reject the same calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPlan {
    /// Elements uploaded from the input buffer.
    pub upload: usize,
    /// Elements the device result buffer holds (and that are downloaded).
    pub download: usize,
    /// The `count` NCCL is called with (per-rank count for reduce-scatter / all-gather).
    pub count: usize,
}

impl HostPlan {
    pub fn all_reduce(len: usize) -> Self {
        HostPlan { upload: len, download: len, count: len }
    }

    pub fn reduce_scatter(input: usize, output: usize, world: usize) -> Result<Self, CommError> {
        check_scatter_lens("reduce_scatter", input, output, world)?;
        Ok(HostPlan { upload: input, download: output, count: output })
    }

    pub fn all_gather(input: usize, output: usize, world: usize) -> Result<Self, CommError> {
        check_scatter_lens("all_gather", output, input, world)?;
        Ok(HostPlan { upload: input, download: output, count: input })
    }

    /// True when there is nothing to move: every rank skips the NCCL call (same sizes everywhere).
    pub fn is_empty(&self) -> bool {
        self.upload == 0 && self.download == 0
    }
}

/// Output of a job on the NCCL thread.
enum Payload {
    F32(Vec<f32>),
    Bytes(Vec<u8>),
    Done,
}

/// What the NCCL thread owns.
struct Lane {
    gpu: Arc<Gpu>,
    comm: nccl::Communicator,
}

type Job = Box<dyn FnOnce(&Lane) -> Result<Payload, CudaError> + Send>;

struct Request {
    job: Job,
    reply: mpsc::Sender<Result<Payload, CudaError>>,
}

/// [`Communicator`] over NCCL with host buffers and a watchdog (see the module docs).
pub struct NcclCommunicator {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// The lock also serialises collectives (NCCL needs one order on every rank).
    requests: Mutex<mpsc::Sender<Request>>,
    abort: AbortHandle,
    poisoned: Mutex<Option<String>>,
}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

fn device_err(op: &'static str, rank: usize, e: impl std::fmt::Display) -> CommError {
    CommError::Device { backend: BACKEND, op, rank, detail: e.to_string() }
}

impl NcclCommunicator {
    /// Collective: every rank calls this with the same `unique_id` (rank 0's `ncclGetUniqueId`,
    /// distributed by the coordinator) and world size, each on its own GPU.
    pub fn new(
        gpu: Arc<Gpu>,
        unique_id: [u8; 128],
        rank: usize,
        world: usize,
        opts: NcclOptions,
    ) -> Result<Self, CommError> {
        if rank >= world {
            return Err(CommError::Config(format!("NCCL rank {rank} is not below the world size {world}")));
        }
        if opts.timeout.is_zero() || opts.init_timeout.is_zero() {
            return Err(CommError::Config("NCCL timeouts must be non-zero".into()));
        }
        if !nccl::nccl_available() {
            return Err(CommError::Config(
                "libnccl.so.2 not found: install NCCL (e.g. pip nvidia-nccl-cu12, on the loader path) or use \
                 ONEVISION_COMM=ring"
                    .into(),
            ));
        }
        let (tx, rx) = mpsc::channel::<Request>();
        let (init_tx, init_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("nccl-rank{rank}"))
            .spawn(move || {
                let comm = match nccl::Communicator::new(gpu.clone(), &unique_id, rank, world) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = init_tx.send(Err(e));
                        return;
                    }
                };
                if init_tx.send(Ok(comm.abort_handle())).is_err() {
                    return; // the caller gave up (init timeout)
                }
                let lane = Lane { gpu, comm };
                // Runs until the communicator is dropped (its sender closes).
                while let Ok(req) = rx.recv() {
                    let _ = req.reply.send((req.job)(&lane));
                }
            })
            .map_err(|e| device_err("thread spawn", rank, e))?;
        let abort = match init_rx.recv_timeout(opts.init_timeout) {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return Err(device_err("ncclCommInitRank", rank, e)),
            // A blocking init cannot be aborted (no handle yet); the thread is left behind and goes
            // with the process, which exits on this error.
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(CommError::CollectiveTimeout {
                    backend: BACKEND,
                    op: "ncclCommInitRank",
                    rank,
                    timeout: opts.init_timeout,
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(device_err("ncclCommInitRank", rank, "the NCCL thread exited during init"))
            }
        };
        tracing::info!(rank, world, timeout_s = opts.timeout.as_secs_f64(), "NCCL communicator ready");
        Ok(NcclCommunicator {
            rank,
            world,
            timeout: opts.timeout,
            requests: Mutex::new(tx),
            abort,
            poisoned: Mutex::new(None),
        })
    }

    /// The collective timeout in force.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn poison(&self, why: &CommError) {
        let mut p = self.poisoned.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_none() {
            *p = Some(why.to_string());
        }
    }

    /// Aborts the communicator from a helper thread, waiting a little for it: an abort that itself
    /// hangs must not turn the watchdog's error into a hang.
    fn abort_now(&self) {
        let h = self.abort.clone();
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new().name("nccl-abort".into()).spawn(move || {
            let _ = tx.send(h.abort());
        });
        if spawned.is_ok() {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Err(e)) => tracing::warn!(error = %e, "ncclCommAbort failed"),
                Err(_) => tracing::warn!("ncclCommAbort did not return within 10 s; giving up on it"),
                Ok(Ok(())) => {}
            }
        }
    }

    /// Runs `job` on the NCCL thread under the watchdog.
    fn run(&self, op: &'static str, job: Job) -> Result<Payload, CommError> {
        if let Some(p) = self.poisoned.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(CommError::Poisoned(p));
        }
        let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let (reply, answer) = mpsc::channel();
        if requests.send(Request { job, reply }).is_err() {
            let e = device_err(op, self.rank, "the NCCL thread is gone");
            self.poison(&e);
            return Err(e);
        }
        let err = match answer.recv_timeout(self.timeout) {
            Ok(Ok(p)) => return Ok(p),
            Ok(Err(e)) => device_err(op, self.rank, e),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                CommError::CollectiveTimeout { backend: BACKEND, op, rank: self.rank, timeout: self.timeout }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => device_err(op, self.rank, "the NCCL thread died"),
        };
        // Any failure leaves the ranks out of step: abort so peers blocked in this collective fail too.
        self.poison(&err);
        self.abort_now();
        Err(err)
    }

    /// Upload `input`, run `collective(comm, device_in, device_out)`, wait, download `download`
    /// f32 values of the result (in place, one device buffer, when the sizes are equal).
    fn host_f32(
        &self,
        op: &'static str,
        input: Vec<f32>,
        download: usize,
        collective: impl FnOnce(&nccl::Communicator, u64, u64) -> crate::Result<()> + Send + 'static,
    ) -> Result<Vec<f32>, CommError> {
        let job: Job = Box::new(move |lane: &Lane| {
            let dev_in = lane.gpu.upload(&input)?;
            let dev_out = if download == input.len() { None } else { Some(lane.gpu.alloc(download * 4)?) };
            let out_ptr = dev_out.as_ref().map_or(dev_in.ptr(), |m| m.ptr());
            // The upload synchronised the compute stream, so the comm stream sees the data.
            collective(&lane.comm, dev_in.ptr(), out_ptr)?;
            lane.comm.wait()?;
            Ok(Payload::F32(lane.gpu.download::<f32>(out_ptr, download)?))
        });
        match self.run(op, job)? {
            Payload::F32(v) if v.len() == download => Ok(v),
            _ => Err(device_err(op, self.rank, "the NCCL thread answered with the wrong payload")),
        }
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let plan = HostPlan::all_reduce(buf.len());
        if plan.is_empty() {
            return Ok(());
        }
        let out = self.host_f32("all_reduce", buf.to_vec(), plan.download, move |c, i, o| {
            c.all_reduce(i, o, plan.count, Elem::F32, ReduceOp::Sum)
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn reduce_scatter_sum_f32(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let plan = HostPlan::reduce_scatter(input.len(), output.len(), self.world)?;
        if plan.is_empty() {
            return Ok(());
        }
        let out = self.host_f32("reduce_scatter", input.to_vec(), plan.download, move |c, i, o| {
            c.reduce_scatter(i, o, plan.count, Elem::F32, ReduceOp::Sum)
        })?;
        output.copy_from_slice(&out);
        Ok(())
    }

    fn all_gather_f32(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let plan = HostPlan::all_gather(input.len(), output.len(), self.world)?;
        if plan.is_empty() {
            return Ok(());
        }
        let out = self.host_f32("all_gather", input.to_vec(), plan.download, move |c, i, o| {
            c.all_gather(i, o, plan.count, Elem::F32)
        })?;
        output.copy_from_slice(&out);
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        check_root("broadcast", root, self.world)?;
        if buf.is_empty() {
            return Ok(());
        }
        let host = buf.to_vec();
        let job: Job = Box::new(move |lane: &Lane| {
            let dev = lane.gpu.upload(&host)?;
            lane.comm.broadcast_bytes(dev.ptr(), dev.ptr(), host.len(), root)?;
            lane.comm.wait()?;
            Ok(Payload::Bytes(lane.gpu.download::<u8>(dev.ptr(), host.len())?))
        });
        match self.run("broadcast", job)? {
            Payload::Bytes(v) if v.len() == buf.len() => {
                buf.copy_from_slice(&v);
                Ok(())
            }
            _ => Err(device_err("broadcast", self.rank, "the NCCL thread answered with the wrong payload")),
        }
    }

    /// NCCL has no barrier: an all-reduce of one element returns only once every rank entered it.
    fn barrier(&self) -> Result<(), CommError> {
        let job: Job = Box::new(|lane: &Lane| {
            let dev = lane.gpu.upload(&[0f32])?;
            lane.comm.all_reduce(dev.ptr(), dev.ptr(), 1, Elem::F32, ReduceOp::Sum)?;
            lane.comm.wait()?;
            Ok(Payload::Done)
        });
        self.run("barrier", job).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_option_parses_and_rejects() {
        assert_eq!(NcclOptions::from_timeout_value(None).unwrap(), NcclOptions::default());
        assert_eq!(NcclOptions::from_timeout_value(Some("  ")).unwrap().timeout, DEFAULT_TIMEOUT);
        let o = NcclOptions::from_timeout_value(Some("2.5")).unwrap();
        assert_eq!((o.timeout, o.init_timeout), (Duration::from_millis(2500), Duration::from_millis(2500)));
        for bad in ["0", "-1", "abc", "inf", "NaN"] {
            let e = NcclOptions::from_timeout_value(Some(bad)).unwrap_err();
            assert!(e.to_string().contains(TIMEOUT_ENV), "{e}");
        }
    }
}
