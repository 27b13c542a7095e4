//! AdamW with PyTorch semantics (our own, no burn optimizer), f32 master weights or
//! stochastic rounding for bf16 parameters, ZeRO-style ownership of parameters, global-norm
//! clipping, gradient accumulation, and optimizer state saved by parameter name.
//!
//! # The update
//! `torch.optim.AdamW` (PyTorch 2.x `torch/optim/adamw.py`, `_single_tensor_adamw`; Loshchilov
//! & Hutter 2019, Algorithm 2), per parameter with its own step count `t`:
//! ```text
//! p ← p · (1 − lr·wd)                       decoupled weight decay
//! m ← β₁·m + (1 − β₁)·g                     (first step: m = (1 − β₁)·g)
//! v ← β₂·v + (1 − β₂)·g²
//! p ← p − lr · (m / (1 − β₁ᵗ)) / (sqrt(v / (1 − β₂ᵗ)) + ε)     ε outside the square root
//! ```
//! The operations run in the order of burn 0.21's `AdamW` (`burn-optim` `optim/adamw.rs`),
//! which computes the same formula, so that f32 training is bit-identical to the
//! `OptimizerAdaptor<AdamW>` this module replaces (checked by a test).
//!
//! # Precision ([`Precision`])
//! * [`Precision::Plain`]: the state lives in the parameter dtype and the update is written
//!   in it (f32 training, and `train.mixed_precision: bf16` over f32 parameters).
//! * [`Precision::Master`]: for parameters that are not f32 (`model.dtype: bf16`) the
//!   optimizer keeps an f32 master copy of each parameter it owns (initialised from the
//!   weights at its first update, or from `master_weights.safetensors` on resume), updates
//!   the master with f32 moments and writes the master rounded to nearest back into the
//!   model.
//! * [`Precision::Stochastic`]: no master copy; the update is computed in f32 from the bf16
//!   weight and rounded stochastically into bf16 (`P(round up) = distance / ulp`, from a
//!   SplitMix64 stream seeded by the run seed, the parameter name and its step: reproducible,
//!   and independent of the number of ranks). The rounding is done on the host (a device →
//!   host → device copy of each updated parameter): fine on CPU and small models, slow on a
//!   GPU at 8B, where the master copy is the better choice.
//!
//! # Ownership (ZeRO)
//! [`AdamW::set_owned`] restricts the optimizer to a subset of parameters
//! ([`partition`]): it keeps state (and master weights) only for them and ignores the
//! gradients of the others, whose new values come from their owners
//! (`crate::dist::broadcast_params`).
//!
//! burn's `GradientClipping::Norm` clips per tensor, so the global norm
//! (`torch.nn.utils.clip_grad_norm_`) is implemented in [`clip_global_norm`].

use std::collections::{HashMap, HashSet};
use std::path::Path;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};
use mmada_model::LladaModel;
use mmada_model::model::ParamRef;

use crate::recipe::OptimizerSection;

/// How the update reaches parameters that are not f32 (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// State and update in the parameter dtype (f32 parameters).
    Plain,
    /// f32 master copy of every owned non-f32 parameter; the model gets it rounded to nearest.
    Master,
    /// No master copy: the f32 update is rounded stochastically into the parameter dtype.
    Stochastic,
}

/// One parameter of the model as the optimizer sees it: Hugging Face name, `ParamId`, burn
/// dims (`[in, out]` for Linear weights) and whether it is a Linear weight (transposed in
/// the torch layout of the checkpoint files).
#[derive(Debug, Clone)]
pub struct ParamInfo {
    /// Hugging Face name without the `model.transformer.` prefix.
    pub name: String,
    /// The model's id of the parameter (differs between processes).
    pub id: ParamId,
    /// burn shape.
    pub dims: Vec<usize>,
    /// A Linear weight (burn `[in, out]`, torch `[out, in]`).
    pub linear: bool,
}

impl ParamInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

/// Every parameter of `model` in the order of `LladaModel::params`.
pub fn param_infos<B: Backend>(model: &LladaModel<B>) -> Vec<ParamInfo> {
    model
        .params()
        .into_iter()
        .map(|(name, p)| match p {
            ParamRef::Linear(w) => ParamInfo {
                name,
                id: w.id,
                dims: w.val().dims().to_vec(),
                linear: true,
            },
            ParamRef::Matrix(w) => ParamInfo {
                name,
                id: w.id,
                dims: w.val().dims().to_vec(),
                linear: false,
            },
            ParamRef::Vector(w) => ParamInfo {
                name,
                id: w.id,
                dims: w.val().dims().to_vec(),
                linear: false,
            },
        })
        .collect()
}

/// The owner rank of every parameter (in `params` order) over `world` ranks: whole tensors,
/// balanced by element count, deterministic (largest first, each to the least-loaded rank,
/// ties to the lower parameter index and the lower rank: the greedy LPT schedule).
pub fn partition(numels: &[usize], world: usize) -> Vec<usize> {
    let world = world.max(1);
    let mut order: Vec<usize> = (0..numels.len()).collect();
    order.sort_by(|&a, &b| numels[b].cmp(&numels[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; world];
    let mut owner = vec![0usize; numels.len()];
    for i in order {
        let r = (0..world).min_by_key(|&r| (load[r], r)).expect("world ≥ 1");
        owner[i] = r;
        load[r] += numels[i];
    }
    owner
}

/// A parameter's gradient as a flat inner-backend tensor (removed from `grads`).
fn take_grad<B: AutodiffBackend>(
    grads: &mut GradientsParams,
    info: &ParamInfo,
) -> Option<Tensor<B::InnerBackend, 1>> {
    if info.dims.len() == 2 {
        grads
            .remove::<B::InnerBackend, 2>(info.id)
            .map(|g| g.reshape([info.numel()]))
    } else {
        grads.remove::<B::InnerBackend, 1>(info.id)
    }
}

/// Put a flat gradient back in `grads` with the parameter's shape.
fn put_grad<B: AutodiffBackend>(
    grads: &mut GradientsParams,
    info: &ParamInfo,
    g: Tensor<B::InnerBackend, 1>,
) {
    if info.dims.len() == 2 {
        grads.register(info.id, g.reshape([info.dims[0], info.dims[1]]));
    } else {
        grads.register(info.id, g);
    }
}

/// A parameter's value as a flat inner-backend tensor.
fn param_value<B: AutodiffBackend>(
    model: &LladaModel<B>,
    id: ParamId,
) -> Tensor<B::InnerBackend, 1> {
    for (_, p) in model.params() {
        match p {
            ParamRef::Linear(w) | ParamRef::Matrix(w) if w.id == id => {
                let v = w.val().inner();
                let n = v.dims().iter().product::<usize>();
                return v.reshape([n]);
            }
            ParamRef::Vector(w) if w.id == id => return w.val().inner(),
            _ => {}
        }
    }
    panic!("parameter {id} is not in the model")
}

/// New values for some of a model's parameters, as flat inner tensors (see [`Replace`]).
trait FlatUpdate<B: Backend> {
    /// Whether parameter `id` gets a new value.
    fn wants(&self, id: &ParamId) -> bool;
    /// The new value `[numel]` of a wanted parameter `id` from its current one `p` `[numel]`.
    fn update(&mut self, id: ParamId, p: Tensor<B, 1>) -> Tensor<B, 1>;
}

/// Replaces the parameters its [`FlatUpdate`] wants (reshaped to the parameter's dims) while
/// the module is mapped, so each current value is owned by the update, keeping
/// `require_grad` as burn's optimizer adaptor does.
struct Replace<U>(U);

impl<AB: AutodiffBackend, U: FlatUpdate<AB::InnerBackend>> ModuleMapper<AB> for Replace<U> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        if !self.0.wants(&id) {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let dims: [usize; D] = tensor.dims();
        let require_grad = tensor.is_require_grad();
        let p = tensor.inner().reshape([dims.iter().product::<usize>()]);
        let mut t = Tensor::<AB, D>::from_inner(self.0.update(id, p).reshape(dims));
        if require_grad {
            t = t.require_grad();
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

/// Given values by parameter ([`write_params`]).
impl<B: Backend> FlatUpdate<B> for HashMap<ParamId, Tensor<B, 1>> {
    fn wants(&self, id: &ParamId) -> bool {
        self.contains_key(id)
    }

    fn update(&mut self, id: ParamId, _p: Tensor<B, 1>) -> Tensor<B, 1> {
        self.remove(&id).expect("a wanted parameter")
    }
}

/// [`AdamW::update_one`] of the parameters with a gradient in `todo` ([`AdamW::step`]).
struct Updater<'a, B: AutodiffBackend> {
    opt: &'a mut AdamW<B>,
    /// Name and flat gradient by parameter.
    todo: HashMap<ParamId, (String, Tensor<B::InnerBackend, 1>)>,
    lr: f64,
}

impl<B: AutodiffBackend> FlatUpdate<B::InnerBackend> for Updater<'_, B> {
    fn wants(&self, id: &ParamId) -> bool {
        self.todo.contains_key(id)
    }

    fn update(&mut self, id: ParamId, p: Tensor<B::InnerBackend, 1>) -> Tensor<B::InnerBackend, 1> {
        let (name, g) = self.todo.remove(&id).expect("a wanted parameter");
        self.opt.update_one(&name, p, g, self.lr)
    }
}

/// Write new values (flat inner tensors, by `ParamId`) into `model`'s parameters.
pub fn write_params<B: AutodiffBackend>(
    model: LladaModel<B>,
    values: HashMap<ParamId, Tensor<B::InnerBackend, 1>>,
) -> LladaModel<B> {
    if values.is_empty() {
        return model;
    }
    model.map(&mut Replace(values))
}

/// AdamW state of one parameter (flat, burn layout).
#[derive(Clone)]
pub struct ParamState<B: Backend> {
    /// The parameter's own step count `t` (bias correction).
    pub time: usize,
    /// First moment `m` (`exp_avg`).
    pub exp_avg: Tensor<B, 1>,
    /// Second moment `v` (`exp_avg_sq`).
    pub exp_avg_sq: Tensor<B, 1>,
    /// f32 master copy ([`Precision::Master`] with non-f32 parameters).
    pub master: Option<Tensor<B, 1>>,
}

/// AdamW over the parameters of a [`LladaModel`], state keyed by Hugging Face name. `B` is
/// the autodiff backend; the state lives on its inner backend.
#[derive(Clone)]
pub struct AdamW<B: AutodiffBackend> {
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    precision: Precision,
    seed: u64,
    states: HashMap<String, ParamState<B::InnerBackend>>,
    owned: Option<HashSet<String>>,
}

/// The optimizer type used by the trainers.
pub type AdamWOptim<B> = AdamW<B>;

/// Build AdamW from the recipe (every hyper-parameter set explicitly; burn's defaults differ
/// from PyTorch's and are never used). `seed` seeds stochastic rounding.
pub fn adamw<B: AutodiffBackend>(s: &OptimizerSection) -> AdamWOptim<B> {
    AdamW::new(s, 0)
}

impl<B: AutodiffBackend> AdamW<B> {
    /// AdamW with the recipe's hyper-parameters and precision (`optimizer.master_weights`,
    /// `optimizer.bf16_rounding`); `seed` seeds stochastic rounding (the run seed).
    pub fn new(s: &OptimizerSection, seed: u64) -> Self {
        AdamW {
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            weight_decay: s.weight_decay,
            precision: s.precision(),
            seed,
            states: HashMap::new(),
            owned: None,
        }
    }

    /// The precision mode.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Restrict the optimizer to the parameters named in `owned` (ZeRO: this rank's shard),
    /// dropping the state of the others; `None`: every parameter.
    pub fn set_owned(&mut self, owned: Option<HashSet<String>>) {
        if let Some(o) = &owned {
            self.states.retain(|n, _| o.contains(n));
        }
        self.owned = owned;
    }

    /// Whether this optimizer updates parameter `name`.
    pub fn owns(&self, name: &str) -> bool {
        self.owned.as_ref().is_none_or(|o| o.contains(name))
    }

    /// The state of parameter `name`, if it has one.
    pub fn state(&self, name: &str) -> Option<&ParamState<B::InnerBackend>> {
        self.states.get(name)
    }

    /// Set (or with `None` remove) the state of parameter `name`.
    pub fn set_state(&mut self, name: &str, state: Option<ParamState<B::InnerBackend>>) {
        match state {
            Some(s) => {
                self.states.insert(name.to_string(), s);
            }
            None => {
                self.states.remove(name);
            }
        }
    }

    /// Bytes of optimizer state held (moments and master weights), for the memory report.
    pub fn state_bytes(&self) -> usize {
        let b = |t: &Tensor<B::InnerBackend, 1>| t.dims()[0] * t.dtype().size();
        self.states
            .values()
            .map(|s| b(&s.exp_avg) + b(&s.exp_avg_sq) + s.master.as_ref().map_or(0, b))
            .sum()
    }

    /// One AdamW update at learning rate `lr` of every owned parameter that has a gradient
    /// in `grads` (the gradients are consumed; parameters without one get no update and no
    /// state). Returns the model with the new values.
    pub fn step(
        &mut self,
        model: LladaModel<B>,
        mut grads: GradientsParams,
        lr: f64,
    ) -> LladaModel<B> {
        let mut todo = HashMap::new();
        for info in param_infos(&model) {
            if !self.owns(&info.name) {
                continue;
            }
            if let Some(g) = take_grad::<B>(&mut grads, &info) {
                todo.insert(info.id, (info.name, g));
            }
        }
        if todo.is_empty() {
            return model;
        }
        // inside the module map, each parameter's tensor is owned by the update (on the CPU
        // backend its buffer is updated in place rather than copied first)
        model.map(&mut Replace(Updater {
            opt: self,
            todo,
            lr,
        }))
    }

    /// Update one parameter (flat `p`, `g`); returns its new value in `p`'s dtype.
    fn update_one(
        &mut self,
        name: &str,
        p: Tensor<B::InnerBackend, 1>,
        g: Tensor<B::InnerBackend, 1>,
        lr: f64,
    ) -> Tensor<B::InnerBackend, 1> {
        let pdtype = p.dtype();
        let wide = pdtype != DType::F32 && self.precision != Precision::Plain;
        let state = self.states.remove(name);
        let (p32, g) = if wide {
            let master = match (
                self.precision,
                state.as_ref().and_then(|s| s.master.clone()),
            ) {
                (Precision::Master, Some(m)) => m,
                _ => p.clone().cast(DType::F32),
            };
            (master, g.cast(DType::F32))
        } else {
            (p.clone(), g)
        };
        if !wide && pdtype == DType::F32 && mmada_model::backend::is_host::<B::InnerBackend>() {
            let (new, state) = self.update_host_f32(p, g, state, lr);
            self.states.insert(name.to_string(), state);
            return new;
        }
        // burn-optim 0.21 `AdaptiveMomentumW::transform`, op for op (bit-identical f32)
        let factor_1 = 1.0 - self.beta1;
        let factor_2 = 1.0 - self.beta2;
        let (m, v, time) = match state {
            Some(s) => (
                s.exp_avg
                    .mul_scalar(self.beta1)
                    .add(g.clone().mul_scalar(factor_1)),
                s.exp_avg_sq
                    .mul_scalar(self.beta2)
                    .add(g.square().mul_scalar(factor_2)),
                s.time + 1,
            ),
            None => (
                g.clone().mul_scalar(factor_1),
                g.square().mul_scalar(factor_2),
                1,
            ),
        };
        let t = time as i32;
        let m_hat = m.clone().div_scalar(1f32 - self.beta1.powi(t));
        let v_hat = v.clone().div_scalar(1f32 - self.beta2.powi(t));
        let delta = m_hat.div(v_hat.sqrt().add_scalar(self.eps));
        // burn-optim 0.21 `AdamW::step`: decoupled decay, then the step
        let decay = lr * f64::from(self.weight_decay);
        let decayed = if decay == 0.0 {
            p32
        } else {
            p32.mul_scalar(1.0 - decay)
        };
        let new32 = decayed - delta.mul_scalar(lr);
        let (new, master) = if !wide {
            (new32, None)
        } else if self.precision == Precision::Master {
            (new32.clone().cast(pdtype), Some(new32))
        } else {
            let seed = rounding_seed(self.seed, name, time as u64);
            (stochastic_round(new32, pdtype, seed), None)
        };
        self.states.insert(
            name.to_string(),
            ParamState {
                time,
                exp_avg: m,
                exp_avg_sq: v,
                master,
            },
        );
        new
    }
}

impl<B: AutodiffBackend> AdamW<B> {
    /// The f32 update of [`AdamW::update_one`] on a host backend
    /// ([`mmada_model::backend::is_host`]) as one pass over the buffers
    /// ([`mmada_host::adamw::adamw_f32`]) instead of fifteen tensor ops: the moments are
    /// updated in place (their buffers move out of the tensors and back), the parameter is
    /// read once and the new value written once; bit-identical to the op sequence (checked
    /// by a test against burn's AdamW). Returns the new parameter and its state.
    fn update_host_f32(
        &self,
        p: Tensor<B::InnerBackend, 1>,
        g: Tensor<B::InnerBackend, 1>,
        state: Option<ParamState<B::InnerBackend>>,
        lr: f64,
    ) -> (Tensor<B::InnerBackend, 1>, ParamState<B::InnerBackend>) {
        let device = p.device();
        let n = p.dims()[0];
        let host = |t: Tensor<B::InnerBackend, 1>| t.into_data().convert::<f32>();
        let (mut p, g) = (host(p), host(g));
        let (mut m, mut v, time, fresh) = match state {
            Some(s) => (host(s.exp_avg), host(s.exp_avg_sq), s.time + 1, false),
            None => {
                let z = || TensorData::new(vec![0f32; n], [n]);
                (z(), z(), 1, true)
            }
        };
        fn slice(d: &mut TensorData) -> &mut [f32] {
            d.as_mut_slice::<f32>().expect("f32 data")
        }
        mmada_host::adamw::adamw_f32(
            slice(&mut p),
            g.as_slice::<f32>().expect("f32 data"),
            slice(&mut m),
            slice(&mut v),
            fresh,
            mmada_host::adamw::AdamWScalars {
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                time: time as i32,
                lr,
                weight_decay: f64::from(self.weight_decay),
            },
        );
        let back =
            |d: TensorData| Tensor::<B::InnerBackend, 1>::from_data(d, (&device, DType::F32));
        let state = ParamState {
            time,
            exp_avg: back(m),
            exp_avg_sq: back(v),
            master: None,
        };
        (back(p), state)
    }
}

/// SplitMix64 (Steele, Lea & Flood 2014): the stochastic-rounding stream.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of one parameter's rounding at one step: run seed, FNV-1a of the name, step.
fn rounding_seed(seed: u64, name: &str, time: u64) -> u64 {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut s = seed ^ h.rotate_left(17) ^ time.wrapping_mul(0xd6e8_feb8_6659_fd93);
    splitmix64(&mut s)
}

/// Round f32 values stochastically to bf16: add a uniform 16-bit integer to the f32 bit
/// pattern and truncate the low 16 bits (so a value rounds away from zero with probability
/// distance / ulp; unbiased in expectation). Non-finite values round to nearest. Other
/// target dtypes than bf16 round to nearest.
///
/// # Panics
/// Never for float tensors (the data conversion to f32 is infallible for them).
pub fn stochastic_round<B: Backend>(x: Tensor<B, 1>, dtype: DType, seed: u64) -> Tensor<B, 1> {
    if dtype != DType::BF16 {
        return x.cast(dtype);
    }
    let device = x.device();
    let n = x.dims()[0];
    let v: Vec<f32> = x.into_data().convert::<f32>().to_vec().expect("f32 data");
    let mut s = seed;
    let mut bytes = Vec::with_capacity(2 * n);
    let mut r = 0u64;
    for (i, f) in v.iter().enumerate() {
        let bits = if f.is_finite() {
            if i % 4 == 0 {
                r = splitmix64(&mut s);
            }
            let noise = ((r >> (16 * (i % 4))) & 0xffff) as u32;
            (f.to_bits().wrapping_add(noise) >> 16) as u16
        } else {
            half_bits(*f)
        };
        bytes.extend_from_slice(&bits.to_le_bytes());
    }
    // `(&device, dtype)`: `from_data` with a bare device would convert to the default f32
    Tensor::from_data(
        TensorData::from_bytes_vec(bytes, vec![n], DType::BF16),
        (&device, DType::BF16),
    )
}

/// bf16 bits of a non-finite f32 (keep the sign and exponent, force a NaN payload bit).
fn half_bits(f: f32) -> u16 {
    let b = f.to_bits();
    let hi = (b >> 16) as u16;
    if f.is_nan() { hi | 0x0040 } else { hi }
}

/// `a + b` per parameter (gradient accumulation). Parameters missing in one side are taken
/// from the other.
pub fn add_grads<B: AutodiffBackend>(
    model: &LladaModel<B>,
    a: GradientsParams,
    b: GradientsParams,
) -> GradientsParams {
    add_grads_of::<B>(&param_infos(model), a, b)
}

/// [`add_grads`] over the parameters `infos` only (from [`param_infos`], computed once by a
/// caller that adds many times); gradients of other parameters are dropped.
pub fn add_grads_of<B: AutodiffBackend>(
    infos: &[ParamInfo],
    mut a: GradientsParams,
    mut b: GradientsParams,
) -> GradientsParams {
    let mut out = GradientsParams::new();
    for info in infos {
        let x = take_grad::<B>(&mut a, info);
        let y = take_grad::<B>(&mut b, info);
        match (x, y) {
            (Some(x), Some(y)) => put_grad::<B>(&mut out, info, x + y),
            (Some(x), None) | (None, Some(x)) => put_grad::<B>(&mut out, info, x),
            (None, None) => {}
        }
    }
    out
}

/// Squared L2 norm (f32 sum of the f32-cast squares) of every parameter's gradient in
/// `params` order; `None` where a parameter has no gradient.
pub fn grad_sq_norms<B: AutodiffBackend>(
    model: &LladaModel<B>,
    grads: &GradientsParams,
) -> Vec<Option<f32>> {
    param_infos(model)
        .iter()
        .map(|info| {
            let s = if info.dims.len() == 2 {
                grads
                    .get::<B::InnerBackend, 2>(info.id)
                    .map(|g| g.cast(DType::F32).powi_scalar(2).sum().into_scalar())
            } else {
                grads
                    .get::<B::InnerBackend, 1>(info.id)
                    .map(|g| g.cast(DType::F32).powi_scalar(2).sum().into_scalar())
            };
            s.map(burn::tensor::ElementConversion::elem::<f32>)
        })
        .collect()
}

/// The global norm from per-parameter squared norms ([`grad_sq_norms`]), summed in f64 in
/// `params` order (the same number whatever the sharding).
pub fn global_norm(sq: &[Option<f32>]) -> f32 {
    sq.iter()
        .flatten()
        .fold(0f64, |a, s| a + f64::from(*s))
        .sqrt() as f32
}

/// Scale every gradient in `grads` by `min(1, max_norm / (norm + 1e-6))`
/// (`torch.nn.utils.clip_grad_norm_`); nothing when `max_norm ≤ 0`.
pub fn clip_to_norm<B: AutodiffBackend>(
    model: &LladaModel<B>,
    grads: &mut GradientsParams,
    norm: f32,
    max_norm: f32,
) {
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            scale_grads(model, grads, coef);
        }
    }
}

/// Global L2 norm of all gradients, and (when `max_norm > 0`) scale them by
/// `min(1, max_norm / (norm + 1e-6))` as `torch.nn.utils.clip_grad_norm_`. Returns the norm
/// before clipping.
pub fn clip_global_norm<B: AutodiffBackend>(
    model: &LladaModel<B>,
    grads: &mut GradientsParams,
    max_norm: f32,
) -> f32 {
    let norm = global_norm(&grad_sq_norms(model, grads));
    clip_to_norm(model, grads, norm, max_norm);
    norm
}

/// Multiply every gradient by `s` (loss scaling for accumulation done after the fact).
pub fn scale_grads<B: AutodiffBackend>(model: &LladaModel<B>, grads: &mut GradientsParams, s: f32) {
    for info in param_infos(model) {
        if let Some(g) = take_grad::<B>(grads, &info) {
            put_grad::<B>(grads, &info, g * s);
        }
    }
}

/// Error reading or writing optimizer state.
#[derive(Debug, thiserror::Error)]
pub enum OptimStateError {
    /// I/O or format error on the state file.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The file lacks a parameter's moments or has the wrong shape.
    #[error("{path}: optimizer state for `{name}`: {message}")]
    Param {
        /// The file.
        path: String,
        /// Parameter name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// The name of the master-weights file written next to `optimizer.safetensors`.
pub const MASTER_FILE: &str = "master_weights.safetensors";

/// Flat burn-layout data → torch-layout f32 bytes and shape.
fn torch_bytes<B: Backend>(t: &Tensor<B, 1>, info: &ParamInfo) -> (Vec<usize>, Vec<u8>) {
    let t = t.clone().cast(DType::F32);
    let d = if info.dims.len() == 2 {
        let m = t.reshape([info.dims[0], info.dims[1]]);
        if info.linear {
            m.transpose().into_data()
        } else {
            m.into_data()
        }
    } else {
        t.into_data()
    };
    (d.shape.to_vec(), d.as_bytes().to_vec())
}

fn write_safetensors(
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    meta: HashMap<String, String>,
    path: &Path,
) -> Result<(), OptimStateError> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("valid view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| OptimStateError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Save the AdamW moments as `<hf name>.exp_avg` / `.exp_avg_sq` (PyTorch's names, torch
/// layout, f32) plus `__metadata__.step` (the step count; a parameter whose count differs
/// gets `__metadata__["step.<name>"]`) in `path`; with master weights also
/// `master_weights.safetensors` (`<hf name>`, torch layout, f32) next to it. Parameters
/// without state (never had a gradient) are left out. `optim` must hold every parameter's
/// state (on several ranks: the consolidated copy, `crate::dist::gather_optimizer`).
///
/// # Errors
/// [`OptimStateError::File`].
pub fn save_state<B: AutodiffBackend>(
    optim: &AdamWOptim<B>,
    model: &LladaModel<B>,
    path: &Path,
) -> Result<(), OptimStateError> {
    let infos = param_infos(model);
    let with_state: Vec<(&ParamInfo, &ParamState<B::InnerBackend>)> = infos
        .iter()
        .filter_map(|i| optim.states.get(&i.name).map(|s| (i, s)))
        .collect();
    let time = with_state.iter().map(|(_, s)| s.time).max().unwrap_or(0);
    let mut meta: HashMap<String, String> = [
        ("step".to_string(), time.to_string()),
        ("optimizer".into(), "adamw".into()),
    ]
    .into();
    let mut tensors = vec![];
    let mut masters = vec![];
    for (info, s) in &with_state {
        if s.time != time {
            meta.insert(format!("step.{}", info.name), s.time.to_string());
        }
        for (suffix, t) in [("exp_avg", &s.exp_avg), ("exp_avg_sq", &s.exp_avg_sq)] {
            let (shape, bytes) = torch_bytes(t, info);
            tensors.push((format!("{}.{suffix}", info.name), shape, bytes));
        }
        if let Some(m) = &s.master {
            let (shape, bytes) = torch_bytes(m, info);
            masters.push((info.name.clone(), shape, bytes));
        }
    }
    write_safetensors(&tensors, meta, path)?;
    if !masters.is_empty() {
        let meta: HashMap<String, String> =
            [("format".to_string(), "f32 master weights".to_string())].into();
        write_safetensors(&masters, meta, &path.with_file_name(MASTER_FILE))?;
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<u8>, OptimStateError> {
    std::fs::read(path).map_err(|e| OptimStateError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Load state written by [`save_state`] (or by the burn-based optimizer before it, same
/// format) into `optim` for the parameters it owns, matched by parameter name (the model's
/// `ParamId`s may differ from the saving run's). A parameter with neither moment in the file
/// starts without state; with master weights (`Precision::Master`, non-f32 parameters) the
/// masters are read from `master_weights.safetensors` next to `path` when it exists (else
/// they start from the weights).
///
/// # Errors
/// [`OptimStateError`] naming the file and parameter (one moment missing, wrong shape).
pub fn load_state<B: AutodiffBackend>(
    mut optim: AdamWOptim<B>,
    model: &LladaModel<B>,
    path: &Path,
) -> Result<AdamWOptim<B>, OptimStateError> {
    let p = path.display().to_string();
    let bytes = read_file(path)?;
    let file_err = |e: safetensors::SafeTensorError| OptimStateError::File {
        path: p.clone(),
        message: e.to_string(),
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(file_err)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(file_err)?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let time: usize = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| OptimStateError::File {
            path: p.clone(),
            message: "missing __metadata__.step".into(),
        })?;
    let device = model.wte.weight.val().device();
    let pdtype = model.dtype();
    let wide = pdtype != DType::F32 && optim.precision != Precision::Plain;
    let master_path = path.with_file_name(MASTER_FILE);
    let master_bytes = if wide && optim.precision == Precision::Master && master_path.exists() {
        Some(read_file(&master_path)?)
    } else {
        None
    };
    let mp = master_path.display().to_string();
    let masters =
        match &master_bytes {
            Some(b) => Some(safetensors::SafeTensors::deserialize(b).map_err(|e| {
                OptimStateError::File {
                    path: mp.clone(),
                    message: e.to_string(),
                }
            })?),
            None => None,
        };
    let read = |st: &safetensors::SafeTensors<'_>,
                file: &str,
                name: &str,
                key: &str,
                info: &ParamInfo|
     -> Result<Option<Tensor<B::InnerBackend, 1>>, OptimStateError> {
        let Ok(t) = st.tensor(key) else {
            return Ok(None);
        };
        let torch: Vec<usize> = if info.linear {
            vec![info.dims[1], info.dims[0]]
        } else {
            info.dims.clone()
        };
        if t.shape() != torch.as_slice() || t.dtype() != safetensors::Dtype::F32 {
            return Err(OptimStateError::Param {
                path: file.to_string(),
                name: name.to_string(),
                message: format!(
                    "`{key}` is {:?} {:?}, the model needs F32 {torch:?}",
                    t.dtype(),
                    t.shape()
                ),
            });
        }
        let data = TensorData::from_bytes_vec(t.data().to_vec(), torch.clone(), DType::F32);
        let flat = if info.dims.len() == 2 {
            let m = Tensor::<B::InnerBackend, 2>::from_data(data, &device);
            let m = if info.linear { m.transpose() } else { m };
            m.reshape([info.numel()])
        } else {
            Tensor::<B::InnerBackend, 1>::from_data(data, &device)
        };
        Ok(Some(flat))
    };
    for info in param_infos(model) {
        if !optim.owns(&info.name) {
            continue;
        }
        let name = &info.name;
        let m = read(&st, &p, name, &format!("{name}.exp_avg"), &info)?;
        let v = read(&st, &p, name, &format!("{name}.exp_avg_sq"), &info)?;
        let (m, v) = match (m, v) {
            (Some(m), Some(v)) => (m, v),
            (None, None) => {
                optim.states.remove(name);
                continue;
            }
            (m, _) => {
                let missing = if m.is_none() { "exp_avg" } else { "exp_avg_sq" };
                return Err(OptimStateError::Param {
                    path: p.clone(),
                    name: name.clone(),
                    message: format!("missing `{name}.{missing}` (the other moment is there)"),
                });
            }
        };
        let master = match &masters {
            Some(ms) => read(ms, &mp, name, name, &info)?,
            None => None,
        };
        let t = meta
            .get(&format!("step.{name}"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(time);
        // each parameter's own dtype: LoRA adapters are f32 over a bf16 base
        let own = param_value(model, info.id).dtype();
        let state_dtype = if own != DType::F32 && optim.precision != Precision::Plain {
            DType::F32
        } else {
            own
        };
        optim.states.insert(
            name.clone(),
            ParamState {
                time: t,
                exp_avg: m.cast(state_dtype),
                exp_avg_sq: v.cast(state_dtype),
                master,
            },
        );
    }
    Ok(optim)
}

/// One optimizer update: `model ← AdamW(model, grads, lr)`.
pub fn step<B: AutodiffBackend>(
    optim: &mut AdamWOptim<B>,
    model: LladaModel<B>,
    grads: GradientsParams,
    lr: f64,
) -> LladaModel<B> {
    optim.step(model, grads, lr)
}
