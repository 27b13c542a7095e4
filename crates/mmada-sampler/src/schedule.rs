//! Step schedules: the LLaDA transfer schedule and the MaskGIT mask-ratio schedules.

use serde::{Deserialize, Serialize};

use crate::SamplerError;

/// How many tokens to unmask at each of `steps` steps when `n_masked` positions are masked:
/// `base = n / steps`, `rem = n % steps`, step `j` transfers `base + (j < rem)` (the remainder
/// goes to the first steps). Example: 7 tokens over 5 steps → `[2, 2, 1, 1, 1]`.
///
/// Upstream: ML-GSAI/LLaDA `generate.py::get_num_transfer_tokens` (one row of its
/// `[batch, steps]` output). `steps == 0` returns an empty schedule.
pub fn get_num_transfer_tokens(n_masked: usize, steps: usize) -> Vec<usize> {
    if steps == 0 {
        return Vec::new();
    }
    let base = n_masked / steps;
    let rem = n_masked % steps;
    (0..steps).map(|j| base + usize::from(j < rem)).collect()
}

/// The MaskGIT mask-ratio schedule `γ(r)`: the fraction of image tokens that stay masked after
/// the step at progress `r = (s + 1) / S`.
///
/// Upstream: Gen-Verse/MMaDA `models/sampling.py` (`cosine_schedule`, `linear_schedule`, `pow`,
/// `sigmoid_schedule`, selected by `get_mask_schedule`). All are evaluated in **float32**, like
/// upstream (which calls them on `torch.tensor(ratio)`), because `floor(N · γ(r))` is sensitive to
/// the last bit (e.g. `γ(2/3) = cos(π/3)` is `0.49999997` in f32, so `16 · γ` floors to 7).
///
/// Serde form: `"cosine"`, `"linear"`, `{"pow": 2.0}`,
/// `{"sigmoid": {"start": -3, "end": 3, "tau": 1, "clip_min": 1e-6}}`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MaskSchedule {
    /// `cos(r·π/2)` (upstream `cosine_schedule`, the default).
    #[default]
    Cosine,
    /// `clamp(1 − r, 1e-6, 1)` (upstream `linear_schedule`).
    Linear,
    /// `clamp(1 − r^k, 1e-6, 1)` (upstream `pow`, schedule name `powK`).
    Pow(f64),
    /// `clamp((σ(end/τ) − σ((r(end−start)+start)/τ)) / (σ(end/τ) − σ(start/τ)), clip_min, 1)`
    /// (upstream `sigmoid_schedule`).
    Sigmoid {
        /// `start` (upstream default −3).
        start: f64,
        /// `end` (upstream default 3).
        end: f64,
        /// `tau` (upstream default 1).
        tau: f64,
        /// `clip_min` (upstream default 1e-6).
        clip_min: f64,
    },
}

impl MaskSchedule {
    /// `γ(ratio)` in f32, `ratio ∈ [0, 1]` (rounded to f32 first, as `torch.tensor(ratio)`).
    pub fn mask_ratio(&self, ratio: f64) -> f32 {
        let t = ratio as f32;
        match *self {
            // torch: t * math.pi * 0.5, the python scalar cast to f32 in the kernel
            MaskSchedule::Cosine => (t * std::f32::consts::PI * 0.5f32).cos(),
            MaskSchedule::Linear => (1.0f32 - t).clamp(1e-6, 1.0),
            MaskSchedule::Pow(k) => (1.0f32 - t.powf(k as f32)).clamp(1e-6, 1.0),
            MaskSchedule::Sigmoid {
                start,
                end,
                tau,
                clip_min,
            } => {
                let sig = |x: f32| 1.0f32 / (1.0f32 + (-x).exp());
                let v_start = sig((start / tau) as f32);
                let v_end = sig((end / tau) as f32);
                let out = sig((t * (end - start) as f32 + start as f32) / tau as f32);
                ((v_end - out) / (v_end - v_start)).clamp(clip_min as f32, 1.0)
            }
        }
    }

    pub(crate) fn validate(&self) -> Result<(), SamplerError> {
        match *self {
            MaskSchedule::Pow(k) if !(k.is_finite() && k > 0.0) => Err(SamplerError::config(
                "noise_schedule",
                format!("pow exponent must be finite and > 0, got {k}"),
            )),
            MaskSchedule::Sigmoid {
                start, end, tau, ..
            } if !(tau.is_finite() && tau != 0.0 && start.is_finite() && end.is_finite())
                || start == end =>
            {
                Err(SamplerError::config(
                    "noise_schedule",
                    "sigmoid needs finite start != end and a finite non-zero tau",
                ))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_tokens_front_loads_the_remainder() {
        assert_eq!(get_num_transfer_tokens(7, 5), vec![2, 2, 1, 1, 1]);
        assert_eq!(get_num_transfer_tokens(12, 3), vec![4, 4, 4]);
        assert_eq!(get_num_transfer_tokens(3, 5), vec![1, 1, 1, 0, 0]);
        assert_eq!(get_num_transfer_tokens(0, 4), vec![0, 0, 0, 0]);
        assert_eq!(get_num_transfer_tokens(5, 0), Vec::<usize>::new());
        for n in 0..40 {
            for s in 1..12 {
                let v = get_num_transfer_tokens(n, s);
                assert_eq!(v.len(), s);
                assert_eq!(v.iter().sum::<usize>(), n, "n={n} s={s}");
                assert!(v.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1));
            }
        }
    }

    #[test]
    fn cosine_is_float32_like_torch() {
        let c = MaskSchedule::Cosine;
        assert_eq!(c.mask_ratio(0.0), 1.0);
        // cos(pi/2) in f32 is slightly negative: floor(16·γ) = -1, upstream then clamps to 1.
        assert!(c.mask_ratio(1.0) < 0.0 && c.mask_ratio(1.0) > -1e-6);
        // cos(pi/3) rounds below 0.5 in f32 → 16·γ floors to 7, not 8.
        let g = c.mask_ratio(4.0 / 6.0);
        assert!(g < 0.5, "{g}");
        assert_eq!((16.0f32 * g).floor(), 7.0);
        assert!((c.mask_ratio(0.5) - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
    }

    #[test]
    fn other_schedules() {
        assert!((MaskSchedule::Linear.mask_ratio(0.25) - 0.75).abs() < 1e-7);
        assert_eq!(MaskSchedule::Linear.mask_ratio(1.0), 1e-6);
        assert!((MaskSchedule::Pow(2.0).mask_ratio(0.5) - 0.75).abs() < 1e-7);
        let s = MaskSchedule::Sigmoid {
            start: -3.0,
            end: 3.0,
            tau: 1.0,
            clip_min: 1e-6,
        };
        assert!((s.mask_ratio(0.0) - 1.0).abs() < 1e-6);
        assert!((s.mask_ratio(0.5) - 0.5).abs() < 1e-6);
        assert_eq!(s.mask_ratio(1.0), 1e-6);
        assert!(MaskSchedule::Pow(0.0).validate().is_err());
    }

    #[test]
    fn schedule_serde_forms() {
        let p: MaskSchedule = serde_json::from_str("\"cosine\"").unwrap();
        assert_eq!(p, MaskSchedule::Cosine);
        let p: MaskSchedule = serde_json::from_str("{\"pow\": 3.0}").unwrap();
        assert_eq!(p, MaskSchedule::Pow(3.0));
        assert!(serde_json::from_str::<MaskSchedule>("\"cosinus\"").is_err());
    }
}
