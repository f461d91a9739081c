//! The controllers: observe (fresh reads) → plan (pure) → act (server-side apply, deletes,
//! status, events). One controller per job kind plus the RolloutPool controller.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::controller::{Action as CtlAction, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::Instrument;

use crate::api::*;
use crate::job::TrainingJob;
use crate::labels;
use crate::metrics::Metrics;
use crate::planner::{self, names, Action, Child, ChildKind, EventSeverity, Observed};
use crate::FIELD_MANAGER;

/// Periodic resync of every object even without changes (catches anything a watch missed).
const RESYNC: Duration = Duration::from_secs(300);
/// Longest per-object error backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Reconcile errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Plan(#[from] planner::PlanError),
    #[error("{kind} {name} has no namespace; onevision resources are namespaced")]
    NoNamespace { kind: &'static str, name: String },
    #[error("applying PodGroup {name} failed (is the {group} CRD installed? set scheduling.podGroup only with that scheduler): {source}")]
    PodGroup {
        name: String,
        group: String,
        source: kube::Error,
    },
    #[error("reading or applying the worker {kind} {name} failed (the operator needs get/create/patch on serviceaccounts, roles and rolebindings, and must itself hold get/patch on pods to grant them: check the chart's RBAC, or set trainer.serviceAccountName to run as your own account): {source}")]
    WorkerRbac {
        kind: &'static str,
        name: String,
        source: kube::Error,
    },
}

impl Error {
    /// Short label for the errors-by-kind metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "ApiError",
            Error::Kube(_) => "ClientError",
            Error::Plan(_) => "InvalidObject",
            Error::NoNamespace { .. } => "InvalidObject",
            Error::PodGroup { .. } => "PodGroup",
            Error::WorkerRbac { .. } => "WorkerRbac",
        }
    }
}

/// Shared state of the controllers.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object, for exponential per-object backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// New context; `instance` identifies this replica in events.
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Context {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn backoff(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = f.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let secs = 1u64 << (*n - 1).min(9);
        Duration::from_secs(secs).min(MAX_BACKOFF)
    }

    fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

fn key_of<K: Resource>(kind: &str, obj: &K) -> String {
    format!(
        "{kind}/{}/{}",
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

/// The span of one reconcile (exported over OTLP when the operator has an endpoint); failures
/// set the OpenTelemetry status to error with the message.
fn reconcile_span<K: Resource>(kind: &str, obj: &K) -> tracing::Span {
    tracing::info_span!(
        "reconcile",
        kind,
        namespace = obj.meta().namespace.as_deref().unwrap_or_default(),
        name = obj.meta().name.as_deref().unwrap_or_default(),
        otel.status_code = tracing::field::Empty,
        otel.status_message = tracing::field::Empty,
    )
}

fn record_outcome<T>(span: &tracing::Span, result: &Result<T, Error>) {
    if let Err(e) = result {
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_message", e.to_string());
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

async fn delete_ignore_missing<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

fn trainer_selector(job: &str) -> String {
    format!(
        "{}={job},{}={}",
        labels::JOB_NAME,
        labels::ROLE,
        labels::ROLE_TRAINER
    )
}

/// One of a job's worker RBAC objects; a refusal names the RBAC the operator lacks.
async fn get_worker_object<K>(
    client: &Client,
    ns: &str,
    name: &str,
    kind: &'static str,
) -> Result<Option<K>, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|source| Error::WorkerRbac {
            kind,
            name: name.to_string(),
            source,
        })
}

/// Observe everything the planner needs, with quorum reads: the informer cache may lag behind
/// our own writes, and a stale view could turn a just-created pod into a "deleted" one.
async fn observe<J: TrainingJob>(client: &Client, job: &J, ns: &str) -> Result<Observed, Error> {
    let name = job.name_any();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let trainer_pods = pods
        .list(&ListParams::default().labels(&trainer_selector(&name)))
        .await?
        .items
        .into_iter()
        .collect();
    let service = Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(&names::service(&name))
        .await?;
    let config_map = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(&names::config_map(&name))
        .await?;
    let rollout_pool = if J::KIND == JobKind::GRPOJob {
        Api::<RolloutPool>::namespaced(client.clone(), ns)
            .get_opt(&names::rollout_pool(&name))
            .await?
    } else {
        None
    };
    let source_sft_job = match &job.common().model.from_sft_job {
        Some(src) => {
            Api::<SFTJob>::namespaced(client.clone(), ns)
                .get_opt(src)
                .await?
        }
        None => None,
    };
    // Jobs running as the user's own service account have no worker RBAC to look at.
    let (worker_service_account, worker_role, worker_role_binding) =
        if job.common().trainer.service_account_name.is_none() {
            let worker = names::worker(&name);
            (
                get_worker_object::<ServiceAccount>(client, ns, &worker, "ServiceAccount").await?,
                get_worker_object::<Role>(client, ns, &worker, "Role").await?,
                get_worker_object::<RoleBinding>(client, ns, &worker, "RoleBinding").await?,
            )
        } else {
            (None, None, None)
        };
    Ok(Observed {
        trainer_pods,
        service,
        config_map,
        rollout_pool,
        source_sft_job,
        worker_service_account,
        worker_role,
        worker_role_binding,
        now: Timestamp::now(),
    })
}

async fn apply_child(client: &Client, ns: &str, child: &Child) -> Result<(), Error> {
    let pp = apply_params();
    let name = child.name();
    match child {
        Child::Service(o) => {
            Api::<Service>::namespaced(client.clone(), ns)
                .patch(&name, &pp, &Patch::Apply(o))
                .await?;
        }
        Child::ConfigMap(o) => {
            Api::<ConfigMap>::namespaced(client.clone(), ns)
                .patch(&name, &pp, &Patch::Apply(o))
                .await?;
        }
        Child::Pod(o) => {
            Api::<Pod>::namespaced(client.clone(), ns)
                .patch(&name, &pp, &Patch::Apply(o))
                .await?;
        }
        Child::RolloutPool(o) => {
            Api::<RolloutPool>::namespaced(client.clone(), ns)
                .patch(&name, &pp, &Patch::Apply(o))
                .await?;
        }
        Child::ServiceAccount(o) => {
            Api::<ServiceAccount>::namespaced(client.clone(), ns)
                .patch(&name, &pp, &Patch::Apply(o))
                .await
                .map_err(|source| Error::WorkerRbac {
                    kind: "ServiceAccount",
                    name: name.clone(),
                    source,
                })?;
        }
        Child::Role(o) => {
            Api::<Role>::namespaced(client.clone(), ns)
                .patch(&name, &pp, &Patch::Apply(o))
                .await
                .map_err(|source| Error::WorkerRbac {
                    kind: "Role",
                    name: name.clone(),
                    source,
                })?;
        }
        Child::RoleBinding(o) => {
            Api::<RoleBinding>::namespaced(client.clone(), ns)
                .patch(&name, &pp, &Patch::Apply(o))
                .await
                .map_err(|source| Error::WorkerRbac {
                    kind: "RoleBinding",
                    name: name.clone(),
                    source,
                })?;
        }
        Child::PodGroup(o) => {
            let types = o.types.clone().unwrap_or_default();
            let (group, version) = types
                .api_version
                .split_once('/')
                .unwrap_or(("", &types.api_version));
            let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &types.kind));
            Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar)
                .patch(&name, &pp, &Patch::Apply(o))
                .await
                .map_err(|source| Error::PodGroup {
                    name: name.clone(),
                    group: group.to_string(),
                    source,
                })?;
        }
    }
    Ok(())
}

async fn delete_child(client: &Client, ns: &str, kind: ChildKind, name: &str) -> Result<(), Error> {
    match kind {
        ChildKind::Pod => {
            delete_ignore_missing(&Api::<Pod>::namespaced(client.clone(), ns), name).await?
        }
        ChildKind::Service => {
            delete_ignore_missing(&Api::<Service>::namespaced(client.clone(), ns), name).await?
        }
        ChildKind::ConfigMap => {
            delete_ignore_missing(&Api::<ConfigMap>::namespaced(client.clone(), ns), name).await?
        }
        ChildKind::RolloutPool => {
            delete_ignore_missing(&Api::<RolloutPool>::namespaced(client.clone(), ns), name).await?
        }
        // PodGroups and the worker RBAC are only ever removed by garbage collection through
        // their owner reference (so the operator needs no delete verb on them).
        ChildKind::PodGroup
        | ChildKind::ServiceAccount
        | ChildKind::Role
        | ChildKind::RoleBinding => {}
    }
    Ok(())
}

/// Reconcile one SFTJob or GRPOJob.
pub async fn reconcile_job<J: TrainingJob>(
    cached: Arc<J>,
    ctx: Arc<Context>,
) -> Result<CtlAction, Error> {
    let started = Instant::now();
    let kind = J::KIND.as_str();
    let key = key_of(kind, cached.as_ref());
    let span = reconcile_span(kind, cached.as_ref());
    let result = reconcile_job_inner::<J>(&cached, &ctx, &key)
        .instrument(span.clone())
        .await;
    record_outcome(&span, &result);
    ctx.metrics.reconciled(kind, started.elapsed());
    if result.is_ok() {
        ctx.succeeded(&key);
    }
    result
}

async fn reconcile_job_inner<J: TrainingJob>(
    cached: &J,
    ctx: &Context,
    key: &str,
) -> Result<CtlAction, Error> {
    let kind = J::KIND.as_str();
    let name = cached.name_any();
    let ns = cached.namespace().ok_or_else(|| Error::NoNamespace {
        kind,
        name: name.clone(),
    })?;
    let api: Api<J> = Api::namespaced(ctx.client.clone(), &ns);
    // Fresh read: the cached copy may predate the status we wrote last time.
    let Some(job) = api.get_opt(&name).await? else {
        ctx.metrics.job_phase(kind, key.to_string(), None);
        return Ok(CtlAction::await_change());
    };
    if job.meta().deletion_timestamp.is_some() {
        ctx.metrics.job_phase(kind, key.to_string(), None);
        return Ok(CtlAction::await_change());
    }
    let observed = observe(&ctx.client, &job, &ns).await?;
    let plan = planner::plan(&job, &observed)?;

    for action in &plan.actions {
        match action {
            Action::Apply(child) => apply_child(&ctx.client, &ns, child).await?,
            Action::Delete { kind, name } => delete_child(&ctx.client, &ns, *kind, name).await?,
            Action::DeleteJob => {
                tracing::info!(job = %name, kind, "ttlSecondsAfterFinished elapsed, deleting");
                delete_ignore_missing(&api, &name).await?;
                ctx.metrics.job_phase(kind, key.to_string(), None);
                return Ok(CtlAction::await_change());
            }
        }
    }

    let labels = job.labels();
    if plan
        .job_labels
        .iter()
        .any(|(k, v)| labels.get(k) != Some(v))
    {
        let patch = json!({
            "apiVersion": API_VERSION, "kind": kind,
            "metadata": { "name": name, "labels": plan.job_labels },
        });
        api.patch(&name, &apply_params(), &Patch::Apply(&patch))
            .await?;
    }

    let old = job.job_status().cloned().unwrap_or_default();
    if old != plan.status {
        let patch = json!({ "apiVersion": API_VERSION, "kind": kind, "status": plan.status });
        api.patch_status(&name, &apply_params(), &Patch::Apply(&patch))
            .await?;
    }

    // Metrics and events only after the new state is stored, so a retry re-derives them.
    if plan.status.restarts > old.restarts {
        ctx.metrics
            .gang_restarted(kind, (plan.status.restarts - old.restarts) as u64);
    }
    if plan.status.phase == Some(JobPhase::Running) && old.phase != Some(JobPhase::Running) {
        if let Some(created) = job.meta().creation_timestamp.as_ref() {
            let secs = Timestamp::now().duration_since(created.0).as_secs_f64();
            ctx.metrics.all_pods_running(kind, secs);
        }
    }
    ctx.metrics
        .job_phase(kind, key.to_string(), plan.status.phase);
    let reference = job.object_ref(&());
    for ev in &plan.events {
        let event = Event {
            type_: match ev.severity {
                EventSeverity::Normal => EventType::Normal,
                EventSeverity::Warning => EventType::Warning,
            },
            reason: ev.reason.clone(),
            note: Some(ev.message.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        // An event that cannot be published must not fail (and so repeat) the reconcile.
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(job = %name, error = %e, "publishing event failed");
        }
    }
    Ok(CtlAction::requeue(
        plan.requeue_after.unwrap_or(RESYNC).min(RESYNC),
    ))
}

/// Reconcile one RolloutPool.
pub async fn reconcile_pool(
    cached: Arc<RolloutPool>,
    ctx: Arc<Context>,
) -> Result<CtlAction, Error> {
    let started = Instant::now();
    let key = key_of("RolloutPool", cached.as_ref());
    let span = reconcile_span("RolloutPool", cached.as_ref());
    let result = reconcile_pool_inner(&cached, &ctx)
        .instrument(span.clone())
        .await;
    record_outcome(&span, &result);
    ctx.metrics.reconciled("RolloutPool", started.elapsed());
    if result.is_ok() {
        ctx.succeeded(&key);
    }
    result
}

async fn reconcile_pool_inner(cached: &RolloutPool, ctx: &Context) -> Result<CtlAction, Error> {
    let name = cached.name_any();
    let ns = cached.namespace().ok_or_else(|| Error::NoNamespace {
        kind: "RolloutPool",
        name: name.clone(),
    })?;
    let api: Api<RolloutPool> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(pool) = api.get_opt(&name).await? else {
        return Ok(CtlAction::await_change());
    };
    if pool.meta().deletion_timestamp.is_some() {
        return Ok(CtlAction::await_change());
    }
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = planner::selector_string(&planner::pool_selector(&name, &pool.spec.job_name));
    let uid = pool.meta().uid.clone();
    let pods: Vec<Pod> = pods_api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .collect();
    let plan = planner::plan_pool(&pool, &pods)?;
    for pod in &plan.create {
        pods_api
            .patch(&pod.name_any(), &apply_params(), &Patch::Apply(pod))
            .await?;
    }
    for victim in &plan.delete {
        delete_ignore_missing(&pods_api, victim).await?;
    }
    if pool.status.as_ref() != Some(&plan.status) {
        let patch =
            json!({ "apiVersion": API_VERSION, "kind": "RolloutPool", "status": plan.status });
        api.patch_status(&name, &apply_params(), &Patch::Apply(&patch))
            .await?;
    }
    Ok(CtlAction::requeue(RESYNC))
}

fn error_policy<K: Resource>(
    kind: &'static str,
) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> CtlAction {
    move |obj, err, ctx| {
        let key = key_of(kind, obj.as_ref());
        ctx.metrics.error(kind, err.metric_label());
        let wait = ctx.backoff(&key);
        tracing::warn!(object = %key, error = %err, retry_in = ?wait, "reconcile failed");
        CtlAction::requeue(wait)
    }
}

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn job_controller<J>(
    client: &Client,
    namespace: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    ctx: Arc<Context>,
) -> impl Future<Output = ()> + Send
where
    J: TrainingJob + Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    let children =
        watcher::Config::default().labels(&format!("{}={}", labels::JOB_KIND, J::KIND.as_str()));
    let pods = watcher::Config::default().labels(&format!(
        "{}={},{}={}",
        labels::JOB_KIND,
        J::KIND.as_str(),
        labels::ROLE,
        labels::ROLE_TRAINER
    ));
    let controller = Controller::new(api_for::<J>(client, namespace), watcher::Config::default())
        .owns(api_for::<Pod>(client, namespace), pods)
        .owns(api_for::<Service>(client, namespace), children.clone())
        .owns(api_for::<ConfigMap>(client, namespace), children.clone());
    let controller = if J::KIND == JobKind::GRPOJob {
        controller.owns(
            api_for::<RolloutPool>(client, namespace),
            watcher::Config::default(),
        )
    } else {
        controller
    };
    // Jobs with `model.fromSFTJob` wake up when their source SFTJob changes.
    let store = controller.store();
    controller
        .watches(
            api_for::<SFTJob>(client, namespace),
            watcher::Config::default(),
            move |sft: SFTJob| {
                let (src, ns) = (sft.name_any(), sft.namespace());
                store
                    .state()
                    .into_iter()
                    .filter(|j| {
                        j.namespace() == ns
                            && j.common().model.from_sft_job.as_deref() == Some(src.as_str())
                    })
                    .map(|j| ObjectRef::from_obj(j.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile_job::<J>, error_policy::<J>(J::KIND.as_str()), ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile dispatch error");
            }
        })
}

fn pool_controller(
    client: &Client,
    namespace: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    ctx: Arc<Context>,
) -> impl Future<Output = ()> + Send {
    let pods =
        watcher::Config::default().labels(&format!("{}={}", labels::ROLE, labels::ROLE_ROLLOUT));
    Controller::new(
        api_for::<RolloutPool>(client, namespace),
        watcher::Config::default(),
    )
    .owns(api_for::<Pod>(client, namespace), pods)
    .graceful_shutdown_on(shutdown)
    .run(
        reconcile_pool,
        error_policy::<RolloutPool>("RolloutPool"),
        ctx,
    )
    .for_each(|res| async move {
        if let Err(e) = res {
            tracing::debug!(error = %e, "reconcile dispatch error");
        }
    })
}

/// Run the three controllers until `shutdown` resolves (then finish in-flight reconciles).
pub async fn run_controllers(
    client: Client,
    namespace: Option<String>,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let trigger = |tx: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };
    let ns = namespace.as_deref();
    let sft = job_controller::<SFTJob>(&client, ns, trigger(&tx), ctx.clone());
    let grpo = job_controller::<GRPOJob>(&client, ns, trigger(&tx), ctx.clone());
    let pool = pool_controller(&client, ns, trigger(&tx), ctx.clone());
    ctx.metrics.set_ready(true);
    let all = futures::future::join3(sft, grpo, pool);
    tokio::pin!(all);
    tokio::select! {
        _ = &mut all => {}
        _ = shutdown => {
            let _ = tx.send(());
            let t0 = Instant::now();
            // The controllers finish the reconciles in flight, but the whole shutdown must fit
            // the pod's termination grace period (30 s): a reconcile stuck on a slow API server is
            // abandoned. That is safe, reconciles are level-triggered and the next leader redoes it.
            match tokio::time::timeout(CONTROLLER_DRAIN, all).await {
                Ok(_) => tracing::info!(
                    elapsed_ms = t0.elapsed().as_millis() as u64,
                    "controllers stopped"
                ),
                Err(_) => tracing::warn!(
                    "reconciles still running {}s after shutdown; abandoning them",
                    CONTROLLER_DRAIN.as_secs()
                ),
            }
        }
    }
    ctx.metrics.set_ready(false);
}

/// How long a shutdown waits for the reconciles in flight.
pub const CONTROLLER_DRAIN: Duration = Duration::from_secs(5);
