//! UniGRPO loss parity with the dLLM-RL implementation (`fixtures/unigrpo/random_masking_g4`,
//! spec §5.2): advantages, noising (recorded masks injected), old/new per-token log-probs,
//! policy / KL / total loss and gradients. Plus edge cases of the loss.

mod common;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use common::{Fixture, fixture_root};
use mmada_diffusion::grpo::{
    AdvantageOptions, GrpoBatch, GrpoLossConfig, LossNorm, TailPad, group_advantages,
    noise_completion, token_logprobs, unigrpo_loss,
};
use mmada_model::backend::Cpu;
use mmada_model::{Attention, FloatDType, LladaModel, load_checkpoint};
use serde_json::Value;

type Ad = Autodiff<Cpu>;

const CASE: &str = "unigrpo/random_masking_g4";

fn meta() -> Value {
    let p = fixture_root().join(CASE).join("meta.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn param<'a>(m: &'a Value, key: &str) -> &'a Value {
    m["params"]
        .get(key)
        .unwrap_or_else(|| panic!("meta.params.{key}"))
}

fn tol(m: &Value, key: &str) -> f32 {
    m["tolerance"][key].as_f64().unwrap() as f32
}

/// The two weight folders named in `meta.weights` (policy first, old policy second).
fn weight_dirs(m: &Value) -> (String, String) {
    let dirs: Vec<String> = m["weights"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .filter(|w| w.ends_with('/'))
        .map(|w| w.trim_end_matches('/').to_string())
        .collect();
    (dirs[0].clone(), dirs[1].clone())
}

fn load<B: Backend>(dir: &str) -> LladaModel<B> {
    load_checkpoint::<B>(
        &fixture_root().join(dir),
        &Default::default(),
        FloatDType::F32,
    )
    .unwrap()
    .1
}

fn assert_rel(name: &str, got: f32, want: f32, rtol: f32) {
    let rel = ((got - want) / want).abs();
    println!("{name}: ours {got:.8} upstream {want:.8} rel {rel:.2e}");
    assert!(
        rel <= rtol,
        "{name}: {got} vs {want} (rel {rel:e} > {rtol:e})"
    );
}

/// Builds the batch of the fixture from its base ids and the recorded masks, checking every
/// intermediate against the fixture. Returns (batch, advantages).
fn fixture_batch(m: &Value, fx: &Fixture) -> GrpoBatch {
    let g = param(m, "G").as_u64().unwrap() as usize;
    let start = param(m, "start_pos").as_u64().unwrap() as usize;
    let times = param(m, "mask_times_per_sample").as_u64().unwrap() as usize;
    let mask_id = param(m, "mask_id").as_i64().unwrap();
    let tail = TailPad {
        pad_id: param(m, "pad_id").as_i64().unwrap(),
        post_num: param(m, "post_num").as_u64().unwrap() as usize,
    };
    let rtol = tol(m, "loss_rtol");

    // Advantages: population z-score within the group.
    let adv = group_advantages(&fx.floats("rewards_raw"), g, AdvantageOptions::default()).unwrap();
    for (a, b) in adv.advantages.iter().zip(fx.floats("advantages")) {
        assert!((a - b).abs() <= rtol * b.abs(), "advantage {a} vs {b}");
    }
    assert_eq!(adv.zero_std, vec![false]);

    let base = fx.ints("base_ids");
    let l = fx.shape("base_ids")[1];
    let noisy_fx = fx.ints("noisy_batch");
    let pmask_fx: Vec<bool> = fx.ints("p_mask").iter().map(|&x| x != 0).collect();
    let row_labels = fx.ints("row_labels");
    let row_adv = fx.floats("row_advantage");
    let rows = fx.shape("noisy_batch")[0];
    assert_eq!(rows, g * times, "no row of the fixture was dropped");
    let mut batch = GrpoBatch::new(l);
    for r in 0..rows {
        let src = r / times;
        let ids = &base[src * l..(src + 1) * l];
        // The labels of the row are its completion (prompt ignored with -100).
        for i in 0..l {
            let want = if i < start { -100 } else { ids[i] };
            assert_eq!(row_labels[r * l + i], want, "row_labels[{r},{i}]");
        }
        // Inject the recorded random mask (positions the fixture replaced by the mask id).
        let random: Vec<bool> = noisy_fx[r * l + start..(r + 1) * l]
            .iter()
            .map(|&x| x == mask_id)
            .collect();
        let row = noise_completion(ids, start, &random, mask_id, Some(tail)).unwrap();
        assert_eq!(row.noisy, &noisy_fx[r * l..(r + 1) * l], "noisy row {r}");
        assert_eq!(
            row.loss_mask,
            &pmask_fx[r * l..(r + 1) * l],
            "p_mask row {r}"
        );
        assert!(batch.push(row, ids, adv.advantages[src], src).unwrap());
        assert!((batch.advantages[r] - row_adv[r]).abs() <= rtol * row_adv[r].abs());
    }
    batch
}

#[test]
fn random_masking_g4_logprobs_losses_and_gradients_match() {
    let m = meta();
    let fx = Fixture::open(&fixture_root().join(CASE).join("tensors.safetensors"));
    let batch = fixture_batch(&m, &fx);
    let (policy_dir, old_dir) = weight_dirs(&m);
    let rtol = tol(&m, "loss_rtol");
    let (pos, _, _) = batch.tokens();
    let l = batch.seq_len;

    // Old policy: no-grad pass (inner backend).
    let old = load::<Cpu>(&old_dir);
    let old_logits = old.forward(batch.input::<Cpu>(&Default::default()), &Attention::Full);
    // Per-token log-probs at ALL positions (labels −100 → 0 as upstream) vs the fixture.
    let all: Vec<usize> = (0..batch.rows() * l).collect();
    let labels0: Vec<i64> = fx.ints("row_labels").iter().map(|&x| x.max(0)).collect();
    let lp_all: Vec<f32> = token_logprobs(old_logits.clone(), &all, &labels0)
        .into_data()
        .to_vec()
        .unwrap();
    let want_old = fx.floats("logp_old");
    let mut worst = 0f32;
    for (a, b) in lp_all.iter().zip(&want_old) {
        let d = (a - b).abs();
        assert!(d <= rtol * b.abs() + 1e-6, "logp_old {a} vs {b}");
        worst = worst.max(d);
    }
    println!(
        "logp_old (all {} positions): max |Δ| = {worst:.2e}",
        all.len()
    );
    let old_logp: Vec<f32> = batch
        .logprobs(old_logits)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    for (k, &p) in pos.iter().enumerate() {
        assert_eq!(old_logp[k], lp_all[p]);
    }

    // New policy with gradient.
    let model = load::<Ad>(&policy_dir);
    let logits = model.forward(batch.input::<Ad>(&Default::default()), &Attention::Full);
    let cfg = GrpoLossConfig {
        epsilon: param(&m, "eps").as_f64().unwrap() as f32,
        epsilon_high: None,
        beta: param(&m, "beta").as_f64().unwrap() as f32,
        norm: LossNorm::DllmRl,
    };
    assert!(param(&m, "use_kl_estimator_k3").as_bool().unwrap());
    let out = unigrpo_loss(logits, &batch, &old_logp, None, &cfg).unwrap();

    // Per-row log-probs and ratios on the scored positions.
    let lp_new: Vec<f32> = out.logp.clone().into_data().to_vec().unwrap();
    let (want_new, want_ratio) = (fx.floats("logp_new"), fx.floats("ratio"));
    let mut worst = (0f32, 0f32);
    for (k, &p) in pos.iter().enumerate() {
        let (a, b) = (lp_new[k], want_new[p]);
        assert!(
            (a - b).abs() <= rtol * b.abs() + 1e-6,
            "logp_new[{p}] {a} vs {b}"
        );
        let ratio = (a - old_logp[k]).exp();
        assert!(
            (ratio - want_ratio[p]).abs() <= 1e-5 * want_ratio[p],
            "ratio[{p}]"
        );
        worst = (
            worst.0.max((a - b).abs()),
            worst.1.max((ratio - want_ratio[p]).abs()),
        );
    }
    println!(
        "logp_new ({} scored tokens): max |Δ| = {:.2e}; ratio max |Δ| = {:.2e}",
        pos.len(),
        worst.0,
        worst.1
    );

    assert_rel(
        "policy_loss",
        out.policy_loss.clone().into_scalar(),
        fx.floats("policy_loss")[0],
        rtol,
    );
    assert_rel(
        "kl_loss",
        out.kl_loss.clone().into_scalar(),
        fx.floats("kl_loss")[0],
        rtol,
    );
    assert_rel(
        "loss",
        out.loss.clone().into_scalar(),
        fx.floats("loss")[0],
        rtol,
    );
    let clip = m["stats"]["clip_fraction"].as_f64().unwrap() as f32;
    assert!(
        (out.stats.clip_fraction - clip).abs() < 1e-6,
        "{}",
        out.stats.clip_fraction
    );
    assert_eq!(out.stats.rows, 8);
    println!("stats: {:?}", out.stats);

    let grads = out.loss.backward();
    let (atol, grtol) = (tol(&m, "grad_atol"), tol(&m, "grad_rtol"));
    let names = fx.names();
    let mut checked = 0;
    for (name, g) in model.named_grads(&grads) {
        let key = format!("grad.model.transformer.{name}");
        if !names.contains(&key) {
            continue;
        }
        let want = fx.floats(&key);
        let got = g.unwrap().to_vec::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        let mut worst = 0f32;
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= atol + grtol * b.abs(), "{key}: {a} vs {b}");
            worst = worst.max((a - b).abs());
        }
        println!("{key}: max |Δgrad| = {worst:.2e}");
        checked += 1;
    }
    assert_eq!(
        checked,
        names.iter().filter(|n| n.starts_with("grad.")).count()
    );
    assert_eq!(checked, 5);
}

/// The fixture batch with the given per-row advantages.
fn batch_with_advantages(adv: f32) -> GrpoBatch {
    let m = meta();
    let fx = Fixture::open(&fixture_root().join(CASE).join("tensors.safetensors"));
    let mut b = fixture_batch(&m, &fx);
    b.advantages.iter_mut().for_each(|a| *a = adv);
    b
}

#[test]
fn equal_reward_group_gives_zero_policy_gradient_and_no_nan() {
    // All four completions rewarded equally: advantages exactly 0, group flagged zero-std.
    let adv = group_advantages(&[0.5; 4], 4, AdvantageOptions::default()).unwrap();
    assert_eq!(adv.advantages, vec![0.0; 4]);
    assert_eq!(adv.frac_zero_std(), 1.0);
    let batch = batch_with_advantages(adv.advantages[0]);
    let m = meta();
    let (policy_dir, old_dir) = weight_dirs(&m);
    let old = load::<Cpu>(&old_dir);
    let old_logp: Vec<f32> = batch
        .logprobs(old.forward(batch.input::<Cpu>(&Default::default()), &Attention::Full))
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    let model = load::<Ad>(&policy_dir);
    for norm in [LossNorm::DllmRl, LossNorm::Sequence, LossNorm::Token] {
        let cfg = GrpoLossConfig {
            beta: 0.0,
            norm,
            ..Default::default()
        };
        let logits = model.forward(batch.input::<Ad>(&Default::default()), &Attention::Full);
        let out = unigrpo_loss(logits, &batch, &old_logp, None, &cfg).unwrap();
        assert_eq!(out.loss.clone().into_scalar(), 0.0);
        let grads = out.loss.backward();
        for (name, g) in model.named_grads(&grads) {
            if let Some(g) = g {
                let v = g.to_vec::<f32>().unwrap();
                assert!(
                    v.iter().all(|x| *x == 0.0),
                    "{norm:?} {name}: non-zero gradient"
                );
            }
        }
    }
    // With β > 0 the KL term still gives a finite, non-zero gradient (old ≠ new weights).
    let cfg = GrpoLossConfig::default();
    let logits = model.forward(batch.input::<Ad>(&Default::default()), &Attention::Full);
    let out = unigrpo_loss(logits, &batch, &old_logp, None, &cfg).unwrap();
    assert_eq!(out.policy_loss.clone().into_scalar(), 0.0);
    assert!(out.kl_loss.clone().into_scalar() > 0.0);
    let grads = out.loss.backward();
    let mut any = false;
    for (_, g) in model.named_grads(&grads) {
        let v = g.unwrap().to_vec::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
        any |= v.iter().any(|x| *x != 0.0);
    }
    assert!(any);
}

#[test]
fn on_policy_first_step_has_unit_ratio_and_zero_kl() {
    // Old == new (first inner iteration): ratio 1, nothing clipped, k3 KL 0, and the loss
    // equals −mean_rows(A) (policy gradient at ρ = 1).
    let m = meta();
    let fx = Fixture::open(&fixture_root().join(CASE).join("tensors.safetensors"));
    let batch = fixture_batch(&m, &fx);
    let (policy_dir, _) = weight_dirs(&m);
    let model = load::<Ad>(&policy_dir);
    let inner = load::<Cpu>(&policy_dir);
    let old_logp: Vec<f32> = batch
        .logprobs(inner.forward(batch.input::<Cpu>(&Default::default()), &Attention::Full))
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    let logits = model.forward(batch.input::<Ad>(&Default::default()), &Attention::Full);
    let out = unigrpo_loss(logits, &batch, &old_logp, None, &GrpoLossConfig::default()).unwrap();
    assert!((out.stats.ratio_mean - 1.0).abs() < 1e-6);
    assert_eq!(out.stats.clip_region, 0.0);
    assert!(out.stats.kl_mean.abs() < 1e-6);
    let want = -batch.advantages.iter().sum::<f32>() / batch.rows() as f32;
    let got = out.loss.into_scalar();
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}
