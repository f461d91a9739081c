//! `model init`: tensors derived independently from config.json, tokenizer behaviour, chat
//! template rendering, side files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use onevision_synth::init::WeightDtype;
use onevision_synth::synth::{parse_difficulty, parse_families, SynthOptions};
use onevision_synth::{init_model, synth, InitOptions};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// A synthesized dataset to train the tokenizer on.
fn corpus(dir: &Path) -> PathBuf {
    synth(&SynthOptions {
        out: dir.to_path_buf(),
        train: 120,
        heldout: 30,
        seed: 1,
        families: parse_families("color,shape,count,position,bar,clock,geometry").unwrap(),
        difficulty: parse_difficulty("1-3").unwrap(),
        image_size: 56,
    })
    .unwrap();
    dir.join("train.jsonl")
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn u(v: &Value) -> usize {
    v.as_u64().unwrap() as usize
}

/// The expected tensor names and shapes, written out from the config's numbers alone.
fn expected_from_config(cfg: &Value) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    let vc = &cfg["vision_config"];
    let (vh, vi, depth) = (u(&vc["hidden_size"]), u(&vc["intermediate_size"]), u(&vc["depth"]));
    let (p, tp, merge, inch) = (u(&vc["patch_size"]), u(&vc["temporal_patch_size"]), u(&vc["spatial_merge_size"]), u(&vc["in_chans"]));
    let h = u(&cfg["hidden_size"]);
    assert_eq!(u(&vc["out_hidden_size"]), h);
    m.insert("visual.patch_embed.proj.weight".into(), vec![vh, inch, tp, p, p]);
    for b in 0..depth {
        for (n, s) in [
            ("norm1.weight", vec![vh]),
            ("norm2.weight", vec![vh]),
            ("attn.qkv.weight", vec![3 * vh, vh]),
            ("attn.qkv.bias", vec![3 * vh]),
            ("attn.proj.weight", vec![vh, vh]),
            ("attn.proj.bias", vec![vh]),
            ("mlp.gate_proj.weight", vec![vi, vh]),
            ("mlp.gate_proj.bias", vec![vi]),
            ("mlp.up_proj.weight", vec![vi, vh]),
            ("mlp.up_proj.bias", vec![vi]),
            ("mlp.down_proj.weight", vec![vh, vi]),
            ("mlp.down_proj.bias", vec![vh]),
        ] {
            m.insert(format!("visual.blocks.{b}.{n}"), s);
        }
    }
    let mm = vh * merge * merge;
    m.insert("visual.merger.ln_q.weight".into(), vec![vh]);
    m.insert("visual.merger.mlp.0.weight".into(), vec![mm, mm]);
    m.insert("visual.merger.mlp.0.bias".into(), vec![mm]);
    m.insert("visual.merger.mlp.2.weight".into(), vec![h, mm]);
    m.insert("visual.merger.mlp.2.bias".into(), vec![h]);
    let (v, heads, kvh, inter) = (
        u(&cfg["vocab_size"]),
        u(&cfg["num_attention_heads"]),
        u(&cfg["num_key_value_heads"]),
        u(&cfg["intermediate_size"]),
    );
    let hd = h / heads;
    m.insert("model.embed_tokens.weight".into(), vec![v, h]);
    m.insert("model.norm.weight".into(), vec![h]);
    for l in 0..u(&cfg["num_hidden_layers"]) {
        for (n, s) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![heads * hd, h]),
            ("self_attn.q_proj.bias", vec![heads * hd]),
            ("self_attn.k_proj.weight", vec![kvh * hd, h]),
            ("self_attn.k_proj.bias", vec![kvh * hd]),
            ("self_attn.v_proj.weight", vec![kvh * hd, h]),
            ("self_attn.v_proj.bias", vec![kvh * hd]),
            ("self_attn.o_proj.weight", vec![h, heads * hd]),
            ("mlp.gate_proj.weight", vec![inter, h]),
            ("mlp.up_proj.weight", vec![inter, h]),
            ("mlp.down_proj.weight", vec![h, inter]),
        ] {
            m.insert(format!("model.layers.{l}.{n}"), s);
        }
    }
    if !cfg["tie_word_embeddings"].as_bool().unwrap() {
        m.insert("lm_head.weight".into(), vec![v, h]);
    }
    m
}

fn values(t: &safetensors::tensor::TensorView) -> Vec<f32> {
    match t.dtype() {
        Dtype::F32 => t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        Dtype::BF16 => t.data().chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

fn check_checkpoint(dir: &Path, dtype: Dtype) {
    let cfg = json(&dir.join("config.json"));
    assert_eq!(cfg["model_type"], "qwen2_5_vl");
    assert_eq!(cfg["architectures"][0], "Qwen2_5_VLForConditionalGeneration");
    let hd = u(&cfg["hidden_size"]) / u(&cfg["num_attention_heads"]);
    let sec: usize = cfg["rope_scaling"]["mrope_section"].as_array().unwrap().iter().map(u).sum();
    assert_eq!(sec, hd / 2);
    assert_eq!(cfg["rope_scaling"]["type"], "mrope");
    let vc = &cfg["vision_config"];
    assert_eq!(u(&vc["patch_size"]), 14);
    assert_eq!(u(&vc["spatial_merge_size"]), 2);
    for i in vc["fullatt_block_indexes"].as_array().unwrap() {
        assert!(u(i) < u(&vc["depth"]));
    }

    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let got: BTreeMap<String, Vec<usize>> = st.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
    assert_eq!(got, expected_from_config(&cfg));
    let range = cfg["initializer_range"].as_f64().unwrap();
    for (name, t) in st.tensors() {
        assert_eq!(t.dtype(), dtype, "{name}");
        let v = values(&t);
        if name.ends_with("norm.weight") || name.contains("norm1") || name.contains("norm2") || name.contains("ln_q") {
            assert!(v.iter().all(|&x| x == 1.0), "{name}: RMSNorm weights start at 1");
        } else if name.ends_with(".bias") {
            assert!(v.iter().all(|&x| x == 0.0), "{name}: biases start at 0");
        } else {
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            let tol = 5.0 * range / n.sqrt() + 0.01 * range;
            assert!(mean.abs() < tol, "{name}: mean {mean}");
            assert!((std / range - 1.0).abs() < 0.1 + 3.0 / n.sqrt(), "{name}: std {std}");
        }
    }

    // Token ids in the config are the tokenizer's ids for those tokens.
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for (key, t) in [
        ("bos_token_id", "<|endoftext|>"),
        ("eos_token_id", "<|im_end|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
        ("vision_token_id", "<|vision_pad|>"),
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
    ] {
        assert_eq!(tok.token_to_id(t), Some(u(&cfg[key]) as u32), "{key}");
    }
    assert!(tok.get_vocab_size(true) <= u(&cfg["vocab_size"]));
    let gen = json(&dir.join("generation_config.json"));
    assert!(gen["eos_token_id"].as_array().unwrap().contains(&cfg["eos_token_id"]));
    let pp = json(&dir.join("preprocessor_config.json"));
    assert_eq!(pp["image_processor_type"], "Qwen2VLImageProcessor");
    assert_eq!(u(&pp["patch_size"]), 14);
    assert_eq!(u(&pp["temporal_patch_size"]), 2);
    assert_eq!(u(&pp["merge_size"]), 2);
    assert!(u(&pp["min_pixels"]) <= u(&pp["max_pixels"]));
}

#[test]
fn init_writes_every_tensor_with_config_shapes_f32_tied() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let report = init_model(&InitOptions {
        out: out.path().to_path_buf(),
        tokenizer_corpus: vec![corpus(data.path())],
        ..Default::default()
    })
    .unwrap();
    check_checkpoint(out.path(), Dtype::F32);
    let cfg = json(&out.path().join("config.json"));
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(u(&cfg["vocab_size"]), report.model_vocab);
    assert_eq!(report.model_vocab % 64, 0);
    assert!(report.tokenizer_vocab <= 1024 && report.tokenizer_vocab > 300, "{}", report.tokenizer_vocab);
}

#[test]
fn init_untied_bf16_with_custom_shape() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    init_model(&InitOptions {
        out: out.path().to_path_buf(),
        tokenizer_corpus: vec![corpus(data.path())],
        vocab_size: 600,
        hidden_size: 256,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 1,
        vision_hidden_size: 128,
        vision_depth: 4,
        vision_num_heads: 4,
        fullatt_block_indexes: Some(vec![1, 3]),
        tie_word_embeddings: false,
        dtype: WeightDtype::Bf16,
        ..Default::default()
    })
    .unwrap();
    check_checkpoint(out.path(), Dtype::BF16);
    let cfg = json(&out.path().join("config.json"));
    assert_eq!(cfg["rope_scaling"]["mrope_section"], serde_json::json!([8, 12, 12]));
    assert_eq!(cfg["vision_config"]["fullatt_block_indexes"], serde_json::json!([1, 3]));
}

#[test]
fn tokenizer_round_trips_task_text_and_keeps_special_tokens_whole() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let train = corpus(data.path());
    init_model(&InitOptions {
        out: out.path().to_path_buf(),
        tokenizer_corpus: vec![train.clone()],
        ..Default::default()
    })
    .unwrap();
    let tok = tokenizers::Tokenizer::from_file(out.path().join("tokenizer.json")).unwrap();
    let held = std::fs::read_to_string(data.path().join("heldout.jsonl")).unwrap();
    let mut n = 0;
    for line in held.lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        for m in row["messages"].as_array().unwrap() {
            let text = m["content"].as_str().unwrap();
            let enc = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
            // Learned merges compress the task text well below one token per byte.
            assert!(enc.get_ids().len() * 2 < text.len(), "{} tokens for {} bytes", enc.get_ids().len(), text.len());
            n += 1;
        }
    }
    assert_eq!(n, 60);
    // Text never seen in training still round-trips (full byte alphabet, no unk).
    let odd = "Ünïcödé ✓ 12:45 — tabs\tand\r\nnewlines 😀";
    assert_eq!(tok.decode(tok.encode(odd, false).unwrap().get_ids(), false).unwrap(), odd);

    let text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<think>x</think><answer>3</answer><|endoftext|>";
    let enc = tok.encode(text, false).unwrap();
    let toks = enc.get_tokens();
    for special in [
        "<|im_start|>",
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
        "<|im_end|>",
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "<|endoftext|>",
    ] {
        assert!(toks.iter().any(|t| t == special), "{special} must be one token: {toks:?}");
    }
    // Reasoning tags survive skip_special_tokens (the format reward needs them); Qwen's don't.
    let plain = tok.decode(enc.get_ids(), true).unwrap();
    assert!(plain.contains("<think>x</think><answer>3</answer>"), "{plain}");
    assert!(!plain.contains("<|im_start|>"), "{plain}");
}

#[test]
fn chat_template_renders_qwen_prompt_with_one_image() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    init_model(&InitOptions {
        out: out.path().to_path_buf(),
        tokenizer_corpus: vec![corpus(data.path())],
        ..Default::default()
    })
    .unwrap();
    let tc = json(&out.path().join("tokenizer_config.json"));
    let template = tc["chat_template"].as_str().unwrap();
    assert_eq!(json(&out.path().join("chat_template.json"))["chat_template"], template);
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|endoftext|>");
    let mut env = minijinja::Environment::new();
    env.add_template("chat", template).unwrap();
    let messages = serde_json::json!([{"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": "What colour is the shape?"}
    ]}]);
    let rendered = env
        .get_template("chat")
        .unwrap()
        .render(minijinja::context! { messages => minijinja::value::Serde(&messages), add_generation_prompt => true })
        .unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour is the shape?<|im_end|>\n<|im_start|>assistant\n"
    );
    // A string-content assistant turn after a given system prompt: no default system turn.
    let messages = serde_json::json!([
        {"role": "system", "content": "S"},
        {"role": "assistant", "content": "<think>t</think><answer>a</answer>"}
    ]);
    let rendered = env
        .get_template("chat")
        .unwrap()
        .render(minijinja::context! { messages => minijinja::value::Serde(&messages), add_generation_prompt => false })
        .unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>assistant\n<think>t</think><answer>a</answer><|im_end|>\n"
    );
}

#[test]
fn init_is_deterministic_and_seed_changes_weights() {
    let data = tempfile::tempdir().unwrap();
    let train = corpus(data.path());
    let run = |seed: u64| {
        let out = tempfile::tempdir().unwrap();
        init_model(&InitOptions {
            out: out.path().to_path_buf(),
            tokenizer_corpus: vec![train.clone()],
            seed,
            ..Default::default()
        })
        .unwrap();
        let read = |f: &str| std::fs::read(out.path().join(f)).unwrap();
        (read("model.safetensors"), read("tokenizer.json"), read("config.json"))
    };
    let (a, b, c) = (run(3), run(3), run(4));
    assert!(a == b, "same seed and corpus must give identical files");
    assert_ne!(a.0, c.0);
    assert_eq!(a.1, c.1, "the tokenizer depends on the corpus only");
}

#[test]
fn init_errors_are_actionable() {
    let out = tempfile::tempdir().unwrap();
    let e = init_model(&InitOptions {
        out: out.path().to_path_buf(),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("--tokenizer-corpus"), "{e}");
    let e = init_model(&InitOptions {
        out: out.path().to_path_buf(),
        tokenizer_corpus: vec![out.path().join("missing.jsonl")],
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("missing.jsonl"), "{e}");
    let empty = out.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let e = init_model(&InitOptions {
        out: out.path().to_path_buf(),
        tokenizer_corpus: vec![empty],
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("no text"), "{e}");
}
