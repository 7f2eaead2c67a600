//! Directory-level helpers: output guards, aux files, stale shards, whole-file copies.

use std::collections::HashSet;
use std::path::PathBuf;

use normalize_core::{aux_files, output_dir};
use pyo3::prelude::*;

use crate::errors::{run_cancellable, OrRaise};

/// Raises NormalizeError when `output` is one of `sources`, lies inside one, or contains one.
#[pyfunction]
pub fn check_separate(sources: Vec<PathBuf>, output: PathBuf) -> PyResult<()> {
    let refs: Vec<&std::path::Path> = sources.iter().map(PathBuf::as_path).collect();
    output_dir::check_separate(&refs, &output).or_raise()
}

/// Top-level entries of `dir` that are neither shards nor indexes nor hidden, sorted.
#[pyfunction]
pub fn list_aux_files(dir: PathBuf) -> PyResult<Vec<String>> {
    aux_files::list_aux_files(&dir).or_raise()
}

/// What `copy_aux_files` did: the top-level names copied, and the entries left out with why.
#[pyclass(name = "AuxCopy", module = "normalize_core._core", frozen, get_all)]
pub struct PyAuxCopy {
    /// Top-level names copied (files, folders, symlinks), sorted.
    pub copied: Vec<String>,
    /// `(path relative to the source, reason)` of every symlink left out because it leads
    /// outside the source, nowhere, or in a loop.
    pub skipped: Vec<(String, String)>,
}

#[pymethods]
impl PyAuxCopy {
    fn __repr__(&self) -> String {
        format!(
            "AuxCopy(copied={:?}, skipped={:?})",
            self.copied, self.skipped
        )
    }
}

/// Copies every non-tensor entry of `source` (configs, tokenizer, code, sub-folders; hidden
/// files skipped) into `output`, keeping each file's permission bits. A symlink inside the
/// source is copied as a symlink; one into the HF cache's blobs (a snapshot source) as its
/// file; any other is skipped and reported. A FIFO, socket or device among the entries raises
/// before anything is written. Nothing is written through a symlink in `output`: a link where
/// a file or folder goes is replaced by it, its target left alone.
#[pyfunction]
pub fn copy_aux_files(py: Python<'_>, source: PathBuf, output: PathBuf) -> PyResult<PyAuxCopy> {
    let done = py
        .detach(|| aux_files::copy_aux_files(&source, &output))
        .or_raise()?;
    Ok(PyAuxCopy {
        copied: done.copied,
        skipped: done
            .skipped
            .into_iter()
            .map(|s| (s.path, s.reason))
            .collect(),
    })
}

/// Removes this tool's temporary files (`.<name>.partial-<pid>`) anywhere below `output` (symlinks
/// not followed). Returns their paths relative to `output`, sorted.
#[pyfunction]
pub fn remove_temporaries(py: Python<'_>, output: PathBuf) -> PyResult<Vec<String>> {
    py.detach(|| output_dir::remove_temporaries(&output))
        .or_raise()
}

/// Removes `model-NNNNN-of-NNNNN.safetensors` / `model.safetensors` files in `output` that are
/// not in `keep`. Returns the removed names.
#[pyfunction]
pub fn remove_stale_shards(output: PathBuf, keep: Vec<String>) -> PyResult<Vec<String>> {
    let keep: HashSet<&str> = keep.iter().map(String::as_str).collect();
    output_dir::remove_stale_shards(&output, &keep).or_raise()
}

/// Copies one regular file atomically (temporary name, fsync, rename), in the kernel where
/// possible, keeping its permission bits. `progress(n)` receives bytes done.
#[pyfunction]
#[pyo3(signature = (source, dest, progress = None))]
pub fn copy_file(
    py: Python<'_>,
    source: PathBuf,
    dest: PathBuf,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    run_cancellable(py, progress.as_ref(), |tick| {
        aux_files::copy_file(&source, &dest, tick)
    })
}
