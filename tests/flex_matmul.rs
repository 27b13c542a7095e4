//! Flex's f32 matmul on the layouts the model makes — plain, transposed operands (the linear
//! layers' `x · Wᵀ`, the attention's `q · kᵀ`), a narrowed operand (row stride wider than its
//! columns), batched and broadcast-batched products — against an f64 reference, at sizes above
//! burn-flex's multi-threading threshold (192³ multiply-adds). In the default build this checks
//! the `gemm` crate; built with `--features openblas` (vendor/PATCHED.md, item 7) the same
//! cases go through OpenBLAS's `cblas_sgemm`, and the unit-stride / leading-dimension mapping
//! of every layout is checked here.

use burn::tensor::{Tensor, TensorData};
use mmada_model::backend::Cpu;

mod common;
use common::{host, values};

fn tensor<const D: usize>(shape: [usize; D], salt: u64) -> Tensor<Cpu, D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(values(n, salt), shape), &Default::default())
}

/// `[m, k] · [k, n]` in f64 from row-major host copies.
fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; m * n];
    for i in 0..m {
        for p in 0..k {
            let x = a[i * k + p] as f64;
            for j in 0..n {
                out[i * n + j] += x * b[p * n + j] as f64;
            }
        }
    }
    out
}

/// Largest |got − want| over the largest |want| (both products of values in [-1, 1)).
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
    err / scale
}

const M: usize = 210;
const K: usize = 190;
const N: usize = 230; // M·K·N ≈ 9.2 M > 192³ ≈ 7.1 M: the multi-threaded path

#[test]
fn two_d_products_of_every_operand_layout_match_the_f64_reference() {
    let a = tensor([M, K], 1);
    let b = tensor([K, N], 2);
    let want = reference(&host(a.clone()), &host(b.clone()), M, K, N);
    // operands stored transposed, read through `.transpose()` (column-major views)
    let at = a.clone().transpose().into_data();
    let at = Tensor::<Cpu, 2>::from_data(at, &Default::default()).transpose();
    let bt = b.clone().transpose().into_data();
    let bt = Tensor::<Cpu, 2>::from_data(bt, &Default::default()).transpose();
    // `a` as the left columns of a wider matrix: row stride K + 7
    let wide = Tensor::cat(vec![a.clone(), tensor([M, 7], 3)], 1).narrow(1, 0, K);
    for (name, x, y) in [
        ("a · b", a.clone(), b.clone()),
        ("aᵀᵀ · b", at.clone(), b.clone()),
        ("a · bᵀᵀ", a.clone(), bt.clone()),
        ("aᵀᵀ · bᵀᵀ", at, bt),
        ("narrowed a · b", wide, b.clone()),
    ] {
        let e = rel_err(&host(x.matmul(y)), &want);
        assert!(e < 1e-5, "{name}: relative error {e}");
    }
}

#[test]
fn batched_and_broadcast_products_match_the_f64_reference() {
    // two large matrices per batch (per-matrix multi-threaded path), one rhs broadcast
    let a = tensor([2, M, K], 4);
    let b = tensor([2, K, N], 5);
    let got = host(a.clone().matmul(b.clone()));
    let (ah, bh) = (host(a.clone()), host(b.clone()));
    for i in 0..2 {
        let want = reference(
            &ah[i * M * K..(i + 1) * M * K],
            &bh[i * K * N..(i + 1) * K * N],
            M,
            K,
            N,
        );
        let e = rel_err(&got[i * M * N..(i + 1) * M * N], &want);
        assert!(e < 1e-5, "batch {i}: relative error {e}");
    }
    let b0 = tensor([1, K, N], 6);
    let got = host(a.matmul(b0.clone()));
    for i in 0..2 {
        let want = reference(&ah[i * M * K..(i + 1) * M * K], &host(b0.clone()), M, K, N);
        let e = rel_err(&got[i * M * N..(i + 1) * M * N], &want);
        assert!(e < 1e-5, "broadcast batch {i}: relative error {e}");
    }
}
