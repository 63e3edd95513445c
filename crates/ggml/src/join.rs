//! Concatenation along the outermost dimension, as one copy on the CPU.
//!
//! Why this exists: a batch of several sequences attends sequence by sequence, and the
//! per-sequence results are put back together along the token dimension. A chain of
//! ggml's `concat` copies the growing front again for every part (quadratic in the
//! number of sequences), one element at a time; it was 3-6% of the demo model's time
//! with a few cameras batched. Parts that are contiguous and stacked along their
//! outermost used dimension are just their bytes back to back, which this op copies
//! once, with the pool's threads splitting the bytes.
use crate::error::shape;
use crate::{Context, Result, Tensor, sys};

/// Most parts one node takes (a custom op's limit); more are joined in groups.
const MAX_PARTS: usize = crate::context::MAX_CUSTOM_ARGS;

impl Context {
    /// The parts concatenated along `dim`, where every part is contiguous, of one type,
    /// equal in the dimensions below `dim` and 1 in those above. Only for graphs that
    /// run on the CPU (our own op); one part is returned as it is.
    pub fn join_cpu<'s>(&'s self, parts: &[Tensor<'s>], dim: usize) -> Result<Tensor<'s>> {
        let first = *parts.first().ok_or_else(|| shape("join_cpu", "no parts"))?;
        let fits = |t: &Tensor<'_>| {
            t.ty() == first.ty()
                && t.is_contiguous()
                && (0..4).all(|d| {
                    if d < dim {
                        t.ne()[d] == first.ne()[d]
                    } else {
                        d == dim || t.ne()[d] == 1
                    }
                })
        };
        if dim > 3 || !parts.iter().all(fits) {
            let shapes: Vec<_> = parts.iter().map(|t| t.shape()).collect();
            return Err(shape("join_cpu", format!("{shapes:?} along {dim}")));
        }
        if parts.len() == 1 {
            return Ok(first);
        }
        let groups: Vec<Tensor<'s>> = parts
            .chunks(MAX_PARTS)
            .map(|group| self.join_group(group, dim))
            .collect::<Result<_>>()?;
        if groups.len() == 1 {
            Ok(groups[0])
        } else {
            self.join_cpu(&groups, dim)
        }
    }

    fn join_group<'s>(&'s self, parts: &[Tensor<'s>], dim: usize) -> Result<Tensor<'s>> {
        if parts.len() == 1 {
            return Ok(parts[0]);
        }
        let mut ne = parts[0].ne();
        ne[dim] = parts.iter().map(|t| t.ne()[dim]).sum();
        self.custom(parts[0].ty(), ne, parts, copy_parts, 0)
    }
}

/// The custom op: thread `ith` of `nth` copies its share of the result's bytes from
/// the sources that hold them.
unsafe extern "C" fn copy_parts(
    dst: *mut sys::ggml_tensor,
    ith: i32,
    nth: i32,
    _: *mut std::ffi::c_void,
) {
    // SAFETY: ggml hands us the node `join_group` made: its sources are contiguous, of
    // its type, and their sizes add up to its own; each thread writes a disjoint range.
    unsafe {
        let total = sys::ggml_nbytes(dst);
        let (lo, hi) = (
            total * ith as usize / nth as usize,
            total * (ith as usize + 1) / nth as usize,
        );
        let out = (*dst).data as *mut u8;
        let mut start = 0;
        for &src in (*dst).src.iter().take_while(|s| !s.is_null()) {
            let len = sys::ggml_nbytes(src);
            let (from, to) = (lo.max(start), hi.min(start + len));
            if from < to {
                std::ptr::copy_nonoverlapping(
                    ((*src).data as *const u8).add(from - start),
                    out.add(from),
                    to - from,
                );
            }
            start += len;
        }
    }
}
