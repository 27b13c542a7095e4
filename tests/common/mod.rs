//! Helpers shared by the integration tests: fixture location and fixture tensor reading.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use mmada_model::backend::Cpu;

/// The fixture root: `$MMADA_FIXTURES` when set, else the copy under `tests/fixtures/`.
pub fn fixture_root() -> PathBuf {
    match std::env::var_os("MMADA_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

/// The tensors of a fixture file, by name.
pub struct Fixture {
    bytes: Vec<u8>,
    pub path: PathBuf,
}

impl Fixture {
    pub fn open(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Fixture {
            bytes,
            path: path.to_path_buf(),
        }
    }

    fn st(&self) -> safetensors::SafeTensors<'_> {
        safetensors::SafeTensors::deserialize(&self.bytes).expect("valid fixture")
    }

    pub fn names(&self) -> Vec<String> {
        self.st().names().into_iter().map(str::to_string).collect()
    }

    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.st()
            .tensor(name)
            .unwrap_or_else(|_| panic!("{}: no `{name}`", self.path.display()))
            .shape()
            .to_vec()
    }

    /// Integer tensor (int64 or uint8-bool) as i64.
    pub fn ints(&self, name: &str) -> Vec<i64> {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("{}: no `{name}`", self.path.display()));
        match t.dtype() {
            safetensors::Dtype::I64 => t
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::U8 => t.data().iter().map(|&b| b as i64).collect(),
            d => panic!("`{name}`: unexpected dtype {d:?}"),
        }
    }

    /// Float tensor (f32 or f64) as f32.
    pub fn floats(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("{}: no `{name}`", self.path.display()));
        match t.dtype() {
            safetensors::Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::F64 => t
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            d => panic!("`{name}`: unexpected dtype {d:?}"),
        }
    }

    /// A 2-D int tensor on the CPU backend.
    pub fn int_tensor2(&self, name: &str) -> Tensor<Cpu, 2, Int> {
        let shape = self.shape(name);
        let v: Vec<i32> = self.ints(name).into_iter().map(|x| x as i32).collect();
        Tensor::from_data(
            TensorData::new(v, [shape[0], shape[1]]),
            &Default::default(),
        )
    }
}

/// Max |a − b| and the index where it occurs.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .enumerate()
        .fold((0.0f32, 0), |(m, mi), (i, (x, y))| {
            let d = (x - y).abs();
            if d > m || d.is_nan() { (d, i) } else { (m, mi) }
        })
}

/// Deterministic values in [-1, 1) (xorshift64 from `salt`).
pub fn values(n: usize, salt: u64) -> Vec<f32> {
    let mut s = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A float tensor's values as f32 on the host.
pub fn host<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}
