//! Subcommands of `onevision`. Each lives in its own module with an `Args` struct and a `run`.

use clap::{Parser, Subcommand};

pub mod rollout;
pub mod run;
pub mod trainer;

#[derive(Debug, Parser)]
#[command(name = "onevision", version, about = "Train R1-Onevision-style multimodal reasoners")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print build information.
    Version,
    /// Rollout worker (pod entrypoint): serves generation and weight updates over gRPC.
    Rollout(rollout::Args),
    /// Trainer pod entrypoint: one rank of an SFTJob/GRPOJob (reads the job file and the operator's env).
    Trainer(trainer::Args),
    /// Run SFTJob/GRPOJob manifests locally as processes (the operator's pods, on this machine).
    Run(run::Args),
}

/// Run the parsed command. Returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Version => {
            println!("onevision {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Rollout(args) => rollout::run(args),
        Command::Trainer(args) => trainer::run(args),
        Command::Run(args) => run::run(args),
    }
}
