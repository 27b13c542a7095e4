//! A generated dataset and tokenizer for the quickstart: integer addition questions with
//! their answers, a held-out test split in the GSM8K answer format (so `mmada-infer eval
//! --task gsm8k` scores it), and a character-level `tokenizer.json`. All are produced by the
//! project itself, so the quickstart needs no download and no third-party data licence.

use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::json;

/// Number of held-out questions written to `arith_test.jsonl`.
pub const N_TEST: usize = 200;

/// Every distinct question of the task: `(a, b)` for "What is {a} + {b}?", `a` in 0..100
/// (one or two digits), `b` in 0..10 (one digit) — 1000 questions, answers 0..=108.
/// Small enough for the quickstart's tiny model to learn the carry in a few CPU minutes.
fn all_pairs() -> Vec<(u32, u32)> {
    (0..100)
        .flat_map(|a| (0..10).map(move |b| (a, b)))
        .collect()
}

/// The question text of a pair.
pub fn question(a: u32, b: u32) -> String {
    format!("What is {a} + {b}?")
}

/// Write the quickstart data into `dir`:
///
/// * `arith_test.jsonl`: [`N_TEST`] held-out questions, `{"question", "answer": "#### N"}`
///   (GSM8K format: `mmada-infer eval --task gsm8k --template none --prompt-template
///   '{question}'` scores it by exact match of the last number);
/// * `arith.jsonl`: `n` training rows `{"question", "answer": "N"}` drawn with replacement
///   from the remaining 700 questions (each pass over them in a new shuffled order, so
///   `n >= 700` covers all of them) — no held-out question ever appears in it;
/// * `tokenizer.json`: WordLevel over printable ASCII + newline, one token per character,
///   plus `<|startoftext|>`, `<|endoftext|>` (the trainer adds the remaining MMaDA tokens).
///
/// Deterministic in `seed` (the split and the rows).
///
/// # Errors
/// I/O errors.
pub fn write_arithmetic(dir: &Path, n: usize, seed: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pairs = all_pairs();
    pairs.shuffle(&mut rng);
    let (test, train) = pairs.split_at(N_TEST);
    let mut train = train.to_vec();
    let mut lines = String::new();
    for &(a, b) in test {
        let row = json!({"question": question(a, b), "answer": format!("#### {}", a + b)});
        lines.push_str(&row.to_string());
        lines.push('\n');
    }
    std::fs::write(dir.join("arith_test.jsonl"), lines)?;
    let mut lines = String::new();
    for i in 0..n {
        if i % train.len() == 0 {
            train.shuffle(&mut rng);
        }
        let (a, b) = train[i % train.len()];
        let row = json!({"question": question(a, b), "answer": (a + b).to_string()});
        lines.push_str(&row.to_string());
        lines.push('\n');
    }
    std::fs::write(dir.join("arith.jsonl"), lines)?;

    let specials = ["<|startoftext|>", "<|endoftext|>", "<unk>"];
    let mut vocab = serde_json::Map::new();
    let mut added = vec![];
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
        if *s != "<unk>" {
            added.push(json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
        }
    }
    let chars = (32u8..127).map(char::from).chain(std::iter::once('\n'));
    for (id, c) in (specials.len()..).zip(chars) {
        vocab.insert(c.to_string(), json!(id));
    }
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string_pretty(&tok).expect("json"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn questions(path: &Path) -> Vec<(String, String)> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["question"].as_str().unwrap().to_string(),
                    v["answer"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn held_out_split_is_disjoint_deterministic_and_correct() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        write_arithmetic(d1.path(), 4000, 0).unwrap();
        write_arithmetic(d2.path(), 4000, 0).unwrap();
        for f in ["arith.jsonl", "arith_test.jsonl", "tokenizer.json"] {
            assert_eq!(
                std::fs::read(d1.path().join(f)).unwrap(),
                std::fs::read(d2.path().join(f)).unwrap(),
                "{f} differs between two runs with the same seed"
            );
        }
        let train = questions(&d1.path().join("arith.jsonl"));
        let test = questions(&d1.path().join("arith_test.jsonl"));
        assert_eq!((train.len(), test.len()), (4000, N_TEST));
        let test_q: std::collections::HashSet<_> = test.iter().map(|(q, _)| q.clone()).collect();
        assert_eq!(test_q.len(), N_TEST, "held-out questions repeat");
        assert!(train.iter().all(|(q, _)| !test_q.contains(q)), "overlap");
        let train_q: std::collections::HashSet<_> = train.iter().map(|(q, _)| q).collect();
        assert_eq!(
            train_q.len(),
            800,
            "4000 draws cover the 800 training questions"
        );
        let check = |q: &str, ans: &str| {
            let (a, b) = q
                .strip_prefix("What is ")
                .and_then(|s| s.strip_suffix('?'))
                .and_then(|s| s.split_once(" + "))
                .unwrap();
            let sum = a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap();
            assert_eq!(ans, sum.to_string(), "{q}");
        };
        for (q, a) in &train {
            check(q, a);
        }
        for (q, a) in &test {
            check(q, a.strip_prefix("#### ").unwrap());
        }
        write_arithmetic(d2.path(), 4000, 1).unwrap();
        assert_ne!(
            std::fs::read(d1.path().join("arith_test.jsonl")).unwrap(),
            std::fs::read(d2.path().join("arith_test.jsonl")).unwrap(),
            "the seed chooses the split"
        );
    }
}
