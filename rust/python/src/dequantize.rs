//! `dequantize_fp8_blocks`: the CPU per-block FP8 dequantization kernel over Python buffers.

use normalize_core::dequantize::{
    dequantize_blocks, Fp8Input, ScaleFloat, TargetFloat, TileLayout,
};
use normalize_core::dtype::Dtype;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::OrRaise;
use crate::kinds;

/// How scales of `dtype` are stored, for the dtypes the kernel reads.
fn scale_float(dtype: kinds::Dtype) -> PyResult<ScaleFloat> {
    match dtype.0 {
        Dtype::F32 => Ok(ScaleFloat::F32),
        Dtype::BF16 => Ok(ScaleFloat::BF16),
        Dtype::F16 => Ok(ScaleFloat::F16),
        Dtype::F8_E8M0 => Ok(ScaleFloat::E8M0),
        other => Err(PyValueError::new_err(format!(
            "cannot read scales of dtype {other}; expected F32, BF16, F16 or F8_E8M0"
        ))),
    }
}

/// The output type for `dtype`, for the dtypes the kernel writes.
fn target_float(dtype: kinds::Dtype) -> PyResult<TargetFloat> {
    match dtype.0 {
        Dtype::BF16 => Ok(TargetFloat::BF16),
        Dtype::F16 => Ok(TargetFloat::F16),
        Dtype::F32 => Ok(TargetFloat::F32),
        other => Err(PyValueError::new_err(format!(
            "cannot dequantize to dtype {other}; expected BF16, F16 or F32"
        ))),
    }
}

/// Dequantizes `fp8` (one float8_e4m3fn byte per element, laid out as `batch` matrices of `rows ×
/// cols`) with `scales` (`[batch, ceil(rows/block_rows), ceil(cols/block_cols)]` scales of
/// `scale_dtype`, a `Dtype`: F32, BF16, F16 or F8_E8M0) into `out` (little-endian `out_dtype`
/// elements: BF16, F16 or F32): `y = out_dtype(f32(q) *
/// f32(s))`, rounding to nearest even. Uses up to `threads` threads with the GIL released.
/// Raises NormalizeError naming `tensor` when a result is NaN or infinite.
#[pyfunction]
#[pyo3(signature = (tensor, fp8, scales, scale_dtype, batch, rows, cols, out, out_dtype, block_rows = 128, block_cols = 128, threads = 1))]
#[allow(clippy::too_many_arguments)]
pub fn dequantize_fp8_blocks(
    py: Python<'_>,
    tensor: &str,
    fp8: PyBuffer<u8>,
    scales: PyBuffer<u8>,
    scale_dtype: kinds::Dtype,
    batch: usize,
    rows: usize,
    cols: usize,
    out: PyBuffer<u8>,
    out_dtype: kinds::Dtype,
    block_rows: usize,
    block_cols: usize,
    threads: usize,
) -> PyResult<()> {
    let (scale, target) = (scale_float(scale_dtype)?, target_float(out_dtype)?);
    for (buffer, what) in [(&fp8, "fp8"), (&scales, "scales"), (&out, "out")] {
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "{what} buffer must be C-contiguous"
            )));
        }
    }
    if out.readonly() {
        return Err(PyValueError::new_err("out buffer is read-only"));
    }
    let region = |b: &PyBuffer<u8>| (b.buf_ptr() as usize, b.len_bytes());
    let (q_addr, q_len) = region(&fp8);
    let (s_addr, s_len) = region(&scales);
    let (out_addr, out_len) = region(&out);
    for (addr, len) in [(q_addr, q_len), (s_addr, s_len)] {
        if len > 0 && out_len > 0 && addr < out_addr + out_len && out_addr < addr + len {
            return Err(PyValueError::new_err("input and output buffers overlap"));
        }
    }
    let layout = TileLayout {
        batch,
        rows,
        cols,
        block_rows,
        block_cols,
    };
    py.detach(|| {
        // SAFETY: the PyBuffers keep their exporters' memory alive and unmoved until this
        // function returns; the output was checked writable and apart from both inputs.
        let (q, s, y) = unsafe {
            (
                std::slice::from_raw_parts(q_addr as *const u8, q_len),
                std::slice::from_raw_parts(s_addr as *const u8, s_len),
                std::slice::from_raw_parts_mut(out_addr as *mut u8, out_len),
            )
        };
        let input = Fp8Input {
            tensor,
            fp8: q,
            scales: s,
            scale,
            layout,
        };
        dequantize_blocks(input, target, y, threads)
    })
    .or_raise()
}
