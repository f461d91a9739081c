//! Tensors, the Backend trait with its CPU implementation, and the Qwen2.5-VL model.
pub mod backend;
pub mod cpu;
pub mod error;
pub mod tensor;

pub use backend::{AttnMask, AttnSpec, Backend, LinearGrads};
pub use cpu::CpuBackend;
pub use error::{ModelError, Result};
pub use tensor::{DType, Device, DeviceBuffer, HostData, Storage, Tensor};
pub mod config;
pub mod rope;
pub use config::{Qwen25VlConfig, TextConfig, VisionConfig};
pub mod loader;
pub use loader::{save_safetensors, Checkpoint};
pub mod model;
pub mod vision;
pub use model::{KvCache, Prefill, PromptInput, Qwen25Vl, TextLayer, TextWeights, VisionBlock, VisionWeights};
pub mod generate;
pub use generate::{generate, generate_group, generate_groups, Generation, GroupJob, SamplingParams};
pub mod flops;
pub mod npy;
pub mod train;
pub use train::{Tape, TrainForward, VisionGrads};
