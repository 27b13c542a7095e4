//! `mmada-infer eval` end to end on 5 GSM8K items of `../shared/data` with a tiny random
//! checkpoint (skipped with a message when the folder is missing; fails under `CI=true`).

mod common;

use common::{jsonl, run};
use mmada_rewards::extract::{answers_match, completion_answer};

#[test]
fn eval_gsm8k_five_items() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let gsm = data.join("math/gsm8k_test.jsonl");
    let (tmp, dir) = common::checkpoint(6);
    let out = tmp.path().join("res.jsonl");
    let args = [
        "eval",
        "--checkpoint",
        dir.to_str().unwrap(),
        "--task",
        "gsm8k",
        "--data",
        gsm.to_str().unwrap(),
        "--limit",
        "5",
        "--gen-length",
        "8",
        "--steps",
        "4",
        "--block-length",
        "4",
        "--batch-size",
        "3",
        "--temperature",
        "1.0",
        "--out",
        out.to_str().unwrap(),
    ];
    let r = run(&args);
    assert!(r.ok, "{}", r.stderr);
    let recs = jsonl(&out);
    assert_eq!(recs.len(), 5);
    // gold answers of the first five GSM8K test items (`#### N`)
    let gold: Vec<&str> = recs.iter().map(|r| r["gold"].as_str().unwrap()).collect();
    assert_eq!(gold, ["18", "3", "70000", "540", "20"]);
    let mut correct = 0;
    for (i, rec) in recs.iter().enumerate() {
        assert_eq!(rec["index"], i);
        assert_eq!(rec["nfe"], 4);
        assert!(
            rec["prompt"]
                .as_str()
                .unwrap()
                .ends_with("within \\boxed{}.")
        );
        let output = rec["output"].as_str().unwrap();
        let extracted = completion_answer(output);
        assert_eq!(rec["extracted"].as_str(), extracted.as_deref());
        let ok = extracted.is_some_and(|x| answers_match(&x, gold[i]));
        assert_eq!(rec["correct"], ok);
        correct += usize::from(ok);
    }
    // summary JSON + accuracy line
    let mut lines = r.stdout.lines();
    let summary: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(summary["items"], 5);
    assert_eq!(summary["correct"], correct);
    assert_eq!(summary["nfe"], 8); // two batches (3 + 2) of 4 steps
    assert_eq!(summary["new_tokens"], 40);
    assert_eq!(
        lines.next().unwrap(),
        format!("accuracy {correct}/5 = {:.2}%", 20.0 * correct as f64)
    );

    // A data file whose references are the model's own extracted answers scores 100 % on the
    // items that had one (same seed, same batches → same outputs).
    let with_answer: Vec<usize> = (0..5)
        .filter(|&i| recs[i]["extracted"].is_string())
        .collect();
    assert!(
        !with_answer.is_empty(),
        "no item produced an extractable answer: {recs:?}"
    );
    let src: Vec<serde_json::Value> = std::fs::read_to_string(&gsm)
        .unwrap()
        .lines()
        .take(5)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mine = tmp.path().join("mine.jsonl");
    let text: String = (0..5)
        .map(|i| {
            let ans = recs[i]["extracted"].as_str().unwrap_or("no answer here");
            serde_json::json!({"question": src[i]["question"], "answer": format!("x\n#### {ans}")})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&mine, text).unwrap();
    let mut args2 = args.to_vec();
    args2[6] = mine.to_str().unwrap();
    let r2 = run(&args2);
    assert!(r2.ok, "{}", r2.stderr);
    let s2: serde_json::Value = serde_json::from_str(r2.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(s2["correct"], with_answer.len(), "{}", r2.stdout);
}

#[test]
fn eval_bad_input() {
    let (tmp, dir) = common::checkpoint(7);
    let d = dir.to_str().unwrap();
    let r = run(&[
        "eval",
        "--checkpoint",
        d,
        "--task",
        "gsm8k",
        "--data",
        "/nonexistent.jsonl",
    ]);
    assert!(
        !r.ok && r.stderr.contains("data file /nonexistent.jsonl not found"),
        "{}",
        r.stderr
    );
    let r = run(&["eval", "--checkpoint", d, "--data", "/nonexistent.jsonl"]);
    assert!(!r.ok && r.stderr.contains("no task"), "{}", r.stderr);
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"question\": \"q\", \"answer\": \"no marker\"}\n").unwrap();
    let r = run(&[
        "eval",
        "--checkpoint",
        d,
        "--task",
        "gsm8k",
        "--data",
        bad.to_str().unwrap(),
    ]);
    assert!(
        !r.ok && r.stderr.contains("has no `#### N` line"),
        "{}",
        r.stderr
    );
}
