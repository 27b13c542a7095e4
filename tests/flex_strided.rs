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

/// Binary ops against a right-hand side broadcast over the outer dims give the element-by-
/// element values, bit for bit: RoPE's `[batch, heads, seq, hd] · cos[1, 1, seq, hd]` (item
/// 12's shared block of several inner dims), a block of three dims, the shared last row of
/// RMSNorm's weight, a left-hand side with a size-1 dim inside the block, a narrowed
/// right-hand side (nonzero start offset), a permuted left-hand side, and `[2, 1, 4, 5]`, which
/// no SIMD pattern takes (the strided fallback).
#[test]
fn broadcast_binary_ops_over_a_shared_inner_block() {
    let dev = Default::default();
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    // distinct values everywhere, so a wrong row length or offset shows
    let table = |shape: [usize; 4]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| 1.0 + (i as f32 * 0.71).sin()).collect();
        Tensor::<Cpu, 4>::from_data(TensorData::new(v, shape), &dev)
    };
    // `lhs op rhs` against the same op on values gathered by index arithmetic
    let check = |lhs: Tensor<Cpu, 4>, rhs: Tensor<Cpu, 4>, what: &str| {
        let [s0, s1, s2, s3] = lhs.dims();
        let r = rhs.dims();
        let lv = values(lhs.clone());
        let rv = values(rhs.clone());
        let at_r = |[a, b, c, d]: [usize; 4]| {
            let i = [a % r[0], b % r[1], c % r[2], d % r[3]];
            rv[((i[0] * r[1] + i[1]) * r[2] + i[2]) * r[3] + i[3]]
        };
        type Op = fn(f32, f32) -> f32;
        type TensorOp = fn(Tensor<Cpu, 4>, Tensor<Cpu, 4>) -> Tensor<Cpu, 4>;
        let ops: [(&str, Op, TensorOp); 4] = [
            ("mul", |a, b| a * b, |a, b| a * b),
            ("add", |a, b| a + b, |a, b| a + b),
            ("sub", |a, b| a - b, |a, b| a - b),
            ("div", |a, b| a / b, |a, b| a / b),
        ];
        for (name, op, tensor_op) in ops {
            let want: Vec<f32> = indices([s0, s1, s2, s3])
                .enumerate()
                .map(|(k, i)| op(lv[k], at_r(i)))
                .collect();
            let got = tensor_op(lhs.clone(), rhs.clone());
            assert_eq!(bits(values(got)), bits(want), "{what}: {name}");
        }
    };
    let x = || arange() * 0.37 - 11.0;
    check(x(), table([1, 1, 4, 5]), "[1, 1, 4, 5]");
    check(x(), table([1, 3, 4, 5]), "[1, 3, 4, 5]");
    check(x(), table([1, 1, 1, 5]), "[1, 1, 1, 5]");
    check(x(), table([2, 1, 4, 5]), "[2, 1, 4, 5] (fallback)");
    // a size-1 dim inside the shared block
    check(
        x().reshape([6, 4, 1, 5]),
        table([1, 4, 1, 5]),
        "size-1 inner dim",
    );
    // a narrowed rhs: its block starts 5 elements into the storage
    check(x(), table([1, 1, 6, 5]).narrow(2, 1, 4), "narrowed rhs");
    // a permuted lhs [2, 4, 3, 5]
    check(
        x().permute([0, 2, 1, 3]),
        table([1, 1, 3, 5]),
        "permuted lhs",
    );
}
