//! Stage-2.2 per-batch mixing through the trainer's data stream (`data.lm.mixing:
//! per_batch`): every row of a micro-batch comes from one source, sources follow the weights,
//! and a resumed stream continues with the same sources and rows.

use mmada_train::recipe::Recipe as _;
use std::path::Path;

use mmada_data::LayoutKind;
use mmada_train::data::TrainData;
use mmada_train::recipe::SftRecipe;
use mmada_train::sft::load_tokenizer;

/// Two sources over the same questions, told apart by their layout: `chat` rows (source 0,
/// weight 3) and plain `lm` rows (source 1, weight 1).
fn recipe(dir: &Path, mixing: &str) -> SftRecipe {
    let data = dir.join("data");
    mmada_train::synth::write_arithmetic(&data, 60, 2).unwrap();
    let text = format!(
        r#"
run: {{name: mix, output_dir: "{out}", seed: 10086}}
model: {{preset: tiny}}
tokenizer: {{path: "{tok}"}}
data:
  layout: {{max_seq_length: 32, max_lm_len: 40}}
  filter_overlong: false
  lm:
    batch_size: 2
    mixing: {mixing}
    sources:
      - weight: 3.0
        inline:
          name: chat_rows
          task: chat
          source: {{path: "{jsonl}"}}
          format: jsonl
          fields: {{question: question, answer: answer}}
          license: MIT
          split: train
      - weight: 1.0
        inline:
          name: text_rows
          task: lm
          source: {{path: "{jsonl}"}}
          format: jsonl
          fields: {{text: question}}
          license: MIT
          split: train
optimizer: {{lr: 1.0e-3}}
train: {{max_steps: 1}}
"#,
        out = dir.join("runs").display(),
        tok = data.join("tokenizer.json").display(),
        jsonl = data.join("arith.jsonl").display(),
    );
    SftRecipe::parse(&text, "mix.yaml", &[]).unwrap()
}

fn load(recipe: &SftRecipe) -> TrainData {
    let tok = load_tokenizer(&recipe.tokenizer, Path::new("/")).unwrap();
    TrainData::load(
        &recipe.data,
        &recipe.loss,
        recipe.run.seed,
        tok,
        Path::new("/"),
    )
    .unwrap()
}

/// The kinds of the rows of each of `n` micro-batches (2 rows each).
fn kinds(data: &mut TrainData, n: usize) -> Vec<Vec<LayoutKind>> {
    (0..n)
        .map(|_| {
            let rows = data.next_rows();
            rows[0].1.iter().map(|s| s.kind).collect()
        })
        .collect()
}

#[test]
fn per_batch_mixing_gives_one_source_per_micro_batch_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path(), "per_batch");
    let mut data = load(&r);
    let seq = kinds(&mut data, 400);
    let mut chat = 0;
    for (i, k) in seq.iter().enumerate() {
        assert_eq!(k.len(), 2, "micro-batch {i}");
        assert!(
            k.iter().all(|x| *x == k[0]),
            "micro-batch {i} mixes sources: {k:?}"
        );
        chat += usize::from(k[0] == LayoutKind::Chat);
    }
    let share = chat as f64 / seq.len() as f64;
    println!("per_batch: {share:.3} of 400 micro-batches from the weight-3 source (expected 0.75)");
    assert!((share - 0.75).abs() < 0.07, "share {share}");

    // resume: a fresh stream from the cursor continues identically (sources and rows)
    let mut a = load(&r);
    let _ = kinds(&mut a, 37);
    let cursor = a.cursor();
    let rest: Vec<_> = (0..20).map(|_| a.next_rows()).collect();
    let mut b = load(&r);
    b.resume(&cursor).unwrap();
    let again: Vec<_> = (0..20).map(|_| b.next_rows()).collect();
    assert_eq!(rest, again);

    // per_row (the default) mixes sources within micro-batches
    let mut rows = load(&recipe(tmp.path(), "per_row"));
    let mixed = kinds(&mut rows, 400)
        .iter()
        .filter(|k| k.iter().any(|x| *x != k[0]))
        .count();
    assert!(
        mixed > 50,
        "per_row mixed only {mixed} of 400 micro-batches"
    );
}
