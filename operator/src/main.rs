//! `onevision-operator`: run the controllers, or print the CRDs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use onevision_operator::controller::{run_controllers, Context};
use onevision_operator::metrics::{self, Metrics};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "onevision-operator",
    version,
    about = "Kubernetes operator for SFTJob, GRPOJob and RolloutPool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers.
    Run {
        /// Watch only this namespace (default: all namespaces).
        #[arg(long, env = "ONEVISION_NAMESPACE")]
        namespace: Option<String>,
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, default_value = "0.0.0.0:8080", env = "ONEVISION_METRICS_ADDR")]
        metrics_addr: SocketAddr,
        /// Hold a coordination.k8s.io Lease so only one replica reconciles.
        #[arg(long)]
        leader_elect: bool,
        /// Namespace of the leader-election Lease (default: POD_NAMESPACE, then --namespace, then "default").
        #[arg(long, env = "ONEVISION_LEASE_NAMESPACE")]
        lease_namespace: Option<String>,
        /// Name of the leader-election Lease.
        #[arg(long, default_value = "onevision-operator")]
        lease_name: String,
    },
    /// Print every CRD as YAML (the chart's crds/ copy is generated from this).
    Crds,
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// How long leaving the process may wait for stray blocking tasks once everything has stopped.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(2);
/// How long releasing the leader Lease may take at shutdown (the next leader otherwise waits for
/// it to expire).
const LEASE_RELEASE: Duration = Duration::from_secs(5);
/// How long the metrics server may take to finish the requests in flight at shutdown.
const METRICS_DRAIN: Duration = Duration::from_secs(2);

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = runtime.block_on(async_main());
    // Dropping a runtime waits without limit for its blocking tasks; an exit must stay inside the
    // pod's termination grace period whatever a library left running.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    result
}

async fn async_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => {
            print!(
                "{}",
                onevision_operator::crdgen::crds_yaml().context("serializing the CRDs")?
            );
            Ok(())
        }
        Command::Run {
            namespace,
            metrics_addr,
            leader_elect,
            lease_namespace,
            lease_name,
        } => {
            // Logs on stderr; a `reconcile` span per reconcile exported over OTLP when
            // OTEL_EXPORTER_OTLP_ENDPOINT is set (chart value `otel.endpoint`).
            let pod_namespace = std::env::var("POD_NAMESPACE").unwrap_or_default();
            let guard = onevision_otel::Tracing::new("onevision-operator")
                .default_filter("info,kube=warn")
                .attribute("k8s.namespace.name", pod_namespace)
                .attribute(
                    "k8s.pod.name",
                    std::env::var("POD_NAME").unwrap_or_default(),
                )
                .init()
                .context("setting up tracing (check the OTEL_* environment)")?;
            let result = run(
                namespace,
                metrics_addr,
                leader_elect,
                lease_namespace,
                lease_name,
            )
            .await;
            // Flushes the spans still buffered, also when `run` failed. The exporter's batch
            // thread blocks on this runtime, so shut it down off the async workers.
            tokio::task::spawn_blocking(move || drop(guard))
                .await
                .context("flushing spans")?;
            result
        }
    }
}

async fn run(
    namespace: Option<String>,
    metrics_addr: SocketAddr,
    leader_elect: bool,
    lease_namespace: Option<String>,
    lease_name: String,
) -> anyhow::Result<()> {
    let client = Client::try_default().await.context(
        "connecting to Kubernetes (set KUBECONFIG or run in a pod with a service account)",
    )?;
    let metrics = Arc::new(Metrics::new());
    let instance = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok());
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        instance.clone(),
    ));

    // One signal fans out to the metrics server, the lease and the controllers.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested");
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let server = tokio::spawn(metrics::serve(
        metrics_addr,
        metrics.clone(),
        stopped(stop_rx.clone()),
    ));
    tracing::info!(%metrics_addr, namespace = namespace.as_deref().unwrap_or("<all>"), leader_elect, "starting");

    if !leader_elect {
        run_controllers(client, namespace, ctx, stopped(stop_rx.clone())).await;
    } else {
        let lease_ns = lease_namespace
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .or_else(|| namespace.clone())
            .unwrap_or_else(|| "default".into());
        let identity = format!(
            "{}-{}",
            instance.unwrap_or_else(|| "onevision-operator".into()),
            std::process::id()
        );
        let manager = LeaseManagerBuilder::new(client.clone(), &lease_name)
            .with_namespace(&lease_ns)
            .with_identity(&identity)
            .with_duration(15)
            .with_grace(5)
            .build()
            .await
            .with_context(|| format!("creating leader-election Lease {lease_ns}/{lease_name}"))?;
        let (mut leader, lease_task) = manager.watch().await;
        tracing::info!(lease = %format!("{lease_ns}/{lease_name}"), %identity, "waiting for leadership");
        let mut stop = stop_rx.clone();
        let became_leader = tokio::select! {
            r = leader.wait_for(|l| *l) => r.is_ok(),
            _ = stop.wait_for(|s| *s) => false,
        };
        if became_leader {
            tracing::info!("acquired leadership");
            // Stop reconciling the moment leadership is lost, so two replicas never act at once.
            let mut lost = leader.clone();
            let lost_or_stop = {
                let stop = stopped(stop_rx.clone());
                async move {
                    tokio::select! {
                        _ = lost.wait_for(|l| !*l) => tracing::error!("lost leadership; stopping"),
                        _ = stop => {}
                    }
                }
            };
            run_controllers(client, namespace, ctx, lost_or_stop).await;
        }
        // Dropping the receivers makes the lease task release the Lease and exit.
        drop(leader);
        match tokio::time::timeout(LEASE_RELEASE, lease_task).await {
            Ok(Ok(Ok(_))) => tracing::info!("released the Lease"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the Lease failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "lease task failed"),
            Err(_) => tracing::warn!("timed out releasing the Lease"),
        }
        if !*stop_rx.borrow() {
            anyhow::bail!("lost leadership of Lease {lease_ns}/{lease_name}; exiting so a fresh replica can campaign");
        }
    }
    // Graceful: it stopped accepting at the signal and finishes the requests in flight.
    if tokio::time::timeout(METRICS_DRAIN, server).await.is_err() {
        tracing::warn!("metrics server still busy {}s after shutdown; leaving it", METRICS_DRAIN.as_secs());
    }
    Ok(())
}
