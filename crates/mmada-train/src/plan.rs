//! Memory planner (issue 15): the bytes one device holds during a training run, line by line,
//! from the model shape, the precision, the data-parallel layout, the sharding mode and the
//! recipe's largest micro-batch. Pure arithmetic: no tensor is created.
//!
//! # What is counted, and where each byte comes from
//!
//! Notation (all per device): `P` parameters ([`ModelShape::params`], the
//! `ModelConfig::num_params` formula), `Pt` trainable parameters (`P`, or the LoRA adapters),
//! `N` data-parallel ranks (devices per node × nodes), `B` rows and `L` positions of the
//! largest micro-batch, `d` = `d_model`, `m` = `mlp_hidden_size`, `H` query heads, `V`
//! embedding rows, `n` scored (loss) positions of the micro-batch. Bytes per element: `r` of
//! the parameters (`model.dtype`: 4 for f32, 2 for bf16), `c` of the matmuls (2 under
//! `train.mixed_precision: bf16`, else `r`), `s` of the AdamW moments.
//!
//! Memory is split in phases; the total is `resident + max(step, backward, rollout)`:
//!
//! * **resident** (held for the whole run):
//!   * compute weights `P·r`: the model's parameters (`LladaModel`, replicated on every rank).
//!     With `train.mixed_precision: bf16` today these f32 parameters are also the master copy.
//!   * master weights `4·Pt / N_opt` when the optimizer keeps an f32 copy of bf16 parameters
//!     (issue 15 item 3), sharded with the optimizer state (`N_opt` = `N` under
//!     [`Sharding::Optimizer`] / [`Sharding::OptimizerAndGradients`], else 1).
//!   * gradient accumulator (accumulation: `grad_accum > 1`, or several UniGRPO groups per
//!     rank): `optim::add_grads` holds the running sum, `Pt·r` (or `Pt·r / N` when gradients
//!     are sharded: ZeRO-2 keeps only the owner's shard of the sum).
//!   * optimizer state `2·Pt·s / N_opt`: AdamW's `exp_avg` and `exp_avg_sq`. burn's AdamW
//!     creates them in the gradient's dtype, so today `s = r`.
//!   * reference model `P·r` (UniGRPO `grpo.kl_reference: reference_model`, a frozen copy on
//!     the inner backend).
//!   * old-policy / reference log-probs: `4` bytes per scored position of every noised batch
//!     of the step (`unigrpo::update::OldLogprobs`). `kl_reference: old_policy` evaluates the
//!     pre-update weights through `model.valid()`, which shares the parameter tensors: no copy.
//!   * collective buckets (`N > 1`): `dist::CollectiveReducer::mean_grads` all-reduces the
//!     gradients in buckets of 64 Mi elements (`dist::BUCKET_ELEMS`): the concatenated bucket
//!     (`Tensor::cat`, a copy), plus in burn-collective's tree all-reduce (arity 2) one
//!     child's bucket moved to the parent device and their sum: `3 · min(64 Mi, Pt) · r`.
//! * **step** (forward + backward of the largest micro-batch; freed after the backward):
//!   * compute weight casts (mixed precision only): `linear_in` casts every Linear weight to
//!     the compute dtype and the matmul keeps the cast for its backward: `c ·` (Linear
//!     parameters); with activation checkpointing one block's and the LM head's.
//!   * activations (the tensors burn's autodiff keeps, read off `LladaBlock::forward_in`; a
//!     tensor kept by several ops counts once), per block:
//!     `B·L·d·(4 + r + h₁ + 3c + c + 4 + r + h₂) + 5·c·B·L·m`, where
//!     * `4`: the f32 block input that `RmsNorm::forward` keeps (`x.cast(F32)` is `x` itself
//!       for f32 parameters; for bf16 parameters the f32 copy is kept, not `x`), `r`: the
//!       normalised `normed` kept by the `normed · weight` product, `h₁` = `r` for the norm
//!       output the q/k/v projections keep (`c` each, 3 separate casts, under mixed
//!       precision: `h₁ = 3c`);
//!     * `3c`: q and k after RoPE (the `q·kᵀ` matmul keeps them; with grouped-query
//!       attention k is kept after the `repeat_interleave`, `[B, H, L, hd]`) and v (kept by
//!       `probs·v`, also repeated);
//!     * `c`: the attention output `[B, L, d]` (a contiguous copy after `swap_dims`) kept by
//!       `attn_out`;
//!     * `4 + r + h₂`: the same for the MLP norm (`h₂ = r`, or `2c` for the two casts of
//!       `ff_proj` / `up_proj` under mixed precision);
//!     * `5·c·m`: the SwiGLU gate pre-activation (kept by `sigmoid` and `mul`), its sigmoid,
//!       `silu` output, the up projection and the product fed to `ff_out`;
//!
//!     plus the final norm `B·L·d·(4 + r + h)`. With activation checkpointing (per block
//!     recomputation, issue 15 item 4) only the block inputs `B·L·d·r` of every block are kept,
//!     plus one block's activations and scores during its recomputation.
//!   * attention scores, per block `B·H·L²·(4 + 4 + c)`: `scaled_dot_product_attention`
//!     computes the scores and the softmax in f32; burn's softmax (`shifted = s − max`,
//!     `exp`, `exp / Σ`) keeps the `exp` input (`float_exp` checkpoints its input), the `exp`
//!     output (kept by the division) and the probabilities in `c` (kept by `probs·v`).
//!     Under autodiff nothing is fused (burn-notes: the attention fallback materialises
//!     `[B, H, L, L]`). SFT recipes with `loss.t2i_attention` other than `full` add the f32
//!     bias `[B, 1, L, L]` that `unified_loss` builds.
//!   * logits / loss buffers. Today (`LogitsPath::AllPositions`) the head runs at every
//!     position: the backward of `weighted_token_ce`'s `select` scatters each stream's
//!     gradient into a zero `[B·L, V]` tensor that is summed into the logits gradient, so two
//!     `[B·L, V]` tensors in the logits dtype (f32 under mixed precision, else `r`) are alive,
//!     plus (mixed precision) the `c` gradient of the head matmul output, plus the selected
//!     rows' f32 `log_softmax` input kept for the backward and its gradient (`2·n·V·4`). After
//!     issue 18 (`LogitsPath::LossPositions`, the head and its gradient computed in chunks
//!     outside the graph, `mmada_diffusion::head`): `∂L/∂h` of the scored rows `n·d·4`, one
//!     `[d, V]` f32 `∂L/∂W` buffer per loss term, and one chunk of `ce_chunk_rows` rows
//!     (logits, softmax, gradient): `3·chunk·V·4`.
//!   * backward transient: the gradient chain through one block's softmax, three f32
//!     `[B, H, L, L]` tensors (the gradient of the probabilities, of `exp` and of the scores).
//! * **backward** (the end of a backward): burn's `loss.backward()` returns the gradient of
//!   every parameter at once (`GradientsParams::from_grads`, in the parameter dtype), so
//!   whatever the sharding one full set `Pt·r` exists when block 0's backward runs; by then
//!   the other blocks' activations are freed, block 0's activations, scores and softmax
//!   gradients are not (with checkpointing: block 0 is being recomputed).
//! * **rollout** (UniGRPO only, no autodiff graph, not at the same time as a step): the
//!   sampler's forward over the canvas (`G` rows, × 2 with classifier-free guidance, prompt +
//!   completion positions): logits, probabilities and the confidence / Gumbel working copy
//!   (`3 · rows · L · V · 4`) plus one block's working set without a graph
//!   (`rows·L·(6d + 3m)·c + 3·rows·H·L²·4`).
//!
//! The step and backward phases bracket the backward (activations are freed while gradients
//! grow); loss positions are counted at their upper bound (every position masked).
//! What is not counted: the CUDA context and the allocator's fragmentation (keep headroom, 10
//! % by default), host memory (data loading, checkpoint serialisation).

use std::fmt::Write as _;
use std::str::FromStr;

use mmada_model::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::recipe::{MixedPrecision, ParamDtype, SftRecipe, T2iAttentionName, UniGrpoRecipe};

/// Elements per gradient all-reduce bucket (`dist.rs` buckets consecutive parameters up to
/// this many elements).
pub const BUCKET_ELEMS: u64 = crate::dist::BUCKET_ELEMS as u64;

const GIB: f64 = (1u64 << 30) as f64;

/// A planner input error.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// An input value that makes no plan (zero sizes, heads that do not divide `d_model`).
    #[error("memory plan: `{field}` = {value}: {why}")]
    Invalid {
        /// The input field (or recipe key).
        field: &'static str,
        /// Its value.
        value: String,
        /// Why, and the fix.
        why: &'static str,
    },
    /// A memory size that does not parse.
    #[error(
        "memory size `{0}`: expected a number with a unit, e.g. 80GB (10⁹ bytes), 80GiB (2³⁰ bytes), 81920MiB"
    )]
    Size(String),
    /// An unknown sharding mode.
    #[error("sharding `{0}`: expected none, optimizer or optimizer_and_gradients")]
    Sharding(String),
}

/// Data-parallel sharding of the training state (`train.sharding`, [`crate::recipe::Sharding`]).
///
/// | mode | DeepSpeed | FSDP |
/// |---|---|---|
/// | `none` | ZeRO stage 0 (DDP) | `NO_SHARD` |
/// | `optimizer` | ZeRO stage 1 | — |
/// | `optimizer_and_gradients` | ZeRO stage 2 | `SHARD_GRAD_OP` |
pub use crate::recipe::Sharding;

impl Sharding {
    /// Every mode, in order.
    pub const ALL: [Sharding; 3] = [
        Sharding::None,
        Sharding::Optimizer,
        Sharding::OptimizerAndGradients,
    ];

    /// The recipe spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Sharding::None => "none",
            Sharding::Optimizer => "optimizer",
            Sharding::OptimizerAndGradients => "optimizer_and_gradients",
        }
    }
}

impl FromStr for Sharding {
    type Err = PlanError;

    fn from_str(s: &str) -> Result<Self, PlanError> {
        Sharding::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| PlanError::Sharding(s.to_string()))
    }
}

impl std::fmt::Display for Sharding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Bytes per element of a parameter dtype.
pub fn dtype_bytes(d: ParamDtype) -> u64 {
    match d {
        ParamDtype::F32 => 4,
        ParamDtype::Bf16 => 2,
    }
}

/// The model dimensions the planner needs (from `config.json`: `d_model`, `n_layers`,
/// `n_heads`, `n_kv_heads`, `mlp_hidden_size`, `embedding_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// `d_model`.
    pub d_model: u64,
    /// `n_layers`.
    pub n_layers: u64,
    /// `n_heads`.
    pub n_heads: u64,
    /// `n_kv_heads`.
    pub n_kv_heads: u64,
    /// `mlp_hidden_size`.
    pub mlp_hidden: u64,
    /// `embedding_size` (rows of `wte` and of the untied head).
    pub vocab: u64,
}

impl ModelShape {
    /// The shape of a model config.
    pub fn from_config(cfg: &ModelConfig) -> Self {
        ModelShape {
            d_model: cfg.d_model as u64,
            n_layers: cfg.n_layers as u64,
            n_heads: cfg.n_heads as u64,
            n_kv_heads: cfg.n_kv_heads as u64,
            mlp_hidden: cfg.mlp_hidden_size as u64,
            vocab: cfg.embedding_size as u64,
        }
    }

    /// `d_model / n_heads`.
    pub fn head_dim(&self) -> u64 {
        self.d_model / self.n_heads.max(1)
    }

    /// Linear parameters of one block: q, attn_out `d²` each, k, v `d·kv`, three MLP
    /// matrices `d·m`.
    pub fn block_linear_params(&self) -> u64 {
        let (d, m) = (self.d_model, self.mlp_hidden);
        let kv = self.n_kv_heads * self.head_dim();
        2 * d * d + 2 * d * kv + 3 * d * m
    }

    /// Parameters (as `ModelConfig::num_params`): blocks (Linear + two norms), `wte` and the
    /// head `V·d` each, `ln_f`.
    pub fn params(&self) -> u64 {
        let d = self.d_model;
        (self.block_linear_params() + 2 * d) * self.n_layers + 2 * self.vocab * d + d
    }

    fn validate(&self) -> Result<(), PlanError> {
        let bad = |field, value: u64, why| {
            Err(PlanError::Invalid {
                field,
                value: value.to_string(),
                why,
            })
        };
        for (field, v) in [
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("mlp_hidden_size", self.mlp_hidden),
            ("embedding_size", self.vocab),
        ] {
            if v == 0 {
                return bad(field, v, "must be positive");
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return bad("n_heads", self.n_heads, "must divide d_model");
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad("n_kv_heads", self.n_kv_heads, "must divide n_heads");
        }
        Ok(())
    }
}

/// A Linear of each block that LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    /// `q_proj` `[d, d]`.
    QProj,
    /// `k_proj` `[d, kv]`.
    KProj,
    /// `v_proj` `[d, kv]`.
    VProj,
    /// `attn_out` `[d, d]`.
    AttnOut,
    /// `ff_proj` `[d, m]`.
    FfProj,
    /// `up_proj` `[d, m]`.
    UpProj,
    /// `ff_out` `[m, d]`.
    FfOut,
}

/// LoRA adapters (`lora:`, `mmada_model::lora`): rank `r` on the listed Linears of every
/// block. Each adapter adds `r·(in + out)` trainable f32 parameters; the base weights stay
/// frozen (no gradient, no optimizer state) in `model.dtype`; the UniGRPO reference is the
/// base with the adapters off (no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lora {
    /// The adapter rank `r`.
    pub rank: u64,
    /// The adapted Linears.
    pub targets: Vec<LoraTarget>,
    /// `lora.dropout > 0`: each adapter keeps its dropout mask and dropped input.
    pub dropout: bool,
    /// `lora.modules_to_save`: top-level modules (`wte`, `ln_f`, `ff_out`) trained in full
    /// in `model.dtype` next to the adapters (PEFT `modules_to_save`).
    pub modules_to_save: Vec<String>,
}

impl Lora {
    /// Activation elements one block's adapters keep per position for the backward: the
    /// `x·A` product `[.., r]` of every target, and with dropout the mask and the dropped
    /// input `[.., in]` of every target (2 × in).
    pub fn activations_per_position(&self, s: &ModelShape) -> u64 {
        let (d, m) = (s.d_model, s.mlp_hidden);
        self.targets
            .iter()
            .map(|t| {
                let inp = if *t == LoraTarget::FfOut { m } else { d };
                self.rank + if self.dropout { 2 * inp } else { 0 }
            })
            .sum()
    }

    /// The adapters of a recipe's `lora:` section.
    pub fn from_section(l: &crate::recipe::LoraSection) -> Self {
        let targets = l
            .target_modules
            .iter()
            .filter_map(|t| match t.as_str() {
                "q_proj" => Some(LoraTarget::QProj),
                "k_proj" => Some(LoraTarget::KProj),
                "v_proj" => Some(LoraTarget::VProj),
                "attn_out" => Some(LoraTarget::AttnOut),
                "ff_proj" => Some(LoraTarget::FfProj),
                "up_proj" => Some(LoraTarget::UpProj),
                "ff_out" => Some(LoraTarget::FfOut),
                _ => None,
            })
            .collect();
        Lora {
            rank: l.r as u64,
            targets,
            dropout: l.dropout > 0.0,
            modules_to_save: l.modules_to_save.clone(),
        }
    }

    /// Parameters of the modules to save (trained in full): `wte` `vocab × d`, `ln_f` `d`,
    /// `ff_out` `d × vocab`.
    pub fn saved_params(&self, s: &ModelShape) -> u64 {
        self.modules_to_save
            .iter()
            .map(|m| match m.as_str() {
                "ln_f" => s.d_model,
                // wte, ff_out
                _ => s.d_model * s.vocab,
            })
            .sum()
    }

    /// Trainable adapter parameters over all blocks (without the modules to save).
    pub fn params(&self, s: &ModelShape) -> u64 {
        let (d, m) = (s.d_model, s.mlp_hidden);
        let kv = s.n_kv_heads * s.head_dim();
        let per_block: u64 = self
            .targets
            .iter()
            .map(|t| match t {
                LoraTarget::QProj | LoraTarget::AttnOut => d + d,
                LoraTarget::KProj | LoraTarget::VProj => d + kv,
                LoraTarget::FfProj | LoraTarget::UpProj | LoraTarget::FfOut => d + m,
            })
            .sum();
        self.rank * per_block * s.n_layers
    }
}

/// Where the LM head runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsPath {
    /// At every position `B·L` (the model's `forward` today).
    AllPositions,
    /// Only at the loss positions, `chunk_rows` rows at a time (issue 18, `loss.ce_chunk_rows`).
    LossPositions {
        /// Rows per chunk.
        chunk_rows: u64,
    },
}

/// The largest micro-batch of one forward + backward on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroBatch {
    /// Rows `B`.
    pub rows: u64,
    /// Positions `L`.
    pub seq: u64,
    /// Scored (loss) positions `n ≤ B·L` (an upper bound: the masked positions of a
    /// diffusion batch vary with the drawn `t`).
    pub loss_positions: u64,
    /// An f32 attention bias `[B, 1, L, L]` is built (SFT with `loss.t2i_attention` ≠ `full`).
    pub attention_bias: bool,
    /// Loss terms that read the head (SFT: the streams with rows, UniGRPO: 1); with
    /// [`LogitsPath::LossPositions`] each keeps a `[d_model, V]` weight-gradient buffer.
    pub loss_terms: u64,
}

/// UniGRPO extras: the rollout canvas and the stored log-probs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutPlan {
    /// Canvas rows the sampler runs at once (`num_generations`, × 2 with CFG).
    pub rows: u64,
    /// Canvas positions (prompt + completion).
    pub seq: u64,
    /// A frozen reference model is kept (`kl_reference: reference_model`).
    pub reference_model: bool,
    /// Stored f32 log-probs (old policy + reference) of one step on this rank.
    pub logprob_values: u64,
}

/// Everything the planner needs.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanInput {
    /// Model dimensions.
    pub shape: ModelShape,
    /// The dtype the parameters are held in (`model.dtype`).
    pub param_dtype: ParamDtype,
    /// The matmul dtype (`bf16` under `train.mixed_precision: bf16`, else `param_dtype`).
    pub compute_dtype: ParamDtype,
    /// The optimizer holds an f32 master copy of the (bf16) parameters (issue 15 item 3).
    pub master_weights: bool,
    /// The dtype of AdamW's moments (today burn's AdamW keeps them in the gradient's dtype,
    /// i.e. `param_dtype`).
    pub moment_dtype: ParamDtype,
    /// Devices per node.
    pub devices_per_node: u64,
    /// Nodes.
    pub nodes: u64,
    /// Sharding mode.
    pub sharding: Sharding,
    /// Per-block activation checkpointing.
    pub activation_checkpointing: bool,
    /// LoRA adapters (none: full fine-tuning).
    pub lora: Option<Lora>,
    /// Micro-batches whose gradients are summed per optimizer step on one device.
    pub accumulation: u64,
    /// The largest micro-batch.
    pub micro: MicroBatch,
    /// Where the LM head runs.
    pub logits: LogitsPath,
    /// UniGRPO rollout (none for SFT).
    pub rollout: Option<RolloutPlan>,
}

/// When a line's bytes are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// For the whole run.
    Resident,
    /// During one forward + backward.
    Step,
    /// At the end of a backward: the complete gradient set while the first block's
    /// backward runs (the other blocks' activations are freed by then).
    Backward,
    /// During a UniGRPO rollout (never at the same time as a step).
    Rollout,
}

impl Phase {
    /// `resident`, `step` or `rollout`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Resident => "resident",
            Phase::Step => "step",
            Phase::Backward => "backward",
            Phase::Rollout => "rollout",
        }
    }
}

/// One named line of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Name (see the module doc).
    pub name: &'static str,
    /// When it is held.
    pub phase: Phase,
    /// Bytes per device.
    pub bytes: u64,
    /// How it was computed.
    pub detail: String,
}

/// Line names, for [`MemoryPlan::bytes_of`].
pub mod lines {
    /// Parameters in `model.dtype`.
    pub const COMPUTE_WEIGHTS: &str = "compute weights";
    /// f32 master copy held by the optimizer.
    pub const MASTER_WEIGHTS: &str = "master weights";
    /// LoRA adapters (f32) over the frozen base.
    pub const ADAPTERS: &str = "lora adapters";
    /// What the adapters keep for the backward (`x·A`, dropout masks).
    pub const LORA_ACTIVATIONS: &str = "lora activations";
    /// One backward's full gradient set.
    pub const GRADIENTS: &str = "gradients";
    /// The gradient accumulator (`grad_accum > 1`, several UniGRPO groups per rank).
    pub const GRAD_ACCUMULATOR: &str = "gradient accumulator";
    /// Block 0's backward while the full gradient set exists.
    pub const LAST_BLOCK: &str = "last block backward";
    /// AdamW moments.
    pub const OPTIMIZER_STATE: &str = "optimizer state";
    /// Frozen UniGRPO reference model.
    pub const REFERENCE_MODEL: &str = "reference model";
    /// Old-policy / reference log-probs.
    pub const LOGPROBS: &str = "old-policy log-probs";
    /// Gradient all-reduce buckets.
    pub const COLLECTIVE: &str = "collective buckets";
    /// Mixed-precision casts of the Linear weights kept by autodiff.
    pub const WEIGHT_CASTS: &str = "compute weight casts";
    /// Activations other than attention scores.
    pub const ACTIVATIONS: &str = "activations";
    /// Attention scores and probabilities.
    pub const SCORES: &str = "attention scores";
    /// Attention bias `[B, 1, L, L]`.
    pub const BIAS: &str = "attention bias";
    /// Logits and loss buffers.
    pub const LOGITS: &str = "logits / loss";
    /// Backward transient through one block's softmax.
    pub const BACKWARD: &str = "backward transient";
    /// UniGRPO rollout canvas.
    pub const ROLLOUT: &str = "rollout canvas";
}

/// Activation bytes of one block (no checkpointing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockActivations {
    /// Kept tensors other than the attention scores.
    pub tensors: u64,
    /// Kept attention scores / probabilities.
    pub scores: u64,
}

/// The planner's answer: named lines in bytes per device.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// The lines, resident first.
    pub lines: Vec<Line>,
    /// One block's activations.
    pub per_block: BlockActivations,
    /// Step activations + scores of all blocks without checkpointing.
    pub activations_without_checkpointing: u64,
    /// The same with per-block checkpointing.
    pub activations_with_checkpointing: u64,
    /// Parameters `P`.
    pub params: u64,
    /// Trainable parameters `Pt`.
    pub trainable: u64,
    /// Data-parallel ranks `N`.
    pub world: u64,
    /// The input.
    pub input: PlanInput,
}

impl MemoryPlan {
    fn phase_sum(&self, phase: Phase) -> u64 {
        self.lines
            .iter()
            .filter(|l| l.phase == phase)
            .map(|l| l.bytes)
            .sum()
    }

    /// Bytes held for the whole run.
    pub fn resident(&self) -> u64 {
        self.phase_sum(Phase::Resident)
    }

    /// Bytes of one forward + backward.
    pub fn step(&self) -> u64 {
        self.phase_sum(Phase::Step)
    }

    /// Bytes at the end of a backward.
    pub fn backward(&self) -> u64 {
        self.phase_sum(Phase::Backward)
    }

    /// Bytes of a rollout (0 for SFT).
    pub fn rollout(&self) -> u64 {
        self.phase_sum(Phase::Rollout)
    }

    /// The per-device peak: `resident + max(step, backward, rollout)`.
    pub fn total(&self) -> u64 {
        self.resident() + self.step().max(self.backward()).max(self.rollout())
    }

    /// The bytes of line `name` (0 when absent).
    pub fn bytes_of(&self, name: &str) -> u64 {
        self.lines
            .iter()
            .filter(|l| l.name == name)
            .map(|l| l.bytes)
            .sum()
    }

    /// Whether the total fits `gpu_mem` bytes leaving `headroom` (a fraction, 0.1 = 10 %)
    /// free.
    pub fn fits(&self, gpu_mem: u64, headroom: f64) -> bool {
        (self.total() as f64) <= gpu_mem as f64 * (1.0 - headroom)
    }

    /// The free fraction of `gpu_mem` left by the total (negative when it does not fit).
    pub fn headroom(&self, gpu_mem: u64) -> f64 {
        1.0 - self.total() as f64 / gpu_mem as f64
    }

    /// The table printed by `mmada-train plan` and at the start of a run (GiB, aligned
    /// columns), with the fit against `gpu_mem` when given.
    pub fn table(&self, gpu_mem: Option<u64>, headroom: f64) -> String {
        let i = &self.input;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "memory plan per device: {} parameters ({} trainable), {} rank(s) = {} device(s) × {} node(s), sharding {}, activation checkpointing {}, params {} / compute {}{}",
            count(self.params),
            if self.trainable == self.params {
                "all".to_string()
            } else {
                count(self.trainable)
            },
            self.world,
            i.devices_per_node,
            i.nodes,
            i.sharding,
            if i.activation_checkpointing {
                "on"
            } else {
                "off"
            },
            i.param_dtype.as_str(),
            i.compute_dtype.as_str(),
            if i.master_weights {
                ", f32 master weights"
            } else {
                ""
            },
        );
        let _ = writeln!(
            out,
            "largest micro-batch: {} rows × {} positions ({} loss positions), accumulation {}",
            i.micro.rows, i.micro.seq, i.micro.loss_positions, i.accumulation
        );
        let w = self.lines.iter().map(|l| l.name.len()).max().unwrap_or(10);
        let _ = writeln!(out, "  {:<w$}  {:<8}  {:>10}  how", "line", "phase", "size");
        for l in &self.lines {
            let _ = writeln!(
                out,
                "  {:<w$}  {:<8}  {:>10}  {}",
                l.name,
                l.phase.as_str(),
                gib(l.bytes),
                l.detail
            );
        }
        let _ = writeln!(
            out,
            "  {:<w$}  {:<8}  {:>10}  resident {} + max(step {}, backward {}, rollout {})",
            "total",
            "",
            gib(self.total()),
            gib(self.resident()),
            gib(self.step()),
            gib(self.backward()),
            gib(self.rollout()),
        );
        if let Some(g) = gpu_mem {
            let _ = writeln!(
                out,
                "{} {:.2} GiB per device with {:.0} % headroom: {:.1} % of the device is left free",
                if self.fits(g, headroom) {
                    "fits"
                } else {
                    "DOES NOT FIT"
                },
                g as f64 / GIB,
                headroom * 100.0,
                self.headroom(g) * 100.0
            );
        }
        out
    }
}

/// `8.08 B`, `25.3 M`, `148.3 K`.
fn count(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2} B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1} M", x / 1e6)
    } else {
        format!("{:.1} K", x / 1e3)
    }
}

/// `15.06 GiB` (from 0.1 GiB), else `48.1 MiB`.
fn gib(b: u64) -> String {
    let g = b as f64 / GIB;
    if g >= 0.1 {
        format!("{g:.2} GiB")
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Activation bytes of one block at `rows × seq` (module doc: the per-block formula).
pub fn block_activations(
    s: &ModelShape,
    rows: u64,
    seq: u64,
    r: u64,
    c: u64,
    mixed: bool,
) -> BlockActivations {
    let bld = rows * seq * s.d_model;
    let h1 = if mixed { 3 * c } else { r };
    let h2 = if mixed { 2 * c } else { r };
    let kd = 4 + r + h1 + 3 * c + c + 4 + r + h2;
    BlockActivations {
        tensors: bld * kd + 5 * c * rows * seq * s.mlp_hidden,
        scores: rows * s.n_heads * seq * seq * (4 + 4 + c),
    }
}

fn div_ceil(a: u64, n: u64) -> u64 {
    a.div_ceil(n.max(1))
}

/// Plan the memory of `input`.
///
/// # Errors
/// [`PlanError::Invalid`] for a zero size, heads that do not divide `d_model`, or a LoRA rank
/// of 0.
pub fn plan(input: &PlanInput) -> Result<MemoryPlan, PlanError> {
    let s = &input.shape;
    s.validate()?;
    let pos = |field, v: u64| {
        if v == 0 {
            Err(PlanError::Invalid {
                field,
                value: "0".into(),
                why: "must be positive",
            })
        } else {
            Ok(())
        }
    };
    pos("devices_per_node", input.devices_per_node)?;
    pos("nodes", input.nodes)?;
    pos("rows", input.micro.rows)?;
    pos("seq", input.micro.seq)?;
    pos("accumulation", input.accumulation)?;
    if let Some(l) = &input.lora {
        pos("lora.rank", l.rank)?;
    }
    if let LogitsPath::LossPositions { chunk_rows } = input.logits {
        pos("loss.ce_chunk_rows", chunk_rows)?;
    }
    let r = dtype_bytes(input.param_dtype);
    let c = dtype_bytes(input.compute_dtype);
    let mixed = input.compute_dtype != input.param_dtype;
    let sm = dtype_bytes(input.moment_dtype);
    let world = input.devices_per_node * input.nodes;
    let n_opt = if input.sharding == Sharding::None {
        1
    } else {
        world
    };
    let p = s.params();
    // LoRA: the adapters (`pa`), their gradients and moments are f32 whatever
    // `model.dtype`; the modules to save (`ps`) train in full in `model.dtype` (`r`, moments
    // in `sm`); the frozen base has no gradient, no moments and no master copy
    let pa = input.lora.as_ref().map_or(p, |l| l.params(s));
    let ps = input.lora.as_ref().map_or(0, |l| l.saved_params(s));
    let pt = pa + ps;
    let lora = input.lora.is_some();
    let (r_t, sm_a) = if lora { (4, 4) } else { (r, sm) };
    // one set of gradients and one AdamW moment, in bytes
    let grad_set = pa * r_t + ps * r;
    let moment_set = pa * sm_a + ps * sm;
    let grad_how = if ps > 0 {
        format!("{pa} × {r_t} B + {ps} × {r} B (modules to save)")
    } else {
        format!("{pt} × {r_t} B")
    };
    let (b, l, d, m, h, v) = (
        input.micro.rows,
        input.micro.seq,
        s.d_model,
        s.mlp_hidden,
        s.n_heads,
        s.vocab,
    );
    let n_layers = s.n_layers;
    let n_loss = input.micro.loss_positions.min(b * l);
    let mut lines = vec![];
    let mut push = |name, phase, bytes, detail: String| {
        lines.push(Line {
            name,
            phase,
            bytes,
            detail,
        })
    };

    // ---- resident
    push(
        lines::COMPUTE_WEIGHTS,
        Phase::Resident,
        p * r,
        format!(
            "{p} params × {r} B ({}), replicated",
            input.param_dtype.as_str()
        ),
    );
    if lora {
        push(
            lines::ADAPTERS,
            Phase::Resident,
            pa * 4,
            format!("LoRA A + B: {pa} × 4 B (f32) over the frozen base"),
        );
    }
    if input.master_weights && !lora {
        push(
            lines::MASTER_WEIGHTS,
            Phase::Resident,
            div_ceil(pt * 4, n_opt),
            format!("{pt} × 4 B (f32) / {n_opt} (the optimizer shard's)"),
        );
    }
    let full_grads = grad_set;
    if input.accumulation > 1 {
        let (bytes, how) = if input.sharding == Sharding::OptimizerAndGradients {
            (
                div_ceil(full_grads, world),
                format!("{grad_how} / {world} (the owner's shard of the sum)"),
            )
        } else {
            (full_grads, format!("{grad_how} (optim::add_grads)"))
        };
        push(lines::GRAD_ACCUMULATOR, Phase::Resident, bytes, how);
    }
    push(
        lines::OPTIMIZER_STATE,
        Phase::Resident,
        div_ceil(2 * moment_set, n_opt),
        if ps > 0 {
            format!(
                "AdamW m + v: 2 × ({pa} × 4 B (f32) + {ps} × {sm} B ({})) / {n_opt}",
                input.moment_dtype.as_str()
            )
        } else {
            format!(
                "AdamW m + v: 2 × {pt} × {sm_a} B ({}) / {n_opt}",
                if lora {
                    "f32"
                } else {
                    input.moment_dtype.as_str()
                }
            )
        },
    );
    if let Some(ro) = &input.rollout {
        if ro.reference_model && lora {
            push(
                lines::REFERENCE_MODEL,
                Phase::Resident,
                ps * r,
                if ps > 0 {
                    format!(
                        "the base with the adapters off: shares the frozen weights, keeps the original modules to save ({ps} × {r} B)"
                    )
                } else {
                    "the base with the adapters off: shares the frozen weights".into()
                },
            );
        } else if ro.reference_model {
            push(
                lines::REFERENCE_MODEL,
                Phase::Resident,
                p * r,
                format!("frozen copy, {p} × {r} B"),
            );
        }
        push(
            lines::LOGPROBS,
            Phase::Resident,
            ro.logprob_values * 4,
            format!("{} f32 values", ro.logprob_values),
        );
    }
    if world > 1 {
        let e = BUCKET_ELEMS.min(pt);
        push(
            lines::COLLECTIVE,
            Phase::Resident,
            3 * e * r_t,
            format!(
                "3 × {e} elements × {r_t} B: concatenated bucket, a child's bucket and the sum (tree all-reduce)"
            ),
        );
    }

    // ---- step
    let block = block_activations(s, b, l, r, c, mixed);
    let bld = b * l * d;
    let head_h = if mixed { c } else { r };
    let final_norm = bld * (4 + r + head_h);
    let block_inputs = bld * r * n_layers;
    let without = (block.tensors + block.scores) * n_layers + final_norm;
    let with = block_inputs + block.tensors + block.scores + final_norm;
    let head_linear = d * v;
    if mixed {
        let linear = if input.activation_checkpointing {
            s.block_linear_params() + head_linear
        } else {
            s.block_linear_params() * n_layers + head_linear
        };
        push(
            lines::WEIGHT_CASTS,
            Phase::Step,
            linear * c,
            format!(
                "{linear} Linear params × {c} B kept for the backward{}",
                if input.activation_checkpointing {
                    " (one block + head)"
                } else {
                    ""
                }
            ),
        );
    }
    let ckpt = input.activation_checkpointing;
    if ckpt {
        // crate::recompute: the forward keeps the block inputs; the loss and its backward run
        // on the final norm; then the blocks are recomputed one at a time while the gradients
        // accumulate (peak at block 0: every gradient, block 0's input and graph)
        push(
            lines::ACTIVATIONS,
            Phase::Step,
            block_inputs + final_norm,
            format!(
                "block inputs {} × {n_layers} + final norm {} (without checkpointing: {} per block × {n_layers})",
                gib(bld * r),
                gib(final_norm),
                gib(block.tensors)
            ),
        );
        push(
            lines::SCORES,
            Phase::Backward,
            block.scores,
            format!(
                "one recomputed block: {b}×{h}×{l}² × {} B (without checkpointing: × {n_layers})",
                8 + c
            ),
        );
    } else {
        push(
            lines::ACTIVATIONS,
            Phase::Step,
            block.tensors * n_layers + final_norm,
            format!(
                "{} per block × {n_layers} + final norm {} (with checkpointing: {})",
                gib(block.tensors),
                gib(final_norm),
                gib(with)
            ),
        );
        push(
            lines::SCORES,
            Phase::Step,
            block.scores * n_layers,
            format!(
                "{b}×{h}×{l}² × {} B (f32 exp input + exp + probs) = {} per block × {n_layers}",
                8 + c,
                gib(block.scores)
            ),
        );
    }
    if let Some(lo) = &input.lora {
        // the adapter branch computes in the activations' dtype (`c`)
        let per_block = b * l * lo.activations_per_position(s) * c;
        let blocks = if input.activation_checkpointing {
            1
        } else {
            n_layers
        };
        push(
            lines::LORA_ACTIVATIONS,
            Phase::Step,
            per_block * blocks,
            format!(
                "{} per block × {blocks}: x·A [.., {}] of {} targets{}",
                gib(per_block),
                lo.rank,
                lo.targets.len(),
                if lo.dropout {
                    " + dropout mask and dropped input [.., in] each"
                } else {
                    ""
                }
            ),
        );
    }
    if input.micro.attention_bias {
        push(
            lines::BIAS,
            Phase::Step,
            b * l * l * 4,
            format!("[{b}, 1, {l}, {l}] f32"),
        );
    }
    let (logits, logits_detail) = match input.logits {
        LogitsPath::AllPositions => {
            let lo = if mixed { 4 } else { r };
            let grad = 2 * b * l * v * lo;
            let cast = if mixed { b * l * v * c } else { 0 };
            let ce = 2 * n_loss * v * 4;
            (
                grad + cast + ce,
                format!(
                    "head at all {} positions: 2 × [{}, {v}] × {lo} B gradient{} + CE rows 2 × {n_loss} × {v} × 4 B",
                    b * l,
                    b * l,
                    if mixed {
                        format!(" + bf16 head-output gradient {}", gib(cast))
                    } else {
                        String::new()
                    }
                ),
            )
        }
        LogitsPath::LossPositions { chunk_rows } => {
            let chunk = chunk_rows.min(n_loss.max(1));
            let kept = n_loss * d * 4;
            let w_grads = input.micro.loss_terms * d * v * 4;
            let work = 3 * chunk * v * 4;
            (
                kept + w_grads + work,
                format!(
                    "head at {n_loss} loss positions: ∂L/∂h {} + {} × [{d}, {v}] f32 ∂L/∂W {} + one chunk 3 × {chunk} × {v} × 4 B",
                    gib(kept),
                    input.micro.loss_terms,
                    gib(w_grads)
                ),
            )
        }
    };
    push(lines::LOGITS, Phase::Step, logits, logits_detail);
    push(
        lines::BACKWARD,
        if ckpt { Phase::Backward } else { Phase::Step },
        3 * b * h * l * l * 4,
        format!("3 × [{b}, {h}, {l}, {l}] f32 (softmax gradient chain of one block)"),
    );

    // ---- end of the backward
    push(
        lines::GRADIENTS,
        Phase::Backward,
        full_grads,
        format!("one backward's {grad_how} (burn returns every gradient at once)"),
    );
    if ckpt {
        push(
            lines::LAST_BLOCK,
            Phase::Backward,
            bld * r + block.tensors,
            "block 0's input and recomputed activations (its scores and softmax gradients above)"
                .into(),
        );
    } else {
        push(
            lines::LAST_BLOCK,
            Phase::Backward,
            block.tensors + block.scores + 3 * b * h * l * l * 4,
            "block 0's activations, scores and softmax gradients".into(),
        );
    }

    // ---- rollout
    if let Some(ro) = &input.rollout {
        let (rb, rl) = (ro.rows, ro.seq);
        let canvas = 3 * rb * rl * v * 4;
        let work = rb * rl * (6 * d + 3 * m) * c + 3 * rb * h * rl * rl * 4;
        push(
            lines::ROLLOUT,
            Phase::Rollout,
            canvas + work,
            format!(
                "{rb} rows × {rl}: logits, probabilities, confidences 3 × {} + one block without graph {}",
                gib(rb * rl * v * 4),
                gib(work)
            ),
        );
    }
    Ok(MemoryPlan {
        lines,
        per_block: block,
        activations_without_checkpointing: without,
        activations_with_checkpointing: with,
        params: p,
        trainable: pt,
        world,
        input: input.clone(),
    })
}

/// Parse a memory size: `80GB` (10⁹), `80GiB` (2³⁰), `81920MiB`, `512MB`, `1TB`, or plain
/// bytes.
///
/// # Errors
/// [`PlanError::Size`].
pub fn parse_size(text: &str) -> Result<u64, PlanError> {
    let t = text.trim();
    let split = t
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.parse().map_err(|_| PlanError::Size(text.into()))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" | "g" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => (1u64 << 20) as f64,
        "gib" => GIB,
        "tib" => (1u64 << 40) as f64,
        _ => return Err(PlanError::Size(text.into())),
    };
    if !x.is_finite() || x <= 0.0 {
        return Err(PlanError::Size(text.into()));
    }
    Ok((x * mult) as u64)
}

/// Image tokens per image at `resolution` (MAGVIT-v2 downsamples by 16).
fn image_tokens(resolution: u32) -> u64 {
    let side = u64::from(resolution / 16);
    side * side
}

impl PlanInput {
    /// The plan input of an SFT recipe as the trainer runs it today: per device, every
    /// stream's `batch_size` rows in one `[t2i | lm | mmu]` micro-batch, collated to the
    /// longest row (`t2i`: `P + 1 + N + 2`, `lm`: `max_lm_len`, `mmu`: `N + 3 + P`, with
    /// `P` = `max_seq_length`, `N` = image tokens of `data.image_tokenizer.resolution`, or
    /// `num_vq_tokens` of the config); every position may be a loss position; f32 or bf16
    /// parameters per `model.dtype`, bf16 matmuls under `train.mixed_precision: bf16`, no
    /// separate master copy, AdamW moments in the parameter dtype, no sharding, no
    /// checkpointing, the head at every position.
    pub fn sft(recipe: &SftRecipe, cfg: &ModelConfig, devices_per_node: u64, nodes: u64) -> Self {
        let data = &recipe.data;
        let p = data.layout.max_seq_length as u64;
        let n_img = match &data.image_tokenizer {
            Some(it) => image_tokens(it.resolution),
            None => cfg.num_vq_tokens.unwrap_or(1024) as u64,
        };
        let mut seq = 0;
        if data.t2i.batch_size > 0 {
            seq = seq.max(p + 1 + n_img + 2);
        }
        if data.lm.batch_size > 0 {
            seq = seq.max(data.layout.max_lm_len as u64);
        }
        if data.mmu.batch_size > 0 {
            seq = seq.max(n_img + 3 + p);
        }
        let rows = data.rows_per_micro_batch() as u64;
        let param_dtype = recipe.model.dtype;
        PlanInput {
            shape: ModelShape::from_config(cfg),
            param_dtype,
            compute_dtype: compute_of(param_dtype, recipe.train.mixed_precision),
            master_weights: recipe.optimizer.master_weights && param_dtype != ParamDtype::F32,
            moment_dtype: moments_of(param_dtype, &recipe.optimizer),
            devices_per_node,
            nodes,
            sharding: recipe.train.sharding,
            activation_checkpointing: recipe.train.activation_checkpointing,
            lora: recipe.lora.as_ref().map(Lora::from_section),
            accumulation: recipe.train.grad_accum,
            micro: MicroBatch {
                rows,
                seq,
                loss_positions: rows * seq,
                attention_bias: recipe.loss.t2i_attention != T2iAttentionName::Full,
                loss_terms: data
                    .streams()
                    .iter()
                    .filter(|(_, st)| st.batch_size > 0)
                    .count() as u64,
            },
            logits: logits_path(recipe.loss.ce_chunk_rows),
            rollout: None,
        }
    }

    /// The plan input of a UniGRPO recipe as the trainer runs it today: the update forwards
    /// one prompt group at a time (`num_generations` rows of `max_prompt_length +
    /// max_completion_length` positions, the completion positions scored) and accumulates
    /// the groups of the rank (`⌈prompts per step / N⌉`); the rollout canvas is the largest
    /// task group's (`num_generations` rows, × 2 with classifier-free guidance: a text task's
    /// `cfg_scale` > 0 or a t2i task's `maskgit.guidance_scale` > 0); old-policy (and reference) log-probs of the
    /// `num_iterations` noised batches are stored; the frozen reference model when
    /// `grpo.kl_reference: reference_model`.
    pub fn unigrpo(
        recipe: &UniGrpoRecipe,
        cfg: &ModelConfig,
        devices_per_node: u64,
        nodes: u64,
    ) -> Self {
        let g = &recipe.grpo;
        let rows = g.num_generations as u64;
        let specs = recipe.task_specs();
        // the longest task row and the most scored positions of a row, with N the image
        // tokens of image_tokenizer.resolution: text `P + C` (P counts <BOS>); mmu
        // `<|mmu|> <|soi|> N <|eoi|>` + `P + C`; t2i `P + 1` text tokens (<|t2i|> <BOS> caption
        // <EOS>), `<|soi|> N <|eoi|>`, scoring the N image tokens
        let n_img = u64::from(
            recipe
                .image_tokenizer
                .as_ref()
                .map_or(512, |s| s.resolution)
                / 16,
        )
        .pow(2);
        let row_of = |t: &crate::recipe::TaskSpec| {
            let p = t.prompts.max_prompt_length as u64;
            let c = t.max_completion_length as u64;
            match t.kind {
                crate::recipe::TaskKind::Text => (p + c, c),
                crate::recipe::TaskKind::Mmu => (n_img + 3 + p + c, c),
                crate::recipe::TaskKind::T2i => (p + n_img + 3, n_img),
            }
        };
        let (seq, comp) = specs
            .iter()
            .map(row_of)
            .fold((0, 0), |(a, b), (x, y)| (a.max(x), b.max(y)));
        // a rollout decodes one task's group at a time: the largest of them, with CFG doubling
        // its rows (a text task's `cfg_scale`, a t2i task's MaskGIT `guidance_scale`)
        let (rollout_rows, rollout_seq) = specs
            .iter()
            .map(|t| {
                let guided = match t.kind {
                    crate::recipe::TaskKind::T2i => t.maskgit.guidance_scale > 0.0,
                    _ => t.rollout.cfg_scale.unwrap_or(0.0) > 0.0,
                };
                let r = g.num_generations as u64 * if guided { 2 } else { 1 };
                (r, row_of(t).0)
            })
            .max_by_key(|(r, l)| r * l)
            .unwrap_or((rows, seq));
        let world = (devices_per_node * nodes).max(1);
        let groups = div_ceil(g.prompts_per_step() as u64, world);
        let reference = g.uses_reference_model();
        let logprob_values =
            g.num_iterations as u64 * groups * rows * comp * if reference { 2 } else { 1 };
        let param_dtype = recipe.model.dtype;
        PlanInput {
            shape: ModelShape::from_config(cfg),
            param_dtype,
            compute_dtype: compute_of(param_dtype, recipe.train.mixed_precision),
            master_weights: recipe.optimizer.master_weights && param_dtype != ParamDtype::F32,
            moment_dtype: moments_of(param_dtype, &recipe.optimizer),
            devices_per_node,
            nodes,
            sharding: recipe.train.sharding,
            activation_checkpointing: recipe.train.activation_checkpointing,
            lora: recipe.lora.as_ref().map(Lora::from_section),
            accumulation: groups.max(1),
            micro: MicroBatch {
                rows,
                seq,
                loss_positions: rows * comp,
                attention_bias: false,
                loss_terms: 1,
            },
            logits: logits_path(g.ce_chunk_rows),
            rollout: Some(RolloutPlan {
                rows: rollout_rows,
                seq: rollout_seq,
                reference_model: reference,
                logprob_values,
            }),
        }
    }

    /// What-if: bf16 parameters with an f32 master copy in the optimizer and f32 moments (the
    /// issue 15 item 3 layout), from an input with f32 parameters under mixed precision or
    /// bf16 parameters.
    pub fn with_master_weights(mut self) -> Self {
        self.param_dtype = ParamDtype::Bf16;
        self.compute_dtype = ParamDtype::Bf16;
        self.master_weights = true;
        self.moment_dtype = ParamDtype::F32;
        self
    }
}

/// `loss.ce_chunk_rows` / `grpo.ce_chunk_rows`: 0 = full logits, else the chunked head.
fn logits_path(ce_chunk_rows: usize) -> LogitsPath {
    match ce_chunk_rows {
        0 => LogitsPath::AllPositions,
        n => LogitsPath::LossPositions {
            chunk_rows: n as u64,
        },
    }
}

/// AdamW moments (`crate::optim`): f32 for bf16 parameters with a master copy or stochastic
/// rounding, else the parameter dtype.
fn moments_of(param: ParamDtype, opt: &crate::recipe::OptimizerSection) -> ParamDtype {
    if opt.master_weights || opt.bf16_rounding == crate::recipe::Bf16Rounding::Stochastic {
        ParamDtype::F32
    } else {
        param
    }
}

fn compute_of(param: ParamDtype, mixed: MixedPrecision) -> ParamDtype {
    match mixed {
        MixedPrecision::Bf16 => ParamDtype::Bf16,
        MixedPrecision::No => param,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llada() -> ModelShape {
        ModelShape::from_config(&ModelConfig::llada_8b())
    }

    fn input() -> PlanInput {
        PlanInput {
            shape: llada(),
            param_dtype: ParamDtype::F32,
            compute_dtype: ParamDtype::F32,
            master_weights: false,
            moment_dtype: ParamDtype::F32,
            devices_per_node: 1,
            nodes: 1,
            sharding: Sharding::None,
            activation_checkpointing: false,
            lora: None,
            accumulation: 1,
            micro: MicroBatch {
                rows: 1,
                seq: 128,
                loss_positions: 128,
                attention_bias: false,
                loss_terms: 1,
            },
            logits: LogitsPath::AllPositions,
            rollout: None,
        }
    }

    #[test]
    fn params_match_the_model_config_count() {
        assert_eq!(llada().params(), ModelConfig::llada_8b().num_params());
        assert_eq!(llada().params(), 8_015_581_184);
        let mut c = ModelConfig::tiny();
        c.n_kv_heads = 2;
        assert_eq!(ModelShape::from_config(&c).params(), c.num_params());
    }

    #[test]
    fn sharding_names_round_trip() {
        for m in Sharding::ALL {
            assert_eq!(m.as_str().parse::<Sharding>().unwrap(), m);
            let y = serde_json::to_string(&m).unwrap();
            assert_eq!(y, format!("\"{}\"", m.as_str()));
        }
        assert!("zero2".parse::<Sharding>().is_err());
    }

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_size("80GB").unwrap(), 80_000_000_000);
        assert_eq!(parse_size("80GiB").unwrap(), 80 << 30);
        assert_eq!(parse_size("81920MiB").unwrap(), 80 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert!(parse_size("80 parsecs").is_err());
        assert!(parse_size("0GB").is_err());
        assert!(parse_size("GB").is_err());
    }

    #[test]
    fn optimizer_state_and_master_weights_divide_by_the_ranks() {
        let mut i = input().with_master_weights();
        i.devices_per_node = 8;
        let none = plan(&i).unwrap();
        i.sharding = Sharding::Optimizer;
        let opt = plan(&i).unwrap();
        let p = llada().params();
        assert_eq!(none.bytes_of(lines::OPTIMIZER_STATE), 8 * p);
        assert_eq!(opt.bytes_of(lines::OPTIMIZER_STATE), p);
        assert_eq!(none.bytes_of(lines::MASTER_WEIGHTS), 4 * p);
        assert_eq!(opt.bytes_of(lines::MASTER_WEIGHTS), p / 2);
        // bf16 gradients, not sharded by stage 1
        assert_eq!(none.bytes_of(lines::GRADIENTS), 2 * p);
        assert_eq!(opt.bytes_of(lines::GRADIENTS), 2 * p);
    }

    #[test]
    fn sharded_gradients_shrink_only_the_accumulator() {
        let mut i = input();
        i.devices_per_node = 4;
        i.accumulation = 2;
        i.sharding = Sharding::Optimizer;
        let p = llada().params();
        let grads = |i: &PlanInput| {
            let pl = plan(i).unwrap();
            (
                pl.bytes_of(lines::GRADIENTS),
                pl.bytes_of(lines::GRAD_ACCUMULATOR),
            )
        };
        assert_eq!(grads(&i), (4 * p, 4 * p));
        i.sharding = Sharding::OptimizerAndGradients;
        assert_eq!(grads(&i), (4 * p, p));
        i.accumulation = 1;
        assert_eq!(grads(&i), (4 * p, 0));
    }

    #[test]
    fn block_activation_formula_by_precision() {
        let s = ModelShape {
            d_model: 8,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 2,
            mlp_hidden: 16,
            vocab: 10,
        };
        // f32: B·L·d·40 + 20·B·L·m, scores B·H·L²·12
        let f32 = block_activations(&s, 2, 3, 4, 4, false);
        assert_eq!(f32.tensors, 2 * 3 * 8 * 40 + 20 * 2 * 3 * 16);
        assert_eq!(f32.scores, 2 * 2 * 9 * 12);
        // f32 params, bf16 compute: 4+4+6+6+2+4+4+4 = 34, 10·m, scores 10
        let mixed = block_activations(&s, 2, 3, 4, 2, true);
        assert_eq!(mixed.tensors, 2 * 3 * 8 * 34 + 10 * 2 * 3 * 16);
        assert_eq!(mixed.scores, 2 * 2 * 9 * 10);
        // bf16 params: 4+2+2+6+2+4+2+2 = 24
        let bf16 = block_activations(&s, 2, 3, 2, 2, false);
        assert_eq!(bf16.tensors, 2 * 3 * 8 * 24 + 10 * 2 * 3 * 16);
    }

    #[test]
    fn checkpointing_keeps_block_inputs_and_one_block() {
        let mut i = input();
        i.micro.seq = 1024;
        i.micro.loss_positions = 1024;
        let off = plan(&i).unwrap();
        i.activation_checkpointing = true;
        let on = plan(&i).unwrap();
        let blk = off.per_block;
        let bld = 1024 * 4096;
        assert_eq!(
            off.bytes_of(lines::ACTIVATIONS) - on.bytes_of(lines::ACTIVATIONS),
            32 * blk.tensors - 32 * bld * 4
        );
        assert_eq!(on.bytes_of(lines::LAST_BLOCK), bld * 4 + blk.tensors);
        assert_eq!(on.bytes_of(lines::SCORES), blk.scores);
        assert_eq!(
            off.activations_with_checkpointing,
            on.activations_with_checkpointing
        );
        assert!(off.activations_without_checkpointing > 10 * on.activations_with_checkpointing);
    }

    #[test]
    fn total_is_resident_plus_the_larger_phase() {
        let mut i = input();
        i.rollout = Some(RolloutPlan {
            rows: 64,
            seq: 2048,
            reference_model: true,
            logprob_values: 1000,
        });
        let p = plan(&i).unwrap();
        assert!(
            p.rollout() > p.step().max(p.backward()),
            "a huge canvas dominates"
        );
        assert_eq!(p.total(), p.resident() + p.rollout());
        assert_eq!(p.bytes_of(lines::REFERENCE_MODEL), 4 * llada().params());
        assert_eq!(p.bytes_of(lines::LOGPROBS), 4000);
        let sum: u64 = p.lines.iter().map(|l| l.bytes).sum();
        assert_eq!(sum, p.resident() + p.step() + p.backward() + p.rollout());
        // the backward phase: one gradient set + block 0 (activations, scores, 3 f32 score
        // gradients)
        let b = p.per_block;
        assert_eq!(
            p.backward(),
            4 * llada().params() + b.tensors + b.scores + 3 * 32 * 128 * 128 * 4
        );
    }

    #[test]
    fn bad_inputs_name_the_field() {
        let mut i = input();
        i.shape.n_heads = 3;
        assert!(plan(&i).unwrap_err().to_string().contains("n_heads"));
        let mut i = input();
        i.devices_per_node = 0;
        assert!(
            plan(&i)
                .unwrap_err()
                .to_string()
                .contains("devices_per_node")
        );
        let mut i = input();
        i.logits = LogitsPath::LossPositions { chunk_rows: 0 };
        assert!(plan(&i).unwrap_err().to_string().contains("ce_chunk_rows"));
    }

    #[test]
    fn lora_r8_on_d512_keeps_under_2_percent_of_the_optimizer_state() {
        // d_model 512, 8 blocks, MLP 1536 (LLaDA's ×3), GPT-2 vocabulary (50 304 rows)
        let shape = ModelShape {
            d_model: 512,
            n_layers: 8,
            n_heads: 8,
            n_kv_heads: 8,
            mlp_hidden: 1536,
            vocab: 50_304,
        };
        let mut i = input();
        i.shape = shape;
        let full = plan(&i).unwrap();
        i.lora = Some(Lora {
            rank: 8,
            targets: vec![
                LoraTarget::QProj,
                LoraTarget::KProj,
                LoraTarget::VProj,
                LoraTarget::AttnOut,
                LoraTarget::FfProj,
                LoraTarget::UpProj,
                LoraTarget::FfOut,
            ],
            dropout: false,
            modules_to_save: vec![],
        });
        let lora = plan(&i).unwrap();
        // per block 8·(4·(512 + 512) + 3·(512 + 1536)) = 81 920; × 8 blocks
        assert_eq!(lora.trainable, 655_360);
        let ratio = lora.bytes_of(lines::OPTIMIZER_STATE) as f64
            / full.bytes_of(lines::OPTIMIZER_STATE) as f64;
        assert!(ratio <= 0.02, "optimizer state ratio {ratio}");
        assert_eq!(
            lora.bytes_of(lines::OPTIMIZER_STATE),
            8 * 655_360,
            "f32 m + v"
        );
        // the frozen base keeps its bytes; nothing else is trained
        assert_eq!(
            lora.bytes_of(lines::COMPUTE_WEIGHTS),
            full.bytes_of(lines::COMPUTE_WEIGHTS)
        );
        assert_eq!(lora.bytes_of(lines::ADAPTERS), 4 * 655_360);
        assert_eq!(lora.bytes_of(lines::GRADIENTS), 4 * 655_360);
    }

    #[test]
    fn lora_over_a_bf16_base_has_f32_adapters_and_no_reference_copy() {
        let mut i = input();
        i.param_dtype = ParamDtype::Bf16;
        i.compute_dtype = ParamDtype::Bf16;
        i.moment_dtype = ParamDtype::Bf16;
        i.master_weights = true;
        i.rollout = Some(RolloutPlan {
            rows: 8,
            seq: 512,
            reference_model: true,
            logprob_values: 1000,
        });
        let full = plan(&i).unwrap();
        assert_eq!(full.bytes_of(lines::REFERENCE_MODEL), 2 * llada().params());
        i.lora = Some(Lora {
            rank: 16,
            targets: vec![LoraTarget::QProj, LoraTarget::VProj],
            dropout: true,
            modules_to_save: vec![],
        });
        let p = plan(&i).unwrap();
        let pt = p.trainable;
        assert_eq!(p.bytes_of(lines::REFERENCE_MODEL), 0);
        assert_eq!(p.bytes_of(lines::MASTER_WEIGHTS), 0);
        assert_eq!(p.bytes_of(lines::OPTIMIZER_STATE), 8 * pt);
        assert_eq!(p.bytes_of(lines::COMPUTE_WEIGHTS), 2 * llada().params());
        // x·A (r = 16) and the dropout mask + dropped input (2 × 4096) of q and v, bf16
        let (b, l) = (i.micro.rows, i.micro.seq);
        assert_eq!(
            p.bytes_of(lines::LORA_ACTIVATIONS),
            b * l * 2 * (16 + 2 * 4096) * 2 * 32
        );
    }

    #[test]
    fn lora_counts_adapter_parameters_only() {
        let mut i = input();
        i.lora = Some(Lora {
            rank: 16,
            targets: vec![LoraTarget::QProj, LoraTarget::VProj, LoraTarget::FfOut],
            dropout: false,
            modules_to_save: vec![],
        });
        let p = plan(&i).unwrap();
        // per block 16·((4096+4096) + (4096+4096) + (4096+12288)) = 16·32768 = 524288; × 32
        assert_eq!(p.trainable, 524_288 * 32);
        assert_eq!(p.bytes_of(lines::OPTIMIZER_STATE), 8 * 524_288 * 32);
        assert_eq!(p.bytes_of(lines::COMPUTE_WEIGHTS), 4 * llada().params());
    }

    #[test]
    fn lora_modules_to_save_train_in_full_in_the_model_dtype() {
        let mut i = input();
        i.param_dtype = ParamDtype::Bf16;
        i.compute_dtype = ParamDtype::Bf16;
        i.moment_dtype = ParamDtype::Bf16;
        i.rollout = Some(RolloutPlan {
            rows: 8,
            seq: 512,
            reference_model: true,
            logprob_values: 1000,
        });
        i.lora = Some(Lora {
            rank: 16,
            targets: vec![LoraTarget::QProj, LoraTarget::VProj],
            dropout: false,
            modules_to_save: vec!["ln_f".into(), "ff_out".into()],
        });
        let p = plan(&i).unwrap();
        // adapters 16·(2·(4096 + 4096))·32 = 8 388 608 f32; saved 4096 + 4096·126 464 bf16
        let pa = 8_388_608u64;
        let ps = 4096 + 4096 * 126_464u64;
        assert_eq!(p.trainable, pa + ps);
        assert_eq!(p.bytes_of(lines::ADAPTERS), 4 * pa);
        assert_eq!(p.bytes_of(lines::GRADIENTS), 4 * pa + 2 * ps);
        assert_eq!(p.bytes_of(lines::OPTIMIZER_STATE), 2 * (4 * pa + 2 * ps));
        // the reference keeps the original modules to save (PEFT original_module)
        assert_eq!(p.bytes_of(lines::REFERENCE_MODEL), 2 * ps);
        assert_eq!(p.bytes_of(lines::COMPUTE_WEIGHTS), 2 * llada().params());
    }
}
