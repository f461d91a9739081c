//! `onevision model …`: checkpoint tools. `init` writes a small random Qwen2.5-VL checkpoint with a
//! BPE tokenizer trained on the given corpus (onevision-synth).

use clap::{Args as ClapArgs, Subcommand};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a small random Qwen2.5-VL checkpoint (HF layout) with a trained BPE tokenizer.
    Init(onevision_synth::InitArgs),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        ModelCommand::Init(a) => {
            let report = onevision_synth::run_init(&a).map_err(anyhow::Error::new)?;
            println!("{report}");
            Ok(())
        }
    }
}
