//! mmada-rs patch (vendor/PATCHED.md item 9): a vectorisable f32 `exp` for `float_exp`, the
//! fused softmax and the fused log-softmax.
//!
//! Upstream calls libm's scalar `expf` once per element, single-threaded in `float_exp`: on the
//! 2-core AVX-512 machine of mmada-rs issue 18 an `exp` over a `[256, 58560]` head chunk took
//! 40 ms against PyTorch's 24–30 ms. This is the Cephes `expf` (range reduction by `ln 2` in two
//! parts, with n rounded to nearest rather than by `floor(x + 0.5)`, a degree-5 polynomial, within 2 ulp of the correctly rounded result over the normal
//! range) written without branches, so LLVM vectorises it inside functions compiled for AVX2 or
//! AVX-512 (chosen at run time). `2^n` is applied as two halves, so results in the subnormal
//! range and up to `f32::MAX` come out right; `exp(−∞) = 0`, `exp(+∞) = +∞`, `exp(NaN) = NaN`.
//! Tested from the mmada-rs workspace (`tests/flex_activation.rs`: every f32 in steps over
//! [−104, 89] against f64 `exp`, the edges, softmax / log-softmax and their gradients).

/// `e^x`, branch-free (see the module docs).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // beyond these the result is 0 or +∞ anyway; keeps n within ±150
    let x = if x < -104.0 { -104.0 } else { x };
    let x = if x > 89.0 { 89.0 } else { x };
    // n = round(x · log2 e) by the 1.5 · 2^23 trick: the integer lands in the low mantissa
    // bits (no float-to-int conversion, which LLVM would not vectorise with Rust's saturating
    // `as`); |x · log2 e| ≤ 151 here. A NaN gives a meaningless n, and NaN anyway.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * LOG2E + MAGIC;
    let fx = t - MAGIC;
    let r = x - fx * LN2_HI - fx * LN2_LO;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * z + r + 1.0;
    let n = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let n1 = n >> 1;
    let n2 = n.wrapping_sub(n1);
    let s1 = f32::from_bits((n1.wrapping_add(127) as u32) << 23);
    let s2 = f32::from_bits((n2.wrapping_add(127) as u32) << 23);
    y * s1 * s2
}

#[inline(always)]
fn exp_in_place_body(buf: &mut [f32]) {
    for v in buf.iter_mut() {
        *v = exp_f32(*v);
    }
}

#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[target_feature(enable = "avx512f")]
unsafe fn exp_in_place_avx512(buf: &mut [f32]) {
    exp_in_place_body(buf)
}

#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_in_place_avx2(buf: &mut [f32]) {
    exp_in_place_body(buf)
}

/// `buf[i] = e^buf[i]` (the same values as [`exp_f32`], vectorised where the CPU allows).
pub fn exp_in_place(buf: &mut [f32]) {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above)
            return unsafe { exp_in_place_avx512(buf) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above)
            return unsafe { exp_in_place_avx2(buf) };
        }
    }
    exp_in_place_body(buf)
}

/// `Σ buf` with 16 running partial sums (vectorisable; the rounding differs from a
/// sequential sum by a few ulp, and is no less accurate).
#[inline]
pub fn sum_f32(buf: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = buf.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..16 {
            acc[j] += c[j];
        }
    }
    let mut s = 0f32;
    for a in acc {
        s += a;
    }
    for &t in tail {
        s += t;
    }
    s
}

/// [`exp_in_place`] over the element-wise loops' pieces in parallel (with the `rayon`
/// feature) once `buf` is longer than one piece.
pub fn exp_in_place_par(buf: &mut [f32]) {
    use crate::ops::par::{PAR_CHUNK, each_mut_from};
    each_mut_from(buf, PAR_CHUNK + 1, exp_in_place)
}
