//! `onevision kernels check [--arch sm_80,sm_90]`: compile every CUDA kernel family with NVRTC
//! (no GPU needed) and print one line per kernel with registers and spills when ptxas is present.
//! `scripts/setup-cuda-compile` installs NVRTC, the headers and ptxas from PyPI wheels.

use clap::{Args as ClapArgs, Subcommand};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    pub command: KernelsCommand,
}

#[derive(Debug, Subcommand)]
pub enum KernelsCommand {
    /// Compile every kernel for the given architectures; fails on the first that does not compile.
    Check {
        /// Comma-separated GPU architectures (default sm_80,sm_90).
        #[arg(long, value_delimiter = ',')]
        arch: Vec<String>,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        KernelsCommand::Check { arch } => {
            let archs: Vec<&str> = arch.iter().map(String::as_str).collect();
            // kernels_check prints one line per kernel as it goes.
            let reports = onevision_cuda::kernels_check(&archs)?;
            let spills: Vec<_> = reports
                .iter()
                .filter(|r| r.resources.is_some_and(|x| x.spill_stores + x.spill_loads > 0))
                .map(|r| format!("{} [{}]", r.name, r.arch))
                .collect();
            eprintln!("{} kernels compiled, {} with register spills{}", reports.len(), spills.len(),
                if spills.is_empty() { String::new() } else { format!(": {}", spills.join(", ")) });
            Ok(())
        }
    }
}
