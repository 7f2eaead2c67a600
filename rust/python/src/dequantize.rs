//! `dequantize_fp8_blocks`: the CPU per-block FP8 dequantization kernel over Python buffers.

use normalize_core::dequantize::{
    dequantize_blocks, Fp8Input, ScaleFloat, TargetFloat, TileLayout,
};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::OrRaise;

/// A scale dtype argument: "F32", "BF16", "F16" or "F8_E8M0" (safetensors spellings).
pub struct ScaleDtype(ScaleFloat);

impl<'a, 'py> FromPyObject<'a, 'py> for ScaleDtype {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        match &*obj.extract::<std::borrow::Cow<'_, str>>()? {
            "F32" => Ok(ScaleDtype(ScaleFloat::F32)),
            "BF16" => Ok(ScaleDtype(ScaleFloat::BF16)),
            "F16" => Ok(ScaleDtype(ScaleFloat::F16)),
            "F8_E8M0" => Ok(ScaleDtype(ScaleFloat::E8M0)),
            other => Err(PyValueError::new_err(format!(
                "scale dtype '{other}' is not one of 'F32', 'BF16', 'F16', 'F8_E8M0'"
            ))),
        }
    }
}

/// An output dtype argument: "BF16", "F16" or "F32".
pub struct OutputDtype(TargetFloat);

impl<'a, 'py> FromPyObject<'a, 'py> for OutputDtype {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        match &*obj.extract::<std::borrow::Cow<'_, str>>()? {
            "BF16" => Ok(OutputDtype(TargetFloat::BF16)),
            "F16" => Ok(OutputDtype(TargetFloat::F16)),
            "F32" => Ok(OutputDtype(TargetFloat::F32)),
            other => Err(PyValueError::new_err(format!(
                "output dtype '{other}' is not one of 'BF16', 'F16', 'F32'"
            ))),
        }
    }
}

/// Dequantizes `fp8` (one float8_e4m3fn byte per element, laid out as `batch` matrices of `rows ×
/// cols`) with `scales` (`[batch, ceil(rows/block_rows), ceil(cols/block_cols)]` scales of
/// `scale_dtype`) into `out` (little-endian `out_dtype` elements): `y = out_dtype(f32(q) *
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
    scale_dtype: ScaleDtype,
    batch: usize,
    rows: usize,
    cols: usize,
    out: PyBuffer<u8>,
    out_dtype: OutputDtype,
    block_rows: usize,
    block_cols: usize,
    threads: usize,
) -> PyResult<()> {
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
            scale: scale_dtype.0,
            layout,
        };
        dequantize_blocks(input, out_dtype.0, y, threads)
    })
    .or_raise()
}
