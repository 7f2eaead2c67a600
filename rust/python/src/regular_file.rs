//! Reading a user's small files from Python through the core's regular-file checks:
//! `read_regular_file` and `files_equal`. A FIFO, device or directory where a file should be
//! raises `NormalizeError` (kind "not_a_regular_file"); it is never opened in a way that blocks.

use std::path::PathBuf;

use normalize_core::regular_file;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::OrRaise;

/// All of `path`, (a symlink to) a regular file of at most `max_bytes` bytes, as bytes. Raises
/// NormalizeError naming the file when it is something else (kind "not_a_regular_file"), is
/// larger ("file_too_large"), cannot be read ("io") or changes while it is read.
#[pyfunction]
pub fn read_regular_file<'py>(
    py: Python<'py>,
    path: PathBuf,
    max_bytes: u64,
) -> PyResult<Bound<'py, PyBytes>> {
    let bytes = py
        .detach(|| regular_file::read_regular_file(&path, max_bytes))
        .or_raise()?;
    Ok(PyBytes::new(py, &bytes))
}

/// Whether `first` and `second`, both (symlinks to) regular files, hold the same bytes;
/// compared in bounded pieces with the GIL released. Raises NormalizeError as
/// `read_regular_file` does.
#[pyfunction]
pub fn files_equal(py: Python<'_>, first: PathBuf, second: PathBuf) -> PyResult<bool> {
    py.detach(|| regular_file::files_equal(&first, &second))
        .or_raise()
}
