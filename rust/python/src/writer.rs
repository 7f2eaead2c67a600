//! `ShardWriter`: one output shard being written from Python.
//!
//! Several Python threads use one writer at once (the kernel copy on one, provided tensors on
//! another), and each call releases the GIL while it works. No lock is ever held while the GIL
//! is acquired, and no thread waits for a lock while holding the GIL: calls borrow the writer
//! through a reference count taken under a short-lived mutex, and `finish`/`abort` take it back
//! with the GIL released, once the calls in flight have ended. `abort` first tells an in-flight
//! copy to stop, so it never waits for a whole shard to be copied.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

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
/// unfinished writer) stops a copy in flight and removes the temporary file.
#[pyclass(name = "ShardWriter", module = "normalize_core._core", frozen)]
pub struct PyShardWriter {
    shared: Shared,
    aborting: AtomicBool,
    file_name: String,
    provided: Vec<String>,
}

/// The writer while it is open, lent to the calls in flight.
struct Shared {
    slot: Mutex<Option<Arc<ShardWriter>>>,
    /// Signalled whenever a call in flight gives its reference back.
    returned: Condvar,
}

/// A call's reference to the writer; dropping it wakes a `finish` or `abort` waiting for it.
struct Lease<'a> {
    writer: Option<Arc<ShardWriter>>,
    shared: &'a Shared,
}

impl Lease<'_> {
    fn writer(&self) -> &ShardWriter {
        self.writer.as_deref().expect("held until drop")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        drop(self.writer.take());
        let _slot = self.shared.slot.lock().unwrap();
        self.shared.returned.notify_all();
    }
}

impl Shared {
    fn lease(&self) -> PyResult<Lease<'_>> {
        let writer = self.slot.lock().unwrap().clone().ok_or_else(closed)?;
        Ok(Lease {
            writer: Some(writer),
            shared: self,
        })
    }

    /// Takes the writer back for good, waiting until no call holds it. Call without the GIL.
    fn take(&self) -> Option<ShardWriter> {
        let mut slot = self.slot.lock().unwrap();
        let writer = slot.take()?;
        while Arc::strong_count(&writer) > 1 {
            slot = self.returned.wait(slot).unwrap();
        }
        drop(slot);
        Arc::into_inner(writer)
    }
}

fn closed() -> PyErr {
    PyRuntimeError::new_err("this ShardWriter is already finished or aborted")
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
            shared: Shared {
                slot: Mutex::new(Some(Arc::new(writer))),
                returned: Condvar::new(),
            },
            aborting: AtomicBool::new(false),
            file_name,
            provided,
        }
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
    /// Stops with `NormalizeError` (kind "cancelled") when the writer is aborted meanwhile.
    #[pyo3(signature = (progress = None))]
    fn copy_sources(&self, py: Python<'_>, progress: Option<Bound<'_, PyAny>>) -> PyResult<()> {
        let lease = self.shared.lease()?;
        let writer = lease.writer();
        run_cancellable(py, progress.as_ref(), |tick| {
            writer.copy_sources(&|n| tick(n) && !self.aborting.load(Ordering::Relaxed))
        })
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
        let lease = self.shared.lease()?;
        let writer = lease.writer();
        py.detach(|| {
            // SAFETY: `data` holds the exporter's buffer alive and unmoved until this method
            // returns; the slice is only read.
            let bytes = unsafe { std::slice::from_raw_parts(address as *const u8, len) };
            writer.write_tensor(name, bytes)
        })
        .or_raise()
    }

    /// Checks every planned tensor was written, fsyncs and renames the shard into place.
    /// Returns the final path. Waits (without the GIL) for calls in flight to end first.
    fn finish(&self, py: Python<'_>) -> PyResult<PathBuf> {
        match py.detach(|| self.shared.take().map(ShardWriter::finish)) {
            Some(finished) => finished.or_raise(),
            None => Err(closed()),
        }
    }

    /// Discards the shard: a copy in flight stops at its next chunk, and once no call uses the
    /// writer any more the temporary file is removed; nothing appears. Returns after that.
    fn abort(&self, py: Python<'_>) {
        self.aborting.store(true, Ordering::Relaxed);
        py.detach(|| drop(self.shared.take()));
    }

    fn __repr__(&self) -> String {
        format!("ShardWriter({:?})", self.file_name)
    }
}
