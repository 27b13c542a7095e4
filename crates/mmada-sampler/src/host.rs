//! Host ⇄ device helpers. The samplers keep the small per-step state (the token canvas,
//! confidences of one block) on the host and only send the canvas to the device and read back
//! `[batch, window]` reductions of the logits.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::SamplerError;

/// Reads an int tensor as row-major `i64`.
pub(crate) fn ints<B: Backend, const D: usize>(
    t: Tensor<B, D, Int>,
) -> Result<Vec<i64>, SamplerError> {
    t.into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .map_err(|e| SamplerError::Data(format!("{e:?}")))
}

/// Reads a float tensor (any float dtype) as row-major `f64`.
pub(crate) fn floats<B: Backend, const D: usize>(
    t: Tensor<B, D>,
) -> Result<Vec<f64>, SamplerError> {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .map_err(|e| SamplerError::Data(format!("{e:?}")))
}

/// Reads a float tensor as row-major `f32` (exact for an f32 tensor).
pub(crate) fn floats_f32<B: Backend, const D: usize>(
    t: Tensor<B, D>,
) -> Result<Vec<f32>, SamplerError> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| SamplerError::Data(format!("{e:?}")))
}

/// Reads a bool tensor as row-major `bool`.
pub(crate) fn bools<B: Backend, const D: usize>(
    t: Tensor<B, D, Bool>,
) -> Result<Vec<bool>, SamplerError> {
    t.into_data()
        .convert::<bool>()
        .to_vec::<bool>()
        .map_err(|e| SamplerError::Data(format!("{e:?}")))
}

/// `[rows, cols]` int tensor from row-major `i64` ids (converted to the backend's int dtype).
pub(crate) fn int_tensor<B: Backend>(
    v: &[i64],
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [rows, cols]), device)
}

/// `[a, b, c]` bool tensor from row-major values.
pub(crate) fn bool_tensor3<B: Backend>(
    v: Vec<bool>,
    shape: [usize; 3],
    device: &B::Device,
) -> Tensor<B, 3, Bool> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// `[a, b]` bool tensor from row-major values.
pub(crate) fn bool_tensor2<B: Backend>(
    v: Vec<bool>,
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2, Bool> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Pairwise mask `m[:, :, None] & m[:, None, :]` (`[batch, seq]` → `[batch, seq, seq]`), as
/// upstream MMaDA builds its boolean `attention_bias`.
pub(crate) fn pairwise(mask: &[bool], batch: usize, seq: usize) -> Vec<bool> {
    let mut out = Vec::with_capacity(batch * seq * seq);
    for r in 0..batch {
        let row = &mask[r * seq..(r + 1) * seq];
        for &qi in row {
            for &kj in row {
                out.push(qi && kj);
            }
        }
    }
    out
}

/// Indices of the `k` largest values, largest first; ties keep the lower index first.
/// `NaN` ranks below everything. This is `torch.topk(conf, k).indices` up to tie order.
pub(crate) fn top_k(values: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| {
        let (x, y) = (values[a], values[b]);
        let key = |v: f64| if v.is_nan() { f64::NEG_INFINITY } else { v };
        key(y)
            .partial_cmp(&key(x))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        let v = [0.1, 0.9, 0.5, 0.9, f64::NEG_INFINITY, f64::NAN];
        assert_eq!(top_k(&v, 3), vec![1, 3, 2]);
        assert_eq!(top_k(&v, 0), Vec::<usize>::new());
        assert_eq!(top_k(&v, 4), vec![1, 3, 2, 0]);
    }

    #[test]
    fn pairwise_is_outer_and() {
        let m = [true, false, true, true, true, false];
        let p = pairwise(&m, 2, 3);
        assert_eq!(
            p,
            vec![
                true, false, true, false, false, false, true, false, true, // row 0
                true, true, false, true, true, false, false, false, false, // row 1
            ]
        );
    }
}
