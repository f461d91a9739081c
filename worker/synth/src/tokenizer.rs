//! A small byte-level BPE tokenizer in Qwen2's layout (NFC, Qwen's split regex, byte-level
//! pre-tokenizer and decoder), trained on the task text, plus the Qwen2.5-VL chat template and
//! the tokenizer side-files transformers reads.

use std::fs;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior, TokenizerBuilder,
};

use crate::error::{io_err, Error, Result};

/// Qwen2's pre-tokenizer regex (digits split one by one).
pub const QWEN_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen's special tokens, in the order they get ids 0.. in our vocabulary.
pub const SPECIAL_TOKENS: [&str; 8] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

/// Reasoning-format tags: added tokens (one id each) but not special, so decoding with
/// `skip_special_tokens` keeps them for the format reward.
pub const TAG_TOKENS: [&str; 4] = ["<think>", "</think>", "<answer>", "</answer>"];

/// Qwen2.5-VL's chat template (chat_template.json of the official checkpoints).
pub const CHAT_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Text that the chat template itself contributes; always part of the training corpus so it
/// gets compact tokens.
const TEMPLATE_TEXT: [&str; 4] = ["system\nYou are a helpful assistant.", "user\n", "assistant\n", "\n"];

/// All added tokens, specials first, with their ids (0..12).
pub fn added_tokens() -> Vec<(u32, &'static str, bool)> {
    SPECIAL_TOKENS
        .iter()
        .map(|t| (*t, true))
        .chain(TAG_TOKENS.iter().map(|t| (*t, false)))
        .enumerate()
        .map(|(i, (t, special))| (i as u32, t, special))
        .collect()
}

/// Read training text. A `.jsonl`/`.json` line that is an object with `messages` contributes the
/// message contents (the `<image>` placeholder removed: the model never sees it); any other line
/// is taken as plain text.
pub fn read_corpus(paths: &[PathBuf]) -> Result<Vec<String>> {
    if paths.is_empty() {
        return Err(Error::InvalidOption(
            "give at least one --tokenizer-corpus file (e.g. the train.jsonl written by `onevision data synth`)".into(),
        ));
    }
    let mut texts = Vec::new();
    for path in paths {
        let raw = fs::read_to_string(path).map_err(io_err(path))?;
        let before = texts.len();
        for line in raw.lines() {
            let parsed = serde_json::from_str::<serde_json::Value>(line).ok();
            match parsed.as_ref().and_then(|v| v.get("messages")).and_then(|m| m.as_array()) {
                Some(messages) => {
                    for m in messages {
                        if let Some(c) = m.get("content").and_then(|c| c.as_str()) {
                            texts.push(c.replace("<image>", ""));
                        }
                    }
                }
                None if !line.trim().is_empty() => texts.push(format!("{line}\n")),
                None => {}
            }
        }
        if texts.len() == before {
            return Err(Error::Corpus {
                path: path.clone(),
                message: "contains no text".into(),
            });
        }
    }
    texts.extend(TEMPLATE_TEXT.iter().map(|s| s.to_string()));
    Ok(texts)
}

/// Split text around added tokens so BPE merges are never spent on them.
fn split_added(text: &str) -> Vec<&str> {
    let all: Vec<&str> = SPECIAL_TOKENS.iter().chain(TAG_TOKENS.iter()).copied().collect();
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((pos, tok)) = all
        .iter()
        .filter_map(|t| rest.find(t).map(|p| (p, *t)))
        .min_by_key(|(p, t)| (*p, std::cmp::Reverse(t.len())))
    {
        if pos > 0 {
            out.push(&rest[..pos]);
        }
        rest = &rest[pos + tok.len()..];
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Train the tokenizer on `texts` and write `dir/tokenizer.json`. Returns the total vocabulary
/// size (model vocabulary plus added tokens).
pub fn train_tokenizer(texts: &[String], vocab_size: usize, dir: &Path) -> Result<usize> {
    let min_vocab = 256 + SPECIAL_TOKENS.len() + TAG_TOKENS.len();
    if vocab_size < min_vocab {
        return Err(Error::InvalidOption(format!(
            "--vocab-size {vocab_size} is below the {min_vocab} ids a byte-level BPE with Qwen's added tokens needs"
        )));
    }
    let tok_err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let split = Split::new(
        SplitPattern::Regex(QWEN_SPLIT_REGEX.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(tok_err)?;
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ]);
    let mut tokenizer = TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
        .with_model(BPE::default())
        .with_normalizer(Some(NormalizerWrapper::NFC(NFC)))
        .with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre)))
        .with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(false, false, false))))
        .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::new(false, false, false))))
        .build()
        .map_err(tok_err)?;
    let added: Vec<AddedToken> = added_tokens()
        .into_iter()
        .map(|(_, t, special)| AddedToken::from(t, special).normalized(false))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(added)
        // Every byte must have a token, or unseen characters would be dropped (no unk token).
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let pieces: Vec<&str> = texts.iter().flat_map(|t| split_added(t)).collect();
    tokenizer.train(&mut trainer, pieces.into_iter()).map_err(tok_err)?;
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path, true).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    let size = tokenizer.get_vocab_size(true);
    // The ids are part of config.json: check the trainer placed the added tokens as expected.
    for (id, t, _) in added_tokens() {
        if tokenizer.token_to_id(t) != Some(id) {
            return Err(Error::Tokenizer(format!(
                "added token {t} got id {:?}, expected {id}",
                tokenizer.token_to_id(t)
            )));
        }
    }
    Ok(size)
}

/// tokenizer_config.json in Qwen2's layout.
pub fn tokenizer_config(model_max_length: usize) -> serde_json::Value {
    let mut decoder = serde_json::Map::new();
    for (id, t, special) in added_tokens() {
        decoder.insert(
            id.to_string(),
            serde_json::json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": special}),
        );
    }
    serde_json::json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": SPECIAL_TOKENS[1..].to_vec(),
        "bos_token": null,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": false,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": null
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_added_removes_tags() {
        assert_eq!(
            split_added("<think>a b</think><answer>3</answer>\n"),
            vec!["a b", "3", "\n"]
        );
        assert_eq!(split_added("plain"), vec!["plain"]);
    }
}
