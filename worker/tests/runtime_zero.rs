//! ZeRO-1 optimizer-state sharding (`trainer.zeroStage: 1`) through the real entrypoint: two
//! `onevision trainer` processes on the TCP ring train to the same parameters as plain data
//! parallelism, each holding about half the optimizer state, and a ZeRO-1 checkpoint (one
//! optimizer shard per rank) resumes exactly — also into a world of a different size.

mod runtime_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use onevision::runtime::dist::GradLayout;
use onevision::runtime::sft::{encode_sft, sft_global_grads, GlobalGrads};
use onevision::runtime::JobSettings;
use onevision::training::{Encoder, Freeze, ReducedGrads, Trainer, TrainerConfig};
use onevision_comms::LocalCommunicator;
use onevision_data::{Dataset, ReadOptions};
use onevision_model::{CpuBackend, DType, Qwen25Vl};
use onevision_operator::job::AnyJob;
use onevision_train::{checkpoint, AdamWConfig, Schedule, ScheduleKind, TensorMap, Warmup};
use runtime_common::{free_port, metrics, on_tcp_ring, Fixture};

fn job_yaml(fx: &Fixture, out: &Path, nodes: usize, zero: i32, every: u32) -> String {
    format!(
        r#"apiVersion: onevision.dev/v1alpha1
kind: SFTJob
metadata: {{name: zero, namespace: default}}
spec:
  model: {{path: {model}}}
  dataset: {{path: {train}}}
  output: {{path: {out}}}
  trainer: {{nodes: {nodes}, image: x, zeroStage: {zero}}}
  hyperparameters: {{learningRate: 3.0e-3, globalBatchSize: 4, microBatchSize: 2, maxSteps: 3, lrSchedule: cosine, warmupSteps: 1, weightDecay: 0.01, maxGradNorm: 1.0, freezeVision: false, seed: 5}}
  checkpoint: {{everySteps: {every}, keep: 3}}
"#,
        model = fx.model().display(),
        train = fx.train().display(),
        out = out.display(),
    )
}

/// A GRPOJob with two policy updates per batch (`iterationsPerBatch: 2`). The random fixture
/// model never earns a reward (all advantages 0), so the learning signal is made of weight decay
/// (update 1) and the KL term, non-zero in update 2 once the policy moved off the reference.
fn grpo_yaml(fx: &Fixture, out: &Path, nodes: usize, zero: i32) -> String {
    format!(
        r#"apiVersion: onevision.dev/v1alpha1
kind: GRPOJob
metadata: {{name: zero-grpo, namespace: default}}
spec:
  model: {{path: {model}}}
  dataset: {{path: {train}}}
  output: {{path: {out}}}
  trainer: {{nodes: {nodes}, image: x, zeroStage: {zero}}}
  rollout: {{replicas: 0}}
  grpo: {{groupSize: 4, maxNewTokens: 12, temperature: 1.0, klBeta: 0.04, iterationsPerBatch: 2, rewards: [{{name: accuracy}}, {{name: format, weight: 0.5}}]}}
  hyperparameters: {{learningRate: 1.0e-3, globalBatchSize: 8, microBatchSize: 4, maxSteps: 1, weightDecay: 0.1, freezeVision: false, seed: 2}}
"#,
        model = fx.model().display(),
        train = fx.train().display(),
        out = out.display(),
    )
}

/// Runs `world` trainer ranks as processes (the env the operator sets, on loopback) to the end;
/// returns each rank's log.
fn run_gang(fx: &Fixture, out: &Path, world: usize, zero: i32, every: u32) -> Vec<String> {
    run_job(out, world, &job_yaml(fx, out, world, zero, every))
}

fn run_job(out: &Path, world: usize, yaml: &str) -> Vec<String> {
    std::fs::create_dir_all(out).unwrap();
    let job = out.with_extension("yaml");
    std::fs::write(&job, yaml).unwrap();
    let coordinator = format!("127.0.0.1:{}", free_port());
    let logs: Vec<PathBuf> = (0..world).map(|r| out.with_extension(format!("rank{r}.log"))).collect();
    let mut children: Vec<Child> = (0..world)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_onevision"))
                .args(["trainer", "--job"])
                .arg(&job)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("ONEVISION_COORDINATOR", &coordinator)
                .env("ONEVISION_RING_BIND", "127.0.0.1:0")
                .env("POD_IP", "127.0.0.1")
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&logs[rank]).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut codes = vec![None; world];
    while codes.iter().any(Option::is_none) && Instant::now() < deadline {
        for (c, code) in children.iter_mut().zip(codes.iter_mut()) {
            if code.is_none() {
                *code = c.try_wait().unwrap().map(|s| s.code());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for c in &mut children {
        let _ = c.kill();
    }
    let texts: Vec<String> = logs.iter().map(|l| std::fs::read_to_string(l).unwrap_or_default()).collect();
    for (r, code) in codes.iter().enumerate() {
        assert_eq!(*code, Some(Some(0)), "rank {r} of {world} failed:\n{}", texts[r]);
    }
    texts
}

fn ckpt(out: &Path, step: u64) -> PathBuf {
    out.join(format!("checkpoints/ckpt-{step:010}"))
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    metrics(&out.join("metrics.jsonl")).iter().map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap())).collect()
}

/// `optimizer_state_bytes=N` from a rank's log (the line every rank writes after its first step).
fn logged_state_bytes(log: &str) -> u64 {
    let line = log.lines().find(|l| l.contains("optimizer state of this rank")).unwrap_or_else(|| panic!("no state line in:\n{log}"));
    let v = line.split("optimizer_state_bytes=").nth(1).unwrap().split(|c: char| !c.is_ascii_digit()).next().unwrap();
    v.parse().unwrap()
}

/// Largest change of any weight from the model in `dir`.
fn max_change(dir: &Path, weights: &TensorMap) -> f32 {
    let start = Qwen25Vl::load(dir, Arc::new(CpuBackend::new()), DType::F32).unwrap();
    let start: TensorMap = start
        .named_weights()
        .into_iter()
        .map(|(n, w)| {
            let h = start.backend().to_host(w).unwrap();
            (n, onevision_train::Tensor { shape: h.shape().to_vec(), data: h.to_f32_vec().unwrap() })
        })
        .collect();
    max_abs_diff(&start, weights)
}

fn max_abs_diff(a: &TensorMap, b: &TensorMap) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(n, t)| t.data.iter().zip(&b[n].data).fold(0f32, |m, (x, y)| m.max((x - y).abs())))
        .fold(0f32, f32::max)
}

#[test]
fn zero1_trains_like_plain_data_parallelism_with_half_the_state_and_resumes_exactly() {
    let fx = Fixture::new(16, 2);
    let plain = fx.path().join("plain");
    let zero = fx.path().join("zero");
    let plain_logs = run_gang(&fx, &plain, 2, 0, 3);
    let zero_logs = run_gang(&fx, &zero, 2, 1, 2);

    // Same parameters after 3 optimizer steps. Tolerance 1e-5 (absolute; the weights are O(0.1)):
    // with 2 ranks the reduce-scatter adds the same two numbers as the all-reduce (IEEE addition
    // commutes), so gradients are bit-identical; only the global norm differs (partial sums of
    // squares summed across ranks in f32 rather than one f64 sum), which moves the clip factor by
    // ~1e-7 relative, and Adam's update (lr·m/√v) is insensitive to a common gradient scale to
    // first order, so the parameters agree to ~lr·1e-7 ≪ 1e-5.
    let wp = checkpoint::load(&ckpt(&plain, 3)).unwrap();
    let wz = checkpoint::load(&ckpt(&zero, 3)).unwrap();
    let d = max_abs_diff(&wp.weights, &wz.weights);
    eprintln!("max |ZeRO-1 - plain| over the parameters after 3 steps: {d:e}");
    assert!(d <= 1e-5, "ZeRO-1 parameters differ from plain data parallelism by {d}");
    let moved = max_change(&fx.model(), &wp.weights);
    assert!(moved > 1e-3, "3 steps at lr 3e-3 must change the weights ({moved}), or the comparison proves nothing");
    for ((s, a), (_, b)) in losses(&plain).iter().zip(&losses(&zero)) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "step {s}: loss {a} vs {b}");
    }
    // The reassembled moments of the sharded checkpoint equal the unsharded ones (same tolerance).
    for (name, st) in &wp.optimizer {
        let z = &wz.optimizer[name];
        assert_eq!(st.step, z.step, "{name}");
        let dm = st.m.data.iter().zip(&z.m.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(dm <= 1e-5, "{name}: first moments differ by {dm}");
    }
    assert!(ckpt(&zero, 3).join("optimizer-rank-00001-of-00002.safetensors").is_file());
    assert!(!ckpt(&zero, 3).join("optimizer.safetensors").exists());

    // Optimizer state per rank: the plain figure is fp32 master + m + v of every parameter (all
    // trainable here), the ZeRO-1 ranks split it: ≈ 1/2 each, and exactly the plain total together.
    let plain_bytes = metrics(&plain.join("metrics.jsonl"))[0]["optimizer_state_bytes"].as_u64().unwrap();
    let zero_bytes = metrics(&zero.join("metrics.jsonl"))[0]["optimizer_state_bytes"].as_u64().unwrap();
    let per_rank: Vec<u64> = zero_logs.iter().map(|l| logged_state_bytes(l)).collect();
    assert_eq!(per_rank[0], zero_bytes);
    assert_eq!(plain_logs.iter().map(|l| logged_state_bytes(l)).collect::<Vec<_>>(), vec![plain_bytes, plain_bytes]);
    assert_eq!(per_rank.iter().sum::<u64>(), plain_bytes, "the shards partition the state");
    for (r, b) in per_rank.iter().enumerate() {
        let ratio = *b as f64 / plain_bytes as f64;
        assert!((ratio - 0.5).abs() < 0.01, "rank {r}: {b} bytes = {ratio:.4} of the unsharded {plain_bytes}");
    }
    eprintln!("optimizer state per rank: plain {plain_bytes} B, ZeRO-1 {per_rank:?} B");

    // Resume from the ZeRO-1 checkpoint of step 2 (as if the gang died after it): step 3 is
    // bit-identical to the uninterrupted run.
    let resumed = fx.path().join("resumed");
    copy_dir(&ckpt(&zero, 2), &ckpt(&resumed, 2));
    let logs = run_gang(&fx, &resumed, 2, 1, 2);
    assert!(logs[0].contains("resumed"), "{}", logs[0]);
    assert_eq!(losses(&resumed), losses(&zero)[2..].to_vec());
    let wr = checkpoint::load(&ckpt(&resumed, 3)).unwrap();
    assert_eq!(wr.weights, wz.weights, "resumed ZeRO-1 run differs from the uninterrupted one");
    assert_eq!(wr.optimizer, wz.optimizer);

    // A different world size: one process, no sharding, from the same two-shard checkpoint. The
    // moments are reassembled, so it continues the same optimisation (the single rank sees the
    // same global batch; only the summation order of the gradient differs).
    let single = fx.path().join("single");
    copy_dir(&ckpt(&zero, 2), &ckpt(&single, 2));
    run_gang(&fx, &single, 1, 1, 2);
    let ws = checkpoint::load(&ckpt(&single, 3)).unwrap();
    let d = max_abs_diff(&ws.weights, &wz.weights);
    eprintln!("max |world 2 -> 1 resume - uninterrupted| after step 3: {d:e}");
    assert!(d <= 1e-5, "world 2 -> 1 resume differs by {d}");
}

/// The GRPO loop goes through the same reduce-scatter / sharded update / all-gather, twice per
/// batch here: same parameters as plain data parallelism (tolerance as above).
#[test]
fn zero1_grpo_matches_plain_data_parallelism() {
    let fx = Fixture::new(8, 2);
    let finals: Vec<TensorMap> = [0, 1]
        .iter()
        .map(|&zero| {
            let out = fx.path().join(format!("grpo{zero}"));
            run_job(&out, 2, &grpo_yaml(&fx, &out, 2, zero));
            // The second update's gradient (the KL term, see grpo_yaml) reached the optimizer.
            let m = &metrics(&out.join("metrics.jsonl"))[0];
            assert!(m["grad_norm"].as_f64().unwrap() > 0.0, "no gradient: {m}");
            // One loop step of two optimizer updates: the final checkpoint is ckpt-2.
            checkpoint::load(&ckpt(&out, 2)).unwrap().weights
        })
        .collect();
    let d = max_abs_diff(&finals[0], &finals[1]);
    let moved = max_change(&fx.model(), &finals[0]);
    eprintln!("GRPO: max |ZeRO-1 - plain| after 2 updates: {d:e} (max change from the start {moved:e})");
    // Weight decay moves every weight through the sharded update and the all-gather; the KL
    // gradient of update 2 is small but non-zero (checked above), so the reduce-scatter and the
    // global norm carry real values too.
    assert!(moved > 1e-4, "the GRPO updates must change the weights ({moved}), or the comparison proves nothing");
    assert!(d <= 1e-5, "GRPO ZeRO-1 parameters differ from plain data parallelism by {d}");
}

const ALL_TRAINABLE: Freeze = Freeze { vision_tower: false, merger: false };

fn trainer_for(dir: &Path, zero: Option<(usize, usize)>) -> Trainer {
    let model = Qwen25Vl::load(dir, Arc::new(CpuBackend::new()), DType::F32).unwrap();
    let cfg = TrainerConfig {
        adamw: AdamWConfig::default(),
        schedule: Schedule::new(ScheduleKind::Constant, 1e-3, 10, Warmup::Steps(0)).unwrap(),
        max_grad_norm: None,
        freeze: ALL_TRAINABLE,
    };
    match zero {
        Some((r, w)) => Trainer::new_zero1(model, cfg, r, w).unwrap(),
        None => Trainer::new(model, cfg).unwrap(),
    }
}

fn grads_of(t: &Trainer, dir: &Path, samples: &[onevision_data::Sample], comm: &dyn onevision_comms::Communicator) -> GlobalGrads {
    let enc = Encoder::from_dir(dir).unwrap();
    let examples = encode_sft(&enc, samples, 4096).unwrap();
    sft_global_grads(&t.model, comm, &GradLayout::for_trainer(t), &examples, 2, ALL_TRAINABLE).unwrap()
}

/// The gradient part on its own, in one process with two ring threads: each ZeRO-1 rank gets
/// exactly the summed gradient of its contiguous shard of the flattened parameters.
#[test]
fn reduce_scattered_shards_are_the_single_process_gradient() {
    let fx = Fixture::new(8, 2);
    let data = Dataset::open(fx.train(), &ReadOptions::default()).unwrap();
    let samples: Vec<_> = (0..8).map(|i| data.get(i).unwrap()).collect();
    let model_dir = fx.model();
    let single_t = trainer_for(&model_dir, None);
    let single = grads_of(&single_t, &model_dir, &samples, &LocalCommunicator);
    let layout = GradLayout::for_trainer(&single_t);
    let flat = layout.flatten(single.grads.full().unwrap(), &[]).unwrap();

    let inputs: Vec<_> = (0..2).map(|rank| (model_dir.clone(), samples.iter().skip(rank).step_by(2).cloned().collect::<Vec<_>>())).collect();
    let ranks = on_tcp_ring(inputs, |rank, (dir, mine), comm| {
        let t = trainer_for(&dir, Some((rank, 2)));
        let g = grads_of(&t, &dir, &mine, &comm);
        (t.layout().shard_range(rank, 2), g)
    });
    let scale = flat.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut covered = 0;
    for (range, g) in ranks {
        assert!((g.loss - single.loss).abs() <= 1e-5 * single.loss.abs());
        let ReducedGrads::Shard(shard) = g.grads else { panic!("a ZeRO-1 layout must reduce-scatter") };
        assert_eq!(shard.len(), range.len());
        covered += shard.len();
        // 1e-5 of the largest gradient: the ranks sum per-rank partial sums, one process sums
        // micro-batches in another order (the bound runtime_grads uses for the all-reduce).
        let diff = shard.iter().zip(&flat[range]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5 * scale, "shard differs by {diff} (max |g| {scale})");
    }
    assert_eq!(covered, flat.len(), "the two shards partition the flattened gradient");
}

/// The spec field reaches the ranks through the planner's job file; bad values are refused.
#[test]
fn zero_stage_comes_from_the_job_file_and_is_validated() {
    let fx = Fixture::new(4, 1);
    let out = fx.path().join("o");
    let job = AnyJob::from_yaml(&job_yaml(&fx, &out, 2, 1, 1)).unwrap();
    let AnyJob::Sft(sft) = &job else { panic!("an SFTJob manifest") };
    let file = onevision_operator::job::job_file(sft, &fx.model().display().to_string()).unwrap();
    let settings = JobSettings::from_job(&AnyJob::from_yaml(&file).unwrap()).unwrap();
    assert_eq!(settings.zero_stage, 1);
    let off = JobSettings::from_job(&AnyJob::from_yaml(&job_yaml(&fx, &out, 2, 0, 1)).unwrap()).unwrap();
    assert_eq!(off.zero_stage, 0);
    let e = JobSettings::from_job(&AnyJob::from_yaml(&job_yaml(&fx, &out, 2, 2, 1)).unwrap()).unwrap_err();
    assert!(e.to_string().contains("trainer.zeroStage"), "{e}");
    assert!(e.is_permanent());
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}
