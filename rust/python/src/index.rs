//! `read_index` and `INDEX_FILE`: the HF index, read and checked by the core.

use std::path::PathBuf;

use normalize_core::index;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::OrRaise;

/// The index file name of the HF sharded layout, `model.safetensors.index.json`.
pub const INDEX_FILE: &str = index::INDEX_FILE;

/// Reads and checks a `model.safetensors.index.json`: every tensor listed once, every shard a
/// plain file name inside the directory. Returns `(weight_map, total_size)`: `{tensor: shard}`
/// in file order, and `metadata.total_size` (None when absent or not a number). Raises
/// NormalizeError (`invalid_index`, `unsafe_shard_name`) otherwise.
#[pyfunction]
pub fn read_index<'py>(
    py: Python<'py>,
    path: PathBuf,
) -> PyResult<(Bound<'py, PyDict>, Option<u64>)> {
    let index = py.detach(|| index::read_index(&path)).or_raise()?;
    let weight_map = PyDict::new(py);
    for (tensor, shard) in index.weight_map {
        weight_map.set_item(tensor, shard)?;
    }
    Ok((weight_map, index.total_size))
}
