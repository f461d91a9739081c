//! Place of the NCCL communicator (GPU ranks), built with `--features cuda`. Not implemented yet.
//!
//! Plan: `NcclCommunicator` implementing [`crate::Communicator`] on `cudarc::nccl::Comm`, created
//! from the 128-byte unique id that rank 0 puts in `JoinRequest.nccl_unique_id` and every rank
//! gets back in `JoinResponse.nccl_unique_id`; collectives on device buffers (a device-side
//! variant of the trait), with a watchdog that aborts the communicator (`ncclCommAbort`) when a
//! collective exceeds the op timeout, so a dead peer yields an error instead of a hang.
