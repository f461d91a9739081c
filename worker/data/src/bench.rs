//! R1-Onevision-Bench TSV (VLMEvalKit layout): `index, image (base64), question, choices, answer,
//! level, category` plus any other columns, tab separated with pandas-style quoting. As in
//! VLMEvalKit, an `image` cell holding only digits refers to the row with that `index` (a shared
//! image stored once).

use crate::rows::decode_base64;
use crate::{DataError, ImageSource, LoadReport, Message, ReadOptions, Sample, IMAGE_PLACEHOLDER};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::Path;

const REQUIRED: &[&str] = &["index", "image", "question", "answer"];

/// Render the choices cell: a JSON array becomes one option per line; anything else is kept as is.
fn render_choices(cell: &str) -> String {
    let t = cell.trim();
    if let Ok(Value::Array(a)) = serde_json::from_str::<Value>(t) {
        return a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect::<Vec<_>>()
            .join("\n");
    }
    t.to_string()
}

/// Read a benchmark TSV. The user turn is `<image>\n{question}\n{choices}` (+ `\n{instruction}`
/// when configured); `answer` holds the ground truth and `meta` every other column.
pub fn read_bench_tsv(
    path: &Path,
    opts: &ReadOptions,
) -> Result<(Vec<Sample>, LoadReport), DataError> {
    let file_err = |msg: String| DataError::File {
        file: path.to_path_buf(),
        msg,
    };
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .has_headers(true)
        .flexible(false)
        .from_path(path)
        .map_err(|e| file_err(e.to_string()))?;
    let headers: Vec<String> = rdr
        .headers()
        .map_err(|e| file_err(format!("bad header: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    for r in REQUIRED {
        if !headers.iter().any(|h| h == r) {
            return Err(file_err(format!(
                "missing column `{r}`; columns are {headers:?}"
            )));
        }
    }
    let col = |name: &str| headers.iter().position(|h| h == name);
    let (i_index, i_image, i_q, i_ans) = (
        col("index").unwrap_or(0),
        col("image").unwrap_or(0),
        col("question").unwrap_or(0),
        col("answer").unwrap_or(0),
    );
    let i_choices = col("choices");

    // First pass: raw records (a reference can point forward).
    let mut records = Vec::new();
    let mut report = LoadReport::default();
    for (k, rec) in rdr.records().enumerate() {
        let row = k + 1; // data rows, header excluded
        report.rows += 1;
        match rec {
            Ok(r) => records.push((row, r)),
            Err(e) => report.bad(
                opts.on_bad_row,
                DataError::Row {
                    file: path.to_path_buf(),
                    row,
                    msg: e.to_string(),
                },
            )?,
        }
    }
    let mut by_index: HashMap<String, usize> = HashMap::new();
    for (pos, (_, r)) in records.iter().enumerate() {
        by_index.entry(r[i_index].to_string()).or_insert(pos);
    }
    let mut samples = Vec::with_capacity(records.len());
    for (row, r) in &records {
        let result = (|| -> Result<Sample, String> {
            let mut cell = r[i_image].trim();
            if !cell.is_empty() && cell.len() < 16 && cell.bytes().all(|b| b.is_ascii_digit()) {
                let target = by_index.get(cell).ok_or_else(|| {
                    format!("image refers to index {cell}, which is not in the file")
                })?;
                cell = records[*target].1[i_image].trim();
                if cell.len() < 16 && cell.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!(
                        "image reference {cell} points at another reference"
                    ));
                }
            }
            let bytes = decode_base64(cell).ok_or("image is not valid base64")?;
            if bytes.is_empty() {
                return Err("image is empty".into());
            }
            let mut content = format!("{IMAGE_PLACEHOLDER}\n{}", r[i_q].trim());
            if let Some(c) = i_choices
                .map(|i| render_choices(&r[i]))
                .filter(|c| !c.is_empty())
            {
                content.push('\n');
                content.push_str(&c);
            }
            if let Some(ins) = &opts.instruction {
                content.push('\n');
                content.push_str(ins);
            }
            let mut meta = Map::new();
            for (h, v) in headers.iter().zip(r.iter()) {
                if !["image", "question", "answer"].contains(&h.as_str()) {
                    meta.insert(h.clone(), Value::String(v.to_string()));
                }
            }
            Ok(Sample {
                id: r[i_index].to_string(),
                messages: vec![Message {
                    role: "user".into(),
                    content,
                }],
                images: vec![ImageSource::Bytes(bytes)],
                answer: Some(r[i_ans].trim().to_string()),
                meta: Value::Object(meta),
            })
        })();
        match result {
            Ok(s) => {
                report.loaded += 1;
                samples.push(s);
            }
            Err(msg) => report.bad(
                opts.on_bad_row,
                DataError::Row {
                    file: path.to_path_buf(),
                    row: *row,
                    msg,
                },
            )?,
        }
    }
    Ok((samples, report))
}
