//! The metric registry and the typed recorders for trainer ranks and rollout workers.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::{json, Map, Value};

type GaugeF = Gauge<f64, AtomicU64>;
type CounterF = Counter<f64, AtomicU64>;

/// Rollout request latency buckets (seconds): a group of long reasoning completions takes from
/// well under a second (tiny models) to minutes.
pub const REQUEST_LATENCY_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
];

/// The labels every worker series carries: which job it belongs to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub namespace: String,
    pub job_name: String,
    /// Job kind, e.g. `SFTJob` or `GRPOJob`.
    pub kind: String,
}

impl JobLabels {
    pub fn new(namespace: &str, job_name: &str, kind: &str) -> JobLabels {
        JobLabels { namespace: namespace.into(), job_name: job_name.into(), kind: kind.into() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    namespace: String,
    job_name: String,
    kind: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RewardLabels {
    namespace: String,
    job_name: String,
    kind: String,
    reward: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SplitLabels {
    namespace: String,
    job_name: String,
    kind: String,
    split: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemoryLabels {
    namespace: String,
    job_name: String,
    kind: String,
    /// `host_rss` or `device` (allocated GPU memory).
    memory: String,
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    namespace: String,
    job_name: String,
    kind: String,
    /// Rollout worker id: several workers may share one process in a local run.
    worker: String,
}

/// Where a training step spends its wall time (label `phase` of `step_phase_seconds_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    RolloutWait,
    Reference,
    ForwardBackward,
    Optimizer,
    WeightSync,
    Checkpoint,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::RolloutWait,
        Phase::Reference,
        Phase::ForwardBackward,
        Phase::Optimizer,
        Phase::WeightSync,
        Phase::Checkpoint,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::RolloutWait => "rollout_wait",
            Phase::Reference => "reference",
            Phase::ForwardBackward => "forward_backward",
            Phase::Optimizer => "optimizer",
            Phase::WeightSync => "weight_sync",
            Phase::Checkpoint => "checkpoint",
        }
    }
}

/// Mean and standard deviation of one reward function over a step's completions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RewardStats {
    pub name: String,
    pub mean: f64,
    pub std: f64,
}

/// The GRPO-only part of a step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GrpoMetrics {
    /// One entry per reward function, plus (by convention) `total` for the combined reward.
    pub rewards: Vec<RewardStats>,
    /// Fraction of completions judged correct by the accuracy reward, in [0, 1].
    pub accuracy: f64,
    pub kl: f64,
    pub clip_fraction: f64,
    pub entropy: f64,
    /// Mean completion length in tokens.
    pub response_length: f64,
    /// Fraction of groups whose rewards are all equal (zero advantage, no gradient signal), over
    /// every group sampled in the step.
    pub zero_advantage_fraction: f64,
    /// Prompt-sampling rounds of the step, mean over ranks: 1, or more when
    /// `grpo.dynamicSampling` refilled the batch.
    pub sampling_rounds: f64,
}

/// Everything one optimizer step reports. Fields the step does not know stay at their default
/// and `None` fields are not exported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    pub samples_per_second: f64,
    /// Model FLOPs utilisation in [0, 1]; only meaningful on GPUs.
    pub mfu: Option<f64>,
    /// Seconds spent in each phase during this step (added to the phase counters).
    pub phase_seconds: Vec<(Phase, f64)>,
    pub grpo: Option<GrpoMetrics>,
}

impl StepMetrics {
    /// One flat JSON object for `metrics.jsonl` (the input of `onevision report`): `step`, `loss`,
    /// `learning_rate`, `grad_norm`, `tokens_per_second`, `samples_per_second`, `mfu`,
    /// `time/<phase>`, and for GRPO `reward` (the `total` reward, else the mean over reward
    /// functions), `reward/<name>`, `reward_std/<name>`, `accuracy`, `kl`, `clip_fraction`,
    /// `entropy`, `response_length`, `zero_advantage_fraction`, `sampling_rounds`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("step".into(), json!(self.step));
        m.insert("total_steps".into(), json!(self.total_steps));
        m.insert("loss".into(), json!(self.loss));
        m.insert("learning_rate".into(), json!(self.learning_rate));
        m.insert("grad_norm".into(), json!(self.grad_norm));
        m.insert("tokens_per_second".into(), json!(self.tokens_per_second));
        m.insert("samples_per_second".into(), json!(self.samples_per_second));
        if let Some(mfu) = self.mfu {
            m.insert("mfu".into(), json!(mfu));
        }
        for (phase, secs) in &self.phase_seconds {
            m.insert(format!("time/{}", phase.as_str()), json!(secs));
        }
        if let Some(g) = &self.grpo {
            let total = g.rewards.iter().find(|r| r.name == "total").map(|r| r.mean).or_else(|| {
                (!g.rewards.is_empty())
                    .then(|| g.rewards.iter().map(|r| r.mean).sum::<f64>() / g.rewards.len() as f64)
            });
            if let Some(t) = total {
                m.insert("reward".into(), json!(t));
            }
            for r in &g.rewards {
                m.insert(format!("reward/{}", r.name), json!(r.mean));
                m.insert(format!("reward_std/{}", r.name), json!(r.std));
            }
            m.insert("accuracy".into(), json!(g.accuracy));
            m.insert("kl".into(), json!(g.kl));
            m.insert("clip_fraction".into(), json!(g.clip_fraction));
            m.insert("entropy".into(), json!(g.entropy));
            m.insert("response_length".into(), json!(g.response_length));
            m.insert("zero_advantage_fraction".into(), json!(g.zero_advantage_fraction));
            m.insert("sampling_rounds".into(), json!(g.sampling_rounds));
        }
        Value::Object(m)
    }
}

/// All trainer metric families (`onevision_trainer_*`).
#[derive(Clone, Default)]
struct TrainerFamilies {
    step: Family<JobLabels, Gauge>,
    total_steps: Family<JobLabels, Gauge>,
    loss: Family<JobLabels, GaugeF>,
    learning_rate: Family<JobLabels, GaugeF>,
    grad_norm: Family<JobLabels, GaugeF>,
    tokens_per_second: Family<JobLabels, GaugeF>,
    samples_per_second: Family<JobLabels, GaugeF>,
    mfu: Family<JobLabels, GaugeF>,
    phase_seconds: Family<PhaseLabels, CounterF>,
    reward_mean: Family<RewardLabels, GaugeF>,
    reward_std: Family<RewardLabels, GaugeF>,
    accuracy: Family<SplitLabels, GaugeF>,
    kl: Family<JobLabels, GaugeF>,
    clip_fraction: Family<JobLabels, GaugeF>,
    entropy: Family<JobLabels, GaugeF>,
    response_length: Family<JobLabels, GaugeF>,
    zero_advantage_fraction: Family<JobLabels, GaugeF>,
    sampling_rounds: Family<JobLabels, GaugeF>,
    rollout_workers: Family<JobLabels, Gauge>,
    memory: Family<MemoryLabels, Gauge>,
    last_checkpoint: Family<JobLabels, Gauge>,
}

/// All rollout metric families (`onevision_rollout_*`).
#[derive(Clone)]
struct RolloutFamilies {
    generated_tokens: Family<WorkerLabels, Counter>,
    requests: Family<WorkerLabels, Counter>,
    request_duration: Family<WorkerLabels, Histogram, fn() -> Histogram>,
    queue_depth: Family<WorkerLabels, Gauge>,
    batch_occupancy: Family<WorkerLabels, GaugeF>,
    weight_version: Family<WorkerLabels, Gauge>,
    weight_version_lag: Family<WorkerLabels, Gauge>,
    memory: Family<MemoryLabels, Gauge>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(REQUEST_LATENCY_BUCKETS)
}

/// The process's metric registry: create one, hand out recorders, serve it on `/metrics`.
/// Cloning shares the registry.
#[derive(Clone)]
pub struct Telemetry {
    registry: Arc<Mutex<Registry>>,
    trainer: TrainerFamilies,
    rollout: RolloutFamilies,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// Register every trainer and rollout family. Families without samples are not exported,
    /// so a rollout-only process shows no trainer series.
    pub fn new() -> Telemetry {
        let mut root = Registry::with_prefix("onevision");
        let t = TrainerFamilies::default();
        let r = RolloutFamilies {
            generated_tokens: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            queue_depth: Family::default(),
            batch_occupancy: Family::default(),
            weight_version: Family::default(),
            weight_version_lag: Family::default(),
            memory: Family::default(),
        };
        {
            let reg = root.sub_registry_with_prefix("trainer");
            reg.register("step", "Last completed optimizer step", t.step.clone());
            reg.register("total_steps", "Optimizer steps the job will run", t.total_steps.clone());
            reg.register("loss", "Training loss of the last step", t.loss.clone());
            reg.register("learning_rate", "Learning rate of the last step", t.learning_rate.clone());
            reg.register("grad_norm", "Global gradient norm before clipping", t.grad_norm.clone());
            reg.register(
                "tokens_per_second",
                "Training tokens processed per second by this rank (last step)",
                t.tokens_per_second.clone(),
            );
            reg.register(
                "samples_per_second",
                "Training samples processed per second by this rank (last step)",
                t.samples_per_second.clone(),
            );
            reg.register("mfu_ratio", "Model FLOPs utilisation of this rank (GPU)", t.mfu.clone());
            reg.register(
                "step_phase_seconds",
                "Wall seconds spent per step phase (rollout_wait, reference, forward_backward, optimizer, weight_sync, checkpoint)",
                t.phase_seconds.clone(),
            );
            reg.register("reward_mean", "Mean reward per reward function (last step)", t.reward_mean.clone());
            reg.register("reward_std", "Reward standard deviation per reward function (last step)", t.reward_std.clone());
            reg.register("accuracy_ratio", "Fraction of correct completions, by split", t.accuracy.clone());
            reg.register("kl", "KL divergence of the policy to the reference model", t.kl.clone());
            reg.register("clip_fraction_ratio", "Fraction of tokens whose ratio was clipped", t.clip_fraction.clone());
            reg.register("entropy", "Mean token entropy of the policy over completions", t.entropy.clone());
            reg.register(
                "response_length_tokens",
                "Mean completion length in tokens",
                t.response_length.clone(),
            );
            reg.register(
                "zero_advantage_fraction_ratio",
                "Fraction of prompt groups with identical rewards (no learning signal)",
                t.zero_advantage_fraction.clone(),
            );
            reg.register(
                "sampling_rounds",
                "Prompt-sampling rounds of the last GRPO step, mean over ranks (above 1 when grpo.dynamicSampling refilled the batch)",
                t.sampling_rounds.clone(),
            );
            reg.register("rollout_workers", "Rollout workers registered and healthy", t.rollout_workers.clone());
            reg.register("memory_bytes", "Memory in use, by area (host_rss, device)", t.memory.clone());
            reg.register(
                "last_checkpoint_timestamp_seconds",
                "Unix time of the last completed checkpoint",
                t.last_checkpoint.clone(),
            );
        }
        {
            let reg = root.sub_registry_with_prefix("rollout");
            reg.register("generated_tokens", "Completion tokens generated", r.generated_tokens.clone());
            reg.register("requests", "Prompt-group requests completed", r.requests.clone());
            reg.register(
                "request_duration_seconds",
                "Seconds from accepting a prompt group to its last completion",
                r.request_duration.clone(),
            );
            reg.register("queue_depth", "Prompt groups accepted and not finished", r.queue_depth.clone());
            reg.register(
                "batch_occupancy_ratio",
                "Fraction of the decode batch's sequence slots in use",
                r.batch_occupancy.clone(),
            );
            reg.register("weight_version", "Policy weight version the worker serves", r.weight_version.clone());
            reg.register(
                "weight_version_lag",
                "Trainer's latest weight version minus the version this worker serves",
                r.weight_version_lag.clone(),
            );
            reg.register("memory_bytes", "Memory in use, by area (host_rss, device)", r.memory.clone());
        }
        Telemetry { registry: Arc::new(Mutex::new(root)), trainer: t, rollout: r }
    }

    /// Recorder for one trainer rank of `job`.
    pub fn trainer(&self, job: &JobLabels) -> TrainerMetrics {
        TrainerMetrics { f: self.trainer.clone(), job: job.clone() }
    }

    /// Recorder for rollout worker `worker` of `job`.
    pub fn rollout(&self, job: &JobLabels, worker: &str) -> RolloutMetrics {
        RolloutMetrics {
            f: self.rollout.clone(),
            labels: WorkerLabels {
                namespace: job.namespace.clone(),
                job_name: job.job_name.clone(),
                kind: job.kind.clone(),
                worker: worker.into(),
            },
        }
    }

    /// The registry in OpenMetrics text format (what `/metrics` serves).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // A poisoned lock only means another thread panicked mid-encode; the registry itself
        // is still consistent (metrics are atomics), so keep serving.
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        out
    }
}

/// Records a trainer rank's metrics. Cheap to clone.
#[derive(Clone)]
pub struct TrainerMetrics {
    f: TrainerFamilies,
    job: JobLabels,
}

impl TrainerMetrics {
    fn with<L>(&self, extra: &str, make: impl FnOnce(String, String, String, String) -> L) -> L {
        make(self.job.namespace.clone(), self.job.job_name.clone(), self.job.kind.clone(), extra.into())
    }

    /// Publish one optimizer step.
    pub fn record_step(&self, m: &StepMetrics) {
        let j = &self.job;
        self.f.step.get_or_create(j).set(m.step as i64);
        self.f.total_steps.get_or_create(j).set(m.total_steps as i64);
        self.f.loss.get_or_create(j).set(m.loss);
        self.f.learning_rate.get_or_create(j).set(m.learning_rate);
        self.f.grad_norm.get_or_create(j).set(m.grad_norm);
        self.f.tokens_per_second.get_or_create(j).set(m.tokens_per_second);
        self.f.samples_per_second.get_or_create(j).set(m.samples_per_second);
        if let Some(mfu) = m.mfu {
            self.f.mfu.get_or_create(j).set(mfu);
        }
        for (phase, secs) in &m.phase_seconds {
            self.add_phase_seconds(*phase, *secs);
        }
        if let Some(g) = &m.grpo {
            for r in &g.rewards {
                let l = self.with(&r.name, |namespace, job_name, kind, reward| RewardLabels {
                    namespace,
                    job_name,
                    kind,
                    reward,
                });
                self.f.reward_mean.get_or_create(&l).set(r.mean);
                self.f.reward_std.get_or_create(&l).set(r.std);
            }
            self.set_accuracy("train", g.accuracy);
            self.f.kl.get_or_create(j).set(g.kl);
            self.f.clip_fraction.get_or_create(j).set(g.clip_fraction);
            self.f.entropy.get_or_create(j).set(g.entropy);
            self.f.response_length.get_or_create(j).set(g.response_length);
            self.f.zero_advantage_fraction.get_or_create(j).set(g.zero_advantage_fraction);
            self.f.sampling_rounds.get_or_create(j).set(g.sampling_rounds);
        }
    }

    /// Add wall seconds to one step phase (for phases timed outside `record_step`).
    pub fn add_phase_seconds(&self, phase: Phase, secs: f64) {
        if !(secs.is_finite() && secs >= 0.0) {
            return; // a counter must never decrease; a bad clock reading is dropped
        }
        let l = self.with(phase.as_str(), |namespace, job_name, kind, phase| PhaseLabels {
            namespace,
            job_name,
            kind,
            phase,
        });
        self.f.phase_seconds.get_or_create(&l).inc_by(secs);
    }

    /// Accuracy on `split` (`train` from GRPO rewards, `eval` from evaluation runs).
    pub fn set_accuracy(&self, split: &str, accuracy: f64) {
        let l = self.with(split, |namespace, job_name, kind, split| SplitLabels {
            namespace,
            job_name,
            kind,
            split,
        });
        self.f.accuracy.get_or_create(&l).set(accuracy);
    }

    /// Number of healthy rollout workers the trainer can send prompts to.
    pub fn set_rollout_workers(&self, n: usize) {
        self.f.rollout_workers.get_or_create(&self.job).set(n as i64);
    }

    /// A checkpoint finished at `unix_seconds`.
    pub fn checkpoint_saved(&self, unix_seconds: i64) {
        self.f.last_checkpoint.get_or_create(&self.job).set(unix_seconds);
    }

    /// Memory in use, `area` = `host_rss` or `device`; `rank` tells ranks of one process apart.
    pub fn set_memory(&self, area: &str, rank: &str, bytes: u64) {
        let l = MemoryLabels {
            namespace: self.job.namespace.clone(),
            job_name: self.job.job_name.clone(),
            kind: self.job.kind.clone(),
            memory: area.into(),
            worker: rank.into(),
        };
        self.f.memory.get_or_create(&l).set(bytes.min(i64::MAX as u64) as i64);
    }
}

/// Records one rollout worker's metrics. Cheap to clone.
#[derive(Clone)]
pub struct RolloutMetrics {
    f: RolloutFamilies,
    labels: WorkerLabels,
}

impl RolloutMetrics {
    /// One prompt group finished: `tokens` completion tokens generated in `seconds`.
    pub fn request_finished(&self, tokens: u64, seconds: f64) {
        self.f.generated_tokens.get_or_create(&self.labels).inc_by(tokens);
        self.f.requests.get_or_create(&self.labels).inc();
        if seconds.is_finite() && seconds >= 0.0 {
            self.f.request_duration.get_or_create(&self.labels).observe(seconds);
        }
    }

    /// Tokens generated so far by a request still running (for a smooth tokens/s curve).
    pub fn add_generated_tokens(&self, tokens: u64) {
        self.f.generated_tokens.get_or_create(&self.labels).inc_by(tokens);
    }

    pub fn set_queue_depth(&self, groups: usize) {
        self.f.queue_depth.get_or_create(&self.labels).set(groups as i64);
    }

    /// `active` sequences of `capacity` decode slots in use.
    pub fn set_batch_occupancy(&self, active: usize, capacity: usize) {
        let ratio = if capacity == 0 { 0.0 } else { active as f64 / capacity as f64 };
        self.f.batch_occupancy.get_or_create(&self.labels).set(ratio);
    }

    /// The worker serves `serving`; the newest version the trainer has published is `latest`.
    pub fn set_weight_version(&self, serving: u64, latest: u64) {
        self.f.weight_version.get_or_create(&self.labels).set(serving as i64);
        self.f
            .weight_version_lag
            .get_or_create(&self.labels)
            .set(latest.saturating_sub(serving) as i64);
    }

    pub fn set_memory(&self, area: &str, bytes: u64) {
        let l = MemoryLabels {
            namespace: self.labels.namespace.clone(),
            job_name: self.labels.job_name.clone(),
            kind: self.labels.kind.clone(),
            memory: area.into(),
            worker: self.labels.worker.clone(),
        };
        self.f.memory.get_or_create(&l).set(bytes.min(i64::MAX as u64) as i64);
    }
}

/// Resident set size of this process (Linux `/proc/self/statm`); `None` elsewhere.
pub fn process_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // 4 KiB pages on every Linux target the workers run on (x86_64, aarch64 default kernels).
    Some(pages * 4096)
}
