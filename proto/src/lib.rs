//! gRPC API of onevision, package `onevision.v1`, generated at build time from `proto/onevision/v1`
//! with tonic-prost-build and the vendored protoc. Semantics and status codes: `docs/proto.md`.

/// The `onevision.v1` package: messages, `*_client` and `*_server` modules.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("onevision.v1");
}

/// Largest gRPC message any onevision server or client accepts or sends (set explicitly on every
/// server and client; tonic's 4 MiB default decode limit is too small for pixel payloads).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Size of the `data` of one `TensorChunk` sent by `UpdateWeights` senders: well under
/// [`MAX_MESSAGE_BYTES`], big enough that per-message overhead is negligible.
pub const WEIGHT_CHUNK_BYTES: usize = 4 * 1024 * 1024;

impl v1::Dtype {
    /// Bytes per element; `None` for `DTYPE_UNSPECIFIED`.
    pub fn size_bytes(self) -> Option<usize> {
        use v1::Dtype::*;
        match self {
            Unspecified => None,
            F32 | I32 | U32 => Some(4),
            F16 | Bf16 => Some(2),
            I64 => Some(8),
            U8 => Some(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1;
    use prost::Message;

    #[test]
    fn tensor_chunk_round_trips_through_the_wire_format() {
        let chunk = v1::TensorChunk {
            name: "model.embed_tokens.weight".into(),
            shape: vec![4, 2],
            dtype: v1::Dtype::F32 as i32,
            version: 7,
            offset: 16,
            data: vec![1u8, 2, 3, 4].into(),
        };
        let bytes = chunk.encode_to_vec();
        let back = v1::TensorChunk::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, chunk);
        assert_eq!(back.dtype(), v1::Dtype::F32);
    }

    #[test]
    fn dtype_sizes() {
        assert_eq!(v1::Dtype::Bf16.size_bytes(), Some(2));
        assert_eq!(v1::Dtype::I64.size_bytes(), Some(8));
        assert_eq!(v1::Dtype::Unspecified.size_bytes(), None);
    }

    #[test]
    fn all_services_are_generated() {
        // Fails to compile if a service or its client/server module is missing.
        let _ = v1::coordinator_server::CoordinatorServer::<Never>::new;
        let _ = v1::rollout_registry_server::RolloutRegistryServer::<NeverReg>::new;
        let _ = v1::rollout_client::RolloutClient::<tonic::transport::Channel>::new;
        let _ = v1::reward_client::RewardClient::<tonic::transport::Channel>::new;
        assert_eq!(
            <v1::coordinator_server::CoordinatorServer<Never> as tonic::server::NamedService>::NAME,
            "onevision.v1.Coordinator"
        );
    }

    struct Never;
    #[tonic::async_trait]
    impl v1::coordinator_server::Coordinator for Never {
        async fn join(&self, _: tonic::Request<v1::JoinRequest>) -> Result<tonic::Response<v1::JoinResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn heartbeat(&self, _: tonic::Request<v1::HeartbeatRequest>) -> Result<tonic::Response<v1::HeartbeatResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn begin_step(&self, _: tonic::Request<v1::BeginStepRequest>) -> Result<tonic::Response<v1::BeginStepResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn report_progress(&self, _: tonic::Request<v1::ProgressReport>) -> Result<tonic::Response<v1::ProgressAck>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn get_status(&self, _: tonic::Request<v1::GetStatusRequest>) -> Result<tonic::Response<v1::JobStatus>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn shutdown(&self, _: tonic::Request<v1::ShutdownRequest>) -> Result<tonic::Response<v1::ShutdownResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
    }
    struct NeverReg;
    #[tonic::async_trait]
    impl v1::rollout_registry_server::RolloutRegistry for NeverReg {
        async fn register(&self, _: tonic::Request<v1::RegisterRolloutRequest>) -> Result<tonic::Response<v1::RegisterRolloutResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn deregister(&self, _: tonic::Request<v1::DeregisterRolloutRequest>) -> Result<tonic::Response<v1::DeregisterRolloutResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn list_rollouts(&self, _: tonic::Request<v1::ListRolloutsRequest>) -> Result<tonic::Response<v1::ListRolloutsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
    }
}
