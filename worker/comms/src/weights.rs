//! `UpdateWeights` streams: the sender side chunks named, versioned tensors; the receiver side
//! ([`WeightUpdateAssembler`]) validates every message against the model's tensor table and
//! returns the documented status codes (docs/proto.md), applying nothing until the commit.

use std::collections::{HashMap, HashSet};

use onevision_proto::v1;
use onevision_proto::v1::update_weights_request::Kind;
use tonic::Code;

/// Shape and element type of one named tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub shape: Vec<u64>,
    pub dtype: v1::Dtype,
}

impl TensorSpec {
    /// Size in bytes; `None` on overflow or an unspecified dtype.
    pub fn byte_len(&self) -> Option<u64> {
        let elem = self.dtype.size_bytes()? as u64;
        self.shape.iter().try_fold(elem, |acc, d| acc.checked_mul(*d))
    }
}

/// One tensor to send: little-endian, row-major bytes.
#[derive(Debug, Clone)]
pub struct OutgoingTensor {
    pub name: String,
    pub spec: TensorSpec,
    pub data: prost::bytes::Bytes,
}

/// The messages of one `UpdateWeights` call: Begin, each tensor in chunks of at most
/// `chunk_bytes`, Commit. Chunks share the tensor's buffer (no copies).
pub fn weight_update_messages(
    version: u64,
    tensors: &[OutgoingTensor],
    chunk_bytes: usize,
) -> impl Iterator<Item = v1::UpdateWeightsRequest> + Send + 'static {
    let chunk_bytes = chunk_bytes.max(1);
    let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    let begin = v1::UpdateWeightsRequest {
        kind: Some(Kind::Begin(v1::WeightsBegin {
            version,
            tensor_count: tensors.len() as u32,
            total_bytes: total,
        })),
    };
    let mut chunks = Vec::new();
    for t in tensors {
        let len = t.data.len();
        // An empty tensor still gets one (empty) chunk so the receiver learns about it.
        let mut offset = 0;
        loop {
            let end = (offset + chunk_bytes).min(len);
            chunks.push(v1::UpdateWeightsRequest {
                kind: Some(Kind::Chunk(v1::TensorChunk {
                    name: t.name.clone(),
                    shape: t.spec.shape.clone(),
                    dtype: t.spec.dtype as i32,
                    version,
                    offset: offset as u64,
                    data: t.data.slice(offset..end),
                })),
            });
            offset = end;
            if offset >= len {
                break;
            }
        }
    }
    let commit = v1::UpdateWeightsRequest {
        kind: Some(Kind::Commit(v1::WeightsCommit { version, tensor_count: tensors.len() as u32 })),
    };
    std::iter::once(begin).chain(chunks).chain(std::iter::once(commit))
}

/// Why an `UpdateWeights` stream was refused. [`WeightSyncError::code`] is the gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightSyncError {
    #[error("unknown tensor {name:?}: the rollout model has no parameter of that name")]
    UnknownTensor { name: String },
    #[error("tensor {name:?}: shape {got:?} / {got_dtype:?} does not match the model's {expected:?} / {expected_dtype:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<u64>,
        got: Vec<u64>,
        expected_dtype: v1::Dtype,
        got_dtype: v1::Dtype,
    },
    #[error("stale weights version {got}: this worker already serves version {current} (versions must increase)")]
    StaleVersion { got: u64, current: u64 },
    #[error("malformed UpdateWeights stream: {0}")]
    Malformed(String),
    #[error("UpdateWeights stream ended before its commit: nothing was applied, resend the update")]
    MissingCommit,
}

impl WeightSyncError {
    pub fn code(&self) -> Code {
        match self {
            WeightSyncError::UnknownTensor { .. } => Code::NotFound,
            WeightSyncError::ShapeMismatch { .. } | WeightSyncError::Malformed(_) => Code::InvalidArgument,
            WeightSyncError::StaleVersion { .. } => Code::FailedPrecondition,
            WeightSyncError::MissingCommit => Code::Aborted,
        }
    }
}

impl From<WeightSyncError> for tonic::Status {
    fn from(e: WeightSyncError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// A tensor received completely.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedTensor {
    pub name: String,
    pub spec: TensorSpec,
    pub data: Vec<u8>,
}

/// A validated, committed update, ready to be swapped into the model.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedUpdate {
    pub version: u64,
    pub tensors: Vec<ReceivedTensor>,
    pub bytes: u64,
}

/// Validates an `UpdateWeights` stream message by message.
///
/// Rules: one Begin (version greater than the current one), then every tensor's chunks in order
/// with contiguous offsets, tensors one after another, each at most once and complete, then one
/// Commit whose version and tensor count match. An update may carry a subset of the model's
/// tensors (e.g. only trainable ones).
pub struct WeightUpdateAssembler<'a> {
    specs: &'a HashMap<String, TensorSpec>,
    current_version: u64,
    version: Option<u64>,
    declared_tensors: u32,
    done: Vec<ReceivedTensor>,
    seen: HashSet<String>,
    open: Option<(ReceivedTensor, u64)>,
    committed: bool,
    bytes: u64,
}

impl<'a> WeightUpdateAssembler<'a> {
    pub fn new(specs: &'a HashMap<String, TensorSpec>, current_version: u64) -> Self {
        WeightUpdateAssembler {
            specs,
            current_version,
            version: None,
            declared_tensors: 0,
            done: Vec::new(),
            seen: HashSet::new(),
            open: None,
            committed: false,
            bytes: 0,
        }
    }

    fn close_open(&mut self) -> Result<(), WeightSyncError> {
        if let Some((t, expected)) = self.open.take() {
            if t.data.len() as u64 != expected {
                return Err(WeightSyncError::Malformed(format!(
                    "tensor {:?} ended after {} of its {expected} bytes",
                    t.name,
                    t.data.len()
                )));
            }
            self.done.push(t);
        }
        Ok(())
    }

    pub fn push(&mut self, msg: v1::UpdateWeightsRequest) -> Result<(), WeightSyncError> {
        if self.committed {
            return Err(WeightSyncError::Malformed("message after the commit".into()));
        }
        match msg.kind {
            None => Err(WeightSyncError::Malformed("empty UpdateWeightsRequest".into())),
            Some(Kind::Begin(b)) => {
                if self.version.is_some() {
                    return Err(WeightSyncError::Malformed("a second Begin".into()));
                }
                if b.version <= self.current_version {
                    return Err(WeightSyncError::StaleVersion { got: b.version, current: self.current_version });
                }
                self.version = Some(b.version);
                self.declared_tensors = b.tensor_count;
                Ok(())
            }
            Some(Kind::Chunk(c)) => self.push_chunk(c),
            Some(Kind::Commit(c)) => {
                let version = self.version.ok_or_else(|| WeightSyncError::Malformed("Commit before Begin".into()))?;
                self.close_open()?;
                if c.version != version {
                    return Err(WeightSyncError::Malformed(format!(
                        "Commit for version {} in a stream that began version {version}",
                        c.version
                    )));
                }
                let n = self.done.len() as u32;
                if c.tensor_count != n || self.declared_tensors != n {
                    return Err(WeightSyncError::Malformed(format!(
                        "received {n} tensors, Begin declared {} and Commit {}",
                        self.declared_tensors, c.tensor_count
                    )));
                }
                self.committed = true;
                Ok(())
            }
        }
    }

    fn push_chunk(&mut self, c: v1::TensorChunk) -> Result<(), WeightSyncError> {
        let version = self.version.ok_or_else(|| WeightSyncError::Malformed("chunk before Begin".into()))?;
        if c.version != version {
            return Err(WeightSyncError::Malformed(format!(
                "chunk of {:?} has version {}, the stream began version {version}",
                c.name, c.version
            )));
        }
        let continuing = matches!(&self.open, Some((t, _)) if t.name == c.name);
        if !continuing {
            self.close_open()?;
            let spec = self
                .specs
                .get(&c.name)
                .ok_or_else(|| WeightSyncError::UnknownTensor { name: c.name.clone() })?;
            let got_dtype = v1::Dtype::try_from(c.dtype).unwrap_or(v1::Dtype::Unspecified);
            if spec.shape != c.shape || spec.dtype != got_dtype {
                return Err(WeightSyncError::ShapeMismatch {
                    name: c.name.clone(),
                    expected: spec.shape.clone(),
                    got: c.shape.clone(),
                    expected_dtype: spec.dtype,
                    got_dtype,
                });
            }
            if !self.seen.insert(c.name.clone()) {
                return Err(WeightSyncError::Malformed(format!("tensor {:?} sent twice", c.name)));
            }
            let expected = spec
                .byte_len()
                .ok_or_else(|| WeightSyncError::Malformed(format!("tensor {:?} has no valid size", c.name)))?;
            let data = Vec::with_capacity(expected.min(1 << 32) as usize);
            self.open = Some((ReceivedTensor { name: c.name.clone(), spec: spec.clone(), data }, expected));
        }
        let (t, expected) = self.open.as_mut().expect("opened above");
        if c.shape != t.spec.shape || c.dtype != t.spec.dtype as i32 {
            return Err(WeightSyncError::Malformed(format!(
                "chunks of {:?} disagree on shape or dtype",
                t.name
            )));
        }
        if c.offset != t.data.len() as u64 {
            return Err(WeightSyncError::Malformed(format!(
                "chunk of {:?} at offset {}, expected the next one at {}",
                t.name,
                c.offset,
                t.data.len()
            )));
        }
        if t.data.len() as u64 + c.data.len() as u64 > *expected {
            return Err(WeightSyncError::Malformed(format!(
                "tensor {:?} gets more than its {expected} bytes",
                t.name
            )));
        }
        t.data.extend_from_slice(&c.data);
        self.bytes += c.data.len() as u64;
        Ok(())
    }

    /// Call when the stream ended: the update if it was committed.
    pub fn finish(self) -> Result<CommittedUpdate, WeightSyncError> {
        if !self.committed {
            return Err(WeightSyncError::MissingCommit);
        }
        Ok(CommittedUpdate {
            version: self.version.unwrap_or(self.current_version),
            tensors: self.done,
            bytes: self.bytes,
        })
    }
}

/// The check a rollout worker applies to `PromptGroup.min_model_version` (FAILED_PRECONDITION
/// if the worker's weights are older, see docs/proto.md).
pub fn check_min_version(current: u64, min_model_version: u64) -> Result<(), tonic::Status> {
    if current < min_model_version {
        return Err(tonic::Status::failed_precondition(format!(
            "stale weights: this worker serves version {current}, the request needs at least \
             {min_model_version}; push weights first"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> HashMap<String, TensorSpec> {
        HashMap::from([
            ("a".to_string(), TensorSpec { shape: vec![2, 3], dtype: v1::Dtype::F32 }),
            ("b".to_string(), TensorSpec { shape: vec![5], dtype: v1::Dtype::Bf16 }),
        ])
    }

    fn tensors() -> Vec<OutgoingTensor> {
        let a: Vec<u8> = (0..24).collect();
        let b: Vec<u8> = (100..110).collect();
        vec![
            OutgoingTensor { name: "a".into(), spec: specs()["a"].clone(), data: a.into() },
            OutgoingTensor { name: "b".into(), spec: specs()["b"].clone(), data: b.into() },
        ]
    }

    fn assemble(msgs: impl IntoIterator<Item = v1::UpdateWeightsRequest>, current: u64) -> Result<CommittedUpdate, WeightSyncError> {
        let specs = specs();
        let mut a = WeightUpdateAssembler::new(&specs, current);
        for m in msgs {
            a.push(m)?;
        }
        a.finish()
    }

    #[test]
    fn chunked_update_reassembles_exactly() {
        let msgs: Vec<_> = weight_update_messages(3, &tensors(), 7).collect();
        // Begin + ceil(24/7)=4 + ceil(10/7)=2 + Commit.
        assert_eq!(msgs.len(), 8);
        let up = assemble(msgs, 2).unwrap();
        assert_eq!(up.version, 3);
        assert_eq!(up.bytes, 34);
        assert_eq!(up.tensors[0].data, (0..24).collect::<Vec<u8>>());
        assert_eq!(up.tensors[1].data, (100..110).collect::<Vec<u8>>());
    }

    #[test]
    fn bad_updates_get_the_documented_codes() {
        // Stale version.
        let e = assemble(weight_update_messages(2, &tensors(), 8), 2).unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        // Unknown tensor.
        let mut t = tensors();
        t[1].name = "c".into();
        let e = assemble(weight_update_messages(3, &t, 8), 0).unwrap_err();
        assert_eq!(e, WeightSyncError::UnknownTensor { name: "c".into() });
        assert_eq!(tonic::Status::from(e).code(), Code::NotFound);
        // Shape mismatch.
        let mut t = tensors();
        t[0].spec.shape = vec![3, 2];
        let e = assemble(weight_update_messages(3, &t, 8), 0).unwrap_err();
        assert!(matches!(e, WeightSyncError::ShapeMismatch { .. }));
        assert_eq!(e.code(), Code::InvalidArgument);
        // Truncated tensor (bytes missing).
        let mut t = tensors();
        t[0].data = t[0].data.slice(0..20);
        let e = assemble(weight_update_messages(3, &t, 8), 0).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        // Stream cut before the commit.
        let msgs: Vec<_> = weight_update_messages(3, &tensors(), 8).collect();
        let e = assemble(msgs[..msgs.len() - 1].to_vec(), 0).unwrap_err();
        assert_eq!(e, WeightSyncError::MissingCommit);
        assert_eq!(e.code(), Code::Aborted);
        // Out-of-order chunk.
        let mut msgs: Vec<_> = weight_update_messages(3, &tensors(), 8).collect();
        msgs.swap(1, 2);
        assert_eq!(assemble(msgs, 0).unwrap_err().code(), Code::InvalidArgument);
    }

    #[test]
    fn min_version_check() {
        assert!(check_min_version(3, 3).is_ok());
        assert_eq!(check_min_version(2, 3).unwrap_err().code(), Code::FailedPrecondition);
    }
}
