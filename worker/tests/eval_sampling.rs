//! Sampled held-out evaluation (`eval.sampling`): what the sampler draws for each question, on the
//! fixture's image questions and model. The arithmetic (mean over samples, per category, summed
//! over ranks) is unit-tested in `runtime::eval`; `runtime_run` checks the status it produces.

mod runtime_common;

use std::sync::Arc;

use onevision::runtime::eval::answer_questions;
use onevision::runtime::settings::EvalSampling;
use onevision::training::Encoder;
use onevision_data::{Dataset, ReadOptions, Sample};
use onevision_model::{CpuBackend, DType, Qwen25Vl};
use runtime_common::Fixture;

fn setup() -> (Fixture, Encoder, Qwen25Vl, Vec<Sample>) {
    let fx = Fixture::new(2, 6);
    let enc = Encoder::from_dir(fx.model()).unwrap();
    let model = Qwen25Vl::load(fx.model(), Arc::new(CpuBackend::new()), DType::F32).unwrap();
    let data = Dataset::open(fx.heldout(), &ReadOptions::default()).unwrap();
    let rows = (0..data.len()).map(|i| data.get(i).unwrap()).collect();
    (fx, enc, model, rows)
}

#[test]
fn near_zero_temperature_samples_are_the_greedy_answer() {
    let (_fx, enc, model, rows) = setup();
    let q: Vec<&Sample> = rows.iter().collect();
    // T = 1e-4 scales logit gaps by 10^4: a non-argmax token needs a gap under ~2e-3 to get
    // even e^-20 of the mass, so every draw is the greedy token unless logits nearly tie.
    let cold = EvalSampling { samples: 3, temperature: 1e-4, top_p: 1.0 };
    let answers = answer_questions(&model, &enc, &q, 20, Some(&cold)).unwrap();
    assert_eq!(answers.len(), rows.len());
    for (i, (greedy, sampled)) in answers.iter().enumerate() {
        assert!(!greedy.is_empty(), "question {i}: empty greedy answer");
        assert_eq!(sampled.len(), 3, "question {i}");
        for s in sampled {
            assert_eq!(s, greedy, "question {i}");
        }
    }
    // Without `sampling` there are no sampled answers, and the greedy ones are the same.
    let plain = answer_questions(&model, &enc, &q, 20, None).unwrap();
    for ((g, s), (g2, _)) in plain.iter().zip(&answers) {
        assert!(s.is_empty());
        assert_eq!(g, g2);
    }
}

#[test]
fn sampled_answers_differ_and_follow_the_question_not_its_position() {
    let (_fx, enc, model, rows) = setup();
    let hot = EvalSampling { samples: 4, temperature: 1.0, top_p: 1.0 };
    let q: Vec<&Sample> = rows.iter().collect();
    let a = answer_questions(&model, &enc, &q, 20, Some(&hot)).unwrap();
    // A random model at T 1.0 over 20 tokens: the samples of a question are not all equal.
    assert!(a.iter().any(|(_, s)| s.iter().any(|x| x != &s[0])), "no two samples differ: {a:?}");
    // The same draws when asked again, and when the questions come in reverse order (another
    // batch layout, as on another rank's shard): the seed comes from the question's id.
    assert_eq!(answer_questions(&model, &enc, &q, 20, Some(&hot)).unwrap(), a);
    let rev: Vec<&Sample> = rows.iter().rev().collect();
    let mut b = answer_questions(&model, &enc, &rev, 20, Some(&hot)).unwrap();
    b.reverse();
    assert_eq!(b, a);
}
