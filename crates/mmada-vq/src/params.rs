//! Where a module's tensors come from while it is built: a checkpoint
//! ([`crate::checkpoint::FileSource`]), a seeded random initialisation ([`RandomInit`]), or
//! zeros ([`ZeroInit`], for shape checks).

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::error::VqError;

/// How a parameter is initialised when it is not read from a file (torch defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// `nn.Conv2d` weight: kaiming-uniform with `a = √5`, i.e. `U(±1/√fan_in)`.
    ConvWeight {
        /// `in_channels · kh · kw`.
        fan_in: usize,
    },
    /// `nn.Conv2d` bias: `U(±1/√fan_in)`.
    ConvBias {
        /// `in_channels · kh · kw`.
        fan_in: usize,
    },
    /// `nn.GroupNorm` weight: ones.
    Ones,
    /// `nn.GroupNorm` bias: zeros.
    Zeros,
}

/// A provider of named tensors, called once per parameter (upstream `state_dict` name and
/// torch shape) while a module is built.
pub trait ParamSource<B: Backend> {
    /// The tensor `name` of shape `shape`; `init` says how a fresh one is initialised.
    ///
    /// # Errors
    /// Implementation specific ([`VqError::MissingTensor`], [`VqError::ShapeMismatch`], …).
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Tensor<B, D>, VqError>;
}

/// Torch-default initialisation from a seeded RNG (benchmarks, tests; not upstream's random
/// stream).
#[derive(Debug)]
pub struct RandomInit<B: Backend> {
    rng: StdRng,
    device: B::Device,
}

impl<B: Backend> RandomInit<B> {
    /// A source seeded with `seed`, creating tensors on `device`.
    pub fn new(seed: u64, device: &B::Device) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            device: device.clone(),
        }
    }
}

impl<B: Backend> ParamSource<B> for RandomInit<B> {
    fn tensor<const D: usize>(
        &mut self,
        _name: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Tensor<B, D>, VqError> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match init {
            Init::ConvWeight { fan_in } | Init::ConvBias { fan_in } => {
                let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                (0..n)
                    .map(|_| self.rng.random_range(-bound..bound))
                    .collect()
            }
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
        };
        Ok(Tensor::from_data(
            TensorData::new(values, shape),
            &self.device,
        ))
    }
}

/// Every tensor zero (structure and shape checks without the cost of random numbers).
#[derive(Debug)]
pub struct ZeroInit<B: Backend> {
    device: B::Device,
}

impl<B: Backend> ZeroInit<B> {
    /// Zeros on `device`.
    pub fn new(device: &B::Device) -> Self {
        Self {
            device: device.clone(),
        }
    }
}

impl<B: Backend> ParamSource<B> for ZeroInit<B> {
    fn tensor<const D: usize>(
        &mut self,
        _name: &str,
        shape: [usize; D],
        _init: Init,
    ) -> Result<Tensor<B, D>, VqError> {
        Ok(Tensor::zeros(shape, &self.device))
    }
}
