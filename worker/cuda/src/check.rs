//! `onevision kernels check`: compile every kernel family with NVRTC for each requested architecture
//! (no GPU needed) and, when ptxas is available, assemble the PTX to report registers and spills.

use std::fmt;
use std::path::Path;
use std::process::Command;

use crate::compile::{compile_family, Arch, Output};
use crate::error::{CudaError, Result};
use crate::sources::FAMILIES;
use crate::toolchain;

/// One kernel (PTX `.entry`) compiled for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelReport {
    pub family: String,
    pub name: String,
    pub arch: String,
    /// None when ptxas was not available ("ok (ptx)").
    pub resources: Option<Resources>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
    pub static_smem_bytes: u32,
}

impl fmt::Display for KernelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.resources {
            Some(r) => write!(
                f,
                "{} ok [{}] {} registers, {} B spill stores, {} B spill loads, {} B stack, {} B static smem",
                self.name, self.arch, r.registers, r.spill_stores, r.spill_loads, r.stack_bytes, r.static_smem_bytes
            ),
            None => write!(f, "{} ok (ptx) [{}]", self.name, self.arch),
        }
    }
}

/// Compiles all kernels for `archs` (default: sm_80 and sm_90), prints one line per kernel and returns
/// the reports. Fails on the first family that does not compile, with NVRTC's log.
pub fn kernels_check(archs: &[&str]) -> Result<Vec<KernelReport>> {
    let archs: Vec<Arch> = if archs.is_empty() {
        vec![Arch::parse("sm_80")?, Arch::parse("sm_90")?]
    } else {
        archs.iter().map(|a| Arch::parse(a)).collect::<Result<_>>()?
    };
    let ptxas = toolchain::ptxas_path();
    let mut reports = Vec::new();
    for arch in &archs {
        for k in FAMILIES {
            let compiled = compile_family(k, *arch, Output::Ptx)?;
            let entries = compiled.ptx_entries();
            if entries.is_empty() {
                return Err(CudaError::NoEntries { family: k.family.to_string() });
            }
            let resources = match &ptxas {
                Some(p) => Some(run_ptxas(p, k.family, *arch, &compiled.bytes)?),
                None => None,
            };
            for name in entries {
                let report = KernelReport {
                    family: k.family.to_string(),
                    arch: arch.sm(),
                    resources: resources.as_ref().map(|r| r.iter().find(|(n, _)| *n == name).map(|(_, r)| *r).unwrap_or_default()),
                    name,
                };
                println!("{report}");
                reports.push(report);
            }
        }
    }
    Ok(reports)
}

fn run_ptxas(ptxas: &Path, family: &str, arch: Arch, ptx: &[u8]) -> Result<Vec<(String, Resources)>> {
    let err = |message: String| CudaError::Ptxas { path: ptxas.to_path_buf(), family: family.to_string(), arch: arch.sm(), message };
    let dir = tempdir_for(family, arch).map_err(|e| err(format!("temp dir: {e}")))?;
    let input = dir.join(format!("{family}.ptx"));
    let output = dir.join(format!("{family}.cubin"));
    std::fs::write(&input, ptx).map_err(|e| err(format!("write {}: {e}", input.display())))?;
    let out = Command::new(ptxas)
        .arg(format!("-arch={}", arch.sm()))
        .arg("-v")
        .arg("-o")
        .arg(&output)
        .arg(&input)
        .output()
        .map_err(|e| err(format!("spawn: {e}")));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(err(format!("exit {}: {text}", out.status)));
    }
    Ok(parse_ptxas(&text))
}

fn tempdir_for(family: &str, arch: Arch) -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("onevision-ptxas-{}-{family}-{}", std::process::id(), arch.sm()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Parses `ptxas -v` output: per entry, "Compiling entry function 'X'", then
/// "N bytes stack frame, N bytes spill stores, N bytes spill loads" and "Used N registers, ... N bytes smem".
pub fn parse_ptxas(text: &str) -> Vec<(String, Resources)> {
    let mut out: Vec<(String, Resources)> = Vec::new();
    for line in text.lines() {
        if let Some(pos) = line.find("Compiling entry function '") {
            let rest = &line[pos + "Compiling entry function '".len()..];
            if let Some(end) = rest.find('\'') {
                out.push((rest[..end].to_string(), Resources::default()));
            }
            continue;
        }
        let Some((_, r)) = out.last_mut() else { continue };
        if line.contains("spill stores") {
            r.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("Used ") && line.contains("registers") {
            r.registers = number_before(line, "registers").unwrap_or(0);
            r.static_smem_bytes = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

fn number_before(line: &str, marker: &str) -> Option<u32> {
    let idx = line.find(marker)?;
    line[..idx].trim_end().rsplit(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let text = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'rmsnorm_fwd_bf16' for 'sm_90'\n\
ptxas info    : Function properties for rmsnorm_fwd_bf16\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 38 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'swiglu_fwd_bf16' for 'sm_90'\n\
ptxas info    : Function properties for swiglu_fwd_bf16\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 16 registers, used 0 barriers, 380 bytes cmem[0]\n";
        let r = parse_ptxas(text);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, "rmsnorm_fwd_bf16");
        assert_eq!(r[0].1, Resources { registers: 38, spill_stores: 4, spill_loads: 12, stack_bytes: 8, static_smem_bytes: 128 });
        assert_eq!(r[1].1.registers, 16);
        assert_eq!(r[1].1.static_smem_bytes, 0);
    }
}
