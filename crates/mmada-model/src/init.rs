//! Random initialisation for training from scratch and for generated test checkpoints.
//!
//! Upstream `init_fn = "mitchell"` (spec §1.4, `modeling_llada.py::init_weights`): every
//! Linear / Embedding weight is drawn from a normal truncated at ±3σ with `σ = 1/√d_in`;
//! the per-block output projections (`attn_out`, block `ff_out`) are further divided by
//! `√(2·(layer+1))`; norm weights are 1.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::config::ModelConfig;
use crate::model::{LladaModel, ParamSource};

/// A [`ParamSource`] drawing mitchell-initialised weights from a seeded RNG.
#[derive(Debug)]
pub struct MitchellInit<B: Backend> {
    rng: StdRng,
    device: B::Device,
    dtype: FloatDType,
}

impl<B: Backend> MitchellInit<B> {
    /// A source seeded with `seed`; parameters are created with `dtype` on `device`.
    pub fn new(seed: u64, device: &B::Device, dtype: FloatDType) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            device: device.clone(),
            dtype,
        }
    }

    /// One standard normal draw truncated to ±3 (Box–Muller, rejection).
    fn truncated_normal(&mut self) -> f32 {
        loop {
            let u1: f64 = self.rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = self.rng.random::<f64>();
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            if z.abs() <= 3.0 {
                return z as f32;
            }
        }
    }
}

/// The layer divisor for per-block output projections, `None` for other tensors.
fn layer_of_output_proj(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("blocks.")?;
    let (layer, param) = rest.split_once('.')?;
    matches!(param, "attn_out.weight" | "ff_out.weight")
        .then(|| layer.parse().ok())
        .flatten()
}

impl<B: Backend> ParamSource<B> for MitchellInit<B> {
    type Error = std::convert::Infallible;
    fn matrix(&mut self, name: &str, shape: [usize; 2]) -> Result<Tensor<B, 2>, Self::Error> {
        let mut std = 1.0 / (shape[1] as f64).sqrt();
        if let Some(layer) = layer_of_output_proj(name) {
            std /= (2.0 * (layer as f64 + 1.0)).sqrt();
        }
        let n = shape[0] * shape[1];
        let values: Vec<f32> = (0..n)
            .map(|_| self.truncated_normal() * std as f32)
            .collect();
        Ok(Tensor::from_data(
            TensorData::new(values, shape),
            (&self.device, DType::from(self.dtype)),
        ))
    }
    fn vector(&mut self, _name: &str, len: usize) -> Result<Tensor<B, 1>, Self::Error> {
        Ok(Tensor::ones([len], (&self.device, DType::from(self.dtype))))
    }
}

/// A freshly initialised model (mitchell init, seeded).
pub fn init_model<B: Backend>(
    cfg: &ModelConfig,
    seed: u64,
    device: &B::Device,
    dtype: FloatDType,
) -> LladaModel<B> {
    let mut src = MitchellInit::<B>::new(seed, device, dtype);
    match LladaModel::from_source(cfg, &mut src) {
        Ok(m) => m,
        Err(never) => match never {},
    }
}
