use std::path::PathBuf;

/// Errors from dataset synthesis and model initialisation. Messages name the offending file or
/// option and what to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not encode image {path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error(
        "only found {found} distinct {split} tasks out of {wanted} requested for the chosen \
         families and difficulties; the task space is too small: add families, widen the \
         difficulty range, use a larger --image-size or ask for fewer tasks"
    )]
    TaskSpaceExhausted {
        split: String,
        wanted: usize,
        found: usize,
    },
    #[error("tokenizer corpus {path}: {message}")]
    Corpus { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error("JSON serialisation: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
