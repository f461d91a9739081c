#![recursion_limit = "256"]
//! Synthetic verifiable tasks (`onevision data synth`) and small random Qwen2.5-VL checkpoints
//! (`onevision model init`).
//!
//! Tasks follow the R1-Onevision cross-modal formalization run backwards: a formal scene
//! description is drawn first, the image is rendered from it, and the question, exact answer and
//! reasoning trace are all derived from the same description.

pub mod error;
pub mod init;
pub mod raster;
pub mod scene;
pub mod synth;
pub mod tasks;
pub mod tokenizer;

pub use error::{Error, Result};
pub use synth::{run_synth, synth, SynthArgs, SynthOptions, SynthReport};
pub use tasks::{Family, Task};
pub use init::{init_model, run_init, InitArgs, InitOptions, InitReport};
