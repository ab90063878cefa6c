//! Tensor maps for the Hopper kernels' TMA loads (`cp.async.bulk.tensor`): a map describes a
//! bf16 tensor in device memory and the box one load copies into shared memory, with the
//! 128-byte swizzle the kernels' wgmma descriptors expect (rows of 64 bf16), or row-major without
//! swizzle ([`plain_map`]). A map is passed to
//! the kernel by value as a `const __grid_constant__ CUtensorMap` parameter.

use crate::error::{Error, Result};
use cudarc::driver::sys;

/// Columns (bf16) of every box: one 128-byte swizzled row.
pub(crate) const BOX_COLS: usize = 64;

/// A CUDA tensor map (128 opaque bytes).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(crate) struct TensorMap(sys::CUtensorMap);

// SAFETY: CUtensorMap is plain data that the kernel reads as its parameter of the same C type.
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

/// The map of the bf16 tensor at `ptr` with `dims` (innermost first, in elements; dim 0 is
/// contiguous), `strides` (bytes, of dims 1..) and boxes of `BOX_COLS` x `box_rows` (x 1 for
/// the dims above 1), 128-byte swizzled. Positions outside `dims` read as zeros. The caller
/// checked that the allocation holds every addressed element and that `ptr` and `strides` are
/// multiples of 16.
pub(crate) fn tensor_map<const R: usize>(
    ptr: u64,
    dims: [usize; R],
    strides: &[usize],
    box_rows: usize,
    what: &str,
) -> Result<TensorMap> {
    encode(ptr, dims, strides, (BOX_COLS, box_rows), true, what)
}

/// [`tensor_map`] with boxes of `box_cols` x `box_rows` written row-major, without swizzle (the
/// decode kernel reads its rows with plain loads).
pub(crate) fn plain_map<const R: usize>(
    ptr: u64,
    dims: [usize; R],
    strides: &[usize],
    box_cols: usize,
    box_rows: usize,
    what: &str,
) -> Result<TensorMap> {
    encode(ptr, dims, strides, (box_cols, box_rows), false, what)
}

fn encode<const R: usize>(
    ptr: u64,
    dims: [usize; R],
    strides: &[usize],
    (box_cols, box_rows): (usize, usize),
    swizzle: bool,
    what: &str,
) -> Result<TensorMap> {
    assert!(R >= 2 && strides.len() == R - 1);
    let dims64: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    let strides64: Vec<u64> = strides.iter().map(|&s| s as u64).collect();
    let mut boxes = vec![1u32; R];
    boxes[0] = box_cols as u32;
    boxes[1] = box_rows as u32;
    let elem = vec![1u32; R];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every array has the rank's length (strides one less), the address is a live device
    // allocation (see above), and the map is written before it is read.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            R as u32,
            ptr as *mut std::ffi::c_void,
            dims64.as_ptr(),
            strides64.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            if swizzle {
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B
            } else {
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE
            },
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error(format!(
            "{what}: cannot describe a {dims:?} bf16 tensor for TMA: {r:?}"
        )));
    }
    // SAFETY: cuTensorMapEncodeTiled succeeded, so it wrote the map.
    Ok(TensorMap(unsafe { map.assume_init() }))
}

/// The map of a row-major `[rows, cols]` bf16 matrix, boxes of 64 columns x `box_rows` rows.
pub(crate) fn matrix_map(
    ptr: u64,
    rows: usize,
    cols: usize,
    box_rows: usize,
    what: &str,
) -> Result<TensorMap> {
    tensor_map(ptr, [cols, rows], &[cols * 2], box_rows, what)
}

/// The map of `e` stacked row-major `[rows, cols]` bf16 matrices (`[e, rows, cols]`), boxes of 64
/// columns x `box_rows` rows of one matrix: rows past `rows` read as zeros, not as the next
/// matrix's first rows.
pub(crate) fn stacked_map(
    ptr: u64,
    e: usize,
    rows: usize,
    cols: usize,
    box_rows: usize,
    what: &str,
) -> Result<TensorMap> {
    tensor_map(
        ptr,
        [cols, rows, e],
        &[cols * 2, rows * cols * 2],
        box_rows,
        what,
    )
}
