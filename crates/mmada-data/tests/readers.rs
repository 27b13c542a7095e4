//! Readers on the real files of `../shared/data`, tokenised with GPT-2 and Llama-2 (plus
//! the MMaDA special tokens), and the bad-input cases.

mod common;

use std::sync::Arc;

use mmada_data::layout::TextSplit;
use mmada_data::{
    DataError, ExampleStream, ImageRef, LayoutConfig, LengthStats, Role, Task, layout_example,
    render_sample,
};

const GSM8K: &str = r#####"
name: gsm8k
task: cot
source: { path: math/gsm8k_test.jsonl }
format: jsonl
fields: { question: question, answer: answer, answer_marker: "####" }
license: MIT
split: test
"#####;

#[test]
fn gsm8k_jsonl_streams_all_rows_and_splits_the_answer() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let mut s = ExampleStream::open(common::manifest(GSM8K), Some(&data)).unwrap();
    let all: Vec<_> = s.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(all.len(), 1319);
    assert_eq!(s.stats().examples, 1319);
    let first = &all[0];
    assert!(
        first
            .question
            .as_ref()
            .unwrap()
            .starts_with("Janet’s ducks lay 16 eggs")
    );
    assert_eq!(first.answer.as_deref(), Some("18"));
    assert!(
        first
            .reasoning
            .as_ref()
            .unwrap()
            .ends_with("$<<9*2=18>>18 every day at the farmer’s market.")
    );
    assert_eq!((first.source.row, first.source.unit), (1, "line"));
    assert_eq!(all[1318].source.row, 1319);
}

#[test]
fn gsm8k_cot_layout_with_gpt2_and_llama2() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let ex = ExampleStream::open(common::manifest(GSM8K), Some(&data))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let cfg = LayoutConfig {
        max_lm_len: 512,
        ..Default::default()
    };
    for tok in [common::gpt2(&data), common::llama2(&data)] {
        let t = *tok.layout();
        let s = layout_example(&ex, &tok, &cfg, false).unwrap();
        assert_eq!(s.len(), 512);
        assert_eq!(s.ids[0], t.bos_id);
        assert_eq!(s.ids[1], t.start_header_id);
        // prompt ends at the 2nd (last) <|end_header_id|>
        assert_eq!(s.ids[s.prompt_len - 1], t.end_header_id);
        assert_eq!(s.ids.iter().filter(|&&x| x == t.end_header_id).count(), 2);
        assert_eq!(s.ids.iter().filter(|&&x| x == t.eot_id).count(), 1);
        let text = render_sample(&s, &tok).unwrap();
        if t.bos_id != 50256 {
            // SentencePiece decoding puts spaces around added tokens: ids checked above.
            assert!(text.contains("</think> 18"), "{text}");
            continue;
        }
        assert!(
            text.contains("<|start_header_id|>user<|end_header_id|>\nYou should first think"),
            "{text}"
        );
        assert!(text.contains("⟦ANSWER⟧\n<think>"), "{text}");
        assert!(text.contains("</think> 18"), "{text}");
        let stats = LengthStats::of(std::slice::from_ref(&s), t.eos_id);
        assert!(
            stats.tokens.max < 512 && stats.tokens.max > 150,
            "{stats:?}"
        );
    }
}

#[test]
fn tokenizers_get_mmada_special_tokens() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let g = common::gpt2(&data);
    // GPT-2 has 50257 ids; BOS = EOS = <|endoftext|> (tokenizer_config.json).
    let t = g.layout();
    assert_eq!((t.bos_id, t.eos_id, t.pad_id), (50256, 50256, 50256));
    assert_eq!(
        g.len(),
        50257 + 10,
        "mask, 2 headers, eot, 6 task tokens added"
    );
    assert_eq!(t.image_code_offset, 50267);
    assert_eq!((t.mask_id, t.soi_id, t.r2i_id), (50257, 50261, 50266));
    assert_eq!(g.encode("Hello world!").unwrap(), vec![15496, 995, 0]);
    let ids = g
        .encode("<|start_header_id|>user<|end_header_id|>\nHi<|eot_id|>")
        .unwrap();
    assert_eq!(ids[0], t.start_header_id);
    assert_eq!(ids[2], t.end_header_id);
    assert_eq!(*ids.last().unwrap(), t.eot_id);

    let l = common::llama2(&data);
    let t = l.layout();
    assert_eq!((t.bos_id, t.eos_id, t.pad_id), (1, 2, 2));
    assert_eq!(l.len(), 32000 + 10);
    assert_eq!(
        &l.encode("Hello world!").unwrap()[..3],
        &[15043, 3186, 29991]
    );
    assert_eq!(l.encode("[iPAD]").unwrap(), vec![t.ipad_id]);
}

#[test]
fn longcot_glob_reads_three_files() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let m = common::manifest(
        r#"
name: skyt1_longcot
task: cot
source: { path: "longcot/*.jsonl" }
format: jsonl
fields: { question: question, reasoning: code.0, answer: gt }
license: Apache-2.0
split: test
"#,
    );
    let mut s = ExampleStream::open(m, Some(&data)).unwrap();
    let all: Vec<_> = s.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(s.stats().files, 3);
    assert_eq!(all.len(), 19 + 24 + 111, "aime24 + amc23 + math500");
    assert!(all.iter().all(|e| {
        e.reasoning
            .as_ref()
            .unwrap()
            .starts_with("<|begin_of_thought|>")
    }));
    let tok = common::llama2(&data);
    let cfg = LayoutConfig {
        max_lm_len: 2048,
        ..Default::default()
    };
    let samples: Vec<_> = all
        .iter()
        .map(|e| layout_example(e, &tok, &cfg, false).unwrap())
        .collect();
    let stats = LengthStats::of(&samples, tok.layout().eos_id);
    // aime24 traces run to 40 K characters: many are cut at 2048 tokens.
    assert!(stats.truncated > 10 && stats.truncated < 154, "{stats:?}");
    let (kept, dropped) = mmada_data::filter_overlong(samples);
    assert_eq!(dropped, stats.truncated);
    assert_eq!(kept.len() + dropped, 154);
}

#[test]
fn llava_json_array_with_images() {
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
image_check: header
license: Apache-2.0
split: train
"#,
    );
    let all: Vec<_> = ExampleStream::open(m, Some(&data))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(all.len(), 6);
    let e = &all[0];
    assert_eq!(e.id.as_deref(), Some("mllm_demo_1"));
    assert_eq!(e.messages.len(), 4);
    assert_eq!(e.messages[0].role, Role::User);
    assert_eq!(e.messages[0].content, "Who are they?", "<image>\\n removed");
    let Some(ImageRef::Path(p)) = &e.image else {
        panic!("image path")
    };
    assert!(p.ends_with("llava/images/mllm_demo_data/1.jpg") && p.is_file());
    // mmu layout with stand-in codes (the image tokenizer is another issue).
    let tok = common::gpt2(&data);
    let t = *tok.layout();
    let mut e = e.clone();
    e.image = Some(ImageRef::Codes((0..16).collect()));
    let cfg = LayoutConfig {
        max_seq_length: 128,
        ..Default::default()
    };
    let s = layout_example(&e, &tok, &cfg, false).unwrap();
    assert_eq!(s.len(), 16 + 3 + 128);
    assert_eq!(&s.ids[..2], &[t.mmu_id, t.soi_id]);
    assert_eq!(s.ids[18], t.eoi_id);
    assert_eq!(s.ids[19], t.bos_id);
    let text = render_sample(&s, &tok).unwrap();
    assert!(
        text.starts_with("<|mmu|><|soi|><image×16><|eoi|><|endoftext|><|start_header_id|>user"),
        "{text}"
    );
    assert!(text.contains("What are they doing?<|eot_id|><|start_header_id|>assistant<|end_header_id|>⟦ANSWER⟧\nThey are celebrating on the soccer field."), "{text}");
}

#[test]
fn geometry3k_jsonl_with_images() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let m = common::manifest(
        r#"
name: geometry3k
task: mmu
source: { path: visual_reasoning/geometry3k_examples10.jsonl }
format: jsonl
fields: { question: problem_text, answer: answer_text, image: image }
image_root: visual_reasoning/images
image_check: header
license: MIT
split: test
"#,
    );
    let all: Vec<_> = ExampleStream::open(m, Some(&data))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(all.len(), 10);
    assert_eq!(all[0].answer.as_deref(), Some("80"));
    assert!(matches!(&all[0].image, Some(ImageRef::Path(p)) if p.ends_with("geometry3k/11.png")));
}

#[test]
fn mmu_validation_skips_missing_images() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let yaml = r#"
name: mmu_validation
task: mmu
source: { path: mmada/mmu_validation/prompts.jsonl }
format: jsonl
fields: { text: prompt, image: file_name }
license: MIT
split: validation
"#;
    // Default: the first missing image (sunflower.jpg, line 7) is an error naming it.
    let mut s = ExampleStream::open(common::manifest(yaml), Some(&data)).unwrap();
    let res: Vec<_> = s.by_ref().collect();
    assert_eq!(res.len(), 7);
    match res.last().unwrap() {
        Err(DataError::Image {
            at, field, image, ..
        }) => {
            assert_eq!((at.row, *field), (7, "image"));
            assert!(image.ends_with("sunflower.jpg"));
            assert!(at.manifest == "mmu_validation" && at.file.ends_with("prompts.jsonl"));
        }
        other => panic!("expected an image error, got {other:?}"),
    }
    // on_error: skip → 8 examples, 2 skipped, reported.
    let mut s = ExampleStream::open(
        common::manifest(&format!("{yaml}on_error: skip\n")),
        Some(&data),
    )
    .unwrap();
    let ok: Vec<_> = s.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(ok.len(), 8);
    assert_eq!(s.stats().skipped_records, 2);
    assert_eq!(s.stats().reasons.len(), 2);
    assert!(ok.iter().all(|e| e.task == Some(Task::Mmu)));
    // The prompt is already chat-formatted (with the `<eot_id>` typo as plain text).
    let tok = common::gpt2(&data);
    let t = *tok.layout();
    let ids = tok.encode(ok[0].text.as_ref().unwrap()).unwrap();
    let s = mmada_data::layout::mmu_layout(&[1, 2, 3, 4], TextSplit::LastEndHeader(&ids), 256, &t)
        .unwrap();
    assert_eq!(s.ids[s.prompt_len - 1], t.end_header_id);
    assert_eq!(
        ids.iter().filter(|&&x| x == t.eot_id).count(),
        0,
        "`<eot_id>` is not the special token"
    );
}

// ------------------------------------------------------------ bad input

fn tmp_manifest(
    dir: &std::path::Path,
    file: &str,
    format: &str,
    extra: &str,
) -> mmada_data::Manifest {
    common::manifest(&format!(
        "name: bad\ntask: chat\nsource: {{ path: {} }}\nformat: {format}\nfields: {{ question: question, answer: answer }}\nlicense: none\nsplit: test\n{extra}",
        dir.join(file).display()
    ))
}

#[test]
fn malformed_json_line_and_missing_answer() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.jsonl"),
        "{\"question\": \"q1\", \"answer\": \"a1\"}\n{\"question\": \"q2\", \"answer\": \n{\"question\": \"q3\"}\n{\"question\": \"q4\", \"answer\": {\"value\": 4}}\n{\"question\": \"q5\", \"answer\": \"a5\"}\n",
    )
    .unwrap();
    let m = tmp_manifest(dir.path(), "a.jsonl", "jsonl", "");
    let res: Vec<_> = ExampleStream::open(m, None).unwrap().collect();
    assert_eq!(res.len(), 2, "stops at the first error");
    match &res[1] {
        Err(e @ DataError::Malformed { at, .. }) => {
            assert_eq!(at.row, 2);
            let msg = e.to_string();
            assert!(
                msg.contains("manifest `bad`") && msg.contains("a.jsonl") && msg.contains("line 2"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    let m = tmp_manifest(dir.path(), "a.jsonl", "jsonl", "on_error: skip\n");
    let mut s = ExampleStream::open(m, None).unwrap();
    let ok: Vec<_> = s.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(
        ok.iter()
            .map(|e| e.question.clone().unwrap())
            .collect::<Vec<_>>(),
        ["q1", "q5"]
    );
    assert_eq!(s.stats().skipped_records, 3);
    let r = &s.stats().reasons;
    assert!(
        r[1].contains("line 3") && r[1].contains("field `answer`") && r[1].contains("missing"),
        "{r:?}"
    );
    assert!(
        r[2].contains("line 4")
            && r[2].contains("field `answer`")
            && r[2].contains("expected a string, found an object"),
        "{r:?}"
    );
}

#[test]
fn unreadable_image_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.png"), b"not a png at all").unwrap();
    std::fs::write(
        dir.path().join("v.jsonl"),
        "{\"q\": \"what?\", \"img\": \"broken.png\"}\n",
    )
    .unwrap();
    let m = common::manifest(&format!(
        "name: img\ntask: mmu\nsource: {{ path: {} }}\nformat: jsonl\nfields: {{ text: q, image: img }}\nimage_check: header\nlicense: none\nsplit: test\n",
        dir.path().join("v.jsonl").display()
    ));
    let res: Vec<_> = ExampleStream::open(m, None).unwrap().collect();
    match &res[0] {
        Err(DataError::Image {
            at, image, message, ..
        }) => {
            assert_eq!(at.row, 1);
            assert!(image.ends_with("broken.png"));
            assert!(
                message.contains("cannot decode") || message.contains("format"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn empty_files_error_or_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("e.jsonl"), "").unwrap();
    std::fs::write(dir.path().join("e.json"), "[ ]").unwrap();
    for (file, fmt) in [("e.jsonl", "jsonl"), ("e.json", "json")] {
        let m = tmp_manifest(dir.path(), file, fmt, "");
        let res: Vec<_> = ExampleStream::open(m, None).unwrap().collect();
        assert!(
            matches!(&res[..], [Err(DataError::EmptyFile { file: f, .. })] if f.ends_with(file)),
            "{res:?}"
        );
        let m = tmp_manifest(dir.path(), file, fmt, "on_error: skip\n");
        let mut s = ExampleStream::open(m, None).unwrap();
        assert_eq!(s.by_ref().count(), 0);
        assert_eq!(s.stats().skipped_files, 1);
    }
}

#[test]
fn json_array_streams_elements_with_lines() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.json"),
        "[\n {\"question\": \"q]1\", \"answer\": \"a\\\"1\"},\n {\"question\": \"q2\",\n  \"answer\": [1]}\n]\n",
    )
    .unwrap();
    let m = tmp_manifest(dir.path(), "a.json", "json", "");
    let res: Vec<_> = ExampleStream::open(m, None).unwrap().collect();
    assert_eq!(res[0].as_ref().unwrap().answer.as_deref(), Some("a\"1"));
    assert_eq!(res[0].as_ref().unwrap().question.as_deref(), Some("q]1"));
    match &res[1] {
        Err(DataError::Field { at, field, .. }) => assert_eq!((at.row, *field), (3, "answer")),
        other => panic!("{other:?}"),
    }
}

fn write_parquet(path: &std::path::Path, answer: arrow_array::ArrayRef) {
    let q: arrow_array::ArrayRef = Arc::new(arrow_array::StringArray::from(vec!["q1", "q2"]));
    let batch =
        arrow_array::RecordBatch::try_from_iter(vec![("question", q), ("answer", answer)]).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_reads_and_wrong_column_type_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_parquet(
        &dir.path().join("ok.parquet"),
        Arc::new(arrow_array::StringArray::from(vec!["a1", "a2"])),
    );
    write_parquet(
        &dir.path().join("bad.parquet"),
        Arc::new(arrow_array::Int64Array::from(vec![1, 2])),
    );
    let m = tmp_manifest(dir.path(), "ok.parquet", "parquet", "");
    let ok: Vec<_> = ExampleStream::open(m, None)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ok.len(), 2);
    assert_eq!(
        (ok[1].answer.as_deref(), ok[1].source.row, ok[1].source.unit),
        (Some("a2"), 1, "row")
    );

    // an integer column where text is expected reads as the numbers' text
    let m = tmp_manifest(dir.path(), "bad.parquet", "parquet", "");
    let ok: Vec<_> = ExampleStream::open(m, None)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let answers: Vec<_> = ok.iter().map(|e| e.answer.clone().unwrap()).collect();
    assert_eq!(answers, ["1", "2"]);
}

/// Files as users have them: a UTF-8 byte order mark, CRLF line ends, numbers and booleans
/// where text is expected (a numeric GSM8K answer), in JSONL and in a JSON array.
#[test]
fn bom_crlf_and_numeric_answers_read() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        r#"{"question": "What is 40 + 2?", "answer": 42}"#,
        r#"{"question": "Half of 3?", "answer": 1.5}"#,
        r#"{"question": "Is 2 even?", "answer": true}"#,
        r#"{"question": 7, "answer": "seven"}"#,
    ];
    let want = [
        ("What is 40 + 2?", "42"),
        ("Half of 3?", "1.5"),
        ("Is 2 even?", "true"),
        ("7", "seven"),
    ];
    let jsonl = format!("\u{feff}{}\r\n", rows.join("\r\n"));
    std::fs::write(dir.path().join("bom.jsonl"), jsonl).unwrap();
    let json = format!("\u{feff}[\r\n{}\r\n]\r\n", rows.join(",\r\n"));
    std::fs::write(dir.path().join("bom.json"), json).unwrap();
    // (file, format, line of the first and of the fourth element)
    for (file, format, first, fourth) in [("bom.jsonl", "jsonl", 1, 4), ("bom.json", "json", 2, 5)]
    {
        let m = tmp_manifest(dir.path(), file, format, "");
        let ex: Vec<_> = ExampleStream::open(m, None)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let got: Vec<(String, String)> = ex
            .iter()
            .map(|e| (e.question.clone().unwrap(), e.answer.clone().unwrap()))
            .collect();
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(q, a)| (q.to_string(), a.to_string()))
            .collect();
        assert_eq!(got, want, "{file}");
        assert_eq!(
            ex[0].source.row, first,
            "{file}: the first row keeps its line"
        );
        assert_eq!(ex[3].source.row, fourth, "{file}: CRLF lines count once");
    }
    // a null answer is still an error naming file, line and field
    std::fs::write(
        dir.path().join("null.jsonl"),
        "\u{feff}{\"question\": \"q\", \"answer\": null}\r\n",
    )
    .unwrap();
    let m = tmp_manifest(dir.path(), "null.jsonl", "jsonl", "");
    let e = ExampleStream::open(m, None)
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("null.jsonl")
            && e.contains("line 1")
            && e.contains("`answer`")
            && e.contains("null"),
        "{e}"
    );
}

#[test]
fn arrow_ipc_file_reads() {
    let dir = tempfile::tempdir().unwrap();
    let q: arrow_array::ArrayRef = Arc::new(arrow_array::StringArray::from(vec!["q1", "q2", "q3"]));
    let a: arrow_array::ArrayRef =
        Arc::new(arrow_array::LargeStringArray::from(vec!["a1", "a2", "a3"]));
    let batch =
        arrow_array::RecordBatch::try_from_iter(vec![("question", q), ("answer", a)]).unwrap();
    for (name, stream) in [("f.arrow", false), ("s.arrow", true)] {
        let f = std::fs::File::create(dir.path().join(name)).unwrap();
        if stream {
            let mut w = arrow_ipc::writer::StreamWriter::try_new(f, &batch.schema()).unwrap();
            w.write(&batch).unwrap();
            w.finish().unwrap();
        } else {
            let mut w = arrow_ipc::writer::FileWriter::try_new(f, &batch.schema()).unwrap();
            w.write(&batch).unwrap();
            w.finish().unwrap();
        }
        let m = tmp_manifest(dir.path(), name, "arrow", "");
        let ok: Vec<_> = ExampleStream::open(m, None)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ok.len(), 3, "{name}");
        assert_eq!(ok[2].answer.as_deref(), Some("a3"));
    }
}
