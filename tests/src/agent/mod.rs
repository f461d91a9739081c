//! The test node agent: a scheduler and kubelet for local processes (see `docs/testing.md`).
//!
//! One actor loop owns all state: it watches pods, binds unscheduled ones to its Nodes, starts a
//! [`pod::PodRun`] task per pod, keeps every pod's `/etc/hosts` current, and finalises deletions
//! once a pod's processes are gone. Node heartbeats (Lease + Ready condition) run alongside.

pub mod config;
mod net;
mod pod;
pub mod quantity;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo, Pod,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

pub use config::{AgentConfig, NetworkMode, NodeConfig};

const MANAGER: &str = "onevision-node-agent";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("kubeconfig {path}: {detail}")]
    Kubeconfig { path: PathBuf, detail: String },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("network setup: {0} (run as root, or set \"network\": \"loopback\")")]
    Network(std::io::Error),
    #[error("invalid config: {0}")]
    Config(String),
}

/// Shared by the actor and the pod tasks.
pub(crate) struct Ctx {
    client: Client,
    config: AgentConfig,
    recorder: Recorder,
    net: net::Network,
    api_port: u16,
    msgs: mpsc::UnboundedSender<Msg>,
}

impl Ctx {
    async fn event(&self, pod: &Pod, type_: EventType, reason: &str, note: &str) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: "Run".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &pod.object_ref(&())).await {
            debug!("event {reason}: {e}");
        }
    }
}

pub(crate) enum Msg {
    /// A pod task ended: no process of that pod runs any more.
    Finished { uid: String },
}

struct Entry {
    pod: Pod,
    net: Option<net::PodNet>,
    hosts_file: Option<PathBuf>,
    term: Option<watch::Sender<Option<u32>>>,
    finished: bool,
    skipped: bool,
    finalising: bool,
}

/// Runs the agent until `shutdown` resolves; then stops all pods, removes the network
/// namespaces and deletes the Nodes.
pub async fn run(
    mut config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    if config.nodes.is_empty() {
        return Err(AgentError::Config("no nodes configured".into()));
    }
    if config.state_dir.as_os_str().is_empty() {
        config.state_dir = std::env::temp_dir()
            .join("onevision-agents")
            .join(&config.name);
    }
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| AgentError::Kubeconfig {
                path: path.clone(),
                detail: e.to_string(),
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| AgentError::Kubeconfig {
                    path: path.clone(),
                    detail: e.to_string(),
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| AgentError::Kubeconfig {
                path: PathBuf::from("(inferred)"),
                detail: e.to_string(),
            })?,
    };
    let api_port = kube_config.cluster_url.port_u16().unwrap_or(443);
    let client = Client::try_from(kube_config)?;
    let mut host_ports = config.host_ports.clone();
    if !host_ports.contains(&api_port) {
        host_ports.push(api_port);
    }
    let net = net::Network::new(config.network, host_ports)
        .await
        .map_err(AgentError::Network)?;
    info!(mode = ?net.mode, state = %config.state_dir.display(), "node agent starting");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: Some(config.name.clone()),
        },
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        config,
        recorder,
        net,
        api_port,
        msgs: tx,
    });

    for n in &ctx.config.nodes {
        register_node(&client, n, &ctx.config.name).await?;
    }
    let heartbeat = tokio::spawn(heartbeat(ctx.clone()));

    let mut agent = Agent {
        ctx: ctx.clone(),
        entries: HashMap::new(),
        init_seen: None,
        unschedulable: HashMap::new(),
    };
    let pods: Api<Pod> = Api::all(client.clone());
    let mut events = watcher(pods, watcher::Config::default()).boxed();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            ev = events.next() => match ev {
                Some(Ok(ev)) => agent.on_watch(ev).await,
                Some(Err(e)) => {
                    warn!("pod watch: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                None => break,
            },
            Some(msg) = rx.recv() => agent.on_msg(msg).await,
            _ = tick.tick() => agent.schedule_pending().await,
        }
    }
    info!("shutting down: stopping pods, deleting nodes");
    heartbeat.abort();
    agent.shutdown(&mut rx).await;
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    for n in &ctx.config.nodes {
        let _ = nodes.delete(&n.name, &DeleteParams::default()).await;
        let _ = leases.delete(&n.name, &DeleteParams::default()).await;
    }
    ctx.net.shutdown().await;
    Ok(())
}

struct Agent {
    ctx: Arc<Ctx>,
    entries: HashMap<String, Entry>,
    /// During a (re)list: uids seen so far, to detect pods deleted while the watch was down.
    init_seen: Option<HashSet<String>>,
    /// Last FailedScheduling message per pod uid (events only on change).
    unschedulable: HashMap<String, String>,
}

fn uid_of(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}
fn node_of(p: &Pod) -> Option<&str> {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|s| !s.is_empty())
}
fn phase_of(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

impl Agent {
    fn my_node(&self, name: &str) -> bool {
        self.ctx.config.nodes.iter().any(|n| n.name == name)
    }

    async fn on_watch(&mut self, ev: watcher::Event<Pod>) {
        match ev {
            watcher::Event::Init => self.init_seen = Some(HashSet::new()),
            watcher::Event::InitApply(p) => {
                if let Some(seen) = &mut self.init_seen {
                    seen.insert(uid_of(&p));
                }
                self.on_pod(p).await;
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.init_seen.take() {
                    let gone: Vec<String> = self
                        .entries
                        .keys()
                        .filter(|u| !seen.contains(*u))
                        .cloned()
                        .collect();
                    for uid in gone {
                        self.on_gone(&uid).await;
                    }
                }
            }
            watcher::Event::Apply(p) => self.on_pod(p).await,
            watcher::Event::Delete(p) => self.on_gone(&uid_of(&p)).await,
        }
    }

    async fn on_pod(&mut self, pod: Pod) {
        let uid = uid_of(&pod);
        match node_of(&pod) {
            Some(node) if self.my_node(node) => {}
            Some(_) => return,
            None => return, // unscheduled pods are handled by schedule_pending (every second)
        }
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or(30)
            .clamp(0, 3600) as u32;
        let entry = self.entries.entry(uid.clone()).or_insert_with(|| Entry {
            pod: pod.clone(),
            net: None,
            hosts_file: None,
            term: None,
            finished: false,
            skipped: false,
            finalising: false,
        });
        entry.pod = pod;
        if deleting {
            match &entry.term {
                Some(term) if !entry.finished => {
                    if term.borrow().is_none() {
                        let _ = term.send(Some(grace));
                    }
                }
                _ => self.finalise(&uid).await,
            }
            return;
        }
        let terminal = matches!(phase_of(&entry.pod), "Succeeded" | "Failed");
        if entry.term.is_none() && !entry.skipped && !terminal {
            self.start(&uid).await;
        }
    }

    async fn start(&mut self, uid: &str) {
        let Some(entry) = self.entries.get_mut(uid) else {
            return;
        };
        let pod = entry.pod.clone();
        if let Err(reason) = pod::check_supported(&pod) {
            entry.skipped = true;
            warn!(pod = ?pod.metadata.name, "skipping: {reason}");
            self.ctx
                .event(
                    &pod,
                    EventType::Warning,
                    "Unsupported",
                    &format!("onevision-node-agent cannot run this pod: {reason}"),
                )
                .await;
            return;
        }
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let pnet = if host_network {
            net::PodNet {
                ip: "127.0.0.1".into(),
                netns: None,
                index: 0,
            }
        } else {
            self.ctx.net.allocate()
        };
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let run_dir = self.ctx.config.state_dir.join("run").join(uid);
        let log_dir = self.ctx.config.pod_dir(&ns, &name);
        if let Err(e) = prepare_dirs(&run_dir, &log_dir, uid) {
            self.ctx
                .event(
                    &pod,
                    EventType::Warning,
                    "FailedCreatePodSandBox",
                    &e.to_string(),
                )
                .await;
            entry.skipped = true;
            return;
        }
        let hosts_file = run_dir.join("hosts");
        let (term_tx, term_rx) = watch::channel(None);
        entry.net = Some(pnet.clone());
        entry.hosts_file = Some(hosts_file.clone());
        entry.term = Some(term_tx);
        self.write_hosts(&ns);
        info!(pod = %format!("{ns}/{name}"), ip = %pnet.ip, "starting pod");
        let run = pod::PodRun {
            ctx: self.ctx.clone(),
            pod,
            net: pnet,
            hosts_file,
            run_dir,
            log_dir,
        };
        tokio::spawn(run.run(term_rx));
    }

    async fn on_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Finished { uid } => {
                let Some(e) = self.entries.get_mut(&uid) else {
                    return;
                };
                e.finished = true;
                let ns = e.pod.metadata.namespace.clone().unwrap_or_default();
                let deleting = e.pod.metadata.deletion_timestamp.is_some();
                self.write_hosts(&ns);
                if deleting {
                    self.finalise(&uid).await;
                }
            }
        }
    }

    /// The last step of a pod deletion, as the kubelet does it: delete with grace 0.
    async fn finalise(&mut self, uid: &str) {
        let Some(e) = self.entries.get_mut(uid) else {
            return;
        };
        if e.finalising {
            return;
        }
        e.finalising = true;
        let ns = e.pod.metadata.namespace.clone().unwrap_or_default();
        let name = e.pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(err) => {
                warn!("finalising {ns}/{name}: {err}");
                if let Some(e) = self.entries.get_mut(uid) {
                    e.finalising = false; // retried on the next pod event
                }
            }
        }
    }

    async fn on_gone(&mut self, uid: &str) {
        self.unschedulable.remove(uid);
        if let Some(e) = self.entries.remove(uid) {
            if let Some(term) = &e.term {
                if !e.finished {
                    // Deleted without a graceful phase (e.g. force delete): kill now.
                    let _ = term.send(Some(0));
                }
            }
            let ns = e.pod.metadata.namespace.clone().unwrap_or_default();
            self.write_hosts(&ns);
        }
    }

    /// Rewrites `/etc/hosts` of every live pod in `ns`, in place (it is bind-mounted by inode).
    fn write_hosts(&self, ns: &str) {
        let live: Vec<&Entry> = self
            .entries
            .values()
            .filter(|e| {
                e.pod.metadata.namespace.as_deref() == Some(ns) && !e.finished && e.net.is_some()
            })
            .collect();
        let mut peers = String::new();
        for e in &live {
            let (Some(net), Some(spec)) = (&e.net, &e.pod.spec) else {
                continue;
            };
            if let (Some(h), Some(sub)) = (spec.hostname.as_deref(), spec.subdomain.as_deref()) {
                peers += &format!("{ip}\t{h}.{sub}.{ns}.svc.cluster.local {h}.{sub}.{ns}.svc {h}.{sub}.{ns} {h}.{sub}\n", ip = net.ip);
            }
        }
        for e in &live {
            let (Some(net), Some(path)) = (&e.net, &e.hosts_file) else {
                continue;
            };
            let me = pod::pod_hostname(&e.pod);
            let content = format!(
                "# Kubernetes-managed hosts file (onevision-node-agent).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{me}\n{peers}",
                ip = net.ip
            );
            if let Err(err) = write_in_place(path, content.as_bytes()) {
                warn!("hosts file {}: {err}", path.display());
            }
        }
    }

    /// Binds unscheduled pods this agent is responsible for to one of its nodes.
    async fn schedule_pending(&mut self) {
        let pods: Api<Pod> = Api::all(self.ctx.client.clone());
        let lp = kube::api::ListParams::default().fields("spec.nodeName=");
        let list = match pods.list(&lp).await {
            Ok(l) => l.items,
            Err(e) => {
                debug!("listing unscheduled pods: {e}");
                return;
            }
        };
        for pod in list {
            if !self.eligible(&pod) {
                continue;
            }
            let uid = uid_of(&pod);
            match self.pick_node(&pod) {
                Ok(node) => self.bind(&pod, &node).await,
                Err(msg) => {
                    if self.unschedulable.get(&uid) != Some(&msg) {
                        self.unschedulable.insert(uid, msg.clone());
                        self.ctx
                            .event(&pod, EventType::Warning, "FailedScheduling", &msg)
                            .await;
                        let api: Api<Pod> = Api::namespaced(
                            self.ctx.client.clone(),
                            pod.metadata.namespace.as_deref().unwrap_or("default"),
                        );
                        let patch = json!({"status": {"conditions": [{
                            "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg,
                            "lastTransitionTime": Time(Timestamp::now()),
                        }]}});
                        let _ = api
                            .patch_status(
                                pod.metadata.name.as_deref().unwrap_or(""),
                                &PatchParams::default(),
                                &Patch::Strategic(patch),
                            )
                            .await;
                    }
                }
            }
        }
    }

    fn eligible(&self, pod: &Pod) -> bool {
        let cfg = &self.ctx.config;
        let ns_ok = cfg.namespaces.is_empty()
            || pod
                .metadata
                .namespace
                .as_ref()
                .is_some_and(|n| cfg.namespaces.contains(n));
        let sched = pod
            .spec
            .as_ref()
            .and_then(|s| s.scheduler_name.as_deref())
            .unwrap_or("default-scheduler");
        ns_ok
            && cfg.scheduler_names.iter().any(|s| s == sched)
            && pod.metadata.deletion_timestamp.is_none()
            && node_of(pod).is_none()
            && !matches!(phase_of(pod), "Succeeded" | "Failed")
            // Scheduling gates (e.g. Kueue) must be lifted before binding.
            && pod.spec.as_ref().and_then(|s| s.scheduling_gates.as_ref()).is_none_or(|g| g.is_empty())
    }

    /// First-fit by requests (limits where requests are absent) against allocatable, honouring
    /// nodeSelector; prefers the node with the fewest pods so gangs spread out.
    fn pick_node(&self, pod: &Pod) -> Result<String, String> {
        let want = requests(pod);
        let selector = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_selector.clone())
            .unwrap_or_default();
        let mut reasons = Vec::new();
        let mut best: Option<(usize, &NodeConfig)> = None;
        for n in &self.ctx.config.nodes {
            let labels = node_labels(n, &self.ctx.config.name);
            if let Some((k, v)) = selector.iter().find(|(k, v)| labels.get(*k) != Some(*v)) {
                reasons.push(format!("{}: nodeSelector {k}={v} does not match", n.name));
                continue;
            }
            let on_node: Vec<&Pod> = self
                .entries
                .values()
                .filter(|e| {
                    node_of(&e.pod) == Some(n.name.as_str())
                        && !e.finished
                        && !matches!(phase_of(&e.pod), "Succeeded" | "Failed")
                })
                .map(|e| &e.pod)
                .collect();
            let mut used: BTreeMap<String, f64> = BTreeMap::new();
            for p in &on_node {
                for (k, v) in requests(p) {
                    *used.entry(k).or_default() += v;
                }
            }
            let mut fits = true;
            for (res, amount) in &want {
                if *amount <= 0.0 {
                    continue;
                }
                let alloc = n
                    .allocatable
                    .get(res)
                    .and_then(|q| quantity::parse(q))
                    .unwrap_or(0.0);
                let u = used.get(res).copied().unwrap_or(0.0);
                if u + amount > alloc + 1e-9 {
                    reasons.push(format!(
                        "{}: insufficient {res} (requested {amount}, {} of {alloc} free)",
                        n.name,
                        alloc - u
                    ));
                    fits = false;
                    break;
                }
            }
            if fits && best.is_none_or(|(c, _)| on_node.len() < c) {
                best = Some((on_node.len(), n));
            }
        }
        match best {
            Some((_, n)) => Ok(n.name.clone()),
            None => Err(format!(
                "0/{} nodes are available: {}",
                self.ctx.config.nodes.len(),
                reasons.join("; ")
            )),
        }
    }

    async fn bind(&mut self, pod: &Pod, node: &str) {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &ns);
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "namespace": ns, "uid": pod.metadata.uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        match api
            .create_subresource::<_, serde_json::Value>(
                "binding",
                &name,
                &PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => {
                info!(pod = %format!("{ns}/{name}"), node, "bound");
                self.unschedulable.remove(&uid_of(pod));
                let mut bound = pod.clone();
                if let Some(spec) = bound.spec.as_mut() {
                    spec.node_name = Some(node.to_string());
                }
                self.ctx
                    .event(
                        pod,
                        EventType::Normal,
                        "Scheduled",
                        &format!("Successfully assigned {ns}/{name} to {node}"),
                    )
                    .await;
                // Count it against the node right away; the watch event starts it.
                self.on_pod(bound).await;
            }
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                debug!("binding {ns}/{name}: {}", s.message)
            }
            Err(e) => warn!("binding {ns}/{name}: {e}"),
        }
    }

    async fn shutdown(&mut self, rx: &mut mpsc::UnboundedReceiver<Msg>) {
        let mut running = 0;
        for e in self.entries.values() {
            if let (Some(term), false) = (&e.term, e.finished) {
                let grace = e
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
                    .unwrap_or(30)
                    .clamp(0, 5) as u32;
                let _ = term.send(Some(grace));
                running += 1;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while running > 0 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Msg::Finished { .. })) => running -= 1,
                _ => break,
            }
        }
    }
}

fn requests(pod: &Pod) -> BTreeMap<String, f64> {
    let mut sum: BTreeMap<String, f64> = BTreeMap::new();
    sum.insert("pods".into(), 1.0);
    let Some(spec) = &pod.spec else { return sum };
    let of = |c: &k8s_openapi::api::core::v1::Container| -> BTreeMap<String, f64> {
        let r = c.resources.clone().unwrap_or_default();
        let mut m: BTreeMap<String, f64> = BTreeMap::new();
        for (k, q) in r.limits.unwrap_or_default() {
            m.insert(k, quantity::parse(&q.0).unwrap_or(f64::INFINITY));
        }
        for (k, q) in r.requests.unwrap_or_default() {
            m.insert(k, quantity::parse(&q.0).unwrap_or(f64::INFINITY));
        }
        m
    };
    for c in &spec.containers {
        for (k, v) in of(c) {
            *sum.entry(k).or_default() += v;
        }
    }
    // Init containers run one at a time: the pod needs the max of them and the main sum.
    for c in spec.init_containers.iter().flatten() {
        for (k, v) in of(c) {
            let e = sum.entry(k).or_default();
            *e = e.max(v);
        }
    }
    sum
}

fn node_labels(n: &NodeConfig, agent: &str) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = [
        ("kubernetes.io/hostname", n.name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", std::env::consts::ARCH),
        ("onevision.dev/node-agent", agent),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    labels.extend(n.labels.clone());
    labels
}

fn prepare_dirs(
    run_dir: &std::path::Path,
    log_dir: &std::path::Path,
    uid: &str,
) -> std::io::Result<()> {
    std::fs::create_dir_all(run_dir)?;
    std::fs::create_dir_all(log_dir)?;
    // Logs of an earlier pod with the same name (gang restarts reuse names) move to previous/<uid>/.
    let marker = log_dir.join(".uid");
    let old = std::fs::read_to_string(&marker).unwrap_or_default();
    if !old.is_empty() && old != uid {
        let prev = log_dir.join("previous").join(&old);
        std::fs::create_dir_all(&prev)?;
        for f in std::fs::read_dir(log_dir)?.flatten() {
            if f.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::rename(f.path(), prev.join(f.file_name()));
            }
        }
    }
    std::fs::write(marker, uid)
}

fn write_in_place(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(data)
}

fn node_object(n: &NodeConfig, agent: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(n.name.clone()),
            labels: Some(node_labels(n, agent)),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn node_status(n: &NodeConfig) -> NodeStatus {
    let now = Time(Timestamp::now());
    let q: BTreeMap<String, Quantity> = n
        .allocatable
        .iter()
        .map(|(k, v)| (k.clone(), Quantity(v.clone())))
        .collect();
    let cond = |t: &str, s: &str, reason: &str, msg: &str| NodeCondition {
        type_: t.into(),
        status: s.into(),
        reason: Some(reason.into()),
        message: Some(msg.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    };
    NodeStatus {
        capacity: Some(q.clone()),
        allocatable: Some(q),
        conditions: Some(vec![
            cond(
                "Ready",
                "True",
                "KubeletReady",
                "onevision-node-agent is posting ready status",
            ),
            cond(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "ok",
            ),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: "127.0.0.1".into(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: n.name.clone(),
            },
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH.into(),
            operating_system: "linux".into(),
            os_image: "onevision-node-agent".into(),
            kernel_version: String::new(),
            kubelet_version: "v1.35.4".into(),
            kube_proxy_version: String::new(),
            container_runtime_version: "onevision-node-agent://0.1".into(),
            machine_id: n.name.clone(),
            system_uuid: n.name.clone(),
            boot_id: std::process::id().to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn register_node(client: &Client, n: &NodeConfig, agent: &str) -> Result<(), AgentError> {
    let nodes: Api<Node> = Api::all(client.clone());
    // A Node left by an earlier agent may carry taints/state from then: start clean.
    if nodes.get_opt(&n.name).await?.is_some() {
        let _ = nodes.delete(&n.name, &DeleteParams::default()).await;
        for _ in 0..50 {
            if nodes.get_opt(&n.name).await?.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    nodes
        .create(&PostParams::default(), &node_object(n, agent))
        .await?;
    post_status(client, n).await?;
    renew_lease(client, n).await?;
    info!(node = %n.name, "registered");
    Ok(())
}

async fn post_status(client: &Client, n: &NodeConfig) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch_status(
            &n.name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": node_status(n) })),
        )
        .await
        .map(|_| ())
}

async fn renew_lease(client: &Client, n: &NodeConfig) -> Result<(), kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client.clone());
    let owner = nodes.get_opt(&n.name).await?.map(|node| OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: n.name.clone(),
        uid: node.metadata.uid.unwrap_or_default(),
        ..Default::default()
    });
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(n.name.clone()),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(n.name.clone()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    };
    leases
        .patch(
            &n.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(lease),
        )
        .await
        .map(|_| ())
}

/// Lease every 10 s, Ready condition every 30 s: what keeps the node lifecycle controller from
/// tainting the nodes and evicting their pods.
async fn heartbeat(ctx: Arc<Ctx>) {
    let mut n = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        n += 1;
        for node in &ctx.config.nodes {
            if let Err(e) = renew_lease(&ctx.client, node).await {
                warn!(node = %node.name, "lease renewal: {e}");
            }
            if n.is_multiple_of(3) {
                if let Err(e) = post_status(&ctx.client, node).await {
                    warn!(node = %node.name, "node status: {e}");
                }
            }
        }
    }
}
