//! Parity against transformers: fixtures written by tests/reference/generate.py (float32
//! eager attention on CPU, bf16 checkpoints upcast on load; see tests/reference/FORMAT.md).
use onevision_model::npy::Npy;
use onevision_model::rope::{rope_index, RopeIndexIds};
use onevision_model::{generate, CpuBackend, DType, PromptInput, Qwen25Vl, SamplingParams, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/reference/fixtures")
}

/// max|a−b| / max|b|: scale-relative error. Both sides are f32 computations of the same
/// graph; summation-order differences give ~1e-6 of the output scale, so 1e-4 catches any
/// real divergence (a wrong rope axis, mask or permutation moves outputs by O(1)).
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let den = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    num / den.max(1e-30)
}

struct Case {
    name: String,
    dir: PathBuf,
    prompt: PromptInput,
    max_new_tokens: usize,
}

fn load_cases(ckpt: &Path) -> Vec<Case> {
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("cases.json")).unwrap()).unwrap();
    cases
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            let dir = ckpt.join(&name);
            let ids: Vec<u32> = Npy::read(dir.join("input_ids.npy")).unwrap().to_i64().iter().map(|&x| x as u32).collect();
            let g = Npy::read(dir.join("image_grid_thw.npy")).unwrap();
            let gv = g.to_i64();
            let grids: Vec<[usize; 3]> = gv.chunks(3).map(|c| [c[0] as usize, c[1] as usize, c[2] as usize]).collect();
            let pv = dir.join("pixel_values.npy");
            let pixel_values = pv.exists().then(|| {
                let n = Npy::read(&pv).unwrap();
                Tensor::from_f32(&n.shape, n.to_f32()).unwrap()
            });
            Case { name, dir, prompt: PromptInput { input_ids: ids, pixel_values, image_grid_thw: grids }, max_new_tokens: c["max_new_tokens"].as_u64().unwrap() as usize }
        })
        .collect()
}

fn checkpoints() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .expect("tests/reference/fixtures is committed")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("model/config.json").exists())
        .collect();
    v.sort();
    assert!(v.len() >= 2, "expected tied and untied fixtures, found {v:?}");
    v
}

fn greedy_expected(dir: &Path) -> Vec<u32> {
    let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("greedy.json")).unwrap()).unwrap();
    g["token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn positions_vision_logits_and_greedy_match_transformers() {
    let mut checked = 0;
    for ckpt in checkpoints() {
        let model = Qwen25Vl::load(ckpt.join("model"), Arc::new(CpuBackend), DType::F32).unwrap();
        let ids = RopeIndexIds {
            image_token_id: model.config.image_token_id,
            vision_start_token_id: model.config.vision_start_token_id,
            spatial_merge_size: model.config.vision.spatial_merge_size,
        };
        for case in load_cases(&ckpt) {
            let tag = format!("{}/{}", ckpt.file_name().unwrap().to_string_lossy(), case.name);
            let l = case.prompt.input_ids.len();
            // M-RoPE positions: exact.
            let mp = rope_index(&case.prompt.input_ids, &case.prompt.image_grid_thw, &ids).unwrap();
            let want = Npy::read(case.dir.join("position_ids.npy")).unwrap().to_i64();
            for (i, p) in mp.positions.iter().enumerate() {
                assert_eq!([p[0], p[1], p[2]], [want[i], want[l + i], want[2 * l + i]], "{tag}: position {i}");
            }
            let rd: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(case.dir.join("rope_delta.json")).unwrap()).unwrap();
            assert_eq!(mp.rope_delta, rd["rope_delta"].as_i64().unwrap(), "{tag}: rope_delta");
            // Vision encoder.
            if let Some(px) = &case.prompt.pixel_values {
                let out = model.vision_forward(px, &case.prompt.image_grid_thw).unwrap();
                let want = Npy::read(case.dir.join("vision_out.npy")).unwrap();
                assert_eq!(out.shape(), want.shape.as_slice(), "{tag}: vision shape");
                let e = rel_err(out.as_f32().unwrap(), &want.to_f32());
                eprintln!("{tag}: vision rel err {e:.2e}");
                assert!(e < 1e-4, "{tag}: vision rel err {e}");
            }
            // Prefill logits at every position.
            let logits = model.forward_logits(&case.prompt).unwrap();
            let want = Npy::read(case.dir.join("logits.npy")).unwrap();
            assert_eq!(logits.shape(), want.shape.as_slice(), "{tag}: logits shape");
            let e = rel_err(logits.as_f32().unwrap(), &want.to_f32());
            eprintln!("{tag}: logits rel err {e:.2e}");
            assert!(e < 1e-4, "{tag}: logits rel err {e}");
            // Greedy decoding (KV cache path).
            let params = SamplingParams { max_new_tokens: case.max_new_tokens, ..Default::default() };
            let g = generate(&model, std::slice::from_ref(&case.prompt), &params).unwrap();
            assert_eq!(g[0].token_ids, greedy_expected(&case.dir), "{tag}: greedy tokens");
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} cases checked");
}

/// All cases of a checkpoint in one left-padded batch give each case's own greedy tokens,
/// and loading the bf16 checkpoint as BF16 weights (upcast inside linear) is equally exact.
#[test]
fn batched_generation_and_bf16_storage_match_transformers() {
    for ckpt in checkpoints() {
        let cases = load_cases(&ckpt);
        let prompts: Vec<PromptInput> = cases.iter().map(|c| c.prompt.clone()).collect();
        let max_new = cases.iter().map(|c| c.max_new_tokens).max().unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let bf16_file = ckpt.to_string_lossy().contains("bf16");
            if dtype == DType::BF16 && !bf16_file {
                continue; // f32 weights rounded to bf16 would no longer be the reference model
            }
            let model = Qwen25Vl::load(ckpt.join("model"), Arc::new(CpuBackend), dtype).unwrap();
            let out = generate(&model, &prompts, &SamplingParams { max_new_tokens: max_new, ..Default::default() }).unwrap();
            for (c, g) in cases.iter().zip(&out) {
                let want = greedy_expected(&c.dir);
                // The batch runs to the longest budget; compare the case's own budget.
                let n = c.max_new_tokens.min(g.token_ids.len());
                assert_eq!(&g.token_ids[..n], &want[..], "{}/{} ({dtype:?}, batched)", ckpt.display(), c.name);
                assert_eq!(g.logprobs.len(), g.token_ids.len());
                assert!(g.logprobs.iter().all(|&lp| lp <= 0.0 && lp.is_finite()));
            }
        }
    }
}
