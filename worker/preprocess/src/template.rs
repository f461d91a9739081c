//! The checkpoint's own chat template, rendered with minijinja the way transformers renders it
//! (jinja2 with `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `tojson`).

use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;
use serde_json::Value as Json;

use crate::config::{read_json_opt, token_str};
use crate::error::{PreprocessError, Result};

const TEMPLATE_NAME: &str = "chat_template";

/// One part of a message's content.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Part {
    /// An image item; the images themselves are passed separately, in order.
    Image,
    Text { text: String },
}

/// Message content: a plain string or a list of parts (as in HF chat messages).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

impl Message {
    pub fn new(role: impl Into<String>, content: Content) -> Self {
        Self { role: role.into(), content }
    }

    /// A plain-text message.
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self::new(role, Content::Text(text.into()))
    }

    /// The CLI's single user turn: `n_images` image items, then the text.
    pub fn user_with_images(n_images: usize, text: impl Into<String>) -> Self {
        let mut parts = vec![Part::Image; n_images];
        parts.push(Part::Text { text: text.into() });
        Self::new("user", Content::Parts(parts))
    }

    /// Number of image items in this message.
    pub fn image_count(&self) -> usize {
        match &self.content {
            Content::Text(_) => 0,
            Content::Parts(p) => p.iter().filter(|x| matches!(x, Part::Image)).count(),
        }
    }
}

/// Finds the template source: chat_template.jinja, chat_template.json, then
/// tokenizer_config.json's `chat_template` (a string, or a list of named templates of which
/// "default" is used), the order transformers' processors use.
pub fn load_chat_template(dir: &Path) -> Result<String> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja).map_err(|source| PreprocessError::Io { path: jinja, source });
    }
    if let Some(v) = read_json_opt(&dir.join("chat_template.json"))? {
        if let Some(t) = template_from(v.get("chat_template")) {
            return Ok(t);
        }
    }
    if let Some(v) = read_json_opt(&dir.join("tokenizer_config.json"))? {
        if let Some(t) = template_from(v.get("chat_template")) {
            return Ok(t);
        }
    }
    Err(PreprocessError::MissingChatTemplate { dir: dir.to_path_buf() })
}

fn template_from(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

/// Special-token strings transformers passes to every template render.
#[derive(Debug, Clone, Default)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

impl TemplateTokens {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        Ok(Self {
            bos_token: token_str(cfg.get("bos_token")),
            eos_token: token_str(cfg.get("eos_token")),
            pad_token: token_str(cfg.get("pad_token")),
            unk_token: token_str(cfg.get("unk_token")),
        })
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: TemplateTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("tokens", &self.tokens).finish_non_exhaustive()
    }
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(source: String, tokens: TemplateTokens) -> Result<Self> {
        let mut env = Environment::new();
        // transformers compiles with jinja2 trim_blocks=True, lstrip_blocks=True
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| PreprocessError::Template(format!("{e:#}")))?;
        env.set_syntax(syntax);
        // Python string/dict methods (.strip(), .startswith(), .items(), ...) used by HF templates
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source).map_err(|e| PreprocessError::Template(format!("{e:#}")))?;
        Ok(Self { env, tokens })
    }

    /// Renders `messages`; `add_generation_prompt` appends the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(|e| PreprocessError::Template(format!("{e:#}")))?;
        let t = &self.tokens;
        let ctx = minijinja::context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => t.bos_token.clone(),
            eos_token => t.eos_token.clone(),
            pad_token => t.pad_token.clone(),
            unk_token => t.unk_token.clone(),
        };
        tmpl.render(ctx).map_err(|e| PreprocessError::Template(format!("{e:#}")))
    }
}
