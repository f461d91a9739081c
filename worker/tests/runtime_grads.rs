//! Data parallelism is exact: two ranks connected by the TCP ring, each computing its half of a
//! global SFT batch with `sft_global_grads`, end up with the loss and gradients one process
//! computes on the whole batch.

mod runtime_common;

use std::sync::Arc;

use onevision::runtime::dist::GradLayout;
use onevision::runtime::sft::{encode_sft, sft_global_grads, GlobalGrads};
use onevision::training::{Encoder, Freeze};
use onevision_comms::LocalCommunicator;
use onevision_data::{Dataset, ReadOptions};
use onevision_model::{CpuBackend, DType, Qwen25Vl};
use runtime_common::{on_tcp_ring, Fixture};

fn grads_of(model_dir: &std::path::Path, samples: &[onevision_data::Sample], comm: &dyn onevision_comms::Communicator) -> GlobalGrads {
    let model = Qwen25Vl::load(model_dir, Arc::new(CpuBackend::new()), DType::F32).unwrap();
    let enc = Encoder::from_dir(model_dir).unwrap();
    let freeze = Freeze { vision_tower: false, merger: false };
    let master: onevision_train::TensorMap = model
        .named_weights()
        .into_iter()
        .map(|(n, t)| {
            let h = model.backend().to_host(t).unwrap();
            (n, onevision_train::Tensor { shape: h.shape().to_vec(), data: h.to_f32_vec().unwrap() })
        })
        .collect();
    let layout = GradLayout::new(&master, freeze);
    let examples = encode_sft(&enc, samples, 4096).unwrap();
    // Micro-batches of 2: accumulation inside a rank is part of what must stay exact.
    sft_global_grads(&model, comm, &layout, &examples, 2, freeze).unwrap()
}

#[test]
fn two_rank_all_reduced_gradients_equal_single_process_gradients() {
    let fx = Fixture::new(8, 2);
    let data = Dataset::open(fx.train(), &ReadOptions::default()).unwrap();
    let samples: Vec<_> = (0..8).map(|i| data.get(i).unwrap()).collect();
    let single = grads_of(&fx.model(), &samples, &LocalCommunicator);

    // The interleaved shard the sampler would give each rank (rows 0,2,4,6 / 1,3,5,7).
    let inputs: Vec<_> = (0..2).map(|rank| (fx.model(), samples.iter().skip(rank).step_by(2).cloned().collect::<Vec<_>>())).collect();
    let ranks: Vec<GlobalGrads> = on_tcp_ring(inputs, |_, (model, mine), comm| grads_of(&model, &mine, &comm));
    let full = |g: &GlobalGrads| g.grads.full().expect("an unsharded layout all-reduces").clone();
    let (single_grads, rank_grads): (_, Vec<_>) = (full(&single), ranks.iter().map(full).collect());

    assert!(single.loss.is_finite() && single.loss > 0.0);
    assert!(!single_grads.is_empty());
    for (r, grads) in ranks.iter().zip(&rank_grads) {
        assert_eq!(r.tokens, single.tokens);
        assert!((r.loss - single.loss).abs() <= 1e-5 * single.loss.abs(), "loss {} vs {}", r.loss, single.loss);
        assert_eq!(grads.len(), single_grads.len());
        for (name, g) in &single_grads {
            let d = &grads[name];
            let scale = g.data.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
            let diff = g.data.iter().zip(&d.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 1e-5 * scale, "{name}: max |Δ| {diff} vs max |g| {scale}");
        }
    }
    // Both ranks hold bit-identical results (the ring's reduction order is fixed).
    for (name, g) in &rank_grads[0] {
        assert_eq!(g.data, rank_grads[1][name].data, "{name} differs between ranks");
    }
}
