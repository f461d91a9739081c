//! Config parsing (real 3B/7B configs, nested layout) and checkpoint loading (single file,
//! sharded, both naming schemes, F32/BF16/F16) with the error cases.
mod common;
use common::*;
use half::{bf16, f16};
use onevision_model::{save_safetensors, Checkpoint, CpuBackend, DType, ModelError, PromptInput, Qwen25Vl, Qwen25VlConfig, Tensor};
use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

fn data(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)).unwrap()
}

#[test]
fn real_7b_config_gives_729_tensors() {
    let c = Qwen25VlConfig::from_json_str(&data("qwen2_5_vl_7b_config.json"), Some(&data("qwen2_5_vl_generation_config.json")), "7b").unwrap();
    assert_eq!((c.text.hidden_size, c.text.num_hidden_layers, c.text.num_attention_heads, c.text.num_key_value_heads), (3584, 28, 28, 4));
    assert_eq!((c.text.head_dim, c.text.intermediate_size, c.text.vocab_size), (128, 18944, 152064));
    assert!(!c.text.tie_word_embeddings);
    assert_eq!(c.text.mrope_section, vec![16, 24, 24]);
    assert_eq!(c.vision.head_dim(), 80);
    assert_eq!(c.vision.window_merged(), 4);
    assert_eq!(c.eos_token_ids, vec![151645, 151643], "generation_config overrides config eos");
    assert_eq!((c.image_token_id, c.vision_start_token_id), (151655, 151652));
    let t = c.expected_tensors();
    assert_eq!(t.len(), 729);
    let find = |n: &str| t.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone()).unwrap();
    assert_eq!(find("visual.patch_embed.proj.weight"), vec![1280, 3, 2, 14, 14]);
    assert_eq!(find("visual.blocks.31.attn.qkv.weight"), vec![3840, 1280]);
    assert_eq!(find("visual.merger.mlp.0.weight"), vec![5120, 5120]);
    assert_eq!(find("visual.merger.mlp.2.weight"), vec![3584, 5120]);
    assert_eq!(find("model.layers.27.self_attn.k_proj.weight"), vec![512, 3584]);
    assert_eq!(find("lm_head.weight"), vec![152064, 3584]);
    let params: usize = t.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    // Published size of Qwen2.5-VL-7B-Instruct: 8.29 B parameters.
    assert_eq!(params / 10_000_000, 829, "{params}");
}

#[test]
fn real_3b_config_is_tied() {
    let c = Qwen25VlConfig::from_json_str(&data("qwen2_5_vl_3b_config.json"), None, "3b").unwrap();
    assert!(c.text.tie_word_embeddings);
    assert_eq!(c.eos_token_ids, vec![151645]);
    let t = c.expected_tensors();
    // 390 vision + 2 + 36·12 text, no lm_head.
    assert_eq!(t.len(), 390 + 2 + 36 * 12);
    assert!(!t.iter().any(|(n, _)| n == "lm_head.weight"));
    let params: usize = t.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    // Published size of Qwen2.5-VL-3B-Instruct: 3.75 B parameters.
    assert_eq!(params / 10_000_000, 375, "{params}");
}

#[test]
fn nested_layout_parses_like_flat() {
    let flat = Qwen25VlConfig::from_json_str(&data("qwen2_5_vl_7b_config.json"), None, "flat").unwrap();
    let nested = Qwen25VlConfig::from_json_str(&data("qwen2_5_vl_7b_config_nested.json"), None, "nested").unwrap();
    assert_eq!(flat, nested);
    assert_eq!(nested.expected_tensors().len(), 729);
}

#[test]
fn bad_configs_are_clear_errors() {
    let e = Qwen25VlConfig::from_json_str("{", None, "x.json").unwrap_err();
    assert!(e.to_string().contains("x.json"), "{e}");
    let no_rope = tiny_config_json(true, 64).replace("\"rope_scaling\"", "\"unused\"");
    let e = Qwen25VlConfig::from_json_str(&no_rope, None, "x.json").unwrap_err();
    assert!(e.to_string().contains("mrope_section"), "{e}");
    let no_img = tiny_config_json(true, 64).replace("\"image_token_id\"", "\"other\"");
    let e = Qwen25VlConfig::from_json_str(&no_img, None, "x.json").unwrap_err();
    assert!(e.to_string().contains("image_token_id"), "{e}");
}

fn write_dir(dir: &Path, cfg_json: &str, tensors: &[(String, Tensor)]) {
    std::fs::write(dir.join("config.json"), cfg_json).unwrap();
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    save_safetensors(dir.join("model.safetensors"), &refs).unwrap();
}

fn text_prompt() -> PromptInput {
    PromptInput { input_ids: vec![1, 5, 9, 33, 7, 12], ..Default::default() }
}

#[test]
fn single_file_f32_roundtrip_equals_in_memory_model() {
    let cfg = tiny_config(false, 64);
    let w = tiny_weights(&cfg, 1);
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &tiny_config_json(false, 64), &w.clone().into_iter().collect::<Vec<_>>());
    let a = Qwen25Vl::from_weights(cfg, w, Arc::new(CpuBackend)).unwrap().forward_logits(&text_prompt()).unwrap();
    let b = Qwen25Vl::load(dir.path(), Arc::new(CpuBackend), DType::F32).unwrap().forward_logits(&text_prompt()).unwrap();
    assert_eq!(a.as_f32().unwrap(), b.as_f32().unwrap());
}

/// bf16 values survive F32 storage, BF16 storage and F16 files exactly when they are
/// representable in all three (small integers / 8): every route must give identical logits.
#[test]
fn sharded_new_names_bf16_and_f16_load_identically() {
    let cfg = tiny_config(true, 64);
    let w: Vec<(String, Tensor)> = tiny_weights(&cfg, 2)
        .into_iter()
        .map(|(n, t)| {
            let v = t.as_f32().unwrap().iter().map(|x| (x * 8.0).round() / 8.0).collect();
            (n, Tensor::from_f32(t.shape(), v).unwrap())
        })
        .collect();
    let reference = Qwen25Vl::from_weights(cfg.clone(), w.iter().cloned().collect(), Arc::new(CpuBackend)).unwrap().forward_logits(&text_prompt()).unwrap();

    // Sharded BF16 with transformers ≥ 4.52 names.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), tiny_config_json(true, 64)).unwrap();
    let renamed: Vec<(String, Tensor)> = w
        .iter()
        .map(|(n, t)| {
            let n = if let Some(r) = n.strip_prefix("visual.") { format!("model.visual.{r}") } else { n.replacen("model.", "model.language_model.", 1) };
            (n, t.to_dtype(DType::BF16).unwrap())
        })
        .collect();
    let (a, b) = renamed.split_at(renamed.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let f = format!("model-0000{}-of-00002.safetensors", i + 1);
        let refs: Vec<(String, &Tensor)> = part.iter().map(|(n, t)| (n.clone(), t)).collect();
        save_safetensors(dir.path().join(&f), &refs).unwrap();
        for (n, _) in part.iter() {
            map.insert(n.clone(), serde_json::Value::String(f.clone()));
        }
    }
    std::fs::write(dir.path().join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let m = Qwen25Vl::load(dir.path(), Arc::new(CpuBackend), dtype).unwrap();
        assert_eq!(m.text.embed.dtype(), dtype);
        assert_eq!(m.forward_logits(&text_prompt()).unwrap().as_f32().unwrap(), reference.as_f32().unwrap(), "sharded {dtype:?}");
    }

    // Single F16 file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), tiny_config_json(true, 64)).unwrap();
    let f16s: Vec<(String, Vec<u8>, Vec<usize>)> = w
        .iter()
        .map(|(n, t)| (n.clone(), t.as_f32().unwrap().iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(), t.shape().to_vec()))
        .collect();
    write_raw(&dir.path().join("model.safetensors"), &f16s, safetensors::Dtype::F16);
    let m = Qwen25Vl::load(dir.path(), Arc::new(CpuBackend), DType::F32).unwrap();
    assert_eq!(m.forward_logits(&text_prompt()).unwrap().as_f32().unwrap(), reference.as_f32().unwrap(), "f16 file");
    let _ = bf16::ONE;
}

struct Raw<'a>(safetensors::Dtype, &'a [usize], &'a [u8]);
impl safetensors::View for Raw<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.0
    }
    fn shape(&self) -> &[usize] {
        self.1
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.2)
    }
    fn data_len(&self) -> usize {
        self.2.len()
    }
}

fn write_raw(path: &Path, t: &[(String, Vec<u8>, Vec<usize>)], dtype: safetensors::Dtype) {
    let views: Vec<(String, Raw)> = t.iter().map(|(n, b, s)| (n.clone(), Raw(dtype, s, b))).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn missing_misshaped_and_bad_dtype_tensors_are_named() {
    let cfg = tiny_config(true, 64);
    let w = tiny_weights(&cfg, 3);
    // Missing.
    let dir = tempfile::tempdir().unwrap();
    let mut v: Vec<(String, Tensor)> = w.clone().into_iter().collect();
    v.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight");
    write_dir(dir.path(), &tiny_config_json(true, 64), &v);
    let e = Qwen25Vl::load(dir.path(), Arc::new(CpuBackend), DType::F32).err().unwrap();
    assert!(matches!(&e, ModelError::MissingTensor { name, expected, .. } if name == "model.layers.1.mlp.up_proj.weight" && expected == &vec![48, 32]), "{e}");
    assert!(e.to_string().contains("model.layers.1.mlp.up_proj.weight"));
    // Mis-shaped: message names the tensor and both shapes.
    let dir = tempfile::tempdir().unwrap();
    let mut v: Vec<(String, Tensor)> = w.clone().into_iter().collect();
    for (n, t) in v.iter_mut() {
        if n == "visual.merger.mlp.0.bias" {
            *t = Tensor::zeros(&[63]);
        }
    }
    write_dir(dir.path(), &tiny_config_json(true, 64), &v);
    let msg = Qwen25Vl::load(dir.path(), Arc::new(CpuBackend), DType::F32).err().unwrap().to_string();
    assert!(msg.contains("visual.merger.mlp.0.bias") && msg.contains("[63]") && msg.contains("[64]"), "{msg}");
    // Unsupported dtype (I32) is reported with the tensor name.
    let dir = tempfile::tempdir().unwrap();
    let raw: Vec<(String, Vec<u8>, Vec<usize>)> = w
        .iter()
        .map(|(n, t)| (n.clone(), t.as_f32().unwrap().iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(), t.shape().to_vec()))
        .collect();
    std::fs::write(dir.path().join("config.json"), tiny_config_json(true, 64)).unwrap();
    write_raw(&dir.path().join("model.safetensors"), &raw, safetensors::Dtype::I32);
    let e = Qwen25Vl::load(dir.path(), Arc::new(CpuBackend), DType::F32).err().unwrap();
    assert!(matches!(&e, ModelError::UnsupportedDType { dtype, .. } if dtype == "I32"), "{e}");
    // An unknown dtype string in the header is a clear safetensors error, not a panic.
    let dir = tempfile::tempdir().unwrap();
    let header = br#"{"x":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 4]);
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    let e = Checkpoint::open(dir.path()).err().unwrap();
    assert!(matches!(e, ModelError::Safetensors { .. }), "{e}");
    // No checkpoint at all.
    let dir = tempfile::tempdir().unwrap();
    let e = Checkpoint::open(dir.path()).err().unwrap();
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}
