//! `ShardWriter`: one output shard being written from Python.

use std::path::PathBuf;
use std::sync::RwLock;

use normalize_core::ShardWriter;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::errors::{run_cancellable, OrRaise};

/// One output shard being written: its header is already in a temporary file.
///
/// `copy_sources()` copies the tensors that come from source files (in the kernel);
/// `write(name, buffer)` writes a provided tensor's bytes at its planned offset. Both release
/// the GIL and may run concurrently from different threads. `finish()` checks every tensor was
/// written, fsyncs and renames the shard into place; `abort()` (or garbage collection of an
/// unfinished writer) removes the temporary file.
#[pyclass(name = "ShardWriter", module = "normalize_core._core", frozen)]
pub struct PyShardWriter {
    state: RwLock<Option<ShardWriter>>,
    file_name: String,
    provided: Vec<String>,
}

impl PyShardWriter {
    pub fn new(writer: ShardWriter) -> Self {
        let file_name = writer
            .dest()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let provided = writer
            .provided_tensors()
            .into_iter()
            .map(String::from)
            .collect();
        PyShardWriter {
            state: RwLock::new(Some(writer)),
            file_name,
            provided,
        }
    }

    fn closed() -> PyErr {
        PyRuntimeError::new_err("this ShardWriter is already finished or aborted")
    }
}

#[pymethods]
impl PyShardWriter {
    /// The shard's file name.
    #[getter]
    fn file_name(&self) -> &str {
        &self.file_name
    }

    /// Names of the tensors the caller must write, in data order.
    #[getter]
    fn provided(&self) -> Vec<String> {
        self.provided.clone()
    }

    /// Copies every tensor that comes from a source file. `progress(n)` receives bytes done.
    #[pyo3(signature = (progress = None))]
    fn copy_sources(&self, py: Python<'_>, progress: Option<Bound<'_, PyAny>>) -> PyResult<()> {
        let guard = self.state.read().unwrap();
        let writer = guard.as_ref().ok_or_else(Self::closed)?;
        run_cancellable(py, progress.as_ref(), |tick| writer.copy_sources(tick))
    }

    /// Writes the bytes of provided tensor `name` (any C-contiguous buffer of unsigned bytes,
    /// e.g. `tensor.view(torch.uint8).numpy()`), without copying them first.
    fn write(&self, py: Python<'_>, name: &str, data: PyBuffer<u8>) -> PyResult<()> {
        if !data.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "bytes for '{name}' must be C-contiguous"
            )));
        }
        let (address, len) = (data.buf_ptr() as usize, data.len_bytes());
        let guard = self.state.read().unwrap();
        let writer = guard.as_ref().ok_or_else(Self::closed)?;
        py.detach(|| {
            // SAFETY: `data` holds the exporter's buffer alive and unmoved until this method
            // returns; the slice is only read.
            let bytes = unsafe { std::slice::from_raw_parts(address as *const u8, len) };
            writer.write_tensor(name, bytes)
        })
        .or_raise()
    }

    /// Checks every planned tensor was written, fsyncs and renames the shard into place.
    /// Returns the final path.
    fn finish(&self, py: Python<'_>) -> PyResult<PathBuf> {
        let writer = self
            .state
            .write()
            .unwrap()
            .take()
            .ok_or_else(Self::closed)?;
        py.detach(|| writer.finish()).or_raise()
    }

    /// Discards the shard: the temporary file is removed, nothing appears.
    fn abort(&self) {
        drop(self.state.write().unwrap().take());
    }

    fn __repr__(&self) -> String {
        format!("ShardWriter({:?})", self.file_name)
    }
}
