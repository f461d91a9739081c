//! NVRTC compilation of the kernel families, with an on-disk cache keyed by
//! sha256(program text, target, options, NVRTC version): a changed kernel, another GPU generation or a
//! new NVRTC each get their own entry, so a stale binary is never loaded.

use std::ffi::{CStr, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result as nvrtc, sys};
use sha2::{Digest, Sha256};

use crate::error::{CudaError, Result};
use crate::sources::{program_text, KernelSource};
use crate::toolchain;

/// A compute capability >= 8.0 (bf16 tensor cores and `mma.sync ... bf16` need sm_80).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
    /// `sm_90a`: architecture-specific features (wgmma, setmaxnreg); not used by the kernels yet.
    pub accel: bool,
}

impl Arch {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || CudaError::BadArch(s.to_string());
        let rest = s.trim().strip_prefix("sm_").or_else(|| s.trim().strip_prefix("compute_")).ok_or_else(bad)?;
        let (digits, accel) = match rest.strip_suffix('a') {
            Some(d) => (d, true),
            None => (rest, false),
        };
        if digits.len() < 2 || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        let (maj, min) = digits.split_at(digits.len() - 1);
        let major: u32 = maj.parse().map_err(|_| bad())?;
        let minor: u32 = min.parse().map_err(|_| bad())?;
        if major < 8 {
            return Err(bad());
        }
        Ok(Arch { major, minor, accel })
    }

    pub fn sm(&self) -> String {
        format!("sm_{}{}{}", self.major, self.minor, if self.accel { "a" } else { "" })
    }

    pub fn compute(&self) -> String {
        format!("compute_{}{}{}", self.major, self.minor, if self.accel { "a" } else { "" })
    }
}

/// What NVRTC should produce: PTX (portable, JIT-able, input to ptxas) or a CUBIN for exactly this
/// architecture (what the backend loads: no driver JIT at start-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Ptx,
    Cubin,
}

#[derive(Debug, Clone)]
pub struct Compiled {
    pub family: &'static str,
    pub arch: Arch,
    pub output: Output,
    pub bytes: Vec<u8>,
    pub from_cache: bool,
}

impl Compiled {
    /// The `.entry` names in PTX output, in order of appearance.
    pub fn ptx_entries(&self) -> Vec<String> {
        ptx_entries(&String::from_utf8_lossy(&self.bytes))
    }
}

pub fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix(".visible .entry ").or_else(|| l.strip_prefix(".entry "))?;
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '$').collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// The type class of one kernel parameter as PTX declares it: what the host must pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// .u32/.s32/.b32: int.
    Word32,
    /// .u64/.s64/.b64: pointers, long long, unsigned long long.
    Word64,
    /// .f32: float.
    Float32,
}

/// Parameter lists of every `.entry` in PTX, in declaration order. Used to check each launch's
/// arguments against the compiled kernel, so a host/kernel signature mismatch is a typed error at the
/// first launch instead of silent memory corruption.
pub fn ptx_signatures(ptx: &str) -> Vec<(String, Vec<ParamKind>)> {
    let mut out: Vec<(String, Vec<ParamKind>)> = Vec::new();
    let mut current: Option<(String, Vec<ParamKind>)> = None;
    for line in ptx.lines() {
        let l = line.trim();
        if let Some(name) = ptx_entries(l).into_iter().next() {
            if let Some(c) = current.take() {
                out.push(c);
            }
            current = Some((name, Vec::new()));
            continue;
        }
        if let Some((_, params)) = current.as_mut() {
            if let Some(rest) = l.strip_prefix(".param ") {
                let ty = rest.split_whitespace().next().unwrap_or("");
                let kind = match ty {
                    ".u32" | ".s32" | ".b32" => ParamKind::Word32,
                    ".f32" => ParamKind::Float32,
                    _ => ParamKind::Word64,
                };
                params.push(kind);
            } else if l.starts_with(')') {
                if let Some(c) = current.take() {
                    out.push(c);
                }
            }
        }
    }
    if let Some(c) = current.take() {
        out.push(c);
    }
    out
}

fn options(arch: Arch, output: Output) -> Vec<String> {
    let target = match output {
        Output::Ptx => arch.compute(),
        Output::Cubin => arch.sm(),
    };
    let mut o = vec![
        format!("--gpu-architecture={target}"),
        "--std=c++17".to_string(),
        // Precise division/sqrt and no flush-to-zero: the CPU oracle is IEEE; fast paths are explicit
        // in the kernels (exp2f on pre-scaled logits) rather than global.
        "--fmad=true".to_string(),
        "--device-as-default-execution-space".to_string(),
        "-DONEVISION_NVRTC=1".to_string(),
    ];
    for dir in toolchain::include_dirs() {
        o.push(format!("--include-path={}", dir.display()));
    }
    o
}

/// Where compiled kernels are cached: $ONEVISION_KERNEL_CACHE, else <cache root>/kernels.
pub fn default_cache_dir() -> PathBuf {
    match std::env::var_os("ONEVISION_KERNEL_CACHE") {
        Some(d) => PathBuf::from(d),
        None => toolchain::cache_root().join("kernels"),
    }
}

/// The cache key: everything that changes the output.
pub fn cache_key(text: &str, arch: Arch, output: Output, opts: &[String], version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(text.as_bytes());
    h.update([0u8]);
    h.update(format!("{}|{:?}|nvrtc{}.{}|", arch.sm(), output, version.0, version.1).as_bytes());
    // Include paths are machine-specific but select which headers are read, so they belong in the key.
    for o in opts {
        h.update(o.as_bytes());
        h.update([0u8]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Compiles one family with the default cache (or reads it from there).
pub fn compile_family(k: &KernelSource, arch: Arch, output: Output) -> Result<Compiled> {
    Compiler::new(default_cache_dir()).compile(k, arch, output)
}

/// NVRTC with an explicit cache directory (tests use a temporary one).
#[derive(Debug, Clone)]
pub struct Compiler {
    pub cache_dir: PathBuf,
}

impl Compiler {
    pub fn new(cache_dir: PathBuf) -> Self {
        Compiler { cache_dir }
    }

    pub fn compile(&self, k: &KernelSource, arch: Arch, output: Output) -> Result<Compiled> {
        toolchain::ensure_nvrtc()?;
        let version = toolchain::nvrtc_version()?;
        let text = program_text(k);
        let opts = options(arch, output);
        let key = cache_key(&text, arch, output, &opts, version);
        let ext = match output {
            Output::Ptx => "ptx",
            Output::Cubin => "cubin",
        };
        let path = self.cache_dir.join(format!("{}-{}-{}.{ext}", k.family, arch.sm(), &key[..32]));
        if let Ok(bytes) = std::fs::read(&path) {
            if !bytes.is_empty() {
                return Ok(Compiled { family: k.family, arch, output, bytes, from_cache: true });
            }
        }
        let bytes = nvrtc_compile(k.family, &text, arch, output, &opts)?;
        // A cache write failure (read-only home, full disk) must not fail compilation: warn and go on.
        if let Err(e) = write_atomic(&self.cache_dir, &path, &bytes) {
            eprintln!("onevision-cuda: warning: {e}");
        }
        Ok(Compiled { family: k.family, arch, output, bytes, from_cache: false })
    }
}

fn write_atomic(dir: &std::path::Path, path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let io = |source| CudaError::CacheIo { path: path.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    // Unique temp name, then rename: concurrent compilers (tests, ranks) never see a partial file.
    let tmp = path.with_extension(format!("tmp{}.{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtc::create_program and destroyed exactly once here.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

fn status(e: nvrtc::NvrtcError) -> String {
    format!("{:?}", e.0)
}

fn nvrtc_compile(family: &str, text: &str, arch: Arch, output: Output, opts: &[String]) -> Result<Vec<u8>> {
    let src = CString::new(text).map_err(|_| CudaError::Invalid(format!("{family}: source contains NUL")))?;
    let name = CString::new(format!("{family}.cu")).map_err(|_| CudaError::Invalid(family.to_string()))?;
    let prog = Program(
        nvrtc::create_program(&src, Some(&name))
            .map_err(|e| CudaError::Nvrtc { call: "nvrtcCreateProgram", status: status(e) })?,
    );
    // SAFETY: prog is a live program; options are NUL-free (built from format! of paths/flags).
    let compiled = unsafe { nvrtc::compile_program(prog.0, opts) };
    // SAFETY: prog is live; the log exists after a compile attempt, successful or not.
    let log = unsafe { nvrtc::get_program_log(prog.0) }
        .map(|raw| {
            let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
            CStr::from_bytes_until_nul(&bytes).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
        })
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(CudaError::Compile { family: family.to_string(), arch: arch.sm(), status: status(e), log });
    }
    match output {
        Output::Ptx => {
            // SAFETY: compiled successfully above.
            let raw = unsafe { nvrtc::get_ptx(prog.0) }
                .map_err(|e| CudaError::Nvrtc { call: "nvrtcGetPTX", status: status(e) })?;
            let mut bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
            while bytes.last() == Some(&0) {
                bytes.pop();
            }
            Ok(bytes)
        }
        Output::Cubin => {
            let mut size = 0usize;
            // SAFETY: compiled for a real sm_ target, so a CUBIN exists; buffer sized from NVRTC.
            let st = unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) };
            if st != sys::nvrtcResult::NVRTC_SUCCESS {
                return Err(CudaError::Nvrtc { call: "nvrtcGetCUBINSize", status: format!("{st:?}") });
            }
            let mut buf = vec![0u8; size];
            let st = unsafe { sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast()) };
            if st != sys::nvrtcResult::NVRTC_SUCCESS {
                return Err(CudaError::Nvrtc { call: "nvrtcGetCUBIN", status: format!("{st:?}") });
            }
            Ok(buf)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_archs() {
        assert_eq!(Arch::parse("sm_90").unwrap(), Arch { major: 9, minor: 0, accel: false });
        assert_eq!(Arch::parse("sm_90a").unwrap().compute(), "compute_90a");
        assert_eq!(Arch::parse("sm_86").unwrap().sm(), "sm_86");
        assert_eq!(Arch::parse("sm_100").unwrap(), Arch { major: 10, minor: 0, accel: false });
        for bad in ["sm_75", "90", "sm_", "sm_9x", "gfx90a"] {
            assert!(Arch::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn finds_ptx_entries() {
        let ptx = ".version 8.7\n.visible .entry foo_bf16(\n\t.param .u64 a\n)\n.func helper()\n.visible .entry bar(\n";
        assert_eq!(ptx_entries(ptx), vec!["foo_bf16".to_string(), "bar".to_string()]);
    }

    #[test]
    fn parses_ptx_signatures() {
        let ptx = ".visible .entry k1(\n\t.param .u64 k1_param_0,\n\t.param .u32 k1_param_1,\n\t.param .f32 k1_param_2\n)\n{\n\t.reg .pred %p<2>;\n}\n.visible .entry k2(\n\t.param .u64 .ptr .align 1 k2_param_0\n)\n{\n}\n";
        let sigs = ptx_signatures(ptx);
        assert_eq!(sigs.len(), 2);
        assert_eq!(sigs[0], ("k1".to_string(), vec![ParamKind::Word64, ParamKind::Word32, ParamKind::Float32]));
        assert_eq!(sigs[1], ("k2".to_string(), vec![ParamKind::Word64]));
    }

    #[test]
    fn cache_key_changes_with_each_input() {
        let a = Arch::parse("sm_90").unwrap();
        let b = Arch::parse("sm_80").unwrap();
        let o = vec!["-x".to_string()];
        let k = cache_key("src", a, Output::Ptx, &o, (12, 8));
        assert_ne!(k, cache_key("src2", a, Output::Ptx, &o, (12, 8)));
        assert_ne!(k, cache_key("src", b, Output::Ptx, &o, (12, 8)));
        assert_ne!(k, cache_key("src", a, Output::Cubin, &o, (12, 8)));
        assert_ne!(k, cache_key("src", a, Output::Ptx, &o, (12, 9)));
        assert_eq!(k, cache_key("src", a, Output::Ptx, &o, (12, 8)));
    }
}
