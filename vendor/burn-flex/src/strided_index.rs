use crate::layout::Layout;
use alloc::vec;
use alloc::vec::Vec;

/// Iterator that yields linear indices for strided tensor access.
///
/// Handles non-contiguous tensors (including those with negative strides from flip)
/// by computing the correct storage index for each logical element position.
///
/// mmada-rs patch (vendor/PATCHED.md): the shape and strides are copied out of the layout
/// once, and stepping inside the innermost dimension is one add and one compare; the
/// odometer over the outer dimensions runs once per innermost row. Upstream re-read the
/// shape (a non-inlined `num_dims` call) and walked the odometer loop for every element,
/// which made this iterator a third of a small training step's time. Same indices, same
/// order.
pub struct StridedIter<'a> {
    /// Current storage index (signed to handle negative strides)
    storage_index: isize,
    /// Position in each outer dimension (all but the innermost).
    multi_index: Vec<usize>,
    /// Outer dimensions' sizes and strides.
    outer_shape: Vec<usize>,
    outer_strides: Vec<isize>,
    /// Innermost dimension: size, stride and position.
    inner_len: usize,
    inner_stride: isize,
    inner_pos: usize,
    remaining: usize,
    _layout: core::marker::PhantomData<&'a Layout>,
}

impl<'a> StridedIter<'a> {
    /// Create a new strided iterator for the given layout.
    pub fn new(layout: &'a Layout) -> Self {
        let ndims = layout.num_dims();
        let shape = layout.shape();
        let strides = layout.strides();
        let (inner_len, inner_stride) = if ndims == 0 {
            (1, 0)
        } else {
            (shape[ndims - 1], strides[ndims - 1])
        };
        let outer = ndims.saturating_sub(1);
        Self {
            storage_index: layout.start_offset() as isize,
            multi_index: vec![0; outer],
            outer_shape: (0..outer).map(|d| shape[d]).collect(),
            outer_strides: strides[..outer].to_vec(),
            inner_len,
            inner_stride,
            inner_pos: 0,
            remaining: layout.num_elements(),
            _layout: core::marker::PhantomData,
        }
    }

    /// Carry into the outer dimensions after an innermost row (odometer, last outer
    /// dimension first).
    #[cold]
    #[inline(never)]
    fn next_row(&mut self) {
        self.inner_pos = 0;
        self.storage_index -= (self.inner_len as isize - 1) * self.inner_stride;
        for d in (0..self.outer_shape.len()).rev() {
            self.multi_index[d] += 1;
            if self.multi_index[d] < self.outer_shape[d] {
                self.storage_index += self.outer_strides[d];
                return;
            }
            // Wrap around this dimension
            self.multi_index[d] = 0;
            self.storage_index -= (self.outer_shape[d] as isize - 1) * self.outer_strides[d];
        }
    }
}

impl Iterator for StridedIter<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }

        debug_assert!(
            self.storage_index >= 0,
            "StridedIter: negative storage index"
        );
        let idx = self.storage_index as usize;
        self.remaining -= 1;

        self.inner_pos += 1;
        if self.inner_pos < self.inner_len {
            self.storage_index += self.inner_stride;
        } else {
            self.next_row();
        }

        Some(idx)
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for StridedIter<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_std::Shape;

    #[test]
    fn test_contiguous_iteration() {
        let layout = Layout::contiguous(Shape::from(vec![2, 3]));
        let indices: Vec<_> = StridedIter::new(&layout).collect();
        assert_eq!(indices, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn test_transposed_iteration() {
        // Original: [[0, 1, 2], [3, 4, 5]] (shape [2, 3], strides [3, 1])
        // Transposed: [[0, 3], [1, 4], [2, 5]] (shape [3, 2], strides [1, 3])
        let layout = Layout::contiguous(Shape::from(vec![2, 3])).transpose(0, 1);
        let indices: Vec<_> = StridedIter::new(&layout).collect();
        assert_eq!(indices, vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn test_narrowed_iteration() {
        // Original: [[0, 1, 2, 3], [4, 5, 6, 7]] (shape [2, 4])
        // Narrowed dim=1, start=1, len=2: [[1, 2], [5, 6]]
        let layout = Layout::contiguous(Shape::from(vec![2, 4])).narrow(1, 1, 2);
        let indices: Vec<_> = StridedIter::new(&layout).collect();
        assert_eq!(indices, vec![1, 2, 5, 6]);
    }

    /// mmada-rs patch: the row-wise iterator yields exactly the indices of the per-element
    /// odometer on permuted, flipped, narrowed and broadcast layouts.
    #[test]
    fn matches_the_odometer_on_strided_layouts() {
        let base = Layout::contiguous(Shape::from(vec![2, 3, 4, 5]));
        let bcast = Layout::new(Shape::from(vec![3, 4, 5]), vec![0, 5, 1], 7);
        let layouts = [
            base.clone(),
            base.permute(&[0, 2, 1, 3]),
            base.permute(&[3, 1, 0, 2]),
            base.flip(&[1, 3]),
            base.narrow(2, 1, 2).permute(&[1, 0, 3, 2]),
            bcast,
            Layout::contiguous(Shape::from(vec![7])).flip(&[0]),
            Layout::contiguous(Shape::from(Vec::<usize>::new())),
        ];
        for l in &layouts {
            let shape: Vec<usize> = (0..l.num_dims()).map(|d| l.shape()[d]).collect();
            let mut want = vec![];
            let n: usize = shape.iter().product();
            for mut k in 0..n {
                let mut idx = l.start_offset() as isize;
                for d in (0..shape.len()).rev() {
                    idx += (k % shape[d]) as isize * l.strides()[d];
                    k /= shape[d];
                }
                want.push(idx as usize);
            }
            let got: Vec<_> = StridedIter::new(l).collect();
            assert_eq!(got, want, "{shape:?} {:?}", l.strides());
        }
    }
}
