//! `grpc.health.v1` client helper (readiness checks of coordinator and rollout servers).

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::coordinator::{lazy_channel, ClientError, RetryPolicy};

/// Asks `endpoint` for the health of `service` (`""` = the whole server), retrying while the
/// server is not up yet, within `policy`.
pub async fn check_health(endpoint: &str, service: &str, policy: &RetryPolicy) -> Result<ServingStatus, ClientError> {
    let client = HealthClient::new(lazy_channel(endpoint, policy)?);
    let req = HealthCheckRequest { service: service.to_string() };
    let resp = crate::coordinator::with_retry(policy, endpoint, "Health.Check", policy.call_timeout, |t: Duration| {
        let mut c = client.clone();
        let mut r = tonic::Request::new(req.clone());
        r.set_timeout(t);
        async move { c.check(r).await.map(|x| x.into_inner()) }
    })
    .await?;
    Ok(ServingStatus::try_from(resp.status).unwrap_or(ServingStatus::Unknown))
}
