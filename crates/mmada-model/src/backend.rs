//! Backend type aliases and device selection. Everything else in the workspace is generic
//! over `B: Backend`; this is the one place that names concrete backends.

use std::fmt;
use std::str::FromStr;

/// The CPU backend: burn's pure-Rust `Flex` (tests, CI, quickstart).
pub type Cpu = burn::backend::Flex;
/// `Cpu` with automatic differentiation (training on CPU).
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;

/// Whether `B` keeps its tensors in host memory as plain buffers (the CPU backend [`Cpu`],
/// with or without autodiff), so that a tensor's data can be read and written in place
/// without a device transfer (`Tensor::into_data` of a uniquely owned contiguous `Cpu` tensor
/// at offset 0 whose buffer has exactly its length moves the buffer out, otherwise copies;
/// `Tensor::from_data` moves it back in; under autodiff that holds for tensors off the graph). Code that is generic over the backend uses this to pick a fused
/// host loop over a sequence of tensor ops (the optimizer update, the LM head's
/// log-softmax and cross-entropy gradient).
pub fn is_host<B: burn::tensor::backend::Backend>() -> bool {
    let b = std::any::TypeId::of::<B>();
    b == std::any::TypeId::of::<Cpu>() || b == std::any::TypeId::of::<CpuAutodiff>()
}

/// Keeps freed heap memory in the process for reuse, so that the CPU backend's large tensor
/// buffers (a `[256, 58 560]` f32 head chunk is 60 MB) are not handed back to the kernel and
/// page-faulted in again at every step. Binaries and benches call this first in `main`, with
/// the [`mmada_host::alloc::BlockCache`] they install as global allocator (`large`): it holds
/// the blocks of 1 MiB and more, glibc's heap the rest.
///
/// glibc's `malloc` serves every allocation above its mmap threshold (at most 32 MB) with
/// `mmap` and returns it with `munmap` when freed; the next step's buffer of the same size
/// then faults in and zeroes every page again. On the training bench of issue 18 (d_model
/// 256, 4 blocks, vocab 58 560, batch 4 × 256) that was a quarter of the step: 4.0 s → 3.1 s
/// with this call, for a peak RSS of 899 MB instead of 750 MB.
///
/// Sets `M_MMAP_MAX = 0` (no mmap-served allocations) and `M_TRIM_THRESHOLD` to 2 GiB (the
/// heap top is not trimmed), like `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.
/// trim_threshold=2147483647` (a no-op on other C libraries: musl, macOS, Windows), and turns
/// `large`'s caching on. `MMADA_KEEP_FREED_MEMORY=0` leaves glibc's defaults and turns the
/// caching off (freed large blocks are unmapped at once). Returns whether glibc's settings
/// were applied.
pub fn keep_freed_memory(large: &mmada_host::alloc::BlockCache) -> bool {
    let keep = !std::env::var("MMADA_KEEP_FREED_MEMORY").is_ok_and(|v| v.trim() == "0");
    large.set_caching(keep);
    keep && glibc_keep_freed_memory()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn glibc_keep_freed_memory() -> bool {
    // SAFETY: mallopt only changes malloc's tuning parameters; it takes the arena locks
    // itself and is safe to call at any time, from any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn glibc_keep_freed_memory() -> bool {
    false
}

/// The CUDA backend (feature `cuda`; needs a GPU and the CUDA driver at run time only).
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;
/// `Cuda` with automatic differentiation.
#[cfg(feature = "cuda")]
pub type CudaAutodiff = burn::backend::Autodiff<Cuda>;

/// Where to run, as written in a recipe or on the command line: `cpu`, `cpu:N` (N worker
/// threads on the CPU backend: data parallelism for tests and small runs), `cuda` (= `cuda:0`),
/// `cuda:N`, `cuda:0,1,2,3` or `cuda:all` (several devices = data parallelism over them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (`Flex`) with this many data-parallel workers (1 for `cpu`).
    Cpu(usize),
    /// One or more CUDA devices by ordinal.
    Cuda(Vec<usize>),
    /// Every CUDA device of the machine (`cuda:all`); [`DeviceSpec::resolve`] turns it into
    /// [`DeviceSpec::Cuda`] with the ordinals the driver reports.
    CudaAll,
}

/// The most CPU workers `cpu:N` may ask for (each is a thread with a full model replica).
pub const MAX_CPU_WORKERS: usize = 256;

/// A device string that does not parse, or `cuda:all` on a machine without a usable CUDA
/// device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSpecError {
    /// Not a device string.
    #[error(
        "invalid device `{0}`: expected `cpu`, `cpu:N` (1 ≤ N ≤ 256), `cuda`, `cuda:N`, `cuda:N,M,…` or `cuda:all` (e.g. `cuda:0,1`)"
    )]
    Invalid(String),
    /// `cuda:all` found no device (no driver, or no device visible, e.g. an empty
    /// `CUDA_VISIBLE_DEVICES`).
    #[error("device `cuda:all`: {0}")]
    NoCudaDevice(String),
}

/// A decimal number without sign or spaces inside (`usize::from_str` accepts a leading `+`).
fn parse_index(s: &str) -> Option<usize> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl FromStr for DeviceSpec {
    type Err = DeviceSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DeviceSpecError::Invalid(s.to_string());
        let t = s.trim().to_ascii_lowercase();
        if t == "cpu" {
            return Ok(DeviceSpec::Cpu(1));
        }
        if let Some(n) = t.strip_prefix("cpu:") {
            return match parse_index(n) {
                Some(n) if (1..=MAX_CPU_WORKERS).contains(&n) => Ok(DeviceSpec::Cpu(n)),
                _ => Err(err()),
            };
        }
        if t == "cuda" || t == "gpu" {
            return Ok(DeviceSpec::Cuda(vec![0]));
        }
        let rest = t.strip_prefix("cuda:").ok_or_else(err)?;
        if rest.trim() == "all" {
            return Ok(DeviceSpec::CudaAll);
        }
        let ids: Vec<usize> = rest
            .split(',')
            .map(|x| parse_index(x).ok_or_else(err))
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
            DeviceSpec::Cpu(1) => write!(f, "cpu"),
            DeviceSpec::Cpu(n) => write!(f, "cpu:{n}"),
            DeviceSpec::Cuda(ids) => {
                let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                write!(f, "cuda:{}", ids.join(","))
            }
            DeviceSpec::CudaAll => write!(f, "cuda:all"),
        }
    }
}

impl DeviceSpec {
    /// Whether this build can run on the device (`cuda` needs the `cuda` feature).
    pub fn is_available_in_build(&self) -> bool {
        match self {
            DeviceSpec::Cpu(_) => true,
            DeviceSpec::Cuda(_) | DeviceSpec::CudaAll => cfg!(feature = "cuda"),
        }
    }

    /// `cuda:all` → `cuda:0,1,…,N-1` with the number of devices the CUDA driver reports
    /// (feature `cuda`); every other spec unchanged. Without the `cuda` feature `cuda:all`
    /// stays as it is (the binaries then refuse every CUDA spec).
    ///
    /// # Errors
    /// [`DeviceSpecError`] when the driver reports no device.
    pub fn resolve(self) -> Result<Self, DeviceSpecError> {
        match self {
            #[cfg(feature = "cuda")]
            DeviceSpec::CudaAll => {
                use burn::tensor::backend::Backend;
                // cubecl creates a client on device 0 to count, and its driver loader panics
                // when libcuda is missing or no device is visible: turn that into an error
                let n = std::panic::catch_unwind(|| <Cuda as Backend>::device_count(0))
                    .map_err(|_| {
                        DeviceSpecError::NoCudaDevice(
                            "the CUDA runtime could not start on device 0 (driver library missing, or no device visible: check nvidia-smi and CUDA_VISIBLE_DEVICES; the panic above has the cause)".into(),
                        )
                    })?;
                if n == 0 {
                    return Err(DeviceSpecError::NoCudaDevice(
                        "the CUDA driver reports no device".into(),
                    ));
                }
                Ok(DeviceSpec::Cuda((0..n).collect()))
            }
            other => Ok(other),
        }
    }

    /// Number of devices (data-parallel world size on this node); 0 for an unresolved
    /// `cuda:all` (call [`DeviceSpec::resolve`] first).
    pub fn world_size(&self) -> usize {
        match self {
            DeviceSpec::Cpu(n) => *n,
            DeviceSpec::Cuda(ids) => ids.len(),
            DeviceSpec::CudaAll => 0,
        }
    }

    /// The burn CUDA devices (empty for CPU specs and an unresolved `cuda:all`).
    #[cfg(feature = "cuda")]
    pub fn cuda_devices(&self) -> Vec<burn::backend::cuda::CudaDevice> {
        match self {
            DeviceSpec::Cpu(_) | DeviceSpec::CudaAll => Vec::new(),
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
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu(1));
        assert_eq!("cpu:2".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu(2));
        assert_eq!("cpu:2".parse::<DeviceSpec>().unwrap().to_string(), "cpu:2");
        assert_eq!("cpu:1".parse::<DeviceSpec>().unwrap().to_string(), "cpu");
        assert_eq!(
            "CUDA:all".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::CudaAll
        );
        assert_eq!(DeviceSpec::CudaAll.to_string(), "cuda:all");
        assert_eq!("cpu:3".parse::<DeviceSpec>().unwrap().world_size(), 3);
        assert_eq!(
            "cpu:256".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Cpu(MAX_CPU_WORKERS)
        );
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
        for bad in [
            "", "tpu", "cuda:", "cuda:x", "cuda:0,0", "cuda:-1", "cpu:0", "cpu:x", "cpu:",
            "cuda:al",
        ] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
    }
}
