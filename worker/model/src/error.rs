//! Typed errors for tensors, backends, checkpoints and the model.
use thiserror::Error;

/// Every fallible operation of this crate returns this error. Messages name the offending
/// tensor/op and the shapes involved so that the user can act on them.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{op}: shape error: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: unsupported dtype {dtype:?} ({msg})")]
    DType { op: &'static str, dtype: crate::DType, msg: String },
    #[error("{op}: tensor lives on {found:?} but backend `{backend}` needs {expected:?}; move it with Backend::to_device")]
    Device { op: &'static str, backend: String, expected: crate::Device, found: crate::Device },
    #[error("I/O error on {path}: {source}")]
    Io { path: String, #[source] source: std::io::Error },
    #[error("invalid config {path}: {msg}")]
    Config { path: String, msg: String },
    #[error("tensor `{name}` is missing from checkpoint {dir} (expected shape {expected:?})")]
    MissingTensor { name: String, dir: String, expected: Vec<usize> },
    #[error("tensor `{name}` in checkpoint {dir} has shape {found:?}, but the config implies {expected:?}")]
    TensorShape { name: String, dir: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("tensor `{name}` in {file} has unsupported dtype {dtype}; supported: F32, BF16, F16")]
    UnsupportedDType { name: String, file: String, dtype: String },
    #[error("safetensors error in {file}: {msg}")]
    Safetensors { file: String, msg: String },
    #[error("image token count mismatch: the prompt holds {tokens} image tokens but the images (grid_thw {grids:?}) produce {features} features")]
    ImageTokens { tokens: usize, features: usize, grids: Vec<[usize; 3]> },
    #[error("prompt of {prompt} tokens exceeds the model context of {context} positions (max_position_embeddings)")]
    ContextOverflow { prompt: usize, context: usize },
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("backend `{backend}`: {msg}")]
    Backend { backend: String, msg: String },
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn shape_err<T>(op: &'static str, msg: impl Into<String>) -> Result<T> {
    Err(ModelError::Shape { op, msg: msg.into() })
}
