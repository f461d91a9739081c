//! Typed errors: every bad input (file, config, image, prompt) maps to one of these, never a panic.

use std::path::PathBuf;

/// Errors of the preprocessing crate. Messages name the file or value at fault and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("invalid config {path}: {message}")]
    Config { path: PathBuf, message: String },

    #[error("cannot load tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("tokenization failed: {0}")]
    Encode(String),

    #[error("decoding token ids failed: {0}")]
    Decode(String),

    #[error(
        "no chat template in {dir}: expected chat_template.jinja, chat_template.json or a \
         `chat_template` entry in tokenizer_config.json"
    )]
    MissingChatTemplate { dir: PathBuf },

    #[error("chat template error: {0}")]
    Template(String),

    #[error("cannot decode image {source_name}: {message} (supported: PNG, JPEG, WebP)")]
    ImageDecode { source_name: String, message: String },

    #[error("image has an empty side ({height}x{width}); an image needs at least one pixel each way")]
    EmptyImage { height: usize, width: usize },

    #[error(
        "absolute aspect ratio must be at most 200, got {ratio:.3} for a {height}x{width} image; \
         crop or pad the image"
    )]
    AspectRatio { height: usize, width: usize, ratio: f64 },

    #[error(
        "image too large: {height}x{width} would need {pixels} pixels after resizing, over the \
         limit {limit}"
    )]
    ImageTooLarge { height: usize, width: usize, pixels: usize, limit: usize },

    #[error(
        "the prompt has {placeholders} image placeholder(s) ({token}) but {images} image(s) were \
         given: pass one image per image item"
    )]
    ImageCountMismatch { placeholders: usize, images: usize, token: String },

    #[error(
        "image-token count mismatch: the images need {expected} {token} tokens but the tokenized \
         prompt has {found} (does the text contain a literal {token}?)"
    )]
    ImageTokenMismatch { expected: usize, found: usize, token: String },

    #[error("token {token:?} (id {id}) from config.json is not in the tokenizer")]
    UnknownToken { token: String, id: u32 },
}

pub type Result<T, E = PreprocessError> = std::result::Result<T, E>;
