//! A generated dataset and tokenizer for the quickstart: integer arithmetic questions with
//! their answers, and a character-level `tokenizer.json`. Both are produced by the project
//! itself, so the quickstart needs no download and no third-party data licence.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

/// Write `dir/arith.jsonl` (`n` rows of `{"question", "answer"}`) and `dir/tokenizer.json`
/// (WordLevel over printable ASCII + newline, one token per character, plus
/// `<|startoftext|>`, `<|endoftext|>`; the trainer adds the remaining MMaDA tokens).
///
/// # Errors
/// I/O errors.
pub fn write_arithmetic(dir: &Path, n: usize, seed: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut lines = String::new();
    for _ in 0..n {
        let a: i64 = rng.random_range(0..100);
        let b: i64 = rng.random_range(0..100);
        let (q, ans) = match rng.random_range(0..3) {
            0 => (format!("What is {a} + {b}?"), a + b),
            1 => (format!("What is {a} - {b}?"), a - b),
            _ => (
                format!("What is {} * {}?", a % 13, b % 13),
                (a % 13) * (b % 13),
            ),
        };
        lines.push_str(&json!({"question": q, "answer": ans.to_string()}).to_string());
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
