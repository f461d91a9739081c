//! `onevision trainer --job FILE`: one trainer rank of an SFTJob or GRPOJob.
//!
//! Rank 0 hosts the coordinator; every rank joins it (rendezvous), connects its communicator (NCCL
//! on GPU jobs, the TCP ring otherwise: `dist::select_comm`) and runs the same loop: deterministic
//! data shard, one all-reduce per optimizer step, evaluation at the
//! start / every `eval.everySteps` / the end, checkpoints every `checkpoint.everySteps` (rank 0
//! writes, all ranks resume from the newest one that verifies). Rank 0 also writes
//! `metrics.jsonl` and `status.json`, reports progress to the coordinator and exports the final
//! model in the HF layout to `output.path`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use onevision_comms::coordinator::{serve_coordinator, CoordinatorClient, CoordinatorConfig, CoordinatorServerHandle, RetryPolicy};
use onevision_comms::{rendezvous_cpu, Communicator, RendezvousOptions};
use onevision_data::{epoch_order, Batching, BatchCursor, Dataset, Position, ReadOptions, Sample, ShardConfig};
use onevision_model::{CpuBackend, DType, Qwen25Vl};
use onevision_operator::api::{JobKind, Progress};
use onevision_operator::job::AnyJob;
use onevision_proto::v1;
use onevision_train::{AdamWConfig, CheckpointManager, DataPosition, Schedule, Warmup};

use super::dist::{
    all_reduce_scalars, connect_nccl, local_rank, nccl_options, probe_nccl, select_comm, CommOverride, CommSelection,
    GradLayout, COMM_ENV, LOCAL_RANK_ENV,
};
use super::eval::{answer_budget, categories, evaluate};
use super::grpo::GrpoStep;
use super::sft::SftStep;
use super::signals::StopFlag;
use super::{EvalResult, JobSettings, Reporter, Result, RuntimeError, TrainerEnv};
use crate::telemetry::{
    metrics_addr_from_env, phase_span, training_step_span, JobLabels, Phase, StepMetrics, Telemetry, TrainerMetrics,
};
use crate::training::{Encoder, Trainer, TrainerConfig};

/// What a step hands back to the loop for reporting.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub metrics: StepMetrics,
    /// Mean total reward (GRPO).
    pub reward: Option<f64>,
    /// Accuracy reward on this step's completions (GRPO).
    pub accuracy: Option<f64>,
}

/// Shared state of the loop that objectives read.
pub struct LoopCtx<'a> {
    pub settings: &'a JobSettings,
    pub env: &'a TrainerEnv,
    pub comm: &'a dyn Communicator,
    pub enc: &'a Encoder,
    pub total_steps: u64,
    /// Loop steps done before this one.
    pub step: u64,
    pub rt: &'a tokio::runtime::Runtime,
    /// Rank 0's coordinator (rollout registry, model version).
    pub coordinator: Option<&'a CoordinatorServerHandle>,
    pub coordinator_client: &'a CoordinatorClient,
}

/// One objective (SFT or GRPO): consumes this rank's batch of dataset positions, updates the
/// trainer (all ranks identically) and reports.
pub trait TrainStep {
    fn step(&mut self, cx: &mut LoopCtx<'_>, trainer: &mut Trainer, batch: &[usize]) -> Result<StepReport>;
}

/// The training set, the held-out set and the map from training positions to dataset rows.
pub struct Splits {
    pub data: Dataset,
    pub train_index: Vec<usize>,
    pub eval: Vec<Sample>,
}

fn read_opts() -> ReadOptions {
    ReadOptions { check_image_files: true, ..Default::default() }
}

/// Opens the dataset; the held-out set is `eval.dataset` when given, else the last
/// `eval.fraction` of a seeded permutation of the dataset (never trained on).
pub fn load_splits(s: &JobSettings) -> Result<Splits> {
    if !s.dataset.exists() {
        return Err(RuntimeError::Config(format!("dataset.path {} does not exist", s.dataset.display())));
    }
    let data = Dataset::open(&s.dataset, &read_opts())?;
    let n = data.len();
    let (train_index, eval) = if let Some(p) = &s.eval_dataset {
        if !p.exists() {
            return Err(RuntimeError::Config(format!("eval.dataset.path {} does not exist", p.display())));
        }
        let e = Dataset::open(p, &read_opts())?;
        let eval = (0..e.len()).map(|i| e.get(i)).collect::<std::result::Result<Vec<_>, _>>()?;
        ((0..n).collect(), eval)
    } else if s.eval_fraction > 0.0 {
        let cfg = ShardConfig { seed: s.seed ^ 0xE7A1, shuffle: true, rank: 0, world_size: 1 };
        let perm = epoch_order(n, 0, &cfg)?;
        let k = ((n as f64 * s.eval_fraction).ceil() as usize).min(n.saturating_sub(1));
        let (train, held) = perm.split_at(n - k);
        let eval = held.iter().map(|&i| data.get(i)).collect::<std::result::Result<Vec<_>, _>>()?;
        (train.to_vec(), eval)
    } else {
        ((0..n).collect(), Vec::new())
    };
    Ok(Splits { data, train_index, eval })
}

fn coord_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Coordinator(e.to_string())
}

/// Loads the model, refusing a missing directory as a configuration error.
pub fn load_model(dir: &Path) -> Result<Qwen25Vl> {
    if !dir.join("config.json").exists() {
        return Err(RuntimeError::Config(format!(
            "model directory {} has no config.json (model.path or the fromSFTJob output is wrong)",
            dir.display()
        )));
    }
    Qwen25Vl::load(dir, Arc::new(CpuBackend::new()), DType::F32)
        .map_err(|source| RuntimeError::ModelLoad { path: dir.to_path_buf(), source })
}

/// Entry point of `onevision trainer --job FILE`.
pub fn run(job_path: &Path) -> Result<()> {
    let job = AnyJob::read(job_path)?;
    let settings = JobSettings::from_job(&job)?;
    let env = TrainerEnv::from_env()?;
    // Communicator choice first: a forced NCCL without CUDA fails here, before any rendezvous.
    let var = |n: &str| std::env::var(n).ok();
    let nccl_opts = nccl_options(var(onevision_cuda::nccl_comm::TIMEOUT_ENV).as_deref())?;
    let ordinal = local_rank(var(LOCAL_RANK_ENV).as_deref())?;
    let selection = select_comm(
        CommOverride::parse(var(COMM_ENV).as_deref())?,
        job.common().trainer.gpus_per_node,
        env.world_size,
        || probe_nccl(ordinal),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| RuntimeError::Coordinator(format!("cannot start the async runtime: {e}")))?;
    let stop = StopFlag::install(&rt);
    let telemetry = Telemetry::new();
    let metrics = telemetry.trainer(&JobLabels::new(&settings.namespace, &settings.name, settings.kind.as_str()));
    let _metrics_server = match metrics_addr_from_env().map_err(|e| RuntimeError::Config(e.to_string()))? {
        Some(addr) => Some(rt.block_on(telemetry.serve(addr)).map_err(|e| RuntimeError::Config(e.to_string()))?),
        None => None,
    };

    let server = if env.rank == 0 {
        let cfg = CoordinatorConfig::new(env.world_size, env.restart_count);
        Some(rt.block_on(serve_coordinator(env.coordinator_bind()?, cfg)).map_err(coord_err)?)
    } else {
        None
    };
    let client = {
        let _g = rt.enter();
        CoordinatorClient::new(&env.coordinator_endpoint(), RetryPolicy::default()).map_err(coord_err)?
    };
    let mut ro = RendezvousOptions::new(env.rank, env.world_size, env.restart_count, env.ring_bind);
    ro.advertise_host = env.advertise_host.clone();
    ro.name = env.pod_name.clone();
    // One timeout setting for either communicator.
    ro.ring.op_timeout = nccl_opts.timeout;
    tracing::info!(rank = env.rank, world = env.world_size, coordinator = %env.coordinator, "joining the gang");
    let spawn_heartbeat = || {
        let _g = rt.enter();
        client.spawn_heartbeat(env.rank, env.restart_count, Duration::from_secs(5))
    };
    let (comm, heartbeat) = match selection {
        CommSelection::Ring { fallback } => {
            if let Some(why) = fallback {
                tracing::warn!("{why}");
            }
            tracing::info!("communicator: TCP ring");
            let (_join, comm) = rt.block_on(rendezvous_cpu(&client, ro))?;
            (comm, spawn_heartbeat())
        }
        CommSelection::Nccl(gpu) => {
            tracing::info!(device = gpu.ordinal(), "communicator: NCCL (host buffers)");
            // NCCL init waits for every rank: heartbeat meanwhile, so the coordinator sees us alive.
            let mut hb = None;
            let (_join, comm) = connect_nccl(&rt, &client, ro, gpu, nccl_opts, |_| hb = Some(spawn_heartbeat()))?;
            (comm, hb.unwrap_or_else(spawn_heartbeat))
        }
    };

    let result = (|| {
        let model = load_model(&settings.model)?;
        let enc = Encoder::from_dir(&settings.model)?;
        let cx = LoopCtx {
            settings: &settings,
            env: &env,
            comm: comm.as_ref(),
            enc: &enc,
            total_steps: 0,
            step: 0,
            rt: &rt,
            coordinator: server.as_ref(),
            coordinator_client: &client,
        };
        run_job(cx, model, &stop, &metrics, &heartbeat)
    })();

    match &result {
        Ok(()) => {
            // Nobody leaves before everyone finished (rank 0 owns the coordinator).
            if let Err(e) = comm.barrier() {
                tracing::warn!(error = %e, "final barrier failed");
            }
            if let Some(s) = &server {
                s.request_stop("training completed", true);
            }
        }
        Err(e) => tracing::error!(error = %e, "trainer failed"),
    }
    drop(heartbeat);
    if let Some(s) = server {
        let _ = rt.block_on(s.stop());
    }
    result
}

/// The loop shared by SFT and GRPO, from model load to export.
pub fn run_job(
    mut cx: LoopCtx<'_>,
    model: Qwen25Vl,
    stop: &StopFlag,
    tm: &TrainerMetrics,
    heartbeat: &onevision_comms::coordinator::HeartbeatMonitor,
) -> Result<()> {
    let s = cx.settings;
    let (rank, world) = (cx.comm.rank(), cx.comm.world_size());
    let splits = load_splits(s)?;
    let per_rank = s.per_rank_batch(world)?;
    let per_step = per_rank * world;
    let steps_per_epoch = (splits.train_index.len() / per_step) as u64;
    if steps_per_epoch == 0 {
        return Err(RuntimeError::Config(format!(
            "dataset {} has {} training rows, fewer than one step needs ({per_step})",
            s.dataset.display(),
            splits.train_index.len()
        )));
    }
    let total = s.max_steps.unwrap_or(s.epochs * steps_per_epoch);
    cx.total_steps = total;

    // The reference model is the starting policy (GRPO with klBeta > 0).
    let reference = match &s.grpo {
        Some(g) if g.loss.beta > 0.0 => Some(load_model(&s.model)?),
        _ => None,
    };
    let mu = s.grpo.as_ref().map_or(1, |g| g.iterations as u64);
    let schedule = Schedule::new(s.schedule, s.learning_rate, total * mu, Warmup::Steps(s.warmup_steps))
        .map_err(|e| RuntimeError::Config(format!("hyperparameters: {e}")))?;
    let tcfg = TrainerConfig {
        adamw: AdamWConfig { weight_decay: s.weight_decay, ..AdamWConfig::default() },
        schedule,
        max_grad_norm: s.max_grad_norm,
        freeze: s.freeze,
    };
    // ZeRO-1 only pays with more than one rank; a world of one keeps the plain optimizer.
    let mut trainer = if s.zero_stage >= 1 && world > 1 {
        Trainer::new_zero1(model, tcfg, rank, world)?
    } else {
        if s.zero_stage >= 1 {
            tracing::info!("trainer.zeroStage 1 has nothing to shard with one rank: full optimizer state");
        }
        Trainer::new(model, tcfg)?
    };
    let layout = GradLayout::for_trainer(&trainer);
    let mut objective: Box<dyn TrainStep + '_> = match &s.grpo {
        None => Box::new(SftStep { data: &splits.data, train_index: &splits.train_index, layout }),
        Some(g) => {
            let step = GrpoStep::new(s, &splits.data, &splits.train_index, reference, layout)?;
            if g.rollout_replicas > 0 {
                tracing::info!(workers = g.rollout_replicas, "GRPO completions from rollout workers");
                Box::new(step.with_source(Box::new(super::grpo::WorkerPool::new(cx.coordinator_client.clone(), g.max_staleness, cx.env.restart_count))))
            } else {
                Box::new(step)
            }
        }
    };

    let mgr = CheckpointManager::new(s.checkpoint_dir(), s.checkpoint_keep)
        .map_err(|e| RuntimeError::Training(e.into()))?;
    let resumed = trainer.resume_latest(&mgr)?;
    let (mut step, position, before) = match &resumed {
        None => (0, Position::default(), None),
        Some(r) => {
            for (dir, why) in &r.skipped {
                tracing::warn!(checkpoint = %dir.display(), error = %why, "checkpoint refused; resuming from an older one");
            }
            tracing::info!(checkpoint = %r.dir.display(), step = trainer.step(), "resumed");
            let loop_step = r.metadata.get("loop_step").and_then(|v| v.as_u64()).unwrap_or(trainer.step() / mu);
            let before = r.metadata.get("eval_before").and_then(|v| serde_json::from_value::<EvalResult>(v.clone()).ok());
            (loop_step, Position { epoch: r.data_position.epoch, index: r.data_position.index }, before)
        }
    };
    if step > 0 && cx.env.restart_count == 0 {
        tracing::info!("found checkpoints from an earlier run in {}: continuing it", mgr.root().display());
    }
    let mut cursor = BatchCursor::new(
        splits.train_index.len(),
        None,
        ShardConfig { seed: s.seed, shuffle: true, rank, world_size: world },
        Batching::Fixed { batch_size: per_rank, drop_last: true },
        position,
    )?;
    let eval_shard: Vec<Sample> = splits.eval.iter().enumerate().filter(|(i, _)| i % world == rank).map(|(_, x)| x.clone()).collect();
    // One budget for SFT and GRPO evaluations, so their accuracies compare.
    let eval_budget = answer_budget(cx.enc, &splits.eval, 512);
    let eval_categories = categories(&splits.eval);
    let has_eval = !splits.eval.is_empty();
    let mut reporter = if rank == 0 {
        Some(Reporter::open(&s.output, s.kind.as_str(), &s.model.display().to_string(), resumed.as_ref().map(|_| step))?)
    } else {
        None
    };

    let before = match before {
        Some(b) => Some(b),
        None if has_eval => {
            let e = evaluate(&trainer.model, cx.enc, cx.comm, &eval_shard, &eval_categories, eval_budget, s.eval_sampling.as_ref())?;
            tracing::info!(accuracy = e.accuracy, sampled = ?e.sampled.as_ref().map(|x| x.accuracy), n = e.n, "evaluation before training");
            Some(e)
        }
        None => None,
    };
    if let Some(r) = reporter.as_mut() {
        r.status.evaluation.before = before.clone();
        r.write_status()?;
    }
    if let Some(b) = &before {
        record_eval(tm, b);
    }
    let save = |trainer: &Trainer, step: u64, cursor: &BatchCursor| -> Result<Option<std::path::PathBuf>> {
        let p = cursor.position();
        let meta = serde_json::json!({"loop_step": step, "kind": s.kind.as_str(), "eval_before": before});
        // Rank 0 writes (every rank its optimizer shard under ZeRO-1); nobody moves on (or
        // exits) before the checkpoint is on disk.
        Ok(trainer.save_gang(cx.comm, &mgr, DataPosition { epoch: p.epoch, index: p.index }, Vec::new(), meta)?)
    };

    let mut last_ckpt: Option<String> = resumed.as_ref().map(|r| r.dir.display().to_string());
    let first_step = step + 1;
    while step < total {
        // Stop together: a signal seen by any rank stops every rank at the same boundary.
        let mut flag = [if stop.is_set() { 1.0 } else { 0.0 }];
        all_reduce_scalars(cx.comm, &mut flag)?;
        if flag[0] > 0.0 {
            let dir = save(&trainer, step, &cursor)?;
            if let Some(r) = reporter.as_mut() {
                if let Some(d) = &dir {
                    let mut p = r.status.status.progress.clone().unwrap_or_default();
                    p.checkpoint = Some(d.display().to_string());
                    r.progress(p)?;
                }
            }
            return Err(RuntimeError::Interrupted(format!("{} at step {step}", stop.reason())));
        }
        if let Some(why) = heartbeat.stop_reason() {
            return Err(RuntimeError::Stopped(why));
        }
        let (_, batch) = cursor.next_batch()?;
        cx.step = step;
        // One trace per step: its phases and rollout calls (into the workers) are children.
        let _in_step = training_step_span(step + 1).entered();
        let rep = objective.step(&mut cx, &mut trainer, &batch)?;
        step += 1;
        heartbeat.set_step(step);
        let opt_bytes = trainer.optimizer_state_bytes();
        if step == first_step {
            // Every rank, once its state is allocated (unsharded moments appear with the first step).
            tracing::info!(rank, optimizer_state_bytes = opt_bytes, zero1 = trainer.zero1().is_some(), "optimizer state of this rank");
        }
        let mut line = rep.metrics.to_json();
        line["optimizer_state_bytes"] = serde_json::json!(opt_bytes);
        line["step"] = serde_json::json!(step);
        line["epoch"] = serde_json::json!(step as f64 / steps_per_epoch as f64);
        let mut eval_acc = None;
        if has_eval && step % s.eval_every == 0 && step < total {
            let e = evaluate(&trainer.model, cx.enc, cx.comm, &eval_shard, &eval_categories, eval_budget, s.eval_sampling.as_ref())?;
            line["eval_accuracy"] = serde_json::json!(e.accuracy);
            if let Some(x) = &e.sampled {
                line["eval_accuracy_sampled"] = serde_json::json!(x.accuracy);
            }
            record_eval(tm, &e);
            eval_acc = Some(e.accuracy);
        }
        if step % s.checkpoint_every == 0 && step < total {
            let t = std::time::Instant::now();
            let _in_phase = phase_span(Phase::Checkpoint).entered();
            if let Some(d) = save(&trainer, step, &cursor)? {
                last_ckpt = Some(d.display().to_string());
                tm.checkpoint_saved(k8s_openapi::jiff::Timestamp::now().as_second());
            }
            tm.add_phase_seconds(Phase::Checkpoint, t.elapsed().as_secs_f64());
        }
        let mut m = rep.metrics.clone();
        m.step = step;
        tm.record_step(&m);
        if let Some(r) = reporter.as_mut() {
            r.step(&line)?;
            let progress = Progress {
                step: step as i64,
                total_steps: Some(total as i64),
                epoch: Some(step as f64 / steps_per_epoch as f64),
                loss: Some(rep.metrics.loss),
                reward: rep.reward,
                accuracy: eval_acc.or(rep.accuracy).or(r.status.status.progress.as_ref().and_then(|p| p.accuracy)),
                checkpoint: last_ckpt.clone(),
            };
            r.progress(progress)?;
            let report = v1::ProgressReport {
                rank: 0,
                generation: cx.env.restart_count,
                phase: s.kind.as_str().to_lowercase(),
                step,
                total_steps: total,
                loss: Some(rep.metrics.loss),
                reward: rep.reward,
                accuracy: rep.accuracy,
                learning_rate: Some(rep.metrics.learning_rate),
                ..Default::default()
            };
            if let Err(e) = cx.rt.block_on(cx.coordinator_client.report_progress(report)) {
                tracing::warn!(error = %e, "progress report to the coordinator failed");
            }
        }
        tracing::info!(step, total, loss = rep.metrics.loss, reward = ?rep.reward, "step");
    }

    let after = if has_eval {
        let e = evaluate(&trainer.model, cx.enc, cx.comm, &eval_shard, &eval_categories, eval_budget, s.eval_sampling.as_ref())?;
        tracing::info!(accuracy = e.accuracy, sampled = ?e.sampled.as_ref().map(|x| x.accuracy), n = e.n, "evaluation after training");
        record_eval(tm, &e);
        Some(e)
    } else {
        None
    };
    let final_ckpt = save(&trainer, step, &cursor)?;
    if let Some(r) = reporter.as_mut() {
        trainer.export_hf(&s.model, &s.output)?;
        r.status.evaluation.after = after.clone();
        let mut p = r.status.status.progress.clone().unwrap_or_default();
        p.step = step as i64;
        p.total_steps = Some(total as i64);
        if let Some(a) = &after {
            p.accuracy = Some(a.accuracy);
        }
        if let Some(d) = final_ckpt {
            p.checkpoint = Some(d.display().to_string());
        }
        r.progress(p)?;
        let msg = match (before, after) {
            (Some(b), Some(a)) => format!(
                "{} finished: held-out accuracy {:.1}% -> {:.1}% (n={})",
                kind_word(s.kind),
                100.0 * b.accuracy,
                100.0 * a.accuracy,
                a.n
            ),
            _ => format!("{} finished after {step} steps", kind_word(s.kind)),
        };
        r.succeeded(&msg)?;
        tracing::info!("{msg}; model exported to {}", s.output.display());
    }
    Ok(())
}

fn kind_word(k: JobKind) -> &'static str {
    match k {
        JobKind::SFTJob => "SFT",
        JobKind::GRPOJob => "GRPO",
    }
}

/// Held-out accuracy gauges: `split="eval"` (greedy) and, with `eval.sampling`, `eval_sampled`.
fn record_eval(tm: &TrainerMetrics, e: &EvalResult) {
    tm.set_accuracy("eval", e.accuracy);
    if let Some(x) = &e.sampled {
        tm.set_accuracy("eval_sampled", x.accuracy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::SampledAccuracy;
    use crate::telemetry::{JobLabels, Telemetry};

    fn gauge_line(text: &str, split: &str) -> Option<String> {
        text.lines().find(|l| l.starts_with("onevision_trainer_accuracy_ratio{") && l.contains(&format!("split=\"{split}\""))).map(str::to_string)
    }

    #[test]
    fn evaluations_set_the_greedy_and_the_sampled_accuracy_gauges() {
        let t = Telemetry::new();
        let tm = t.trainer(&JobLabels::new("ns", "job", "GRPOJob"));
        let mut e = EvalResult { accuracy: 0.625, n: 8, by_category: Default::default(), sampled: None };
        record_eval(&tm, &e);
        let text = t.encode();
        assert!(gauge_line(&text, "eval").is_some_and(|l| l.ends_with(" 0.625")), "{text}");
        assert!(gauge_line(&text, "eval_sampled").is_none(), "no eval.sampling, no sampled gauge: {text}");
        e.sampled = Some(SampledAccuracy { accuracy: 0.375, samples: 8, temperature: 0.6, top_p: 0.95, by_category: Default::default() });
        record_eval(&tm, &e);
        let text = t.encode();
        assert!(gauge_line(&text, "eval_sampled").is_some_and(|l| l.ends_with(" 0.375")), "{text}");
    }
}
