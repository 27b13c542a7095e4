//! Backend type aliases and device selection. Everything else in the workspace is generic
//! over `B: Backend`; this is the one place that names concrete backends.

use std::fmt;
use std::str::FromStr;

/// The CPU backend: burn's pure-Rust `Flex` (tests, CI, quickstart).
pub type Cpu = burn::backend::Flex;
/// `Cpu` with automatic differentiation (training on CPU).
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;

/// The CUDA backend (feature `cuda`; needs a GPU and the CUDA driver at run time only).
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;
/// `Cuda` with automatic differentiation.
#[cfg(feature = "cuda")]
pub type CudaAutodiff = burn::backend::Autodiff<Cuda>;

/// Where to run, as written in a recipe or on the command line: `cpu`, `cuda`, `cuda:0`,
/// `cuda:0,1,2,3` (several devices = data parallelism over them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (`Flex`).
    Cpu,
    /// One or more CUDA devices by ordinal.
    Cuda(Vec<usize>),
}

/// A device string that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid device `{0}`: expected `cpu`, `cuda`, `cuda:N` or `cuda:N,M,…` (e.g. `cuda:0,1`)")]
pub struct DeviceSpecError(pub String);

impl FromStr for DeviceSpec {
    type Err = DeviceSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DeviceSpecError(s.to_string());
        let t = s.trim().to_ascii_lowercase();
        if t == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        if t == "cuda" || t == "gpu" {
            return Ok(DeviceSpec::Cuda(vec![0]));
        }
        let rest = t.strip_prefix("cuda:").ok_or_else(err)?;
        let ids: Vec<usize> = rest
            .split(',')
            .map(|x| x.trim().parse::<usize>().map_err(|_| err()))
            .collect::<Result<_, _>>()?;
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if ids.is_empty() || sorted.len() != ids.len() {
            return Err(err());
        }
        Ok(DeviceSpec::Cuda(ids))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(ids) => {
                let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                write!(f, "cuda:{}", ids.join(","))
            }
        }
    }
}

impl DeviceSpec {
    /// Whether this build can run on the device (`cuda` needs the `cuda` feature).
    pub fn is_available_in_build(&self) -> bool {
        match self {
            DeviceSpec::Cpu => true,
            DeviceSpec::Cuda(_) => cfg!(feature = "cuda"),
        }
    }

    /// Number of devices (data-parallel world size on this node).
    pub fn world_size(&self) -> usize {
        match self {
            DeviceSpec::Cpu => 1,
            DeviceSpec::Cuda(ids) => ids.len(),
        }
    }

    /// The burn CUDA devices.
    #[cfg(feature = "cuda")]
    pub fn cuda_devices(&self) -> Vec<burn::backend::cuda::CudaDevice> {
        match self {
            DeviceSpec::Cpu => Vec::new(),
            DeviceSpec::Cuda(ids) => ids
                .iter()
                .map(|&i| burn::backend::cuda::CudaDevice::new(i))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_strings() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Cuda(vec![0])
        );
        assert_eq!(
            "cuda:3".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Cuda(vec![3])
        );
        assert_eq!(
            "cuda:0,1, 2".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Cuda(vec![0, 1, 2])
        );
        assert_eq!(
            "cuda:0,1".parse::<DeviceSpec>().unwrap().to_string(),
            "cuda:0,1"
        );
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:0,0", "cuda:-1"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
    }
}
