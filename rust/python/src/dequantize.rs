//! The CPU per-block FP8 dequantization kernel, on two inputs: `dequantize_fp8_blocks` over
//! Python buffers, `dequantize_fp8_tensor` straight from a checkpoint's files.

use normalize_core::dequantize::{
    dequantize_blocks, dequantize_tensor, Fp8Input, ScaleFloat, TargetFloat,
};
use normalize_core::stripes::{Input, TileLayout};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::buffers::{outputs_apart, Region};
use crate::checkpoint::PyCheckpoint;
use crate::errors::OrRaise;
use crate::kinds;

/// The output type for `dtype`, for the dtypes the kernel writes.
fn target_float(dtype: kinds::Dtype) -> PyResult<TargetFloat> {
    TargetFloat::of(dtype.0).ok_or_else(|| {
        PyValueError::new_err(format!(
            "cannot dequantize to dtype {}; expected BF16, F16 or F32",
            dtype.0
        ))
    })
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
    let scale = ScaleFloat::of(scale_dtype.0).ok_or_else(|| {
        PyValueError::new_err(format!(
            "cannot read scales of dtype {}; expected F32, BF16, F16 or F8_E8M0",
            scale_dtype.0
        ))
    })?;
    let target = target_float(out_dtype)?;
    let inputs = [
        Region::input(&fp8, "fp8")?,
        Region::input(&scales, "scales")?,
    ];
    let [y] = outputs_apart([(&out, "out")], &inputs)?;
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
        let (q, s, y) = unsafe { (inputs[0].bytes(), inputs[1].bytes(), y.bytes_mut()) };
        let input = Fp8Input {
            tensor,
            fp8: Input::Memory(q),
            scales: Input::Memory(s),
            scale,
            layout,
        };
        dequantize_blocks(input, target, y, threads)
    })
    .or_raise()
}

/// `dequantize_fp8_blocks` on FP8 tensor `tensor` of `checkpoint` with its scale tensor `scale`
/// (dtype F32, BF16, F16 or F8_E8M0), both read straight from their files stripe by stripe (never
/// mapped, never copied whole): checked like `Checkpoint.view`, so a source that changes or
/// shrinks meanwhile raises NormalizeError (kind "source_changed"). KeyError for a name the
/// checkpoint lacks.
#[pyfunction]
#[pyo3(signature = (checkpoint, tensor, scale, batch, rows, cols, out, out_dtype, block_rows = 128, block_cols = 128, threads = 1))]
#[allow(clippy::too_many_arguments)]
pub fn dequantize_fp8_tensor(
    py: Python<'_>,
    checkpoint: &Bound<'_, PyCheckpoint>,
    tensor: &str,
    scale: &str,
    batch: usize,
    rows: usize,
    cols: usize,
    out: PyBuffer<u8>,
    out_dtype: kinds::Dtype,
    block_rows: usize,
    block_cols: usize,
    threads: usize,
) -> PyResult<()> {
    let checkpoint = checkpoint.get();
    let (weight, scale) = (checkpoint.entry(tensor)?, checkpoint.entry(scale)?);
    let target = target_float(out_dtype)?;
    let [y] = outputs_apart([(&out, "out")], &[])?;
    let layout = TileLayout {
        batch,
        rows,
        cols,
        block_rows,
        block_cols,
    };
    py.detach(|| {
        // SAFETY: `out` keeps its exporter's memory alive and unmoved until this function
        // returns; it was checked writable.
        let y = unsafe { y.bytes_mut() };
        dequantize_tensor(&checkpoint.inner, weight, scale, layout, target, y, threads)
    })
    .or_raise()
}
