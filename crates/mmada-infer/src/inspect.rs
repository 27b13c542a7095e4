//! `mmada-infer inspect`: a checkpoint's config, tensor groups and verification.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use mmada_model::ModelConfig;
use mmada_model::checkpoint::{CheckpointFiles, HF_PREFIX, expected_tensors};

fn group_of(name: &str) -> &'static str {
    let short = name.strip_prefix(HF_PREFIX).unwrap_or(name);
    if short == "wte.weight" {
        "embedding"
    } else if short == "ff_out.weight" {
        "lm_head"
    } else if short.ends_with("norm.weight") || short == "ln_f.weight" {
        "norms"
    } else if ["q_proj", "k_proj", "v_proj", "attn_out"]
        .iter()
        .any(|p| short.contains(p))
    {
        "attention"
    } else if ["ff_proj", "up_proj", "ff_out"]
        .iter()
        .any(|p| short.contains(p))
    {
        "mlp"
    } else {
        "other"
    }
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.2} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

#[derive(Default)]
struct Group {
    tensors: usize,
    params: u64,
    bytes: u64,
    dtypes: BTreeMap<String, usize>,
}

/// Prints the report; exit code 1 when a tensor is missing, unexpected or misshapen.
pub fn inspect(dir: &Path, json: bool) -> Result<ExitCode> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let files = CheckpointFiles::open(dir)?;
    let mut groups: BTreeMap<&'static str, Group> = BTreeMap::new();
    let mut file_set = std::collections::BTreeSet::new();
    for (name, e, path) in files.entries() {
        let g = groups.entry(group_of(name)).or_default();
        g.tensors += 1;
        g.params += e.shape.iter().product::<usize>() as u64;
        g.bytes += e.end - e.start;
        *g.dtypes.entry(e.dtype.clone()).or_default() += 1;
        file_set.insert(
            path.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    let problems = files.verify(&cfg);
    let total_params: u64 = groups.values().map(|g| g.params).sum();
    let total_bytes: u64 = groups.values().map(|g| g.bytes).sum();
    let n_expected = expected_tensors(&cfg).len();

    if json {
        let report = serde_json::json!({
            "checkpoint": dir.display().to_string(),
            "config": cfg.to_hf_json(),
            "files": file_set,
            "groups": groups.iter().map(|(k, g)| (k.to_string(), serde_json::json!({
                "tensors": g.tensors, "params": g.params, "bytes": g.bytes, "dtypes": g.dtypes,
            }))).collect::<BTreeMap<_, _>>(),
            "total_params": total_params,
            "total_bytes": total_bytes,
            "expected_params": cfg.num_params(),
            "expected_tensors": n_expected,
            "problems": problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "ok": problems.is_empty(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("checkpoint   {}", dir.display());
        println!(
            "model        {} · d_model {} · {} layers · {} heads (head_dim {}, {} kv heads) · mlp {} · vocab {} (embedding rows {})",
            cfg.model_type.as_str(),
            cfg.d_model,
            cfg.n_layers,
            cfg.n_heads,
            cfg.head_dim(),
            cfg.n_kv_heads,
            cfg.mlp_hidden_size,
            cfg.vocab_size,
            cfg.embedding_size
        );
        let id = |x: Option<u32>| x.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "             rope_theta {} · rms_norm_eps {:e} · max_sequence_length {} · mask {} · eos {} · pad {}",
            cfg.rope_theta,
            cfg.rms_norm_eps,
            cfg.max_sequence_length,
            id(cfg.mask_token_id),
            id(cfg.eos_token_id),
            id(cfg.pad_token_id)
        );
        if let (Some(l), Some(c)) = (cfg.llm_vocab_size, cfg.codebook_size) {
            println!(
                "             text vocab {l} · image codebook {c} · vq tokens/image {}",
                id(cfg.num_vq_tokens.map(|x| x as u32))
            );
        }
        println!(
            "files        {} ({})",
            file_set.len(),
            file_set.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        println!();
        println!(
            "{:<10} {:>8} {:>16} {:>12} {:>14}  dtype",
            "group", "tensors", "params", "bytes", ""
        );
        for (k, g) in &groups {
            let dt: Vec<String> = g
                .dtypes
                .iter()
                .map(|(d, n)| {
                    if g.dtypes.len() == 1 {
                        d.clone()
                    } else {
                        format!("{d}×{n}")
                    }
                })
                .collect();
            println!(
                "{:<10} {:>8} {:>16} {:>12} {:>14}  {}",
                k,
                g.tensors,
                g.params,
                g.bytes,
                human(g.bytes),
                dt.join(",")
            );
        }
        println!(
            "{:<10} {:>8} {:>16} {:>12} {:>14}",
            "total",
            groups.values().map(|g| g.tensors).sum::<usize>(),
            total_params,
            total_bytes,
            human(total_bytes)
        );
        println!();
        if problems.is_empty() {
            println!(
                "verified     OK: all {n_expected} tensors present with the shapes config.json implies ({} parameters)",
                cfg.num_params()
            );
        } else {
            println!("verified     {} problem(s):", problems.len());
            for p in &problems {
                println!("  - {p}");
            }
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
