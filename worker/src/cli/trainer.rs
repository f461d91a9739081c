//! `onevision trainer --job FILE`: the entrypoint of a trainer pod (see `runtime::trainer`).
//! Reads the typed job file and the operator's environment; exits 78 on a permanent error.
//! With `NPROC_PER_NODE > 1` and no `LOCAL_RANK` it is the pod's per-GPU launcher instead
//! (`runtime::launcher`): one child rank per GPU, exit code of the first child that failed.

use std::path::PathBuf;

use clap::Args as ClapArgs;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The typed job file (an SFTJob or GRPOJob with model.path resolved).
    #[arg(long, env = "ONEVISION_JOB_SPEC")]
    pub job: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if crate::runtime::launcher::run_if_launcher()? {
        return Ok(());
    }
    crate::runtime::trainer::run(&args.job).map_err(anyhow::Error::new)
}
