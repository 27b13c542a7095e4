//! Extraction and rewards on the real GSM8K test and MATH-500 files of `../shared/data/math`.

use std::path::PathBuf;

use mmada_rewards::extract::{
    answers_match, boxed_answer, gsm8k_answer, last_number, normalize_math_answer,
};
use mmada_rewards::{RewardInput, RewardRegistry, RewardSpec};

/// `../shared/data/math`, or `None` (skip). With `CI=true` a missing folder fails.
fn math_dir() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/math");
    if p.is_dir() {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "CI=true and the shared data folder {} is missing",
            p.display()
        );
    }
    eprintln!("SKIP: {} not found", p.display());
    None
}

fn rows(path: PathBuf) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("jsonl row"))
        .collect()
}

#[test]
fn gsm8k_reference_answers() {
    let Some(dir) = math_dir() else { return };
    let rows = rows(dir.join("gsm8k_test.jsonl"));
    assert_eq!(rows.len(), 1319);
    let answers: Vec<String> = rows
        .iter()
        .map(|r| gsm8k_answer(r["answer"].as_str().unwrap()).expect("every GSM8K answer has ####"))
        .collect();
    // First rows of the official test split.
    assert_eq!(&answers[..4], &["18", "3", "70000", "540"]);
    // Every reference is a plain number after extraction (commas removed).
    for (i, a) in answers.iter().enumerate() {
        assert!(a.parse::<f64>().is_ok(), "row {i}: `{a}` is not numeric");
    }
    // The #### answer equals the last number of the solution text.
    let agree = rows
        .iter()
        .zip(&answers)
        .filter(|(r, a)| last_number(r["answer"].as_str().unwrap()).as_deref() == Some(a.as_str()))
        .count();
    assert_eq!(agree, rows.len());
}

#[test]
fn math500_boxed_matches_answer_field() {
    let Some(dir) = math_dir() else { return };
    let rows = rows(dir.join("math500_test.jsonl"));
    assert_eq!(rows.len(), 500);
    let mut mismatches = Vec::new();
    for r in &rows {
        let solution = r["solution"].as_str().unwrap();
        let answer = r["answer"].as_str().unwrap();
        let boxed = boxed_answer(solution).expect("every MATH-500 solution has \\boxed");
        if !answers_match(&boxed, answer) {
            mismatches.push((boxed, answer.to_string()));
        }
    }
    // The answer field is the boxed content up to formatting; normalisation reconciles all 500.
    assert!(
        mismatches.is_empty(),
        "{} mismatches: {:?}",
        mismatches.len(),
        &mismatches
    );
    assert_eq!(
        normalize_math_answer(rows[0]["answer"].as_str().unwrap()),
        r"(3,\frac{\pi}{2})"
    );
}

#[test]
fn correctness_reward_on_real_examples() {
    let Some(dir) = math_dir() else { return };
    let gsm = rows(dir.join("gsm8k_test.jsonl"));
    let math = rows(dir.join("math500_test.jsonl"));
    let set = RewardRegistry::with_builtins()
        .build(
            "reward_funcs",
            &[
                RewardSpec::new("math_correctness"),
                RewardSpec::new("think_format"),
            ],
        )
        .unwrap();
    let item =
        |fields: &serde_json::Map<String, serde_json::Value>, completion: String| RewardInput {
            prompt: String::new(),
            completion,
            completion_ids: vec![],
            terminated: true,
            fields: fields.clone(),
            image: None,
        };
    let mut batch = Vec::new();
    // GSM8K: the reference solution itself (with ####) inside a think block, and a wrong number.
    for r in gsm.iter().take(20) {
        let sol = r["answer"].as_str().unwrap();
        batch.push(item(
            r,
            format!("<think>{sol}</think> #### {}", gsm8k_answer(sol).unwrap()),
        ));
        batch.push(item(
            r,
            "<think>guess</think> The answer is -123456.".into(),
        ));
    }
    // MATH-500: the reference solution (boxed), no think tags.
    for r in math.iter().take(20) {
        batch.push(item(r, r["solution"].as_str().unwrap().to_string()));
    }
    let b = set.score(&batch).unwrap();
    for i in 0..20 {
        assert_eq!(b.total[2 * i], 2.5, "gsm8k row {i}");
        assert_eq!(b.total[2 * i + 1], 0.5, "gsm8k row {i} wrong");
    }
    for i in 40..60 {
        assert_eq!(b.per_reward[0][i], Some(1.0), "math500 row {}", i - 40);
        assert_eq!(b.per_reward[1][i], Some(0.0));
    }
}
