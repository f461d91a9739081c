use base64::Engine;
use onevision_data::*;
use std::fs;
use std::path::Path;

// Minimal byte strings with real image magic numbers (the readers only sniff headers).
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDRfake-png-body";
const JPEG: &[u8] = b"\xFF\xD8\xFF\xE0\x00\x10JFIFfake-jpeg-body";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

#[test]
fn sharegpt_jsonl_messages_and_images() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("imgs")).unwrap();
    fs::write(d.path().join("imgs/a.png"), PNG).unwrap();
    fs::write(d.path().join("imgs/b.png"), PNG).unwrap();
    let rows = [
        r#"{"messages": [{"role": "user", "content": "<image>Compare with <image>"}, {"role": "assistant", "content": "<think>x</think><answer>A</answer>"}], "images": ["imgs/a.png", "imgs/b.png"]}"#,
        "",
        r#"{"id": 17, "system": "be brief", "messages": [{"role": "user", "content": "no image"}, {"role": "assistant", "content": "ok"}], "source": "synthetic"}"#,
    ];
    let p = write(d.path(), "sft.jsonl", &rows.join("\n"));
    let opts = ReadOptions {
        check_image_files: true,
        ..Default::default()
    };
    let ds = Dataset::open(&p, &opts).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(
        (ds.report.rows, ds.report.loaded, ds.report.skipped),
        (2, 2, 0)
    );
    let s = ds.get(0).unwrap();
    assert_eq!(s.id, "sft:1");
    assert_eq!(
        s.images,
        vec![
            ImageSource::Path(d.path().join("imgs/a.png")),
            ImageSource::Path(d.path().join("imgs/b.png"))
        ]
    );
    assert_eq!(s.messages[1].role, "assistant");
    assert_eq!(s.placeholder_count(), 2);
    let s = ds.get(1).unwrap();
    assert_eq!(s.id, "17");
    assert_eq!(
        s.messages[0],
        Message {
            role: "system".into(),
            content: "be brief".into()
        }
    );
    assert_eq!(s.meta, serde_json::json!({"source": "synthetic"}));
    assert!(s.images.is_empty());
    assert!(matches!(
        ds.get(2),
        Err(DataError::Index { index: 2, len: 2 })
    ));
    assert_eq!(
        ds.size_hint(1),
        Some(("be brief".len() + "no image".len() + 2, 0))
    );

    // Same rows as a JSON array.
    let arr = format!("[{}, {}]", rows[0], rows[2]);
    let p = write(d.path(), "sft.json", &arr);
    let ds2 = Dataset::open(&p, &opts).unwrap();
    assert_eq!(ds2.get(0).unwrap().messages, ds.get(0).unwrap().messages);
}

#[test]
fn bad_rows_fail_with_file_and_row_or_are_skipped() {
    let d = tempfile::tempdir().unwrap();
    let rows = [
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
        r#"{"messages": [{"role": "user", "content": "<image><image>"}], "images": ["a.png"]}"#,
        r#"{"messages": [{"role": "user", "content": "x"}"#,
        r#"{"messages": [{"role": "tool", "content": "x"}]}"#,
        r#"{"messages": [{"role": "user", "content": "<image>"}], "images": ["missing.png"]}"#,
        r#"[1, 2]"#,
        r#"{"messages": [{"role": "assistant", "content": "only me"}]}"#,
    ];
    fs::write(d.path().join("a.png"), PNG).unwrap();
    let p = write(d.path(), "bad.jsonl", &rows.join("\n"));
    let strict = ReadOptions {
        check_image_files: true,
        ..Default::default()
    };
    let e = Dataset::open(&p, &strict).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DataError::Row { row: 2, .. }), "{msg}");
    assert!(
        msg.contains("bad.jsonl")
            && msg.contains("row 2")
            && msg.contains("2 `<image>` placeholder(s) but 1 image(s)"),
        "{msg}"
    );

    let lenient = ReadOptions {
        on_bad_row: OnBadRow::Skip,
        check_image_files: true,
        ..Default::default()
    };
    let ds = Dataset::open(&p, &lenient).unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!((ds.report.rows, ds.report.skipped), (7, 6));
    let rows_failed: Vec<usize> = ds
        .report
        .errors
        .iter()
        .map(|e| match e {
            DataError::Row { row, .. } => *row,
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(rows_failed, vec![2, 3, 4, 5, 6, 7]);
    let texts: Vec<String> = ds.report.errors.iter().map(|e| e.to_string()).collect();
    assert!(texts[1].contains("invalid JSON"), "{}", texts[1]);
    assert!(
        texts[2].contains("unsupported role \"tool\""),
        "{}",
        texts[2]
    );
    assert!(texts[3].contains("image file not found"), "{}", texts[3]);
    assert!(texts[4].contains("JSON object"), "{}", texts[4]);
    assert!(texts[5].contains("no user turn"), "{}", texts[5]);

    // A JSON file that is not an array, and unknown extensions / parquet.
    let p = write(d.path(), "x.json", "{\"a\": 1}");
    assert!(Dataset::open(&p, &lenient)
        .unwrap_err()
        .to_string()
        .contains("not a JSON array"));
    let p = write(d.path(), "x.csv", "");
    assert!(Dataset::open(&p, &lenient)
        .unwrap_err()
        .to_string()
        .contains("unknown data file extension"));
    assert!(matches!(
        Dataset::open(d.path().join("nope.jsonl"), &lenient),
        Err(DataError::Io { .. })
    ));
}

#[test]
fn r1_onevision_rows() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("pic.jpg"), JPEG).unwrap();
    let rows = [
        // base64 (JPEG base64 starts with "/9j/", which must not be taken for a path)
        format!(
            r#"{{"id": "r1-0", "image": "{}", "conversations": [{{"from": "human", "value": "<image>\nWhat is x?"}}, {{"from": "gpt", "value": "<think>t</think> x = 2"}}]}}"#,
            b64(JPEG)
        ),
        // path; no placeholder → prepended
        r#"{"id": "r1-1", "image": "pic.jpg", "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A cat."}]}"#.to_string(),
        // data URL and HF Image object with base64 bytes
        format!(
            r#"{{"id": "r1-2", "image": "data:image/png;base64,{}", "conversations": [{{"from": "human", "value": "<image>q"}}, {{"from": "gpt", "value": "a"}}]}}"#,
            b64(PNG)
        ),
        format!(
            r#"{{"id": "r1-3", "image": {{"bytes": "{}", "path": null}}, "conversations": [{{"from": "human", "value": "<image>q"}}, {{"from": "gpt", "value": "a"}}]}}"#,
            b64(PNG)
        ),
        r#"{"id": "r1-4", "image": {"bytes": [137, 80, 78, 71], "path": "ignored.png"}, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#.to_string(),
        r#"{"id": "r1-5", "image": null, "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "a"}]}"#.to_string(),
    ];
    let p = write(d.path(), "r1.jsonl", &rows.join("\n"));
    let ds = Dataset::open(
        &p,
        &ReadOptions {
            check_image_files: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.len(), 6);
    let s0 = ds.get(0).unwrap();
    assert_eq!(s0.images, vec![ImageSource::Bytes(JPEG.to_vec())]);
    assert_eq!(s0.messages[0].role, "user");
    assert_eq!(s0.messages[1].role, "assistant");
    let s1 = ds.get(1).unwrap();
    assert_eq!(s1.images, vec![ImageSource::Path(d.path().join("pic.jpg"))]);
    assert_eq!(s1.messages[0].content, "<image>\nDescribe.");
    assert_eq!(
        ds.get(2).unwrap().images,
        vec![ImageSource::Bytes(PNG.to_vec())]
    );
    assert_eq!(
        ds.get(3).unwrap().images,
        vec![ImageSource::Bytes(PNG.to_vec())]
    );
    assert_eq!(
        ds.get(4).unwrap().images,
        vec![ImageSource::Bytes(b"\x89PNG".to_vec())]
    );
    assert!(ds.get(5).unwrap().images.is_empty());

    // Explicit format mismatching the row is a clear row error.
    let opts = ReadOptions {
        format: RowFormat::Sharegpt,
        ..Default::default()
    };
    assert!(Dataset::open(&p, &opts)
        .unwrap_err()
        .to_string()
        .contains("missing `messages`"));
}

#[test]
fn grpo_prompt_rows() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("c.png"), PNG).unwrap();
    let rows = [
        r#"{"image": "c.png", "problem": "How many cubes?", "solution": "<answer> 3 </answer>"}"#,
        r#"{"question": "<image>Which?", "answer": "C", "image": "c.png", "level": "hard"}"#,
        r#"{"prompt": "2+2?", "ground_truth": 4}"#,
    ];
    let p = write(d.path(), "grpo.jsonl", &rows.join("\n"));
    let ds = Dataset::open(&p, &ReadOptions::default()).unwrap();
    let s = ds.get(0).unwrap();
    assert_eq!(
        s.messages,
        vec![Message {
            role: "user".into(),
            content: "<image>\nHow many cubes?".into()
        }]
    );
    assert_eq!(s.answer.as_deref(), Some("<answer> 3 </answer>"));
    let s = ds.get(1).unwrap();
    assert_eq!(s.messages[0].content, "<image>Which?");
    assert_eq!(s.answer.as_deref(), Some("C"));
    assert_eq!(s.meta, serde_json::json!({"level": "hard"}));
    let s = ds.get(2).unwrap();
    assert_eq!(s.answer.as_deref(), Some("4"));
    assert!(s.images.is_empty());
}

#[test]
fn bench_tsv() {
    let d = tempfile::tempdir().unwrap();
    // pandas-style quoting: a question with a tab and a newline, quotes doubled.
    let tsv = format!(
        "index\timage\tquestion\tchoices\tanswer\tlevel\tcategory\n\
         0\t{png}\t\"Which \"\"shape\"\"?\tline two\nmore\"\t[\"A. circle\", \"B. square\"]\tB\tHigh School\tMath\n\
         1\t0\tSame picture, other question\t\t12\tCollege\tPhysics\n\
         2\tnot-base64!!\tbroken\t\tA\tCollege\tMath\n\
         3\t99\tdangling reference\t\tA\tCollege\tMath\n",
        png = b64(PNG)
    );
    let p = write(d.path(), "bench.tsv", &tsv);
    let e = Dataset::open(&p, &ReadOptions::default()).unwrap_err();
    assert!(
        matches!(e, DataError::Row { row: 3, .. }) && e.to_string().contains("base64"),
        "{e}"
    );
    let opts = ReadOptions {
        on_bad_row: OnBadRow::Skip,
        instruction: Some(R1_EVAL_PROMPT.into()),
        ..Default::default()
    };
    let ds = Dataset::open(&p, &opts).unwrap();
    assert_eq!((ds.len(), ds.report.skipped), (2, 2));
    assert!(ds.report.errors[1].to_string().contains("index 99"));
    let s = ds.get(0).unwrap();
    assert_eq!(s.id, "0");
    assert_eq!(
        s.messages[0].content,
        format!(
            "<image>\nWhich \"shape\"?\tline two\nmore\nA. circle\nB. square\n{R1_EVAL_PROMPT}"
        )
    );
    assert_eq!(s.answer.as_deref(), Some("B"));
    assert_eq!(s.images, vec![ImageSource::Bytes(PNG.to_vec())]);
    assert_eq!(s.meta["level"], "High School");
    assert_eq!(s.meta["category"], "Math");
    let s = ds.get(1).unwrap();
    assert_eq!(s.images, vec![ImageSource::Bytes(PNG.to_vec())]); // resolved reference
    assert_eq!(
        s.messages[0].content,
        format!("<image>\nSame picture, other question\n{R1_EVAL_PROMPT}")
    );

    let p = write(d.path(), "nocol.tsv", "index\tquestion\n0\tq\n");
    assert!(Dataset::open(&p, &opts)
        .unwrap_err()
        .to_string()
        .contains("missing column `image`"));
}

#[test]
fn open_many_and_lengths() {
    let d = tempfile::tempdir().unwrap();
    let a = write(d.path(), "a.jsonl", r#"{"prompt": "abcd", "answer": "1"}"#);
    let b = write(
        d.path(),
        "b.json",
        r#"[{"prompt": "abcdefgh", "answer": "2", "image": null}]"#,
    );
    let ds = Dataset::open_many(&[a, b], &ReadOptions::default()).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.estimated_lengths(4.0, 100), vec![1, 2]);
    assert_eq!(ds.get(1).unwrap().answer.as_deref(), Some("2"));
    let from = Dataset::from_samples(vec![ds.get(0).unwrap()]);
    assert_eq!(from.get(0).unwrap(), ds.get(0).unwrap());
}

#[test]
fn r1_onevision_parquet() {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    // The HF layout: id, an Image struct {bytes, path}, conversations list<struct<from, value>>.
    let schema = Arc::new(
        parse_message_type(
            "message schema {
                REQUIRED BINARY id (UTF8);
                OPTIONAL group image { OPTIONAL BINARY bytes; OPTIONAL BINARY path (UTF8); }
                OPTIONAL group conversations (LIST) {
                    REPEATED group list { OPTIONAL group element { OPTIONAL BINARY from (UTF8); OPTIONAL BINARY value (UTF8); } }
                }
            }",
        )
        .unwrap(),
    );
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("train-00000.parquet");
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut w = SerializedFileWriter::new(fs::File::create(&path).unwrap(), schema, props).unwrap();
    let ba = |s: &[u8]| ByteArray::from(s.to_vec());
    // (values, definition levels, repetition levels) per leaf column, in schema order.
    let turns_rep = vec![0i16, 1, 0, 1, 0, 1];
    type Column = (Vec<ByteArray>, Option<Vec<i16>>, Option<Vec<i16>>);
    let columns: Vec<Column> = vec![
        (vec![ba(b"p0"), ba(b"p1"), ba(b"p2")], None, None),
        (vec![ba(PNG), ba(PNG)], Some(vec![2, 1, 2]), None),
        (vec![ba(b"x.png")], Some(vec![1, 2, 1]), None),
        (
            ["human", "gpt", "human", "gpt", "tool", "gpt"]
                .iter()
                .map(|s| ba(s.as_bytes()))
                .collect(),
            Some(vec![4; 6]),
            Some(turns_rep.clone()),
        ),
        (
            [
                "<image>\nWhat is shown?",
                "A chart.",
                "Q2",
                "A2",
                "Q3",
                "A3",
            ]
            .iter()
            .map(|s| ba(s.as_bytes()))
            .collect(),
            Some(vec![4; 6]),
            Some(turns_rep),
        ),
    ];
    let mut rg = w.next_row_group().unwrap();
    let mut k = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        let (vals, def, rep) = &columns[k];
        col.typed::<ByteArrayType>()
            .write_batch(vals, def.as_deref(), rep.as_deref())
            .unwrap();
        col.close().unwrap();
        k += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();

    let e = Dataset::open(&path, &ReadOptions::default()).unwrap_err();
    assert!(
        matches!(e, DataError::Row { row: 3, .. }) && e.to_string().contains("\"tool\""),
        "{e}"
    );
    let ds = Dataset::open(
        &path,
        &ReadOptions {
            on_bad_row: OnBadRow::Skip,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((ds.len(), ds.report.skipped), (2, 1));
    let s = ds.get(0).unwrap();
    assert_eq!(s.id, "p0");
    assert_eq!(s.images, vec![ImageSource::Bytes(PNG.to_vec())]);
    assert_eq!(
        s.messages,
        vec![
            Message {
                role: "user".into(),
                content: "<image>\nWhat is shown?".into()
            },
            Message {
                role: "assistant".into(),
                content: "A chart.".into()
            },
        ]
    );
    let s = ds.get(1).unwrap();
    assert_eq!(s.images, vec![ImageSource::Path(d.path().join("x.png"))]);
    assert_eq!(s.messages[0].content, "<image>\nQ2");

    let junk = write(d.path(), "junk.parquet", "not parquet");
    assert!(Dataset::open(&junk, &ReadOptions::default())
        .unwrap_err()
        .to_string()
        .contains("not a readable parquet file"));
}

#[test]
fn prompt_messages_drop_the_last_answer() {
    let m = |r: &str, c: &str| Message {
        role: r.into(),
        content: c.into(),
    };
    let s = Sample {
        id: "x".into(),
        messages: vec![
            m("system", "s"),
            m("user", "q1"),
            m("assistant", "a1"),
            m("user", "q2"),
            m("assistant", "a2"),
        ],
        images: vec![],
        answer: None,
        meta: serde_json::Value::Null,
    };
    assert_eq!(s.prompt_messages(), &s.messages[..4]);
    let q = Sample {
        messages: vec![m("user", "q")],
        ..s.clone()
    };
    assert_eq!(q.prompt_messages(), &q.messages[..]);
}

#[test]
fn grad_cli_rows_keep_group_completion_reward_in_meta() {
    // The `onevision grad --objective grpo` row layout (issue 4's CLI contract).
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "grpo_grad.jsonl",
        r#"{"group": "g0", "messages": [{"role": "user", "content": "<image>How many?"}], "images": ["a.png"], "completion": "<think>t</think><answer>3</answer>", "reward": 1.0}"#,
    );
    let s = Dataset::open(&p, &ReadOptions::default()).unwrap().get(0).unwrap();
    assert_eq!(s.meta["group"], "g0");
    assert_eq!(s.meta["completion"], "<think>t</think><answer>3</answer>");
    assert_eq!(s.meta["reward"], 1.0);
    assert_eq!(s.images, vec![ImageSource::Path(d.path().join("a.png"))]);
    assert_eq!(s.prompt_messages().len(), 1);
}
