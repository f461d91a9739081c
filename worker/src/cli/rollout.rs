//! `onevision rollout`: the rollout-worker pod entrypoint. Loads the policy model, serves the
//! `onevision.v1.Rollout` service and `grpc.health.v1`, registers with the job's coordinator
//! (retrying until it is up, renewing the lease), and on SIGTERM/Ctrl-C reports NOT_SERVING,
//! deregisters and drains in-flight calls before exiting.
//!
//! Configuration comes from the environment the operator sets (operator/src/env.rs) and the job
//! spec it mounts; flags override both.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args as ClapArgs;
use onevision_comms::coordinator::{CoordinatorClient, RetryPolicy, RolloutLease};
use onevision_proto::v1;

use crate::rollout::{serve_rollout, Engine, EngineConfig, ServerConfig};
use crate::runtime::RuntimeError;
use crate::telemetry::{metrics_addr_from_env, JobLabels, Telemetry};

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Job spec (the operator mounts it at /etc/onevision/job.yaml): model path, group size,
    /// batch size and max new tokens are read from it.
    #[arg(long, env = "ONEVISION_JOB_SPEC")]
    pub job: Option<PathBuf>,
    /// HF checkpoint directory (overrides the job spec's `spec.model.path`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Address the gRPC server binds (port 0 = any free port).
    #[arg(long, env = "ONEVISION_ROLLOUT_LISTEN", default_value = "0.0.0.0:0")]
    pub listen: SocketAddr,
    /// host:port the trainer reaches this worker at (default: $POD_IP, else 127.0.0.1, with the
    /// bound port).
    #[arg(long)]
    pub advertise: Option<String>,
    /// host:port of the job's coordinator (trainer rank 0); without it the worker serves
    /// unregistered (clients must know its address).
    #[arg(long, env = "ONEVISION_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Worker id in the registry (default: $POD_NAME, else <pool>-<replica index>).
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Sequences decoded concurrently, advertised to the trainer (default: the spec's
    /// rollout.batchSize × grpo.groupSize, else 64).
    #[arg(long)]
    pub capacity: Option<u32>,
    /// Prompt groups queued beyond which new ones are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 256)]
    pub queue_limit: usize,
    /// Milliseconds a group whose min_model_version is ahead waits for the weights.
    #[arg(long, default_value_t = 5000)]
    pub version_wait_ms: u64,
    /// max_new_tokens for requests that leave it 0 (default: the spec's grpo.maxNewTokens, else 256).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Seconds in-flight calls may take to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub drain_secs: u64,
    /// Give up registering after this many seconds without a reachable coordinator.
    #[arg(long, default_value_t = 600)]
    pub register_timeout_secs: u64,
}

/// What the job spec tells a rollout worker.
#[derive(Debug, Default, PartialEq)]
struct SpecSettings {
    model_path: Option<String>,
    group_size: Option<u32>,
    batch_size: Option<u32>,
    max_new_tokens: Option<usize>,
    name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum SpecError {
    #[error("cannot read the job spec {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("job spec {path} is not valid YAML: {source}")]
    Yaml { path: String, source: serde_yaml::Error },
}

fn read_spec(path: &std::path::Path) -> Result<SpecSettings, SpecError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io { path: p.clone(), source })?;
    let v: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|source| SpecError::Yaml { path: p, source })?;
    let spec = &v["spec"];
    let num = |x: &serde_yaml::Value| x.as_u64().filter(|&n| n > 0);
    Ok(SpecSettings {
        model_path: spec["model"]["path"].as_str().map(str::to_string),
        group_size: num(&spec["grpo"]["groupSize"]).map(|n| n as u32),
        batch_size: num(&spec["rollout"]["batchSize"]).map(|n| n as u32),
        max_new_tokens: num(&spec["grpo"]["maxNewTokens"]).map(|n| n as usize),
        name: v["metadata"]["name"].as_str().map(str::to_string),
    })
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// An error `main` turns into the permanent-failure exit code: the operator must not restart
/// us for this. (Returned, not exited on the spot, so buffered spans are flushed.)
fn permanent(msg: String) -> anyhow::Error {
    RuntimeError::Config(msg).into()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let spec = match &args.job {
        Some(p) if p.exists() || args.model.is_none() => read_spec(p).map_err(|e| permanent(e.to_string()))?,
        _ => SpecSettings::default(),
    };
    let model_dir = match args.model.clone().or_else(|| spec.model_path.clone().map(PathBuf::from)) {
        Some(d) => d,
        None => {
            return Err(permanent(
                "no model: pass --model DIR or a job spec (--job / ONEVISION_JOB_SPEC) with spec.model.path".into(),
            ))
        }
    };
    let worker_id = args
        .worker_id
        .clone()
        .or_else(|| env("POD_NAME"))
        .or_else(|| {
            let pool = env("ONEVISION_POOL_NAME")?;
            Some(format!("{pool}-{}", env("ONEVISION_REPLICA_INDEX").unwrap_or_else(|| "0".into())))
        })
        .unwrap_or_else(|| format!("rollout-{}", std::process::id()));
    let capacity = args
        .capacity
        .or_else(|| Some(spec.batch_size? * spec.group_size?))
        .unwrap_or(64)
        .max(1);
    let engine_cfg = EngineConfig {
        model_name: spec
            .name
            .clone()
            .unwrap_or_else(|| model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
        default_max_new_tokens: args.max_new_tokens.or(spec.max_new_tokens).unwrap_or(256),
    };
    tracing::info!(model = %model_dir.display(), %worker_id, capacity, "loading rollout model");
    if !model_dir.join("config.json").exists() {
        return Err(permanent(format!(
            "{} holds no config.json: not a Hugging Face checkpoint directory",
            model_dir.display()
        )));
    }
    let engine = match Engine::load(&model_dir, engine_cfg) {
        Ok(e) => Arc::new(e),
        Err(e) => return Err(permanent(e.to_string())),
    };
    let server_cfg = ServerConfig {
        worker_id: worker_id.clone(),
        capacity,
        queue_limit: args.queue_limit.max(1),
        version_wait: Duration::from_millis(args.version_wait_ms),
        max_message_bytes: onevision_proto::MAX_MESSAGE_BYTES,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(serve(args, engine, server_cfg))
}

async fn serve(args: Args, engine: Arc<Engine>, cfg: ServerConfig) -> anyhow::Result<()> {
    let worker_id = cfg.worker_id.clone();
    let telemetry = Telemetry::new();
    let job = JobLabels::new(
        &env("ONEVISION_JOB_NAMESPACE").unwrap_or_else(|| "default".into()),
        &env("ONEVISION_JOB_NAME").unwrap_or_else(|| "local".into()),
        &env("ONEVISION_JOB_KIND").unwrap_or_else(|| "GRPOJob".into()),
    );
    let metrics = telemetry.rollout(&job, &worker_id);
    let _metrics_server = match metrics_addr_from_env()? {
        Some(addr) => Some(telemetry.serve(addr).await?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the rollout server on {}: {e} (is the port in use?)", args.listen))?;
    let server = serve_rollout(listener, engine.clone(), cfg.clone(), Some(metrics.clone())).await?;
    let port = server.local_addr().port();
    let address = args
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{}:{port}", env("POD_IP").unwrap_or_else(|| "127.0.0.1".into())));
    // The local runner and tests read this line to find the worker.
    println!("rollout worker {worker_id} listening on {address}");

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut lease: Option<RolloutLease> = None;
    if let Some(coord) = args.coordinator.clone() {
        let policy = RetryPolicy { give_up_after: Duration::from_secs(args.register_timeout_secs), ..RetryPolicy::default() };
        let client = CoordinatorClient::new(&coord, policy)?;
        let req = v1::RegisterRolloutRequest {
            worker_id: worker_id.clone(),
            address: address.clone(),
            capacity: cfg.capacity,
            model_version: engine.version(),
        };
        // Registration retries until the coordinator is up (trainer pods may start later).
        let registering = client.keep_registered(req);
        tokio::pin!(registering);
        tokio::select! {
            r = &mut registering => match r {
                Ok(l) => {
                    tracing::info!(coordinator = %coord, trainer_version = l.trainer_model_version(), "registered with the coordinator");
                    metrics.set_weight_version(engine.version(), l.trainer_model_version());
                    lease = Some(l);
                }
                Err(e) => {
                    let _ = server.stop(Duration::from_secs(1)).await;
                    anyhow::bail!("cannot register with the coordinator at {coord}: {e}");
                }
            },
            _ = &mut shutdown => {
                // The registration may already have landed with its reply still on the wire:
                // finish it briefly and release it, so no entry lingers until its lease expires.
                match tokio::time::timeout(Duration::from_secs(2), &mut registering).await {
                    Ok(Ok(l)) => match tokio::time::timeout(Duration::from_secs(5), l.release()).await {
                        Ok(Ok(_)) => tracing::info!("stopped while registering; deregistered"),
                        _ => tracing::warn!("stopped while registering; deregistration failed, the lease expires on its own"),
                    },
                    _ => tracing::info!("stopped before registering"),
                }
                return server.stop(Duration::from_secs(args.drain_secs)).await.map_err(Into::into);
            }
        }
        // Renewals announce the version this worker serves.
        if let Some(l) = &lease {
            let mut rx = engine.subscribe_version();
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    r = rx.changed() => {
                        if r.is_err() {
                            (&mut shutdown).await;
                            break;
                        }
                        let v = *rx.borrow_and_update();
                        l.set_model_version(v);
                        metrics.set_weight_version(v, v.max(l.trainer_model_version()));
                    }
                }
            }
        }
    } else {
        (&mut shutdown).await;
    }
    tracing::info!("shutting down: deregistering and draining");
    if let Some(l) = lease {
        match tokio::time::timeout(Duration::from_secs(5), l.release()).await {
            Ok(Ok(_)) => tracing::info!("deregistered"),
            Ok(Err(e)) => tracing::warn!(error = %e, "deregistration failed; the lease expires on its own"),
            Err(_) => tracing::warn!("deregistration timed out; the lease expires on its own"),
        }
    }
    server.stop(Duration::from_secs(args.drain_secs)).await?;
    Ok(())
}

/// SIGTERM (pod deletion, scale-down) or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_spec_settings() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("job.yaml");
        std::fs::write(
            &p,
            "apiVersion: onevision.dev/v1alpha1\nkind: GRPOJob\nmetadata: {name: q}\nspec:\n  model: {path: /m}\n  \
             grpo: {groupSize: 4, maxNewTokens: 64}\n  rollout: {replicas: 2, batchSize: 8}\n",
        )
        .unwrap();
        let s = read_spec(&p).unwrap();
        assert_eq!(
            s,
            SpecSettings {
                model_path: Some("/m".into()),
                group_size: Some(4),
                batch_size: Some(8),
                max_new_tokens: Some(64),
                name: Some("q".into())
            }
        );
        std::fs::write(&p, "spec: [unclosed").unwrap();
        assert!(matches!(read_spec(&p), Err(SpecError::Yaml { .. })));
    }
}
