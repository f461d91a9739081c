//! `Processor`: tokenizer + chat template + image pipeline, the Rust counterpart of
//! transformers' `Qwen2_5_VLProcessor` for images and text.

use std::path::{Path, PathBuf};

use image::RgbImage;
use tokenizers::Tokenizer;

use crate::config::{ImageConfig, SpecialTokens};
use crate::error::{PreprocessError, Result};
use crate::image::{preprocess_image, ProcessedImage};
use crate::template::{load_chat_template, ChatTemplate, Message, TemplateTokens};

/// Model inputs for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoding {
    /// Token ids, each image placeholder expanded to t·h·w/merge² image-pad tokens.
    pub input_ids: Vec<u32>,
    /// Row-major [num_patches, patch_dim]: every image's patches concatenated in order.
    pub pixel_values: Vec<f32>,
    pub patch_dim: usize,
    /// One (t, h, w) per image, in patches.
    pub image_grid_thw: Vec<[usize; 3]>,
}

impl Encoding {
    pub fn num_patches(&self) -> usize {
        self.pixel_values.len().checked_div(self.patch_dim).unwrap_or(0)
    }
}

/// Loads everything from a checkpoint directory and turns chats + images into model inputs.
#[derive(Debug)]
pub struct Processor {
    dir: PathBuf,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    special: SpecialTokens,
    image_cfg: ImageConfig,
}

impl Processor {
    /// Reads tokenizer.json, the chat template, config.json / generation_config.json (token
    /// ids) and preprocessor_config.json from `dir`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(PreprocessError::Tokenizer { path: tok_path, message: "file not found".into() });
        }
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| PreprocessError::Tokenizer { path: tok_path.clone(), message: e.to_string() })?;
        let special = SpecialTokens::load(&dir, &|s| tokenizer.token_to_id(s), &|id| tokenizer.id_to_token(id))?;
        let template = ChatTemplate::new(load_chat_template(&dir)?, TemplateTokens::from_dir(&dir)?)?;
        let image_cfg = ImageConfig::from_dir(&dir)?;
        Ok(Self { dir, tokenizer, template, special, image_cfg })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    pub fn image_config(&self) -> &ImageConfig {
        &self.image_cfg
    }

    /// Renders the chat template (image items as the template writes them, not yet expanded).
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.template.render(messages, add_generation_prompt)
    }

    /// Runs the image pipeline on one decoded image.
    pub fn process_image(&self, image: &RgbImage) -> Result<ProcessedImage> {
        preprocess_image(image, &self.image_cfg)
    }

    /// Chat → model inputs: renders the template with the generation prompt, processes the
    /// images (one per image item, in order), expands the placeholders and tokenises.
    pub fn encode_chat(&self, messages: &[Message], images: &[RgbImage]) -> Result<Encoding> {
        let items: usize = messages.iter().map(Message::image_count).sum();
        if items != images.len() {
            return Err(PreprocessError::ImageCountMismatch {
                placeholders: items,
                images: images.len(),
                token: "image item".into(),
            });
        }
        let text = self.render_chat(messages, true)?;
        let processed = images.iter().map(|im| self.process_image(im)).collect::<Result<Vec<_>>>()?;
        self.encode_text(&text, &processed)
    }

    /// Already-rendered text with one image token (`<|image_pad|>`) per image → model inputs.
    pub fn encode_text(&self, text: &str, images: &[ProcessedImage]) -> Result<Encoding> {
        let pad = self.special.image_token.as_str();
        let pieces: Vec<&str> = text.split(pad).collect();
        let placeholders = pieces.len() - 1;
        if placeholders != images.len() {
            return Err(PreprocessError::ImageCountMismatch {
                placeholders,
                images: images.len(),
                token: pad.to_owned(),
            });
        }
        let merge = self.image_cfg.merge_size;
        let mut expanded = String::with_capacity(text.len());
        for (i, piece) in pieces.iter().enumerate() {
            expanded.push_str(piece);
            if let Some(im) = images.get(i) {
                for _ in 0..im.num_tokens(merge) {
                    expanded.push_str(pad);
                }
            }
        }
        let enc = self.tokenizer.encode(expanded, true).map_err(|e| PreprocessError::Encode(e.to_string()))?;
        let input_ids = enc.get_ids().to_vec();
        let expected: usize = images.iter().map(|im| im.num_tokens(merge)).sum();
        let found = input_ids.iter().filter(|&&id| id == self.special.image_token_id).count();
        if found != expected {
            return Err(PreprocessError::ImageTokenMismatch { expected, found, token: pad.to_owned() });
        }
        let patch_dim = images.first().map_or(self.image_cfg.patch_dim(), |im| im.patch_dim);
        let mut pixel_values = Vec::with_capacity(images.iter().map(|im| im.pixel_values.len()).sum());
        for im in images {
            pixel_values.extend_from_slice(&im.pixel_values);
        }
        Ok(Encoding { input_ids, pixel_values, patch_dim, image_grid_thw: images.iter().map(|im| im.grid_thw).collect() })
    }

    /// Plain text → ids (no template, no image expansion), as `tokenizer(text)`.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| PreprocessError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids → text. Ids outside the tokenizer (padded vocab rows) decode to nothing, as in HF.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| PreprocessError::Decode(e.to_string()))
    }
}
