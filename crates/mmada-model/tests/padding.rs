//! Left padding hidden by attention changes nothing: RoPE encodes relative positions only, so
//! a row with `k` more `[iPAD]` tokens in front, hidden as keys ([`Attention::KeyPadding`]) or
//! pairwise ([`Attention::Pairwise`]), gives the same logits at every real position. This is
//! what `t2i_attention: hard` relies on (UniGRPO t2i rollouts and updates).

use burn::tensor::{Bool, Int, Tensor, TensorData};
use mmada_model::backend::Cpu;
use mmada_model::init::init_model;
use mmada_model::{Attention, FloatDType, ModelConfig};

#[test]
fn hidden_left_padding_leaves_the_real_positions_unchanged() {
    let cfg = ModelConfig {
        d_model: 32,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 2,
        mlp_hidden_size: 64,
        ..ModelConfig::tiny()
    };
    let dev = Default::default();
    let model = init_model::<Cpu>(&cfg, 3, &dev, FloatDType::F32);
    let real: Vec<i32> = (0..10).map(|i| (i * 37 + 5) % 90 + 1).collect();
    let v = cfg.embedding_size;
    let logits = |pads: usize, pairwise: bool| -> Vec<f32> {
        let ids: Vec<i32> = std::iter::repeat_n(0, pads)
            .chain(real.iter().copied())
            .collect();
        let l = ids.len();
        let keep: Vec<bool> = (0..l).map(|i| i >= pads).collect();
        let att = if pairwise {
            let pair: Vec<bool> = (0..l * l).map(|x| keep[x / l] && keep[x % l]).collect();
            Attention::Pairwise(Tensor::<Cpu, 3, Bool>::from_data(
                TensorData::new(pair, [1, l, l]),
                &dev,
            ))
        } else {
            Attention::KeyPadding(Tensor::<Cpu, 2, Bool>::from_data(
                TensorData::new(keep, [1, l]),
                &dev,
            ))
        };
        let ids = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [1, l]), &dev);
        let out = model
            .forward(ids, &att)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        out[pads * v..].to_vec()
    };
    let base = logits(0, false);
    for (pads, pairwise) in [(4, false), (4, true), (9, false)] {
        let got = logits(pads, pairwise);
        let d = base
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            d < 1e-4,
            "{pads} pads (pairwise {pairwise}): max |Δlogits| {d:e}"
        );
    }
    // the pads are seen without the mask
    let ids: Vec<i32> = std::iter::repeat_n(0, 4)
        .chain(real.iter().copied())
        .collect();
    let ids = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [1, 14]), &dev);
    let full = model
        .forward(ids, &Attention::Full)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let d = base
        .iter()
        .zip(&full[4 * v..])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d > 1e-3, "full attention: max |Δlogits| {d:e}");
}
