//! Dataset samples → model inputs with labels, through the checkpoint's own chat template.
//!
//! SFT: the whole conversation is rendered (no generation prompt) and labelled on every assistant
//! turn's content and its closing `<|im_end|>` (not the newline after it), as LLaMA-Factory does.
//! GRPO: the prompt is every turn before the last assistant turn plus the generation prompt; the
//! completion is `tokenize(completion)` followed by `<|im_end|>` (the grad CLI contract).

use std::path::Path;

use onevision_data::{ImageSource, Sample, IMAGE_PLACEHOLDER};
use onevision_model::{PromptInput, Tensor};
use onevision_preprocess::{decode_image, load_image, Content, Message, Part, Processor};
use onevision_train::{assistant_labels, ChatTokens};

use super::step::{GrpoSample, SftExample};
use super::{Result, TrainingError};

/// Dataset messages (content strings with `<image>` placeholders) → template messages whose image
/// items sit exactly where the placeholders were.
pub fn sample_messages(msgs: &[onevision_data::Message]) -> Vec<Message> {
    msgs.iter()
        .map(|m| {
            if !m.content.contains(IMAGE_PLACEHOLDER) {
                return Message::text(m.role.clone(), m.content.clone());
            }
            let mut parts = Vec::new();
            for (i, piece) in m.content.split(IMAGE_PLACEHOLDER).enumerate() {
                if i > 0 {
                    parts.push(Part::Image);
                }
                if !piece.is_empty() {
                    parts.push(Part::Text { text: piece.to_string() });
                }
            }
            Message::new(m.role.clone(), Content::Parts(parts))
        })
        .collect()
}

/// A GRPO row of the grad CLI: the encoded sample plus its group key and reward.
#[derive(Debug, Clone)]
pub struct GrpoRow {
    pub group: String,
    pub reward: f64,
    pub sample: GrpoSample,
}

/// Tokenizer + template + image pipeline of one checkpoint, and the ChatML ids labels need.
#[derive(Debug)]
pub struct Encoder {
    processor: Processor,
    chat: ChatTokens,
}

impl Encoder {
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::new(Processor::from_dir(dir)?)
    }

    pub fn new(processor: Processor) -> Result<Self> {
        let tok = processor.tokenizer();
        let id = |s: &str| {
            tok.token_to_id(s).ok_or_else(|| {
                TrainingError::Invalid(format!("tokenizer in {} has no `{s}` token (not a ChatML model?)", processor.dir().display()))
            })
        };
        let chat = ChatTokens {
            im_start: id("<|im_start|>")?,
            im_end: id("<|im_end|>")?,
            assistant_header: processor.encode_plain("assistant\n")?,
        };
        Ok(Self { processor, chat })
    }

    pub fn processor(&self) -> &Processor {
        &self.processor
    }

    pub fn chat_tokens(&self) -> &ChatTokens {
        &self.chat
    }

    fn prompt_input(&self, text: &str, images: &[ImageSource]) -> Result<PromptInput> {
        let mut processed = Vec::with_capacity(images.len());
        for src in images {
            let img = match src {
                ImageSource::Path(p) => load_image(p)?,
                ImageSource::Bytes(b) => decode_image(b)?,
            };
            processed.push(self.processor.process_image(&img)?);
        }
        let enc = self.processor.encode_text(text, &processed)?;
        let pixel_values = if enc.image_grid_thw.is_empty() {
            None
        } else {
            Some(Tensor::from_f32(&[enc.num_patches(), enc.patch_dim], enc.pixel_values)?)
        };
        Ok(PromptInput { input_ids: enc.input_ids, pixel_values, image_grid_thw: enc.image_grid_thw })
    }

    fn check_images(sample: &Sample) -> Result<()> {
        let n = sample.placeholder_count();
        if n != sample.images.len() {
            return Err(TrainingError::Invalid(format!(
                "sample `{}`: {n} `<image>` placeholders but {} images",
                sample.id,
                sample.images.len()
            )));
        }
        Ok(())
    }

    /// The whole conversation with assistant-only labels (unshifted, `-100` elsewhere).
    pub fn encode_sft(&self, sample: &Sample) -> Result<SftExample> {
        Self::check_images(sample)?;
        if !sample.messages.iter().any(|m| m.role == "assistant") {
            return Err(TrainingError::Invalid(format!("sample `{}` has no assistant turn to train on", sample.id)));
        }
        let text = self.processor.render_chat(&sample_messages(&sample.messages), false)?;
        let input = self.prompt_input(&text, &sample.images)?;
        let labels = assistant_labels(&input.input_ids, &self.chat);
        Ok(SftExample { input, labels })
    }

    /// Prompt ids (turns before the last assistant turn, then the generation prompt).
    pub fn encode_prompt(&self, sample: &Sample) -> Result<PromptInput> {
        Self::check_images(sample)?;
        let text = self.processor.render_chat(&sample_messages(sample.prompt_messages()), true)?;
        self.prompt_input(&text, &sample.images)
    }

    /// `tokenize(completion)` followed by `<|im_end|>`.
    pub fn completion_ids(&self, completion: &str) -> Result<Vec<u32>> {
        let mut ids = self.processor.encode_plain(completion)?;
        ids.push(self.chat.im_end);
        Ok(ids)
    }

    /// Prompt + completion as one GRPO sample (advantage and log-probs filled in by the caller).
    pub fn encode_grpo(&self, sample: &Sample, completion: &str) -> Result<GrpoSample> {
        let mut input = self.encode_prompt(sample)?;
        let prompt_len = input.input_ids.len();
        input.input_ids.extend(self.completion_ids(completion)?);
        Ok(GrpoSample { input, prompt_len, old_logp: None, ref_logp: None, advantage: 0.0 })
    }

    /// A grad-CLI GRPO row: `group`, `completion` and `reward` from the row's extra fields.
    pub fn encode_grpo_row(&self, sample: &Sample) -> Result<GrpoRow> {
        let field = |k: &str| sample.meta.get(k).filter(|v| !v.is_null());
        let bad = |what: &str| TrainingError::Invalid(format!("GRPO row `{}`: {what}", sample.id));
        let group = match field("group") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v @ serde_json::Value::Number(_)) => v.to_string(),
            _ => return Err(bad("needs a \"group\" (string or number)")),
        };
        let completion = field("completion").and_then(|v| v.as_str()).ok_or_else(|| bad("needs a \"completion\" string"))?;
        let reward = field("reward").and_then(|v| v.as_f64()).ok_or_else(|| bad("needs a numeric \"reward\""))?;
        if !reward.is_finite() {
            return Err(bad("reward is not finite"));
        }
        Ok(GrpoRow { group, reward, sample: self.encode_grpo(sample, completion)? })
    }
}
