//! The vendored burn-flex (vendor/PATCHED.md, item 5: a row-wise `StridedIter`; item 12: the
//! shared-block broadcast of binary ops) on the layouts the model makes: permuted, flipped and
//! narrowed 4-D tensors read back, added and reduced, and broadcast against, give the values of
//! plain index arithmetic.

use burn::tensor::{Tensor, TensorData};
use mmada_model::backend::Cpu;

const SHAPE: [usize; 4] = [2, 3, 4, 5];

fn arange() -> Tensor<Cpu, 4> {
    let n: usize = SHAPE.iter().product();
    let v: Vec<f32> = (0..n).map(|i| i as f32).collect();
    Tensor::from_data(TensorData::new(v, SHAPE), &Default::default())
}

/// The value at logical index `i` of the contiguous arange: its linear index.
fn at(i: [usize; 4]) -> f32 {
    (((i[0] * SHAPE[1] + i[1]) * SHAPE[2] + i[2]) * SHAPE[3] + i[3]) as f32
}

/// Row-major logical indices of `shape`.
fn indices(shape: [usize; 4]) -> impl Iterator<Item = [usize; 4]> {
    let n: usize = shape.iter().product();
    (0..n).map(move |mut k| {
        let mut i = [0; 4];
        for d in (0..4).rev() {
            i[d] = k % shape[d];
            k /= shape[d];
        }
        i
    })
}

fn values<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn permuted_and_flipped_tensors_read_back_in_logical_order() {
    // permute [0, 2, 1, 3] (the attention heads' layout change): out[a, c, b, d] = x[a, b, c, d]
    let p = arange().permute([0, 2, 1, 3]);
    let want: Vec<f32> = indices([2, 4, 3, 5])
        .map(|[a, c, b, d]| at([a, b, c, d]))
        .collect();
    assert_eq!(values(p.clone()), want);
    // a binary op on two strided operands, and on a strided and a contiguous one
    let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
    assert_eq!(values(p.clone() + p.clone()), twice);
    let c = Tensor::<Cpu, 4>::from_data(
        TensorData::new(want.clone(), [2, 4, 3, 5]),
        &Default::default(),
    );
    assert_eq!(values(p.clone() - c), vec![0.0; want.len()]);
    // a reduction over a strided operand: sum over the last axis
    let sums: Vec<f32> = want.chunks(5).map(|r| r.iter().sum()).collect();
    assert_eq!(values(p.sum_dim(3)), sums);

    // flip dims 1 and 3, then a narrow of dim 2 and the permutation [3, 1, 0, 2]
    let f = arange().flip([1, 3]).narrow(2, 1, 2).permute([3, 1, 0, 2]);
    let want: Vec<f32> = indices([5, 3, 2, 2])
        .map(|[d, b, a, c]| at([a, 2 - b, c + 1, 4 - d]))
        .collect();
    assert_eq!(values(f.clone()), want);
}

/// Binary ops against a right-hand side broadcast over the outer dims — RoPE's
/// `[batch, heads, seq, hd] · cos[1, 1, seq, hd]` (item 12's shared block of several inner
/// dims), the shared last row of RMSNorm's weight, a size-1 dim inside the block, and a
/// permuted left-hand side — give the element-by-element values, bit for bit.
#[test]
fn broadcast_binary_ops_over_a_shared_inner_block() {
    let dev = Default::default();
    let x = arange() * 0.37 - 11.0;
    let xv = values(x.clone());
    let table = |shape: [usize; 4]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| 1.0 + (i as f32 * 0.71).sin()).collect();
        Tensor::<Cpu, 4>::from_data(TensorData::new(v, shape), &dev)
    };
    // (rhs shape, the rhs index of a logical index)
    type Index = fn([usize; 4]) -> [usize; 4];
    let cases: [([usize; 4], Index); 4] = [
        ([1, 1, 4, 5], |[_, _, c, d]| [0, 0, c, d]),
        ([1, 3, 4, 5], |[_, b, c, d]| [0, b, c, d]),
        ([1, 1, 1, 5], |[_, _, _, d]| [0, 0, 0, d]),
        ([2, 1, 4, 5], |[a, _, c, d]| [a, 0, c, d]),
    ];
    for (shape, idx) in cases {
        let r = table(shape);
        let rv = values(r.clone());
        let lin = |i: [usize; 4]| ((i[0] * shape[1] + i[1]) * shape[2] + i[2]) * shape[3] + i[3];
        let want = |op: fn(f32, f32) -> f32| -> Vec<f32> {
            indices(SHAPE)
                .enumerate()
                .map(|(k, i)| op(xv[k], rv[lin(idx(i))]))
                .collect()
        };
        assert_eq!(values(x.clone() * r.clone()), want(|a, b| a * b), "{shape:?} mul");
        assert_eq!(values(x.clone() + r.clone()), want(|a, b| a + b), "{shape:?} add");
        assert_eq!(values(x.clone() - r.clone()), want(|a, b| a - b), "{shape:?} sub");
        assert_eq!(values(x.clone() / r.clone()), want(|a, b| a / b), "{shape:?} div");
    }
    // a permuted lhs [2, 4, 3, 5] against a [1, 1, 3, 5] table
    let p = x.clone().permute([0, 2, 1, 3]);
    let pv = values(p.clone());
    let r = table([1, 1, 3, 5]);
    let rv = values(r.clone());
    let want: Vec<f32> = indices([2, 4, 3, 5])
        .enumerate()
        .map(|(k, [_, _, c, d])| pv[k] * rv[c * 5 + d])
        .collect();
    assert_eq!(values(p * r), want);
}
