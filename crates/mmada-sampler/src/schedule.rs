//! Step schedules: the LLaDA transfer schedule; the MaskGIT mask-ratio schedules live in
//! `mmada-diffusion` (one type for training and sampling) and are re-exported here.

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

pub use mmada_diffusion::schedule::MaskSchedule;

/// Sampler-side validation of a [`MaskSchedule`] (its parameter errors as
/// [`SamplerError::InvalidConfig`] on `noise_schedule`).
pub(crate) trait ValidateSchedule {
    fn validate(&self) -> Result<(), SamplerError>;
}

impl ValidateSchedule for MaskSchedule {
    fn validate(&self) -> Result<(), SamplerError> {
        self.check()
            .map_err(|e| SamplerError::config("noise_schedule", e.to_string()))
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
}
