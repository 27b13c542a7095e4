//! f32 matmul through the system OpenBLAS (`cblas_sgemm`), feature `openblas` (mmada-rs patch,
//! see vendor/PATCHED.md). Used for the large 2-D and per-matrix calls that `gemm` would run
//! multi-threaded; `gemm` stays the fallback for layouts CBLAS cannot express (no unit stride
//! in either dimension, negative strides) and for the small per-batch calls made from rayon
//! workers (OpenBLAS threads inside rayon threads would oversubscribe the cores).
//! Threads: `OPENBLAS_NUM_THREADS` (default: every core).

use core::ffi::c_int;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

#[link(name = "openblas")]
unsafe extern "C" {
    fn cblas_sgemm(
        order: c_int,
        trans_a: c_int,
        trans_b: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    );
}

/// The CBLAS transpose flag and leading dimension of a `rows × cols` operand whose element
/// `(i, j)` is at `i·rs + j·cs`, when CBLAS can read it in place.
fn operand(rows: usize, cols: usize, rs: isize, cs: isize) -> Option<(c_int, c_int)> {
    // row-major: (i, j) at i·ld + j
    if cs == 1 || cols == 1 {
        let ld = if rows == 1 { cols as isize } else { rs };
        if ld >= cols as isize {
            return Some((NO_TRANS, c_int::try_from(ld).ok()?));
        }
    }
    // column-major (the transpose of a row-major matrix): (i, j) at i + j·ld
    if rs == 1 || rows == 1 {
        let ld = if cols == 1 { rows as isize } else { cs };
        if ld >= rows as isize {
            return Some((TRANS, c_int::try_from(ld).ok()?));
        }
    }
    None
}

/// `out = lhs · rhs` for `[m, k] · [k, n]` with the given element strides, `out` row-major
/// with row stride `out_rs`. Returns `false` (nothing written) when CBLAS cannot take the
/// layout; the caller then runs `gemm`.
///
/// # Safety
/// The pointers must address the whole operands and output as the strides describe.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    out: *mut f32,
    out_cs: isize,
    out_rs: isize,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
) -> bool {
    let dims = (c_int::try_from(m), c_int::try_from(n), c_int::try_from(k));
    let (Ok(mi), Ok(ni), Ok(ki)) = dims else {
        return false;
    };
    if m == 0 || n == 0 || k == 0 || out_cs != 1 || out_rs < n as isize {
        return false;
    }
    let Ok(ldc) = c_int::try_from(out_rs) else {
        return false;
    };
    let (Some((ta, lda)), Some((tb, ldb))) = (
        operand(m, k, lhs_rs, lhs_cs),
        operand(k, n, rhs_rs, rhs_cs),
    ) else {
        return false;
    };
    unsafe {
        cblas_sgemm(
            ROW_MAJOR, ta, tb, mi, ni, ki, 1.0, lhs, lda, rhs, ldb, 0.0, out, ldc,
        );
    }
    true
}
