//! LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on
//! the seven projections of every block, with the semantics of PEFT's `lora.Linear`
//! (huggingface/peft 0.21 `src/peft/tuners/lora/layer.py`):
//!
//! ```text
//! y = x·W  +  scaling · dropout(x)·A·B        scaling = alpha / r
//! ```
//!
//! with `W` the frozen base weight (burn `[in, out]`), `A` `[in, r]` (PEFT `lora_A.weight`
//! `[r, in]` transposed) initialised as PEFT's default (`kaiming_uniform_(a = √5)`, i.e.
//! uniform in `±1/√in`) and `B` `[r, out]` (PEFT `lora_B.weight` `[out, r]`) initialised to
//! zero, so a fresh adapter leaves the model's output unchanged bit for bit (`y + 0`).
//!
//! The adapter parameters are f32 (PEFT's `autocast_adapter_dtype`); the adapter branch runs
//! in the dtype of its input (the base's activations: f32 over an f32 base, exactly PEFT's
//! `x.to(lora_A.weight.dtype)`; bf16 over a bf16 base, as PEFT under bf16 autocast, so no f32
//! copy of every projection input is kept for the backward) or in the model's compute dtype
//! under mixed precision, and is added in the base output's dtype
//! (`result.to(torch_result_dtype)`).
//!
//! Module names are the upstream ones (`q_proj`, `k_proj`, `v_proj`, `attn_out`, `ff_proj`,
//! `up_proj`, `ff_out` inside `model.transformer.blocks.N`); the LM head
//! (`model.transformer.ff_out`) is never a LoRA target here, but it can be trained in full
//! as a module to save ([`LoraConfig::modules_to_save`]: `wte`, `ln_f`, `ff_out`).
//! File I/O in PEFT's format lives in [`crate::adapter`].

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, FloatDType, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model::{LladaBlock, LladaModel, NamedTensor, float_dtype, row_major};

/// The seven block projections a LoRA adapter can target, by upstream module name.
pub const TARGET_MODULES: [&str; 7] = [
    "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out",
];

/// The top-level modules of `model.transformer` that can be trained in full next to the
/// adapters (PEFT `modules_to_save`): the embedding, the final norm and the LM head.
pub const MODULES_TO_SAVE: [&str; 3] = ["wte", "ln_f", "ff_out"];

/// One block projection (a LoRA target), named as upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraTarget {
    /// `q_proj`.
    QProj,
    /// `k_proj`.
    KProj,
    /// `v_proj`.
    VProj,
    /// `attn_out`.
    AttnOut,
    /// `ff_proj` (SwiGLU gate).
    FfProj,
    /// `up_proj`.
    UpProj,
    /// `ff_out` (the block's MLP down projection, not the LM head).
    FfOut,
}

impl LoraTarget {
    /// Every target, in the order of [`TARGET_MODULES`].
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::AttnOut,
        LoraTarget::FfProj,
        LoraTarget::UpProj,
        LoraTarget::FfOut,
    ];

    /// The upstream module name.
    pub fn name(self) -> &'static str {
        TARGET_MODULES[self as usize]
    }

    /// The target named `name` (an upstream module name), if any.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Error of a LoRA setting, adapter file or merge. Every variant names the field, file or
/// tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A setting of [`LoraConfig`] is invalid (`field` is its key: `r`, `alpha`, …).
    #[error("lora.{field}: {message}")]
    Config {
        /// The key (`r`, `alpha`, `dropout`, `target_modules`, `modules_to_save`).
        field: &'static str,
        /// What is wrong and the fix.
        message: String,
    },
    /// An adapter directory is unusable (missing file, bad `adapter_config.json`, a tensor
    /// that does not fit the model).
    #[error("{path}: {message}")]
    Adapter {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong and the fix.
        message: String,
    },
    /// Reading or writing the safetensors file failed.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
}

/// The `lora:` settings: rank, scale, dropout and where adapters go (PEFT `LoraConfig`
/// names: `r`, `lora_alpha` → `alpha`, `lora_dropout` → `dropout`, `target_modules`,
/// `modules_to_save`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r` of every adapter (d1 / wd1: 128).
    pub r: usize,
    /// `lora_alpha`: the update is scaled by `alpha / r` (d1 / wd1: 64).
    pub alpha: f64,
    /// `lora_dropout`: dropout probability on the adapter's input, training passes only
    /// (default 0).
    #[serde(default)]
    pub dropout: f64,
    /// Block projections that get an adapter, by upstream name (default: all seven,
    /// [`TARGET_MODULES`]).
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// Top-level modules trained in full and saved with the adapter ([`MODULES_TO_SAVE`]:
    /// `wte`, `ln_f`, `ff_out` = the LM head). Default none.
    #[serde(default)]
    pub modules_to_save: Vec<String>,
}

fn default_targets() -> Vec<String> {
    TARGET_MODULES.iter().map(|s| s.to_string()).collect()
}

impl LoraConfig {
    /// A config with rank `r`, `alpha`, no dropout, every target and no module to save.
    pub fn new(r: usize, alpha: f64) -> Self {
        Self {
            r,
            alpha,
            dropout: 0.0,
            target_modules: default_targets(),
            modules_to_save: vec![],
        }
    }

    /// `alpha / r`, the factor of the adapter's update (PEFT `scaling`, without rsLoRA).
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// The targets, parsed (in the order given).
    ///
    /// # Errors
    /// As [`LoraConfig::validate`].
    pub fn targets(&self) -> Result<Vec<LoraTarget>, LoraError> {
        self.validate()?;
        Ok(self
            .target_modules
            .iter()
            .filter_map(|t| LoraTarget::parse(t))
            .collect())
    }

    /// `r ≥ 1`, `alpha` finite and non-zero, `dropout` in `[0, 1)`, at least one known and
    /// unique target, known and unique modules to save.
    ///
    /// # Errors
    /// [`LoraError::Config`] naming the field and the accepted values.
    pub fn validate(&self) -> Result<(), LoraError> {
        let err = |field, message: String| Err(LoraError::Config { field, message });
        if self.r == 0 {
            return err("r", "must be at least 1 (d1 / wd1 use 128)".into());
        }
        if !self.alpha.is_finite() || self.alpha == 0.0 {
            return err(
                "alpha",
                format!("{}: must be finite and non-zero", self.alpha),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return err("dropout", format!("{}: must be in [0, 1)", self.dropout));
        }
        if self.target_modules.is_empty() {
            return err(
                "target_modules",
                format!("empty: name at least one of {TARGET_MODULES:?}"),
            );
        }
        for (i, t) in self.target_modules.iter().enumerate() {
            if LoraTarget::parse(t).is_none() {
                return err(
                    "target_modules",
                    format!(
                        "`{t}` is not a block projection; use upstream names: {TARGET_MODULES:?} (the LM head can be trained in full with modules_to_save: [ff_out])"
                    ),
                );
            }
            if self.target_modules[..i].contains(t) {
                return err("target_modules", format!("`{t}` is listed twice"));
            }
        }
        for (i, m) in self.modules_to_save.iter().enumerate() {
            if !MODULES_TO_SAVE.contains(&m.as_str()) {
                return err(
                    "modules_to_save",
                    format!(
                        "`{m}`: must be one of {MODULES_TO_SAVE:?} (top-level modules of model.transformer)"
                    ),
                );
            }
            if self.modules_to_save[..i].contains(m) {
                return err("modules_to_save", format!("`{m}` is listed twice"));
            }
        }
        Ok(())
    }
}

thread_local! {
    /// This thread's LoRA dropout stream: (seed, masks drawn since it was set).
    static DROPOUT_STREAM: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Restart this thread's LoRA dropout stream at `seed` (the trainer calls it before every
/// step with a seed derived from the run seed, the step and the rank).
pub fn seed_dropout(seed: u64) {
    DROPOUT_STREAM.with(|c| c.set((seed, 0)));
}

/// The seed of the next dropout mask of this thread: SplitMix64 of (seed, index).
fn next_dropout_seed() -> u64 {
    DROPOUT_STREAM.with(|c| {
        let (seed, n) = c.get();
        c.set((seed, n + 1));
        let mut z = seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// One LoRA adapter on a Linear layer: `Δy = scaling · dropout(x)·A·B`.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// `A`, burn layout `[in, r]` (PEFT `lora_A.weight` `[r, in]`), f32.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `B`, burn layout `[r, out]` (PEFT `lora_B.weight` `[out, r]`), f32.
    pub lora_b: Param<Tensor<B, 2>>,
    /// `alpha / r`.
    pub scaling: f64,
    /// Dropout probability on the adapter's input (training passes only).
    pub dropout: f64,
}

impl<B: Backend> LoraLinear<B> {
    /// The adapter's update for `x` `[batch, seq, in]` → `[batch, seq, out]`, in `compute`
    /// when given, else in `x`'s dtype (the f32 `A`, `B` are cast to it; see the module docs).
    /// Dropout (PEFT `nn.Dropout(p)`: zero with probability `p`, survivors scaled by
    /// `1/(1-p)`) applies only when the backend tracks gradients (a training pass); each mask
    /// is drawn from the backend RNG seeded just before the draw from this thread's dropout
    /// stream ([`seed_dropout`]), so a resumed run draws the masks of the uninterrupted one.
    /// (Flex keeps one RNG slot per process: threads that draw masks concurrently, e.g.
    /// data-parallel ranks on Flex devices, can take each other's seeds.)
    pub fn delta(&self, x: Tensor<B, 3>, compute: Option<FloatDType>) -> Tensor<B, 3> {
        let a = self.lora_a.val();
        let c = compute.unwrap_or_else(|| float_dtype(x.dtype()));
        let x = cast_to(x, c);
        let x = if self.dropout > 0.0 && B::ad_enabled(&x.device()) {
            let keep = 1.0 - self.dropout;
            B::seed(&x.device(), next_dropout_seed());
            let mask = x.random_like(Distribution::Bernoulli(keep));
            (x * mask) * (1.0 / keep)
        } else {
            x
        };
        let h = x.matmul(cast_to(a, c).unsqueeze::<3>());
        h.matmul(cast_to(self.lora_b.val(), c).unsqueeze::<3>()) * self.scaling
    }

    /// `scaling · A·B` `[in, out]` in f32: what merging adds to the base weight.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        let a = cast_to(self.lora_a.val(), FloatDType::F32);
        let b = cast_to(self.lora_b.val(), FloatDType::F32);
        a.matmul(b) * self.scaling
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.lora_a.val().dims()[1]
    }
}

/// The adapters of one block: one optional [`LoraLinear`] per projection.
#[derive(Module, Debug)]
pub struct BlockLora<B: Backend> {
    /// On `q_proj`.
    pub q_proj: Option<LoraLinear<B>>,
    /// On `k_proj`.
    pub k_proj: Option<LoraLinear<B>>,
    /// On `v_proj`.
    pub v_proj: Option<LoraLinear<B>>,
    /// On `attn_out`.
    pub attn_out: Option<LoraLinear<B>>,
    /// On `ff_proj`.
    pub ff_proj: Option<LoraLinear<B>>,
    /// On `up_proj`.
    pub up_proj: Option<LoraLinear<B>>,
    /// On the block's `ff_out`.
    pub ff_out: Option<LoraLinear<B>>,
}

impl<B: Backend> BlockLora<B> {
    /// No adapter anywhere.
    pub fn empty() -> Self {
        Self {
            q_proj: None,
            k_proj: None,
            v_proj: None,
            attn_out: None,
            ff_proj: None,
            up_proj: None,
            ff_out: None,
        }
    }

    /// The adapter on `t`.
    pub fn get(&self, t: LoraTarget) -> Option<&LoraLinear<B>> {
        match t {
            LoraTarget::QProj => self.q_proj.as_ref(),
            LoraTarget::KProj => self.k_proj.as_ref(),
            LoraTarget::VProj => self.v_proj.as_ref(),
            LoraTarget::AttnOut => self.attn_out.as_ref(),
            LoraTarget::FfProj => self.ff_proj.as_ref(),
            LoraTarget::UpProj => self.up_proj.as_ref(),
            LoraTarget::FfOut => self.ff_out.as_ref(),
        }
    }

    /// The slot of `t`.
    pub fn slot(&mut self, t: LoraTarget) -> &mut Option<LoraLinear<B>> {
        match t {
            LoraTarget::QProj => &mut self.q_proj,
            LoraTarget::KProj => &mut self.k_proj,
            LoraTarget::VProj => &mut self.v_proj,
            LoraTarget::AttnOut => &mut self.attn_out,
            LoraTarget::FfProj => &mut self.ff_proj,
            LoraTarget::UpProj => &mut self.up_proj,
            LoraTarget::FfOut => &mut self.ff_out,
        }
    }
}

/// `t` in `dtype` (no op when it already is).
fn cast_to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: FloatDType) -> Tensor<B, D> {
    if t.dtype() == DType::from(dtype) {
        t
    } else {
        t.cast(dtype)
    }
}

impl<B: Backend> LladaBlock<B> {
    /// The base Linear of projection `t`.
    pub fn linear(&self, t: LoraTarget) -> &Linear<B> {
        match t {
            LoraTarget::QProj => &self.q_proj,
            LoraTarget::KProj => &self.k_proj,
            LoraTarget::VProj => &self.v_proj,
            LoraTarget::AttnOut => &self.attn_out,
            LoraTarget::FfProj => &self.ff_proj,
            LoraTarget::UpProj => &self.up_proj,
            LoraTarget::FfOut => &self.ff_out,
        }
    }

    fn linear_mut(&mut self, t: LoraTarget) -> &mut Linear<B> {
        match t {
            LoraTarget::QProj => &mut self.q_proj,
            LoraTarget::KProj => &mut self.k_proj,
            LoraTarget::VProj => &mut self.v_proj,
            LoraTarget::AttnOut => &mut self.attn_out,
            LoraTarget::FfProj => &mut self.ff_proj,
            LoraTarget::UpProj => &mut self.up_proj,
            LoraTarget::FfOut => &mut self.ff_out,
        }
    }

    /// The adapter on projection `t`, if any.
    pub fn adapter(&self, t: LoraTarget) -> Option<&LoraLinear<B>> {
        self.lora.as_ref().and_then(|l| l.get(t))
    }

    /// Projection `t` of `x` `[batch, seq, in]` → `[batch, seq, out]`: the base Linear (in
    /// `compute` when given, see `LladaBlock::forward_in`) plus its adapter's update, cast to
    /// the base output's dtype.
    pub fn project(
        &self,
        t: LoraTarget,
        x: Tensor<B, 3>,
        compute: Option<FloatDType>,
    ) -> Tensor<B, 3> {
        match self.adapter(t) {
            None => crate::model::linear_in(self.linear(t), x, compute),
            Some(a) => {
                let y = crate::model::linear_in(self.linear(t), x.clone(), compute);
                let d = a.delta(x, compute);
                let dtype = float_dtype(y.dtype());
                y + cast_to(d, dtype)
            }
        }
    }
}

/// A name of [`LladaModel::params`] that belongs to an adapter (`….lora_A.weight`,
/// `….lora_B.weight`).
pub fn is_adapter_name(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// PEFT's default `lora_A` init: `kaiming_uniform_(a = √5)` on `[r, in]`, i.e. uniform in
/// `±1/√in` (gain `√(2/(1+5))`, bound `√3 · gain / √fan_in`). Returned in burn layout
/// `[in, r]`, f32, drawn in torch's `[r, in]` row order from a seeded RNG.
fn init_lora_a(rng: &mut StdRng, inp: usize, r: usize) -> TensorData {
    let bound = 1.0 / (inp as f64).sqrt();
    let torch: Vec<f32> = (0..r * inp)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect();
    let mut burn = vec![0f32; r * inp];
    for j in 0..r {
        for i in 0..inp {
            burn[i * r + j] = torch[j * inp + i];
        }
    }
    TensorData::new(burn, [inp, r])
}

impl<B: Backend> LladaModel<B> {
    /// Attach fresh adapters of `cfg` (A random as PEFT, B = 0, f32, seeded by `seed`) to
    /// every block and freeze the base: every base parameter stops requiring a gradient
    /// (so it gets none, and no optimizer state), except the modules to save. The output is
    /// unchanged (B = 0). Existing adapters are replaced.
    ///
    /// # Errors
    /// [`LoraError::Config`] from [`LoraConfig::validate`].
    pub fn with_lora(mut self, cfg: &LoraConfig, seed: u64) -> Result<Self, LoraError> {
        let targets = cfg.targets()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let scaling = cfg.scaling();
        for block in &mut self.blocks {
            let device = block.q_proj.weight.val().device();
            let mut lora = BlockLora::empty();
            for &t in &targets {
                let [inp, out] = block.linear(t).weight.val().dims();
                let a = Tensor::<B, 2>::from_data(
                    init_lora_a(&mut rng, inp, cfg.r),
                    (&device, DType::F32),
                );
                let b = Tensor::<B, 2>::zeros([cfg.r, out], (&device, DType::F32));
                *lora.slot(t) = Some(LoraLinear {
                    lora_a: Param::from_tensor(a),
                    lora_b: Param::from_tensor(b),
                    scaling,
                    dropout: cfg.dropout,
                });
            }
            block.lora = Some(lora);
        }
        Ok(self.freeze_base(&cfg.modules_to_save))
    }

    /// Every base parameter set to require no gradient, except those of the top-level
    /// modules in `trainable` (`wte`, `ln_f`, `ff_out`); adapters are left as they are.
    pub fn freeze_base(mut self, trainable: &[String]) -> Self {
        let keep = |m: &str| trainable.iter().any(|t| t == m);
        fn frz<B: Backend, const D: usize>(p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            p.set_require_grad(false)
        }
        if !keep("wte") {
            self.wte.weight = frz(self.wte.weight);
        }
        if !keep("ln_f") {
            self.ln_f.weight = frz(self.ln_f.weight);
        }
        if !keep("ff_out") {
            self.ff_out.weight = frz(self.ff_out.weight);
        }
        for b in &mut self.blocks {
            b.attn_norm.weight = frz(b.attn_norm.weight.clone());
            b.ff_norm.weight = frz(b.ff_norm.weight.clone());
            for t in LoraTarget::ALL {
                let l = b.linear_mut(t);
                l.weight = frz(l.weight.clone());
            }
        }
        self
    }

    /// Whether any block carries an adapter.
    pub fn has_lora(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| LoraTarget::ALL.iter().any(|t| b.adapter(*t).is_some()))
    }

    /// The same model with every adapter switched off (the base model): a shallow copy
    /// sharing the base tensors, no weights are duplicated. UniGRPO's KL reference under
    /// LoRA.
    pub fn without_lora(&self) -> Self {
        let mut m = self.clone();
        for b in &mut m.blocks {
            b.lora = None;
        }
        m
    }

    /// Fold every adapter into its base weight, `W ← W + (alpha/r)·A·B` (computed in f32,
    /// stored in the base weight's dtype, row-major), and drop the adapters: a plain model
    /// (PEFT `merge_and_unload`). The merged weights keep the base's `require_grad`.
    pub fn merge_lora(mut self) -> Self {
        for b in &mut self.blocks {
            let Some(lora) = b.lora.take() else { continue };
            for t in LoraTarget::ALL {
                let Some(a) = lora.get(t) else { continue };
                let l = b.linear_mut(t);
                let w = l.weight.val();
                let dtype = float_dtype(w.dtype());
                let merged = cast_to(cast_to(w, FloatDType::F32) + a.delta_weight(), dtype);
                let merged = row_major(merged.detach());
                l.weight = l.weight.clone().map(|_| merged);
            }
        }
        self
    }

    /// The adapter tensors in PEFT's layout (`lora_A` `[r, in]`, `lora_B` `[out, r]`) with
    /// names relative to `model.transformer.` (`blocks.N.q_proj.lora_A.weight`), in block
    /// then target order.
    pub fn lora_tensors(&self) -> Vec<(String, NamedTensor<B>)> {
        let mut out = vec![];
        for (i, b) in self.blocks.iter().enumerate() {
            for t in LoraTarget::ALL {
                if let Some(a) = b.adapter(t) {
                    let n = t.name();
                    out.push((
                        format!("blocks.{i}.{n}.lora_A.weight"),
                        NamedTensor::Matrix(a.lora_a.val().transpose()),
                    ));
                    out.push((
                        format!("blocks.{i}.{n}.lora_B.weight"),
                        NamedTensor::Matrix(a.lora_b.val().transpose()),
                    ));
                }
            }
        }
        out
    }
}

/// Whether the forward of [`LladaBlock`] carries adapters: used by the model's parameter
/// list.
pub(crate) fn block_lora_params<'a, B: Backend>(
    i: usize,
    b: &'a LladaBlock<B>,
    out: &mut Vec<(String, crate::model::ParamRef<'a, B>)>,
) {
    for t in LoraTarget::ALL {
        if let Some(a) = b.adapter(t) {
            let n = t.name();
            out.push((
                format!("blocks.{i}.{n}.lora_A.weight"),
                crate::model::ParamRef::Linear(&a.lora_a),
            ));
            out.push((
                format!("blocks.{i}.{n}.lora_B.weight"),
                crate::model::ParamRef::Linear(&a.lora_b),
            ));
        }
    }
}
