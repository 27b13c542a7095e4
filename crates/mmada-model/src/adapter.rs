//! LoRA adapters on disk in PEFT's format (huggingface/peft 0.21, `PeftModel.save_pretrained`
//! / `PeftModel.from_pretrained`), so an adapter trained here loads in Python over the
//! official modeling code (`LLaDAModelLM` / `MMadaModelLM`) and back.
//!
//! A directory with
//! * `adapter_config.json`: `peft_type: "LORA"`, `r`, `lora_alpha`, `lora_dropout`,
//!   `target_modules` (written as a regex over the full module names, e.g.
//!   `.*\.transformer\.blocks\.\d+\.(q_proj|v_proj)`, because PEFT matches a list by name
//!   suffix and `ff_out` would also catch the LM head `model.transformer.ff_out`),
//!   `modules_to_save` (`transformer.wte`, `transformer.ln_f`, `transformer.ff_out`),
//!   `bias: "none"`, `base_model_name_or_path`, …;
//! * `adapter_model.safetensors`: `base_model.model.model.transformer.blocks.N.{target}.lora_A.weight`
//!   `[r, in]` and `….lora_B.weight` `[out, r]` (PEFT's `get_peft_model_state_dict` drops the
//!   adapter name `default`), and each module to save as its plain name
//!   (`base_model.model.model.transformer.ff_out.weight`), all f32.
//!
//! The directory is written under a temporary sibling name and renamed into place.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use serde_json::{Value, json};

use crate::checkpoint::{CheckpointError, SafetensorsFile, read_tensor};
use crate::lora::{BlockLora, LoraConfig, LoraError, LoraLinear, LoraTarget, MODULES_TO_SAVE};
use crate::model::{LladaModel, NamedTensor, row_major};

/// The adapter's config file name.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights file name.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix of every tensor name in a PEFT adapter of an HF LLaDA / MMaDA model
/// (`PeftModel.base_model` = `LoraModel`, its `.model` = `LLaDAModelLM`, whose `.model` =
/// `LLaDAModel` holds `transformer`).
pub const PEFT_PREFIX: &str = "base_model.model.model.transformer.";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoraError + '_ {
    move |source| {
        LoraError::Checkpoint(CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn bad(path: &Path, message: impl Into<String>) -> LoraError {
    LoraError::Adapter {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The `target_modules` regex written to `adapter_config.json` for `targets`.
pub fn target_regex(targets: &[String]) -> String {
    format!(r".*\.transformer\.blocks\.\d+\.({})", targets.join("|"))
}

/// The `adapter_config.json` of `cfg` (PEFT `LoraConfig` fields).
pub fn peft_config_json(cfg: &LoraConfig, base_model_name_or_path: Option<&str>) -> Value {
    let modules_to_save: Option<Vec<String>> = (!cfg.modules_to_save.is_empty()).then(|| {
        cfg.modules_to_save
            .iter()
            .map(|m| format!("transformer.{m}"))
            .collect()
    });
    json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": null,
        "inference_mode": true,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_regex(&cfg.target_modules),
        "modules_to_save": modules_to_save,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}

/// An f32 tensor to be written.
struct F32Tensor {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &F32Tensor {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn f32_tensor<B: Backend>(t: &NamedTensor<B>) -> F32Tensor {
    let data = t.to_data().convert_dtype(DType::F32);
    F32Tensor {
        shape: t.shape(),
        bytes: data.into_bytes().to_vec(),
    }
}

/// Save the adapters of `model` (and the modules to save of `cfg`) as a PEFT adapter
/// directory `dir` (see the module docs), replacing an existing one when `overwrite`.
/// `base_model_name_or_path` is recorded for PEFT (`PeftModel.from_pretrained` does not need
/// it when the base is passed in).
///
/// # Errors
/// [`LoraError::Adapter`] when `model` has no adapter or `dir` exists and `overwrite` is
/// false; I/O and write errors naming the file.
pub fn save_adapter<B: Backend>(
    model: &LladaModel<B>,
    cfg: &LoraConfig,
    dir: &Path,
    base_model_name_or_path: Option<&str>,
    overwrite: bool,
) -> Result<(), LoraError> {
    cfg.validate()?;
    if !model.has_lora() {
        return Err(bad(dir, "the model carries no LoRA adapter to save"));
    }
    if dir.exists() && !overwrite {
        return Err(bad(
            dir,
            "already exists (choose another directory or remove it)",
        ));
    }
    let mut tensors: Vec<(String, F32Tensor)> = model
        .lora_tensors()
        .iter()
        .map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), f32_tensor(t)))
        .collect();
    let keep: Vec<String> = cfg
        .modules_to_save
        .iter()
        .map(|m| format!("{m}.weight"))
        .collect();
    for (n, t) in model.named_tensors() {
        if keep.contains(&n) {
            tensors.push((format!("{PEFT_PREFIX}{n}"), f32_tensor(&t)));
        }
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let weights = tmp.join(ADAPTER_WEIGHTS);
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let views: Vec<(&str, &F32Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::serialize_to_file(views, Some(meta), &weights).map_err(|e| {
        LoraError::Checkpoint(CheckpointError::Write {
            path: weights.clone(),
            reason: e.to_string(),
        })
    })?;
    let config = tmp.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&peft_config_json(cfg, base_model_name_or_path))
        .expect("JSON value serialises");
    std::fs::write(&config, text + "\n").map_err(io_err(&config))?;
    for f in [&weights, &config] {
        File::open(f)
            .and_then(|f| f.sync_all())
            .map_err(io_err(f))?;
    }
    if dir.exists() {
        let old = dir.with_file_name(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(io_err(dir))?;
        std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
    }
    Ok(())
}

/// Read `adapter_config.json` of `dir` into a [`LoraConfig`] (`target_modules` from the
/// config when it is a list of upstream names; [`load_adapter`] takes them from the tensors)
/// and the recorded `base_model_name_or_path`.
///
/// # Errors
/// [`LoraError::Adapter`] naming the file and key: not `peft_type: LORA`, a missing `r` /
/// `lora_alpha`, or a variant we do not compute (rsLoRA, DoRA, biases, `fan_in_fan_out`,
/// per-module ranks or alphas).
pub fn read_adapter_config(dir: &Path) -> Result<(LoraConfig, Option<String>), LoraError> {
    let path = dir.join(ADAPTER_CONFIG);
    if !path.is_file() {
        return Err(bad(
            &path,
            format!(
                "not found: an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (PEFT save_pretrained)"
            ),
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| bad(&path, format!("invalid JSON: {e}")))?;
    let key = |k: &str| v.get(k).filter(|x| !x.is_null());
    match key("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(bad(
                &path,
                format!("peft_type is {other:?}; only LORA adapters are supported"),
            ));
        }
    }
    let r = key("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(&path, "`r` is missing or not a positive integer"))?
        as usize;
    let alpha = key("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad(&path, "`lora_alpha` is missing or not a number"))?;
    let dropout = key("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    for flag in ["use_rslora", "use_dora", "fan_in_fan_out"] {
        if key(flag).and_then(Value::as_bool) == Some(true) {
            return Err(bad(
                &path,
                format!(
                    "`{flag}: true` is not supported (plain LoRA only: scaling alpha/r, no DoRA, torch [out, in] layout)"
                ),
            ));
        }
    }
    if let Some(b) = key("bias").and_then(Value::as_str)
        && b != "none"
    {
        return Err(bad(
            &path,
            format!("bias `{b}`: LLaDA has no biases; only `none` is supported"),
        ));
    }
    for pat in ["rank_pattern", "alpha_pattern"] {
        if key(pat)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(
                &path,
                format!("`{pat}` (per-module r / alpha) is not supported"),
            ));
        }
    }
    let mut cfg = LoraConfig::new(r, alpha);
    cfg.dropout = dropout;
    if let Some(list) = key("target_modules").and_then(Value::as_array) {
        let names: Vec<String> = list
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .filter(|n| LoraTarget::parse(n).is_some())
            .collect();
        if !names.is_empty() {
            cfg.target_modules = names;
        }
    }
    if let Some(list) = key("modules_to_save").and_then(Value::as_array) {
        for m in list {
            let m = m.as_str().unwrap_or_default();
            let short = m
                .trim_start_matches("model.")
                .trim_start_matches("transformer.");
            if !MODULES_TO_SAVE.contains(&short) {
                return Err(bad(
                    &path,
                    format!(
                        "modules_to_save `{m}`: only transformer.wte, transformer.ln_f and transformer.ff_out (the LM head) are supported"
                    ),
                ));
            }
            cfg.modules_to_save.push(short.to_string());
        }
    }
    cfg.validate()
        .map_err(|e| bad(&path, format!("invalid LoRA settings: {e}")))?;
    let base = key("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(String::from);
    Ok((cfg, base))
}

/// What one tensor of an adapter file is.
enum AdapterTensor {
    /// `blocks.N.{target}.lora_{A,B}.weight`.
    Lora(usize, LoraTarget, bool),
    /// A module to save (`wte`, `ln_f`, `ff_out`).
    Module(&'static str),
}

fn classify(short: &str) -> Option<AdapterTensor> {
    for m in MODULES_TO_SAVE {
        if short == format!("{m}.weight") {
            return Some(AdapterTensor::Module(m));
        }
    }
    let rest = short.strip_prefix("blocks.")?;
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let (target, rest) = rest.split_once('.')?;
    let t = LoraTarget::parse(target)?;
    let a = match rest {
        "lora_A.weight" => true,
        "lora_B.weight" => false,
        _ => return None,
    };
    Some(AdapterTensor::Lora(i, t, a))
}

/// Load the PEFT adapter in `dir` onto `model` (adapters in f32, modules to save in the
/// model's dtype replacing the base weights) and freeze the base as
/// [`LladaModel::with_lora`] does. The targets are those present in the file (per block).
/// Returns the model and the adapter's settings.
///
/// # Errors
/// [`LoraError::Adapter`] naming the file and tensor: an unknown tensor name (e.g. LoRA on
/// the LM head), a block index past the model, an `A` without its `B`, a rank or shape that
/// does not fit the base; the errors of [`read_adapter_config`] and of the safetensors
/// reader.
pub fn load_adapter<B: Backend>(
    model: LladaModel<B>,
    dir: &Path,
) -> Result<(LladaModel<B>, LoraConfig), LoraError> {
    let (mut cfg, _) = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    if !path.is_file() {
        return Err(bad(&path, "not found (PEFT adapter weights)"));
    }
    let file = SafetensorsFile::open(&path).map_err(CheckpointError::from)?;
    let mut model = model;
    let n_blocks = model.blocks.len();
    let mut pairs: BTreeMap<(usize, usize), [Option<TensorData>; 2]> = BTreeMap::new();
    let mut modules = BTreeSet::new();
    let read = |name: &str| -> Result<TensorData, LoraError> {
        Ok(read_tensor(&file, name, FloatDType::F32)?)
    };
    for name in file.tensors.keys() {
        let short = name
            .strip_prefix(PEFT_PREFIX)
            .map(|s| s.replace(".default.", "."))
            .ok_or_else(|| {
                bad(
                    &path,
                    format!("tensor `{name}` does not start with `{PEFT_PREFIX}`: not an adapter of an HF LLaDA / MMaDA model"),
                )
            })?;
        match classify(&short) {
            Some(AdapterTensor::Lora(i, t, is_a)) => {
                if i >= n_blocks {
                    return Err(bad(
                        &path,
                        format!("tensor `{name}`: block {i} but the model has {n_blocks} blocks"),
                    ));
                }
                let slot = pairs.entry((i, t as usize)).or_default();
                slot[usize::from(!is_a)] = Some(read(name)?);
            }
            Some(AdapterTensor::Module(m)) => {
                let data = read_tensor(&file, name, crate::model::float_dtype(model.dtype()))?;
                let device = model.wte.weight.val().device();
                let dtype = model.dtype();
                let shape = data.shape.clone();
                let expect = match m {
                    "wte" => model.wte.weight.val().dims().to_vec(),
                    "ln_f" => model.ln_f.weight.val().dims().to_vec(),
                    _ => {
                        let [i, o] = model.ff_out.weight.val().dims();
                        vec![o, i]
                    }
                };
                if shape.to_vec() != expect {
                    return Err(bad(
                        &path,
                        format!(
                            "tensor `{name}` has shape {shape:?} but the model's is {expect:?}"
                        ),
                    ));
                }
                match m {
                    "wte" => {
                        let t = Tensor::<B, 2>::from_data(data, (&device, dtype));
                        model.wte.weight = Param::from_tensor(t);
                    }
                    "ln_f" => {
                        let t = Tensor::<B, 1>::from_data(data, (&device, dtype));
                        model.ln_f.weight = Param::from_tensor(t);
                    }
                    _ => {
                        let t = Tensor::<B, 2>::from_data(data, (&device, dtype));
                        model.ff_out.weight = Param::from_tensor(row_major(t.transpose()));
                    }
                }
                modules.insert(m.to_string());
            }
            None => {
                let hint = if short.starts_with("ff_out.lora_") || short.starts_with("wte.lora_") {
                    " (LoRA on the LM head or the embedding is not supported: train it in full with modules_to_save)"
                } else {
                    ""
                };
                return Err(bad(
                    &path,
                    format!(
                        "tensor `{name}` is not a LoRA weight of a block projection ({:?}) nor a module to save{hint}",
                        crate::lora::TARGET_MODULES
                    ),
                ));
            }
        }
    }
    if pairs.is_empty() {
        return Err(bad(&path, "holds no lora_A / lora_B tensor"));
    }
    let mut present = BTreeSet::new();
    let scaling = cfg.scaling();
    for ((i, t), [a, b]) in pairs {
        let t = LoraTarget::ALL[t];
        let n = t.name();
        let (Some(a), Some(b)) = (a, b) else {
            return Err(bad(
                &path,
                format!("blocks.{i}.{n}: lora_A and lora_B must both be present"),
            ));
        };
        let block = &mut model.blocks[i];
        let [inp, out] = block.linear(t).weight.val().dims();
        let (sa, sb) = (a.shape.clone(), b.shape.clone());
        if sa.to_vec() != vec![cfg.r, inp] || sb.to_vec() != vec![out, cfg.r] {
            return Err(bad(
                &path,
                format!(
                    "blocks.{i}.{n}: lora_A {sa:?} / lora_B {sb:?} do not fit r = {} over the base [out {out}, in {inp}] (expected [{}, {inp}] / [{out}, {}])",
                    cfg.r, cfg.r, cfg.r
                ),
            ));
        }
        let device = block.q_proj.weight.val().device();
        let opts = (&device, DType::F32);
        let a = row_major(Tensor::<B, 2>::from_data(a, opts).transpose());
        let b = row_major(Tensor::<B, 2>::from_data(b, opts).transpose());
        let lora = block.lora.get_or_insert_with(BlockLora::empty);
        *lora.slot(t) = Some(LoraLinear {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            scaling,
            dropout: cfg.dropout,
        });
        present.insert(t as usize);
    }
    cfg.target_modules = present
        .into_iter()
        .map(|t| LoraTarget::ALL[t].name().to_string())
        .collect();
    cfg.modules_to_save = MODULES_TO_SAVE
        .iter()
        .filter(|m| modules.contains(**m))
        .map(|m| m.to_string())
        .collect();
    let model = model.freeze_base(&cfg.modules_to_save);
    Ok((model, cfg))
}

/// The default adapter directory name inside a training checkpoint.
pub const CHECKPOINT_ADAPTER_DIR: &str = "adapter";

/// `dir` joined with [`CHECKPOINT_ADAPTER_DIR`] when `dir` is a training checkpoint holding
/// one, else `dir` (so `--adapter` accepts both).
pub fn resolve_adapter_dir(dir: &Path) -> PathBuf {
    let inner = dir.join(CHECKPOINT_ADAPTER_DIR);
    if !dir.join(ADAPTER_CONFIG).is_file() && inner.join(ADAPTER_CONFIG).is_file() {
        inner
    } else {
        dir.to_path_buf()
    }
}
