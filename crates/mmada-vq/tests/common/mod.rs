//! Helpers shared by the mmada-vq integration tests: fixture location, fixture tensor
//! reading, ordered JSON maps, diffs.
#![allow(dead_code)]

use std::fmt;
use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use serde::de::{Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

/// The CPU backend used by the tests.
pub type Cpu = burn::backend::Flex;

/// The fixture root: `$MMADA_FIXTURES` when set, else the workspace's `tests/fixtures/`.
pub fn fixture_root() -> PathBuf {
    match std::env::var_os("MMADA_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

/// `<root>/magvitv2`.
pub fn magvit_root() -> PathBuf {
    fixture_root().join("magvitv2")
}

/// A case's `meta.json`.
pub fn meta(case_dir: &Path) -> Value {
    let p = case_dir.join("meta.json");
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
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

    pub fn shape4(&self, name: &str) -> [usize; 4] {
        self.shape(name).try_into().expect("rank 4")
    }

    /// Integer tensor (int64 or uint8) as i64.
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

    /// uint8 tensor.
    pub fn bytes(&self, name: &str) -> Vec<u8> {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::U8, "`{name}` must be uint8");
        t.data().to_vec()
    }

    /// Float tensor (f32 as f32; f64 kept as f64).
    pub fn f64s(&self, name: &str) -> Vec<f64> {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("{}: no `{name}`", self.path.display()));
        match t.dtype() {
            safetensors::Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            safetensors::Dtype::F64 => t
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            d => panic!("`{name}`: unexpected dtype {d:?}"),
        }
    }

    /// f32 tensor.
    pub fn floats(&self, name: &str) -> Vec<f32> {
        self.f64s(name).into_iter().map(|x| x as f32).collect()
    }

    pub fn tensor4(&self, name: &str) -> Tensor<Cpu, 4> {
        Tensor::from_data(
            TensorData::new(self.floats(name), self.shape4(name)),
            &Default::default(),
        )
    }

    pub fn int_tensor2(&self, name: &str) -> Tensor<Cpu, 2, Int> {
        let s = self.shape(name);
        Tensor::from_data(
            TensorData::new(self.ints(name), [s[0], s[1]]),
            &Default::default(),
        )
    }
}

/// Host copy of a float tensor.
pub fn host<const D: usize>(t: &Tensor<Cpu, D>) -> Vec<f32> {
    t.to_data().iter::<f32>().collect()
}

/// Host copy of an int tensor.
pub fn host_int<const D: usize>(t: &Tensor<Cpu, D, Int>) -> Vec<i64> {
    t.to_data().iter::<i64>().collect()
}

/// Max |a − b| and whether every element satisfies |a − b| ≤ atol + rtol·|b|.
pub fn close(a: &[f32], b: &[f32], atol: f64, rtol: f64) -> (f64, bool) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut max = 0f64;
    let mut ok = true;
    for (&x, &y) in a.iter().zip(b) {
        let d = (x as f64 - y as f64).abs();
        if d.is_nan() || d > atol + rtol * (y as f64).abs() {
            ok = false;
        }
        if d > max || d.is_nan() {
            max = d;
        }
    }
    (max, ok)
}

/// A JSON object's entries in file order (serde_json's `Map` sorts keys).
pub struct OrderedMap(pub Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<OrderedMap, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The `key` object of a top-level JSON object in `path`, entries in file order.
pub fn ordered_entries(path: &Path, key: &str) -> Vec<(String, Value)> {
    struct Pick<'a>(&'a str);
    impl<'de> DeserializeSeed<'de> for Pick<'_> {
        type Value = Option<OrderedMap>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Pick<'_> {
        type Value = Option<OrderedMap>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(k) = m.next_key::<String>()? {
                if k == self.0 {
                    found = Some(m.next_value::<OrderedMap>()?);
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut de = serde_json::Deserializer::from_str(&text);
    Pick(key)
        .deserialize(&mut de)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .unwrap_or_else(|| panic!("{}: no `{key}`", path.display()))
        .0
}
