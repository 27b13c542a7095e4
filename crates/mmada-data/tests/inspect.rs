//! `data inspect` / `data check` library functions: rendering, token counts, statistics,
//! skip reporting, placeholder image codes; on generated files and on `../shared/data`.

mod common;

use std::path::Path;

use mmada_data::inspect::{ScanOptions, Summary, check_manifest, scan_manifest};
use mmada_data::manifest::Format;
use mmada_data::{DataError, LayoutConfig, Manifest, Task};

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

const QA: &str = r#"
name: qa
task: chat
source: { path: qa.jsonl }
format: jsonl
fields: { question: q, answer: a }
license: MIT
split: train
on_error: skip
"#;

#[test]
fn scan_without_tokenizer_renders_template_and_counts_skips() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "qa.jsonl",
        "{\"q\": \"1+1?\", \"a\": \"2\"}\n{\"q\": \"no answer\"}\nnot json\n{\"q\": \"2+2?\", \"a\": \"4\"}\n",
    );
    let m = common::manifest(QA);
    let scan = scan_manifest(
        m,
        Some(dir.path()),
        None,
        &ScanOptions {
            n: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(scan.examples, 2);
    assert_eq!(scan.read.skipped_records, 2);
    assert_eq!(scan.rendered.len(), 1);
    let r = &scan.rendered[0];
    assert_eq!(r.index, 0);
    assert!(r.location.contains("line 1"), "{}", r.location);
    assert_eq!(
        r.prompt,
        "<|start_header_id|>user<|end_header_id|>\n1+1?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
    );
    assert_eq!(r.answer, "2");
    assert!(r.tokens.is_none() && scan.stats.is_none());
    let text = scan.to_string();
    assert!(
        text.contains("manifest `qa` (task chat): 1 file(s), 2 example(s)"),
        "{text}"
    );
    assert!(text.contains("skipped: 2 record(s)"), "{text}");
    assert!(text.contains("line 2") && text.contains("line 3"), "{text}");
    // A limit stops early.
    let scan = scan_manifest(
        common::manifest(QA),
        Some(dir.path()),
        None,
        &ScanOptions {
            n: 0,
            limit: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((scan.examples, scan.limited), (1, true));
}

#[test]
fn check_fails_with_located_error_under_on_error_fail() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "qa.jsonl",
        "{\"q\": \"x\", \"a\": \"y\"}\n{\"q\": \"x\"}\n",
    );
    let m = common::manifest(&QA.replace("on_error: skip", ""));
    let e = check_manifest(m, Some(dir.path()), None, &LayoutConfig::default()).unwrap_err();
    assert!(matches!(e, DataError::Field { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("line 2") && msg.contains("`answer`"), "{msg}");
    // Missing files: NoFiles.
    let m = common::manifest(QA).with_source_path("nothing/*.jsonl");
    assert!(matches!(
        check_manifest(m, Some(dir.path()), None, &LayoutConfig::default()),
        Err(DataError::NoFiles { .. })
    ));
}

#[test]
fn source_override_follows_extension() {
    let m = Manifest::from_file(&common::repo_root().join("data_manifests/gsm8k.yaml")).unwrap();
    assert_eq!(m.format, Format::Parquet);
    let m = m.with_source_path("math/gsm8k_test.jsonl");
    assert_eq!(m.format, Format::Jsonl);
    assert_eq!(m.source.path.as_deref(), Some("math/gsm8k_test.jsonl"));
    assert!(m.source.hf_repo.is_none() && m.source.files.is_empty());
    assert_eq!(Format::from_extension("a/*.PARQUET"), Some(Format::Parquet));
    assert_eq!(Format::from_extension("dir/"), None);
}

#[test]
fn inspect_gsm8k_with_gpt2() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let m = Manifest::from_file(&common::repo_root().join("data_manifests/gsm8k.yaml"))
        .unwrap()
        .with_source_path("math/gsm8k_test.jsonl");
    let tok = common::gpt2(&data);
    let opts = ScanOptions {
        n: 2,
        layout: LayoutConfig {
            max_lm_len: 1024,
            ..Default::default()
        },
        ..Default::default()
    };
    let scan = scan_manifest(m, Some(&data), Some(&tok), &opts).unwrap();
    assert_eq!(scan.task, Task::Cot);
    assert_eq!(scan.examples, 1319);
    assert_eq!(scan.rendered.len(), 2);
    let r = &scan.rendered[0];
    let t = r.tokens.unwrap();
    assert_eq!(t.total, 1024);
    assert_eq!(t.prompt + t.answer, t.content);
    assert!(t.prompt > 50 && t.answer > 20 && !t.truncated, "{t:?}");
    let text = r.rendered.as_deref().unwrap();
    // Special tokens visible, the `<think>` instruction, split marker, collapsed padding.
    // (gpt2's BOS = EOS = `<|endoftext|>`; the chat prompt ends at the last
    // `<|end_header_id|>`, spec §2.4 b.)
    assert!(
        text.starts_with(
            "<|endoftext|><|start_header_id|>user<|end_header_id|>\nYou should first think"
        ),
        "{text}"
    );
    assert!(text.contains("Janet’s ducks"), "{text}");
    assert!(
        text.contains("<|start_header_id|>assistant<|end_header_id|>⟦ANSWER⟧\n<think> Janet sells"),
        "{text}"
    );
    assert!(
        text.ends_with(&format!(
            "</think> 18<|endoftext|>×{}",
            1024 - t.content + 1
        )),
        "{text}"
    );
    let stats = scan.stats.as_ref().unwrap();
    assert_eq!(stats.count, 1319);
    assert_eq!(stats.truncated, 0);
    assert!(stats.tokens.min < stats.tokens.max && stats.tokens.max < 1024);
    assert_eq!(scan.layout_errors, 0);
    let out = scan.to_string();
    assert!(
        out.contains("lengths over 1319 laid-out example(s)"),
        "{out}"
    );
    assert!(out.contains("── example 1"), "{out}");
}

#[test]
fn check_llava_images_with_placeholder_codes() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let m = common::manifest(
        r#"
name: llava_demo
task: mmu
source: { path: llava/llava_conversations_with_images.json }
format: json
fields: { conversations: conversations, image: image, id: id }
license: Apache-2.0
split: train
"#,
    );
    let tok = common::gpt2(&data);
    let layout = LayoutConfig {
        max_seq_length: 256,
        ..Default::default()
    };
    let scan = check_manifest(m, Some(&data), Some(&tok), &layout).unwrap();
    assert_eq!(scan.examples, 6);
    assert_eq!(scan.images.paths, 6);
    assert_eq!(scan.placeholder_image_tokens, Some(1024));
    assert!(scan.rendered.is_empty());
    let st = scan.stats.as_ref().unwrap();
    assert_eq!(st.count, 6);
    // mmu rows: text P = 256 + <|mmu|> <|soi|> 1024 codes <|eoi|>.
    assert!(st.prompt.min > 1024, "{st:?}");
    let s = Summary(&scan).to_string();
    assert!(
        s.starts_with("`llava_demo` (task mmu): 1 file(s), 6 example(s), 0 skipped"),
        "{s}"
    );
    assert!(s.contains("6 path(s), 0 inline, 0 pre-tokenized (untokenized images laid out as 1024 placeholder codes)"), "{s}");
}
