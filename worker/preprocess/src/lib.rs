//! Tokenizer, chat template and image preprocessing for Qwen2.5-VL
