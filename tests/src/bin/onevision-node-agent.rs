//! Test node agent: registers Nodes and runs the pods bound to them as local processes.
//! See docs/testing.md. Stops on SIGTERM/SIGINT (or stdin EOF with --exit-on-stdin-eof),
//! killing its pods and deleting its Nodes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use onevision_tests::agent::{run, AgentConfig, NetworkMode, NodeConfig};

#[derive(Parser, Debug)]
#[command(
    name = "onevision-node-agent",
    about = "Kubelet + scheduler for tests: runs pods as local processes"
)]
struct Args {
    /// JSON config (AgentConfig); flags below override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Agent name (state dir, event reporter instance).
    #[arg(long)]
    name: Option<String>,
    /// Node to register (repeatable); each gets --gpus nvidia.com/gpu.
    #[arg(long = "node")]
    nodes: Vec<String>,
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// Only bind unscheduled pods of these namespaces (repeatable; default all).
    #[arg(long = "namespace")]
    namespaces: Vec<String>,
    /// Act as scheduler for these schedulerNames (repeatable; default default-scheduler).
    #[arg(long = "scheduler-name")]
    scheduler_names: Vec<String>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Directory put first in every container's PATH (repeatable).
    #[arg(long = "path-prepend")]
    path_prepend: Vec<PathBuf>,
    #[arg(long, value_parser = ["auto", "netns", "loopback"])]
    network: Option<String>,
    /// Shut down when stdin reaches EOF (the test harness uses this so a dying test cleans up).
    #[arg(long)]
    exit_on_stdin_eof: bool,
}

fn load(args: &Args) -> Result<AgentConfig, String> {
    let mut cfg = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => AgentConfig::default(),
    };
    if let Some(k) = &args.kubeconfig {
        if cfg.kubeconfig.is_none() || args.config.is_none() {
            cfg.kubeconfig = Some(k.clone());
        }
    }
    if let Some(n) = &args.name {
        cfg.name = n.clone();
    }
    if !args.nodes.is_empty() {
        cfg.nodes = args
            .nodes
            .iter()
            .map(|n| NodeConfig::new(n.clone(), args.gpus))
            .collect();
    }
    if !args.namespaces.is_empty() {
        cfg.namespaces = args.namespaces.clone();
    }
    if !args.scheduler_names.is_empty() {
        cfg.scheduler_names = args.scheduler_names.clone();
    }
    if let Some(d) = &args.state_dir {
        cfg.state_dir = d.clone();
    }
    cfg.path_prepend.extend(args.path_prepend.iter().cloned());
    if let Some(n) = &args.network {
        cfg.network = match n.as_str() {
            "netns" => NetworkMode::Netns,
            "loopback" => NetworkMode::Loopback,
            _ => NetworkMode::Auto,
        };
    }
    Ok(cfg)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();
    let cfg = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("onevision-node-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let watch_stdin = args.exit_on_stdin_eof;
    let shutdown = async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        let stdin_eof = async {
            if !watch_stdin {
                return std::future::pending::<()>().await;
            }
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 64];
            let mut stdin = tokio::io::stdin();
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = stdin_eof => {}
        }
    };
    match run(cfg, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("onevision-node-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
