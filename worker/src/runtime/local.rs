//! `onevision run FILE.yaml [--workdir DIR]`: the jobs of a manifest as local processes.
//!
//! The pods come from the operator's planner (`trainer_pods`, `rollout_pool_for` +
//! `rollout_pods`, `job_config_map`, `resolve_model_path`), the single source of pod specs; only
//! what a laptop needs is rewritten: the job file path (a file in the workdir instead of the
//! ConfigMap mount), `MASTER_ADDR`/`ONEVISION_COORDINATOR` (127.0.0.1 with free ports), the
//! downward-API variables, the storage paths (`storage.mountPath` → `--data-root`) and
//! `output.path` (→ `DIR/<job>`), and `ONEVISION_METRICS_ADDR` (every pod's `0.0.0.0:9400`
//! would clash on one host: each process gets `127.0.0.1:<free port>`, listed for Prometheus in
//! `DIR/<job>/metrics-targets.json`). SFTJobs run before GRPOJobs so `model.fromSFTJob` resolves to
//! the SFT job's exported model. Failures restart the gang up to `runPolicy.backoffLimit` times
//! unless the exit code says the error is permanent, as the operator does.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use onevision_operator::api::{JobPhase, SFTJob};
use onevision_operator::env as k;
use onevision_operator::job::AnyJob;
use onevision_operator::planner::{self, condition, reason};
use serde::Deserialize;

use super::report::{now, read_status, set_condition, write_atomic, StatusFile, STATUS_FILE};
use super::signals::StopFlag;
use super::{io_err, Result, RuntimeError};

/// Options of `onevision run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub file: PathBuf,
    pub workdir: PathBuf,
    /// Local directory standing in for `storage.mountPath` (default: the workdir).
    pub data_root: Option<PathBuf>,
    /// The `onevision` binary the pods run (default: this executable).
    pub exe: Option<PathBuf>,
    /// Progress bars (None: when stderr is a terminal).
    pub progress_bars: Option<bool>,
}

/// How one job ended.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub name: String,
    pub kind: String,
    pub phase: JobPhase,
    pub dir: PathBuf,
    pub restarts: i32,
    pub seconds: f64,
    pub skipped: bool,
}

/// Every SFTJob/GRPOJob document of a multi-document YAML file, in file order.
pub fn read_manifests(path: &Path) -> Result<Vec<AnyJob>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut jobs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| RuntimeError::Config(format!("{}: document {}: {e}", path.display(), i + 1)))?;
        if value.is_null() {
            continue;
        }
        let one = serde_yaml::to_string(&value)
            .map_err(|e| RuntimeError::Config(format!("{}: document {}: {e}", path.display(), i + 1)))?;
        let job = AnyJob::from_yaml(&one)
            .map_err(|e| RuntimeError::Config(format!("{}: document {}: {e}", path.display(), i + 1)))?;
        jobs.push(job);
    }
    if jobs.is_empty() {
        return Err(RuntimeError::Config(format!("{}: no SFTJob or GRPOJob documents", path.display())));
    }
    Ok(jobs)
}

/// File in a job's directory listing the `/metrics` address of each of its processes, in
/// Prometheus `file_sd_configs` format: `[{"targets": ["127.0.0.1:PORT"], "labels": {"pod":
/// …, "role": …}}]`. Rewritten whenever the gang (re)starts.
pub const METRICS_TARGETS_FILE: &str = "metrics-targets.json";

/// Gives a process its own `/metrics` port: pods all use the same port in their own network
/// namespace, local processes share one. Returns the address (None: metrics disabled there).
fn assign_metrics_addr(env: &mut BTreeMap<String, String>) -> Result<Option<String>> {
    match env.get_mut(k::METRICS_ADDR) {
        Some(v) if !v.trim().is_empty() => {
            *v = format!("127.0.0.1:{}", free_port()?);
            Ok(Some(v.clone()))
        }
        _ => Ok(None),
    }
}

/// Writes [`METRICS_TARGETS_FILE`] for `(pod, role, address)`.
fn write_metrics_targets(dir: &Path, targets: &[(String, String, String)]) -> Result<PathBuf> {
    let groups: Vec<serde_json::Value> = targets
        .iter()
        .map(|(pod, role, addr)| serde_json::json!({"targets": [addr], "labels": {"pod": pod, "role": role}}))
        .collect();
    let path = dir.join(METRICS_TARGETS_FILE);
    let text = serde_json::to_vec_pretty(&groups).map_err(|e| RuntimeError::Config(e.to_string()))?;
    write_atomic(&path, &text)?;
    Ok(path)
}

/// A port for a child to listen on (below the ephemeral range: see [`onevision_comms::ports`]).
fn free_port() -> Result<u16> {
    onevision_comms::ports::free_port().map_err(io_err("a free local port"))
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Maps a path of the manifest to this machine: below `mount` (the storage mount path) it moves
/// under `root`; anything else stays (absolute paths that exist locally keep working).
pub fn map_path(p: &str, mount: &str, root: &Path) -> String {
    let mount = mount.trim_end_matches('/');
    if let Some(rest) = p.strip_prefix(mount).filter(|r| r.is_empty() || r.starts_with('/')) {
        return root.join(rest.trim_start_matches('/')).display().to_string();
    }
    p.to_string()
}

/// Runs `f` on the spec of either job kind.
macro_rules! with_spec {
    ($job:expr, |$s:ident| $body:expr) => {
        match $job {
            AnyJob::Sft(j) => {
                let $s = &mut j.spec;
                $body
            }
            AnyJob::Grpo(j) => {
                let $s = &mut j.spec;
                $body
            }
        }
    };
}

/// The job as it runs locally: namespace/uid filled in (the planner needs them), paths mapped.
pub fn localize(job: &AnyJob, workdir: &Path, data_root: &Path) -> AnyJob {
    let mut job = job.clone();
    let name = job.meta().name.clone().unwrap_or_default();
    let mount = job.common().storage.map(|s| s.mount_path.clone()).unwrap_or_else(|| "/data".into());
    let meta = match &mut job {
        AnyJob::Sft(j) => &mut j.metadata,
        AnyJob::Grpo(j) => &mut j.metadata,
    };
    meta.namespace.get_or_insert_with(|| "default".into());
    meta.uid.get_or_insert_with(|| format!("local-{name}"));
    let out = workdir.join(&name).display().to_string();
    with_spec!(&mut job, |s| {
        s.output.path = out;
        s.dataset.path = map_path(&s.dataset.path, &mount, data_root);
        if let Some(e) = s.eval.dataset.as_mut() {
            e.path = map_path(&e.path, &mount, data_root);
        }
        if let Some(m) = s.model.path.as_mut() {
            *m = map_path(m, &mount, data_root);
        }
    });
    job
}

/// A process started from a pod spec.
struct Proc {
    pod: String,
    child: Child,
    log: PathBuf,
    exit: Option<i32>,
}

/// Command line and environment of a planner pod, rewritten for this machine.
fn pod_command(
    pod: &Pod,
    exe: &Path,
    job_file: &Path,
    overrides: &BTreeMap<&str, String>,
) -> Result<(Vec<String>, BTreeMap<String, String>)> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let c = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .ok_or_else(|| RuntimeError::Config(format!("planner pod {name} has no container")))?;
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    if argv.is_empty() {
        return Err(RuntimeError::Config(format!("planner pod {name} has no command")));
    }
    argv[0] = exe.display().to_string();
    for a in argv.iter_mut().skip(1) {
        if a == k::JOB_SPEC_PATH {
            *a = job_file.display().to_string();
        }
    }
    let mut env = BTreeMap::new();
    for e in c.env.clone().unwrap_or_default() {
        let v = match (&e.value, e.value_from.as_ref().and_then(|f| f.field_ref.as_ref())) {
            (Some(v), _) => v.clone(),
            (None, Some(f)) => match f.field_path.as_str() {
                "status.podIP" => "127.0.0.1".into(),
                "metadata.name" => name.clone(),
                "metadata.namespace" => ns.clone(),
                other => {
                    tracing::warn!(pod = %name, field = other, "unsupported downward-API field; left empty");
                    String::new()
                }
            },
            (None, None) => String::new(),
        };
        env.insert(e.name.clone(), v);
    }
    for (key, v) in overrides {
        if env.contains_key(*key) || *key == super::env::RING_BIND {
            env.insert(key.to_string(), v.clone());
        }
    }
    env.insert(k::JOB_SPEC.into(), job_file.display().to_string());
    Ok((argv, env))
}

fn spawn(pod: &Pod, argv: &[String], env: &BTreeMap<String, String>, logs: &Path) -> Result<Proc> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    std::fs::create_dir_all(logs).map_err(io_err(logs))?;
    let log = logs.join(format!("{name}.log"));
    let f = std::fs::File::create(&log).map_err(io_err(&log))?;
    let f2 = f.try_clone().map_err(io_err(&log))?;
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(f))
        .stderr(Stdio::from(f2))
        .spawn()
        .map_err(|e| RuntimeError::Config(format!("cannot start {} for pod {name}: {e}", argv[0])))?;
    Ok(Proc { pod: name, child, log, exit: None })
}

fn signal(p: &Proc, sig: i32) {
    // SAFETY: kill(2) on a child's pid; no memory is touched.
    unsafe {
        libc::kill(p.child.id() as i32, sig);
    }
}

fn poll(p: &mut Proc) -> Option<i32> {
    if p.exit.is_none() {
        if let Ok(Some(st)) = p.child.try_wait() {
            use std::os::unix::process::ExitStatusExt;
            p.exit = Some(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)));
        }
    }
    p.exit
}

/// SIGTERM, then SIGKILL after `grace`.
fn terminate(procs: &mut [Proc], grace: Duration) {
    for p in procs.iter_mut() {
        if poll(p).is_none() {
            signal(p, libc::SIGTERM);
        }
    }
    let t = Instant::now();
    while t.elapsed() < grace && procs.iter_mut().any(|p| poll(p).is_none()) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in procs.iter_mut() {
        if poll(p).is_none() {
            let _ = p.child.kill();
            let _ = p.child.wait();
            p.exit = Some(137);
        }
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Terminal progress: a bar on a TTY, otherwise a plain line per step (at most one a second).
enum Display {
    Bar(indicatif::ProgressBar),
    Plain { last: Option<Instant>, last_step: i64 },
}

impl Display {
    fn new(bars: bool, job: &str, kind: &str) -> Self {
        if bars {
            let pb = indicatif::ProgressBar::new(0);
            pb.set_style(
                indicatif::ProgressStyle::with_template("{prefix:>18} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            pb.set_prefix(format!("{kind} {job}"));
            Display::Bar(pb)
        } else {
            Display::Plain { last: None, last_step: -1 }
        }
    }

    fn update(&mut self, job: &str, st: &StatusFile) {
        let Some(p) = &st.status.progress else { return };
        let mut msg = Vec::new();
        if let Some(l) = p.loss {
            msg.push(format!("loss {l:.4}"));
        }
        if let Some(r) = p.reward {
            msg.push(format!("reward {r:.3}"));
        }
        if let Some(a) = p.accuracy {
            msg.push(format!("acc {:.1}%", 100.0 * a));
        }
        let msg = msg.join("  ");
        match self {
            Display::Bar(pb) => {
                pb.set_length(p.total_steps.unwrap_or(0).max(0) as u64);
                pb.set_position(p.step.max(0) as u64);
                pb.set_message(msg);
            }
            Display::Plain { last, last_step } => {
                let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if p.step != *last_step && (due || Some(p.step) == p.total_steps) {
                    eprintln!("[{job}] step {}/{} {msg}", p.step, p.total_steps.unwrap_or(0));
                    *last = Some(Instant::now());
                    *last_step = p.step;
                }
            }
        }
    }

    fn finish(&self) {
        if let Display::Bar(pb) = self {
            pb.finish();
        }
    }
}

/// Runs every job of `opts.file` in order; see the module docs.
pub fn run(opts: &RunOptions) -> Result<Vec<JobOutcome>> {
    let jobs = read_manifests(&opts.file)?;
    let workdir = absolute(&opts.workdir);
    std::fs::create_dir_all(&workdir).map_err(io_err(&workdir))?;
    let data_root = absolute(opts.data_root.as_deref().unwrap_or(&workdir));
    let exe = match &opts.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe().map_err(io_err("current executable"))?,
    };
    let bars = opts.progress_bars.unwrap_or_else(|| std::io::stderr().is_terminal());
    // A worker thread keeps the signal listeners polled while this thread supervises.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| RuntimeError::Config(format!("cannot start the async runtime: {e}")))?;
    let stop = StopFlag::install(&rt);

    let mut order: Vec<&AnyJob> = jobs.iter().filter(|j| matches!(j, AnyJob::Sft(_))).collect();
    order.extend(jobs.iter().filter(|j| matches!(j, AnyJob::Grpo(_))));
    let mut succeeded: BTreeMap<String, SFTJob> = BTreeMap::new();
    let mut outcomes = Vec::new();
    for job in order {
        let local = localize(job, &workdir, &data_root);
        let out = run_job(&local, &workdir, &exe, bars, &stop, &succeeded)?;
        if let AnyJob::Sft(s) = &local {
            if out.phase == JobPhase::Succeeded {
                let mut s = s.clone();
                s.status.get_or_insert_with(Default::default).phase = Some(JobPhase::Succeeded);
                succeeded.insert(out.name.clone(), s);
            }
        }
        outcomes.push(out);
    }
    Ok(outcomes)
}

/// The SFTJob a `fromSFTJob` names: one that succeeded in this run, or earlier in the workdir.
fn source_sft(name: &str, workdir: &Path, succeeded: &BTreeMap<String, SFTJob>) -> Option<SFTJob> {
    if let Some(s) = succeeded.get(name) {
        return Some(s.clone());
    }
    let dir = workdir.join(name);
    let st = read_status(&dir.join(STATUS_FILE)).ok().flatten()?;
    (st.status.phase == Some(JobPhase::Succeeded)).then(|| {
        let text = std::fs::read_to_string(dir.join(k::JOB_SPEC_FILE)).ok()?;
        match AnyJob::from_yaml(&text).ok()? {
            AnyJob::Sft(mut s) => {
                s.status = Some(st.status.clone());
                Some(s)
            }
            AnyJob::Grpo(_) => None,
        }
    })?
}

fn run_job(
    job: &AnyJob,
    workdir: &Path,
    exe: &Path,
    bars: bool,
    stop: &StopFlag,
    succeeded: &BTreeMap<String, SFTJob>,
) -> Result<JobOutcome> {
    let c = job.common();
    let name = job.meta().name.clone().unwrap_or_default();
    let kind = job.kind().as_str().to_string();
    let dir = workdir.join(&name);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let source = c.model.from_sft_job.as_deref().and_then(|s| source_sft(s, workdir, succeeded));
    let model_path = planner::resolve_model_path(c.model, source.as_ref()).ok_or_else(|| {
        RuntimeError::Config(format!(
            "{kind} {name}: model.fromSFTJob {:?} has not succeeded (not in this file, and no succeeded {}/status.json)",
            c.model.from_sft_job.clone().unwrap_or_default(),
            workdir.join(c.model.from_sft_job.clone().unwrap_or_default()).display()
        ))
    })?;
    let cm = match job {
        AnyJob::Sft(j) => planner::job_config_map(j, &model_path),
        AnyJob::Grpo(j) => planner::job_config_map(j, &model_path),
    }
    .map_err(|e| RuntimeError::Config(e.to_string()))?;
    let job_text = cm.data.as_ref().and_then(|d| d.get(k::JOB_SPEC_FILE)).cloned().unwrap_or_default();
    let job_file = dir.join(k::JOB_SPEC_FILE);

    // A job that already succeeded with this exact spec is not run again.
    let status_path = dir.join(STATUS_FILE);
    let previous = read_status(&status_path).ok().flatten();
    let same_spec = std::fs::read_to_string(&job_file).is_ok_and(|t| t == job_text);
    if same_spec && previous.as_ref().is_some_and(|s| s.status.phase == Some(JobPhase::Succeeded)) {
        eprintln!("{kind} {name}: already succeeded in {} (delete it to run again)", dir.display());
        return Ok(JobOutcome {
            name,
            kind,
            phase: JobPhase::Succeeded,
            dir,
            restarts: previous.map_or(0, |s| s.status.restarts),
            seconds: 0.0,
            skipped: true,
        });
    }
    write_atomic(&job_file, job_text.as_bytes())?;
    let has_checkpoints = dir.join("checkpoints").read_dir().is_ok_and(|mut d| d.next().is_some());
    if has_checkpoints {
        eprintln!("{kind} {name}: resuming from the checkpoints in {}", dir.join("checkpoints").display());
    }

    let backoff = c.run_policy.backoff_limit;
    let mut restarts = previous.as_ref().filter(|_| has_checkpoints).map_or(0, |s| s.status.restarts);
    let started = Instant::now();
    eprintln!("{kind} {name}: {} trainer process(es), output in {}", c.trainer.nodes, dir.display());
    loop {
        let generation = restarts + i32::from(has_checkpoints && restarts == 0);
        let attempt = run_gang(job, &dir, &job_file, exe, generation, bars, stop)?;
        match attempt {
            GangEnd::Succeeded => break,
            GangEnd::Interrupted => {
                mark_status(&status_path, &kind, restarts, None)?;
                return Err(RuntimeError::Interrupted(format!(
                    "{kind} {name} stopped; its checkpoints are in {}; run the same command again to resume",
                    dir.join("checkpoints").display()
                )));
            }
            GangEnd::Failed { pod, code, tail } => {
                let permanent = code == crate::EXIT_PERMANENT;
                if permanent || restarts >= backoff {
                    let (why, msg) = if permanent {
                        (reason::PERMANENT_ERROR, format!("{pod} exited with code {code} (permanent error)"))
                    } else {
                        (reason::BACKOFF_LIMIT_EXCEEDED, format!("{pod} exited with code {code}; backoffLimit {backoff} reached"))
                    };
                    mark_status(&status_path, &kind, restarts, Some((why, &msg)))?;
                    return Err(RuntimeError::Stopped(format!(
                        "{kind} {name} failed: {msg}\n--- last lines of {} ---\n{tail}",
                        dir.join("logs").join(format!("{pod}.log")).display()
                    )));
                }
                restarts += 1;
                eprintln!("{kind} {name}: {pod} exited with code {code}; restarting the gang ({restarts}/{backoff})");
            }
        }
    }
    mark_status(&status_path, &kind, restarts, None)?;
    let st = read_status(&status_path)?;
    let secs = started.elapsed().as_secs_f64();
    if let Some(st) = &st {
        let ev = &st.evaluation;
        match (&ev.before, &ev.after) {
            (Some(b), Some(a)) => {
                eprintln!(
                    "{kind} {name}: Succeeded in {secs:.0}s; held-out accuracy {:.1}% -> {:.1}% (n={})",
                    100.0 * b.accuracy,
                    100.0 * a.accuracy,
                    a.n
                );
                for (c, after) in &a.by_category {
                    // A run resumed from an older checkpoint may lack the split of its first evaluation.
                    let before = b.by_category.get(c).map_or("?".to_string(), |x| format!("{:.1}%", 100.0 * x.accuracy));
                    eprintln!("  {c}: {before} -> {:.1}% (n={})", 100.0 * after.accuracy, after.n);
                }
                if let Some(sa) = &a.sampled {
                    let pct = |x: Option<f64>| x.map_or("?".to_string(), |v| format!("{:.1}%", 100.0 * v));
                    let sb = b.sampled.as_ref();
                    eprintln!(
                        "  sampled answers (mean of {} at T {}, top-p {}): {} -> {}",
                        sa.samples,
                        sa.temperature,
                        sa.top_p,
                        pct(sb.map(|x| x.accuracy)),
                        pct(Some(sa.accuracy))
                    );
                    for (c, after) in &sa.by_category {
                        eprintln!("    {c}: {} -> {}", pct(sb.and_then(|x| x.by_category.get(c).copied())), pct(Some(*after)));
                    }
                }
            }
            _ => eprintln!("{kind} {name}: Succeeded in {secs:.0}s"),
        }
    }
    Ok(JobOutcome { name, kind, phase: JobPhase::Succeeded, dir, restarts, seconds: secs, skipped: false })
}

/// Records restarts and, for a failure, the Failed phase and condition in `status.json`.
fn mark_status(path: &Path, kind: &str, restarts: i32, failed: Option<(&str, &str)>) -> Result<()> {
    let mut st = read_status(path)?.unwrap_or(StatusFile {
        kind: kind.to_string(),
        status: Default::default(),
        evaluation: Default::default(),
    });
    st.status.restarts = restarts;
    if let Some((why, msg)) = failed {
        st.status.phase = Some(JobPhase::Failed);
        st.status.completion_time = Some(now());
        st.status.active = 0;
        set_condition(&mut st.status, condition::RUNNING, false, why, msg);
        set_condition(&mut st.status, condition::FAILED, true, why, msg);
    }
    let text = serde_json::to_vec_pretty(&st).map_err(|e| RuntimeError::Config(e.to_string()))?;
    write_atomic(path, &text)
}

enum GangEnd {
    Succeeded,
    Interrupted,
    Failed { pod: String, code: i32, tail: String },
}

fn run_gang(
    job: &AnyJob,
    dir: &Path,
    job_file: &Path,
    exe: &Path,
    generation: i32,
    bars: bool,
    stop: &StopFlag,
) -> Result<GangEnd> {
    let name = job.meta().name.clone().unwrap_or_default();
    let pods = match job {
        AnyJob::Sft(j) => planner::trainer_pods(j, generation),
        AnyJob::Grpo(j) => planner::trainer_pods(j, generation),
    }
    .map_err(|e| RuntimeError::Config(e.to_string()))?;
    let coord_port = free_port()?;
    let mut overrides: BTreeMap<&str, String> = BTreeMap::new();
    overrides.insert(k::MASTER_ADDR, "127.0.0.1".into());
    overrides.insert(k::MASTER_PORT, free_port()?.to_string());
    overrides.insert(k::COORDINATOR, format!("127.0.0.1:{coord_port}"));
    overrides.insert(super::env::RING_BIND, "127.0.0.1:0".into());
    // Pods each own the fixed rollout port; local workers share one host and take any free one.
    overrides.insert(k::ROLLOUT_LISTEN, "127.0.0.1:0".into());
    let logs = dir.join("logs");
    let mut targets = Vec::new();
    let mut metrics_addr = |pod: &Pod, env: &mut BTreeMap<String, String>| -> Result<()> {
        if let Some(addr) = assign_metrics_addr(env)? {
            let role = env.get(k::ROLE).cloned().unwrap_or_default();
            targets.push((pod.metadata.name.clone().unwrap_or_default(), role, addr));
        }
        Ok(())
    };
    let mut trainers = Vec::new();
    for pod in &pods {
        let (argv, mut env) = pod_command(pod, exe, job_file, &overrides)?;
        env.insert(super::env::RING_BIND.into(), "127.0.0.1:0".into());
        metrics_addr(pod, &mut env)?;
        trainers.push(spawn(pod, &argv, &env, &logs)?);
    }
    let mut rollouts = Vec::new();
    if let AnyJob::Grpo(j) = job {
        if j.spec.rollout.replicas > 0 {
            let pool = planner::rollout_pool_for(j, j.spec.rollout.replicas, false)
                .map_err(|e| RuntimeError::Config(e.to_string()))?;
            let mut pool = pool;
            pool.metadata.uid.get_or_insert_with(|| format!("local-{name}-rollout"));
            for pod in planner::rollout_pods(&pool).map_err(|e| RuntimeError::Config(e.to_string()))? {
                let (argv, mut env) = pod_command(&pod, exe, job_file, &overrides)?;
                metrics_addr(&pod, &mut env)?;
                rollouts.push(spawn(&pod, &argv, &env, &logs)?);
            }
        }
    }
    if !targets.is_empty() {
        let path = write_metrics_targets(dir, &targets)?;
        tracing::info!(file = %path.display(), "/metrics addresses of the job's processes (Prometheus file_sd format)");
    }

    let mut display = Display::new(bars, &name, job.kind().as_str());
    let status_path = dir.join(STATUS_FILE);
    let mut forwarded = false;
    let end = loop {
        if stop.is_set() && !forwarded {
            // Trainers checkpoint at the next step boundary and exit.
            for p in trainers.iter().chain(rollouts.iter()) {
                if p.exit.is_none() {
                    signal(p, libc::SIGTERM);
                }
            }
            forwarded = true;
        }
        let codes: Vec<Option<i32>> = trainers.iter_mut().map(poll).collect();
        if let Some((i, c)) = codes.iter().enumerate().find_map(|(i, c)| c.filter(|&c| c != 0).map(|c| (i, c))) {
            // 130: a rank stopped on a signal (e.g. Ctrl-C reached the whole process group).
            if forwarded || c == super::EXIT_INTERRUPTED {
                stop.set("a trainer rank was interrupted");
                terminate(&mut trainers, Duration::from_secs(120));
                break GangEnd::Interrupted;
            }
            // One rank failed: the gang goes down together, as the operator restarts it.
            let pod = trainers[i].pod.clone();
            let tail = log_tail(&trainers[i].log, 15);
            terminate(&mut trainers, Duration::from_secs(10));
            break GangEnd::Failed { pod, code: c, tail };
        }
        if codes.iter().all(|c| *c == Some(0)) {
            break if forwarded { GangEnd::Interrupted } else { GangEnd::Succeeded };
        }
        for p in rollouts.iter_mut() {
            if p.exit.is_none() {
                if let Some(c) = poll(p) {
                    eprintln!("rollout {} exited with code {c} (see {})", p.pod, p.log.display());
                }
            }
        }
        if let Ok(Some(st)) = read_status(&status_path) {
            display.update(&name, &st);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    if let Ok(Some(st)) = read_status(&status_path) {
        display.update(&name, &st);
    }
    display.finish();
    terminate(&mut rollouts, Duration::from_secs(10));
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_process_gets_its_own_metrics_port_and_a_prometheus_target() {
        let mut a = BTreeMap::from([(k::METRICS_ADDR.to_string(), "0.0.0.0:9400".to_string())]);
        let mut b = a.clone();
        let (x, y) = (assign_metrics_addr(&mut a).unwrap().unwrap(), assign_metrics_addr(&mut b).unwrap().unwrap());
        assert_ne!(x, y, "two processes on one host need two ports");
        assert!(x.starts_with("127.0.0.1:") && x.parse::<std::net::SocketAddr>().is_ok(), "{x}");
        assert_eq!(a[k::METRICS_ADDR], x);
        // Disabled (the user set it empty) stays disabled.
        let mut off = BTreeMap::from([(k::METRICS_ADDR.to_string(), String::new())]);
        assert_eq!(assign_metrics_addr(&mut off).unwrap(), None);
        assert_eq!(assign_metrics_addr(&mut BTreeMap::new()).unwrap(), None);

        let dir = tempfile::tempdir().unwrap();
        let path = write_metrics_targets(dir.path(), &[("j-trainer-0".into(), "trainer".into(), x.clone())]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(v, serde_json::json!([{"targets": [x], "labels": {"pod": "j-trainer-0", "role": "trainer"}}]));
    }

    #[test]
    fn map_path_moves_only_paths_under_the_mount() {
        let root = Path::new("/tmp/w");
        assert_eq!(map_path("/data/x/train.jsonl", "/data", root), "/tmp/w/x/train.jsonl");
        assert_eq!(map_path("/data", "/data/", root), "/tmp/w/");
        assert_eq!(map_path("/database/x", "/data", root), "/database/x");
        assert_eq!(map_path("/models/m", "/data", root), "/models/m");
    }
}
