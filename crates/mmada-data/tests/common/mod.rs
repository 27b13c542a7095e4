//! Shared helpers: locating `../shared/data` (relative to the repository root).
#![allow(dead_code)]

use std::path::PathBuf;

use mmada_data::{Manifest, TextTokenizer};

/// Repository root (two levels above this crate's manifest dir).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `../shared/data`, or `None` (test skips with a message). With `CI=true` a missing
/// folder fails the test instead.
pub fn shared_data() -> Option<PathBuf> {
    let p = repo_root().join("../shared/data");
    if p.is_dir() {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "CI=true and the shared data folder {} is missing",
            p.display()
        );
    }
    eprintln!("SKIP: shared data folder {} not found", p.display());
    None
}

/// Repository test fixtures (`tests/fixtures`).
pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

pub fn manifest(yaml: &str) -> Manifest {
    Manifest::from_yaml(yaml, "<test>").expect("test manifest parses")
}

pub fn gpt2(data: &std::path::Path) -> TextTokenizer {
    TextTokenizer::from_file_with_mmada_tokens(&data.join("tokenizers/gpt2/tokenizer.json"))
        .expect("gpt2 tokenizer")
}

pub fn llama2(data: &std::path::Path) -> TextTokenizer {
    TextTokenizer::from_file_with_mmada_tokens(&data.join("tokenizers/llama2/tokenizer.json"))
        .expect("llama2 tokenizer")
}
