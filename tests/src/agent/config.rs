//! Configuration of the test node agent (JSON file given with `--config`, or built in Rust).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How pods get their own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// `netns` when network namespaces can be created (root), else `loopback`.
    #[default]
    Auto,
    /// One network namespace per pod (10.213.x.y on a bridge in the agent's own hub namespace).
    Netns,
    /// All pods share the host network; each gets a distinct 127.x.y.z address.
    Loopback,
}

/// One Node the agent registers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeConfig {
    pub name: String,
    /// Allocatable (= capacity), e.g. {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "8"}.
    pub allocatable: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

impl NodeConfig {
    /// A node with 16 CPUs, 64Gi memory, 110 pods and `gpus` × `nvidia.com/gpu`.
    pub fn new(name: impl Into<String>, gpus: u32) -> NodeConfig {
        let mut allocatable: BTreeMap<String, String> = [
            ("cpu", "16"),
            ("memory", "64Gi"),
            ("pods", "110"),
            ("ephemeral-storage", "100Gi"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        allocatable.insert("nvidia.com/gpu".into(), gpus.to_string());
        NodeConfig {
            name: name.into(),
            allocatable,
            labels: BTreeMap::new(),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig::new("onevision-node", 0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AgentConfig {
    /// Names this agent (state dir, netns names, event reporter instance).
    pub name: String,
    /// Kubeconfig to use; `None` = the usual inference (KUBECONFIG, ~/.kube/config).
    pub kubeconfig: Option<PathBuf>,
    pub nodes: Vec<NodeConfig>,
    /// Namespaces whose unscheduled pods this agent binds; empty = all namespaces.
    pub namespaces: Vec<String>,
    /// Scheduler names this agent acts for (pods with another `schedulerName` are left alone).
    pub scheduler_names: Vec<String>,
    /// Root of pod run dirs and logs: `<stateDir>/pods/<ns>/<pod>/<container>.log`.
    pub state_dir: PathBuf,
    /// PersistentVolumeClaim `<claim>` in `<ns>` is the host directory `<pvcRoot>/<ns>/<claim>`
    /// (default `<stateDir>/pvc`).
    pub pvc_root: Option<PathBuf>,
    /// Directories put in front of PATH for every container (e.g. `target/debug`, so a pod's
    /// `command: [onevision, ...]` runs the workspace build).
    pub path_prepend: Vec<PathBuf>,
    /// Extra environment for every container (lowest precedence; the pod's env wins).
    pub env: BTreeMap<String, String>,
    /// Host loopback TCP ports made reachable inside each pod at 127.0.0.1:<port> (netns mode).
    /// The API server's port is always included.
    pub host_ports: Vec<u16>,
    pub network: NetworkMode,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            name: "onevision-agent".into(),
            kubeconfig: None,
            nodes: vec![NodeConfig::default()],
            namespaces: vec![],
            scheduler_names: vec!["default-scheduler".into()],
            state_dir: PathBuf::new(),
            pvc_root: None,
            path_prepend: vec![],
            env: BTreeMap::new(),
            host_ports: vec![],
            network: NetworkMode::Auto,
        }
    }
}

impl AgentConfig {
    /// An agent that serves one namespace with one GPU-less node named `<namespace>-node`.
    pub fn for_namespace(namespace: &str) -> AgentConfig {
        AgentConfig {
            name: namespace.to_string(),
            nodes: vec![NodeConfig::new(format!("{namespace}-node"), 0)],
            namespaces: vec![namespace.to_string()],
            ..AgentConfig::default()
        }
    }

    /// Replaces the nodes with `count` nodes `<name>-node-<i>`, each with `gpus` GPUs.
    pub fn with_gpu_nodes(mut self, count: usize, gpus: u32) -> AgentConfig {
        self.nodes = (0..count)
            .map(|i| NodeConfig::new(format!("{}-node-{i}", self.name), gpus))
            .collect();
        self
    }

    pub fn pvc_dir(&self, namespace: &str, claim: &str) -> PathBuf {
        self.pvc_root
            .clone()
            .unwrap_or_else(|| self.state_dir.join("pvc"))
            .join(namespace)
            .join(claim)
    }

    pub fn pod_dir(&self, namespace: &str, pod: &str) -> PathBuf {
        self.state_dir.join("pods").join(namespace).join(pod)
    }

    pub fn pod_log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.pod_dir(namespace, pod)
            .join(format!("{container}.log"))
    }
}
