//! mmada-rs patch (vendor/PATCHED.md item 10): element-wise loops over large contiguous
//! buffers split over the rayon pool. Upstream ran every binary, scalar and unary f32 op on
//! one thread; the update of 33 M parameters (AdamW: about ten element-wise ops each) and the
//! `[rows, vocab]` passes of the LM head are memory-bound loops that two cores run faster.
//! Each element is computed by the same code as before, so results are bit-identical.

/// Below this many elements a loop stays on the calling thread.
pub(crate) const PAR_MIN: usize = 1 << 17;
/// Elements per rayon task.
pub(crate) const PAR_CHUNK: usize = 1 << 15;

/// `f(l, r)` over matching pieces of `l` and `r` (same length), in parallel when large.
#[inline]
pub(crate) fn zip_mut<E: Send, R: Sync>(l: &mut [E], r: &[R], f: impl Fn(&mut [E], &[R]) + Sync) {
    #[cfg(feature = "rayon")]
    if l.len() >= PAR_MIN {
        use rayon::prelude::*;
        l.par_chunks_mut(PAR_CHUNK)
            .zip(r.par_chunks(PAR_CHUNK))
            .for_each(|(a, b)| f(a, b));
        return;
    }
    f(l, r)
}

/// `f(l)` over pieces of `l`, in parallel when large.
#[inline]
pub(crate) fn each_mut<E: Send>(l: &mut [E], f: impl Fn(&mut [E]) + Sync) {
    each_mut_from(l, PAR_MIN, f)
}

/// [`each_mut`] with its own threshold: in parallel from `min` elements (a compute-bound
/// loop such as `exp` pays off on smaller buffers than a memory-bound one).
#[inline]
pub(crate) fn each_mut_from<E: Send>(l: &mut [E], min: usize, f: impl Fn(&mut [E]) + Sync) {
    #[cfg(feature = "rayon")]
    if l.len() >= min {
        use rayon::prelude::*;
        l.par_chunks_mut(PAR_CHUNK).for_each(&f);
        return;
    }
    let _ = min;
    f(l)
}
