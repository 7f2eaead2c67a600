//! Files that appear only when complete: `write_atomically`, `temp_path_for`, `sync_dir`.

use std::path::PathBuf;

use normalize_core::atomic_file;
use pyo3::prelude::*;

use crate::errors::OrRaise;

/// Writes `data` to `path` so that it appears only when complete: written under
/// `temp_path_for(path)`, fsynced (unless `sync` is false: then a crash may leave `path` missing
/// or empty), then renamed over `path`.
#[pyfunction]
#[pyo3(signature = (path, data, sync = true))]
pub fn write_atomically(py: Python<'_>, path: PathBuf, data: &[u8], sync: bool) -> PyResult<()> {
    py.detach(|| {
        if sync {
            atomic_file::write_atomically(&path, data)
        } else {
            atomic_file::write_atomically_unsynced(&path, data)
        }
    })
    .or_raise()
}

/// Makes the renames inside directory `path` durable (fsync of the directory).
#[pyfunction]
pub fn sync_dir(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    py.detach(|| atomic_file::sync_dir(&path)).or_raise()
}

/// The hidden temporary name `path` is written under until complete:
/// `.<name>.partial-<pid>` in the same directory.
#[pyfunction]
pub fn temp_path_for(path: PathBuf) -> PathBuf {
    atomic_file::temp_path_for(&path)
}
