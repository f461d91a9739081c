//! Subcommands of `onevision`. Each lives in its own module with an `Args` struct and a `run`.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod data;
pub mod generate;
pub mod grad;
pub mod kernels;
pub mod model;
pub mod report;
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
    /// Generate a reply to one user turn (optionally with images) from a checkpoint.
    Generate(generate::Args),
    /// Loss and every parameter's gradient over a JSONL batch (SFT or GRPO), as f32 safetensors.
    Grad(grad::Args),
    /// Dataset tools (synthetic verifiable tasks).
    Data(data::Args),
    /// Checkpoint tools (small random Qwen2.5-VL checkpoints).
    Model(model::Args),
    /// Throughput benchmarks (JSON lines, joinable with benches/*.py for PyTorch).
    Bench(bench::Args),
    /// CUDA kernel tools: `kernels check` compiles every kernel with NVRTC (no GPU needed).
    Kernels(kernels::Args),
    /// PNG plots (loss, reward, accuracy, KL, throughput) and an HTML page from DIR/metrics.jsonl.
    Report(report::Args),
    /// Rollout worker (pod entrypoint): serves generation and weight updates over gRPC.
    Rollout(rollout::Args),
    /// Trainer pod entrypoint: one rank of an SFTJob/GRPOJob (reads the job file and the operator's env).
    Trainer(trainer::Args),
    /// Run SFTJob/GRPOJob manifests locally as processes (the operator's pods, on this machine).
    Run(run::Args),
}

impl Command {
    /// The process role, naming its tracing service `onevision-<role>`.
    pub fn role(&self) -> &'static str {
        match self {
            Command::Trainer(_) => "trainer",
            Command::Rollout(_) => "rollout",
            Command::Run(_) => "run",
            _ => "cli",
        }
    }
}

/// Run the parsed command. Returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Version => {
            println!("onevision {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Generate(args) => generate::run(args),
        Command::Grad(args) => grad::run(args),
        Command::Data(args) => data::run(args),
        Command::Model(args) => model::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Kernels(args) => kernels::run(args),
        Command::Rollout(args) => rollout::run(args),
        Command::Report(args) => report::run(args),
        Command::Trainer(args) => trainer::run(args),
        Command::Run(args) => run::run(args),
    }
}
