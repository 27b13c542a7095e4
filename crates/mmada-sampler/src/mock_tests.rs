//! Sampler behaviour on mock denoisers (no model weights): ordering, blocks, CFG, EOS options,
//! temperature and random remasking with injected draws.

use std::cell::RefCell;

use burn::tensor::{Int, Tensor, TensorData};
use mmada_model::backend::Cpu;
use mmada_model::{Attention, Denoiser};

use crate::host;
use crate::{
    Completion, GenerateConfig, Remasking, SamplerError, UniformSource, generate,
    generate_completions, generate_observed,
};

const V: usize = 8;
const MASK: i64 = 7;

/// Logits computed on the host by a closure `(row ids, position) -> [V]`; records every batch
/// and its key-padding mask (`None` = full attention).
struct FnDenoiser<F: Fn(&[i64], usize) -> Vec<f32>> {
    f: F,
    calls: RefCell<Vec<(usize, Vec<i64>)>>, // (batch, ids)
    key_padding: RefCell<Vec<Option<Vec<bool>>>>,
}

impl<F: Fn(&[i64], usize) -> Vec<f32>> FnDenoiser<F> {
    fn new(f: F) -> Self {
        FnDenoiser {
            f,
            calls: RefCell::new(Vec::new()),
            key_padding: RefCell::new(Vec::new()),
        }
    }
}

impl<F: Fn(&[i64], usize) -> Vec<f32>> Denoiser<Cpu> for FnDenoiser<F> {
    fn logits(&self, ids: Tensor<Cpu, 2, Int>, attention: &Attention<Cpu>) -> Tensor<Cpu, 3> {
        let [b, l] = ids.dims();
        let x = host::ints(ids).unwrap();
        self.calls.borrow_mut().push((b, x.clone()));
        self.key_padding.borrow_mut().push(match attention {
            Attention::Full => None,
            Attention::KeyPadding(m) => Some(host::bools(m.clone()).unwrap()),
            _ => panic!("the block sampler passes Full or KeyPadding"),
        });
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

/// Setting [`StepEvent::stop`] ends the generation after that step with
/// [`crate::SamplerError::Cancelled`]: no further model call is made.
#[test]
fn observer_stop_cancels_after_the_step() {
    let m = FnDenoiser::new(|_, i| one_hot(i % 5, i as f32));
    let c = cfg(6, 4, 2);
    let mut steps = Vec::new();
    let e = generate_observed(
        &m,
        prompt(&[&[1, 2]]),
        None,
        &c,
        &mut NoRng,
        false,
        &mut |e| {
            steps.push(e.step);
            if e.step == 2 {
                e.stop.set(true);
            }
        },
    )
    .unwrap_err();
    assert_eq!(e, crate::SamplerError::Cancelled { step: 2 });
    assert_eq!(steps, [0, 1, 2]);
    assert_eq!(m.calls.borrow().len(), 3, "no forward after the stop");
}

/// The observer of [`generate_observed`] sees the canvas after every step (the trace's
/// canvases 1..), the step's block and the block ends, and the result is [`generate`]'s.
#[test]
fn observer_sees_every_step_and_the_block_ends() {
    let m = FnDenoiser::new(|_, i| one_hot(i % 5, i as f32));
    let c = cfg(6, 4, 2);
    /// (step, block, block_done, canvas, unmask_step) of one event.
    type Seen = (usize, usize, bool, Vec<i64>, Vec<i64>);
    let mut seen: Vec<Seen> = Vec::new();
    let out = generate_observed(
        &m,
        prompt(&[&[1, 2]]),
        None,
        &c,
        &mut NoRng,
        true,
        &mut |e| {
            assert_eq!((e.batch, e.seq_len, e.prompt_len), (1, 6, 2));
            seen.push((
                e.step,
                e.block,
                e.block_done,
                e.canvas.to_vec(),
                e.unmask_step.to_vec(),
            ));
        },
    )
    .unwrap();
    let t = out.trace.unwrap();
    assert_eq!(seen.len(), 6);
    let steps: Vec<(usize, usize, bool)> = seen.iter().map(|s| (s.0, s.1, s.2)).collect();
    assert_eq!(
        steps,
        vec![
            (0, 0, false),
            (1, 0, false),
            (2, 0, true),
            (3, 1, false),
            (4, 1, false),
            (5, 1, true)
        ]
    );
    for (s, canvas) in seen.iter().zip(&t.canvases[1..]) {
        assert_eq!(&s.3, canvas);
    }
    assert_eq!(seen[1].4, vec![-1, -1, 1, 0, -1, -1]);
    assert_eq!(seen[5].4, t.unmask_step);
    let plain = generate(&m, prompt(&[&[1, 2]]), None, &c, &mut NoRng, false).unwrap();
    assert_eq!(
        host::ints(plain.ids).unwrap(),
        t.canvases.last().unwrap().clone()
    );
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

/// Logits `ln p` of a probability vector (zeros become a very negative logit).
fn log_probs(p: &[f32]) -> Vec<f32> {
    p.iter()
        .map(|&x| if x > 0.0 { x.ln() } else { -40.0 })
        .collect()
}

/// Position 1: `p = [.5, .45, .05/6 …]` (the larger p[x0], a small margin, low entropy);
/// position 2: `p = [.4, .6/7 …]` (a smaller p[x0], a large margin, high entropy).
fn two_shapes(_: &[i64], i: usize) -> Vec<f32> {
    if i == 1 {
        let mut p = vec![0.05 / 6.0; V];
        p[0] = 0.5;
        p[1] = 0.45;
        log_probs(&p)
    } else {
        let mut p = vec![0.6 / 7.0; V];
        p[0] = 0.4;
        log_probs(&p)
    }
}

fn unmask_order(
    m: &FnDenoiser<impl Fn(&[i64], usize) -> Vec<f32>>,
    c: &GenerateConfig,
) -> Vec<i64> {
    generate(m, prompt(&[&[1]]), None, c, &mut NoRng, true)
        .unwrap()
        .trace
        .unwrap()
        .unmask_step
}

#[test]
fn margin_ranks_by_the_gap_between_the_top_two() {
    let m = FnDenoiser::new(two_shapes);
    let mut c = cfg(2, 2, 2);
    // low_confidence: p[x0] = .5 at position 1 beats .4 at position 2
    assert_eq!(unmask_order(&m, &c), vec![-1, 0, 1]);
    // margin: .5 - .45 = .05 at position 1 loses to .4 - .086 = .314 at position 2
    c.remasking = Remasking::Margin;
    assert_eq!(unmask_order(&m, &c), vec![-1, 1, 0]);
    c.confidence_f64 = true;
    assert_eq!(unmask_order(&m, &c), vec![-1, 1, 0]);
}

#[test]
fn entropy_ranks_the_most_peaked_distribution_first() {
    // position 1: p = [.6, .4, 0 …] (H = 0.67); position 2: p = [.7, .3/7 …] (H = 1.19)
    let m = FnDenoiser::new(|_: &[i64], i: usize| {
        let mut p = vec![0.0; V];
        if i == 1 {
            p[0] = 0.6;
            p[1] = 0.4;
        } else {
            p = vec![0.3 / 7.0; V];
            p[2] = 0.7;
        }
        log_probs(&p)
    });
    let mut c = cfg(2, 2, 2);
    assert_eq!(unmask_order(&m, &c), vec![-1, 1, 0]); // p[x0]: .7 > .6
    c.remasking = Remasking::Entropy;
    assert_eq!(unmask_order(&m, &c), vec![-1, 0, 1]); // -H: -0.67 > -1.19
    let out = generate(&m, prompt(&[&[1]]), None, &c, &mut NoRng, false).unwrap();
    assert_eq!(host::ints(out.ids).unwrap(), vec![1, 0, 2]);
    // the two-shapes mock: entropy agrees with low_confidence there (position 1 is peaked)
    let m2 = FnDenoiser::new(two_shapes);
    assert_eq!(unmask_order(&m2, &c), vec![-1, 0, 1]);
}

#[test]
fn threshold_above_one_commits_one_token_per_step() {
    // p[x0] grows with the position and stays < 1 in f32
    let m = FnDenoiser::new(|_, i| one_hot(i % 5, 1.0 + 0.5 * i as f32));
    let mut c = cfg(2, 8, 4); // the schedule would need 2 calls
    c.threshold = Some(1.5);
    let out = generate(&m, prompt(&[&[1, 2], &[3, 4]]), None, &c, &mut NoRng, true).unwrap();
    let t = out.trace.unwrap();
    assert_eq!(out.nfe, 8);
    assert_eq!(t.transfers, vec![vec![1, 1]; 8]);
    assert_eq!(t.canvases.len(), 9);
    // most confident (= rightmost) first inside each block
    assert_eq!(&t.unmask_step[..10], &[-1, -1, 3, 2, 1, 0, 7, 6, 5, 4]);
    // same ids as the schedule at one token per step
    let mut s = cfg(8, 8, 4);
    let sched = generate(&m, prompt(&[&[1, 2], &[3, 4]]), None, &s, &mut NoRng, true).unwrap();
    assert_eq!(sched.trace.unwrap().canvases.last(), t.canvases.last());
    s.threshold = Some(1.0); // p < 1 everywhere in the f32 softmax of these logits
    assert_eq!(
        generate(&m, prompt(&[&[1, 2]]), None, &s, &mut NoRng, false)
            .unwrap()
            .nfe,
        8
    );
}

#[test]
fn low_threshold_commits_every_confident_position_at_once() {
    // positions 1..=3 are confident (p ≈ 0.9999), positions 4..=6 are flat (p = 1/8)
    let m = FnDenoiser::new(|_, i| {
        if i <= 3 {
            one_hot(2, 12.0)
        } else {
            vec![0.0; V]
        }
    });
    let mut c = cfg(6, 6, 6);
    c.threshold = Some(0.9);
    let out = generate(&m, prompt(&[&[1]]), None, &c, &mut NoRng, true).unwrap();
    let t = out.trace.unwrap();
    // step 0: the 3 confident positions; then one flat position per step (at least one)
    assert_eq!(t.transfers, vec![vec![3], vec![1], vec![1], vec![1]]);
    assert_eq!(out.nfe, 4);
    assert_eq!(t.unmask_step, vec![-1, 0, 0, 0, 1, 2, 3]);
    // a threshold below every confidence decodes each block in one call
    c.threshold = Some(0.0);
    let fast = generate(&m, prompt(&[&[1]]), None, &c, &mut NoRng, false).unwrap();
    assert_eq!(fast.nfe, 1);
    let mut blocks = cfg(6, 6, 2);
    blocks.threshold = Some(0.0);
    let fast = generate(&m, prompt(&[&[1]]), None, &blocks, &mut NoRng, false).unwrap();
    assert_eq!((fast.nfe, fast.blocks), (3, 3));
    // the schedule would have used 6 calls
    assert_eq!(
        generate(&m, prompt(&[&[1]]), None, &cfg(6, 6, 6), &mut NoRng, false)
            .unwrap()
            .nfe,
        6
    );
}

#[test]
fn early_stop_skips_the_blocks_after_every_row_ended() {
    const EOS: i64 = 5;
    const EOT: i64 = 6;
    // row whose prompt starts with 1: block ends in EOS; with 2: in EOT; with 3: in token 4
    let m = FnDenoiser::new(|ids: &[i64], i| {
        let end = match ids[0] {
            1 => EOS,
            2 => EOT,
            _ => 4,
        };
        // odd positions (block ends with blocks of 2 after a 1-token prompt) predict `end`
        if i % 2 == 0 {
            one_hot(end as usize, 9.0)
        } else {
            one_hot(3, 5.0)
        }
    });
    let mut c = cfg(6, 6, 2);
    c.eos_id = Some(EOS as u32);
    c.eot_id = Some(EOT as u32);
    let full = generate(&m, prompt(&[&[1], &[2]]), None, &c, &mut NoRng, false).unwrap();
    assert_eq!((full.nfe, full.blocks), (6, 3));
    c.early_stop = true;
    let out = generate(&m, prompt(&[&[1], &[2]]), None, &c, &mut NoRng, true).unwrap();
    assert_eq!((out.nfe, out.blocks), (2, 1));
    // the skipped blocks stay masked (upstream mmu_generate_fast)
    assert_eq!(
        host::ints(out.ids).unwrap(),
        vec![
            1, 3, EOS, MASK, MASK, MASK, MASK, 2, 3, EOT, MASK, MASK, MASK, MASK
        ]
    );
    assert_eq!(out.trace.unwrap().canvases.len(), 3);
    // one row that does not end in EOS/EOT keeps every block running
    let mixed = generate(&m, prompt(&[&[1], &[3]]), None, &c, &mut NoRng, false).unwrap();
    assert_eq!((mixed.nfe, mixed.blocks), (6, 3));
    // with only eot_id, a block ending in EOS does not stop
    c.eos_id = None;
    let eot_only = generate(&m, prompt(&[&[1], &[2]]), None, &c, &mut NoRng, false).unwrap();
    assert_eq!(eot_only.nfe, 6);
    // needs a stop id
    c.eot_id = None;
    assert!(matches!(
        c.validate(),
        Err(crate::SamplerError::InvalidConfig {
            field: "early_stop",
            ..
        })
    ));
}

#[test]
fn sample_vocab_keeps_ids_inside_the_tokenizer_and_off_the_mask() {
    // head of 8 ids, tokenizer of 6, mask id 3 inside it; the mask and ids 6, 7 have the
    // largest logits
    let m = FnDenoiser::new(|_, _| {
        let mut v = vec![0.0; V];
        v[2] = 1.0;
        v[3] = 4.0;
        v[6] = 5.0;
        v[7] = 6.0;
        v
    });
    // one step: every position keeps its own sample (with more steps low-confidence
    // remasking would commit only the most probable id)
    let mut c = GenerateConfig {
        steps: 1,
        gen_length: 32,
        block_length: 32,
        temperature: 2.0,
        ..GenerateConfig::new(3)
    };
    let wide = generate(
        &m,
        prompt(&[&[1]]),
        None,
        &c,
        &mut crate::SeededRng::new(1),
        false,
    )
    .unwrap();
    let ids = host::ints(wide.ids).unwrap();
    assert!(ids[1..].iter().any(|&t| t >= 6), "{ids:?}");
    c.sample_vocab = Some(6);
    for seed in 0..4 {
        let out = generate(
            &m,
            prompt(&[&[1]]),
            None,
            &c,
            &mut crate::SeededRng::new(seed),
            false,
        )
        .unwrap();
        let ids = host::ints(out.ids).unwrap();
        assert!(ids[1..].iter().all(|&t| t < 6 && t != 3), "{ids:?}");
        let distinct: std::collections::BTreeSet<i64> = ids[1..].iter().copied().collect();
        assert!(distinct.len() >= 3, "temperature 2 should spread: {ids:?}");
    }
    // greedy: argmax inside the allowed ids
    c.temperature = 0.0;
    let greedy = generate(&m, prompt(&[&[1]]), None, &c, &mut NoRng, false).unwrap();
    assert!(host::ints(greedy.ids).unwrap()[1..].iter().all(|&t| t == 2));
    // wider than the head
    c.sample_vocab = Some(9);
    assert!(matches!(
        generate(&m, prompt(&[&[1]]), None, &c, &mut NoRng, false),
        Err(crate::SamplerError::InvalidConfig {
            field: "sample_vocab",
            ..
        })
    ));
}

#[test]
fn padding_with_the_mask_id_is_a_typed_error() {
    let m = FnDenoiser::new(|_, _| vec![0.0; V]);
    let keep =
        host::bool_tensor2::<Cpu>(vec![false, true, true, true], [2, 2], &Default::default());
    let e = generate(
        &m,
        prompt(&[&[MASK, 1], &[2, 1]]),
        Some(keep.clone()),
        &cfg(2, 2, 2),
        &mut NoRng,
        false,
    )
    .unwrap_err();
    assert_eq!(
        e,
        crate::SamplerError::PadIsMask {
            row: 0,
            position: 0,
            mask_id: MASK as u32
        }
    );
    assert!(e.to_string().contains("pad"), "{e}");
    assert!(m.calls.borrow().is_empty());
    // a real pad id is fine
    generate(
        &m,
        prompt(&[&[0, 1], &[2, 1]]),
        Some(keep),
        &cfg(2, 2, 2),
        &mut NoRng,
        false,
    )
    .unwrap();
}

#[test]
fn prompt_and_special_ids_outside_the_vocabulary_are_typed_errors() {
    let m = FnDenoiser::new(|_, _| vec![0.0; V]);
    let e = generate(
        &m,
        prompt(&[&[1, 9]]),
        None,
        &cfg(2, 2, 2),
        &mut NoRng,
        false,
    )
    .unwrap_err();
    assert_eq!(
        e,
        crate::SamplerError::PromptId {
            row: 0,
            position: 1,
            id: 9,
            vocab: Some(V)
        }
    );
    let e = generate(
        &m,
        prompt(&[&[1], &[-2]]),
        None,
        &cfg(2, 2, 2),
        &mut NoRng,
        false,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            crate::SamplerError::PromptId {
                row: 1,
                position: 0,
                id: -2,
                ..
            }
        ),
        "{e}"
    );
    let mut c = cfg(2, 2, 2);
    c.mask_id = 8;
    let e = generate(&m, prompt(&[&[1]]), None, &c, &mut NoRng, false).unwrap_err();
    assert!(
        matches!(
            e,
            crate::SamplerError::IdOutOfVocab {
                what: "mask_id",
                id: 8,
                vocab: V
            }
        ),
        "{e}"
    );
    let mut c = cfg(2, 2, 2);
    c.logits_eos_inf = true;
    c.eos_id = Some(20);
    let e = generate(&m, prompt(&[&[1]]), None, &c, &mut NoRng, false).unwrap_err();
    assert!(
        matches!(e, crate::SamplerError::IdOutOfVocab { what: "eos_id", .. }),
        "{e}"
    );
}

// ---- generate_completions -------------------------------------------------------------------

const EOS: u32 = 5;
const EOT: u32 = 6;

/// Greedy answers of 4 ids after a 1-id prompt, by the prompt's last id: 1 → `2 3 EOS 4`,
/// 2 → `3 EOT 2 EOS`, 3 → `4 4 4 4` (no stop id). Each generated position has its own
/// one-hot prediction, so the answer does not depend on the unmasking order.
fn answers(ids: &[i64], i: usize) -> Vec<f32> {
    // the canvas is [prompt | 4 generated]: the prompt's last id is 5 from the end
    let answer: [u32; 4] = match ids[ids.len() - 5] {
        1 => [2, 3, EOS, 4],
        2 => [3, EOT, 2, EOS],
        _ => [4, 4, 4, 4],
    };
    match i.checked_sub(ids.len() - 4) {
        Some(g) => one_hot(answer[g] as usize, 1.0 + g as f32),
        None => vec![0.0; V],
    }
}

fn completion(ids: &[u32], generated: &[u32], terminated: bool, prompt_len: usize) -> Completion {
    Completion {
        ids: ids.to_vec(),
        generated: generated.to_vec(),
        terminated,
        prompt_len,
    }
}

#[test]
fn completions_are_cut_at_the_first_stop_id() {
    let m = FnDenoiser::new(answers);
    let prompts = vec![vec![1], vec![2], vec![3]];
    let c = cfg(4, 4, 4);
    let out = generate_completions::<Cpu, _>(
        &m,
        &prompts,
        &c,
        &[EOS, EOT],
        0,
        &mut NoRng,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        out.rows,
        vec![
            completion(&[2, 3], &[2, 3, EOS, 4], true, 1),
            completion(&[3], &[3, EOT, 2, EOS], true, 1),
            completion(&[4, 4, 4, 4], &[4, 4, 4, 4], false, 1),
        ]
    );
    assert_eq!(
        (out.nfe, out.blocks, out.decoded, out.padded_len),
        (4, 1, 4, 1)
    );
    // equal lengths: no key-padding mask, exactly `generate(prompt, None, …)`
    assert!(m.key_padding.borrow().iter().all(Option::is_none));
    // EOS only (UniGRPO's cut today): the EOT row runs on to its EOS
    let eos_only = generate_completions::<Cpu, _>(
        &m,
        &prompts,
        &c,
        &[EOS],
        0,
        &mut NoRng,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        eos_only.rows[1],
        completion(&[3, EOT, 2], &[3, EOT, 2, EOS], true, 1)
    );
    assert_eq!(eos_only.rows[0], out.rows[0]);
    // no stop ids: every answer is the whole canvas, none terminated
    let none =
        generate_completions::<Cpu, _>(&m, &prompts, &c, &[], 0, &mut NoRng, &Default::default())
            .unwrap();
    assert!(
        none.rows
            .iter()
            .all(|r| !r.terminated && r.ids == r.generated)
    );
}

#[test]
fn completions_left_pad_with_a_key_padding_mask() {
    const PAD: u32 = 0;
    let m = FnDenoiser::new(answers);
    let c = cfg(4, 4, 4);
    let out = generate_completions::<Cpu, _>(
        &m,
        &[vec![1], vec![4, 4, 2]],
        &c,
        &[EOS, EOT],
        PAD,
        &mut NoRng,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        out.rows,
        vec![
            completion(&[2, 3], &[2, 3, EOS, 4], true, 1),
            completion(&[3], &[3, EOT, 2, EOS], true, 3),
        ]
    );
    assert_eq!(out.padded_len, 3);
    // the first canvas: [PAD PAD 1 | M M M M], [4 4 2 | M M M M]
    let m7 = MASK;
    assert_eq!(
        m.calls.borrow()[0],
        (2, vec![0, 0, 1, m7, m7, m7, m7, 4, 4, 2, m7, m7, m7, m7])
    );
    let f = false;
    let t = true;
    assert_eq!(
        m.key_padding.borrow()[0],
        Some(vec![f, f, t, t, t, t, t, t, t, t, t, t, t, t])
    );
}

#[test]
fn completions_reject_no_prompts_and_padding_with_the_mask_id() {
    let m = FnDenoiser::new(answers);
    let c = cfg(4, 4, 4);
    let d = Default::default();
    let e = generate_completions::<Cpu, _>(&m, &[], &c, &[EOS], 0, &mut NoRng, &d).unwrap_err();
    assert!(
        matches!(
            e,
            SamplerError::Shape {
                input: "prompts",
                ..
            }
        ),
        "{e}"
    );
    let e =
        generate_completions::<Cpu, _>(&m, &[vec![]], &c, &[EOS], 0, &mut NoRng, &d).unwrap_err();
    assert!(
        matches!(
            e,
            SamplerError::Shape {
                input: "prompts",
                ..
            }
        ),
        "{e}"
    );
    // padding needed and pad id == mask id
    let e = generate_completions::<Cpu, _>(
        &m,
        &[vec![1], vec![2, 2]],
        &c,
        &[EOS],
        MASK as u32,
        &mut NoRng,
        &d,
    )
    .unwrap_err();
    assert_eq!(
        e,
        SamplerError::PadIsMask {
            row: 0,
            position: 0,
            mask_id: MASK as u32
        }
    );
    // equal lengths need no padding: the pad id is not used
    generate_completions::<Cpu, _>(&m, &[vec![1]], &c, &[EOS], MASK as u32, &mut NoRng, &d)
        .unwrap();
    assert_eq!(
        m.calls.borrow().len(),
        4,
        "the errors come before any model call"
    );
}

#[test]
fn completions_count_the_positions_decoded_before_an_early_stop() {
    // blocks of 2; every block of the rows with prompts 1 and 2 ends in EOS / EOT
    let m = FnDenoiser::new(|ids: &[i64], i| {
        let end = match ids[0] {
            1 => EOS,
            2 => EOT,
            _ => 4,
        };
        if i % 2 == 0 {
            one_hot(end as usize, 9.0)
        } else {
            one_hot(3, 5.0)
        }
    });
    let mut c = cfg(6, 6, 2);
    c.eos_id = Some(EOS);
    c.eot_id = Some(EOT);
    let d = Default::default();
    let full =
        generate_completions::<Cpu, _>(&m, &[vec![1], vec![2]], &c, &[EOS, EOT], 0, &mut NoRng, &d)
            .unwrap();
    assert_eq!((full.nfe, full.blocks, full.decoded), (6, 3, 6));
    c.early_stop = true;
    let out =
        generate_completions::<Cpu, _>(&m, &[vec![1], vec![2]], &c, &[EOS, EOT], 0, &mut NoRng, &d)
            .unwrap();
    assert_eq!((out.nfe, out.blocks, out.decoded), (2, 1, 2));
    let mk = MASK as u32;
    assert_eq!(
        out.rows,
        vec![
            completion(&[3], &[3, EOS, mk, mk, mk, mk], true, 1),
            completion(&[3], &[3, EOT, mk, mk, mk, mk], true, 1),
        ]
    );
    // one row without a stop id decodes every block
    let mixed =
        generate_completions::<Cpu, _>(&m, &[vec![1], vec![3]], &c, &[EOS, EOT], 0, &mut NoRng, &d)
            .unwrap();
    assert_eq!((mixed.blocks, mixed.decoded), (3, 6));
    assert_eq!(
        mixed.rows[1],
        completion(&[3, 4, 3, 4, 3, 4], &[3, 4, 3, 4, 3, 4], false, 1)
    );
}
