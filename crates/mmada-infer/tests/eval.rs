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

/// Lay out `files` as the Hugging Face cache does: `<hub>/<kind>s--owner--name/refs/main`
/// naming a snapshot folder that holds the files.
fn cache_repo(hub: &std::path::Path, kind: &str, id: &str, files: &[(&str, Vec<u8>)]) {
    let root = hub.join(format!("{kind}s--{}", id.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), commit).unwrap();
    let snap = root.join("snapshots").join(commit);
    for (name, bytes) in files {
        let p = snap.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

/// Hub ids for `--checkpoint`, `--tokenizer` and `eval --data`, resolved through the local
/// cache under `HF_HOME` with `HF_HUB_OFFLINE=1`: the same output as the local paths; an id
/// missing from the cache is an error naming the cache and the variable.
#[test]
fn hub_ids_resolve_through_the_local_cache_offline() {
    let (tmp, dir) = common::checkpoint(7);
    let home = tmp.path().join("hf-home");
    let hub = home.join("hub");
    let files: Vec<(&str, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name: &'static str = Box::leak(
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
                    .into_boxed_str(),
            );
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    cache_repo(&hub, "model", "tiny-org/tiny-mmada", &files);
    let items = [
        "{\"question\": \"What is 2 + 3?\", \"answer\": \"#### 5\"}",
        "{\"question\": \"What is 7 + 1?\", \"answer\": \"#### 8\"}",
    ]
    .join("\n");
    cache_repo(
        &hub,
        "dataset",
        "tiny-org/arith",
        &[("data/test.jsonl", items.clone().into_bytes())],
    );
    let local_data = tmp.path().join("test.jsonl");
    std::fs::write(&local_data, items).unwrap();
    let run_env = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmada-infer"))
            .args(args)
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("HF_HUB_CACHE")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let eval = |checkpoint: &str, tokenizer: &str, data: &str, out: &std::path::Path| {
        run_env(&[
            "eval",
            "--checkpoint",
            checkpoint,
            "--tokenizer",
            tokenizer,
            "--task",
            "gsm8k",
            "--data",
            data,
            "--gen-length",
            "4",
            "--steps",
            "2",
            "--block-length",
            "4",
            "--batch-size",
            "2",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let (a_out, b_out) = (tmp.path().join("a.jsonl"), tmp.path().join("b.jsonl"));
    let d = dir.to_str().unwrap();
    let (ok, _, err) = eval(d, d, local_data.to_str().unwrap(), &a_out);
    assert!(ok, "{err}");
    let (ok, _, err) = eval(
        "tiny-org/tiny-mmada",
        "tiny-org/tiny-mmada",
        "tiny-org/arith:data/test.jsonl",
        &b_out,
    );
    assert!(ok, "{err}");
    let (a, b) = (jsonl(&a_out), jsonl(&b_out));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x["output"], &x["gold"]), (&y["output"], &y["gold"]));
    }
    // inspect reads the cached checkpoint too
    let (ok, out, err) = run_env(&["inspect", "--checkpoint", "tiny-org/tiny-mmada@main"]);
    assert!(ok && !out.is_empty(), "{err}");
    // not cached, offline: the error names the id, the cache and HF_HUB_OFFLINE
    let (ok, _, err) = run_env(&["inspect", "--checkpoint", "tiny-org/absent"]);
    assert!(!ok);
    assert!(
        err.contains("tiny-org/absent")
            && err.contains("HF_HUB_OFFLINE")
            && err.contains(&hub.display().to_string()),
        "{err}"
    );
}
