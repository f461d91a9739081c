//! Compiles every kernel family with NVRTC (no GPU needed). Requires NVRTC: `scripts/test` installs it
//! with `scripts/setup-cuda-compile` and sets ONEVISION_REQUIRE_NVRTC=1, so in CI a missing NVRTC is a
//! failure. Elsewhere a missing NVRTC is reported loudly as SKIPPED (never a silent pass).

use onevision_cuda::{kernels_check, sources::FAMILIES, toolchain, Arch, Compiler, CudaError, Output};

/// Every extern "C" entry point, by family: a kernel that disappears (renamed, #if'd out) fails here.
const EXPECTED: &[(&str, &[&str])] = &[
    ("embedding", &["embedding_fwd_bf16", "embedding_bwd_f32"]),
    ("rmsnorm", &["rmsnorm_fwd_bf16", "rmsnorm_bwd_bf16"]),
    ("rope", &["mrope_table", "vision_rope_table", "rope_apply_bf16"]),
    ("swiglu", &["swiglu_fwd_bf16", "swiglu_bwd_bf16"]),
    ("gelu", &["gelu_fwd_bf16", "gelu_bwd_bf16"]),
    ("bias", &["bias_add_bf16", "bias_grad_partial_bf16", "reduce_partials_f32"]),
    (
        "attention",
        &[
            "attn_fwd_hd128_bf16",
            "attn_fwd_hd80_bf16",
            "attn_bwd_preprocess_bf16",
            "attn_bwd_hd128_bf16",
            "attn_bwd_hd80_bf16",
            "attn_bwd_dq_convert_bf16",
        ],
    ),
    ("decode_attention", &["decode_attn_split_hd128_bf16", "decode_attn_combine_hd128_bf16"]),
    ("cross_entropy", &["ce_init_f32", "ce_chunk_update_f32", "ce_finalize_f32", "ce_chunk_grad_bf16"]),
    ("grpo_loss", &["grpo_loss_fwd_f32", "grpo_loss_bwd_f32", "reduce_sum_f32"]),
    ("adamw", &["sumsq_partial_f32", "grad_norm_finalize_f32", "adamw_step_bf16"]),
    ("cast", &["cast_f32_to_bf16", "cast_bf16_to_f32", "axpy_f32"]),
    ("sampling", &["sample_tokens_f32"]),
    (
        "tensor_ops",
        &[
            "add_bf16",
            "add_assign_bf16",
            "add_assign_f32",
            "scale_bf16",
            "softmax_rows_bf16",
            "softmax_bwd_rows_bf16",
            "gather_rows_u16",
            "gather_rows_u32",
            "scatter_rows_u16",
            "scatter_rows_u32",
            "gather_rows_bwd_bf16",
            "zero_rows_u16",
            "copy2d_u16",
            "copy2d_u32",
        ],
    ),
];

/// True when the test may run; false (after printing why) when it must be skipped.
fn nvrtc_or_skip(test: &str) -> bool {
    if toolchain::nvrtc_available() {
        return true;
    }
    let required = std::env::var("ONEVISION_REQUIRE_NVRTC").map(|v| v == "1").unwrap_or(false);
    let err = toolchain::ensure_nvrtc().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(!required, "ONEVISION_REQUIRE_NVRTC=1 but NVRTC is missing: {err}");
    eprintln!("SKIPPED {test}: NVRTC not found ({err}). Run scripts/setup-cuda-compile to enable it.");
    false
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip("every_kernel_compiles_for_sm80_and_sm90") {
        return;
    }
    let reports = kernels_check(&["sm_80", "sm_90"]).unwrap_or_else(|e| panic!("kernel check failed: {e}"));
    assert_eq!(EXPECTED.len(), FAMILIES.len(), "EXPECTED must list every family");
    for arch in ["sm_80", "sm_90"] {
        for (family, names) in EXPECTED {
            let found: Vec<&str> = reports
                .iter()
                .filter(|r| r.arch == arch && r.family == *family)
                .map(|r| r.name.as_str())
                .collect();
            let mut want: Vec<&str> = names.to_vec();
            let mut got = found.clone();
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "{family} on {arch}");
        }
    }
    if toolchain::ptxas_path().is_some() {
        for r in &reports {
            let res = r.resources.unwrap_or_else(|| panic!("{} on {}: ptxas present but no resources", r.name, r.arch));
            assert!(res.registers > 0 && res.registers <= 255, "{} on {}: {} registers", r.name, r.arch, res.registers);
        }
        // No kernel spills today (attention backward included, at <= 255 registers): keep it that way.
        for r in &reports {
            let res = r.resources.unwrap_or_default();
            assert_eq!((res.spill_stores, res.spill_loads), (0, 0), "{} spills on {}", r.name, r.arch);
        }
    } else {
        eprintln!("NOTE: ptxas not found: registers/spills were not checked (scripts/setup-cuda-compile installs it)");
    }
}

#[test]
fn compile_errors_carry_the_nvrtc_log_and_cache_hits_skip_nvrtc() {
    if !nvrtc_or_skip("compile_errors_carry_the_nvrtc_log_and_cache_hits_skip_nvrtc") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let compiler = Compiler::new(dir.path().to_path_buf());
    let arch = Arch::parse("sm_90").expect("arch");

    let broken = onevision_cuda::sources::KernelSource {
        family: "broken",
        file: "kernels/broken.cu",
        source: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_symbol; }\n",
    };
    match compiler.compile(&broken, arch, Output::Ptx) {
        Err(CudaError::Compile { family, log, .. }) => {
            assert_eq!(family, "broken");
            assert!(log.contains("undefined_symbol"), "log should name the error: {log}");
            assert!(log.contains("kernels/broken.cu"), "log should point at the real file: {log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }

    let k = onevision_cuda::sources::family("cast").expect("cast family");
    let first = compiler.compile(k, arch, Output::Ptx).expect("compile cast");
    assert!(!first.from_cache);
    let second = compiler.compile(k, arch, Output::Ptx).expect("cached cast");
    assert!(second.from_cache, "second compile should be served from {}", dir.path().display());
    assert_eq!(first.bytes, second.bytes);
    assert!(first.ptx_entries().contains(&"cast_f32_to_bf16".to_string()));
    // CUBIN for the exact architecture (what the backend loads) is a distinct cache entry: ELF magic.
    let cubin = compiler.compile(k, arch, Output::Cubin).expect("cubin");
    assert!(!cubin.from_cache);
    assert_eq!(&cubin.bytes[..4], b"\x7fELF");
}

#[test]
fn bad_architecture_is_a_typed_error() {
    // Needs no NVRTC: the architecture is validated first.
    match kernels_check(&["sm_70"]) {
        Err(CudaError::BadArch(a)) => assert_eq!(a, "sm_70"),
        other => panic!("expected BadArch, got {other:?}"),
    }
}
