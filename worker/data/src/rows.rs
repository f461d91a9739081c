//! JSON row formats → [`Sample`].
//!
//! * LLaMA-Factory sharegpt (OpenAI-style tags): `{"messages": [{"role", "content"}], "images": [..]}`;
//!   the number of `<image>` placeholders must equal the number of images (as LLaMA-Factory checks).
//! * R1-Onevision / classic sharegpt: `{"id", "image", "conversations": [{"from": human|gpt, "value"}]}`;
//!   `image` is a path, base64 (optionally a `data:` URL), or `{"bytes", "path"}` (a HF Image column).
//! * GRPO prompts (R1-V/VLM-R1 style): `{"problem"|"question"|"prompt", "solution"|"answer"|
//!   "ground_truth", "image"|"images"}`: one user turn and the ground truth for rewards.
//!
//! For the last two, a row with images but no placeholder gets them prepended to the first user turn
//! (these datasets often omit it); any other count mismatch is an error.

use crate::{ImageSource, Message, Sample, IMAGE_PLACEHOLDER};
use base64::engine::{general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Which row layout to expect; `Auto` picks per row by its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RowFormat {
    #[default]
    Auto,
    /// `messages` + `images`.
    Sharegpt,
    /// `conversations` from human/gpt + `image`.
    R1Onevision,
    /// question + ground-truth answer.
    Grpo,
}

/// Context for converting rows of one file.
#[derive(Debug, Clone)]
pub struct RowCtx {
    /// Base for relative image paths.
    pub image_root: PathBuf,
    pub check_image_files: bool,
    pub format: RowFormat,
}

const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn is_image_magic(b: &[u8]) -> bool {
    b.starts_with(b"\x89PNG")
        || b.starts_with(&[0xFF, 0xD8, 0xFF])
        || b.starts_with(b"GIF8")
        || (b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP")
        || b.starts_with(b"BM")
}

/// Decode base64 image data (whitespace and missing padding tolerated).
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let s = s
        .strip_prefix("data:")
        .map_or(s, |rest| rest.split_once(',').map_or(rest, |(_, d)| d));
    let clean: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    BASE64.decode(clean).ok()
}

/// Interpret a string image field: a `data:` URL or base64 of a known image format → bytes; else a path.
/// (Base64 JPEG starts with "/9j/", so "contains a slash" cannot tell paths from data.)
fn image_from_str(s: &str, ctx: &RowCtx) -> Result<ImageSource, String> {
    if s.starts_with("data:") {
        return decode_base64(s)
            .map(ImageSource::Bytes)
            .ok_or_else(|| "image data: URL is not valid base64".into());
    }
    if s.len() >= 16 {
        if let Some(b) = decode_base64(s).filter(|b| is_image_magic(b)) {
            return Ok(ImageSource::Bytes(b));
        }
    }
    if s.trim().is_empty() {
        return Err("empty image path".into());
    }
    let p = Path::new(s);
    let full = if p.is_absolute() {
        p.to_path_buf()
    } else {
        ctx.image_root.join(p)
    };
    if ctx.check_image_files && !full.is_file() {
        return Err(format!("image file not found: {}", full.display()));
    }
    Ok(ImageSource::Path(full))
}

fn image_from_value(v: &Value, ctx: &RowCtx) -> Result<Option<ImageSource>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => image_from_str(s, ctx).map(Some),
        Value::Object(o) => {
            // HF datasets Image feature exported to JSON: {"bytes": base64 | [u8], "path": str | null}.
            match o.get("bytes") {
                Some(Value::String(s)) => {
                    return decode_base64(s)
                        .map(|b| Some(ImageSource::Bytes(b)))
                        .ok_or_else(|| "image.bytes is not valid base64".into())
                }
                Some(Value::Array(a)) => {
                    let bytes: Option<Vec<u8>> = a
                        .iter()
                        .map(|x| x.as_u64().and_then(|n| u8::try_from(n).ok()))
                        .collect();
                    return bytes
                        .map(|b| Some(ImageSource::Bytes(b)))
                        .ok_or_else(|| "image.bytes has non-byte values".into());
                }
                Some(Value::Null) | None => {}
                Some(other) => {
                    return Err(format!(
                        "image.bytes must be base64 or a byte array, got {other}"
                    ))
                }
            }
            match o.get("path") {
                Some(Value::String(s)) => image_from_str(s, ctx).map(Some),
                _ => Err("image object has neither bytes nor path".into()),
            }
        }
        other => Err(format!(
            "image must be a string or {{bytes, path}}, got {}",
            type_name(other)
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `images` (list) or `image` (single or list).
fn images_of(o: &Map<String, Value>, ctx: &RowCtx) -> Result<Vec<ImageSource>, String> {
    let field = o.get("images").or_else(|| o.get("image"));
    let mut out = Vec::new();
    match field {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            for (k, v) in a.iter().enumerate() {
                match image_from_value(v, ctx).map_err(|e| format!("image {}: {e}", k + 1))? {
                    Some(img) => out.push(img),
                    None => return Err(format!("image {} is null", k + 1)),
                }
            }
        }
        Some(v) => out.extend(image_from_value(v, ctx)?),
    }
    Ok(out)
}

fn map_role(r: &str) -> Result<&'static str, String> {
    match r {
        "system" => Ok("system"),
        "user" | "human" => Ok("user"),
        "assistant" | "gpt" => Ok("assistant"),
        other => Err(format!(
            "unsupported role {other:?} (expected system, user/human or assistant/gpt)"
        )),
    }
}

fn turns(
    list: &Value,
    role_key: &str,
    content_key: &str,
    field: &str,
) -> Result<Vec<Message>, String> {
    let arr = list
        .as_array()
        .ok_or_else(|| format!("`{field}` must be an array"))?;
    if arr.is_empty() {
        return Err(format!("`{field}` is empty"));
    }
    arr.iter()
        .enumerate()
        .map(|(k, t)| {
            let role = t
                .get(role_key)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{field}[{k}] has no string `{role_key}`"))?;
            let content = t
                .get(content_key)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{field}[{k}] has no string `{content_key}`"))?;
            Ok(Message {
                role: map_role(role)
                    .map_err(|e| format!("{field}[{k}]: {e}"))?
                    .into(),
                content: content.into(),
            })
        })
        .collect()
}

fn string_field(o: &Map<String, Value>, keys: &[&'static str]) -> Option<(&'static str, String)> {
    keys.iter().find_map(|k| {
        o.get(*k).and_then(|v| match v {
            Value::String(s) => Some((*k, s.clone())),
            Value::Number(n) => Some((*k, n.to_string())),
            _ => None,
        })
    })
}

const QUESTION_KEYS: &[&str] = &["problem", "question", "prompt"];
const ANSWER_KEYS: &[&str] = &["solution", "answer", "ground_truth"];

/// Convert one JSON row. `default_id` is used when the row has no `id`.
pub fn parse_row(v: &Value, ctx: &RowCtx, default_id: &str) -> Result<Sample, String> {
    let o = v
        .as_object()
        .ok_or_else(|| format!("row must be a JSON object, got {}", type_name(v)))?;
    let format = match ctx.format {
        RowFormat::Auto if o.contains_key("messages") => RowFormat::Sharegpt,
        RowFormat::Auto if o.contains_key("conversations") => RowFormat::R1Onevision,
        RowFormat::Auto if QUESTION_KEYS.iter().any(|k| o.contains_key(*k)) => RowFormat::Grpo,
        RowFormat::Auto => {
            return Err("cannot tell the row format: expected `messages`, `conversations` or a question field (problem/question/prompt)".into())
        }
        f => f,
    };
    let mut images = images_of(o, ctx)?;
    let (mut messages, lenient, used): (Vec<Message>, bool, Vec<&str>) = match format {
        RowFormat::Sharegpt => {
            let m = o.get("messages").ok_or("missing `messages`")?;
            (
                turns(m, "role", "content", "messages")?,
                false,
                vec!["messages"],
            )
        }
        RowFormat::R1Onevision => {
            let c = o.get("conversations").ok_or("missing `conversations`")?;
            (
                turns(c, "from", "value", "conversations")?,
                true,
                vec!["conversations"],
            )
        }
        RowFormat::Grpo => {
            let (k, q) = string_field(o, QUESTION_KEYS)
                .ok_or("missing question (problem/question/prompt)")?;
            (
                vec![Message {
                    role: "user".into(),
                    content: q,
                }],
                true,
                vec![k],
            )
        }
        RowFormat::Auto => unreachable!("resolved above"),
    };
    if let Some(Value::String(sys)) = o.get("system") {
        if messages.first().is_none_or(|m| m.role != "system") {
            messages.insert(
                0,
                Message {
                    role: "system".into(),
                    content: sys.clone(),
                },
            );
        }
    }
    if !messages.iter().any(|m| m.role == "user") {
        return Err("no user turn".into());
    }
    let placeholders: usize = messages
        .iter()
        .map(|m| m.content.matches(IMAGE_PLACEHOLDER).count())
        .sum();
    if placeholders != images.len() {
        if lenient && placeholders == 0 {
            let first_user = messages
                .iter_mut()
                .find(|m| m.role == "user")
                .expect("checked above");
            first_user.content = format!(
                "{}{}",
                IMAGE_PLACEHOLDER.repeat(images.len()) + "\n",
                first_user.content
            );
        } else {
            return Err(format!(
                "{} `<image>` placeholder(s) but {} image(s); they must match one to one",
                placeholders,
                images.len()
            ));
        }
    }
    let answer = string_field(o, ANSWER_KEYS);
    let id = match o.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => default_id.to_string(),
    };
    let mut meta = Map::new();
    for (k, v) in o {
        let consumed = ["id", "images", "image", "system"].contains(&k.as_str())
            || used.contains(&k.as_str())
            || answer.as_ref().is_some_and(|(ak, _)| ak == k);
        if !consumed {
            meta.insert(k.clone(), v.clone());
        }
    }
    images.shrink_to_fit();
    Ok(Sample {
        id,
        messages,
        images,
        answer: answer.map(|(_, a)| a),
        meta: Value::Object(meta),
    })
}
