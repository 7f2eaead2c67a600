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

/// Copies every non-tensor entry of `source` (configs, tokenizer, code, sub-folders; hidden
/// files skipped, symlinks followed) into `output`. Returns the top-level names copied.
#[pyfunction]
pub fn copy_aux_files(py: Python<'_>, source: PathBuf, output: PathBuf) -> PyResult<Vec<String>> {
    py.detach(|| aux_files::copy_aux_files(&source, &output))
        .or_raise()
}

/// Removes `model-NNNNN-of-NNNNN.safetensors` / `model.safetensors` files in `output` that are
/// not in `keep`. Returns the removed names.
#[pyfunction]
pub fn remove_stale_shards(output: PathBuf, keep: Vec<String>) -> PyResult<Vec<String>> {
    let keep: HashSet<&str> = keep.iter().map(String::as_str).collect();
    output_dir::remove_stale_shards(&output, &keep).or_raise()
}

/// Whether `name` is a shard file name this tool writes.
#[pyfunction]
pub fn is_tool_shard_name(name: &str) -> bool {
    output_dir::is_tool_shard_name(name)
}

/// Copies one file atomically (temporary name, fsync, rename), in the kernel where possible.
/// `progress(n)` receives bytes done.
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
