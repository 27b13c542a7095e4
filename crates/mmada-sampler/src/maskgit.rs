//! MMaDA text-to-image MaskGIT sampler (spec §4.3).
//!
//! Port of Gen-Verse/MMaDA `models/modeling_mmada.py::MMadaModelLM.t2i_generate` (commit
//! `3cdb870`) with `models/sampling.py::{cosine_schedule, mask_by_random_topk, gumbel_noise}`.
//! Upstream quirks kept: the categorical draw is always made (no argmax path, even at
//! temperature 0), the temperature compounds across steps (`T ← T·(1 − r)`), the last step keeps
//! at least one image slot masked in the returned canvas while the returned codes are all
//! sampled. Quirk fixed: upstream takes the unconditional text prefix as
//! `uncond[:, :resolution + 1]`, which is only right when `resolution` equals the text length;
//! here the prefix is everything before the image slot (`L − N − 1` positions), which is what it
//! is meant to be and what upstream computes for its standard layout.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use mmada_model::{Attention, Denoiser, TokenLayout};
use serde::{Deserialize, Serialize};

use crate::SamplerError;
use crate::generate::check_logits;
use crate::host;
use crate::rng::{SeededRng, UniformSource, gumbel_from_uniform_f32};
use crate::schedule::{MaskSchedule, ValidateSchedule};

fn default_timesteps() -> usize {
    18
}
fn default_temperature() -> f64 {
    1.0
}

/// Parameters of [`t2i_generate`]. Deserialisable from a recipe (`deny_unknown_fields`).
/// Sizes and ids are required; the numeric knobs default to upstream's `t2i_generate` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct T2iConfig {
    /// Number of MaskGIT steps `S` (upstream `timesteps`, default 18).
    #[serde(default = "default_timesteps")]
    pub timesteps: usize,
    /// MUSE-style guidance weight `w` (default 0 = off): `logits = (1 + w)·cond − w·uncond`.
    /// Active only when `w > 0` and unconditional inputs are given.
    #[serde(default)]
    pub guidance_scale: f64,
    /// Initial temperature `T0` of the Gumbel noise in `mask_by_random_topk` (default 1.0).
    /// Annealed cumulatively: `T_s = T_{s−1}·(1 − (s+1)/S)`.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Mask-ratio schedule `γ` (default cosine).
    #[serde(default)]
    pub noise_schedule: MaskSchedule,
    /// Number of image tokens `N` (upstream `seq_len` / `num_vq_tokens`; 256 or 1024).
    pub seq_len: usize,
    /// VQ codebook size `K` (8192 for MAGVIT-v2).
    pub codebook_size: usize,
    /// Vocabulary id of image code 0, `V0` (upstream `len(tokenizer) + num_new_special_tokens`,
    /// 126349 for MMaDA-8B). The logits are sliced to the columns `[V0, V0 + K)`.
    pub image_token_offset: usize,
    /// The mask token id (upstream `mask_token_id`, 126336).
    pub mask_id: u32,
}

impl T2iConfig {
    /// Upstream defaults (`timesteps` 18, temperature 1, no guidance, cosine) with the mask id,
    /// image-code offset and codebook size of a token layout and `seq_len` image tokens.
    pub fn from_layout(layout: &TokenLayout, seq_len: usize) -> Self {
        T2iConfig {
            timesteps: default_timesteps(),
            guidance_scale: 0.0,
            temperature: default_temperature(),
            noise_schedule: MaskSchedule::Cosine,
            seq_len,
            codebook_size: layout.codebook_size as usize,
            image_token_offset: layout.image_code_offset as usize,
            mask_id: layout.mask_id,
        }
    }

    /// Checks the fields; the error names the field.
    pub fn validate(&self) -> Result<(), SamplerError> {
        if self.timesteps == 0 {
            return Err(SamplerError::config("timesteps", "must be > 0"));
        }
        if self.seq_len < 2 {
            return Err(SamplerError::config(
                "seq_len",
                format!(
                    "must be >= 2 (mask_by_random_topk keeps one slot masked), got {}",
                    self.seq_len
                ),
            ));
        }
        if self.codebook_size == 0 {
            return Err(SamplerError::config("codebook_size", "must be > 0"));
        }
        if !(self.guidance_scale.is_finite() && self.guidance_scale >= 0.0) {
            return Err(SamplerError::config(
                "guidance_scale",
                format!("must be finite and >= 0, got {}", self.guidance_scale),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplerError::config(
                "temperature",
                format!("must be finite and >= 0, got {}", self.temperature),
            ));
        }
        self.noise_schedule.validate()
    }

    /// The effective temperature used at each step (`[S]`): `T0·Π_{k≤s+1}(1 − k/S)`, computed
    /// in f64 like upstream's python floats.
    pub fn effective_temperatures(&self) -> Vec<f64> {
        let mut t = self.temperature;
        (0..self.timesteps)
            .map(|s| {
                let ratio = (s + 1) as f64 / self.timesteps as f64;
                t *= 1.0 - ratio;
                t
            })
            .collect()
    }
}

/// The randomness of the MaskGIT sampler. Upstream draws both from one `torch.Generator`;
/// tests inject the fixture's recorded draws, [`SeededRng`] is the default.
pub trait MaskGitRandomness<B: Backend> {
    /// One codebook index per image position, drawn from `probs` `[B, N, K]` (each row sums to
    /// 1; upstream `torch.multinomial(probs, 1)`). Returns `[B, N]` row-major, values in `[0, K)`.
    fn sample_codes(&mut self, step: usize, probs: Tensor<B, 3>) -> Result<Vec<i64>, SamplerError>;

    /// Standard Gumbel noise `[B, N]` row-major (f32) for `mask_by_random_topk` at `step`
    /// (upstream `gumbel_noise(probs, generator)`; multiplied by the effective temperature by the
    /// sampler).
    fn gumbel_noise(
        &mut self,
        step: usize,
        batch: usize,
        seq_len: usize,
    ) -> Result<Vec<f32>, SamplerError>;
}

impl<B: Backend> MaskGitRandomness<B> for SeededRng {
    /// Categorical draw by the Gumbel-max trick on the device: `argmax(log p + g)`, with the
    /// uniform draws made on the host (same samples on every backend).
    fn sample_codes(
        &mut self,
        _step: usize,
        probs: Tensor<B, 3>,
    ) -> Result<Vec<i64>, SamplerError> {
        let [b, n, k] = probs.dims();
        let g: Vec<f32> = self
            .uniform_f64(b * n * k)
            .into_iter()
            .map(|u| gumbel_from_uniform_f32(u as f32))
            .collect();
        let g = Tensor::<B, 3>::from_data(TensorData::new(g, [b, n, k]), &probs.device());
        host::ints((probs.log() + g).argmax(2))
    }

    fn gumbel_noise(
        &mut self,
        _step: usize,
        batch: usize,
        seq_len: usize,
    ) -> Result<Vec<f32>, SamplerError> {
        Ok((0..batch * seq_len)
            .map(|_| gumbel_from_uniform_f32(self.next_f64() as f32))
            .collect())
    }
}

/// Inputs of [`t2i_generate`] (the t2i prompt layout of spec §2.4c).
#[derive(Debug, Clone)]
pub struct T2iInputs<B: Backend> {
    /// `[B, L]`: text block, `<soi>`, `N` image slots (mask id, or `code + V0` for known codes),
    /// `<eoi>`. The image slot is positions `[L − N − 1, L − 1)`.
    pub input_ids: Tensor<B, 2, Int>,
    /// `[B, L]`, `true` = real token; used as the pairwise mask `m_i ∧ m_j`
    /// ([`Attention::Pairwise`], upstream bool `attention_bias`). `None` = full attention.
    pub attention_mask: Option<Tensor<B, 2, Bool>>,
    /// `[B, L]`: the same layout with an empty caption, for CFG. Only its text prefix
    /// (`[0, L − N − 1)`) is used; the image part is always the current canvas.
    pub uncond_input_ids: Option<Tensor<B, 2, Int>>,
    /// `[B, L]` attention mask of the unconditional prompt (`None` = all real tokens).
    pub uncond_attention_mask: Option<Tensor<B, 2, Bool>>,
}

impl<B: Backend> T2iInputs<B> {
    /// Conditional-only inputs.
    pub fn new(input_ids: Tensor<B, 2, Int>, attention_mask: Option<Tensor<B, 2, Bool>>) -> Self {
        T2iInputs {
            input_ids,
            attention_mask,
            uncond_input_ids: None,
            uncond_attention_mask: None,
        }
    }

    /// Adds the unconditional (empty-caption) prompt for classifier-free guidance.
    pub fn with_uncond(
        mut self,
        uncond_input_ids: Tensor<B, 2, Int>,
        uncond_attention_mask: Option<Tensor<B, 2, Bool>>,
    ) -> Self {
        self.uncond_input_ids = Some(uncond_input_ids);
        self.uncond_attention_mask = uncond_attention_mask;
        self
    }
}

/// Every intermediate state of a [`t2i_generate`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct T2iTrace {
    /// `S + 1` image slots `[B, N]` row-major (absolute vocabulary ids, mask id where masked):
    /// the slot fed to the model at step `s`, then the final one (fixture `image_ids_per_step`).
    pub image_ids_per_step: Vec<Vec<i64>>,
    /// `[S][B]`: number of slots left masked after each step (`mask_len`).
    pub mask_len_per_step: Vec<Vec<usize>>,
    /// `[S]`: effective temperature used at each step.
    pub temperature_per_step: Vec<f64>,
}

/// Result of [`t2i_generate`].
#[derive(Debug, Clone)]
pub struct T2iOutput<B: Backend> {
    /// `[B, N]` codebook indices in `[0, K)` sampled at the last step (upstream return value;
    /// includes the slots still masked in `input_ids`). Decode with the VQ model.
    pub codes: Tensor<B, 2, Int>,
    /// `[B, L]` the final canvas (upstream mutates `input_ids` in place).
    pub input_ids: Tensor<B, 2, Int>,
    /// Number of denoiser evaluations (`S`; with CFG each runs a `2B` batch).
    pub nfe: usize,
    /// Per-step trace when requested.
    pub trace: Option<T2iTrace>,
}

/// MMaDA `t2i_generate` (spec §4.3): MaskGIT decoding of the `N` image slots.
///
/// Per step `s`: logits `[B, L, V]` (with CFG `(1+w)·cond − w·uncond` over a `2B` batch and the
/// pairwise mask of `[mask; uncond_mask]`) → image rows and codebook columns `[B, N, K]` →
/// `probs = softmax` (f32) → `sampled` from `rng` (known slots keep their code) → confidence
/// `log(p[sampled])` (`+f32::MAX` probability for known slots) `+ T_s·gumbel` →
/// the `mask_len = max(1, min(#unknown − 1, floor(N·γ((s+1)/S))))` least confident slots are
/// re-masked (`confidence < sorted[mask_len]`), the others committed.
pub fn t2i_generate<B, D, R>(
    model: &D,
    inputs: T2iInputs<B>,
    config: &T2iConfig,
    rng: &mut R,
    record_trace: bool,
) -> Result<T2iOutput<B>, SamplerError>
where
    B: Backend,
    D: Denoiser<B> + ?Sized,
    R: MaskGitRandomness<B> + ?Sized,
{
    t2i_generate_observed(model, inputs, config, rng, record_trace, &mut |_| {})
}

/// The image slots after one MaskGIT step of [`t2i_generate_observed`].
#[derive(Debug, Clone, Copy)]
pub struct T2iStepEvent<'a> {
    /// Step index (`0..timesteps`).
    pub step: usize,
    /// Batch size `B`.
    pub batch: usize,
    /// Image slots per row `N`.
    pub seq_len: usize,
    /// `[B, N]` row-major: the committed code of each slot (in `[0, K)`), `-1` where the slot
    /// is masked again for the next step.
    pub committed: &'a [i64],
    /// `[B, N]` row-major: the code sampled for every slot at this step (what the image would
    /// be if decoding stopped here).
    pub sampled: &'a [i64],
    /// Set it to end the generation after this step ([`SamplerError::Cancelled`]).
    pub stop: &'a std::cell::Cell<bool>,
}

/// [`t2i_generate`] with `observer` called after every step ([`T2iStepEvent`]). The result is
/// the same as [`t2i_generate`]'s.
///
/// # Errors
/// Those of [`t2i_generate`].
pub fn t2i_generate_observed<B, D, R>(
    model: &D,
    inputs: T2iInputs<B>,
    config: &T2iConfig,
    rng: &mut R,
    record_trace: bool,
    observer: &mut dyn FnMut(&T2iStepEvent<'_>),
) -> Result<T2iOutput<B>, SamplerError>
where
    B: Backend,
    D: Denoiser<B> + ?Sized,
    R: MaskGitRandomness<B> + ?Sized,
{
    config.validate()?;
    let [b, l] = inputs.input_ids.dims();
    let n = config.seq_len;
    let kcb = config.codebook_size;
    let v0 = config.image_token_offset;
    if b == 0 || l < n + 1 {
        return Err(SamplerError::Shape {
            input: "input_ids",
            got: vec![b, l],
            expected: format!("[batch >= 1, L >= seq_len + 1 = {}]", n + 1),
        });
    }
    let device = inputs.input_ids.device();
    let mask = i64::from(config.mask_id);
    let img = l - n - 1; // image slot [img, img + n)
    let mut ids = host::ints(inputs.input_ids)?;

    let read_mask = |m: Option<Tensor<B, 2, Bool>>, name: &'static str| match m {
        None => Ok(None),
        Some(m) => {
            if m.dims() != [b, l] {
                return Err(SamplerError::Shape {
                    input: name,
                    got: m.dims().to_vec(),
                    expected: format!("[{b}, {l}]"),
                });
            }
            host::bools(m).map(Some)
        }
    };
    let cond_mask = read_mask(inputs.attention_mask, "attention_mask")?;
    let uncond_mask = read_mask(inputs.uncond_attention_mask, "uncond_attention_mask")?;
    let uncond_ids = match inputs.uncond_input_ids {
        None => None,
        Some(u) => {
            if u.dims() != [b, l] {
                return Err(SamplerError::Shape {
                    input: "uncond_input_ids",
                    got: u.dims().to_vec(),
                    expected: format!("[{b}, {l}] like input_ids"),
                });
            }
            Some(host::ints(u)?)
        }
    };
    let cfg_on = config.guidance_scale > 0.0 && uncond_ids.is_some();
    let attention = if cfg_on {
        if cond_mask.is_none() && uncond_mask.is_none() {
            Attention::Full
        } else {
            let mut both = cond_mask.clone().unwrap_or_else(|| vec![true; b * l]);
            both.extend(uncond_mask.unwrap_or_else(|| vec![true; b * l]));
            Attention::Pairwise(host::bool_tensor3(
                host::pairwise(&both, 2 * b, l),
                [2 * b, l, l],
                &device,
            ))
        }
    } else {
        match &cond_mask {
            None => Attention::Full,
            Some(m) => Attention::Pairwise(host::bool_tensor3(
                host::pairwise(m, b, l),
                [b, l, l],
                &device,
            )),
        }
    };

    // known codes (mask id kept as the "unknown" marker, as upstream)
    let mut known: Vec<i64> = (0..b * n)
        .map(|i| {
            let t = ids[(i / n) * l + img + i % n];
            if t == mask { mask } else { t - v0 as i64 }
        })
        .collect();
    let image_slot =
        |ids: &[i64]| -> Vec<i64> { (0..b * n).map(|i| ids[(i / n) * l + img + i % n]).collect() };

    let mut image_ids_per_step = Vec::new();
    let mut mask_len_per_step = Vec::new();
    let mut temperature_per_step = Vec::new();
    let mut temperature = config.temperature;
    let mut sampled = vec![0i64; b * n];
    let mut nfe = 0;
    let steps = config.timesteps;

    for step in 0..steps {
        if record_trace {
            image_ids_per_step.push(image_slot(&ids));
        }
        let logits = if cfg_on {
            let un = uncond_ids.as_ref().expect("cfg_on implies uncond ids");
            let mut both = ids.clone();
            for r in 0..b {
                both.extend_from_slice(&un[r * l..r * l + img]);
                both.extend_from_slice(&ids[r * l + img..(r + 1) * l]);
            }
            let lg = model.window_logits(
                host::int_tensor(&both, 2 * b, l, &device),
                &attention,
                img,
                n,
            );
            check_logits(&lg, 2 * b, n)?;
            let lg = slice_codes(lg, v0, kcb)?;
            let cond = lg.clone().narrow(0, 0, b);
            let unc = lg.narrow(0, b, b);
            cond.mul_scalar(1.0 + config.guidance_scale) - unc.mul_scalar(config.guidance_scale)
        } else {
            let lg = model.window_logits(host::int_tensor(&ids, b, l, &device), &attention, img, n);
            check_logits(&lg, b, n)?;
            slice_codes(lg, v0, kcb)?
        };
        nfe += 1;
        let probs = softmax(logits, 2); // [B, N, K] f32

        let draw = rng.sample_codes(step, probs.clone())?;
        if draw.len() != b * n {
            return Err(SamplerError::RandomnessLength {
                source_name: "sample_codes",
                got: draw.len(),
                expected: b * n,
            });
        }
        if let Some(bad) = draw.iter().find(|&&c| c < 0 || c >= kcb as i64) {
            return Err(SamplerError::RandomnessValue {
                source_name: "sample_codes",
                reason: format!("code {bad} outside [0, {kcb})"),
            });
        }
        let unknown: Vec<bool> = known.iter().map(|&k| k == mask).collect();
        for i in 0..b * n {
            sampled[i] = if unknown[i] { draw[i] } else { known[i] };
        }
        if let Some(bad) = sampled.iter().find(|&&c| c < 0 || c >= kcb as i64) {
            return Err(SamplerError::Shape {
                input: "input_ids",
                got: vec![b, l],
                expected: format!("known image ids in [V0, V0 + K), found code {bad}"),
            });
        }

        let ratio = (step + 1) as f64 / steps as f64;
        let mask_ratio = config.noise_schedule.mask_ratio(ratio);
        // selected_probs = gather(probs, sampled); known slots get finfo(f32).max
        let sel = probs.gather(2, code_tensor::<B>(&sampled, b, n, &device));
        let sel = host::floats_f32(sel)?;
        let base_len = (n as f32 * mask_ratio).floor();
        temperature *= 1.0 - ratio;
        let t32 = temperature as f32;
        let gumbel = rng.gumbel_noise(step, b, n)?;
        if gumbel.len() != b * n {
            return Err(SamplerError::RandomnessLength {
                source_name: "gumbel_noise",
                got: gumbel.len(),
                expected: b * n,
            });
        }
        let mut lens = Vec::with_capacity(b);
        for r in 0..b {
            let row = r * n..(r + 1) * n;
            let n_unknown = unknown[row.clone()].iter().filter(|&&u| u).count() as f32;
            let mask_len = (n_unknown - 1.0).min(base_len).max(1.0) as usize;
            // mask_by_random_topk: confidence = log(clamp(p, 1e-20)) + T·g  (f32)
            let conf: Vec<f32> = row
                .clone()
                .map(|i| {
                    let p = if unknown[i] { sel[i] } else { f32::MAX };
                    p.max(1e-20).ln() + t32 * gumbel[i]
                })
                .collect();
            let mut sorted = conf.clone();
            sorted.sort_by(f32::total_cmp);
            let cut = sorted[mask_len.min(n - 1)];
            for (j, i) in row.enumerate() {
                let pos = r * l + img + j;
                if conf[j] < cut {
                    ids[pos] = mask;
                    known[i] = mask;
                } else {
                    ids[pos] = sampled[i] + v0 as i64;
                    known[i] = sampled[i];
                }
            }
            lens.push(mask_len);
        }
        mask_len_per_step.push(lens);
        temperature_per_step.push(temperature);
        let committed: Vec<i64> = known
            .iter()
            .map(|&k| if k == mask { -1 } else { k })
            .collect();
        let stop = std::cell::Cell::new(false);
        observer(&T2iStepEvent {
            step,
            batch: b,
            seq_len: n,
            committed: &committed,
            sampled: &sampled,
            stop: &stop,
        });
        if stop.get() {
            return Err(SamplerError::Cancelled { step });
        }
    }
    if record_trace {
        image_ids_per_step.push(image_slot(&ids));
    }
    Ok(T2iOutput {
        codes: host::int_tensor(&sampled, b, n, &device),
        input_ids: host::int_tensor(&ids, b, l, &device),
        nfe,
        trace: record_trace.then_some(T2iTrace {
            image_ids_per_step,
            mask_len_per_step,
            temperature_per_step,
        }),
    })
}

/// Window logits `[B', n, V]` → the code columns `[v0, v0 + k)`: `[B', n, k]`.
fn slice_codes<B: Backend>(
    logits: Tensor<B, 3>,
    v0: usize,
    k: usize,
) -> Result<Tensor<B, 3>, SamplerError> {
    let vocab = logits.dims()[2];
    if v0 + k > vocab {
        return Err(SamplerError::config(
            "image_token_offset",
            format!(
                "image codes [{v0}, {}) exceed the logits width {vocab}",
                v0 + k
            ),
        ));
    }
    Ok(logits.narrow(2, v0, k))
}

fn code_tensor<B: Backend>(
    codes: &[i64],
    b: usize,
    n: usize,
    device: &B::Device,
) -> Tensor<B, 3, Int> {
    Tensor::from_data(TensorData::new(codes.to_vec(), [b, n, 1]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> T2iConfig {
        T2iConfig {
            timesteps: 8,
            guidance_scale: 0.0,
            temperature: 1.0,
            noise_schedule: MaskSchedule::Cosine,
            seq_len: 16,
            codebook_size: 64,
            image_token_offset: 320,
            mask_id: 300,
        }
    }

    #[test]
    fn effective_temperature_compounds() {
        let t = cfg().effective_temperatures();
        let want = [
            0.875,
            0.65625,
            0.41015625,
            0.205078125,
            0.076904296875,
            0.01922607421875,
            0.00240325927734375,
            0.0,
        ];
        assert_eq!(t.len(), want.len());
        for (a, b) in t.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{a} vs {b}");
        }
    }

    #[test]
    fn validate_names_the_field() {
        let mut c = cfg();
        c.validate().unwrap();
        c.timesteps = 0;
        assert!(matches!(
            c.validate(),
            Err(SamplerError::InvalidConfig {
                field: "timesteps",
                ..
            })
        ));
        c.timesteps = 4;
        c.seq_len = 1;
        assert!(matches!(
            c.validate(),
            Err(SamplerError::InvalidConfig {
                field: "seq_len",
                ..
            })
        ));
        c.seq_len = 16;
        c.guidance_scale = -1.0;
        assert!(matches!(
            c.validate(),
            Err(SamplerError::InvalidConfig {
                field: "guidance_scale",
                ..
            })
        ));
        c.guidance_scale = 3.5;
        c.noise_schedule = MaskSchedule::Pow(-1.0);
        assert!(matches!(
            c.validate(),
            Err(SamplerError::InvalidConfig {
                field: "noise_schedule",
                ..
            })
        ));
    }

    #[test]
    fn config_from_recipe_json() {
        let c: T2iConfig = serde_json::from_str(
            r#"{"timesteps": 15, "guidance_scale": 3.5, "seq_len": 1024, "codebook_size": 8192,
                "image_token_offset": 126349, "mask_id": 126336}"#,
        )
        .unwrap();
        assert_eq!(c.temperature, 1.0);
        assert_eq!(c.noise_schedule, MaskSchedule::Cosine);
        let mut l = T2iConfig::from_layout(&TokenLayout::mmada(), 1024);
        l.timesteps = 15;
        l.guidance_scale = 3.5;
        assert_eq!(l, c);
        assert!(serde_json::from_str::<T2iConfig>(
            r#"{"seq_len": 4, "codebook_size": 8, "image_token_offset": 1, "mask_id": 0, "resolution": 512}"#
        )
        .is_err());
    }
}
