//! PEFT round trip (issue 16): an adapter saved by mmada-rs (`tests/fixtures/lora_peft/adapter`)
//! loaded by Python PEFT 0.21 over the official modeling code (`LLaDAModelLM`,
//! Gen-Verse/MMaDA `models/modeling_llada.py` @ 3cdb870) gives the logits we compute, and the
//! adapter PEFT saves back (`peft_resaved/`) loads here with the same logits.
//!
//! Fixture: `write_adapter_fixture` (ignored) writes the adapter over `tests/fixtures/weights`;
//! `scripts/peft_roundtrip.py` then writes `peft_logits.safetensors` and `peft_resaved/`.
//! CI does not need Python.

use std::path::PathBuf;

use burn::module::Param;
use burn::tensor::{Distribution, FloatDType, Int, Tensor, TensorData};
use mmada_model::adapter::{load_adapter, save_adapter};
use mmada_model::backend::Cpu;
use mmada_model::lora::{LoraConfig, LoraTarget};
use mmada_model::{Attention, LladaModel, load_checkpoint};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn base() -> LladaModel<Cpu> {
    load_checkpoint::<Cpu>(
        &fixtures().join("weights"),
        &Default::default(),
        FloatDType::F32,
    )
    .unwrap()
    .1
}

/// The settings of the committed adapter: r 4, α 8, every block projection, and the final
/// norm as a module to save.
fn lora_config() -> LoraConfig {
    let mut c = LoraConfig::new(4, 8.0);
    c.modules_to_save = vec!["ln_f".into()];
    c
}

#[test]
#[ignore = "writes tests/fixtures/lora_peft/adapter (then run scripts/peft_roundtrip.py)"]
fn write_adapter_fixture() {
    let cfg = lora_config();
    let mut m = base().with_lora(&cfg, 16).unwrap();
    // trained-looking adapters: B ~ N(0, 0.1²), a perturbed final norm
    <Cpu as burn::tensor::backend::Backend>::seed(&Default::default(), 16);
    for b in &mut m.blocks {
        let lora = b.lora.as_mut().unwrap();
        for t in LoraTarget::ALL {
            if let Some(a) = lora.slot(t).as_mut() {
                let dims = a.lora_b.val().dims();
                a.lora_b = Param::from_tensor(Tensor::random(
                    dims,
                    Distribution::Normal(0.0, 0.1),
                    &Default::default(),
                ));
            }
        }
    }
    let w = m.ln_f.weight.val();
    m.ln_f.weight = Param::from_tensor(w * 1.25);
    let out = fixtures().join("lora_peft/adapter");
    save_adapter(&m, &cfg, &out, Some("tests/fixtures/weights"), true).unwrap();
}

struct PeftLogits {
    ids: Tensor<Cpu, 2, Int>,
    on: Vec<f32>,
    merged: Vec<f32>,
    base: Vec<f32>,
}

fn peft_logits() -> PeftLogits {
    let bytes = std::fs::read(fixtures().join("lora_peft/peft_logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: &str| -> Vec<f32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let t = st.tensor("ids").unwrap();
    let ids: Vec<i64> = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let shape = [t.shape()[0], t.shape()[1]];
    PeftLogits {
        ids: Tensor::from_data(TensorData::new(ids, shape), &Default::default()),
        on: f32s("logits"),
        merged: f32s("logits_merged"),
        base: f32s("logits_base"),
    }
}

fn logits(m: &LladaModel<Cpu>, ids: &Tensor<Cpu, 2, Int>) -> Vec<f32> {
    m.forward(ids.clone(), &Attention::Full)
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn our_adapter_gives_the_peft_logits_over_the_official_model() {
    let want = peft_logits();
    let (model, cfg) = load_adapter(base(), &fixtures().join("lora_peft/adapter")).unwrap();
    assert_eq!(cfg, lora_config());
    let on = logits(&model, &want.ids);
    let d_on = max_diff(&on, &want.on);
    let moved = max_diff(&want.on, &want.base);
    println!("adapter on vs PEFT: {d_on:e} (the adapter moves the logits by {moved:e})");
    assert!(
        moved > 0.1,
        "the fixture adapter barely changes the logits ({moved})"
    );
    // the forward parity tolerance of tests/parity_forward.rs
    assert!(d_on <= 1e-5, "adapter-on logits differ from PEFT by {d_on}");
    // PEFT's disable_adapter (the original ln_f, no LoRA) is the plain base
    let d_plain = max_diff(&logits(&base(), &want.ids), &want.base);
    assert!(
        d_plain <= 1e-5,
        "base logits differ from the official model by {d_plain}"
    );
    let merged = logits(&model.merge_lora(), &want.ids);
    let d_merged = max_diff(&merged, &want.merged);
    assert!(
        d_merged <= 1e-5,
        "merged logits differ from PEFT merge_and_unload by {d_merged}"
    );
}

#[test]
fn the_adapter_peft_saves_loads_here_with_the_same_logits() {
    let want = peft_logits();
    let dir = fixtures().join("lora_peft/peft_resaved");
    let (model, cfg) = load_adapter(base(), &dir).unwrap();
    assert_eq!((cfg.r, cfg.alpha), (4, 8.0));
    assert_eq!(cfg.target_modules.len(), 7);
    assert_eq!(cfg.modules_to_save, vec!["ln_f".to_string()]);
    let d = max_diff(&logits(&model, &want.ids), &want.on);
    assert!(d <= 1e-5, "PEFT-saved adapter: logits differ by {d}");
}
