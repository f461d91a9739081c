//! The training loop learns: a tiny Qwen2.5-VL (the transformers fixture checkpoint) overfits a
//! small SFT task — one text-only and one two-image conversation — with activation recomputation,
//! gradient accumulation over micro-batches, grad-norm clipping and AdamW with a warmup + cosine
//! schedule. Also checks that accumulating micro-batches with the global token denominator gives
//! the full batch's gradient.

mod reference_fixtures;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use onevision::training::{sft_step, Encoder, Freeze, SftExample, StepOptions, Trainer, TrainerConfig};
use onevision_data::{Dataset, ReadOptions};
use onevision_model::{CpuBackend, DType, Qwen25Vl};
use onevision_train::{AdamWConfig, GradAccumulator, Schedule, ScheduleKind, Warmup};

fn fixtures() -> PathBuf {
    reference_fixtures::fixture("tiny-tied-f32")
}

fn batch(enc: &Encoder, tmp: &Path) -> Vec<SftExample> {
    let dir = fixtures();
    let cases = reference_fixtures::read_json(&dir.join("grad_cases.json"));
    let mut lines = String::new();
    for case in cases.as_array().unwrap() {
        lines.push_str(&format!("{}\n", reference_fixtures::sft_row(&dir, case)));
    }
    let data = tmp.join("rows.jsonl");
    std::fs::write(&data, lines).unwrap();
    let ds = Dataset::open(&data, &ReadOptions::default()).unwrap();
    (0..ds.len()).map(|i| enc.encode_sft(&ds.get(i).unwrap()).unwrap()).collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn tiny_model_overfits_two_conversations_with_accumulation_and_recomputation() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = fixtures().join("model");
    let enc = Encoder::from_dir(&model_dir).unwrap();
    let batch = batch(&enc, tmp.path());
    let mut model = Qwen25Vl::load(&model_dir, Arc::new(CpuBackend::new()), DType::F32).unwrap();
    model.set_recompute(true);
    let total_tokens: usize = batch.iter().map(|e| e.label_tokens()).sum();

    // Micro-batches of one with the global denominator sum to the full batch's gradient (f32
    // summation order only: 1e-5).
    let full = sft_step(&model, &batch, &StepOptions::default()).unwrap();
    let opts = StepOptions { denominator: Some(total_tokens as f64), ..StepOptions::default() };
    let mut acc = GradAccumulator::new();
    let mut micro_loss = 0.0;
    for ex in &batch {
        let out = sft_step(&model, std::slice::from_ref(ex), &opts).unwrap();
        micro_loss += out.loss;
        acc.add(&out.grads, 1.0).unwrap();
    }
    assert!((micro_loss - full.loss).abs() < 1e-5 * full.loss, "loss {micro_loss} vs {}", full.loss);
    let summed = acc.take().unwrap();
    for (name, g) in &full.grads {
        let e = rel_err(&summed[name].data, &g.data);
        assert!(e < 1e-5, "{name}: accumulated gradient relative error {e:.2e}");
    }

    let steps = 60;
    let schedule = Schedule::new(ScheduleKind::Cosine, 5e-3, steps, Warmup::Steps(5)).unwrap();
    let cfg = TrainerConfig { adamw: AdamWConfig::default(), schedule, max_grad_norm: Some(1.0), freeze: Freeze::default() };
    let mut t = Trainer::new(model, cfg).unwrap();
    let first = full.loss;
    let mut last = f64::INFINITY;
    for _ in 0..steps {
        let mut acc = GradAccumulator::new();
        let mut loss = 0.0;
        for ex in &batch {
            let out = sft_step(&t.model, std::slice::from_ref(ex), &opts).unwrap();
            loss += out.loss;
            acc.add(&out.grads, 1.0).unwrap();
        }
        let stats = t.apply(acc.take().unwrap()).unwrap();
        assert!(stats.grad_norm.is_finite());
        last = loss;
    }
    eprintln!("SFT overfit: loss {first:.4} -> {last:.4} after {steps} steps");
    // A random 2-layer model starts near ln(vocab) ≈ 6; memorising 2 short answers drives the
    // token cross-entropy to a small fraction of that.
    assert!(last < 0.05 * first, "did not overfit: {first} -> {last}");
}
