//! `onevision data …`: dataset tools. `synth` renders synthetic verifiable tasks (onevision-synth).

use clap::{Args as ClapArgs, Subcommand};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Render synthetic image + question + answer tasks with exact answers and reasoning traces.
    Synth(onevision_synth::SynthArgs),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Synth(a) => {
            let report = onevision_synth::run_synth(&a).map_err(anyhow::Error::new)?;
            print!("{report}");
            Ok(())
        }
    }
}
