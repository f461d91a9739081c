use onevision_rewards::*;
use std::sync::Arc;
use std::time::Duration;

#[test]
fn extraction_table() {
    let cases: &[(&str, Option<&str>)] = &[
        ("<think>x</think><answer> 42 </answer>", Some("42")),
        ("<answer>1</answer> then <answer>2</answer>", Some("2")),
        ("<answer>so \\boxed{7}</answer>", Some("7")),
        ("reasoning \\boxed{\\frac{1}{2}}", Some("\\frac{1}{2}")),
        (
            "\\boxed{a} and later \\boxed{\\sqrt{b^{2}}}",
            Some("\\sqrt{b^{2}}"),
        ),
        // Truncated final box: fall back to the last complete one.
        ("\\boxed{3} ... \\boxed{4", Some("3")),
        ("escaped \\boxed{\\{1,2\\}}", Some("\\{1,2\\}")),
        ("\\fbox{C}", Some("C")),
        ("\\boxed {5}", Some("5")),
        ("no answer here", None),
        ("<answer>multi\nline</answer>", Some("multi\nline")),
    ];
    for (text, want) in cases {
        assert_eq!(extract_answer(text), *want, "text {text:?}");
    }
}

#[test]
fn format_table() {
    use FormatStyle::*;
    let cases: &[(&str, FormatStyle, f64)] = &[
        ("<think>a</think><answer>b</answer>", AnswerTag, 1.0),
        (
            "<think>a\nb</think>\n\n<answer>c\nd</answer>",
            AnswerTag,
            1.0,
        ),
        ("<think>a</think> <answer>b</answer>\n", AnswerTag, 1.0),
        ("<think>a</think>text<answer>b</answer>", AnswerTag, 0.0),
        ("<answer>b</answer>", AnswerTag, 0.0),
        (
            "<think>a</think><answer>b</answer> trailing",
            AnswerTag,
            0.0,
        ),
        (
            "preamble <think>a</think><answer>b</answer>",
            AnswerTag,
            0.0,
        ),
        ("<think>a</think><answer>b", AnswerTag, 0.0),
        ("<think>a</think> so \\boxed{3}.", Boxed, 1.0),
        ("<think>a</think> so \\boxed{3", Boxed, 0.0),
        ("<think>a \\boxed{3}</think> done", Boxed, 0.0),
        ("<think>a</think><think>b</think>\\boxed{1}", Boxed, 0.0),
        ("<think>a</think> so \\boxed{3}.", AnswerTag, 0.0),
        ("<think>a</think> so \\boxed{3}.", Either, 1.0),
        ("<think>a</think><answer>b</answer>", Either, 1.0),
        ("just text", Either, 0.0),
    ];
    for (text, style, want) in cases {
        assert_eq!(format_score(text, *style), *want, "{text:?} {style:?}");
    }
}

#[test]
fn accuracy_table() {
    let cfg = AccuracyConfig::default();
    // (completion, ground truth, expected)
    let cases: &[(&str, &str, f64)] = &[
        // multiple choice
        ("<answer>C</answer>", "C", 1.0),
        ("<answer>C</answer>", "Answer: C", 1.0),
        ("<answer>(C)</answer>", "C", 1.0),
        ("<answer>C. 45 degrees</answer>", "C", 1.0),
        ("<answer>(C) 45</answer>", "(C)", 1.0),
        ("<answer>The answer is C</answer>", "C.", 1.0),
        ("<answer>Answer: C</answer>", "C", 1.0),
        ("<answer>\\text{C}</answer>", "C", 1.0),
        ("<answer>**B**</answer>", "Answer: B", 1.0),
        ("\\boxed{D}", "D", 1.0),
        ("<answer>B</answer>", "Answer: C", 0.0),
        ("<answer>A right angle</answer>", "A", 0.0),
        ("<answer>45</answer>", "C", 0.0),
        // numbers
        ("<answer>1,000</answer>", "1000", 1.0),
        ("<answer>1000</answer>", "1,000", 1.0),
        ("<answer>1,000,000.5</answer>", "1000000.5", 1.0),
        ("<answer>1/2</answer>", "0.5", 1.0),
        ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0),
        ("<answer>\\dfrac{3}{4}</answer>", "3/4", 1.0),
        ("<answer>-\\frac12</answer>", "-0.5", 1.0),
        ("<answer>50%</answer>", "0.5", 1.0),
        ("<answer>50\\%</answer>", "50", 1.0),
        ("<answer>0.5</answer>", "50%", 1.0),
        ("<answer>3 cm</answer>", "3", 1.0),
        ("<answer>3</answer>", "3 cm", 1.0),
        ("<answer>3\\text{ cm}</answer>", "3", 1.0),
        ("<answer>5 m/s</answer>", "5", 1.0),
        ("<answer>45^\\circ</answer>", "45", 1.0),
        ("<answer>45°</answer>", "45^{\\circ}", 1.0),
        ("<answer>x = 3</answer>", "3", 1.0),
        ("<answer>$3.0$</answer>", "3", 1.0),
        ("<answer>3.00001</answer>", "3", 1.0), // within 1e-4 relative
        ("<answer>3.01</answer>", "3", 0.0),
        ("<answer>0.33</answer>", "1/3", 0.0),
        ("<answer>−2</answer>", "-2", 1.0),
        ("<answer>2</answer>", "-2", 0.0),
        ("<answer>1.5 \\times 10^{3}</answer>", "1500", 1.0),
        ("<answer>12.</answer>", "12", 1.0),
        ("\\boxed{\\frac{1}{2}} final", "\\boxed{0.5}", 1.0),
        ("<answer>1/0</answer>", "0", 0.0),
        ("<answer>1,00</answer>", "100", 0.0), // not a thousands group
        // strings
        ("<answer>Paris</answer>", "paris", 1.0),
        ("<answer> x^2 + 1 </answer>", "x^2+1", 1.0),
        ("<answer>\\sqrt{2}</answer>", "$\\sqrt{2}$", 1.0),
        ("<answer>London</answer>", "Paris", 0.0),
        ("no answer at all", "3", 0.0),
        ("<answer></answer>", "", 0.0),
    ];
    for (c, gt, want) in cases {
        assert_eq!(
            accuracy_score(c, gt, &cfg),
            *want,
            "completion {c:?} vs gt {gt:?}"
        );
    }
}

#[test]
fn accuracy_tolerance_is_configurable() {
    let loose = AccuracyConfig {
        rel_tol: 0.02,
        abs_tol: 0.0,
    };
    assert_eq!(accuracy_score("<answer>0.33</answer>", "1/3", &loose), 1.0);
    assert_eq!(accuracy_score("<answer>0.30</answer>", "1/3", &loose), 0.0);
}

#[test]
fn iou_table() {
    let a = [0.0, 0.0, 10.0, 10.0];
    assert_eq!(iou(&a, &a), 1.0);
    // Half overlap: inter 50, union 150.
    assert!((iou(&a, &[5.0, 0.0, 15.0, 10.0]) - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(iou(&a, &[20.0, 20.0, 30.0, 30.0]), 0.0);
    assert_eq!(iou(&a, &[10.0, 0.0, 20.0, 10.0]), 0.0); // touching edge
    assert_eq!(iou(&[5.0, 5.0, 1.0, 1.0], &a), 0.0); // degenerate
                                                     // Contained: 25/100.
    assert!((iou(&a, &[0.0, 0.0, 5.0, 5.0]) - 0.25).abs() < 1e-12);

    let t = IouMode::Threshold(0.5);
    let cases: &[(&str, &str, IouMode, f64)] = &[
        ("<answer>[0, 0, 10, 10]</answer>", "[0,0,10,10]", t, 1.0),
        ("<answer>[0,0,10,10]</answer>", "[0,0,10,12]", t, 1.0), // IoU 0.833
        ("<answer>[5,0,15,10]</answer>", "[0,0,10,10]", t, 0.0), // 1/3
        (
            "<answer>[5,0,15,10]</answer>",
            "[0,0,10,10]",
            IouMode::Continuous,
            1.0 / 3.0,
        ),
        (
            "<answer>[0.0,0.0,1.5,1.5]</answer>",
            "[0,0,1.5,1.5]",
            t,
            1.0,
        ),
        ("<answer>no box</answer>", "[0,0,10,10]", t, 0.0),
        // Boxes outside the answer tag are ignored when a tag exists.
        (
            "<think>[0,0,10,10]</think><answer>[50,50,60,60]</answer>",
            "[0,0,10,10]",
            t,
            0.0,
        ),
        ("The box is [0,0,10,10].", "[0,0,10,10]", t, 1.0),
        // Several boxes: order does not matter.
        (
            "<answer>[20,20,30,30], [0,0,10,10]</answer>",
            "[[0,0,10,10],[20,20,30,30]]",
            t,
            1.0,
        ),
        // One of two found: 1/2.
        (
            "<answer>[0,0,10,10]</answer>",
            "[[0,0,10,10],[20,20,30,30]]",
            t,
            0.5,
        ),
        // An extra wrong box costs: 1/2.
        (
            "<answer>[0,0,10,10] [50,50,60,60]</answer>",
            "[0,0,10,10]",
            t,
            0.5,
        ),
        // Greedy one-to-one: two predictions of the same box only match once.
        (
            "<answer>[0,0,10,10] [0,0,10,10]</answer>",
            "[[0,0,10,10],[20,20,30,30]]",
            t,
            0.5,
        ),
    ];
    for (c, gt, mode, want) in cases {
        let got = iou_score(c, gt, *mode);
        assert!(
            (got - want).abs() < 1e-12,
            "{c:?} vs {gt:?}: got {got}, want {want}"
        );
    }
}

fn req(completion: &str, answer: &str) -> RewardRequest {
    RewardRequest {
        completion: completion.into(),
        answer: Some(answer.into()),
        ..Default::default()
    }
}

#[test]
fn weighted_sum_by_name() {
    let specs: Vec<RewardSpec> =
        serde_json::from_str(r#"[{"name": "accuracy", "weight": 2.0}, {"name": "format"}]"#)
            .unwrap();
    let w = WeightedReward::from_specs(&specs, &RewardRegistry::builtin()).unwrap();
    let batch = vec![
        req("<think>t</think><answer>5</answer>", "5"),
        req("<think>t</think><answer>4</answer>", "5"),
        req("<answer>5</answer>", "5"),
        req("garbage", "5"),
    ];
    let s = w.score(&batch).unwrap();
    assert_eq!(s.total, vec![3.0, 1.0, 2.0, 0.0]);
    assert_eq!(
        s.components[0],
        ("accuracy".to_string(), vec![1.0, 0.0, 1.0, 0.0])
    );
    assert_eq!(
        s.components[1],
        ("format".to_string(), vec![1.0, 1.0, 0.0, 0.0])
    );
}

#[test]
fn weighted_spec_errors() {
    let reg = RewardRegistry::builtin();
    let spec = |n: &str, w: f64| RewardSpec {
        name: n.into(),
        weight: w,
    };
    let err = WeightedReward::from_specs(&[spec("acuracy", 1.0)], &reg)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("acuracy") && err.to_string().contains("accuracy, format, iou"),
        "{err}"
    );
    assert!(matches!(
        WeightedReward::from_specs(&[], &reg),
        Err(RewardError::Empty)
    ));
    assert!(matches!(
        WeightedReward::from_specs(&[spec("format", 1.0), spec("format", 2.0)], &reg),
        Err(RewardError::Duplicate(_))
    ));
    assert!(matches!(
        WeightedReward::from_specs(&[spec("format", f64::NAN)], &reg),
        Err(RewardError::BadWeight { .. })
    ));
    // accuracy without a ground truth is an error, not a silent 0.
    let w = WeightedReward::from_specs(&[spec("accuracy", 1.0)], &reg).unwrap();
    let e = w
        .score(&[RewardRequest {
            completion: "x".into(),
            ..Default::default()
        }])
        .unwrap_err();
    assert!(
        matches!(e, RewardError::MissingAnswer { index: 0, .. }),
        "{e}"
    );
}

fn sh(name: &str, script: &str, timeout_ms: u64) -> CommandReward {
    CommandReward::new(
        name,
        vec!["sh".into(), "-c".into(), script.into()],
        Duration::from_millis(timeout_ms),
    )
}

#[test]
fn command_reward_json_lines() {
    // Reads each request line and answers by content: bare numbers and {"reward": x} both accepted.
    let r = sh(
        "mine",
        r#"while IFS= read -r l; do case "$l" in *good*) echo 1.5;; *) echo '{"reward": -1}';; esac; done"#,
        5000,
    );
    let batch = vec![
        req("good one", "x"),
        req("bad one", "x"),
        req("good again", "x"),
    ];
    assert_eq!(r.score_batch(&batch).unwrap(), vec![1.5, -1.0, 1.5]);
    assert_eq!(r.score_batch(&[]).unwrap(), Vec::<f64>::new());

    // Registered under its name and combined with a builtin.
    let mut reg = RewardRegistry::builtin();
    reg.register(Arc::new(r));
    let specs = vec![
        RewardSpec {
            name: "mine".into(),
            weight: 0.5,
        },
        RewardSpec {
            name: "format".into(),
            weight: 1.0,
        },
    ];
    let w = WeightedReward::from_specs(&specs, &reg).unwrap();
    assert_eq!(w.score_batch(&batch).unwrap(), vec![0.75, -0.5, 0.75]);
}

#[test]
fn command_reward_errors() {
    let batch = vec![req("a", "x"), req("b", "x")];
    let e = sh("slow", "sleep 5", 200).score_batch(&batch).unwrap_err();
    assert!(
        matches!(
            e,
            RewardError::Timeout {
                got: 0,
                want: 2,
                ..
            }
        ),
        "{e}"
    );

    let e = sh("short", "read l; echo 1", 5000)
        .score_batch(&batch)
        .unwrap_err();
    assert!(
        e.to_string().contains("got 1 reward lines for 2 requests"),
        "{e}"
    );

    let e = sh("junk", "while read l; do echo hello; done", 5000)
        .score_batch(&batch)
        .unwrap_err();
    assert!(
        matches!(e, RewardError::Protocol { line: 1, .. }) && e.to_string().contains("not JSON"),
        "{e}"
    );

    let e = sh("fail", "echo boom >&2; exit 3", 5000)
        .score_batch(&batch)
        .unwrap_err();
    assert!(
        matches!(e, RewardError::Exit { .. }) && e.to_string().contains("boom"),
        "{e}"
    );

    let e = sh(
        "nan",
        "while read l; do echo '{\"reward\": \"x\"}'; done",
        5000,
    )
    .score_batch(&batch)
    .unwrap_err();
    assert!(e.to_string().contains("expected a number"), "{e}");

    let e = CommandReward::new(
        "missing",
        vec!["/nonexistent/reward-bin".into()],
        Duration::from_secs(1),
    )
    .score_batch(&batch)
    .unwrap_err();
    assert!(
        matches!(e, RewardError::Spawn { .. }) && e.to_string().contains("/nonexistent/reward-bin"),
        "{e}"
    );

    let e = sh("many", "while read l; do echo 1; echo 2; done", 5000)
        .score_batch(&batch)
        .unwrap_err();
    assert!(e.to_string().contains("more output lines"), "{e}");
}

#[test]
fn command_reward_sees_request_fields() {
    // The command gets the full JSON request: echo the answer field back as the reward.
    let r = sh(
        "echo_answer",
        r#"while IFS= read -r l; do echo "$l" | sed -e 's/.*"answer":"\([0-9.]*\)".*/\1/'; done"#,
        5000,
    );
    assert_eq!(
        r.score_batch(&[req("c", "0.25"), req("d", "2")]).unwrap(),
        vec![0.25, 2.0]
    );
}
