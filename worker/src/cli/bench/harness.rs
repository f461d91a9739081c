//! What every `onevision bench` subcommand shares: the device (`--device cpu|cuda[:N]`) and its
//! Backend, timing (median of synchronised samples), the JSON line each measurement prints, and
//! the closed-form kernel FLOP and byte counts (the same formulas as benches/torch_*.py, so the two
//! sides can be joined on `bench` + `shape`). Model FLOPs (`bench layer`, `bench sft-step`) are
//! `onevision_model::flops`, the count behind the trainer's MFU; the datasheet peaks are
//! `telemetry::mfu`'s.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use clap::Args as ClapArgs;
use onevision_model::{Backend, CpuBackend, DType, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

#[cfg(feature = "cuda")]
use crate::telemetry::mfu::datasheet_peak_tflops;
pub use onevision_model::flops::TextDims;

/// Errors a user can act on: a wrong `--device`, a machine without a GPU, shapes that do not fit.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("unknown device `{0}`: expected `cpu`, `cuda` or `cuda:N` (N = GPU ordinal)")]
    BadDevice(String),
    #[error("--device {device}: cannot open the CUDA backend (run on a machine with an NVIDIA GPU and driver, or use --device cpu)")]
    Cuda {
        device: String,
        #[source]
        source: onevision_cuda::CudaError,
    },
    #[error("invalid benchmark shape: {0}")]
    Shape(String),
}

/// `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = BenchError;
    fn from_str(s: &str) -> Result<Self, BenchError> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| BenchError::BadDevice(s.into())),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Options every device benchmark takes.
#[derive(Debug, Clone, ClapArgs)]
pub struct Common {
    /// Where to run: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Timed samples (after the warm-up); the median is reported.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed calls first (kernel compilation and loading, allocator warm-up).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Dense bf16 peak of the device in TFLOP/s for MFU (default: looked up from the GPU's name;
    /// no MFU is printed when unknown, e.g. on CPU).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
}

type SyncFn = Box<dyn Fn() -> anyhow::Result<()> + Send + Sync>;
type CopyFn = Box<dyn Fn(usize, usize, usize) -> anyhow::Result<f64> + Send + Sync>;

/// An opened device: its Backend, the dtypes that run fast there, and a way to wait for it.
pub struct BenchDevice {
    pub spec: DeviceSpec,
    pub backend: Arc<dyn Backend>,
    /// Human-readable device ("cpu (2 threads)", "NVIDIA H100 80GB HBM3").
    pub name: String,
    /// Activations: F32 on the CPU oracle, BF16 on CUDA (what each backend computes in).
    pub act: DType,
    /// Weights as stored on the device (F32 on CPU, BF16 on CUDA).
    pub weights: DType,
    pub peak_tflops: Option<f64>,
    sync: SyncFn,
    /// (bytes, warmup, iters) -> median seconds of one device-to-device copy of `bytes`.
    copy: CopyFn,
    pub timing: (usize, usize),
    /// The concrete CUDA backend, for measurements of kernels the trait does not expose.
    #[cfg(feature = "cuda")]
    pub cuda: Option<Arc<onevision_cuda::CudaBackend>>,
}

impl BenchDevice {
    pub fn open(c: &Common) -> anyhow::Result<Self> {
        let spec: DeviceSpec = c.device.parse()?;
        let timing = (c.warmup, c.iters.max(1));
        let dev = match spec {
            DeviceSpec::Cpu => BenchDevice {
                spec,
                backend: Arc::new(CpuBackend::new()),
                name: format!("cpu ({} threads)", rayon::current_num_threads()),
                act: DType::F32,
                weights: DType::F32,
                peak_tflops: None,
                sync: Box::new(|| Ok(())),
                copy: Box::new(|bytes, warmup, iters| {
                    let src = vec![1u8; bytes];
                    let mut dst = vec![0u8; bytes];
                    time(warmup, iters, || {
                        dst.copy_from_slice(&src);
                        std::hint::black_box(&dst);
                        Ok(())
                    }, || Ok(()))
                }),
                timing,
                #[cfg(feature = "cuda")]
                cuda: None,
            },
            DeviceSpec::Cuda(n) => open_cuda(spec, n, timing)?,
        };
        Ok(BenchDevice { peak_tflops: c.peak_tflops.or(dev.peak_tflops), ..dev })
    }

    /// `impl` field of the JSON lines (the PyTorch side writes eager / sdpa / compile).
    pub fn impl_name(&self) -> &'static str {
        match self.spec {
            DeviceSpec::Cpu => "onevision-cpu",
            DeviceSpec::Cuda(_) => "onevision-cuda",
        }
    }

    pub fn sync(&self) -> anyhow::Result<()> {
        (self.sync)()
    }

    /// Median seconds per call of `f` with this device's warm-up and sample counts.
    pub fn time<F: FnMut() -> anyhow::Result<()>>(&self, f: F) -> anyhow::Result<f64> {
        time(self.timing.0, self.timing.1, f, || self.sync())
    }

    /// Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written
    /// (as benches/torch_common.py's copy_bandwidth_gbps).
    pub fn copy_gbps(&self, bytes: usize) -> anyhow::Result<f64> {
        Ok(copy_gbps(bytes, self.copy_seconds(bytes)?))
    }

    /// Median seconds of one device-to-device copy of `bytes`.
    pub fn copy_seconds(&self, bytes: usize) -> anyhow::Result<f64> {
        (self.copy)(bytes, self.timing.0.max(1), self.timing.1)
    }

    /// A tensor of `shape` with values uniform in [-scale, scale) on the device, in `dtype`.
    /// Random rather than zeros: zeros hide unwritten outputs and can run faster than real data.
    pub fn random(&self, shape: &[usize], dtype: DType, scale: f32, seed: u64) -> anyhow::Result<Tensor> {
        let host = random_host(shape, scale, seed)?;
        let host = if dtype == DType::F32 { host } else { host.to_dtype(dtype)? };
        Ok(self.backend.to_device(&host)?)
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(spec: DeviceSpec, ordinal: usize, timing: (usize, usize)) -> anyhow::Result<BenchDevice> {
    let err = |source| BenchError::Cuda { device: spec.to_string(), source };
    let cb = Arc::new(onevision_cuda::CudaBackend::new(ordinal).map_err(err)?);
    let gpu = cb.gpu().clone();
    let name = gpu.context().name().unwrap_or_else(|_| cb.name().to_string());
    let (g_sync, g_copy) = (gpu.clone(), gpu);
    Ok(BenchDevice {
        spec,
        cuda: Some(cb.clone()),
        backend: cb,
        peak_tflops: datasheet_peak_tflops(&name),
        name,
        act: DType::BF16,
        weights: DType::BF16,
        sync: Box::new(move || Ok(g_sync.synchronize()?)),
        copy: Box::new(move |bytes, warmup, iters| {
            let (src, dst) = (g_copy.alloc(bytes)?, g_copy.alloc(bytes)?);
            g_copy.memset_zero(src.ptr(), bytes)?;
            time(warmup, iters, || Ok(g_copy.copy(dst.ptr(), src.ptr(), bytes)?), || Ok(g_copy.synchronize()?))
        }),
        timing,
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(spec: DeviceSpec, _ordinal: usize, _timing: (usize, usize)) -> anyhow::Result<BenchDevice> {
    Err(BenchError::Cuda {
        device: spec.to_string(),
        source: onevision_cuda::CudaError::Invalid("this onevision binary was built without the `cuda` feature".into()),
    }
    .into())
}

/// Host F32 tensor, uniform in [-scale, scale), filled in parallel (model-sized tensors have
/// hundreds of millions of values).
pub fn random_host(shape: &[usize], scale: f32, seed: u64) -> anyhow::Result<Tensor> {
    const CHUNK: usize = 1 << 16;
    let n: usize = shape.iter().product();
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64);
        c.iter_mut().for_each(|x| *x = rng.random_range(-scale..scale));
    });
    Ok(Tensor::from_f32(shape, v)?)
}

/// Bandwidth of a copy of `bytes` taking `secs`: read + write, the same expression [`emit`] uses
/// for `gbps`, so a copy line and the `copy_gbps` echoed on other lines agree to the bit.
pub fn copy_gbps(bytes: usize, secs: f64) -> f64 {
    2.0 * bytes as f64 / secs / 1e9
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds per call of `f`: `warmup` untimed calls, then `iters` samples. Device work is
/// asynchronous, so each sample ends with `sync` before the clock is read; a sample repeats `f`
/// enough times to last about a millisecond, so that the synchronisation does not dominate
/// microsecond kernels (benches/torch_common.py times single calls with CUDA events instead).
pub fn time<F, S>(warmup: usize, iters: usize, mut f: F, sync: S) -> anyhow::Result<f64>
where
    F: FnMut() -> anyhow::Result<()>,
    S: Fn() -> anyhow::Result<()>,
{
    for _ in 0..warmup {
        f()?;
    }
    sync()?;
    let t0 = Instant::now();
    f()?;
    sync()?;
    let once = t0.elapsed().as_secs_f64();
    let reps = ((1e-3 / once.max(1e-9)).ceil() as usize).clamp(1, 100);
    let mut samples = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        sync()?;
        samples.push(t0.elapsed().as_secs_f64() / reps as f64);
    }
    Ok(median(samples))
}

/// What a measurement is normalised by.
pub enum Work {
    /// Floating-point operations: prints `flops` and `tflops`.
    Flops(f64),
    /// Bytes moved through device memory: prints `bytes` and `gbps`.
    Bytes(f64),
}

/// Prints one JSON line: `bench`, `impl`, `shape`, `ms`, `device`, `dtype`, `tflops`/`gbps` (and the
/// raw `flops`/`bytes`), `mfu` when a peak is known for a FLOP count, then `extra`'s fields.
pub fn emit(dev: &BenchDevice, bench: &str, shape: Value, secs: f64, work: Option<Work>, extra: Value) -> Value {
    let mut out = Map::new();
    out.insert("bench".into(), json!(bench));
    out.insert("impl".into(), json!(dev.impl_name()));
    out.insert("shape".into(), shape);
    out.insert("ms".into(), json!(secs * 1e3));
    out.insert("device".into(), json!(dev.name));
    out.insert("dtype".into(), json!(format!("{:?}", dev.act).to_lowercase()));
    match work {
        Some(Work::Flops(f)) => {
            let tflops = f / secs / 1e12;
            out.insert("flops".into(), json!(f));
            out.insert("tflops".into(), json!(tflops));
            if let Some(p) = dev.peak_tflops {
                out.insert("peak_tflops".into(), json!(p));
                out.insert("mfu".into(), json!(tflops / p));
            }
        }
        Some(Work::Bytes(b)) => {
            out.insert("bytes".into(), json!(b));
            out.insert("gbps".into(), json!(b / secs / 1e9));
        }
        None => {}
    }
    if let Value::Object(m) = extra {
        out.extend(m);
    }
    let v = Value::Object(out);
    println!("{v}");
    v
}

// ---- closed-form counts (keep equal to benches/torch_*.py) ----

/// Attention FLOPs (torch_attention.attn_flops): 4·b·h·t·s·d, halved when causal; fwd+bwd is 3.5×
/// the forward (backward = 2.5× forward, the FlashAttention-2 convention).
pub fn attn_flops(b: usize, h: usize, t: usize, s: usize, d: usize, causal: bool, bwd: bool) -> f64 {
    let f = 4.0 * (b * h * t * s * d) as f64 * if causal { 0.5 } else { 1.0 };
    f * if bwd { 3.5 } else { 1.0 }
}

/// Block-diagonal (varlen) attention over segments `cu` of one sequence: the dense count times
/// the mask density Σ len² / n², as torch_attention.py scales by `mask.float().mean()`.
pub fn segment_attn_flops(h: usize, d: usize, cu: &[usize], bwd: bool) -> f64 {
    let pairs: usize = cu.windows(2).map(|w| (w[1] - w[0]) * (w[1] - w[0])).sum();
    attn_flops(1, h, 1, pairs, d, false, bwd)
}

// Text model dimensions (benches/torch_common.py MODELS).
pub const QWEN25VL_3B: TextDims =
    TextDims { hidden: 2048, heads: 16, kv_heads: 2, head_dim: 128, inter: 11008, vocab: 151936, layers: 36, tied: true };
pub const QWEN25VL_7B: TextDims =
    TextDims { hidden: 3584, heads: 28, kv_heads: 4, head_dim: 128, inter: 18944, vocab: 152064, layers: 28, tied: false };
/// The vision tower's attention: 16 heads of 80, windows of 8×8 patches (112 px).
pub const VISION_HEADS: usize = 16;
pub const VISION_HEAD_DIM: usize = 80;

/// `--model` preset plus per-dimension overrides (small shapes for CPU runs and tests).
#[derive(Debug, Clone, ClapArgs)]
pub struct ModelArgs {
    /// Qwen2.5-VL text model whose shapes to use: 3b or 7b.
    #[arg(long, default_value = "3b")]
    pub model: String,
    #[arg(long)]
    pub hidden: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long)]
    pub head_dim: Option<usize>,
    #[arg(long)]
    pub inter: Option<usize>,
    #[arg(long)]
    pub vocab: Option<usize>,
}

impl ModelArgs {
    /// The dimensions and the label used in bench names (`3b`, `7b`, or `custom` when overridden,
    /// so an overridden run never joins with PyTorch's preset rows).
    pub fn resolve(&self) -> anyhow::Result<(TextDims, String)> {
        let base = match self.model.as_str() {
            "3b" => QWEN25VL_3B,
            "7b" => QWEN25VL_7B,
            m => return Err(BenchError::Shape(format!("--model {m}: expected 3b or 7b")).into()),
        };
        let d = TextDims {
            hidden: self.hidden.unwrap_or(base.hidden),
            heads: self.heads.unwrap_or(base.heads),
            kv_heads: self.kv_heads.unwrap_or(base.kv_heads),
            head_dim: self.head_dim.unwrap_or(base.head_dim),
            inter: self.inter.unwrap_or(base.inter),
            vocab: self.vocab.unwrap_or(base.vocab),
            ..base
        };
        if d.heads == 0 || d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) || d.head_dim == 0 || d.hidden == 0 || d.inter == 0 || d.vocab == 0 {
            return Err(BenchError::Shape(format!("{d:?}: dimensions must be positive and heads a multiple of kv_heads")).into());
        }
        let label = if d == base { self.model.clone() } else { "custom".into() };
        Ok((d, label))
    }
}
