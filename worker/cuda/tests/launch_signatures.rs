//! Static check, no GPU needed: every kernel launch in the host code (backend.rs, ops.rs) passes
//! arguments whose count and kinds match the kernel's PTX signature. The same check runs at launch
//! time on a GPU; this test catches a mismatch (a kernel signature changed, an argument forgotten) on
//! machines without one. Needs NVRTC (see kernels_check.rs for the skip/require policy).

use std::collections::HashMap;

use onevision_cuda::compile::{ptx_signatures, Arch, Output, ParamKind};
use onevision_cuda::{compile_family, sources::FAMILIES, toolchain};

/// A launch found in the source: family, candidate kernel names, argument kinds, source line.
struct Found {
    family: String,
    names: Vec<String>,
    kinds: Vec<ParamKind>,
    line: usize,
}

fn matching_paren(s: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0i32;
    let mut in_str = false;
    for (i, &c) in s.iter().enumerate().skip(open) {
        match c {
            b'"' if i == 0 || s[i - 1] != b'\\' => in_str = !in_str,
            b'(' if !in_str => depth += 1,
            b')' if !in_str => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Kinds of an `Args::new().a(..).b(..)` chain starting at `start` (the 'A' of Args).
fn chain_kinds(src: &str, start: usize) -> Vec<ParamKind> {
    let b = src.as_bytes();
    let mut i = start + "Args::new()".len();
    let mut kinds = Vec::new();
    loop {
        while i < b.len() && (b[i] as char).is_whitespace() {
            i += 1;
        }
        if i >= b.len() || b[i] != b'.' {
            return kinds;
        }
        let name_start = i + 1;
        let mut j = name_start;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        let method = &src[name_start..j];
        if j >= b.len() || b[j] != b'(' {
            return kinds;
        }
        kinds.push(match method {
            "i32" => ParamKind::Word32,
            "f32" => ParamKind::Float32,
            "ptr" | "null" | "opt" | "i64" | "u64" => ParamKind::Word64,
            other => panic!("unknown Args method .{other}()"),
        });
        i = matching_paren(b, j).expect("unbalanced parens") + 1;
    }
}

fn string_literals(s: &str) -> Vec<String> {
    s.split('"').skip(1).step_by(2).map(str::to_string).collect()
}

fn launches(src: &str) -> Vec<Found> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    for (pos, _) in src.match_indices(".launch(") {
        let open = pos + ".launch".len();
        let close = matching_paren(b, open).expect("launch(...)");
        let call = &src[open + 1..close];
        let line = src[..pos].lines().count();
        // First two arguments: family literal, then a literal name or a variable bound just above.
        let lits = string_literals(call.split(',').next().unwrap_or(""));
        let Some(family) = lits.first().cloned() else { continue }; // the generic wrapper itself
        let second = call.split(',').nth(1).unwrap_or("").trim().to_string();
        let names = if second.starts_with('"') {
            string_literals(&second)
        } else {
            let binding = format!("let {second} = ");
            let at = src[..pos].rfind(&binding).unwrap_or_else(|| panic!("line {line}: no `{binding}` before launch"));
            let end = src[at..].find(';').map(|e| at + e).expect("let ... ;");
            string_literals(&src[at..end])
        };
        // Arguments: an inline chain, or `args` built by the nearest `let args = Args::new()`.
        let kinds = if let Some(rel) = call.find("Args::new()") {
            chain_kinds(src, open + 1 + rel)
        } else {
            let at = src[..pos].rfind("let args = Args::new()").unwrap_or_else(|| panic!("line {line}: no args chain"));
            chain_kinds(src, at + "let args = ".len())
        };
        out.push(Found { family, names, kinds, line });
    }
    out
}

#[test]
fn host_launches_match_kernel_signatures() {
    if !toolchain::nvrtc_available() {
        let required = std::env::var("ONEVISION_REQUIRE_NVRTC").map(|v| v == "1").unwrap_or(false);
        assert!(!required, "ONEVISION_REQUIRE_NVRTC=1 but NVRTC is missing");
        eprintln!("SKIPPED host_launches_match_kernel_signatures: NVRTC not found (scripts/setup-cuda-compile)");
        return;
    }
    let arch = Arch::parse("sm_90").expect("arch");
    let mut sigs: HashMap<(String, String), Vec<ParamKind>> = HashMap::new();
    for k in FAMILIES {
        let ptx = compile_family(k, arch, Output::Ptx).unwrap_or_else(|e| panic!("{e}"));
        for (name, kinds) in ptx_signatures(&String::from_utf8_lossy(&ptx.bytes)) {
            sigs.insert((k.family.to_string(), name), kinds);
        }
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let mut checked = 0;
    for file in ["backend.rs", "ops.rs"] {
        let src = std::fs::read_to_string(format!("{dir}/{file}")).expect("read source");
        for f in launches(&src) {
            assert!(!f.names.is_empty(), "{file}:{}: no kernel name found", f.line);
            for name in &f.names {
                let want = sigs
                    .get(&(f.family.clone(), name.clone()))
                    .unwrap_or_else(|| panic!("{file}:{}: kernel {}::{name} does not exist", f.line, f.family));
                assert_eq!(&f.kinds, want, "{file}:{}: arguments of {}::{name}", f.line, f.family);
                checked += 1;
            }
        }
    }
    // Guard against the scanner silently finding nothing.
    assert!(checked >= 40, "only {checked} launches checked");
    eprintln!("checked {checked} kernel launches against their PTX signatures");
}
