//! The CUDA C++ sources, embedded in the binary so that a deployed `onevision` needs no source tree.
//! Each family is compiled as one NVRTC program: `common.cuh` followed by the family's file.

/// Shared device helpers (types, warp/block reductions, vector loads), prepended to every family.
pub const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// One kernel family: one `.cu` file in `kernels/`.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub family: &'static str,
    pub file: &'static str,
    pub source: &'static str,
}

macro_rules! family {
    ($name:literal) => {
        KernelSource {
            family: $name,
            file: concat!("kernels/", $name, ".cu"),
            source: include_str!(concat!("../../../kernels/", $name, ".cu")),
        }
    };
}

pub const FAMILIES: &[KernelSource] = &[
    family!("embedding"),
    family!("rmsnorm"),
    family!("rope"),
    family!("swiglu"),
    family!("gelu"),
    family!("bias"),
    family!("attention"),
    family!("decode_attention"),
    family!("cross_entropy"),
    family!("grpo_loss"),
    family!("adamw"),
    family!("cast"),
    family!("sampling"),
    family!("tensor_ops"),
];

/// The full program text NVRTC compiles for a family. `#line` keeps compiler messages pointing at the
/// real file and line rather than at the concatenation.
pub fn program_text(k: &KernelSource) -> String {
    format!(
        "#line 1 \"kernels/common.cuh\"\n{}\n#line 1 \"{}\"\n{}",
        COMMON, k.file, k.source
    )
}

pub fn family(name: &str) -> Option<&'static KernelSource> {
    FAMILIES.iter().find(|k| k.family == name)
}
