//! Finding the CUDA compile toolchain (NVRTC, headers, ptxas) without a CUDA install.
//!
//! cudarc's dynamic loading dlopen()s `libnvrtc.so*` by bare name, so a library outside the loader path
//! (the PyPI wheel that `scripts/setup-cuda-compile` installs) is invisible to it, and setting
//! LD_LIBRARY_PATH at run time has no effect. We dlopen the absolute path first and keep it loaded:
//! the loader then resolves cudarc's later `dlopen("libnvrtc.so.12")` to the same object by soname.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{CudaError, Result};

/// Where `scripts/setup-cuda-compile` installs by default.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("ONEVISION_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("onevision")
}

fn wheel_root() -> PathBuf {
    cache_root().join("cuda-compile").join("site").join("nvidia")
}

fn toolkit_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(v) = std::env::var_os(var) {
            roots.push(PathBuf::from(v));
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
}

/// Candidate absolute paths for libnvrtc, most specific first.
pub fn nvrtc_candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("ONEVISION_NVRTC_LIB") {
        c.push(PathBuf::from(p));
    }
    let wheel = wheel_root().join("cuda_nvrtc").join("lib");
    c.push(wheel.join("libnvrtc.so.12"));
    c.push(wheel.join("libnvrtc.so"));
    for root in toolkit_roots() {
        for lib in ["lib64", "lib"] {
            c.push(root.join(lib).join("libnvrtc.so.12"));
            c.push(root.join(lib).join("libnvrtc.so"));
        }
    }
    c
}

static NVRTC: OnceLock<std::result::Result<Option<PathBuf>, String>> = OnceLock::new();

/// Makes NVRTC loadable for cudarc. Returns the path it was preloaded from (None: found by cudarc on
/// the default loader path). Errors if no NVRTC exists anywhere we look.
pub fn ensure_nvrtc() -> Result<Option<PathBuf>> {
    let res = NVRTC.get_or_init(|| {
        for cand in nvrtc_candidates() {
            if !cand.is_file() {
                continue;
            }
            // SAFETY: loading libnvrtc runs only its own initialisers; the handle is leaked on purpose
            // so that the soname stays resident for cudarc for the life of the process.
            match unsafe { libloading::Library::new(&cand) } {
                Ok(lib) => {
                    std::mem::forget(lib);
                    return Ok(Some(cand));
                }
                Err(e) => tracing_like_warn(&format!("could not load {}: {e}", cand.display())),
            }
        }
        // SAFETY: only probes dlopen with cudarc's candidate names.
        if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Ok(None);
        }
        let searched: Vec<String> =
            nvrtc_candidates().iter().map(|p| p.display().to_string()).collect();
        Err(format!("{} and the loader path", searched.join(", ")))
    });
    match res {
        Ok(p) => Ok(p.clone()),
        Err(searched) => Err(CudaError::NvrtcNotFound { searched: searched.clone() }),
    }
}

fn tracing_like_warn(msg: &str) {
    eprintln!("onevision-cuda: warning: {msg}");
}

/// Whether NVRTC can be loaded (tests use this to decide between running and reporting a skip).
pub fn nvrtc_available() -> bool {
    ensure_nvrtc().is_ok()
}

/// NVRTC's (major, minor) version; part of the kernel cache key.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (ensure_nvrtc) and both pointers are valid for writes.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Nvrtc { call: "nvrtcVersion", status: format!("{status:?}") });
    }
    Ok((major, minor))
}

/// Include directories holding `cuda_bf16.h` and what it includes.
pub fn include_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("ONEVISION_CUDA_INCLUDE") {
        dirs.extend(std::env::split_paths(&v));
    }
    let wheel = wheel_root();
    dirs.push(wheel.join("cuda_runtime").join("include"));
    dirs.push(wheel.join("cuda_nvcc").join("include"));
    for root in toolkit_roots() {
        dirs.push(root.join("include"));
    }
    let mut seen = Vec::new();
    for d in dirs {
        if d.is_dir() && !seen.contains(&d) {
            seen.push(d);
        }
    }
    seen
}

/// ptxas, for register/spill reports. Optional: without it the check reports PTX only.
pub fn ptxas_path() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os("ONEVISION_PTXAS") {
        let p = PathBuf::from(v);
        if is_executable(&p) {
            return Some(p);
        }
    }
    let wheel = wheel_root().join("cuda_nvcc").join("bin").join("ptxas");
    if is_executable(&wheel) {
        return Some(wheel);
    }
    for root in toolkit_roots() {
        let p = root.join("bin").join("ptxas");
        if is_executable(&p) {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path).map(|d| d.join("ptxas")).find(|p| is_executable(p))
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}
