//! Matrix products through cuBLASLt: bf16 (or f32) inputs, fp32 accumulation and scale, optional bias
//! epilogue, optional strided batching. The API is row-major (like every tensor in onevision); the
//! translation to cuBLAS's column-major view is done once here:
//!   row-major C[M,N] = op(A)[M,K] op(B)[K,N]  <=>  column-major C^T = op(B)^T op(A)^T,
//! so cuBLAS sees (A', B') = (B, A), m = N, n = M, and a bias epilogue (one value per cuBLAS row)
//! adds bias[N] to every output row, which is the Linear layer's bias.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::{result as lt, sys};

use crate::error::{CudaError, Result};
use crate::gpu::{DeviceMem, Gpu};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    BF16,
    F32,
}

impl Elem {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            Elem::BF16 => sys::cudaDataType::CUDA_R_16BF,
            Elem::F32 => sys::cudaDataType::CUDA_R_32F,
        }
    }
}

/// One (optionally batched) row-major product C = alpha op(A) op(B) + beta C (+ bias).
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub ab_type: Elem,
    pub c_type: Elem,
    pub alpha: f32,
    /// 1.0 accumulates into C (gradient accumulation), 0.0 overwrites.
    pub beta: f32,
    /// Bias [n] of type `c_type` (bf16 bias with bf16 output, as in the model).
    pub bias: Option<u64>,
    /// (count, stride_a, stride_b, stride_c) in elements; stride 0 broadcasts (shared weights).
    pub batch: Option<(usize, i64, i64, i64)>,
}

impl Gemm {
    /// y[M,N] = x[M,K] W[N,K]^T (+ b): a Linear layer.
    pub fn linear(m: usize, n: usize, k: usize, ab_type: Elem, c_type: Elem, bias: Option<u64>) -> Self {
        Gemm { m, n, k, trans_a: false, trans_b: true, ab_type, c_type, alpha: 1.0, beta: 0.0, bias, batch: None }
    }
}

fn blas_err(call: &'static str) -> impl Fn(lt::CublasError) -> CudaError {
    move |e| CudaError::Blas { call, message: format!("{:?}", e.0) }
}

struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

fn layout(t: Elem, rows: usize, cols: usize, ld: usize, batch: Option<(usize, i64)>) -> Result<Layout> {
    let l = Layout(lt::create_matrix_layout(t.cuda(), rows as u64, cols as u64, ld as i64).map_err(blas_err("cublasLtMatrixLayoutCreate"))?);
    if let Some((count, stride)) = batch {
        let count = count as i32;
        // SAFETY: valid layout handle; attribute buffers sized to the attribute's type.
        unsafe {
            lt::set_matrix_layout_attribute(
                l.0,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                &count as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            )
            .map_err(blas_err("cublasLtMatrixLayoutSetAttribute"))?;
            lt::set_matrix_layout_attribute(
                l.0,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                &stride as *const i64 as *const c_void,
                std::mem::size_of::<i64>(),
            )
            .map_err(blas_err("cublasLtMatrixLayoutSetAttribute"))?;
        }
    }
    Ok(l)
}

/// cuBLASLt handle plus a workspace (32 MiB: what cuBLASLt's Hopper kernels ask for at most).
pub struct Lt {
    gpu: Arc<Gpu>,
    handle: sys::cublasLtHandle_t,
    workspace: DeviceMem,
}

// SAFETY: the handle is used only on the Gpu's stream, serialised by &self methods on one thread at
// a time per backend (the backend is driven by one training thread).
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

const WORKSPACE_BYTES: usize = 32 << 20;

impl Lt {
    pub fn new(gpu: Arc<Gpu>) -> Result<Self> {
        // SAFETY: only probes dlopen.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::Blas { call: "dlopen", message: "libcublasLt.so not found: install the CUDA 12 cuBLAS runtime (e.g. pip nvidia-cublas-cu12) and add it to LD_LIBRARY_PATH".into() });
        }
        gpu.context().bind_to_thread().map_err(crate::gpu::drv_err("cuCtxSetCurrent"))?;
        let handle = lt::create_handle().map_err(blas_err("cublasLtCreate"))?;
        let workspace = gpu.alloc(WORKSPACE_BYTES)?;
        Ok(Lt { gpu, handle, workspace })
    }

    /// C = alpha op(A) op(B) + beta C (+ bias), row-major, on the Gpu's stream.
    pub fn gemm(&self, g: &Gemm, a: u64, b: u64, c: u64) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        if g.bias.is_some() && g.batch.is_some() {
            return Err(CudaError::Invalid("bias epilogue with a batched gemm is not supported".into()));
        }
        self.gpu.context().bind_to_thread().map_err(crate::gpu::drv_err("cuCtxSetCurrent"))?;
        // cuBLAS view: m' = N, n' = M; A' = B buffer, B' = A buffer (see module docs).
        let (mp, np, k) = (g.n, g.m, g.k);
        let trans_ap = g.trans_b; // op on the B buffer
        let trans_bp = g.trans_a; // op on the A buffer
        // Column-major shapes of the stored buffers: A' is m'xk (N) or kxm' (T); B' is kxn' or n'xk.
        let (a_rows, a_cols) = if trans_ap { (k, mp) } else { (mp, k) };
        let (b_rows, b_cols) = if trans_bp { (np, k) } else { (k, np) };
        let batch_a = g.batch.map(|(cnt, _sa, sb, _)| (cnt, sb));
        let batch_b = g.batch.map(|(cnt, sa, _, _)| (cnt, sa));
        let batch_c = g.batch.map(|(cnt, _, _, sc)| (cnt, sc));
        let la = layout(g.ab_type, a_rows, a_cols, a_rows, batch_a)?;
        let lb = layout(g.ab_type, b_rows, b_cols, b_rows, batch_b)?;
        let lc = layout(g.c_type, mp, np, mp, batch_c)?;

        let desc = Desc(lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F).map_err(blas_err("cublasLtMatmulDescCreate"))?);
        let ta = trans_ap as i32;
        let tb = trans_bp as i32;
        // SAFETY: valid descriptor; attribute buffers sized to their types.
        unsafe {
            lt::set_matmul_desc_attribute(desc.0, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &ta as *const i32 as *const c_void, 4)
                .map_err(blas_err("cublasLtMatmulDescSetAttribute"))?;
            lt::set_matmul_desc_attribute(desc.0, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &tb as *const i32 as *const c_void, 4)
                .map_err(blas_err("cublasLtMatmulDescSetAttribute"))?;
            if let Some(bias) = g.bias {
                let epi = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
                lt::set_matmul_desc_attribute(desc.0, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi as *const _ as *const c_void, std::mem::size_of_val(&epi))
                    .map_err(blas_err("cublasLtMatmulDescSetAttribute"))?;
                lt::set_matmul_desc_attribute(desc.0, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias as *const u64 as *const c_void, 8)
                    .map_err(blas_err("cublasLtMatmulDescSetAttribute"))?;
                let bt = g.c_type.cuda();
                lt::set_matmul_desc_attribute(desc.0, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt as *const _ as *const c_void, std::mem::size_of_val(&bt))
                    .map_err(blas_err("cublasLtMatmulDescSetAttribute"))?;
            }
        }
        let pref = Pref(lt::create_matmul_pref().map_err(blas_err("cublasLtMatmulPreferenceCreate"))?);
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: valid handles; heuristic result is plain data.
        let heur = unsafe {
            lt::set_matmul_pref_attribute(pref.0, sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const u64 as *const c_void, 8)
                .map_err(blas_err("cublasLtMatmulPreferenceSetAttribute"))?;
            lt::get_matmul_algo_heuristic(self.handle, desc.0, la.0, lb.0, lc.0, lc.0, pref.0).map_err(blas_err("cublasLtMatmulAlgoGetHeuristic"))?
        };
        let (alpha, beta) = (g.alpha, g.beta);
        // SAFETY: all pointers are live device buffers of the sizes described by the layouts (callers
        // derive them from tensor shapes); the stream is the Gpu's compute stream.
        unsafe {
            lt::matmul(
                self.handle,
                desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b as *const c_void,
                la.0,
                a as *const c_void,
                lb.0,
                c as *const c_void,
                lc.0,
                c as *mut c_void,
                lc.0,
                &heur.algo,
                self.workspace.ptr() as *mut c_void,
                WORKSPACE_BYTES,
                self.gpu.stream().cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(blas_err("cublasLtMatmul"))
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: created in new(), destroyed once; pending work finishes before the handle goes away.
        let _ = self.gpu.synchronize();
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}
