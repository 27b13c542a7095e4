//! The patched activations of the vendored burn crates (vendor/PATCHED.md items 8 and 9),
//! against f64 references:
//!
//! * burn-flex's f32 `exp` (a vectorised Cephes `expf`): within 2 ulp of the correctly rounded
//!   value on a fine grid over [−104, 89] (normal, subnormal and near-overflow results), exact
//!   edges (`−∞ → 0`, `+∞ → +∞`, `NaN → NaN`, `0 → 1`), the same values on contiguous,
//!   shared and transposed tensors;
//! * the fused softmax / log-softmax of burn-flex, along the last and a non-last dimension,
//!   with `−∞` entries;
//! * burn-autodiff's single-op softmax / log-softmax backward, against the analytic gradients
//!   `p ⊙ (g − Σ g ⊙ p)` and `g − p Σ g` in f64.

use burn::backend::Autodiff;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Tensor, TensorData};
use mmada_model::backend::Cpu;

mod common;
use common::{host, values};

type Ad = Autodiff<Cpu>;

fn ulps(a: f32, b: f32) -> u64 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
}

#[test]
fn exp_is_within_two_ulp_of_the_correctly_rounded_value() {
    let xs: Vec<f32> = (0..480_001)
        .map(|i| -104.0 + i as f32 * (193.0 / 480_000.0))
        .collect();
    let n = xs.len();
    let got = host(
        Tensor::<Cpu, 1>::from_data(TensorData::new(xs.clone(), [n]), &Default::default()).exp(),
    );
    let mut worst = (0u64, 0f32);
    for (&x, &y) in xs.iter().zip(&got) {
        let want = (x as f64).exp() as f32;
        let d = ulps(y, want);
        if d > worst.0 {
            worst = (d, x);
        }
    }
    assert!(worst.0 <= 2, "exp({}) is {} ulp off", worst.1, worst.0);
}

#[test]
fn exp_edges_and_layouts() {
    let edges = [
        f32::NEG_INFINITY,
        -1e9,
        -200.0,
        0.0,
        89.0,
        1e9,
        f32::INFINITY,
    ];
    let got = host(
        Tensor::<Cpu, 1>::from_data(
            TensorData::new(edges.to_vec(), [edges.len()]),
            &Default::default(),
        )
        .exp(),
    );
    assert_eq!(
        got,
        [
            0.0,
            0.0,
            0.0,
            1.0,
            f32::INFINITY,
            f32::INFINITY,
            f32::INFINITY
        ]
    );
    let nan = host(
        Tensor::<Cpu, 1>::from_data(TensorData::new(vec![f32::NAN], [1]), &Default::default())
            .exp(),
    );
    assert!(nan[0].is_nan());

    // contiguous (in place), shared (copied), transposed (the generic unary path)
    let v: Vec<f32> = values(300 * 257, 3).iter().map(|x| x * 30.0).collect();
    let t =
        Tensor::<Cpu, 2>::from_data(TensorData::new(v.clone(), [300, 257]), &Default::default());
    let shared = t.clone();
    let a = host(t.clone().exp());
    let b = host(shared.exp());
    let c = host(t.clone().transpose().exp().transpose());
    let want: Vec<f32> = v.iter().map(|&x| (x as f64).exp() as f32).collect();
    for (i, w) in want.iter().enumerate() {
        assert!(ulps(a[i], *w) <= 2, "contiguous [{i}]: {} vs {w}", a[i]);
    }
    assert_eq!(a, b, "a shared tensor gets the same values");
    assert_eq!(a, c, "a transposed tensor gets the same values");
}

/// f64 log-softmax of `rows` rows of `v` (row-major, `cols` columns).
fn ref_log_softmax(v: &[f32], cols: usize) -> Vec<f64> {
    v.chunks(cols)
        .flat_map(|r| {
            let m = r.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = m + r.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            r.iter().map(move |&x| x as f64 - lse).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn fused_softmax_and_log_softmax_match_f64() {
    let (rows, cols) = (37, 1000);
    let mut v: Vec<f32> = values(rows * cols, 5).iter().map(|x| x * 20.0).collect();
    for r in 0..rows {
        v[r * cols + (r * 13) % cols] = f32::NEG_INFINITY;
    }
    let want = ref_log_softmax(&v, cols);
    let t = Tensor::<Cpu, 2>::from_data(
        TensorData::new(v.clone(), [rows, cols]),
        &Default::default(),
    );
    let ls = host(log_softmax(t.clone(), 1));
    let sm = host(softmax(t.clone(), 1));
    // along dim 0 of the transpose: the same numbers
    let ls0 = host(log_softmax(t.clone().transpose(), 0).transpose());
    for i in 0..rows * cols {
        if want[i] == f64::NEG_INFINITY {
            assert_eq!(ls[i], f32::NEG_INFINITY, "[{i}]");
            assert_eq!(sm[i], 0.0, "[{i}]");
            continue;
        }
        assert!(
            (ls[i] as f64 - want[i]).abs() <= 1e-5 * want[i].abs().max(1.0),
            "log_softmax [{i}]: {} vs {}",
            ls[i],
            want[i]
        );
        let p = want[i].exp();
        assert!(
            (sm[i] as f64 - p).abs() <= 1e-6 * p.max(1e-30) + 1e-12,
            "softmax [{i}]: {} vs {p}",
            sm[i]
        );
    }
    assert_eq!(ls, ls0, "dim 0 of the transpose gives the same values");
}

#[test]
fn softmax_and_log_softmax_gradients_are_the_analytic_ones() {
    let (rows, cols) = (9, 301);
    let v: Vec<f32> = values(rows * cols, 7).iter().map(|x| x * 6.0).collect();
    let g: Vec<f32> = values(rows * cols, 11);
    let logp = ref_log_softmax(&v, cols);
    for log in [false, true] {
        let x = Tensor::<Ad, 2>::from_data(
            TensorData::new(v.clone(), [rows, cols]),
            &Default::default(),
        )
        .require_grad();
        let gt = Tensor::<Ad, 2>::from_data(
            TensorData::new(g.clone(), [rows, cols]),
            &Default::default(),
        );
        let y = if log {
            log_softmax(x.clone(), 1)
        } else {
            softmax(x.clone(), 1)
        };
        let grads = (y * gt).sum().backward();
        let got = host(x.grad(&grads).unwrap());
        for r in 0..rows {
            let span = r * cols..(r + 1) * cols;
            let p: Vec<f64> = logp[span.clone()].iter().map(|l| l.exp()).collect();
            let gr: Vec<f64> = g[span.clone()].iter().map(|&x| x as f64).collect();
            let want: Vec<f64> = if log {
                let s: f64 = gr.iter().sum();
                gr.iter().zip(&p).map(|(g, p)| g - p * s).collect()
            } else {
                let s: f64 = gr.iter().zip(&p).map(|(g, p)| g * p).sum();
                gr.iter().zip(&p).map(|(g, p)| p * (g - s)).collect()
            };
            for (k, w) in want.iter().enumerate() {
                let o = got[r * cols + k] as f64;
                // the upstream values are O(1): a few f32 ulp of them, absolute
                assert!(
                    (o - w).abs() <= 1e-6 + 2e-6 * w.abs(),
                    "log {log} [{r}, {k}]: {o} vs {w}"
                );
            }
        }
    }
}
