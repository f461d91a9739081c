//! Real-cluster test harness for onevision (see `docs/testing.md`).
//!
//! - [`require_cluster!`] / [`cluster_or_skip`]: the cluster of `ONEVISION_KUBECONFIG` (or the
//!   running local control plane of `scripts/local-cluster up`); without one the test is skipped
//!   with a message, under `CI=true` it fails.
//! - [`Cluster::start_node_agent`] runs `onevision-node-agent`, which registers Nodes and
//!   runs the pods scheduled to them as local processes.
//! - [`workspace_binary`] / [`BackgroundProcess`] build and run other workspace binaries
//!   (e.g. `onevision-operator`) with their output in a log file.
//! - [`wait_for`] polls a condition with a timeout and reports the last observation.
//!
//! ```no_run
//! # async fn t() -> Result<(), onevision_tests::Error> {
//! use onevision_tests::{Cluster, NodeAgentConfig};
//! let cluster = Cluster::shared()?; // in a test: onevision_tests::require_cluster!()
//! let ns = cluster.fresh_namespace("demo").await?;
//! let agent = cluster.start_node_agent(NodeAgentConfig::for_namespace(&ns)).await?;
//! cluster.kubectl_ok(&["-n", &ns, "apply", "-f", "pod.yaml"])?;
//! // ... wait_for(...) on the pod, then:
//! let log = agent.pod_log(&ns, "my-pod", "main")?;
//! agent.stop().await?;
//! # Ok(()) }
//! ```

pub mod agent;
mod process;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

pub use agent::config::{AgentConfig as NodeAgentConfig, NetworkMode, NodeConfig};
pub use process::{workspace_binary, BackgroundProcess};

/// Everything the harness can fail with; messages say what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("kubeconfig {path}: {detail}")]
    Kubeconfig { path: PathBuf, detail: String },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("timed out after {timeout:?} waiting for {what}; last observation: {last}")]
    Timeout {
        what: String,
        timeout: Duration,
        last: String,
    },
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
    /// No cluster to test against (see [`cluster_or_skip`]).
    #[error("{0}")]
    NotConfigured(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// Root of the Cargo workspace (the scripts live in `<root>/scripts`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A Kubernetes API server the tests can use.
#[derive(Debug, Clone)]
pub struct Cluster {
    kubeconfig: PathBuf,
}

/// The shared cluster, or (whether one is configured at all, why it cannot be used).
static SHARED: OnceLock<Result<Cluster, (bool, String)>> = OnceLock::new();
static TOOLS: OnceLock<Result<PathBuf, String>> = OnceLock::new();

impl Cluster {
    /// The cluster for this test binary: `ONEVISION_KUBECONFIG` if set, else the local control
    /// plane if it is already running (`scripts/local-cluster up`). Plain `KUBECONFIG` is
    /// deliberately ignored: the tests register fake Nodes and create namespaces, which must never
    /// happen on a real cluster by accident. Starting the control plane is left to
    /// `scripts/test` / the developer because its first start builds it (tens of minutes).
    pub fn shared() -> Result<&'static Cluster> {
        let res = SHARED.get_or_init(|| {
            Self::connect().map_err(|e| (!matches!(e, Error::NotConfigured(_)), e.to_string()))
        });
        match res {
            Ok(c) => Ok(c),
            Err((false, why)) => Err(Error::NotConfigured(why.clone())),
            Err((true, why)) => Err(Error::Other(format!("cluster unusable: {why}"))),
        }
    }

    fn connect() -> Result<Cluster> {
        if let Some(p) = std::env::var_os("ONEVISION_KUBECONFIG").filter(|p| !p.is_empty()) {
            let path = PathBuf::from(p);
            if path.is_file() {
                return Ok(Cluster { kubeconfig: path });
            }
            return Err(Error::Kubeconfig {
                path,
                detail: "$ONEVISION_KUBECONFIG points to a missing file".into(),
            });
        }
        let script = workspace_root().join("scripts/local-cluster");
        let out = Command::new(&script)
            .arg("status")
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(&script))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            if let Some(path) = stdout.lines().find_map(|l| l.strip_prefix("running: ")) {
                let kubeconfig = PathBuf::from(path.trim());
                if kubeconfig.is_file() {
                    return Ok(Cluster { kubeconfig });
                }
            }
        }
        Err(Error::NotConfigured(
            "no cluster configured: set ONEVISION_KUBECONFIG, e.g. `export ONEVISION_KUBECONFIG=$(scripts/local-cluster up | tail -n1)` \
             (the first `up` builds the control plane), or run scripts/test"
                .into(),
        ))
    }

    /// Uses an explicit kubeconfig (no script involved).
    pub fn from_kubeconfig(path: impl Into<PathBuf>) -> Cluster {
        Cluster {
            kubeconfig: path.into(),
        }
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A new client. Create one per test (a client is bound to the tokio runtime it was made on).
    pub async fn client(&self) -> Result<Client> {
        let kc = Kubeconfig::read_from(&self.kubeconfig).map_err(|e| Error::Kubeconfig {
            path: self.kubeconfig.clone(),
            detail: e.to_string(),
        })?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Kubeconfig {
                path: self.kubeconfig.clone(),
                detail: e.to_string(),
            })?;
        Ok(Client::try_from(config)?)
    }

    /// Path of kubectl: `$KUBECTL`, else installed by `scripts/install-tools` (once per binary).
    pub fn kubectl_path(&self) -> Result<PathBuf> {
        tool_path("KUBECTL", "kubectl")
    }

    /// Path of helm: `$HELM`, else installed by `scripts/install-tools`.
    pub fn helm_path(&self) -> Result<PathBuf> {
        tool_path("HELM", "helm")
    }

    /// Runs kubectl against this cluster; returns its output whatever the exit status.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_with_stdin(args, None)
    }

    /// Runs kubectl with `stdin` fed to it (e.g. `apply -f -`).
    pub fn kubectl_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let kubectl = self.kubectl_path()?;
        run_with_stdin(
            Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args),
            stdin,
        )
        .map_err(io_err(&kubectl))
    }

    /// Runs kubectl and fails (with its stderr) unless it exits 0; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        checked(format!("kubectl {}", args.join(" ")), self.kubectl(args)?)
    }

    /// `kubectl apply -f -` of a YAML document (or several); returns stdout.
    pub fn apply_yaml(&self, namespace: &str, yaml: &str) -> Result<String> {
        let out = self.kubectl_with_stdin(&["-n", namespace, "apply", "-f", "-"], Some(yaml))?;
        checked(format!("kubectl -n {namespace} apply"), out)
    }

    /// Installs the onevision CRDs from the chart (`charts/onevision/crds/onevision.dev.yaml`,
    /// server-side apply, idempotent) and waits until they are Established. Once per test binary.
    pub fn install_onevision_crds(&self) -> Result<()> {
        static DONE: OnceLock<Result<(), String>> = OnceLock::new();
        let res = DONE.get_or_init(|| {
            let path = workspace_root().join("charts/onevision/crds/onevision.dev.yaml");
            let path = path.to_string_lossy().to_string();
            self.kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", &path])
                .map_err(|e| e.to_string())?;
            self.kubectl_ok(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/sftjobs.onevision.dev",
                "crd/grpojobs.onevision.dev",
                "crd/rolloutpools.onevision.dev",
            ])
            .map_err(|e| e.to_string())?;
            Ok(())
        });
        res.clone().map_err(|e| Error::Command {
            what: "installing the onevision CRDs".into(),
            detail: e,
        })
    }

    /// Runs helm against this cluster; returns its output whatever the exit status.
    pub fn helm(&self, args: &[&str]) -> Result<Output> {
        let helm = self.helm_path()?;
        Command::new(&helm)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .map_err(io_err(&helm))
    }

    /// Creates a namespace `<prefix>-<random>` labelled `onevision.dev/test=true` and waits until
    /// its `default` ServiceAccount exists (pods are refused before that).
    pub async fn fresh_namespace(&self, prefix: &str) -> Result<String> {
        let client = self.client().await?;
        let prefix: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let name = format!("{}-{}", prefix.trim_matches('-'), random_suffix());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("onevision.dev/test".to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        let sas = Api::<ServiceAccount>::namespaced(client, &name);
        wait_for(
            &format!(
                "ServiceAccount default in namespace {name} (kube-controller-manager running?)"
            ),
            Duration::from_secs(60),
            || {
                let sas = sas.clone();
                async move { sas.get_opt("default").await.map(|o| o.map(|_| ())) }
            },
        )
        .await?;
        Ok(name)
    }

    /// Deletes a namespace (background; returns once the deletion is accepted).
    pub async fn delete_namespace(&self, name: &str) -> Result<()> {
        let api = Api::<Namespace>::all(self.client().await?);
        match api.delete(name, &Default::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Starts a node agent (a child process) and waits until its Nodes are Ready.
    /// Stop it with [`NodeAgent::stop`]; dropping the handle also stops it.
    pub async fn start_node_agent(&self, config: NodeAgentConfig) -> Result<NodeAgent> {
        NodeAgent::start(self, config).await
    }
}

/// True when running under CI (`CI` set to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The shared cluster for a real-cluster test. When none is configured the test is skipped:
/// this prints `SKIPPED <test>: <why>` and returns `Ok(None)` — except under CI (`CI=true`),
/// where it returns the error so the test fails instead of silently passing.
pub fn cluster_or_skip(test: &str) -> Result<Option<&'static Cluster>> {
    match Cluster::shared() {
        Ok(c) => Ok(Some(c)),
        Err(e @ Error::NotConfigured(_)) if in_ci() => Err(Error::Other(format!(
            "CI=true and {test} needs a cluster: {e}"
        ))),
        Err(Error::NotConfigured(why)) => {
            // Straight to the process's stderr: libtest captures `eprintln!` of passing tests,
            // and a skip must never be silent.
            use std::io::Write;
            let name = std::thread::current()
                .name()
                .filter(|n| *n != "main")
                .map(str::to_string)
                .unwrap_or_else(|| test.to_string());
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {name}: {why} (under CI=true this fails instead)"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// `let cluster = require_cluster!();` in a test returning `Result<(), E>`: the shared cluster,
/// or return early (skip, with a message) when none is configured outside CI. See [`cluster_or_skip`].
#[macro_export]
macro_rules! require_cluster {
    () => {
        match $crate::cluster_or_skip(module_path!())? {
            Some(c) => c,
            None => return Ok(()),
        }
    };
}

/// A running `onevision-node-agent`.
pub struct NodeAgent {
    process: BackgroundProcess,
    config: NodeAgentConfig,
}

impl NodeAgent {
    async fn start(cluster: &Cluster, mut config: NodeAgentConfig) -> Result<NodeAgent> {
        let bin = match std::env::var_os("ONEVISION_NODE_AGENT") {
            Some(p) => PathBuf::from(p),
            None => workspace_binary("onevision-tests", "onevision-node-agent")?,
        };
        if config.kubeconfig.is_none() {
            config.kubeconfig = Some(cluster.kubeconfig.clone());
        }
        if config.state_dir.as_os_str().is_empty() {
            config.state_dir = std::env::temp_dir()
                .join("onevision-agents")
                .join(&config.name);
        }
        std::fs::create_dir_all(&config.state_dir).map_err(io_err(&config.state_dir))?;
        let cfg_path = config.state_dir.join("agent-config.json");
        let json = serde_json::to_vec_pretty(&config).map_err(|e| Error::Other(e.to_string()))?;
        std::fs::write(&cfg_path, json).map_err(io_err(&cfg_path))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&cfg_path)
            .arg("--exit-on-stdin-eof");
        let process = BackgroundProcess::spawn(
            &format!("node agent {}", config.name),
            cmd,
            &config.state_dir.join("agent.log"),
        )?;
        let agent = NodeAgent { process, config };
        let nodes = Api::<Node>::all(cluster.client().await?);
        let names: Vec<String> = agent.config.nodes.iter().map(|n| n.name.clone()).collect();
        let log = agent.process.log_path().to_path_buf();
        wait_for(
            &format!("nodes {names:?} Ready (agent log: {})", log.display()),
            Duration::from_secs(60),
            || {
                let nodes = nodes.clone();
                let names = names.clone();
                let exited = agent.process.exited();
                async move {
                    if let Some(status) = exited {
                        return Err(format!("node agent exited with {status}"));
                    }
                    for n in &names {
                        let ready = nodes
                            .get_opt(n)
                            .await
                            .map_err(|e| e.to_string())?
                            .is_some_and(|node| node_ready(&node));
                        if !ready {
                            return Ok(None);
                        }
                    }
                    Ok(Some(()))
                }
            },
        )
        .await?;
        Ok(agent)
    }

    pub fn config(&self) -> &NodeAgentConfig {
        &self.config
    }

    /// Log of one container of a pod (the latest pod with that name; stdout and stderr together).
    pub fn pod_log(&self, namespace: &str, pod: &str, container: &str) -> Result<String> {
        let p = self.pod_log_path(namespace, pod, container);
        std::fs::read_to_string(&p).map_err(io_err(p))
    }

    /// `<state_dir>/pods/<namespace>/<pod>/<container>.log`.
    pub fn pod_log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.config.pod_log_path(namespace, pod, container)
    }

    /// Host directory that backs PersistentVolumeClaim `claim` in `namespace`.
    pub fn pvc_dir(&self, namespace: &str, claim: &str) -> PathBuf {
        self.config.pvc_dir(namespace, claim)
    }

    /// The agent's own log file.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// Stops the agent: it kills its pods' processes, removes their network namespaces and
    /// deletes its Nodes (kube-controller-manager then garbage-collects their pods).
    pub async fn stop(mut self) -> Result<()> {
        self.process.stop_gracefully(Duration::from_secs(30)).await
    }
}

/// True when the node's Ready condition is True.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until pod `name` in `ns` satisfies `done`; returns the pod. On timeout the error shows
/// the pod's last phase and container states.
pub async fn wait_for_pod(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    done: impl Fn(&Pod) -> bool,
) -> Result<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let done = &done;
    wait_for(&format!("pod {ns}/{name}"), timeout, || {
        let api = api.clone();
        async move {
            match api.get_opt(name).await {
                Ok(Some(p)) if done(&p) => Ok(Some(p)),
                Ok(Some(p)) => Err(format!(
                    "phase {}, containers {}",
                    pod_phase(&p),
                    serde_json::to_string(
                        &p.status.as_ref().and_then(|s| s.container_statuses.clone())
                    )
                    .unwrap_or_default()
                )),
                Ok(None) => Err("pod does not exist".to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
}

/// `status.phase`, `Pending` when unset.
pub fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Exit code of a terminated container of the pod.
pub fn exit_code(pod: &Pod, container: &str) -> Option<i32> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == container)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

/// Polls `check` every 200 ms until it returns `Ok(Some(value))` or `timeout` passes.
/// `Ok(None)` means "not yet"; `Err(e)` is remembered (shown on timeout) and polling continues,
/// so transient API errors do not fail a test.
pub async fn wait_for<T, E, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<Option<T>, E>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => String::from("condition not met yet"),
            Err(e) => format!("error: {e}"),
        };
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: what.to_string(),
                timeout,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tool_path(env: &str, tool: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let dir = TOOLS.get_or_init(|| {
        let script = workspace_root().join("scripts/install-tools");
        let out = Command::new(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(PathBuf::from(
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .last()
                    .unwrap_or("")
                    .trim(),
            )),
            Ok(o) => Err(format!("{} exited with {}", script.display(), o.status)),
            Err(e) => Err(format!("{}: {e}", script.display())),
        }
    });
    let dir = dir.as_ref().map_err(|e| Error::Command {
        what: format!("installing {tool}"),
        detail: e.clone(),
    })?;
    let path = dir.join(tool);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Command {
            what: format!("installing {tool}"),
            detail: format!("{} missing; set ${env}", path.display()),
        })
    }
}

fn run_with_stdin(cmd: &mut Command, stdin: Option<&str>) -> std::io::Result<Output> {
    use std::io::Write;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    child.wait_with_output()
}

fn checked(what: String, out: Output) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            what,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// 6 lowercase alphanumerics, unique enough for namespace names across parallel tests.
pub fn random_suffix() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    let mut v = h.finish();
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..6)
        .map(|_| {
            let c = alphabet[(v % 36) as usize] as char;
            v /= 36;
            c
        })
        .collect()
}
