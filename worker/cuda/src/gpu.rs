//! The GPU runtime: context and stream, kernel modules compiled by NVRTC for this device (CUBIN,
//! cached on disk), kernel launches, and device memory through the caching allocator.
//!
//! Everything goes through cudarc with dynamic loading: constructing a [`Gpu`] on a machine without
//! the NVIDIA driver returns [`CudaError::NoDriver`] instead of failing to link or panicking.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result as drv, sys, CudaContext, CudaStream, DriverError};

use crate::alloc::{AllocStats, Block, CachingAllocator, RawAlloc};
use crate::compile::{compile_family, ptx_signatures, Arch, Output, ParamKind};
use crate::error::{CudaError, Result};
use crate::sources;

pub(crate) fn drv_err(call: &'static str) -> impl Fn(DriverError) -> CudaError {
    move |e| CudaError::Driver { call, message: format!("{e:?}") }
}

/// Whether the NVIDIA driver library can be loaded (false on CPU-only machines and in CI).
pub fn driver_available() -> bool {
    // SAFETY: only probes dlopen with cudarc's candidate names.
    unsafe { sys::is_culib_present() }
}

/// cuMemAlloc / cuMemFree for the caching allocator.
pub struct DriverAlloc {
    ctx: Arc<CudaContext>,
}

impl RawAlloc for DriverAlloc {
    fn alloc(&self, bytes: usize) -> Result<Option<u64>> {
        self.ctx.bind_to_thread().map_err(drv_err("cuCtxSetCurrent"))?;
        // SAFETY: the context is current; the memory is uninitialised and only handed out as bytes.
        match unsafe { drv::malloc_sync(bytes) } {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Ok(None),
            Err(e) => Err(drv_err("cuMemAlloc")(e)),
        }
    }

    unsafe fn free(&self, ptr: u64, _bytes: usize) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv_err("cuCtxSetCurrent"))?;
        // cuMemFree synchronises the device, so pending kernels that used the block have finished.
        drv::free_sync(ptr).map_err(drv_err("cuMemFree"))
    }
}

/// A device allocation that returns to the cache when dropped.
pub struct DeviceMem {
    block: Block,
    bytes: usize,
    alloc: Arc<CachingAllocator<DriverAlloc>>,
}

impl DeviceMem {
    pub fn ptr(&self) -> u64 {
        self.block.ptr
    }
    /// Requested size (the block may be larger).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        self.alloc.free(self.block);
    }
}

impl std::fmt::Debug for DeviceMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceMem({:#x}, {} B)", self.block.ptr, self.bytes)
    }
}

/// Kernel arguments, one 8-byte slot each (cuLaunchKernel reads each parameter through a pointer;
/// 4-byte scalars sit in the low half of their slot, which is correct on little-endian hosts).
#[derive(Default)]
pub struct Args {
    slots: Vec<u64>,
    kinds: Vec<ParamKind>,
}

impl Args {
    pub fn new() -> Self {
        Args { slots: Vec::with_capacity(24), kinds: Vec::with_capacity(24) }
    }
    pub fn kinds(&self) -> &[ParamKind] {
        &self.kinds
    }
    pub fn ptr(mut self, p: u64) -> Self {
        self.slots.push(p);
        self.kinds.push(ParamKind::Word64);
        self
    }
    /// A null pointer for optional kernel inputs.
    pub fn null(self) -> Self {
        self.ptr(0)
    }
    pub fn opt(self, p: Option<u64>) -> Self {
        self.ptr(p.unwrap_or(0))
    }
    pub fn i32(mut self, v: i32) -> Self {
        self.slots.push(v as u32 as u64);
        self.kinds.push(ParamKind::Word32);
        self
    }
    pub fn i64(mut self, v: i64) -> Self {
        self.slots.push(v as u64);
        self.kinds.push(ParamKind::Word64);
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.slots.push(v);
        self.kinds.push(ParamKind::Word64);
        self
    }
    pub fn f32(mut self, v: f32) -> Self {
        self.slots.push(v.to_bits() as u64);
        self.kinds.push(ParamKind::Float32);
        self
    }
}

struct Module {
    raw: sys::CUmodule,
    functions: HashMap<String, sys::CUfunction>,
    /// Parameter kinds per kernel, from the family's PTX (checked on every launch).
    signatures: HashMap<String, Vec<ParamKind>>,
}

// SAFETY: CUmodule/CUfunction are opaque driver handles, valid from any thread once the owning
// context is current (Gpu binds it before every use).
unsafe impl Send for Module {}

#[derive(Clone, Copy)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem: u32,
}

impl Launch {
    pub fn linear(n: usize, threads: u32) -> Self {
        let blocks = n.div_ceil(threads as usize).max(1) as u32;
        Launch { grid: (blocks, 1, 1), block: (threads, 1, 1), smem: 0 }
    }
}

pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: Arch,
    sm_count: u32,
    modules: Mutex<HashMap<&'static str, Module>>,
    alloc: Arc<CachingAllocator<DriverAlloc>>,
    /// ONEVISION_CUDA_POISON=1: fill every allocation with 0xFF bytes (NaN in f32 and bf16), so a
    /// kernel that leaves part of its output unwritten fails the parity tests instead of passing on
    /// stale or zeroed memory.
    poison: bool,
}

impl Gpu {
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        if !driver_available() {
            return Err(CudaError::NoDriver);
        }
        let ctx = CudaContext::new(ordinal).map_err(drv_err("cuCtxCreate"))?;
        let (major, minor) = ctx.compute_capability().map_err(drv_err("cuDeviceGetAttribute"))?;
        let arch = Arch::parse(&format!("sm_{major}{minor}"))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv_err("cuDeviceGetAttribute"))? as u32;
        let stream = ctx.new_stream().map_err(drv_err("cuStreamCreate"))?;
        let alloc = Arc::new(CachingAllocator::new(DriverAlloc { ctx: ctx.clone() }));
        let poison = std::env::var("ONEVISION_CUDA_POISON").map(|v| v == "1").unwrap_or(false);
        Ok(Arc::new(Gpu { ctx, stream, arch, sm_count, modules: Mutex::new(HashMap::new()), alloc, poison }))
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn alloc_stats(&self) -> AllocStats {
        self.alloc.stats()
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv_err("cuCtxSetCurrent"))
    }

    /// The kernel `name` of `family`, compiling (CUBIN for this device, disk-cached) and loading the
    /// family's module on first use. `max_dyn_smem` > 48 KiB raises the function's opt-in limit.
    pub fn function(&self, family: &'static str, name: &str, max_dyn_smem: u32) -> Result<sys::CUfunction> {
        self.bind()?;
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if !modules.contains_key(family) {
            let src = sources::family(family)
                .ok_or_else(|| CudaError::Invalid(format!("unknown kernel family `{family}`")))?;
            let compiled = compile_family(src, self.arch, Output::Cubin)?;
            let ptx = compile_family(src, self.arch, Output::Ptx)?;
            let signatures = ptx_signatures(&String::from_utf8_lossy(&ptx.bytes)).into_iter().collect();
            // cuModuleLoadData needs a NUL-terminated image only for PTX; a CUBIN is an ELF with its size.
            // SAFETY: a complete CUBIN image for this device's architecture; the driver copies it.
            let raw = unsafe { drv::module::load_data(compiled.bytes.as_ptr() as *const c_void) }
                .map_err(drv_err("cuModuleLoadData"))?;
            modules.insert(family, Module { raw, functions: HashMap::new(), signatures });
        }
        let module = modules
            .get_mut(family)
            .ok_or_else(|| CudaError::Invalid(format!("module `{family}` vanished")))?;
        if let Some(f) = module.functions.get(name) {
            return Ok(*f);
        }
        let cname = CString::new(name).map_err(|_| CudaError::Invalid(format!("kernel name {name:?}")))?;
        // SAFETY: module is loaded and alive for the Gpu's lifetime.
        let f = unsafe { drv::module::get_function(module.raw, cname) }.map_err(drv_err("cuModuleGetFunction"))?;
        if max_dyn_smem > 48 * 1024 {
            // SAFETY: f is a valid function handle of a loaded module.
            unsafe {
                drv::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    max_dyn_smem as i32,
                )
            }
            .map_err(drv_err("cuFuncSetAttribute"))?;
        }
        module.functions.insert(name.to_string(), f);
        Ok(f)
    }

    /// The parameter kinds of `family::name` (after the family is loaded).
    pub fn signature(&self, family: &'static str, name: &str) -> Option<Vec<ParamKind>> {
        let modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        modules.get(family).and_then(|m| m.signatures.get(name).cloned())
    }

    /// Launches `family::name` on the compute stream, after checking the arguments against the kernel's
    /// PTX signature (count and 32/64-bit/float class of each).
    pub fn launch(&self, family: &'static str, name: &str, cfg: Launch, args: Args) -> Result<()> {
        let f = self.function(family, name, cfg.smem)?;
        match self.signature(family, name) {
            Some(want) if want.as_slice() == args.kinds() => {}
            want => {
                return Err(CudaError::Invalid(format!(
                    "kernel {family}::{name} takes {want:?} but the host passes {:?}",
                    args.kinds()
                )))
            }
        }
        let mut slots = args.slots;
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        // SAFETY: parameters match the kernel's extern "C" signature (each call site mirrors the .cu
        // declaration); every pointer argument is a live DeviceMem of the size the kernel indexes.
        unsafe { drv::launch_kernel(f, cfg.grid, cfg.block, cfg.smem, self.stream.cu_stream(), &mut params) }
            .map_err(drv_err("cuLaunchKernel"))
    }

    pub fn alloc(&self, bytes: usize) -> Result<DeviceMem> {
        let block = self.alloc.alloc(bytes)?;
        let mem = DeviceMem { block, bytes, alloc: self.alloc.clone() };
        if self.poison && bytes > 0 {
            self.bind()?;
            // SAFETY: the block holds at least `bytes` bytes.
            unsafe { drv::memset_d8_async(mem.ptr(), 0xFF, bytes, self.stream.cu_stream()) }.map_err(drv_err("cuMemsetD8Async"))?;
        }
        Ok(mem)
    }

    pub fn alloc_zeroed(&self, bytes: usize) -> Result<DeviceMem> {
        let m = self.alloc(bytes)?;
        self.memset_zero(m.ptr(), bytes)?;
        Ok(m)
    }

    pub fn memset_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: ptr..ptr+bytes lies inside a live allocation (callers pass DeviceMem ranges).
        unsafe { drv::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }.map_err(drv_err("cuMemsetD8Async"))
    }

    /// Host -> device, synchronous with respect to the host buffer (the stream is synchronised, so the
    /// caller may drop `src` right after).
    pub fn upload<T: Copy>(&self, src: &[T]) -> Result<DeviceMem> {
        let m = self.alloc(std::mem::size_of_val(src))?;
        self.bind()?;
        // SAFETY: m holds at least size_of_val(src) bytes; the synchronize keeps src alive long enough.
        unsafe { drv::memcpy_htod_async(m.ptr(), src, self.stream.cu_stream()) }.map_err(drv_err("cuMemcpyHtoDAsync"))?;
        self.synchronize()?;
        Ok(m)
    }

    pub fn download<T: Copy + Default>(&self, src: u64, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        self.bind()?;
        // SAFETY: src holds n values of T (the caller's tensor); synchronize before returning.
        unsafe { drv::memcpy_dtoh_async(&mut out, src, self.stream.cu_stream()) }.map_err(drv_err("cuMemcpyDtoHAsync"))?;
        self.synchronize()?;
        Ok(out)
    }

    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: both ranges lie inside live allocations.
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(drv_err("cuMemcpyDtoDAsync"))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv_err("cuStreamSynchronize"))
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
        let _ = self.alloc.release_cached();
        let modules = std::mem::take(self.modules.get_mut().unwrap_or_else(|p| p.into_inner()));
        for (_, m) in modules {
            // SAFETY: no kernel of this module runs any more (stream synchronised above).
            let _ = unsafe { drv::module::unload(m.raw) };
        }
    }
}
