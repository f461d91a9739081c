//! Running one pod: volumes, environment, processes, restarts, termination and status.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, ObjectFieldSelector, Pod, ResourceFieldSelector, Secret,
    ServiceAccount, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::net::PodNet;
use super::{quantity, Ctx, Msg};

/// Why a pod cannot start (yet).
#[derive(Debug)]
pub enum PrepError {
    /// The pod uses something the agent does not implement; it stays Pending.
    Unsupported(String),
    /// A referenced object is missing (ConfigMap, Secret, ServiceAccount...); retried.
    Retry(String),
}

impl std::fmt::Display for PrepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrepError::Unsupported(m) | PrepError::Retry(m) => f.write_str(m),
        }
    }
}

/// Rejects pods the agent cannot run faithfully, before anything is allocated for them.
pub fn check_supported(pod: &Pod) -> Result<(), String> {
    let Some(spec) = &pod.spec else {
        return Err("pod has no spec".into());
    };
    for v in spec.volumes.iter().flatten() {
        let ok = v.config_map.is_some()
            || v.secret.is_some()
            || v.empty_dir.is_some()
            || v.persistent_volume_claim.is_some()
            || v.host_path.is_some()
            || v.downward_api.is_some()
            || v.projected.is_some();
        if !ok {
            return Err(format!("volume {:?}: only configMap, secret, emptyDir, persistentVolumeClaim, hostPath, downwardAPI and projected volumes are supported", v.name));
        }
    }
    for c in spec.init_containers.iter().flatten() {
        if c.restart_policy.is_some() {
            return Err(format!(
                "init container {:?}: sidecar containers (restartPolicy) are not supported",
                c.name
            ));
        }
    }
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
    {
        if c.command.as_ref().is_none_or(|v| v.is_empty())
            && c.args.as_ref().is_none_or(|v| v.is_empty())
        {
            return Err(format!(
                "container {:?} has neither command nor args: images are not pulled, so the entrypoint of {:?} is unknown",
                c.name,
                c.image.as_deref().unwrap_or("")
            ));
        }
    }
    Ok(())
}

struct BindMount {
    source: PathBuf,
    target: String,
    read_only: bool,
}

/// What one container needs to be spawned.
struct ContainerRun {
    name: String,
    image: String,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    mounts: Vec<BindMount>,
    working_dir: String,
}

struct Prepared {
    init: Vec<ContainerRun>,
    main: Vec<ContainerRun>,
}

pub struct PodRun {
    pub ctx: Arc<Ctx>,
    pub pod: Pod,
    pub net: PodNet,
    pub hosts_file: PathBuf,
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
}

fn now() -> Value {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or(Value::Null)
}

#[derive(Clone)]
enum CState {
    Waiting(&'static str),
    Running {
        started: Value,
        pid: u32,
    },
    Terminated {
        code: i32,
        signal: Option<i32>,
        started: Value,
        finished: Value,
        message: Option<String>,
    },
}

impl CState {
    fn json(&self) -> Value {
        match self {
            CState::Waiting(reason) => json!({"waiting": {"reason": reason}}),
            CState::Running { started, .. } => json!({"running": {"startedAt": started}}),
            CState::Terminated {
                code,
                signal,
                started,
                finished,
                message,
            } => {
                let mut t = json!({
                    "exitCode": code,
                    "reason": if *code == 0 { "Completed" } else { "Error" },
                    "startedAt": started,
                    "finishedAt": finished,
                });
                if let Some(s) = signal {
                    t["signal"] = json!(s);
                }
                if let Some(m) = message {
                    t["message"] = json!(m);
                }
                json!({ "terminated": t })
            }
        }
    }
}

#[derive(Clone)]
struct CStatus {
    name: String,
    image: String,
    state: CState,
    last: Option<CState>,
    restarts: u32,
}

impl CStatus {
    fn json(&self) -> Value {
        let running = matches!(self.state, CState::Running { .. });
        let mut v = json!({
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": running,
            "started": running,
            "restartCount": self.restarts,
            "state": self.state.json(),
            "lastState": self.last.as_ref().map(CState::json).unwrap_or(json!({})),
        });
        if let CState::Running { pid, .. } = self.state {
            v["containerID"] = json!(format!("onevision://{pid}"));
        }
        v
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Restart {
    Always,
    OnFailure,
    Never,
}

impl PodRun {
    fn ns(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap_or("default")
    }
    fn name(&self) -> &str {
        self.pod.metadata.name.as_deref().unwrap_or("")
    }
    fn uid(&self) -> String {
        self.pod.metadata.uid.clone().unwrap_or_default()
    }
    fn host_network(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    }

    /// Runs the pod to completion or until `term` carries a grace period; always ends by
    /// sending `Msg::Finished` so the agent can release the address and finalise deletion.
    pub async fn run(self, mut term: watch::Receiver<Option<u32>>) {
        let uid = self.uid();
        let outcome = self.run_inner(&mut term).await;
        if let Err(e) = &outcome {
            warn!(pod = %format!("{}/{}", self.ns(), self.name()), "pod run ended: {e}");
        }
        let _ = self.ctx.msgs.send(Msg::Finished { uid });
    }

    async fn run_inner(&self, term: &mut watch::Receiver<Option<u32>>) -> Result<(), String> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        // 1. Volumes and env; missing ConfigMaps/Secrets are retried as the kubelet does.
        let mut warned = None::<String>;
        let prepared = loop {
            match self.prepare(&spec).await {
                Ok(p) => break p,
                Err(PrepError::Unsupported(m)) => {
                    self.ctx
                        .event(&self.pod, EventType::Warning, "Unsupported", &m)
                        .await;
                    return Err(m);
                }
                Err(PrepError::Retry(m)) => {
                    if warned.as_deref() != Some(m.as_str()) {
                        self.ctx
                            .event(&self.pod, EventType::Warning, "FailedMount", &m)
                            .await;
                        warned = Some(m);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = term.changed() => return Ok(()),
                    }
                }
            }
        };
        if term.borrow().is_some() {
            return Ok(());
        }
        // 2. Network.
        let forwards = match self.ctx.net.setup(&self.net).await {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("network setup for {}: {e}", self.net.ip);
                self.ctx
                    .event(&self.pod, EventType::Warning, "NetworkSetupFailed", &msg)
                    .await;
                self.ctx.net.teardown(&self.net).await;
                self.patch(
                    json!({"phase": "Failed", "reason": "NetworkSetupFailed", "message": msg}),
                )
                .await;
                return Err(msg);
            }
        };
        let result = self.run_containers(&spec, prepared, term).await;
        for f in forwards {
            f.abort();
        }
        self.ctx.net.teardown(&self.net).await;
        result
    }

    async fn run_containers(
        &self,
        spec: &k8s_openapi::api::core::v1::PodSpec,
        prepared: Prepared,
        term: &mut watch::Receiver<Option<u32>>,
    ) -> Result<(), String> {
        let pod_policy = match spec.restart_policy.as_deref() {
            Some("Never") => Restart::Never,
            Some("OnFailure") => Restart::OnFailure,
            _ => Restart::Always,
        };
        let start_time = now();
        let status_of = |c: &ContainerRun| CStatus {
            name: c.name.clone(),
            image: c.image.clone(),
            state: CState::Waiting("PodInitializing"),
            last: None,
            restarts: 0,
        };
        let mut init: Vec<CStatus> = prepared.init.iter().map(status_of).collect();
        let mut main: Vec<CStatus> = prepared.main.iter().map(status_of).collect();
        let (tx, mut rx) = mpsc::unbounded_channel::<(bool, usize, CStatus)>();

        // Init containers, one after the other; a failed one (after restarts) fails the pod.
        let init_policy = if pod_policy == Restart::Never {
            Restart::Never
        } else {
            Restart::OnFailure
        };
        self.patch(self.status_json("Pending", &start_time, &init, &main, false))
            .await;
        for (i, c) in prepared.init.into_iter().enumerate() {
            let mut task = tokio::spawn(run_container(
                self.spawn_info(),
                c,
                init_policy,
                term.clone(),
                tx.clone(),
                true,
                i,
            ));
            let fin = loop {
                tokio::select! {
                    Some((_, idx, st)) = rx.recv() => {
                        init[idx] = st;
                        self.patch(self.status_json("Pending", &start_time, &init, &main, false)).await;
                    }
                    r = &mut task => break r.map_err(|e| e.to_string())?,
                }
            };
            while let Ok((_, idx, st)) = rx.try_recv() {
                init[idx] = st;
            }
            init[i] = fin.clone();
            let failed = !matches!(fin.state, CState::Terminated { code: 0, .. });
            if failed || term.borrow().is_some() {
                let phase = if failed { "Failed" } else { "Pending" };
                self.patch(self.status_json(phase, &start_time, &init, &main, false))
                    .await;
                return Ok(());
            }
        }

        // Main containers, all at once.
        let mut set = tokio::task::JoinSet::new();
        for (i, c) in prepared.main.into_iter().enumerate() {
            set.spawn(run_container(
                self.spawn_info(),
                c,
                pod_policy,
                term.clone(),
                tx.clone(),
                false,
                i,
            ));
        }
        // The channel closes once every container task has ended (each holds a sender).
        drop(tx);
        while let Some((_, idx, st)) = rx.recv().await {
            main[idx] = st;
            self.patch(self.status_json("Running", &start_time, &init, &main, true))
                .await;
        }
        while let Some(done) = set.join_next().await {
            if let Err(e) = done {
                warn!("container task failed: {e}");
            }
        }
        let all_ok = main
            .iter()
            .all(|c| matches!(c.state, CState::Terminated { code: 0, .. }));
        let phase = if all_ok { "Succeeded" } else { "Failed" };
        self.patch(self.status_json(phase, &start_time, &init, &main, false))
            .await;
        info!(pod = %format!("{}/{}", self.ns(), self.name()), phase, "pod finished");
        Ok(())
    }

    fn spawn_info(&self) -> SpawnInfo {
        SpawnInfo {
            netns: self.net.netns.clone(),
            host_network: self.host_network(),
            hostname: pod_hostname(&self.pod),
            hosts_file: self.hosts_file.clone(),
            log_dir: self.log_dir.clone(),
            default_workdir: self.run_dir.join("work"),
        }
    }

    fn status_json(
        &self,
        phase: &str,
        start: &Value,
        init: &[CStatus],
        main: &[CStatus],
        running: bool,
    ) -> Value {
        let t = now();
        let cond = |ty: &str, ok: bool, reason: Option<&str>| {
            let mut c = json!({"type": ty, "status": if ok { "True" } else { "False" }, "lastTransitionTime": t});
            if let Some(r) = reason {
                c["reason"] = json!(r);
            }
            c
        };
        let initialized = init
            .iter()
            .all(|c| matches!(c.state, CState::Terminated { code: 0, .. }));
        let ready = running
            && main
                .iter()
                .all(|c| matches!(c.state, CState::Running { .. }));
        let terminal = phase == "Succeeded" || phase == "Failed";
        let not_ready_reason = if terminal {
            Some("PodCompleted")
        } else {
            Some("ContainersNotReady")
        };
        let mut status = json!({
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.net.ip,
            "podIPs": [{"ip": self.net.ip}],
            "startTime": start,
            "conditions": [
                cond("PodReadyToStartContainers", !terminal, None),
                cond("Initialized", initialized, if initialized { None } else { Some("ContainersNotInitialized") }),
                cond("Ready", ready, if ready { None } else { not_ready_reason }),
                cond("ContainersReady", ready, if ready { None } else { not_ready_reason }),
                cond("PodScheduled", true, None),
            ],
            "containerStatuses": main.iter().map(CStatus::json).collect::<Vec<_>>(),
        });
        if !init.is_empty() {
            status["initContainerStatuses"] =
                json!(init.iter().map(CStatus::json).collect::<Vec<_>>());
        }
        status
    }

    async fn patch(&self, status: Value) {
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), self.ns());
        if let Err(e) = api
            .patch_status(
                self.name(),
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
        {
            debug!("status patch for {}/{}: {e}", self.ns(), self.name());
        }
    }

    async fn prepare(
        &self,
        spec: &k8s_openapi::api::core::v1::PodSpec,
    ) -> Result<Prepared, PrepError> {
        let vols_dir = self.run_dir.join("volumes");
        let mut volume_paths: HashMap<String, PathBuf> = HashMap::new();
        for v in spec.volumes.iter().flatten() {
            let path = self.materialise_volume(v, &vols_dir.join(&v.name)).await?;
            volume_paths.insert(v.name.clone(), path);
        }
        let base_env = self.base_env();
        let mut out = Prepared {
            init: vec![],
            main: vec![],
        };
        for (is_init, list) in [
            (true, spec.init_containers.clone().unwrap_or_default()),
            (false, spec.containers.clone()),
        ] {
            for c in list {
                let run = self.container_run(&c, &volume_paths, &base_env).await?;
                if is_init {
                    out.init.push(run)
                } else {
                    out.main.push(run)
                }
            }
        }
        Ok(out)
    }

    fn base_env(&self) -> Vec<(String, String)> {
        let cfg = &self.ctx.config;
        let mut path: Vec<String> = cfg
            .path_prepend
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        path.push(std::env::var("PATH").unwrap_or_else(|_| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        }));
        let port = self.ctx.api_port.to_string();
        let mut env = vec![
            ("PATH".to_string(), path.join(":")),
            ("HOME".to_string(), "/root".to_string()),
            ("HOSTNAME".to_string(), pod_hostname(&self.pod)),
        ];
        // The in-cluster config clients use: the API server through the pod's loopback forwarder.
        for (k, v) in [
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1".to_string()),
            ("KUBERNETES_SERVICE_PORT", port.clone()),
            ("KUBERNETES_SERVICE_PORT_HTTPS", port.clone()),
            ("KUBERNETES_PORT", format!("tcp://127.0.0.1:{port}")),
            ("KUBERNETES_PORT_443_TCP", format!("tcp://127.0.0.1:{port}")),
            ("KUBERNETES_PORT_443_TCP_PROTO", "tcp".into()),
            ("KUBERNETES_PORT_443_TCP_PORT", port.clone()),
            ("KUBERNETES_PORT_443_TCP_ADDR", "127.0.0.1".into()),
        ] {
            env.push((k.to_string(), v));
        }
        for (k, v) in &cfg.env {
            env.push((k.clone(), v.clone()));
        }
        env
    }

    async fn container_run(
        &self,
        c: &Container,
        volumes: &HashMap<String, PathBuf>,
        base: &[(String, String)],
    ) -> Result<ContainerRun, PrepError> {
        let mut env: Vec<(String, String)> = base.to_vec();
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(n, _)| *n != k);
            env.push((k, v));
        };
        for src in c.env_from.iter().flatten() {
            let prefix = src.prefix.clone().unwrap_or_default();
            if let Some(r) = &src.config_map_ref {
                let optional = r.optional.unwrap_or(false);
                if let Some(data) = self.config_map_data(&r.name, optional).await? {
                    for (k, v) in data {
                        set(
                            &mut env,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into_owned(),
                        );
                    }
                }
            }
            if let Some(r) = &src.secret_ref {
                let optional = r.optional.unwrap_or(false);
                if let Some(data) = self.secret_data(&r.name, optional).await? {
                    for (k, v) in data {
                        set(
                            &mut env,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into_owned(),
                        );
                    }
                }
            }
        }
        for e in c.env.iter().flatten() {
            if let Some(v) = self.env_value(e, c, &env).await? {
                set(&mut env, e.name.clone(), v);
            }
        }
        let lookup: HashMap<String, String> = env.iter().cloned().collect();
        let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
        argv.extend(c.args.clone().unwrap_or_default());
        let argv = argv.iter().map(|a| expand(a, &lookup)).collect();
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let Some(src) = volumes.get(&m.name) else {
                return Err(PrepError::Unsupported(format!(
                    "container {:?} mounts unknown volume {:?}",
                    c.name, m.name
                )));
            };
            let mut source = src.clone();
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                if Path::new(sub).components().any(|c| {
                    matches!(
                        c,
                        std::path::Component::ParentDir | std::path::Component::RootDir
                    )
                }) {
                    return Err(PrepError::Unsupported(format!(
                        "subPath {sub:?} must be relative without '..'"
                    )));
                }
                source = source.join(sub);
                if !source.exists() {
                    std::fs::create_dir_all(&source)
                        .map_err(|e| PrepError::Retry(format!("{}: {e}", source.display())))?;
                }
            }
            mounts.push(BindMount {
                source,
                target: m.mount_path.clone(),
                read_only: m.read_only.unwrap_or(false),
            });
        }
        Ok(ContainerRun {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            argv,
            env,
            mounts,
            working_dir: c.working_dir.clone().unwrap_or_default(),
        })
    }

    async fn env_value(
        &self,
        e: &EnvVar,
        c: &Container,
        env: &[(String, String)],
    ) -> Result<Option<String>, PrepError> {
        if let Some(v) = &e.value {
            let lookup: HashMap<String, String> = env.iter().cloned().collect();
            return Ok(Some(expand(v, &lookup)));
        }
        let Some(from) = &e.value_from else {
            return Ok(Some(String::new()));
        };
        if let Some(f) = &from.field_ref {
            return self
                .field_value(f)
                .map(Some)
                .map_err(PrepError::Unsupported);
        }
        if let Some(r) = &from.resource_field_ref {
            return Ok(Some(resource_value(c, r)));
        }
        if let Some(r) = &from.config_map_key_ref {
            let optional = r.optional.unwrap_or(false);
            let data = self.config_map_data(&r.name, optional).await?;
            return match data.and_then(|d| d.get(&r.key).cloned()) {
                Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
                None if optional => Ok(None),
                None => Err(PrepError::Retry(format!(
                    "env {}: key {:?} not in ConfigMap {:?}",
                    e.name, r.key, r.name
                ))),
            };
        }
        if let Some(r) = &from.secret_key_ref {
            let optional = r.optional.unwrap_or(false);
            let data = self.secret_data(&r.name, optional).await?;
            return match data.and_then(|d| d.get(&r.key).cloned()) {
                Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
                None if optional => Ok(None),
                None => Err(PrepError::Retry(format!(
                    "env {}: key {:?} not in Secret {:?}",
                    e.name, r.key, r.name
                ))),
            };
        }
        Err(PrepError::Unsupported(format!(
            "env {}: unsupported valueFrom",
            e.name
        )))
    }

    fn field_value(&self, f: &ObjectFieldSelector) -> Result<String, String> {
        let md = &self.pod.metadata;
        let path = f.field_path.as_str();
        let label = |map: &Option<BTreeMap<String, String>>, key: &str| {
            map.as_ref()
                .and_then(|m| m.get(key).cloned())
                .unwrap_or_default()
        };
        let key_of = |prefix: &str| -> Option<String> {
            path.strip_prefix(prefix)?
                .strip_suffix("']")
                .map(str::to_string)
        };
        Ok(match path {
            "metadata.name" => md.name.clone().unwrap_or_default(),
            "metadata.namespace" => md.namespace.clone().unwrap_or_default(),
            "metadata.uid" => md.uid.clone().unwrap_or_default(),
            "spec.nodeName" => self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            "spec.serviceAccountName" => self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default(),
            "status.podIP" | "status.podIPs" => self.net.ip.clone(),
            "status.hostIP" | "status.hostIPs" => "127.0.0.1".into(),
            _ => {
                if let Some(k) = key_of("metadata.labels['") {
                    label(&md.labels, &k)
                } else if let Some(k) = key_of("metadata.annotations['") {
                    label(&md.annotations, &k)
                } else {
                    return Err(format!("fieldRef {path:?} is not supported"));
                }
            }
        })
    }

    async fn config_map_data(
        &self,
        name: &str,
        optional: bool,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, PrepError> {
        let api: Api<ConfigMap> = Api::namespaced(self.ctx.client.clone(), self.ns());
        match api.get_opt(name).await {
            Ok(Some(cm)) => {
                let mut out: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                out.extend(
                    cm.binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                Ok(Some(out))
            }
            Ok(None) if optional => Ok(None),
            Ok(None) => Err(PrepError::Retry(format!("ConfigMap {:?} not found", name))),
            Err(e) => Err(PrepError::Retry(format!("reading ConfigMap {name:?}: {e}"))),
        }
    }

    async fn secret_data(
        &self,
        name: &str,
        optional: bool,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, PrepError> {
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), self.ns());
        match api.get_opt(name).await {
            Ok(Some(s)) => Ok(Some(
                s.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect(),
            )),
            Ok(None) if optional => Ok(None),
            Ok(None) => Err(PrepError::Retry(format!("Secret {:?} not found", name))),
            Err(e) => Err(PrepError::Retry(format!("reading Secret {name:?}: {e}"))),
        }
    }

    async fn materialise_volume(&self, v: &Volume, dir: &Path) -> Result<PathBuf, PrepError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e: std::io::Error| PrepError::Retry(format!("{}: {e}", p.display()))
        };
        if let Some(pvc) = &v.persistent_volume_claim {
            let p = self.ctx.config.pvc_dir(self.ns(), &pvc.claim_name);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
            return Ok(p);
        }
        if let Some(hp) = &v.host_path {
            let p = PathBuf::from(&hp.path);
            if matches!(hp.type_.as_deref(), Some("DirectoryOrCreate")) {
                std::fs::create_dir_all(&p).map_err(io(&p))?;
            }
            return Ok(p);
        }
        // Everything else is materialised fresh under the pod's run dir.
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let select = |data: BTreeMap<String, Vec<u8>>,
                      items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>|
         -> Vec<(String, Vec<u8>)> {
            match items {
                Some(items) if !items.is_empty() => items
                    .iter()
                    .filter_map(|i| data.get(&i.key).map(|d| (i.path.clone(), d.clone())))
                    .collect(),
                _ => data.into_iter().collect(),
            }
        };
        if v.empty_dir.is_some() {
            return Ok(dir.to_path_buf());
        } else if let Some(cm) = &v.config_map {
            if let Some(data) = self
                .config_map_data(&cm.name, cm.optional.unwrap_or(false))
                .await?
            {
                files.extend(select(data, &cm.items));
            }
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            if let Some(data) = self.secret_data(&name, s.optional.unwrap_or(false)).await? {
                files.extend(select(data, &s.items));
            }
        } else if let Some(d) = &v.downward_api {
            for item in d.items.iter().flatten() {
                files.push((item.path.clone(), self.downward_item(item)?));
            }
        } else if let Some(p) = &v.projected {
            for src in p.sources.iter().flatten() {
                if let Some(cm) = &src.config_map {
                    if let Some(data) = self
                        .config_map_data(&cm.name, cm.optional.unwrap_or(false))
                        .await?
                    {
                        files.extend(select(data, &cm.items));
                    }
                }
                if let Some(s) = &src.secret {
                    if let Some(data) = self
                        .secret_data(&s.name, s.optional.unwrap_or(false))
                        .await?
                    {
                        files.extend(select(data, &s.items));
                    }
                }
                if let Some(d) = &src.downward_api {
                    for item in d.items.iter().flatten() {
                        files.push((item.path.clone(), self.downward_item(item)?));
                    }
                }
                if let Some(t) = &src.service_account_token {
                    files.push((
                        t.path.clone(),
                        self.token(t.audience.clone(), t.expiration_seconds)
                            .await?
                            .into_bytes(),
                    ));
                }
                if src.cluster_trust_bundle.is_some() || src.pod_certificate.is_some() {
                    return Err(PrepError::Unsupported(format!("volume {:?}: clusterTrustBundle/podCertificate projections are not supported", v.name)));
                }
            }
        }
        for (rel, data) in files {
            if Path::new(&rel).components().any(|c| {
                matches!(
                    c,
                    std::path::Component::ParentDir | std::path::Component::RootDir
                )
            }) {
                return Err(PrepError::Unsupported(format!(
                    "volume {:?}: item path {rel:?} escapes the volume",
                    v.name
                )));
            }
            let p = dir.join(&rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&p, data).map_err(io(&p))?;
        }
        Ok(dir.to_path_buf())
    }

    fn downward_item(
        &self,
        item: &k8s_openapi::api::core::v1::DownwardAPIVolumeFile,
    ) -> Result<Vec<u8>, PrepError> {
        if let Some(f) = &item.field_ref {
            let path = f.field_path.as_str();
            // Whole-map fields are rendered like the kubelet does: key="value" lines.
            let map = match path {
                "metadata.labels" => Some(&self.pod.metadata.labels),
                "metadata.annotations" => Some(&self.pod.metadata.annotations),
                _ => None,
            };
            if let Some(m) = map {
                let s: String = m
                    .iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={v:?}\n"))
                    .collect();
                return Ok(s.into_bytes());
            }
            return self
                .field_value(f)
                .map(String::into_bytes)
                .map_err(PrepError::Unsupported);
        }
        if let Some(r) = &item.resource_field_ref {
            let name = r.container_name.clone().unwrap_or_default();
            let c = self
                .pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .find(|c| c.name == name);
            return Ok(c
                .map(|c| resource_value(c, r))
                .unwrap_or_default()
                .into_bytes());
        }
        Err(PrepError::Unsupported(format!(
            "downwardAPI item {:?} has no fieldRef/resourceFieldRef",
            item.path
        )))
    }

    /// A bound service-account token, as the kubelet requests for projected volumes.
    async fn token(
        &self,
        audience: Option<String>,
        expiration: Option<i64>,
    ) -> Result<String, PrepError> {
        let sa = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.ctx.client.clone(), self.ns());
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.into_iter().collect(),
                expiration_seconds: expiration,
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: self.pod.metadata.name.clone(),
                    uid: self.pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        match api
            .create_token_request(&sa, &PostParams::default(), &req)
            .await
        {
            Ok(t) => Ok(t.status.map(|s| s.token).unwrap_or_default()),
            Err(e) => Err(PrepError::Retry(format!(
                "token for ServiceAccount {sa:?}: {e}"
            ))),
        }
    }
}

/// `spec.hostname` or the pod name (what the kubelet uses).
pub fn pod_hostname(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default()
}

fn resource_value(c: &Container, r: &ResourceFieldSelector) -> String {
    let res = c.resources.clone().unwrap_or_default();
    let (map, key) = match r.resource.split_once('.') {
        Some(("limits", k)) => (res.limits, k.to_string()),
        Some(("requests", k)) => (res.requests, k.to_string()),
        _ => return String::new(),
    };
    let Some(q) = map.and_then(|m| m.get(&key).map(|q| q.0.clone())) else {
        return String::new();
    };
    let divisor = r
        .divisor
        .as_ref()
        .and_then(|d| quantity::parse(&d.0))
        .filter(|d| *d > 0.0)
        .unwrap_or(1.0);
    match quantity::parse(&q) {
        // Rounded up like the kubelet does.
        Some(v) => format!("{}", (v / divisor).ceil() as i64),
        None => q,
    }
}

/// Kubernetes `$(VAR)` expansion: defined names are replaced, `$$` escapes, unknown stay as is.
pub fn expand(s: &str, env: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'(' {
                if let Some(end) = s[i + 2..].find(')') {
                    let name = &s[i + 2..i + 2 + end];
                    if let Some(v) = env.get(name) {
                        out.push_str(v);
                    } else {
                        out.push_str(&s[i..i + 3 + end]);
                    }
                    i += 3 + end;
                    continue;
                }
            }
        }
        let ch = s[i..].chars().next().unwrap_or('\u{FFFD}');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

struct SpawnInfo {
    netns: Option<String>,
    host_network: bool,
    hostname: String,
    hosts_file: PathBuf,
    log_dir: PathBuf,
    default_workdir: PathBuf,
}

/// The command line that enters the pod's namespaces, sets up its mounts and execs `argv`:
/// `ip netns exec` gives a network + private mount namespace, `unshare --uts` the hostname.
fn wrapper(info: &SpawnInfo, c: &ContainerRun) -> Vec<String> {
    let mut script = String::from("set -e\n");
    if !info.host_network {
        script += &format!(
            "hostname {} 2>/dev/null || true\n",
            sh_quote(&info.hostname)
        );
        script += &format!(
            "mount --bind {} /etc/hosts\n",
            sh_quote(&info.hosts_file.display().to_string())
        );
    }
    let mut mounts: Vec<&BindMount> = c.mounts.iter().collect();
    mounts.sort_by_key(|m| m.target.len());
    for m in mounts {
        let (src, tgt) = (
            sh_quote(&m.source.display().to_string()),
            sh_quote(&m.target),
        );
        if m.source.is_dir() {
            script += &format!("mkdir -p {tgt}\n");
        } else {
            script += &format!("mkdir -p \"$(dirname {tgt})\"; [ -e {tgt} ] || : > {tgt}\n");
        }
        script += &format!("mount --bind {src} {tgt}\n");
        if m.read_only {
            script += &format!("mount -o remount,bind,ro {tgt}\n");
        }
    }
    let wd = if c.working_dir.is_empty() {
        info.default_workdir.display().to_string()
    } else {
        c.working_dir.clone()
    };
    script += &format!("mkdir -p {0}; cd {0}\nexec \"$@\"\n", sh_quote(&wd));
    let mut argv: Vec<String> = Vec::new();
    match (&info.netns, info.host_network) {
        (Some(ns), false) => argv.extend(
            ["ip", "netns", "exec", ns.as_str(), "unshare", "--uts", "--"].map(String::from),
        ),
        (_, true) => {
            argv.extend(["unshare", "--mount", "--propagation", "private", "--"].map(String::from))
        }
        (None, false) => argv.extend(
            [
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "--",
            ]
            .map(String::from),
        ),
    }
    argv.extend([
        "/bin/sh".into(),
        "-c".into(),
        script,
        format!("container-{}", c.name),
    ]);
    argv.extend(c.argv.iter().cloned());
    argv
}

fn signal_group(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions. Negative pid = process group.
        unsafe {
            libc::kill(-pid, sig);
        }
    }
}

/// Runs one container with its restart policy until it stops for good or the pod terminates.
/// Reports every state change through `tx`; returns the final status.
async fn run_container(
    info: SpawnInfo,
    c: ContainerRun,
    policy: Restart,
    mut term: watch::Receiver<Option<u32>>,
    tx: mpsc::UnboundedSender<(bool, usize, CStatus)>,
    is_init: bool,
    idx: usize,
) -> CStatus {
    let mut st = CStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        state: CState::Waiting("ContainerCreating"),
        last: None,
        restarts: 0,
    };
    let log_path = info.log_dir.join(format!("{}.log", c.name));
    let argv = wrapper(&info, &c);
    loop {
        if term.borrow().is_some() {
            return st;
        }
        let started = now();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path);
        let spawned = log.and_then(|f| {
            let f2 = f.try_clone()?;
            let mut cmd = tokio::process::Command::new(&argv[0]);
            cmd.args(&argv[1..])
                .env_clear()
                .envs(c.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdin(std::process::Stdio::null())
                .stdout(f)
                .stderr(f2)
                .process_group(0)
                .kill_on_drop(true);
            cmd.spawn()
        });
        let (code, signal, message) = match spawned {
            Err(e) => (128, None, Some(format!("starting {:?}: {e}", argv[0]))),
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                st.state = CState::Running {
                    started: started.clone(),
                    pid,
                };
                let _ = tx.send((is_init, idx, st.clone()));
                let status = tokio::select! {
                    s = child.wait() => s,
                    _ = term.changed() => {
                        let grace = (*term.borrow()).unwrap_or(0);
                        signal_group(pid, libc::SIGTERM);
                        match tokio::time::timeout(Duration::from_secs(grace.into()), child.wait()).await {
                            Ok(s) => s,
                            Err(_) => {
                                signal_group(pid, libc::SIGKILL);
                                child.wait().await
                            }
                        }
                    }
                };
                // Whatever the main process left behind in its group goes with it.
                signal_group(pid, libc::SIGKILL);
                match status {
                    Ok(s) => {
                        use std::os::unix::process::ExitStatusExt;
                        match (s.code(), s.signal()) {
                            (Some(code), _) => (code, None, None),
                            (None, Some(sig)) => (128 + sig, Some(sig), None),
                            _ => (128, None, None),
                        }
                    }
                    Err(e) => (128, None, Some(e.to_string())),
                }
            }
        };
        st.state = CState::Terminated {
            code,
            signal,
            started,
            finished: now(),
            message,
        };
        let again = match policy {
            Restart::Always => true,
            Restart::OnFailure => code != 0,
            Restart::Never => false,
        };
        if !again || term.borrow().is_some() {
            let _ = tx.send((is_init, idx, st.clone()));
            return st;
        }
        let _ = tx.send((is_init, idx, st.clone()));
        // CrashLoopBackOff, shortened for tests: 1s, 2s, 4s, ... capped at 10s.
        let backoff = Duration::from_secs((1u64 << st.restarts.min(4)).min(10));
        st.last = Some(st.state.clone());
        st.restarts += 1;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = term.changed() => return st,
        }
    }
}
