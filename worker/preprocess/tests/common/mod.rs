//! Test helpers: fixture paths and a minimal `.npy` (v1.0, little-endian, C order) reader.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/reference/fixtures")
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(Debug)]
pub struct Npy {
    pub descr: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Npy {
    pub fn f32(&self) -> Vec<f32> {
        assert_eq!(self.descr, "<f4");
        self.data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }
    pub fn i64(&self) -> Vec<i64> {
        assert_eq!(self.descr, "<i8");
        self.data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    }
    pub fn u8(&self) -> Vec<u8> {
        assert_eq!(self.descr, "|u1");
        self.data.clone()
    }
}

pub fn read_npy(path: &Path) -> Npy {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: not an npy file", path.display());
    assert_eq!(bytes[6], 1, "{}: only npy v1.0 is expected", path.display());
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    let field = |key: &str| -> &str {
        let start = header.find(&format!("'{key}':")).unwrap() + key.len() + 3;
        header[start..].trim_start()
    };
    let descr = field("descr");
    let descr = descr[1..].split('\'').next().unwrap().to_owned();
    assert!(field("fortran_order").starts_with("False"));
    let shape_src = field("shape");
    let shape_src = &shape_src[1..shape_src.find(')').unwrap()];
    let shape: Vec<usize> =
        shape_src.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let data = bytes[10 + hlen..].to_vec();
    let item = match descr.as_str() {
        "<f4" => 4,
        "<i8" => 8,
        "|u1" => 1,
        other => panic!("unexpected dtype {other}"),
    };
    assert_eq!(data.len(), shape.iter().product::<usize>() * item, "{}: size", path.display());
    Npy { descr, shape, data }
}

/// Largest |a - b| over two equal-length slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
