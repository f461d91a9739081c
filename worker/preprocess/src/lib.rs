//! Tokenizer, chat template and image preprocessing for Qwen2.5-VL, numerically matching
//! transformers' `Qwen2_5_VLProcessor` with the slow (PIL) `Qwen2VLImageProcessor`.
//!
//! ```no_run
//! use onevision_preprocess::{load_image, Message, Processor};
//! let p = Processor::from_dir("model_dir")?;
//! let image = load_image("cat.png")?;
//! let enc = p.encode_chat(&[Message::user_with_images(1, "What is this?")], &[image])?;
//! println!("{} tokens, {} patches", enc.input_ids.len(), enc.num_patches());
//! # Ok::<(), onevision_preprocess::PreprocessError>(())
//! ```

pub mod config;
pub mod error;
pub mod image;
pub mod processor;
pub mod template;

pub use crate::config::{ImageConfig, SpecialTokens};
pub use crate::error::{PreprocessError, Result};
pub use crate::image::{
    decode_image, load_image, preprocess_image, resize_bicubic_pil, smart_resize, to_rgb, ProcessedImage,
    MAX_ASPECT_RATIO,
};
pub use crate::processor::{Encoding, Processor};
pub use crate::template::{load_chat_template, ChatTemplate, Content, Message, Part, TemplateTokens};
