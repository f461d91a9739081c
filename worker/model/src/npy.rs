//! Minimal `.npy` v1/v2 reader and f32 writer (little-endian, C order): test fixtures and the
//! CLI's `--dump-first-logits`.
use crate::error::{ModelError, Result};
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    U8(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Npy {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

fn bad(path: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Invalid(format!("{path}: not a supported .npy file: {}", msg.into()))
}

impl Npy {
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let p = path.as_ref();
        let bytes = std::fs::read(p).map_err(|e| ModelError::Io { path: p.display().to_string(), source: e })?;
        Self::parse(&bytes, &p.display().to_string())
    }

    pub fn parse(b: &[u8], path: &str) -> Result<Self> {
        if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
            return Err(bad(path, "missing magic"));
        }
        let (hlen, start) = match b[6] {
            1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
            2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
            v => return Err(bad(path, format!("version {v}"))),
        };
        let header = std::str::from_utf8(b.get(start..start + hlen).ok_or_else(|| bad(path, "truncated header"))?).map_err(|_| bad(path, "header not UTF-8"))?;
        let field = |k: &str| -> Option<&str> {
            let i = header.find(&format!("'{k}'"))? + k.len() + 2;
            Some(header[i..].trim_start().trim_start_matches(':').trim_start())
        };
        let descr = field("descr").and_then(|s| s.strip_prefix('\'')).and_then(|s| s.split('\'').next()).ok_or_else(|| bad(path, "no descr"))?;
        if field("fortran_order").is_some_and(|s| s.starts_with("True")) {
            return Err(bad(path, "Fortran order"));
        }
        let sh = field("shape").and_then(|s| s.strip_prefix('(')).and_then(|s| s.split(')').next()).ok_or_else(|| bad(path, "no shape"))?;
        let shape = sh.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse::<usize>()).collect::<std::result::Result<Vec<_>, _>>().map_err(|_| bad(path, "bad shape"))?;
        let n: usize = shape.iter().product();
        let body = &b[start + hlen..];
        macro_rules! take {
            ($t:ty, $w:expr, $v:ident) => {{
                if body.len() < n * $w {
                    return Err(bad(path, format!("{} data bytes for {n} values", body.len())));
                }
                NpyData::$v(body[..n * $w].chunks_exact($w).map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk width"))).collect())
            }};
        }
        let data = match descr {
            "<f4" => take!(f32, 4, F32),
            "<f8" => take!(f64, 8, F64),
            "<i8" => take!(i64, 8, I64),
            "<i4" => take!(i32, 4, I32),
            "|u1" | "<u1" => NpyData::U8(body.get(..n).ok_or_else(|| bad(path, "truncated data"))?.to_vec()),
            d => return Err(bad(path, format!("dtype {d}"))),
        };
        Ok(Npy { shape, data })
    }

    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            NpyData::F32(v) => v.clone(),
            NpyData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::U8(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    pub fn to_i64(&self) -> Vec<i64> {
        match &self.data {
            NpyData::F32(v) => v.iter().map(|&x| x as i64).collect(),
            NpyData::F64(v) => v.iter().map(|&x| x as i64).collect(),
            NpyData::I64(v) => v.clone(),
            NpyData::I32(v) => v.iter().map(|&x| x as i64).collect(),
            NpyData::U8(v) => v.iter().map(|&x| x as i64).collect(),
        }
    }
}

/// Write a float32 array as `.npy` v1.0.
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let p = path.as_ref();
    if shape.iter().product::<usize>() != data.len() {
        return Err(ModelError::Invalid(format!("npy write: shape {shape:?} does not hold {} values", data.len())));
    }
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let sh = if shape.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {sh}, }}");
    // Pad so that magic(6)+version(2)+len(2)+header ends on a 64-byte boundary with '\n'.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(p, out).map_err(|e| ModelError::Io { path: p.display().to_string(), source: e })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_f32() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        write_f32(&p, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]).unwrap();
        let n = Npy::read(&p).unwrap();
        assert_eq!(n.shape, vec![2, 3]);
        assert_eq!(n.data, NpyData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]));
        assert!(Npy::parse(b"garbage!!!!!", "x").is_err());
    }
}
