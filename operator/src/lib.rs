//! onevision operator: CRD types, the pure planner, controllers.
//!
//! - [`api`]: `SFTJob`, `GRPOJob`, `RolloutPool` (group `onevision.dev/v1alpha1`).
//! - [`planner`]: pure functions from a job and its observed children to desired children,
//!   actions, status and events; the single source of pod specs (the worker's local runner calls it).
//! - [`env`]: the environment variable contract of the pods.
//! - [`job`]: the typed job file mounted into every pod and the trait shared by both job kinds.
//! - [`controller`]: the kube-runtime controllers, metrics and leader election.

pub mod api;
pub mod controller;
pub mod crdgen;
pub mod env;
pub mod job;
pub mod labels;
pub mod metrics;
pub mod planner;

/// Worker exit code meaning "retrying cannot help" (bad config, missing data): the job fails at
/// once instead of restarting the gang. Same value as `onevision::EXIT_PERMANENT`.
pub const EXIT_PERMANENT: i32 = 78;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "onevision-operator";
