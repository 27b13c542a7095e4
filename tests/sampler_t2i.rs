//! MMaDA `t2i_generate` (MaskGIT) parity with the official PyTorch code (`fixtures/t2i/*`,
//! spec §4.3).
//!
//! Upstream always samples with `torch.multinomial` and draws the `mask_by_random_topk` Gumbel
//! noise from the same generator, so the fixture records both (`sampled_ids_per_step`,
//! `gumbel_noise_per_step`) and the test injects them through [`MaskGitRandomness`]. With them
//! every case must reproduce `output_codes`, every step's image slot `image_ids_per_step`, the
//! final canvas and the effective temperatures, exactly.

mod common;

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};
use common::{Fixture, fixture_root};
use mmada_model::backend::Cpu;
use mmada_model::{FloatDType, LladaModel, load_checkpoint};
use mmada_sampler::{
    MaskGitRandomness, MaskSchedule, SamplerError, SeededRng, T2iConfig, T2iInputs, t2i_generate,
};
use serde_json::Value;

/// Replays the draws recorded from the upstream run.
struct Recorded {
    sampled: Vec<i64>, // [S, B, N]
    gumbel: Vec<f32>,  // [S, B, N]
    per_step: usize,   // B·N
    probs_rows_checked: usize,
}

impl<B: Backend> MaskGitRandomness<B> for Recorded {
    fn sample_codes(&mut self, step: usize, probs: Tensor<B, 3>) -> Result<Vec<i64>, SamplerError> {
        // the sampler hands over proper distributions
        let [b, n, k] = probs.dims();
        assert_eq!(b * n, self.per_step);
        let p = probs.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        for row in p.chunks(k) {
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "probs row sums to {s}");
            assert!(row.iter().all(|&x| x >= 0.0));
        }
        self.probs_rows_checked += b * n;
        let a = step * self.per_step;
        Ok(self.sampled[a..a + self.per_step].to_vec())
    }
    fn gumbel_noise(
        &mut self,
        step: usize,
        batch: usize,
        n: usize,
    ) -> Result<Vec<f32>, SamplerError> {
        assert_eq!(batch * n, self.per_step);
        let a = step * self.per_step;
        Ok(self.gumbel[a..a + self.per_step].to_vec())
    }
}

fn meta(case: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(case.join("meta.json")).unwrap()).unwrap()
}

/// `meta.params` (upstream argument names) → the typed config.
fn config_from(meta: &Value) -> T2iConfig {
    let p = &meta["params"];
    let u = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("params.{k}")) as usize;
    let f = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("params.{k}"));
    let schedule: MaskSchedule = serde_json::from_value(p["noise_schedule"].clone()).unwrap();
    T2iConfig {
        timesteps: u("timesteps"),
        guidance_scale: f("guidance_scale"),
        temperature: f("temperature"),
        noise_schedule: schedule,
        seq_len: u("seq_len"),
        codebook_size: u("codebook_size"),
        image_token_offset: u("text_vocab_len"),
        mask_id: u("mask_token_id") as u32,
    }
}

fn bool_mask(fx: &Fixture, name: &str) -> Tensor<Cpu, 2, Bool> {
    let shape = fx.shape(name);
    let v: Vec<bool> = fx.ints(name).into_iter().map(|x| x != 0).collect();
    Tensor::from_data(
        TensorData::new(v, [shape[0], shape[1]]),
        &Default::default(),
    )
}

fn inputs(fx: &Fixture) -> T2iInputs<Cpu> {
    let mut inp = T2iInputs::new(
        fx.int_tensor2("input_ids"),
        Some(bool_mask(fx, "attention_mask")),
    );
    if fx.names().contains(&"uncond_input_ids".to_string()) {
        inp = inp.with_uncond(
            fx.int_tensor2("uncond_input_ids"),
            Some(bool_mask(fx, "uncond_attention_mask")),
        );
    }
    inp
}

fn model(meta: &Value) -> LladaModel<Cpu> {
    let weights = meta["weights"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    load_checkpoint::<Cpu>(
        &fixture_root().join(weights),
        &Default::default(),
        FloatDType::F32,
    )
    .unwrap()
    .1
}

fn to_i64(t: Tensor<Cpu, 2, burn::tensor::Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec().unwrap()
}

fn run_case(case: &Path) -> String {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let meta = meta(case);
    let config = config_from(&meta);
    // the recorded resolution+1 prefix is the text block + <soi>, i.e. what we derive
    assert_eq!(
        meta["params"]["resolution"].as_u64().unwrap() as usize + 1 + config.seq_len + 1,
        Fixture::open(&case.join("tensors.safetensors")).shape("input_ids")[1],
        "{name}: layout"
    );
    // the ids in meta agree with the token layout of the tiny vocabulary
    let vocab = std::fs::read_to_string(fixture_root().join("tiny_vocab.json")).unwrap();
    let layout = mmada_model::TokenLayout::from_tiny_vocab_json(&vocab).unwrap();
    let from_layout = T2iConfig::from_layout(&layout, config.seq_len);
    assert_eq!(
        (
            from_layout.mask_id,
            from_layout.image_token_offset,
            from_layout.codebook_size
        ),
        (
            config.mask_id,
            config.image_token_offset,
            config.codebook_size
        ),
        "{name}: meta ids vs tiny_vocab.json"
    );
    let model = model(&meta);
    let fx = Fixture::open(&case.join("tensors.safetensors"));
    let [b, _l] = [fx.shape("input_ids")[0], fx.shape("input_ids")[1]];
    let n = config.seq_len;
    let s = config.timesteps;
    assert_eq!(fx.shape("sampled_ids_per_step"), vec![s, b, n], "{name}");
    let mut rng = Recorded {
        sampled: fx.ints("sampled_ids_per_step"),
        gumbel: fx.floats("gumbel_noise_per_step"),
        per_step: b * n,
        probs_rows_checked: 0,
    };
    let out = t2i_generate(&model, inputs(&fx), &config, &mut rng, true)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(rng.probs_rows_checked, s * b * n);
    assert_eq!(out.nfe, s, "{name}: nfe");
    assert_eq!(
        to_i64(out.codes),
        fx.ints("output_codes"),
        "{name}: output_codes"
    );
    assert_eq!(
        to_i64(out.input_ids),
        fx.ints("final_input_ids"),
        "{name}: final_input_ids"
    );
    let trace = out.trace.expect("trace");
    let want = fx.ints("image_ids_per_step");
    assert_eq!(trace.image_ids_per_step.len(), s + 1, "{name}");
    for (step, got) in trace.image_ids_per_step.iter().enumerate() {
        assert_eq!(
            got.as_slice(),
            &want[step * b * n..(step + 1) * b * n],
            "{name}: image ids fed at step {step}"
        );
    }
    // the last step leaves exactly mask_len (>= 1) slots masked per row
    let last = trace.image_ids_per_step.last().unwrap();
    for r in 0..b {
        let masked = last[r * n..(r + 1) * n]
            .iter()
            .filter(|&&t| t == i64::from(config.mask_id))
            .count();
        assert_eq!(masked, trace.mask_len_per_step[s - 1][r], "{name}: row {r}");
        assert!(masked >= 1);
    }
    let temps: Vec<f64> = meta["effective_temperature_per_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(trace.temperature_per_step.len(), temps.len());
    for (a, w) in trace.temperature_per_step.iter().zip(&temps) {
        assert!(
            (a - w).abs() <= 1e-12 * w.abs().max(1.0),
            "{name}: temperature {a} vs {w}"
        );
    }
    format!(
        "t2i/{name}: output_codes + {} image steps + final_input_ids exact (cfg {})",
        trace.image_ids_per_step.len(),
        config.guidance_scale
    )
}

#[test]
fn t2i_matches_official_pytorch_every_step() {
    let dir = fixture_root().join("t2i");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("meta.json").is_file())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 3,
        "expected the 3 t2i fixture cases, found {cases:?}"
    );
    for c in &cases {
        println!("{}", run_case(c));
    }
}

#[test]
fn t2i_seeded_sampling_is_reproducible_and_well_formed() {
    let case = fixture_root().join("t2i/t1_steps5_cfg2");
    let meta = meta(&case);
    let config = config_from(&meta);
    let model = model(&meta);
    let fx = Fixture::open(&case.join("tensors.safetensors"));
    let run = |seed| {
        let out = t2i_generate(
            &model,
            inputs(&fx),
            &config,
            &mut SeededRng::new(seed),
            true,
        )
        .unwrap();
        (to_i64(out.codes), out.trace.unwrap())
    };
    let (a, ta) = run(11);
    let (a2, _) = run(11);
    let (c, _) = run(12);
    assert_eq!(a, a2, "same seed, same codes");
    assert_ne!(a, c, "different seeds should differ");
    let k = config.codebook_size as i64;
    assert!(a.iter().all(|&x| (0..k).contains(&x)));
    // mask_len is non-increasing and the number of masked slots follows it
    let mask = i64::from(config.mask_id);
    let n = config.seq_len;
    for (s, lens) in ta.mask_len_per_step.iter().enumerate() {
        for (r, &ml) in lens.iter().enumerate() {
            let masked = ta.image_ids_per_step[s + 1][r * n..(r + 1) * n]
                .iter()
                .filter(|&&t| t == mask)
                .count();
            assert_eq!(masked, ml, "step {s} row {r}");
        }
    }
}
