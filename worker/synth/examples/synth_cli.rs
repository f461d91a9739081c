//! Stand-alone front end for the two commands (the `onevision` binary embeds the same Args):
//! `cargo run -p onevision-synth --example synth_cli -- synth --out DIR ...`
//! `cargo run -p onevision-synth --example synth_cli -- init --out DIR --tokenizer-corpus DIR/train.jsonl`

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Same as `onevision data synth`.
    Synth(onevision_synth::SynthArgs),
    /// Same as `onevision model init`.
    Init(onevision_synth::InitArgs),
}

fn main() {
    let result = match Cli::parse().cmd {
        Cmd::Synth(a) => onevision_synth::run_synth(&a).map(|r| print!("{r}")),
        Cmd::Init(a) => onevision_synth::run_init(&a).map(|r| println!("{r}")),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
