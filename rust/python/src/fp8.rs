//! The CPU per-block FP8 kernel, on two inputs: `quantize_fp8_blocks` over a Python buffer,
//! `quantize_fp8_tensor` straight from a checkpoint's file.

use normalize_core::fp8::{
    quantize_blocks, quantize_tensor, BlockInput, BlockOutput, ScaleFormat, SourceFloat,
};
use normalize_core::stripes::{Input, TileLayout};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::buffers::{outputs_apart, Region};
use crate::checkpoint::PyCheckpoint;
use crate::errors::OrRaise;
use crate::kinds;

/// How scales are rounded and stored, from the Python-side names.
fn scale_format(scale_fmt: kinds::ScaleFormat, scale_dtype: kinds::ScaleDtype) -> ScaleFormat {
    ScaleFormat {
        ue8m0: scale_fmt == kinds::ScaleFormat::Ue8m0,
        bf16: scale_dtype == kinds::ScaleDtype::Bfloat16,
    }
}

/// The checked `fp8_out` and `scale_out`, apart from each other and from `inputs`.
fn output_regions(
    fp8_out: &PyBuffer<u8>,
    scale_out: &PyBuffer<u8>,
    inputs: &[Region],
) -> PyResult<[Region; 2]> {
    outputs_apart([(fp8_out, "fp8_out"), (scale_out, "scale_out")], inputs)
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
    let source = SourceFloat::of(dtype.0).ok_or_else(|| {
        PyValueError::new_err(format!(
            "cannot quantize dtype {}; expected BF16, F16 or F32",
            dtype.0
        ))
    })?;
    let input = Region::input(&input, "input")?;
    let [q, s] = output_regions(&fp8_out, &scale_out, &[input])?;
    let layout = TileLayout::square(batch, rows, cols, block);
    py.detach(|| {
        // SAFETY: the three PyBuffers keep their exporters' memory alive and unmoved until this
        // function returns; the outputs were checked writable and apart from all else.
        let (bytes, fp8, scales) = unsafe { (input.bytes(), q.bytes_mut(), s.bytes_mut()) };
        let input = BlockInput {
            tensor,
            bytes: Input::Memory(bytes),
            source,
            layout,
        };
        let output = BlockOutput { fp8, scales };
        quantize_blocks(input, scale_format(scale_fmt, scale_dtype), output, threads)
    })
    .or_raise()
}

/// `quantize_fp8_blocks` on tensor `tensor` of `checkpoint`, read straight from its file stripe
/// by stripe (never mapped, never copied whole): checked like `Checkpoint.view`, so a source
/// that changes or shrinks meanwhile raises NormalizeError (kind "source_changed"). KeyError for
/// a name the checkpoint lacks.
#[pyfunction]
#[pyo3(signature = (checkpoint, tensor, batch, rows, cols, fp8_out, scale_out, block = 128, scale_fmt = kinds::ScaleFormat::Float, scale_dtype = kinds::ScaleDtype::Float32, threads = 1))]
#[allow(clippy::too_many_arguments)]
pub fn quantize_fp8_tensor(
    py: Python<'_>,
    checkpoint: &Bound<'_, PyCheckpoint>,
    tensor: &str,
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
    let checkpoint = checkpoint.get();
    let entry = checkpoint.entry(tensor)?;
    let [q, s] = output_regions(&fp8_out, &scale_out, &[])?;
    let layout = TileLayout::square(batch, rows, cols, block);
    py.detach(|| {
        // SAFETY: the PyBuffers keep their exporters' memory alive and unmoved until this
        // function returns; they were checked writable and apart.
        let output = unsafe {
            BlockOutput {
                fp8: q.bytes_mut(),
                scales: s.bytes_mut(),
            }
        };
        let format = scale_format(scale_fmt, scale_dtype);
        quantize_tensor(&checkpoint.inner, entry, layout, format, output, threads)
    })
    .or_raise()
}
