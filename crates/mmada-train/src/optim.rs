//! AdamW with PyTorch semantics, global-norm clipping, gradient accumulation, and optimizer
//! state saved by parameter name.
//!
//! burn's `AdamW` update is PyTorch's (decoupled decay `p ← p(1 − lr·wd)`, bias-corrected
//! moments, `ε` outside the square root) but its *defaults* differ (ε 1e-5, wd 1e-4): they are
//! always set from the recipe here. burn's `GradientClipping::Norm` clips per tensor, so the
//! global norm (`torch.nn.utils.clip_grad_norm_`) is implemented in [`clip_global_norm`].

use std::collections::HashMap;
use std::path::Path;

use burn::module::ParamId;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::AdaptorRecord;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};
use mmada_model::LladaModel;
use mmada_model::model::ParamRef;

use crate::recipe::OptimizerSection;

/// The optimizer type used by the trainers.
pub type AdamWOptim<B> = OptimizerAdaptor<AdamW, LladaModel<B>, B>;

/// Build AdamW from the recipe (every hyper-parameter set explicitly).
pub fn adamw<B: AutodiffBackend>(s: &OptimizerSection) -> AdamWOptim<B> {
    AdamWConfig::new()
        .with_beta_1(s.beta1)
        .with_beta_2(s.beta2)
        .with_epsilon(s.eps)
        .with_weight_decay(s.weight_decay)
        .init::<B, LladaModel<B>>()
}

fn ids<B: Backend>(model: &LladaModel<B>) -> Vec<(String, ParamId, usize)> {
    model
        .params()
        .into_iter()
        .map(|(n, p)| match p {
            ParamRef::Linear(w) | ParamRef::Matrix(w) => (n, w.id, 2),
            ParamRef::Vector(w) => (n, w.id, 1),
        })
        .collect()
}

/// `a + b` per parameter (gradient accumulation). Parameters missing in one side are taken
/// from the other.
pub fn add_grads<B: AutodiffBackend>(
    model: &LladaModel<B>,
    mut a: GradientsParams,
    mut b: GradientsParams,
) -> GradientsParams {
    let mut out = GradientsParams::new();
    for (_, id, rank) in ids(model) {
        macro_rules! acc {
            ($d:literal) => {{
                let x = a.remove::<B::InnerBackend, $d>(id);
                let y = b.remove::<B::InnerBackend, $d>(id);
                match (x, y) {
                    (Some(x), Some(y)) => out.register(id, x + y),
                    (Some(x), None) | (None, Some(x)) => out.register(id, x),
                    (None, None) => {}
                }
            }};
        }
        if rank == 2 { acc!(2) } else { acc!(1) }
    }
    out
}

/// Global L2 norm of all gradients, and (when `max_norm > 0`) scale them by
/// `min(1, max_norm / (norm + 1e-6))` as `torch.nn.utils.clip_grad_norm_`. Returns the norm
/// before clipping.
pub fn clip_global_norm<B: AutodiffBackend>(
    model: &LladaModel<B>,
    grads: &mut GradientsParams,
    max_norm: f32,
) -> f32 {
    let mut sq = 0f64;
    let entries = ids(model);
    for (_, id, rank) in &entries {
        let s = if *rank == 2 {
            grads
                .get::<B::InnerBackend, 2>(*id)
                .map(|g| g.cast(DType::F32).powi_scalar(2).sum().into_scalar())
        } else {
            grads
                .get::<B::InnerBackend, 1>(*id)
                .map(|g| g.cast(DType::F32).powi_scalar(2).sum().into_scalar())
        };
        if let Some(s) = s {
            sq += burn::tensor::ElementConversion::elem::<f64>(s);
        }
    }
    let norm = sq.sqrt() as f32;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for (_, id, rank) in &entries {
                if *rank == 2 {
                    if let Some(g) = grads.remove::<B::InnerBackend, 2>(*id) {
                        grads.register(*id, g * coef);
                    }
                } else if let Some(g) = grads.remove::<B::InnerBackend, 1>(*id) {
                    grads.register(*id, g * coef);
                }
            }
        }
    }
    norm
}

/// Multiply every gradient by `s` (loss scaling for accumulation done after the fact).
pub fn scale_grads<B: AutodiffBackend>(model: &LladaModel<B>, grads: &mut GradientsParams, s: f32) {
    for (_, id, rank) in ids(model) {
        if rank == 2 {
            if let Some(g) = grads.remove::<B::InnerBackend, 2>(id) {
                grads.register(id, g * s);
            }
        } else if let Some(g) = grads.remove::<B::InnerBackend, 1>(id) {
            grads.register(id, g * s);
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

/// Save AdamW moments as `<hf name>.exp_avg` / `.exp_avg_sq` (PyTorch's names, torch layout,
/// f32) plus `__metadata__.step` (the shared AdamW time step).
///
/// # Errors
/// [`OptimStateError::File`].
pub fn save_state<B: AutodiffBackend>(
    optim: &AdamWOptim<B>,
    model: &LladaModel<B>,
    path: &Path,
) -> Result<(), OptimStateError> {
    let mut record = optim.to_record();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = vec![];
    let mut time = 0usize;
    for (name, p) in model.params() {
        let (id, linear) = match p {
            ParamRef::Linear(w) => (w.id, true),
            ParamRef::Matrix(w) => (w.id, false),
            ParamRef::Vector(w) => (w.id, false),
        };
        let Some(rec) = record.remove(&id) else {
            continue;
        };
        let (m1, m2, t) = match p {
            ParamRef::Vector(_) => {
                let s = rec.into_state::<1>();
                (
                    s.momentum.moment_1.into_data(),
                    s.momentum.moment_2.into_data(),
                    s.momentum.time,
                )
            }
            _ => {
                let s = rec.into_state::<2>();
                let (a, b) = (s.momentum.moment_1, s.momentum.moment_2);
                let (a, b) = if linear {
                    (a.transpose(), b.transpose())
                } else {
                    (a, b)
                };
                (a.into_data(), b.into_data(), s.momentum.time)
            }
        };
        time = t;
        for (suffix, d) in [("exp_avg", m1), ("exp_avg_sq", m2)] {
            let d = d.convert_dtype(DType::F32);
            tensors.push((
                format!("{name}.{suffix}"),
                d.shape.to_vec(),
                d.as_bytes().to_vec(),
            ));
        }
    }
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
    let meta: HashMap<String, String> = [
        ("step".to_string(), time.to_string()),
        ("optimizer".into(), "adamw".into()),
    ]
    .into();
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| OptimStateError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Load moments written by [`save_state`] into a fresh optimizer for `model` (matched by
/// parameter name, so the model's `ParamId`s may differ from the saving run's).
///
/// # Errors
/// [`OptimStateError`] naming the parameter.
pub fn load_state<B: AutodiffBackend>(
    optim: AdamWOptim<B>,
    model: &LladaModel<B>,
    path: &Path,
) -> Result<AdamWOptim<B>, OptimStateError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| OptimStateError::File {
        path: p.clone(),
        message: e.to_string(),
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| OptimStateError::File {
        path: p.clone(),
        message: e.to_string(),
    })?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| OptimStateError::File {
            path: p.clone(),
            message: e.to_string(),
        })?;
    let time: usize = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| OptimStateError::File {
            path: p.clone(),
            message: "missing __metadata__.step".into(),
        })?;
    let device = model.wte.weight.val().device();
    let dtype = model.dtype();
    // burn's record map type (a no_std HashMap): start from the fresh optimizer's, emptied.
    let mut record = optim.to_record();
    record.clear();
    for (name, pr) in model.params() {
        let get = |suffix: &str, shape: &[usize]| -> Result<TensorData, OptimStateError> {
            let key = format!("{name}.{suffix}");
            let t = st.tensor(&key).map_err(|_| OptimStateError::Param {
                path: p.clone(),
                name: name.clone(),
                message: format!("missing `{key}`"),
            })?;
            if t.shape() != shape {
                return Err(OptimStateError::Param {
                    path: p.clone(),
                    name: name.clone(),
                    message: format!(
                        "`{key}` has shape {:?}, the model needs {shape:?}",
                        t.shape()
                    ),
                });
            }
            Ok(TensorData::from_bytes_vec(
                t.data().to_vec(),
                shape.to_vec(),
                DType::F32,
            ))
        };
        match pr {
            ParamRef::Vector(w) => {
                let shape = w.val().dims().to_vec();
                let m1 = Tensor::<B::InnerBackend, 1>::from_data(
                    get("exp_avg", &shape)?,
                    (&device, dtype),
                );
                let m2 = Tensor::<B::InnerBackend, 1>::from_data(
                    get("exp_avg_sq", &shape)?,
                    (&device, dtype),
                );
                let state = burn::optim::AdamWState::new(burn::optim::AdaptiveMomentumState {
                    time,
                    moment_1: m1,
                    moment_2: m2,
                    max_moment_2: None,
                });
                record.insert(w.id, AdaptorRecord::from_state(state));
            }
            ParamRef::Linear(w) | ParamRef::Matrix(w) => {
                let linear = matches!(pr, ParamRef::Linear(_));
                let dims = w.val().dims();
                let torch = if linear { [dims[1], dims[0]] } else { dims };
                let load = |suffix: &str| -> Result<Tensor<B::InnerBackend, 2>, OptimStateError> {
                    let t = Tensor::<B::InnerBackend, 2>::from_data(
                        get(suffix, &torch)?,
                        (&device, dtype),
                    );
                    Ok(if linear {
                        mmada_model::model::row_major(t.transpose())
                    } else {
                        t
                    })
                };
                let state = burn::optim::AdamWState::new(burn::optim::AdaptiveMomentumState {
                    time,
                    moment_1: load("exp_avg")?,
                    moment_2: load("exp_avg_sq")?,
                    max_moment_2: None,
                });
                record.insert(w.id, AdaptorRecord::from_state(state));
            }
        }
    }
    Ok(optim.load_record(record))
}

/// One optimizer update: `model ← AdamW(model, grads, lr)`.
pub fn step<B: AutodiffBackend>(
    optim: &mut AdamWOptim<B>,
    model: LladaModel<B>,
    grads: GradientsParams,
    lr: f64,
) -> LladaModel<B> {
    optim.step(lr, model, grads)
}
