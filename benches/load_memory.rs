//! Peak resident memory while loading a synthetic ~1 GB bf16 checkpoint.
//!
//! Writes a checkpoint of a ~540M-parameter config (bf16 on disk, 3 shards) to a temporary
//! directory, then loads it in a fresh child process (so the peak measures the load alone),
//! once into bf16 and once into f32 parameters, and reports `VmHWM / file size`.
//! Targets: ≤ 1.3 into bf16, ≤ 2.3 into f32.
//!
//! Run: `cargo bench --bench load_memory`.

use std::path::Path;

use mmada_model::backend::Cpu;
use mmada_model::checkpoint::{DiskDtype, SaveOptions};
use mmada_model::{FloatDType, ModelConfig, load_checkpoint, save_checkpoint};

#[path = "common/rss.rs"]
mod rss;
use rss::vm_hwm_kb;

fn config() -> ModelConfig {
    // per layer 4·1024² + 3·1024·2816 = 12.9M; ×38 + 2·32000·1024 ≈ 556M params ≈ 1.11 GB bf16
    ModelConfig {
        d_model: 1024,
        n_layers: 38,
        n_heads: 8,
        n_kv_heads: 8,
        mlp_hidden_size: 2816,
        vocab_size: 32_000,
        embedding_size: 32_000,
        ..ModelConfig::tiny()
    }
}

fn child(dir: &Path, dtype: &str) {
    let dtype = if dtype == "bf16" {
        FloatDType::BF16
    } else {
        FloatDType::F32
    };
    let before = vm_hwm_kb();
    let (_, model) = load_checkpoint::<Cpu>(dir, &Default::default(), dtype).expect("load");
    let after = vm_hwm_kb();
    assert_eq!(model.blocks.len(), config().n_layers);
    println!("{before} {after}");
}

fn main() {
    if let Some(args) = rss::child_args("--child") {
        child(Path::new(&args[0]), &args[1]);
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list
    }
    let cfg = config();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ckpt");
    {
        // Write: init tensor by tensor on the CPU in bf16 (the writer streams one tensor at a time).
        let model =
            mmada_model::init::init_model::<Cpu>(&cfg, 0, &Default::default(), FloatDType::BF16);
        let opts = SaveOptions {
            dtype: DiskDtype::BF16,
            max_shard_bytes: Some(400_000_000),
            ..Default::default()
        };
        save_checkpoint(&model, &cfg, &dir, &opts).expect("save");
    }
    let size: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    println!(
        "synthetic checkpoint: {} params, {:.3} GB of safetensors",
        cfg.num_params(),
        size as f64 / 1e9
    );
    for dtype in ["bf16", "f32"] {
        let text = rss::run_child("--child", &[dir.to_str().unwrap(), dtype]);
        let (before, after) = rss::parse_before_after(&text);
        println!(
            "load into {dtype}: peak RSS {:.3} GB (process baseline {:.3} GB) → peak / file size = {:.3}",
            after as f64 * 1024.0 / 1e9,
            before as f64 * 1024.0 / 1e9,
            after as f64 * 1024.0 / size as f64
        );
    }
}
