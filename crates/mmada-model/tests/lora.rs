//! LoRA adapters ([`mmada_model::lora`], [`mmada_model::adapter`]): fresh adapters (B = 0)
//! give exactly the base logits; merged weights `W + (α/r)·A·B` give the adapter-on logits;
//! the base gets no gradient; PEFT-format files round-trip bit for bit; bad adapters are
//! refused with the tensor named.

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Param};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, FloatDType, Int, Tensor, TensorData};
use mmada_model::adapter::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, load_adapter, save_adapter,
};
use mmada_model::backend::Cpu;
use mmada_model::init::init_model;
use mmada_model::lora::{LoraConfig, LoraTarget};
use mmada_model::{Attention, LladaModel, ModelConfig};

type Ad = Autodiff<Cpu>;

const BATCH: usize = 2;
const SEQ: usize = 16;

fn ids<B: Backend>(cfg: &ModelConfig) -> Tensor<B, 2, Int> {
    let v: Vec<i32> = (0..BATCH * SEQ)
        .map(|i| ((i * 37 + 11) % cfg.vocab_size) as i32)
        .collect();
    Tensor::from_data(TensorData::new(v, [BATCH, SEQ]), &Default::default())
}

fn logits<B: Backend>(m: &LladaModel<B>, cfg: &ModelConfig) -> Vec<f32> {
    m.forward(ids::<B>(cfg), &Attention::Full)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Every adapter's `B` replaced by N(0, 0.05²) draws, so the adapters change the output.
fn randomise_b<B: Backend>(mut m: LladaModel<B>) -> LladaModel<B> {
    B::seed(&Default::default(), 7);
    for b in &mut m.blocks {
        let lora = b.lora.as_mut().expect("adapters");
        for t in LoraTarget::ALL {
            if let Some(a) = lora.slot(t).as_mut() {
                let dims = a.lora_b.val().dims();
                let r = Tensor::<B, 2>::random(
                    dims,
                    Distribution::Normal(0.0, 0.05),
                    &Default::default(),
                );
                a.lora_b = Param::from_tensor(r);
            }
        }
    }
    m
}

fn tiny() -> ModelConfig {
    ModelConfig::tiny()
}

#[test]
fn fresh_adapters_give_exactly_the_base_logits() {
    let cfg = tiny();
    let base = init_model::<Cpu>(&cfg, 3, &Default::default(), FloatDType::F32);
    let want = logits(&base, &cfg);
    let lora = base.with_lora(&LoraConfig::new(4, 8.0), 1).unwrap();
    assert!(lora.has_lora());
    let got = logits(&lora, &cfg);
    assert_eq!(want, got, "B = 0 must leave the logits bit-identical");
    // adapters switched off after training: the base again
    let trained = randomise_b(lora);
    assert_ne!(logits(&trained, &cfg), want);
    assert_eq!(logits(&trained.without_lora(), &cfg), want);
}

#[test]
fn fresh_adapters_over_a_bf16_base_give_exactly_the_base_logits() {
    let cfg = tiny();
    let base = init_model::<Cpu>(&cfg, 3, &Default::default(), FloatDType::BF16);
    let want = logits(&base, &cfg);
    let lora = base.with_lora(&LoraConfig::new(4, 8.0), 1).unwrap();
    let a = lora.blocks[0].adapter(LoraTarget::QProj).unwrap();
    assert_eq!(a.lora_a.val().dtype(), DType::F32, "adapters are f32");
    assert_eq!(lora.blocks[0].q_proj.weight.val().dtype(), DType::BF16);
    assert_eq!(logits(&lora, &cfg), want);
}

#[test]
fn merged_weights_give_the_adapter_on_logits() {
    let cfg = tiny();
    let base = init_model::<Cpu>(&cfg, 3, &Default::default(), FloatDType::F32);
    let base_logits = logits(&base, &cfg);
    let mut lc = LoraConfig::new(8, 16.0);
    lc.target_modules = vec![
        "q_proj".into(),
        "v_proj".into(),
        "ff_out".into(),
        "up_proj".into(),
    ];
    let model = randomise_b(base.with_lora(&lc, 2).unwrap());
    let on = logits(&model, &cfg);
    let moved = max_abs_diff(&on, &base_logits);
    assert!(
        moved > 1e-2,
        "the adapters barely change the logits ({moved})"
    );
    let merged = model.merge_lora();
    assert!(!merged.has_lora());
    let m = logits(&merged, &cfg);
    let diff = max_abs_diff(&on, &m);
    println!("merged vs adapter-on: max |Δ| = {diff:e} (adapters moved logits by {moved:e})");
    assert!(diff <= 1e-5, "merged logits differ by {diff}");
}

#[test]
fn only_adapters_get_gradients() {
    let cfg = tiny();
    let base = init_model::<Ad>(&cfg, 3, &Default::default(), FloatDType::F32);
    let model = randomise_b(base.with_lora(&LoraConfig::new(4, 8.0), 1).unwrap());
    let logits = model.forward(ids::<Ad>(&cfg), &Attention::Full);
    let t = ids::<Ad>(&cfg).reshape([BATCH, SEQ, 1]);
    let loss = log_softmax(logits, 2).gather(2, t).mean().neg();
    let grads = loss.backward();
    let named = model.named_grads(&grads);
    let (mut adapters, mut base_params) = (0, 0);
    for (name, g) in named {
        if mmada_model::lora::is_adapter_name(&name) {
            adapters += 1;
            let g = g.unwrap_or_else(|| panic!("adapter {name} got no gradient"));
            let v = g.to_vec::<f32>().unwrap();
            assert!(v.iter().any(|x| *x != 0.0), "{name}: zero gradient");
        } else {
            base_params += 1;
            assert!(g.is_none(), "frozen base parameter {name} got a gradient");
        }
    }
    assert_eq!(adapters, 2 * 7 * cfg.n_layers);
    assert_eq!(base_params, 3 + 9 * cfg.n_layers);
}

#[test]
fn modules_to_save_stay_trainable_and_round_trip() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let base = init_model::<Ad>(&cfg, 3, &Default::default(), FloatDType::F32);
    let mut lc = LoraConfig::new(2, 4.0);
    lc.target_modules = vec!["k_proj".into()];
    lc.modules_to_save = vec!["ff_out".into()];
    let model = base.with_lora(&lc, 1).unwrap();
    let logits = model.forward(ids::<Ad>(&cfg), &Attention::Full);
    let grads = logits.sum().backward();
    for (name, g) in model.named_grads(&grads) {
        let trainable = name == "ff_out.weight" || mmada_model::lora::is_adapter_name(&name);
        assert_eq!(g.is_some(), trainable, "{name}");
    }
    // a changed LM head is saved with the adapter and restored over a fresh base
    let mut model = randomise_b(model);
    let w = model.ff_out.weight.val();
    model.ff_out.weight = Param::from_tensor((w * 1.5).detach());
    let adapter = dir.path().join("a");
    save_adapter(&model, &lc, &adapter, None, false).unwrap();
    let fresh = init_model::<Ad>(&cfg, 3, &Default::default(), FloatDType::F32);
    let (loaded, found) = load_adapter(fresh, &adapter).unwrap();
    assert_eq!(found, lc);
    assert_eq!(logits_of(&loaded, &cfg), logits_of(&model, &cfg));
}

fn logits_of(m: &LladaModel<Ad>, cfg: &ModelConfig) -> Vec<f32> {
    logits(&m.valid(), cfg)
}

#[test]
fn peft_files_round_trip_bit_for_bit_with_peft_names() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let base = init_model::<Cpu>(&cfg, 3, &Default::default(), FloatDType::F32);
    let mut lc = LoraConfig::new(4, 8.0);
    lc.dropout = 0.05;
    let model = randomise_b(base.clone().with_lora(&lc, 9).unwrap());
    let out = dir.path().join("adapter");
    save_adapter(&model, &lc, &out, Some("base"), false).unwrap();
    // names and torch shapes as PEFT writes them
    let file = mmada_safetensors::SafetensorsFile::open(&out.join(ADAPTER_WEIGHTS)).unwrap();
    let d = cfg.d_model;
    let a = &file.tensors[&format!("{PEFT_PREFIX}blocks.1.q_proj.lora_A.weight")];
    assert_eq!((a.dtype.as_str(), a.shape.as_slice()), ("F32", &[4, d][..]));
    let b = &file.tensors[&format!("{PEFT_PREFIX}blocks.0.ff_out.lora_B.weight")];
    assert_eq!(b.shape, vec![d, 4]);
    assert_eq!(file.tensors.len(), 2 * 7 * cfg.n_layers);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 8.0);
    assert_eq!(json["bias"], "none");
    assert_eq!(json["base_model_name_or_path"], "base");
    // a second save refuses to overwrite
    assert!(save_adapter(&model, &lc, &out, None, false).is_err());
    let (loaded, found) = load_adapter(base, &out).unwrap();
    assert_eq!(found, lc);
    assert_eq!(logits(&loaded, &cfg), logits(&model, &cfg));
    // the same A and B (burn layout) after the round trip
    for (x, y) in loaded
        .lora_tensors()
        .iter()
        .zip(model.lora_tensors().iter())
    {
        assert_eq!(x.0, y.0);
        assert_eq!(x.1.to_data(), y.1.to_data(), "{}", x.0);
    }
}

#[test]
fn bad_adapters_are_refused_naming_the_tensor() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let base = init_model::<Cpu>(&cfg, 3, &Default::default(), FloatDType::F32);
    let lc = LoraConfig::new(4, 8.0);
    let out = dir.path().join("adapter");
    save_adapter(
        &base.clone().with_lora(&lc, 1).unwrap(),
        &lc,
        &out,
        None,
        false,
    )
    .unwrap();
    // a base with other dimensions: the shapes do not fit
    let mut other = cfg.clone();
    other.d_model = 2 * cfg.d_model;
    other.mlp_hidden_size = 2 * cfg.mlp_hidden_size;
    let wide = init_model::<Cpu>(&other, 3, &Default::default(), FloatDType::F32);
    let e = load_adapter(wide, &out).unwrap_err().to_string();
    assert!(e.contains("do not fit r = 4"), "{e}");
    // LoRA on the LM head (PEFT with target_modules [ff_out] adds one) is named
    let mut tensors = std::collections::HashMap::new();
    let z = vec![0u8; 4 * 4 * cfg.d_model];
    tensors.insert(
        format!("{PEFT_PREFIX}ff_out.lora_A.weight"),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, cfg.d_model], &z)
            .unwrap(),
    );
    safetensors::serialize_to_file(&tensors, None, &out.join(ADAPTER_WEIGHTS)).unwrap();
    let e = load_adapter(base.clone(), &out).unwrap_err().to_string();
    assert!(
        e.contains("ff_out.lora_A.weight") && e.contains("LM head"),
        "{e}"
    );
    // not a LoRA adapter
    std::fs::write(out.join(ADAPTER_CONFIG), r#"{"peft_type": "IA3"}"#).unwrap();
    let e = load_adapter(base, &out).unwrap_err().to_string();
    assert!(e.contains("only LORA"), "{e}");
}

#[test]
fn lora_settings_are_checked() {
    let mut lc = LoraConfig::new(0, 8.0);
    assert!(lc.validate().unwrap_err().to_string().contains("lora.r"));
    lc.r = 4;
    lc.target_modules = vec!["o_proj".into()];
    let e = lc.validate().unwrap_err().to_string();
    assert!(
        e.contains("lora.target_modules") && e.contains("attn_out"),
        "{e}"
    );
    lc.target_modules = vec!["q_proj".into()];
    lc.dropout = 1.0;
    assert!(
        lc.validate()
            .unwrap_err()
            .to_string()
            .contains("lora.dropout")
    );
}
