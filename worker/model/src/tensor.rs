//! A small tensor: shape, dtype, and storage that is either host memory (the CPU backend) or an
//! opaque device buffer owned by another backend (CUDA implements [`DeviceBuffer`]).
use crate::error::{shape_err, ModelError, Result};
use half::{bf16, f16};
use std::any::Any;
use std::fmt;
use std::sync::{Arc, OnceLock};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

/// Memory owned by a non-CPU backend. The model crate never looks inside; the backend that
/// created it downcasts through [`DeviceBuffer::as_any`].
pub trait DeviceBuffer: Send + Sync + fmt::Debug {
    fn device(&self) -> Device;
    fn as_any(&self) -> &dyn Any;
}

/// Host storage. Kept behind an `Arc` so that clones (weights shared by model copies, reshapes)
/// are free; mutation goes through `Arc::make_mut` (copy-on-write).
#[derive(Clone, Debug)]
pub enum HostData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

/// Host values plus one lazily built, backend-private derived layout of them (the CPU backend
/// keeps weights re-laid out for its decode kernel there: built on first use, shared by clones,
/// dropped whenever the values change, so it can never go stale).
#[derive(Debug)]
pub struct HostBuf {
    pub data: HostData,
    derived: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl HostBuf {
    fn new(data: HostData) -> Arc<Self> {
        Arc::new(HostBuf { data, derived: OnceLock::new() })
    }
}

impl Clone for HostBuf {
    /// A copy is about to be written (copy-on-write): it starts without a derived layout.
    fn clone(&self) -> Self {
        HostBuf { data: self.data.clone(), derived: OnceLock::new() }
    }
}

#[derive(Clone, Debug)]
pub enum Storage {
    Host(Arc<HostBuf>),
    Device(Arc<dyn DeviceBuffer>),
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        if numel(shape) != data.len() {
            return shape_err("Tensor::from_f32", format!("shape {shape:?} needs {} values, got {}", numel(shape), data.len()));
        }
        Ok(Tensor { shape: shape.to_vec(), dtype: DType::F32, storage: Storage::Host(HostBuf::new(HostData::F32(data))) })
    }
    pub fn from_bf16(shape: &[usize], data: Vec<bf16>) -> Result<Self> {
        if numel(shape) != data.len() {
            return shape_err("Tensor::from_bf16", format!("shape {shape:?} needs {} values, got {}", numel(shape), data.len()));
        }
        Ok(Tensor { shape: shape.to_vec(), dtype: DType::BF16, storage: Storage::Host(HostBuf::new(HostData::BF16(data))) })
    }
    /// Host tensor of f16 values, converted to `dtype` (f16 is a storage format only).
    pub fn from_f16(shape: &[usize], data: &[f16], dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Self::from_f32(shape, data.iter().map(|v| v.to_f32()).collect()),
            DType::BF16 => Self::from_bf16(shape, data.iter().map(|v| bf16::from_f32(v.to_f32())).collect()),
        }
    }
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor { shape: shape.to_vec(), dtype: DType::F32, storage: Storage::Host(HostBuf::new(HostData::F32(vec![0.0; numel(shape)]))) }
    }
    /// Wrap a device buffer created by a backend.
    pub fn from_device(shape: &[usize], dtype: DType, buf: Arc<dyn DeviceBuffer>) -> Self {
        Tensor { shape: shape.to_vec(), dtype, storage: Storage::Device(buf) }
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Host(_) => Device::Cpu,
            Storage::Device(b) => b.device(),
        }
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    /// Product of all dims but the last (rows of a row-major matrix view).
    pub fn rows(&self) -> usize {
        self.shape[..self.shape.len().saturating_sub(1)].iter().product()
    }
    pub fn last_dim(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }
    /// Metadata-only reshape (storage is always contiguous row-major).
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.numel() {
            return shape_err("reshape", format!("cannot reshape {:?} ({} values) to {shape:?}", self.shape, self.numel()));
        }
        Ok(Tensor { shape: shape.to_vec(), dtype: self.dtype, storage: self.storage.clone() })
    }
    pub fn host(&self) -> Result<&HostData> {
        match &self.storage {
            Storage::Host(h) => Ok(&h.data),
            Storage::Device(b) => Err(ModelError::Device { op: "host access", backend: "host".into(), expected: Device::Cpu, found: b.device() }),
        }
    }
    /// Borrow f32 host data.
    pub fn as_f32(&self) -> Result<&[f32]> {
        match self.host()? {
            HostData::F32(v) => Ok(v),
            HostData::BF16(_) => Err(ModelError::DType { op: "as_f32", dtype: DType::BF16, msg: "cast to F32 first".into() }),
        }
    }
    pub fn as_bf16(&self) -> Result<&[bf16]> {
        match self.host()? {
            HostData::BF16(v) => Ok(v),
            HostData::F32(_) => Err(ModelError::DType { op: "as_bf16", dtype: DType::F32, msg: "cast to BF16 first".into() }),
        }
    }
    /// Mutable f32 host data (copy-on-write if shared).
    pub fn as_f32_mut(&mut self) -> Result<&mut [f32]> {
        match &mut self.storage {
            Storage::Host(h) => match Arc::make_mut(h) {
                HostBuf { data: HostData::F32(v), derived } => {
                    // The values may change through the returned slice: the layout derived from them goes.
                    derived.take();
                    Ok(v)
                }
                HostBuf { data: HostData::BF16(_), .. } => Err(ModelError::DType { op: "as_f32_mut", dtype: DType::BF16, msg: "cast to F32 first".into() }),
            },
            Storage::Device(b) => Err(ModelError::Device { op: "as_f32_mut", backend: "host".into(), expected: Device::Cpu, found: b.device() }),
        }
    }
    /// A layout derived from this host tensor's values, built by `init` on first use and shared
    /// by every clone and reshape of the tensor until its values are written. `None` for device
    /// tensors or when a value of another type is already cached. Whoever caches a layout that
    /// depends on the shape must check the shape it was built for (reshapes share the cache).
    pub fn derived<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Option<&T> {
        match &self.storage {
            Storage::Host(h) => h.derived.get_or_init(|| Box::new(init())).downcast_ref::<T>(),
            Storage::Device(_) => None,
        }
    }
    /// Same storage and shape (clones and same-shape reshapes of one tensor): equal values
    /// without comparing them.
    pub fn same_as(&self, other: &Tensor) -> bool {
        self.shape == other.shape
            && match (&self.storage, &other.storage) {
                (Storage::Host(a), Storage::Host(b)) => Arc::ptr_eq(a, b),
                (Storage::Device(a), Storage::Device(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
    /// Host values as f32, whatever the storage dtype.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(match self.host()? {
            HostData::F32(v) => v.clone(),
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        })
    }
    /// Host dtype conversion (CPU helper; backends expose `cast`).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        match (self.host()?, dtype) {
            (HostData::F32(v), DType::BF16) => Self::from_bf16(&self.shape, v.iter().map(|&x| bf16::from_f32(x)).collect()),
            (HostData::BF16(v), DType::F32) => Self::from_f32(&self.shape, v.iter().map(|x| x.to_f32()).collect()),
            _ => unreachable!("same-dtype case returned above"),
        }
    }
}
