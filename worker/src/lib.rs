//! The `onevision` binary's library half: command-line subcommands and the glue between the
//! model, training, rollout and communication crates.

pub mod cli;
pub mod rollout;
pub mod runtime;
pub mod telemetry;
pub mod training;

/// Exit code for errors a retry cannot fix (bad config, missing data). The operator fails the
/// job at once on this code instead of restarting the gang.
pub const EXIT_PERMANENT: i32 = 78;
