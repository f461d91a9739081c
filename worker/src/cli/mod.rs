//! Subcommands of `onevision`. Each lives in its own module with an `Args` struct and a `run`.

use clap::{Parser, Subcommand};

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
}

/// Run the parsed command. Returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Version => {
            println!("onevision {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
