//! Opening data files into an indexable [`Dataset`].

use crate::rows::{parse_row, RowCtx};
use crate::{DataError, LoadReport, ReadOptions, Sample};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug)]
struct JsonlFile {
    path: PathBuf,
    ctx: RowCtx,
    stem: String,
}

#[derive(Debug)]
enum Entry {
    Ready(Box<Sample>),
    /// A validated JSONL line, re-read on access.
    Line {
        file: Arc<JsonlFile>,
        offset: u64,
        len: usize,
        row: usize,
    },
}

/// Samples from one or more files. JSONL rows are validated at open and re-read on access; JSON
/// arrays and TSV files are held in memory.
#[derive(Debug, Default)]
pub struct Dataset {
    entries: Vec<Entry>,
    /// Per sample: (message characters, image count), for length bucketing before tokenisation.
    sizes: Vec<(usize, usize)>,
    pub report: LoadReport,
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn ctx_for(path: &Path, opts: &ReadOptions) -> RowCtx {
    let image_root = opts
        .image_root
        .clone()
        .unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    RowCtx {
        image_root,
        check_image_files: opts.check_image_files,
        format: opts.format,
    }
}

impl Dataset {
    /// Open a `.jsonl`, `.json` (array of rows) or `.tsv` (R1-Onevision-Bench) file.
    pub fn open(path: impl AsRef<Path>, opts: &ReadOptions) -> Result<Self, DataError> {
        let mut d = Dataset::default();
        d.add_file(path.as_ref(), opts)?;
        Ok(d)
    }

    /// Open several files as one dataset, in order.
    pub fn open_many<P: AsRef<Path>>(paths: &[P], opts: &ReadOptions) -> Result<Self, DataError> {
        let mut d = Dataset::default();
        for p in paths {
            d.add_file(p.as_ref(), opts)?;
        }
        Ok(d)
    }

    pub fn from_samples(samples: Vec<Sample>) -> Self {
        let sizes = samples
            .iter()
            .map(|s| (s.text_chars(), s.images.len()))
            .collect();
        let n = samples.len();
        Self {
            entries: samples
                .into_iter()
                .map(|s| Entry::Ready(Box::new(s)))
                .collect(),
            sizes,
            report: LoadReport {
                rows: n,
                loaded: n,
                ..Default::default()
            },
        }
    }

    fn push(&mut self, e: Entry, s: &Sample) {
        self.sizes.push((s.text_chars(), s.images.len()));
        self.entries.push(e);
    }

    fn add_file(&mut self, path: &Path, opts: &ReadOptions) -> Result<(), DataError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" => self.add_jsonl(path, opts),
            "json" => self.add_json(path, opts),
            "tsv" => {
                let (samples, report) = crate::bench::read_bench_tsv(path, opts)?;
                for s in samples {
                    let e = Entry::Ready(Box::new(s.clone()));
                    self.push(e, &s);
                }
                self.report.merge(report);
                Ok(())
            }
            "parquet" => self.add_parquet(path, opts),
            other => Err(DataError::File {
                file: path.to_path_buf(),
                msg: format!("unknown data file extension {other:?}; expected .jsonl, .json, .parquet or .tsv"),
            }),
        }
    }

    fn add_json(&mut self, path: &Path, opts: &ReadOptions) -> Result<(), DataError> {
        let text = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let rows: Vec<serde_json::Value> =
            serde_json::from_slice(&text).map_err(|e| DataError::File {
                file: path.to_path_buf(),
                msg: format!("not a JSON array of rows: {e} (use .jsonl for one row per line)"),
            })?;
        let ctx = ctx_for(path, opts);
        let st = stem(path);
        let mut report = LoadReport::default();
        for (i, v) in rows.iter().enumerate() {
            report.rows += 1;
            match parse_row(v, &ctx, &format!("{st}:{}", i + 1)) {
                Ok(s) => {
                    report.loaded += 1;
                    let e = Entry::Ready(Box::new(s.clone()));
                    self.push(e, &s);
                }
                Err(msg) => report.bad(
                    opts.on_bad_row,
                    DataError::Row {
                        file: path.to_path_buf(),
                        row: i + 1,
                        msg,
                    },
                )?,
            }
        }
        self.report.merge(report);
        Ok(())
    }

    /// Parquet rows (e.g. the R1-Onevision shards) through the record API: each row becomes JSON
    /// (binary columns as base64, so an HF Image struct arrives as `{bytes, path}`) and then the same
    /// row parser as JSON. Held in memory, like JSON arrays.
    fn add_parquet(&mut self, path: &Path, opts: &ReadOptions) -> Result<(), DataError> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let file_err = |msg: String| DataError::File {
            file: path.to_path_buf(),
            msg,
        };
        let f = File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let reader = SerializedFileReader::new(f)
            .map_err(|e| file_err(format!("not a readable parquet file: {e}")))?;
        let rows = reader
            .get_row_iter(None)
            .map_err(|e| file_err(e.to_string()))?;
        let ctx = ctx_for(path, opts);
        let st = stem(path);
        let mut report = LoadReport::default();
        for (i, row) in rows.enumerate() {
            report.rows += 1;
            let parsed = row
                .map_err(|e| format!("cannot decode row: {e}"))
                .and_then(|r| parse_row(&r.to_json_value(), &ctx, &format!("{st}:{}", i + 1)));
            match parsed {
                Ok(s) => {
                    report.loaded += 1;
                    let e = Entry::Ready(Box::new(s.clone()));
                    self.push(e, &s);
                }
                Err(msg) => report.bad(
                    opts.on_bad_row,
                    DataError::Row {
                        file: path.to_path_buf(),
                        row: i + 1,
                        msg,
                    },
                )?,
            }
        }
        self.report.merge(report);
        Ok(())
    }

    fn add_jsonl(&mut self, path: &Path, opts: &ReadOptions) -> Result<(), DataError> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut r = BufReader::new(File::open(path).map_err(io)?);
        let file = Arc::new(JsonlFile {
            path: path.to_path_buf(),
            ctx: ctx_for(path, opts),
            stem: stem(path),
        });
        let mut report = LoadReport::default();
        let mut offset = 0u64;
        let mut buf = Vec::new();
        let mut row = 0usize;
        loop {
            buf.clear();
            let n = r.read_until(b'\n', &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            row += 1;
            let start = offset;
            offset += n as u64;
            if buf.iter().all(|b| b.is_ascii_whitespace()) {
                continue; // blank lines are not rows
            }
            report.rows += 1;
            match parse_line(&buf, &file, row) {
                Ok(s) => {
                    report.loaded += 1;
                    self.push(
                        Entry::Line {
                            file: file.clone(),
                            offset: start,
                            len: n,
                            row,
                        },
                        &s,
                    );
                }
                Err(e) => report.bad(opts.on_bad_row, e)?,
            }
        }
        self.report.merge(report);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sample `index`. JSONL rows are re-read; an error here means the file changed since opening.
    pub fn get(&self, index: usize) -> Result<Sample, DataError> {
        match self.entries.get(index) {
            None => Err(DataError::Index {
                index,
                len: self.entries.len(),
            }),
            Some(Entry::Ready(s)) => Ok((**s).clone()),
            Some(Entry::Line {
                file,
                offset,
                len,
                row,
            }) => {
                let io = |source| DataError::Io {
                    path: file.path.clone(),
                    source,
                };
                let mut f = File::open(&file.path).map_err(io)?;
                f.seek(SeekFrom::Start(*offset)).map_err(io)?;
                let mut buf = vec![0u8; *len];
                f.read_exact(&mut buf).map_err(io)?;
                parse_line(&buf, file, *row).map_err(|e| match e {
                    DataError::Row { file, row, msg } => DataError::Row {
                        file,
                        row,
                        msg: format!("{msg} (the file changed after it was opened?)"),
                    },
                    other => other,
                })
            }
        }
    }

    /// (message characters, image count) of sample `index`, without re-reading it.
    pub fn size_hint(&self, index: usize) -> Option<(usize, usize)> {
        self.sizes.get(index).copied()
    }

    /// A length estimate per sample for [`crate::Batching::ByTokens`]: characters /
    /// `chars_per_token` plus `tokens_per_image` per image.
    pub fn estimated_lengths(&self, chars_per_token: f64, tokens_per_image: usize) -> Vec<usize> {
        let cpt = if chars_per_token > 0.0 {
            chars_per_token
        } else {
            1.0
        };
        self.sizes
            .iter()
            .map(|(c, i)| (*c as f64 / cpt).ceil() as usize + i * tokens_per_image)
            .collect()
    }

    /// Whether a bad-row policy skipped anything.
    pub fn skipped(&self) -> usize {
        self.report.skipped
    }
}

fn parse_line(buf: &[u8], file: &JsonlFile, row: usize) -> Result<Sample, DataError> {
    let err = |msg: String| DataError::Row {
        file: file.path.clone(),
        row,
        msg,
    };
    let v: serde_json::Value =
        serde_json::from_slice(buf).map_err(|e| err(format!("invalid JSON: {e}")))?;
    parse_row(&v, &file.ctx, &format!("{}:{row}", file.stem)).map_err(err)
}
