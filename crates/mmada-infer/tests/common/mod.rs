//! Test helpers: a tiny random checkpoint with a character-level tokenizer, and running the
//! binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use mmada_model::backend::Cpu;
use mmada_model::{FloatDType, ModelConfig, SaveOptions};
use serde_json::json;

/// Tokenizer length of [`write_tokenizer`]: 3 specials + 96 characters + 10 MMaDA tokens.
pub const TOK_LEN: usize = 109;
/// `<|mdm_mask|>` of [`write_tokenizer`].
pub const MASK: u32 = 99;
/// `<|endoftext|>` of [`write_tokenizer`].
pub const EOS: u32 = 1;
/// Image codes after the text ids: the model's head is `TOK_LEN + CODEBOOK` wide.
pub const CODEBOOK: usize = 16;

/// A character-level WordLevel `tokenizer.json` (as `mmada-train synth`, plus the MMaDA special
/// tokens at ids 99..=108) with `extra` more ordinary tokens appended after them.
pub fn tokenizer_json(extra: usize, mask_name_swap: bool) -> serde_json::Value {
    let specials = ["<|startoftext|>", "<|endoftext|>", "<unk>"];
    let mut vocab = serde_json::Map::new();
    let mut added = vec![];
    let tok = |i: usize, s: &str| json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
        if *s != "<unk>" {
            added.push(tok(i, s));
        }
    }
    let mut next = specials.len();
    for c in (32u8..127).map(char::from).chain(std::iter::once('\n')) {
        vocab.insert(c.to_string(), json!(next));
        next += 1;
    }
    let mut mmada = vec![
        "<|mdm_mask|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|soi|>",
        "<|eoi|>",
        "<|t2i|>",
        "<|mmu|>",
        "[iPAD]",
        "<|r2i|>",
    ];
    if mask_name_swap {
        mmada.swap(0, 1);
    }
    for s in mmada {
        vocab.insert(s.to_string(), json!(next));
        added.push(tok(next, s));
        next += 1;
    }
    for k in 0..extra {
        vocab.insert(format!("extra{k}"), json!(next));
        next += 1;
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// The tiny model config: d_model 32, 2 layers, head `TOK_LEN + CODEBOOK` wide.
pub fn tiny_config() -> ModelConfig {
    let mut cfg = ModelConfig::tiny();
    cfg.d_model = 32;
    cfg.n_layers = 2;
    cfg.n_heads = 2;
    cfg.n_kv_heads = 2;
    cfg.mlp_hidden_size = 64;
    cfg.vocab_size = TOK_LEN + CODEBOOK;
    cfg.embedding_size = TOK_LEN + CODEBOOK;
    cfg.llm_vocab_size = Some(TOK_LEN);
    cfg.codebook_size = Some(CODEBOOK);
    cfg.mask_token_id = Some(MASK);
    cfg.eos_token_id = Some(EOS);
    cfg.pad_token_id = Some(EOS);
    cfg.max_sequence_length = 1024;
    cfg
}

/// Writes a random (mitchell, `seed`) tiny checkpoint with its tokenizer into `dir`.
pub fn write_checkpoint(dir: &Path, seed: u64) {
    let cfg = tiny_config();
    let model =
        mmada_model::init::init_model::<Cpu>(&cfg, seed, &Default::default(), FloatDType::F32);
    mmada_model::save_checkpoint(
        &model,
        &cfg,
        dir,
        &SaveOptions {
            dtype: mmada_model::DiskDtype::F32,
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&tokenizer_json(0, false)).unwrap(),
    )
    .unwrap();
}

/// A fresh temp dir with a checkpoint in `model/`.
pub fn checkpoint(seed: u64) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    write_checkpoint(&dir, seed);
    (tmp, dir)
}

/// Output of one run of the binary.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `mmada-infer args…`.
pub fn run(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_mmada-infer"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// Parses a JSONL file.
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `../shared/data` (relative to the repository root), or `None` (skip with a message).
/// With `CI=true` a missing folder fails the test.
pub fn shared_data() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
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
