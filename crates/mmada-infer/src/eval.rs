//! `mmada-infer eval`: GSM8K / MATH-500 accuracy.
//!
//! Items are read through an `mmada-data` manifest built for the given file (jsonl, json,
//! parquet or arrow); the reference answer and the model's final answer are extracted and
//! compared with `mmada_rewards::extract`, the same code as the UniGRPO correctness reward:
//!
//! * GSM8K: reference = [`gsm8k_answer`] of the `answer` field (`#### N`);
//! * MATH-500: reference = the `answer` field;
//! * model output: [`completion_answer`] (after the last `</think>`: `\boxed{}`, `####`,
//!   "the answer is", last number); match: [`answers_match`] (MATH normalisation + numeric).

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::backend::Backend;
use mmada_data::{ExampleStream, Manifest};
use mmada_rewards::extract::{answers_match, completion_answer, gsm8k_answer};
use mmada_sampler::SamplerSection;

use crate::engine::Engine;
use crate::options::{EvalArgs, ModelArgs, TaskArg};

/// Default user turn of the evaluation prompt.
pub const DEFAULT_PROMPT: &str =
    "{question}\nPlease reason step by step, and put your final answer within \\boxed{}.";

/// One benchmark item.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Record id (MATH-500 `unique_id`) or the line index.
    pub id: String,
    /// The problem.
    pub question: String,
    /// The reference final answer.
    pub gold: String,
}

fn manifest_for(task: TaskArg, data: &Path) -> Result<Manifest> {
    let ext = data
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let format = match ext.as_str() {
        "jsonl" => "jsonl",
        "json" => "json",
        "parquet" => "parquet",
        "arrow" => "arrow",
        other => bail!(
            "data file {}: unknown extension `{other}` (expected .jsonl, .json, .parquet or .arrow)",
            data.display()
        ),
    };
    let fields = match task {
        TaskArg::Gsm8k => serde_json::json!({"question": "question", "answer": "answer"}),
        TaskArg::Math500 => serde_json::json!({
            "question": "problem", "answer": "answer", "id": "unique_id",
            "required": ["question", "answer"],
        }),
    };
    let m = serde_json::json!({
        "name": match task { TaskArg::Gsm8k => "gsm8k", TaskArg::Math500 => "math500" },
        "task": "cot",
        "source": {"path": data.to_string_lossy()},
        "format": format,
        "fields": fields,
        "license": "see the dataset",
        "split": "test",
    });
    Ok(serde_json::from_value(m)?)
}

/// Reads up to `limit` items of `task` from `data`.
pub fn read_items(task: TaskArg, data: &Path, limit: Option<usize>) -> Result<Vec<Item>> {
    ensure!(data.is_file(), "data file {} not found", data.display());
    let m = manifest_for(task, data)?;
    let stream = ExampleStream::new(m, vec![data.to_path_buf()], None);
    let mut items = Vec::new();
    for (i, ex) in stream.enumerate() {
        if limit.is_some_and(|l| items.len() >= l) {
            break;
        }
        let ex = ex.with_context(|| format!("reading {}", data.display()))?;
        let question = ex
            .question
            .with_context(|| format!("{} item {i}: no question", data.display()))?;
        let raw = ex
            .answer
            .with_context(|| format!("{} item {i}: no answer", data.display()))?;
        let gold = match task {
            TaskArg::Gsm8k => gsm8k_answer(&raw).with_context(|| {
                format!(
                    "{} item {i}: the answer has no `#### N` line",
                    data.display()
                )
            })?,
            TaskArg::Math500 => raw.trim().to_string(),
        };
        items.push(Item {
            id: ex.id.unwrap_or_else(|| i.to_string()),
            question,
            gold,
        });
    }
    ensure!(!items.is_empty(), "no items in {}", data.display());
    Ok(items)
}

/// Runs the benchmark and prints the accuracy.
pub fn run<B: Backend>(
    engine: &Engine<B>,
    m: &ModelArgs,
    s: &SamplerSection,
    e: &EvalArgs,
) -> Result<()> {
    let task = e
        .task
        .context("no task: pass --task gsm8k|math500 or set eval.task in --config")?;
    let data = e
        .data
        .as_deref()
        .context("no data: pass --data FILE or set eval.data in --config")?;
    // a local file, or `owner/name[@rev]:path/in/repo` of a Hub dataset repo
    let data = mmada_data::hub::local_or_file(data, mmada_data::hub::RepoType::Dataset)?;
    let items = read_items(task, &data, e.limit)?;
    let template = e.prompt_template.as_deref().unwrap_or(DEFAULT_PROMPT);
    ensure!(
        template.contains("{question}"),
        "prompt_template must contain {{question}}"
    );
    let config = engine.sampler_config(s).context("sampling settings")?;
    let batch_size = s.batch_size.unwrap_or(4);
    tracing::info!(task = ?task, items = items.len(), batch_size, ?config, "eval");

    let user: Vec<String> = items
        .iter()
        .map(|it| template.replace("{question}", &it.question))
        .collect();
    let ids: Vec<Vec<u32>> = user
        .iter()
        .map(|u| engine.prompt_ids(u))
        .collect::<Result<_>>()?;

    let bar = crate::progress::bar(items.len() as u64, "items");
    let t0 = Instant::now();
    let gens = engine.generate_all(
        &ids,
        &config,
        m.seed.unwrap_or(0),
        batch_size,
        |done| bar.set_position(done as u64),
        &mut |_| {},
    )?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();

    let mut out = match &e.out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut correct = 0usize;
    let mut nfe_total = 0usize;
    let (mut refreshes, mut cache_hits) = (0usize, 0usize);
    let decoded_total: usize = gens.iter().map(|g| g.decoded).sum();
    for (i, ((it, u), g)) in items.iter().zip(&user).zip(&gens).enumerate() {
        let extracted = completion_answer(&g.text);
        let ok = extracted
            .as_deref()
            .is_some_and(|x| answers_match(x, &it.gold));
        correct += usize::from(ok);
        if i % g.batch.max(1) == 0 {
            nfe_total += g.nfe;
            refreshes += g.refreshes;
            cache_hits += g.cache_hits;
        }
        if let Some(w) = out.as_mut() {
            let rec = serde_json::json!({
                "index": i,
                "id": it.id,
                "question": it.question,
                "prompt": u,
                "output": g.text,
                "extracted": extracted,
                "gold": it.gold,
                "correct": ok,
                "nfe": g.nfe,
                "seconds": g.seconds / g.batch as f64,
                "batch_seconds": g.seconds,
                "new_tokens": g.decoded,
            });
            writeln!(w, "{rec}")?;
        }
    }
    if let Some(mut w) = out {
        w.flush()?;
    }
    let n = items.len();
    let new_tokens: usize = decoded_total;
    let acc = correct as f64 / n as f64;
    // tokens committed per row per forward over the run: Σ committed / Σ forwards, per item
    let row_forwards: usize = gens.iter().map(|g| g.nfe).sum();
    let committed: f64 = gens
        .iter()
        .map(|g| g.tokens_per_forward * g.nfe as f64)
        .sum();
    let tokens_per_forward = committed / row_forwards.max(1) as f64;
    tracing::info!(
        correct,
        items = n,
        nfe = nfe_total,
        new_tokens,
        seconds = format!("{secs:.2}"),
        tokens_per_s = format!("{:.1}", new_tokens as f64 / secs.max(1e-9)),
        "eval done"
    );
    println!(
        "{}",
        serde_json::json!({
            "task": match task { TaskArg::Gsm8k => "gsm8k", TaskArg::Math500 => "math500" },
            "items": n,
            "correct": correct,
            "accuracy": acc,
            "nfe": nfe_total,
            "refreshes": refreshes,
            "cache_hits": cache_hits,
            "tokens_per_forward": tokens_per_forward,
            "new_tokens": new_tokens,
            "seconds": secs,
            "tokens_per_s": new_tokens as f64 / secs.max(1e-9),
            "checkpoint": m.checkpoint.as_ref().map(|p| p.display().to_string()),
            "dtype": format!("{:?}", engine.model.dtype()),
            "batch_size": batch_size,
            "prompt_template": template,
            "limit": e.limit,
            "sampling": &config,
        })
    );
    println!("accuracy {correct}/{n} = {:.2}%", 100.0 * acc);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gsm8k_and_math500_items() {
        let dir = std::env::temp_dir().join(format!("mmada-infer-eval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let g = dir.join("g.jsonl");
        std::fs::write(
            &g,
            "{\"question\": \"Q1?\", \"answer\": \"2 + 2 = <<2+2=4>>4\\n#### 1,004\"}\n{\"question\": \"Q2?\", \"answer\": \"x\\n#### 7\"}\n",
        )
        .unwrap();
        let items = read_items(TaskArg::Gsm8k, &g, None).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].question, "Q1?");
        assert_eq!(items[0].gold, "1004");
        assert_eq!(items[1].gold, "7");
        assert_eq!(read_items(TaskArg::Gsm8k, &g, Some(1)).unwrap().len(), 1);
        let m = dir.join("m.jsonl");
        std::fs::write(
            &m,
            "{\"problem\": \"P\", \"solution\": \"s \\\\boxed{\\\\frac{1}{2}}\", \"answer\": \"\\\\frac{1}{2}\", \"unique_id\": \"test/a/1.json\"}\n",
        )
        .unwrap();
        let items = read_items(TaskArg::Math500, &m, None).unwrap();
        assert_eq!(
            items,
            vec![Item {
                id: "test/a/1.json".into(),
                question: "P".into(),
                gold: "\\frac{1}{2}".into()
            }]
        );
        let bad = dir.join("b.txt");
        std::fs::write(&bad, "x").unwrap();
        let e = read_items(TaskArg::Gsm8k, &bad, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown extension"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
