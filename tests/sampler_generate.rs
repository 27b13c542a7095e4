//! LLaDA `generate` parity with the official PyTorch code (`fixtures/generate/*`, spec §4.1).
//!
//! Every case folder is discovered from the fixture root; the sampler config is deserialised
//! directly from `meta.json` `params` (its field names are the upstream argument names), the
//! weights folder from `meta.weights`. Each case must reproduce the final `output`, every
//! intermediate canvas `x_per_step`, the `unmask_step` of every position and the number of
//! model calls, exactly.

mod common;

use std::path::Path;

use burn::tensor::{Bool, Tensor, TensorData};
use common::{Fixture, fixture_root};
use mmada_model::backend::Cpu;
use mmada_model::{FloatDType, load_checkpoint};
use mmada_sampler::{CacheMode, GenerateConfig, UniformSource, generate};
use serde_json::Value;

/// A randomness source that counts draws: greedy low-confidence decoding must use none.
struct CountingRng(usize);
impl UniformSource for CountingRng {
    fn uniform_f64(&mut self, n: usize) -> Vec<f64> {
        self.0 += n;
        vec![0.5; n]
    }
}

fn cases(kind: &str) -> Vec<std::path::PathBuf> {
    let dir = fixture_root().join(kind);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("meta.json").is_file())
        .collect();
    v.sort();
    v
}

fn meta(case: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(case.join("meta.json")).unwrap()).unwrap()
}

/// Runs one case; `cache` other than `none` refreshes its key/value cache at every step
/// (`refresh_every: 1`), which must be the uncached sampler exactly.
fn run_case(case: &Path, cache: CacheMode) -> String {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let name = format!("{name} (cache {cache:?})");
    let meta = meta(case);
    let mut config: GenerateConfig = serde_json::from_value(meta["params"].clone())
        .unwrap_or_else(|e| panic!("{name}: params do not deserialise: {e}"));
    config.cache = cache;
    config.refresh_every = usize::from(cache != CacheMode::None);
    config.validate().unwrap();
    let weights = meta["weights"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let device = Default::default();
    let (_, model) =
        load_checkpoint::<Cpu>(&fixture_root().join(weights), &device, FloatDType::F32).unwrap();
    let fx = Fixture::open(&case.join("tensors.safetensors"));
    let prompt = fx.int_tensor2("prompt");
    let [b, lp] = prompt.dims();
    let attention_mask = fx.names().contains(&"attention_mask".to_string()).then(|| {
        let m: Vec<bool> = fx
            .ints("attention_mask")
            .into_iter()
            .map(|x| x != 0)
            .collect();
        Tensor::<Cpu, 2, Bool>::from_data(TensorData::new(m, [b, lp]), &device)
    });
    let mut rng = CountingRng(0);
    let out = generate(&model, prompt, attention_mask, &config, &mut rng, true)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let l = lp + config.gen_length;
    assert_eq!(out.ids.dims(), [b, l], "{name}");
    assert_eq!(fx.shape("output"), vec![b, l], "{name}");

    // final output, exact
    let got: Vec<i64> = out.ids.into_data().convert::<i64>().to_vec().unwrap();
    assert_eq!(got, fx.ints("output"), "{name}: output differs");

    // every step's canvas, exact
    let trace = out.trace.expect("trace requested");
    let want_steps = fx.ints("x_per_step");
    let sshape = fx.shape("x_per_step");
    assert_eq!(sshape, vec![config.steps + 1, b, l], "{name}");
    assert_eq!(trace.canvases.len(), config.steps + 1, "{name}");
    for (s, canvas) in trace.canvases.iter().enumerate() {
        let want = &want_steps[s * b * l..(s + 1) * b * l];
        assert_eq!(
            canvas.as_slice(),
            want,
            "{name}: canvas at step {s} differs"
        );
    }
    assert_eq!(
        trace.unmask_step,
        fx.ints("unmask_step"),
        "{name}: unmask_step differs"
    );
    // NFE = number of model calls recorded upstream
    let calls = meta["stats"]["num_model_calls"].as_u64().unwrap() as usize;
    assert_eq!(out.nfe, calls, "{name}: nfe");
    let refreshes = if cache == CacheMode::None { 0 } else { calls };
    assert_eq!((out.refreshes, out.cache_hits), (refreshes, 0), "{name}");
    // transfers per step sum to the generated length per row
    for r in 0..b {
        let total: usize = trace.transfers.iter().map(|t| t[r]).sum();
        assert_eq!(total, config.gen_length, "{name}: row {r} transfers");
    }
    assert_eq!(
        rng.0, 0,
        "{name}: greedy low-confidence decoding drew randomness"
    );
    format!(
        "generate/{name}: output + {} canvases + unmask_step exact, nfe {}",
        trace.canvases.len(),
        out.nfe
    )
}

#[test]
fn generate_matches_official_pytorch_every_step() {
    let cases = cases("generate");
    assert!(
        cases.len() >= 7,
        "expected the 7 generate fixture cases, found {cases:?}"
    );
    for c in &cases {
        for cache in [CacheMode::None, CacheMode::Prefix, CacheMode::Dual] {
            println!("{}", run_case(c, cache));
        }
    }
}

#[test]
fn generate_rejects_invalid_config_before_running() {
    let root = fixture_root();
    let device = Default::default();
    let (_, model) =
        load_checkpoint::<Cpu>(&root.join("weights"), &device, FloatDType::F32).unwrap();
    let fx = Fixture::open(&root.join("generate/b1_s8_g8/tensors.safetensors"));
    let mut config: GenerateConfig =
        serde_json::from_value(meta(&root.join("generate/b1_s8_g8"))["params"].clone()).unwrap();
    config.block_length = 3; // 8 % 3 != 0
    let err = generate(
        &model,
        fx.int_tensor2("prompt"),
        None,
        &config,
        &mut CountingRng(0),
        false,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            mmada_sampler::SamplerError::InvalidConfig {
                field: "gen_length",
                ..
            }
        ),
        "{err}"
    );
}
