//! Errors of the rollout worker (server side) and the trainer's rollout pool (client side).

use std::time::Duration;

use tonic::Code;

/// Starting or running a rollout worker failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot load the rollout model from {dir}: {detail} (is the model path in the job spec right?)")]
    Model { dir: String, detail: String },
    #[error("cannot bind the rollout server on {addr}: {source} (is the port in use?)")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("rollout server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("rollout server task ended abnormally: {0}")]
    Task(String),
    #[error("the generation thread could not start: {0}")]
    Thread(std::io::Error),
}

/// A trainer-side rollout call failed for good (after retries on the other workers).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RolloutError {
    #[error(
        "no rollout worker available for {waited:?} ({pending} prompt groups pending): are the \
         rollout pods running and registered with the coordinator?"
    )]
    NoWorkers { waited: Duration, pending: usize },
    #[error("rollout did not finish within {deadline:?}: {pending} prompt groups still pending (last error: {last_error})")]
    Deadline { deadline: Duration, pending: usize, last_error: String },
    #[error("prompt group {index} was rejected by worker {worker} ({code:?}): {message}")]
    Rejected { index: usize, worker: String, code: Code, message: String },
    #[error("prompt group {index} failed on {attempts} attempts; last error: {last_error}")]
    GroupFailed { index: usize, attempts: u32, last_error: String },
    #[error("cannot list rollout workers: {0}")]
    Registry(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no rollout worker accepted weights version {version}: {detail}")]
    Sync { version: u64, detail: String },
}
