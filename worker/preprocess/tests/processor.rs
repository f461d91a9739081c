//! Processor parity with transformers' `Qwen2_5_VLProcessor` on the committed fixtures
//! (tests/reference): input ids exactly, pixel values to 1e-6, grids, decode, template text.

mod common;

use std::path::{Path, PathBuf};

use common::{fixtures, max_abs_diff, read_json, read_npy};
use onevision_preprocess::{load_image, Content, Message, Part, PreprocessError, Processor};

const CHECKPOINTS: &[&str] = &["tiny-tied-f32", "tiny-untied-bf16"];

fn model_dir(ckpt: &str) -> PathBuf {
    fixtures().join(ckpt).join("model")
}

struct Case {
    name: String,
    prompt: String,
    images: Vec<PathBuf>,
}

fn cases(ckpt: &str) -> Vec<Case> {
    let root = fixtures().join(ckpt);
    let v = read_json(&root.join("cases.json"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_owned(),
            prompt: c["prompt"].as_str().unwrap().to_owned(),
            images: c["images"].as_array().unwrap().iter().map(|p| root.join(p.as_str().unwrap())).collect(),
        })
        .collect()
}

fn as_i64(ids: &[u32]) -> Vec<i64> {
    ids.iter().map(|&x| i64::from(x)).collect()
}

/// Every case of every checkpoint: ids identical, grids identical, pixel values within 1e-6
/// (our resampler is PIL's fixed-point algorithm, so resized images match too; see images.rs).
#[test]
fn encode_chat_matches_transformers_on_every_fixture_case() {
    let mut n = 0;
    for ckpt in CHECKPOINTS {
        let p = Processor::from_dir(model_dir(ckpt)).unwrap();
        for case in cases(ckpt) {
            let dir = fixtures().join(ckpt).join(&case.name);
            let images: Vec<_> = case.images.iter().map(|path| load_image(path).unwrap()).collect();
            let msg = Message::user_with_images(images.len(), case.prompt.clone());
            let enc = p.encode_chat(&[msg], &images).unwrap();

            let want_ids = read_npy(&dir.join("input_ids.npy")).i64();
            assert_eq!(as_i64(&enc.input_ids), want_ids, "{ckpt}/{}: input_ids", case.name);

            let want_grid = read_npy(&dir.join("image_grid_thw.npy"));
            let grid: Vec<i64> = enc.image_grid_thw.iter().flatten().map(|&x| x as i64).collect();
            assert_eq!(grid, want_grid.i64(), "{ckpt}/{}: image_grid_thw", case.name);
            assert_eq!(want_grid.shape[0], images.len());

            let pv_path = dir.join("pixel_values.npy");
            if images.is_empty() {
                assert!(!pv_path.exists());
                assert!(enc.pixel_values.is_empty());
            } else {
                let want = read_npy(&pv_path);
                assert_eq!(want.shape, vec![enc.num_patches(), enc.patch_dim], "{ckpt}/{}", case.name);
                let d = max_abs_diff(&enc.pixel_values, &want.f32());
                assert!(d <= 1e-6, "{ckpt}/{}: pixel values differ by {d}", case.name);
            }

            let greedy = read_json(&dir.join("greedy.json"));
            let prompt_ids: Vec<i64> =
                greedy["prompt_token_ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            assert_eq!(prompt_ids, want_ids, "{ckpt}/{}: greedy.json prompt ids", case.name);
            n += 1;
        }
    }
    assert_eq!(n, 8, "expected 4 cases per checkpoint");
}

/// Decoding greedy tokens reproduces transformers' `tokenizer.decode` with and without
/// special tokens (includes a padded-vocab id that decodes to nothing and <|im_start|>).
#[test]
fn decode_matches_transformers() {
    for ckpt in CHECKPOINTS {
        let p = Processor::from_dir(model_dir(ckpt)).unwrap();
        for case in cases(ckpt) {
            let g = read_json(&fixtures().join(ckpt).join(&case.name).join("greedy.json"));
            let ids: Vec<u32> = g["token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            assert_eq!(p.decode(&ids, true).unwrap(), g["text"].as_str().unwrap(), "{ckpt}/{}", case.name);
            assert_eq!(
                p.decode(&ids, false).unwrap(),
                g["text_with_special"].as_str().unwrap(),
                "{ckpt}/{}",
                case.name
            );
        }
    }
}

#[test]
fn special_token_ids_are_read_from_the_checkpoint() {
    let p = Processor::from_dir(model_dir("tiny-tied-f32")).unwrap();
    let cfg = read_json(&model_dir("tiny-tied-f32").join("config.json"));
    let s = p.special_tokens();
    assert_eq!(u64::from(s.image_token_id), cfg["image_token_id"].as_u64().unwrap());
    assert_eq!(s.vision_start_token_id.map(u64::from), cfg["vision_start_token_id"].as_u64());
    assert_eq!(s.vision_end_token_id.map(u64::from), cfg["vision_end_token_id"].as_u64());
    assert_eq!(s.video_token_id.map(u64::from), cfg["video_token_id"].as_u64());
    assert_eq!(s.image_token, "<|image_pad|>");
    // generation_config.json: [<|im_end|>, <|endoftext|>]; not Qwen's 151645/151643
    let tok = p.tokenizer();
    assert_eq!(s.eos_token_ids, vec![tok.token_to_id("<|im_end|>").unwrap(), tok.token_to_id("<|endoftext|>").unwrap()]);
    assert_eq!(s.pad_token_id, tok.token_to_id("<|endoftext|>"));
    assert!(s.image_token_id < 1000);
}

#[test]
fn template_renders_qwen_format_with_default_system_turn() {
    let p = Processor::from_dir(model_dir("tiny-untied-bf16")).unwrap();
    let text = p.render_chat(&[Message::user_with_images(2, "Compare.")], true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
         <|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>\
         Compare.<|im_end|>\n<|im_start|>assistant\n"
    );
    // an explicit system turn replaces the default; string content; multi-turn; no gen prompt
    let msgs = [
        Message::text("system", "Be brief."),
        Message::text("user", "Hi"),
        Message::text("assistant", "Hello"),
        Message::new("user", Content::Parts(vec![Part::Text { text: "Again".into() }])),
    ];
    assert_eq!(
        p.render_chat(&msgs, false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n"
    );
}

#[test]
fn image_count_mismatch_is_a_typed_error() {
    let p = Processor::from_dir(model_dir("tiny-tied-f32")).unwrap();
    let img = load_image(fixtures().join("images/a_h56_w84.png")).unwrap();
    // one image item, no image
    let err = p.encode_chat(&[Message::user_with_images(1, "x")], &[]).unwrap_err();
    assert!(matches!(err, PreprocessError::ImageCountMismatch { placeholders: 1, images: 0, .. }), "{err:?}");
    // an image but no image item
    let err = p.encode_chat(&[Message::user_with_images(0, "x")], std::slice::from_ref(&img)).unwrap_err();
    assert!(matches!(err, PreprocessError::ImageCountMismatch { placeholders: 0, images: 1, .. }), "{err:?}");
    // a literal <|image_pad|> typed into the text makes one placeholder too many
    let err = p.encode_chat(&[Message::user_with_images(1, "look: <|image_pad|>")], std::slice::from_ref(&img)).unwrap_err();
    assert!(matches!(err, PreprocessError::ImageCountMismatch { placeholders: 2, images: 1, .. }), "{err:?}");
    assert!(err.to_string().contains("<|image_pad|>"), "{err}");
    // pre-rendered text path
    let processed = p.process_image(&img).unwrap();
    let err = p.encode_text("no placeholder", &[processed]).unwrap_err();
    assert!(matches!(err, PreprocessError::ImageCountMismatch { .. }));
}

#[test]
fn encode_text_expands_each_placeholder_to_its_image_tokens() {
    let p = Processor::from_dir(model_dir("tiny-tied-f32")).unwrap();
    let a = p.process_image(&load_image(fixtures().join("images/a_h56_w84.png")).unwrap()).unwrap();
    let d = p.process_image(&load_image(fixtures().join("images/d_h150_w200.png")).unwrap()).unwrap();
    assert_eq!((a.grid_thw, d.grid_thw), ([1, 4, 6], [1, 6, 8]));
    let enc = p.encode_text("x<|image_pad|>y<|image_pad|>z", &[a, d]).unwrap();
    let pad = p.special_tokens().image_token_id;
    let runs: Vec<usize> = enc
        .input_ids
        .split(|&id| id != pad)
        .filter(|r| !r.is_empty())
        .map(<[u32]>::len)
        .collect();
    assert_eq!(runs, vec![6, 12]);
    assert_eq!(enc.num_patches(), 24 + 48);
}

fn copy_model(src: &Path, dst: &Path, skip: &[&str]) {
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if !skip.contains(&name.as_str()) {
            std::fs::copy(entry.path(), dst.join(&name)).unwrap();
        }
    }
}

#[test]
fn missing_or_broken_files_are_typed_errors() {
    let src = model_dir("tiny-tied-f32");

    let tmp = tempfile::tempdir().unwrap();
    copy_model(&src, tmp.path(), &["chat_template.json"]);
    // tokenizer_config.json still carries the template
    assert!(Processor::from_dir(tmp.path()).is_ok());
    let cfg_path = tmp.path().join("tokenizer_config.json");
    let mut cfg = read_json(&cfg_path);
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = Processor::from_dir(tmp.path()).unwrap_err();
    assert!(matches!(err, PreprocessError::MissingChatTemplate { .. }), "{err:?}");

    let tmp = tempfile::tempdir().unwrap();
    copy_model(&src, tmp.path(), &["tokenizer.json"]);
    assert!(matches!(Processor::from_dir(tmp.path()).unwrap_err(), PreprocessError::Tokenizer { .. }));
    std::fs::write(tmp.path().join("tokenizer.json"), "{not json").unwrap();
    assert!(matches!(Processor::from_dir(tmp.path()).unwrap_err(), PreprocessError::Tokenizer { .. }));

    let tmp = tempfile::tempdir().unwrap();
    copy_model(&src, tmp.path(), &[]);
    std::fs::write(tmp.path().join("preprocessor_config.json"), r#"{"min_pixels": "many"}"#).unwrap();
    let err = Processor::from_dir(tmp.path()).unwrap_err();
    assert!(matches!(err, PreprocessError::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("min_pixels"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    copy_model(&src, tmp.path(), &[]);
    std::fs::write(tmp.path().join("chat_template.json"), r#"{"chat_template": "{% if %}"}"#).unwrap();
    assert!(matches!(Processor::from_dir(tmp.path()).unwrap_err(), PreprocessError::Template(_)));

    let tmp = tempfile::tempdir().unwrap();
    copy_model(&src, tmp.path(), &[]);
    std::fs::write(tmp.path().join("config.json"), r#"{"image_token_id": 99999}"#).unwrap();
    assert!(matches!(Processor::from_dir(tmp.path()).unwrap_err(), PreprocessError::UnknownToken { id: 99999, .. }));
}
