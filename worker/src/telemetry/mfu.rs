//! Model FLOPs utilisation: the device's peak (datasheet table or `ONEVISION_PEAK_TFLOPS`) and
//! the ratio. The FLOP count itself is `onevision_model::flops`; `onevision bench` uses the same
//! table and count.

use std::sync::OnceLock;

use onevision_model::{Backend, Device};

/// Overrides the device's peak dense TFLOP/s used for MFU (any device, CPU included). Unset: the
/// datasheet peak of a known GPU, and no MFU on the CPU or an unknown GPU.
pub const PEAK_TFLOPS_ENV: &str = "ONEVISION_PEAK_TFLOPS";

/// A peak that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PeakError {
    #[error("{PEAK_TFLOPS_ENV}={value:?}: expected the device's dense peak in TFLOP/s, a positive number (e.g. 989 for an H100 SXM in bf16), or leave it unset")]
    BadEnv { value: String },
}

/// Dense (not sparse) bf16 tensor-core peaks from the vendors' datasheets, by device name
/// (CUDA's device name, e.g. "NVIDIA H100 80GB HBM3"). The more specific names come first.
pub fn datasheet_peak_tflops(name: &str) -> Option<f64> {
    const PEAKS: [(&str, f64); 6] =
        [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0)];
    PEAKS.iter().find(|(k, _)| name.contains(k)).map(|&(_, v)| v)
}

/// The peak from the env value (when set) or else the device name's datasheet entry.
pub fn resolve_peak_tflops(env: Option<&str>, device_name: Option<&str>) -> Result<Option<f64>, PeakError> {
    match env.map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => match v.parse::<f64>() {
            Ok(p) if p.is_finite() && p > 0.0 => Ok(Some(p)),
            _ => Err(PeakError::BadEnv { value: v.to_string() }),
        },
        None => Ok(device_name.and_then(datasheet_peak_tflops)),
    }
}

/// The peak TFLOP/s of the device `backend` computes on: `ONEVISION_PEAK_TFLOPS`, else the
/// datasheet entry of a CUDA device's name, else `None` (CPU). Resolved once per process: the
/// device and the environment do not change during a run.
pub fn device_peak_tflops(backend: &dyn Backend) -> Result<Option<f64>, PeakError> {
    static PEAK: OnceLock<Result<Option<f64>, PeakError>> = OnceLock::new();
    PEAK.get_or_init(|| {
        let env = std::env::var(PEAK_TFLOPS_ENV).ok();
        if env.as_deref().is_some_and(|v| !v.trim().is_empty()) {
            return resolve_peak_tflops(env.as_deref(), None);
        }
        let name = match backend.device() {
            Device::Cpu => None,
            // The backend's own name is "cuda:N (sm_90)"; the datasheet needs the product name.
            Device::Cuda(ordinal) => onevision_cuda::gpu::Gpu::new(ordinal).ok().and_then(|g| g.context().name().ok()),
        };
        resolve_peak_tflops(None, name.as_deref())
    })
    .clone()
}

/// MFU of `flops` done in `secs` on a device of `peak_tflops`: achieved / peak FLOP/s.
pub fn mfu(flops: f64, secs: f64, peak_tflops: f64) -> f64 {
    flops / (secs.max(1e-9) * peak_tflops * 1e12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_the_datasheet_and_bad_values_are_errors() {
        assert_eq!(resolve_peak_tflops(Some("123.5"), Some("NVIDIA H100 80GB HBM3")), Ok(Some(123.5)));
        assert_eq!(resolve_peak_tflops(None, Some("NVIDIA H100 80GB HBM3")), Ok(Some(989.0)));
        assert_eq!(resolve_peak_tflops(Some(" "), Some("NVIDIA H100 PCIe")), Ok(Some(756.0)));
        assert_eq!(resolve_peak_tflops(None, Some("NVIDIA A100-SXM4-80GB")), Ok(Some(312.0)));
        assert_eq!(resolve_peak_tflops(None, None), Ok(None));
        assert_eq!(resolve_peak_tflops(None, Some("Tesla T4")), Ok(None));
        for bad in ["abc", "0", "-3", "inf", "NaN"] {
            let e = resolve_peak_tflops(Some(bad), None).unwrap_err();
            assert!(e.to_string().contains(PEAK_TFLOPS_ENV), "{e}");
        }
    }

    /// On a GPU machine (and without the override): the peak the trainer uses is the datasheet
    /// entry of the product name CUDA reports, not of the backend's "cuda:N (sm_XX)" name.
    #[cfg(feature = "cuda")]
    #[test]
    fn a_cuda_device_gets_the_datasheet_peak_of_its_name() {
        let Ok(backend) = onevision_cuda::CudaBackend::new(0) else {
            eprintln!("SKIPPED: no CUDA device");
            return;
        };
        if std::env::var_os(PEAK_TFLOPS_ENV).is_some() {
            eprintln!("SKIPPED: {PEAK_TFLOPS_ENV} is set");
            return;
        }
        let name = backend.gpu().context().name().unwrap();
        let peak = device_peak_tflops(&backend).unwrap();
        assert_eq!(peak, datasheet_peak_tflops(&name), "{name}");
        if name.contains("H100") || name.contains("H200") || name.contains("A100") {
            assert!(peak.is_some(), "{name}");
        }
    }

    #[test]
    fn mfu_is_achieved_over_peak() {
        // 1e12 FLOPs in 2 s on a 1 TFLOP/s device: half the peak.
        assert_eq!(mfu(1e12, 2.0, 1.0), 0.5);
    }
}
