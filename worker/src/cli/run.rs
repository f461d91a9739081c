//! `onevision run FILE.yaml [--workdir DIR]`: run SFTJob/GRPOJob manifests as local processes
//! (see `runtime::local`).

use std::path::PathBuf;

use clap::Args as ClapArgs;

use crate::runtime::local::{self, RunOptions};

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Manifest with one or more SFTJob/GRPOJob documents (what one would `kubectl apply`).
    pub file: PathBuf,
    /// Where each job writes DIR/<job>/{metrics.jsonl,status.json,metrics-targets.json,checkpoints/,logs/}
    /// and its final model.
    #[arg(long, default_value = "runs")]
    pub workdir: PathBuf,
    /// Local directory that stands in for the jobs' storage.mountPath (default: the workdir).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Plain progress lines even on a terminal.
    #[arg(long)]
    pub no_progress_bars: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = RunOptions {
        file: args.file,
        workdir: args.workdir,
        data_root: args.data_root,
        exe: None,
        progress_bars: args.no_progress_bars.then_some(false),
    };
    let outcomes = local::run(&opts).map_err(anyhow::Error::new)?;
    for o in &outcomes {
        println!("{} {}: {:?} ({})", o.kind, o.name, o.phase, o.dir.display());
    }
    Ok(())
}
