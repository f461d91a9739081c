//! Shared access to the transformers fixtures (tests/reference/fixtures) for the training tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// `tests/reference/fixtures/<ckpt>` (e.g. `tiny-tied-f32`).
pub fn fixture(ckpt: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/fixtures").join(ckpt)
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

/// One `grad_cases.json` case as an SFT row: images (absolute paths) before the text in one user
/// turn, as the generator renders it, then the assistant's answer.
pub fn sft_row(ckpt_dir: &Path, case: &Value) -> Value {
    let images: Vec<String> = case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ckpt_dir.join(p.as_str().unwrap()).canonicalize().unwrap().display().to_string())
        .collect();
    let user = format!("{}{}", "<image>".repeat(images.len()), case["prompt"].as_str().unwrap());
    serde_json::json!({
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": case["answer"]}],
        "images": images,
    })
}

/// Every tensor of an f32 safetensors file, by name.
pub fn read_f32_tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}: expected f32");
            let v = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (name, v)
        })
        .collect()
}
