//! The `normalize_core._core` extension: a thin PyO3 layer over the `normalize-core` crate.
//! Heavy work runs with the GIL released; every core error becomes `NormalizeError`.

mod atomic_file;
mod buffers;
mod checkpoint;
mod dequantize;
mod digest;
mod errors;
mod files;
mod fp8;
mod index;
mod kinds;
mod plan;
mod regular_file;
mod writer;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "NormalizeError",
        m.py().get_type::<errors::NormalizeError>(),
    )?;
    m.add_class::<checkpoint::PyCheckpoint>()?;
    m.add_class::<checkpoint::PyTensorEntry>()?;
    m.add_class::<checkpoint::PyTensorView>()?;
    m.add_class::<checkpoint::PyShardHeader>()?;
    m.add_class::<checkpoint::PyScaleProperties>()?;
    m.add_class::<plan::PyPlanBuilder>()?;
    m.add_class::<plan::PyOutputTensor>()?;
    m.add_class::<plan::PyTensorGroup>()?;
    m.add_class::<plan::PyOutputPlan>()?;
    m.add_class::<plan::PyShardPlan>()?;
    m.add_class::<writer::PyShardWriter>()?;
    m.add_class::<files::PyAuxCopy>()?;
    m.add_function(wrap_pyfunction!(checkpoint::read_header, m)?)?;
    m.add_function(wrap_pyfunction!(plan::plan_shards, m)?)?;
    m.add_function(wrap_pyfunction!(fp8::quantize_fp8_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(fp8::quantize_fp8_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize::dequantize_fp8_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize::dequantize_fp8_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(files::check_separate, m)?)?;
    m.add_function(wrap_pyfunction!(files::list_aux_files, m)?)?;
    m.add_function(wrap_pyfunction!(files::copy_aux_files, m)?)?;
    m.add_function(wrap_pyfunction!(files::remove_stale_shards, m)?)?;
    m.add_function(wrap_pyfunction!(files::remove_temporaries, m)?)?;
    m.add_function(wrap_pyfunction!(files::copy_file, m)?)?;
    m.add("INDEX_FILE", index::INDEX_FILE)?;
    m.add("SINGLE_FILE", index::SINGLE_FILE)?;
    m.add("LEN_PREFIX", normalize_core::format::LEN_PREFIX)?;
    m.add("MAX_HEADER_LEN", normalize_core::format::MAX_HEADER_LEN)?;
    m.add_function(wrap_pyfunction!(index::read_index, m)?)?;
    m.add_function(wrap_pyfunction!(atomic_file::write_atomically, m)?)?;
    m.add_function(wrap_pyfunction!(atomic_file::sync_dir, m)?)?;
    m.add_function(wrap_pyfunction!(digest::sha256_hex, m)?)?;
    m.add_function(wrap_pyfunction!(atomic_file::temp_path_for, m)?)?;
    m.add_function(wrap_pyfunction!(regular_file::read_regular_file, m)?)?;
    m.add_function(wrap_pyfunction!(regular_file::files_equal, m)?)?;
    Ok(())
}
