//! Training streams ([`Streams`]): per-source counts, held-out rows, resumable mixtures,
//! stream kinds and the load errors that name stream, source, manifest, file and line.

mod common;

use std::path::Path;

use mmada_data::{
    ImageSources, LayoutConfig, LayoutKind, LoadOptions, Manifest, Mixing, SourceLoad, StreamError,
    StreamKind, StreamSpec, Streams,
};

#[test]
fn stream_kinds_have_the_recipe_names_in_batch_order() {
    assert_eq!(
        StreamKind::ALL.map(StreamKind::as_str),
        ["t2i", "lm", "mmu"]
    );
    assert_eq!(StreamKind::ALL.map(StreamKind::index), [0, 1, 2]);
    for k in StreamKind::ALL {
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(json, format!("\"{k}\""));
        assert_eq!(serde_json::from_str::<StreamKind>(&json).unwrap(), k);
    }
    assert!(serde_json::from_str::<StreamKind>("\"T2I\"").is_err());
    assert!(StreamKind::Lm.accepts(LayoutKind::Chat) && StreamKind::Lm.accepts(LayoutKind::Lm));
    assert!(!StreamKind::Lm.accepts(LayoutKind::Mmu) && !StreamKind::T2i.accepts(LayoutKind::Chat));
    assert!(StreamKind::Mmu.accepts(LayoutKind::Mmu) && StreamKind::T2i.accepts(LayoutKind::T2i));
}

/// `n` chat rows `{"question": "q<i>", "answer": "a<i>"}` in `dir/name.jsonl`, as a manifest.
fn chat_source(dir: &Path, name: &str, task: &str, n: usize) -> Manifest {
    let file = dir.join(format!("{name}.jsonl"));
    let rows: String = (0..n)
        .map(|i| {
            format!(
                "{{\"question\": \"what is {i} plus {i}?\", \"answer\": \"{}\"}}\n",
                2 * i
            )
        })
        .collect();
    std::fs::write(&file, rows).unwrap();
    common::manifest(&format!(
        "name: {name}\ntask: {task}\nsource: {{ path: {} }}\nformat: jsonl\nfields: {{ question: question, answer: answer }}\nlicense: none\nsplit: train\n",
        file.display()
    ))
}

fn lm_spec(sources: Vec<SourceLoad>) -> StreamSpec {
    StreamSpec {
        kind: StreamKind::Lm,
        batch_size: 2,
        mixing: Mixing::PerRow,
        mixture_seed: 7,
        sources,
    }
}

fn opts(eval_examples: usize) -> LoadOptions {
    LoadOptions {
        layout: LayoutConfig {
            max_seq_length: 16,
            max_lm_len: 48,
            ..LayoutConfig::default()
        },
        filter_overlong: true,
        eval_examples,
        ..LoadOptions::default()
    }
}

#[test]
fn streams_count_hold_out_mix_and_resume() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let tok = common::gpt2(&data);
    let dir = tempfile::tempdir().unwrap();
    let src = |name: &str, n, max_examples| SourceLoad {
        manifest: chat_source(dir.path(), name, "chat", n),
        weight: 1.0,
        max_examples,
    };
    let load = || {
        let specs = vec![
            lm_spec(vec![src("a", 6, None), src("b", 9, Some(3))]),
            // disabled: never read (its manifest points nowhere)
            StreamSpec {
                kind: StreamKind::Mmu,
                batch_size: 0,
                mixing: Mixing::PerRow,
                mixture_seed: 1,
                sources: vec![SourceLoad {
                    manifest: common::manifest(
                        "name: gone\ntask: mmu\nsource: { path: /nonexistent.jsonl }\nformat: jsonl\nfields: { question: q, answer: a, image: i }\nlicense: none\nsplit: train\n",
                    ),
                    weight: 1.0,
                    max_examples: None,
                }],
            },
        ];
        Streams::load(specs, &tok, &opts(2), &ImageSources::default()).unwrap()
    };
    let mut s = load();
    // 2 held out of each lm source; `b` reads only max_examples + eval = 5 rows.
    let counts: Vec<_> = s
        .report
        .iter()
        .map(|r| {
            (
                r.name.as_str(),
                r.stream.as_str(),
                r.train_examples,
                r.eval_examples,
            )
        })
        .collect();
    assert_eq!(counts, [("a", "lm", 4, 2), ("b", "lm", 3, 2)]);
    assert_eq!(s.eval_samples().len(), 4);
    assert_eq!(s.kinds(), [StreamKind::Lm]);
    assert_eq!(s.rows_per_micro_batch(), 2);
    assert_eq!(s.images, Default::default());
    let first = s.next_rows();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0, StreamKind::Lm);
    assert_eq!(first[0].1.len(), 2);
    assert!(first[0].1.iter().all(|x| x.kind == LayoutKind::Chat));
    for _ in 0..5 {
        s.next_rows();
    }
    let cursor = s.cursor();
    assert_eq!(cursor[0].0, StreamKind::Lm);
    assert_eq!(cursor[0].1.step, 12);
    let rest: Vec<_> = (0..10).map(|_| s.next_rows()).collect();
    let mut again = load();
    again.resume(&cursor).unwrap();
    assert_eq!((0..10).map(|_| again.next_rows()).collect::<Vec<_>>(), rest);
    let err = again
        .resume(&[(StreamKind::T2i, cursor[0].1.clone())])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("stream `t2i` that the recipe lacks"),
        "{err}"
    );
}

#[test]
fn load_errors_name_stream_source_manifest_and_line() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let tok = common::gpt2(&data);
    let dir = tempfile::tempdir().unwrap();
    let one = |name: &str, task: &str| SourceLoad {
        manifest: chat_source(dir.path(), name, task, 3),
        weight: 1.0,
        max_examples: None,
    };
    let load =
        |specs, o: &LoadOptions| match Streams::load(specs, &tok, o, &ImageSources::default()) {
            Ok(_) => panic!("must fail"),
            Err(e) => e,
        };

    // a chat source under t2i: its rows cannot be noised as images
    let spec = StreamSpec {
        kind: StreamKind::T2i,
        ..lm_spec(vec![one("fine", "chat"), one("chatty", "chat")])
    };
    let e = load(vec![spec], &opts(0));
    assert!(
        matches!(e, StreamError::WrongStream { index: 0, .. }),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("data.t2i.sources[0] (fine)")
            && msg.contains("fine.jsonl")
            && msg.contains("line 1")
            && msg.contains("task `chat`"),
        "{msg}"
    );

    // every row over-long and filtered: the source is empty
    let tight = LoadOptions {
        layout: LayoutConfig {
            max_lm_len: 4,
            ..opts(0).layout
        },
        ..opts(0)
    };
    let e = load(vec![lm_spec(vec![one("long", "chat")])], &tight);
    assert_eq!(
        e.to_string(),
        "data.lm.sources[0] (long): no usable examples (3 over-long, 0 skipped)"
    );

    // the same stream twice
    let e = load(
        vec![
            lm_spec(vec![one("x", "chat")]),
            lm_spec(vec![one("y", "chat")]),
        ],
        &opts(0),
    );
    assert!(e.to_string().contains("stream `lm` given twice"), "{e}");
}

#[test]
fn an_image_file_without_coder_or_table_is_an_error_naming_the_row() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let tok = common::gpt2(&data);
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("x.png");
    image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]))
        .save(&png)
        .unwrap();
    let file = dir.path().join("mmu.jsonl");
    std::fs::write(
        &file,
        format!(
            "{{\"image\": \"{}\", \"question\": \"q\", \"answer\": \"a\"}}\n",
            png.display()
        ),
    )
    .unwrap();
    let manifest = common::manifest(&format!(
        "name: pics\ntask: mmu\nsource: {{ path: {} }}\nformat: jsonl\nfields: {{ image: image, question: question, answer: answer }}\nlicense: none\nsplit: train\n",
        file.display()
    ));
    let spec = StreamSpec {
        kind: StreamKind::Mmu,
        ..lm_spec(vec![SourceLoad {
            manifest,
            weight: 1.0,
            max_examples: None,
        }])
    };
    let e = match Streams::load(vec![spec], &tok, &opts(0), &ImageSources::default()) {
        Ok(_) => panic!("an image without a coder must fail"),
        Err(e) => e,
    };
    assert!(
        matches!(
            e,
            StreamError::NoImageTokenizer {
                stream: StreamKind::Mmu,
                tables: 0,
                ..
            }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("manifest `pics`") && msg.contains("mmu.jsonl, line 1"),
        "{msg}"
    );
}
