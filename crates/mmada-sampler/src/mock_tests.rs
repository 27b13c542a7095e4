//! Sampler behaviour on mock denoisers (no model weights): ordering, blocks, CFG, EOS options,
//! temperature and random remasking with injected draws.

use std::cell::RefCell;

use burn::tensor::{Int, Tensor, TensorData};
use mmada_model::backend::Cpu;
use mmada_model::{Attention, Denoiser};

use crate::host;
use crate::{GenerateConfig, Remasking, UniformSource, generate};

const V: usize = 8;
const MASK: i64 = 7;

/// Logits computed on the host by a closure `(row ids, position) -> [V]`; records every batch.
struct FnDenoiser<F: Fn(&[i64], usize) -> Vec<f32>> {
    f: F,
    calls: RefCell<Vec<(usize, Vec<i64>)>>, // (batch, ids)
}

impl<F: Fn(&[i64], usize) -> Vec<f32>> FnDenoiser<F> {
    fn new(f: F) -> Self {
        FnDenoiser {
            f,
            calls: RefCell::new(Vec::new()),
        }
    }
}

impl<F: Fn(&[i64], usize) -> Vec<f32>> Denoiser<Cpu> for FnDenoiser<F> {
    fn logits(&self, ids: Tensor<Cpu, 2, Int>, _attention: &Attention<Cpu>) -> Tensor<Cpu, 3> {
        let [b, l] = ids.dims();
        let x = host::ints(ids).unwrap();
        self.calls.borrow_mut().push((b, x.clone()));
        let mut out = Vec::with_capacity(b * l * V);
        for r in 0..b {
            for i in 0..l {
                let v = (self.f)(&x[r * l..(r + 1) * l], i);
                assert_eq!(v.len(), V);
                out.extend(v);
            }
        }
        Tensor::from_data(TensorData::new(out, [b, l, V]), &Default::default())
    }
}

/// Logits with `hot` at token `tok`, 0 elsewhere.
fn one_hot(tok: usize, hot: f32) -> Vec<f32> {
    let mut v = vec![0.0; V];
    v[tok] = hot;
    v
}

fn prompt(rows: &[&[i64]]) -> Tensor<Cpu, 2, Int> {
    let l = rows[0].len();
    let v: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_data(TensorData::new(v, [rows.len(), l]), &Default::default())
}

fn cfg(steps: usize, gen_length: usize, block_length: usize) -> GenerateConfig {
    GenerateConfig {
        steps,
        gen_length,
        block_length,
        ..GenerateConfig::new(MASK as u32)
    }
}

/// Panics when drawn from: greedy low-confidence decoding must not need randomness.
struct NoRng;
impl UniformSource for NoRng {
    fn uniform_f64(&mut self, _n: usize) -> Vec<f64> {
        panic!("no randomness expected")
    }
}

/// Replays fixed values, recording how many were requested.
struct Scripted {
    f: Box<dyn Fn(usize) -> f64>,
    requested: Vec<usize>,
}
impl UniformSource for Scripted {
    fn uniform_f64(&mut self, n: usize) -> Vec<f64> {
        self.requested.push(n);
        (0..n).map(|i| (self.f)(i)).collect()
    }
}

#[test]
fn greedy_unmasks_the_most_confident_position_first() {
    // position i predicts token i % 5 with a logit growing with i → later positions first
    let m = FnDenoiser::new(|_, i| one_hot(i % 5, i as f32));
    let out = generate(
        &m,
        prompt(&[&[1, 2]]),
        None,
        &cfg(4, 4, 4),
        &mut NoRng,
        true,
    )
    .unwrap();
    let t = out.trace.unwrap();
    assert_eq!(out.nfe, 4);
    assert_eq!(t.canvases.last().unwrap(), &vec![1, 2, 2, 3, 4, 0]);
    assert_eq!(t.unmask_step, vec![-1, -1, 3, 2, 1, 0]);
    assert_eq!(t.transfers, vec![vec![1]; 4]);
    assert_eq!(t.canvases[0], vec![1, 2, MASK, MASK, MASK, MASK]);
}

#[test]
fn semi_autoregressive_blocks_are_filled_in_order() {
    let m = FnDenoiser::new(|_, i| one_hot(i % 5, i as f32));
    let out = generate(
        &m,
        prompt(&[&[1, 2]]),
        None,
        &cfg(4, 4, 2),
        &mut NoRng,
        true,
    )
    .unwrap();
    let t = out.trace.unwrap();
    // block 0 = positions 2,3 at steps 0,1 (3 first); block 1 = positions 4,5 at steps 2,3
    assert_eq!(t.unmask_step, vec![-1, -1, 1, 0, 3, 2]);
    // with 2 blocks and 6 steps: 3 steps per block, 2 tokens → [1, 1, 0]
    let out = generate(
        &m,
        prompt(&[&[1, 2]]),
        None,
        &cfg(6, 4, 2),
        &mut NoRng,
        true,
    )
    .unwrap();
    let t = out.trace.unwrap();
    assert_eq!(
        t.transfers,
        vec![vec![1], vec![1], vec![0], vec![1], vec![1], vec![0]]
    );
    assert_eq!(out.nfe, 6);
}

#[test]
fn logits_eos_inf_never_emits_eos() {
    // token 5 (eos) has the highest logit everywhere, token 3 the second highest
    let m = FnDenoiser::new(|_, i| {
        let mut v = one_hot(5, 10.0);
        v[3] = 5.0 + i as f32 * 0.1;
        v
    });
    let mut c = cfg(2, 4, 4);
    let plain = generate(&m, prompt(&[&[1]]), None, &c, &mut NoRng, false).unwrap();
    assert_eq!(host::ints(plain.ids).unwrap(), vec![1, 5, 5, 5, 5]);
    c.logits_eos_inf = true;
    c.eos_id = Some(5);
    let no_eos = generate(&m, prompt(&[&[1]]), None, &c, &mut NoRng, false).unwrap();
    assert_eq!(host::ints(no_eos.ids).unwrap(), vec![1, 3, 3, 3, 3]);
}

#[test]
fn confidence_eos_eot_inf_zeroes_the_eot_confidence() {
    // position 1 predicts eot (6) very confidently; position 2 predicts token 2 less confidently
    let m = FnDenoiser::new(|_, i| {
        if i == 1 {
            one_hot(6, 9.0)
        } else {
            one_hot(2, 3.0)
        }
    });
    let mut c = cfg(2, 2, 2);
    let run = |c: &GenerateConfig| {
        generate(&m, prompt(&[&[1]]), None, c, &mut NoRng, true)
            .unwrap()
            .trace
            .unwrap()
            .unmask_step
    };
    assert_eq!(run(&c), vec![-1, 0, 1]); // eot committed first
    c.confidence_eos_eot_inf = true;
    c.eot_id = Some(6);
    assert_eq!(run(&c), vec![-1, 1, 0]); // eot now has confidence 0 → last
    c.confidence_f64 = true;
    assert_eq!(run(&c), vec![-1, 1, 0]);
}

#[test]
fn cfg_masks_the_prompt_and_extrapolates() {
    // Token 1 always has logit 1.5; a visible prompt gives token 2 logit 1.0 (0 when masked).
    // Conditional alone: token 1 wins. With cfg_scale 2, un + 3·(cond − un) gives token 2
    // a logit of 3 > 1.5.
    let m = FnDenoiser::new(|ids: &[i64], _| {
        let mut v = vec![0.0; V];
        v[1] = 1.5;
        v[2] = if ids[0] != MASK { 1.0 } else { 0.0 };
        v
    });
    let mut c = cfg(2, 2, 2);
    let plain = generate(&m, prompt(&[&[4]]), None, &c, &mut NoRng, false).unwrap();
    assert_eq!(host::ints(plain.ids).unwrap(), vec![4, 1, 1]);
    c.cfg_scale = 2.0; // token 2: 0 + 3·1 = 3 > token 1: 1.5
    m.calls.borrow_mut().clear();
    let guided = generate(&m, prompt(&[&[4]]), None, &c, &mut NoRng, false).unwrap();
    assert_eq!(host::ints(guided.ids).unwrap(), vec![4, 2, 2]);
    assert_eq!(guided.nfe, 2);
    let calls = m.calls.borrow();
    assert_eq!(calls.len(), 2);
    // one forward on [x; un_x] with the prompt masked in the second half
    assert_eq!(calls[0], (2, vec![4, MASK, MASK, MASK, MASK, MASK]));
}

#[test]
fn temperature_uses_f64_gumbel_with_injected_uniforms() {
    // flat logits: x0 = argmax_v 1 / (−ln u_v)^T = the vocab entry with the largest u
    let m = FnDenoiser::new(|_, _| vec![0.0; V]);
    let mut c = cfg(2, 2, 2);
    c.temperature = 0.7;
    let mut rng = Scripted {
        f: Box::new(|i| if i % V == 3 { 0.9 } else { 0.1 }),
        requested: Vec::new(),
    };
    let out = generate(&m, prompt(&[&[1], &[2]]), None, &c, &mut rng, false).unwrap();
    assert_eq!(host::ints(out.ids).unwrap(), vec![1, 3, 3, 2, 3, 3]);
    // one [B, window, V] draw per step (window = the 2-token block)
    assert_eq!(rng.requested, vec![2 * 2 * V, 2 * 2 * V]);
}

#[test]
fn random_remasking_follows_the_draws() {
    let m = FnDenoiser::new(|_, i| one_hot(i % 5, 1.0));
    let mut c = cfg(3, 3, 3);
    c.remasking = Remasking::Random;
    // confidence = u: decreasing with the position → leftmost first
    let mut rng = Scripted {
        f: Box::new(|i| 0.9 - 0.1 * i as f64),
        requested: Vec::new(),
    };
    let out = generate(&m, prompt(&[&[0]]), None, &c, &mut rng, true).unwrap();
    assert_eq!(out.trace.unwrap().unmask_step, vec![-1, 0, 1, 2]);
    assert_eq!(rng.requested, vec![3, 3, 3]);
}

#[test]
fn masks_inside_the_prompt_compete_like_upstream() {
    // Upstream never sets the confidence of masked prompt positions to -inf, so a mask id in
    // the prompt can be filled; the transfer schedule still counts only the block's masks.
    let m = FnDenoiser::new(|_, i| one_hot(3, 10.0 - i as f32));
    let out = generate(
        &m,
        prompt(&[&[1, MASK]]),
        None,
        &cfg(2, 2, 2),
        &mut NoRng,
        true,
    )
    .unwrap();
    let t = out.trace.unwrap();
    assert_eq!(t.unmask_step, vec![-1, 0, 1, -1]);
    assert_eq!(t.canvases.last().unwrap(), &vec![1, 3, 3, MASK]);
}

#[test]
fn wrong_mask_shape_is_a_typed_error() {
    let m = FnDenoiser::new(|_, _| vec![0.0; V]);
    let bad = host::bool_tensor2::<Cpu>(vec![true; 3], [1, 3], &Default::default());
    let e = generate(
        &m,
        prompt(&[&[1, 2]]),
        Some(bad),
        &cfg(2, 2, 2),
        &mut NoRng,
        false,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            crate::SamplerError::Shape {
                input: "attention_mask",
                ..
            }
        ),
        "{e}"
    );
}
