//! Examples/s for tokenising + laying out GSM8K (1319 rows) and the Sky-T1 math500
//! long-CoT file (111 rows) with the Llama-2 tokenizer (+ MMaDA tokens). Needs
//! `../shared/data`; skipped with a message when it is absent.

use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mmada_data::{Example, ExampleStream, LayoutConfig, Manifest, TextTokenizer, layout_example};

fn load(data: &std::path::Path, yaml: &str) -> Vec<Example> {
    let m = Manifest::from_yaml(yaml, "bench").expect("manifest");
    ExampleStream::open(m, Some(data))
        .expect("open")
        .collect::<Result<_, _>>()
        .expect("read")
}

fn bench(c: &mut Criterion) {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if !data.is_dir() {
        eprintln!("SKIP: {} not found", data.display());
        return;
    }
    let tok =
        TextTokenizer::from_file_with_mmada_tokens(&data.join("tokenizers/llama2/tokenizer.json"))
            .expect("tokenizer");
    let gsm8k = load(
        &data,
        "name: gsm8k\ntask: cot\nsource: { path: math/gsm8k_test.jsonl }\nformat: jsonl\nfields: { question: question, answer: answer, answer_marker: \"####\" }\nlicense: MIT\nsplit: test\n",
    );
    let longcot = load(
        &data,
        "name: longcot\ntask: cot\nsource: { path: longcot/skyt1_math500_longcot.jsonl }\nformat: jsonl\nfields: { question: question, reasoning: code.0, answer: gt }\nlicense: Apache-2.0\nsplit: test\n",
    );
    let mut g = c.benchmark_group("tokenise+layout");
    g.sample_size(10);
    for (name, exs, len) in [("gsm8k", &gsm8k, 512), ("longcot_math500", &longcot, 4096)] {
        let cfg = LayoutConfig {
            max_lm_len: len,
            ..Default::default()
        };
        g.throughput(Throughput::Elements(exs.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                exs.iter()
                    .map(|e| layout_example(e, &tok, &cfg, false).expect("layout").len())
                    .sum::<usize>()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
