//! `quantize_fp8_blocks`: the CPU per-block FP8 kernel over Python buffers.

use normalize_core::dtype::Dtype;
use normalize_core::fp8::{
    quantize_blocks, BlockInput, BlockLayout, BlockOutput, ScaleFormat, SourceFloat,
};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::OrRaise;
use crate::kinds;

fn writable_region(buffer: &PyBuffer<u8>, what: &str) -> PyResult<(usize, usize)> {
    if buffer.readonly() {
        return Err(PyValueError::new_err(format!("{what} buffer is read-only")));
    }
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what} buffer must be C-contiguous"
        )));
    }
    Ok((buffer.buf_ptr() as usize, buffer.len_bytes()))
}

/// Quantizes `input` (little-endian `dtype` elements: BF16, F16 or F32, laid out as `batch`
/// matrices of `rows × cols`) per `block × block` tile into `fp8_out` (one float8_e4m3fn byte
/// per element) and `scale_out` (`[batch, ceil(rows/block), ceil(cols/block)]` scales stored as
/// `scale_dtype`, a `ScaleDtype`). With `scale_fmt` `ScaleFormat.UE8M0`, scales are powers of
/// two. Uses up to `threads` threads with the GIL released. Raises NormalizeError naming
/// `tensor` on NaN/Inf input.
#[pyfunction]
#[pyo3(signature = (tensor, input, dtype, batch, rows, cols, fp8_out, scale_out, block = 128, scale_fmt = kinds::ScaleFormat::Float, scale_dtype = kinds::ScaleDtype::Float32, threads = 1))]
#[allow(clippy::too_many_arguments)]
pub fn quantize_fp8_blocks(
    py: Python<'_>,
    tensor: &str,
    input: PyBuffer<u8>,
    dtype: kinds::Dtype,
    batch: usize,
    rows: usize,
    cols: usize,
    fp8_out: PyBuffer<u8>,
    scale_out: PyBuffer<u8>,
    block: usize,
    scale_fmt: kinds::ScaleFormat,
    scale_dtype: kinds::ScaleDtype,
    threads: usize,
) -> PyResult<()> {
    let source = match dtype.0 {
        Dtype::BF16 => SourceFloat::BF16,
        Dtype::F16 => SourceFloat::F16,
        Dtype::F32 => SourceFloat::F32,
        other => {
            return Err(PyValueError::new_err(format!(
                "cannot quantize dtype {other}; expected BF16, F16 or F32"
            )))
        }
    };
    if !input.is_c_contiguous() {
        return Err(PyValueError::new_err("input buffer must be C-contiguous"));
    }
    let (in_addr, in_len) = (input.buf_ptr() as usize, input.len_bytes());
    let (q_addr, q_len) = writable_region(&fp8_out, "fp8_out")?;
    let (s_addr, s_len) = writable_region(&scale_out, "scale_out")?;
    let ranges = [(in_addr, in_len), (q_addr, q_len), (s_addr, s_len)];
    for (i, a) in ranges.iter().enumerate() {
        for b in &ranges[i + 1..] {
            if a.1 > 0 && b.1 > 0 && a.0 < b.0 + b.1 && b.0 < a.0 + a.1 {
                return Err(PyValueError::new_err("input and output buffers overlap"));
            }
        }
    }
    let layout = BlockLayout {
        batch,
        rows,
        cols,
        block,
    };
    let format = ScaleFormat {
        ue8m0: scale_fmt == kinds::ScaleFormat::Ue8m0,
        bf16: scale_dtype == kinds::ScaleDtype::Bfloat16,
    };
    py.detach(|| {
        // SAFETY: the three PyBuffers keep their exporters' memory alive and unmoved until this
        // function returns; the regions were checked not to overlap, outputs are writable.
        let (input, q, s) = unsafe {
            (
                std::slice::from_raw_parts(in_addr as *const u8, in_len),
                std::slice::from_raw_parts_mut(q_addr as *mut u8, q_len),
                std::slice::from_raw_parts_mut(s_addr as *mut u8, s_len),
            )
        };
        let input = BlockInput {
            tensor,
            bytes: input,
            source,
            layout,
        };
        quantize_blocks(input, format, BlockOutput { fp8: q, scales: s }, threads)
    })
    .or_raise()
}
