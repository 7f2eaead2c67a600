//! `Checkpoint`, `TensorEntry`, `TensorView` and `read_header`.

use std::collections::BTreeMap;
use std::ffi::c_int;
use std::path::PathBuf;
use std::sync::Arc;

use normalize_core::header::{read_header as core_read_header, ShardHeader};
use normalize_core::scale_values::{read_scale_properties, ScaleProperties, ScaleStorage};
use normalize_core::verify::find_problems;
use normalize_core::{Checkpoint, TensorEntry};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyKeyError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::OrRaise;
use crate::kinds;

/// One tensor: name, dtype (a `Dtype` member such as `Dtype.BF16`), shape, the file holding it,
/// offsets relative to that file's data buffer, and its absolute offset in the file.
#[pyclass(name = "TensorEntry", module = "normalize_core._core", frozen, get_all)]
#[derive(Clone)]
pub struct PyTensorEntry {
    pub name: String,
    pub dtype: kinds::Dtype,
    pub shape: Vec<u64>,
    pub file: String,
    pub data_offsets: (u64, u64),
    pub file_offset: u64,
    pub nbytes: u64,
}

#[pymethods]
impl PyTensorEntry {
    fn __repr__(&self) -> String {
        format!(
            "TensorEntry(name={:?}, dtype={}, shape={:?}, file={:?}, nbytes={})",
            self.name, self.dtype, self.shape, self.file, self.nbytes
        )
    }
}

impl PyCheckpoint {
    /// The tensor of that name; KeyError when absent.
    pub(crate) fn entry(&self, name: &str) -> PyResult<&TensorEntry> {
        self.inner
            .tensor(name)
            .ok_or_else(|| PyKeyError::new_err(name.to_string()))
    }
}

impl PyTensorEntry {
    fn from_entry(entry: &TensorEntry, checkpoint: &Checkpoint) -> Self {
        PyTensorEntry {
            name: entry.name.clone(),
            dtype: kinds::Dtype(entry.dtype),
            shape: entry.shape.clone(),
            file: checkpoint.files[entry.file].name.clone(),
            data_offsets: entry.data_offsets,
            file_offset: entry.file_offset,
            nbytes: entry.nbytes(),
        }
    }
}

/// A checkpoint directory read through its index and headers; no tensor data is read.
///
/// Open one with `Checkpoint.open(path)`.
#[pyclass(name = "Checkpoint", module = "normalize_core._core", frozen)]
pub struct PyCheckpoint {
    pub inner: Arc<Checkpoint>,
}

#[pymethods]
impl PyCheckpoint {
    /// Opens a directory holding `model.safetensors.index.json`, a lone `model.safetensors`, or
    /// any `*.safetensors` files; validates every header and the index.
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let checkpoint = py.detach(|| Checkpoint::open(&path)).or_raise()?;
        Ok(PyCheckpoint {
            inner: Arc::new(checkpoint),
        })
    }

    /// The directory.
    #[getter]
    fn dir(&self) -> PathBuf {
        self.inner.dir.clone()
    }

    /// How tensors were found: a `Layout` member ("indexed", "single_file" or "unindexed").
    #[getter]
    fn layout(&self) -> kinds::Layout {
        self.inner.layout.into()
    }

    /// Shard file names in checkpoint order.
    #[getter]
    fn files(&self) -> Vec<String> {
        self.inner.files.iter().map(|f| f.name.clone()).collect()
    }

    /// Every tensor, in checkpoint order (index order, or file then offset order).
    #[getter]
    fn tensors(&self) -> Vec<PyTensorEntry> {
        self.inner
            .tensors
            .iter()
            .map(|t| PyTensorEntry::from_entry(t, &self.inner))
            .collect()
    }

    /// Tensor names in checkpoint order.
    fn names(&self) -> Vec<String> {
        self.inner.tensors.iter().map(|t| t.name.clone()).collect()
    }

    /// The tensor of that name; KeyError when absent.
    fn tensor(&self, name: &str) -> PyResult<PyTensorEntry> {
        self.entry(name)
            .map(|t| PyTensorEntry::from_entry(t, &self.inner))
    }

    fn __len__(&self) -> usize {
        self.inner.tensors.len()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.inner.tensor(name).is_some()
    }

    /// Sum of tensor bytes.
    #[getter]
    fn total_size(&self) -> u64 {
        self.inner.total_size()
    }

    /// Sum of element counts.
    #[getter]
    fn total_parameters(&self) -> u64 {
        self.inner.total_parameters()
    }

    /// Tensor bytes per dtype (`Dtype` members, in name order).
    #[getter]
    fn dtypes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut totals: BTreeMap<String, (kinds::Dtype, u64)> = BTreeMap::new();
        for t in &self.inner.tensors {
            let total = totals
                .entry(t.dtype.to_string())
                .or_insert((kinds::Dtype(t.dtype), 0));
            total.1 += t.nbytes();
        }
        let dict = PyDict::new(py);
        for (dtype, bytes) in totals.into_values() {
            dict.set_item(dtype, bytes)?;
        }
        Ok(dict)
    }

    /// Whether the shards are named `model-{i:05d}-of-{n:05d}.safetensors` with an index.
    #[getter]
    fn has_standard_names(&self) -> bool {
        self.inner.has_standard_names()
    }

    /// `*.safetensors` files in the directory that the index does not reference.
    #[getter]
    fn unreferenced_files(&self) -> Vec<String> {
        self.inner.unreferenced_files.clone()
    }

    /// `metadata.total_size` as the index states it (None without an index or value).
    #[getter]
    fn index_total_size(&self) -> Option<u64> {
        self.inner.index.as_ref().and_then(|i| i.total_size)
    }

    /// `__metadata__` of one shard file.
    fn file_metadata(&self, file: &str) -> PyResult<BTreeMap<String, String>> {
        let found = self.inner.files.iter().find(|f| f.name == file);
        let file = found.ok_or_else(|| PyKeyError::new_err(file.to_string()))?;
        Ok(file.header.metadata.iter().cloned().collect())
    }

    /// Problems a loader would trip over (`Severity.ERROR`) or that look unclean
    /// (`Severity.WARNING`), as `(severity, message)` pairs.
    fn problems(&self) -> Vec<(kinds::Severity, String)> {
        find_problems(&self.inner)
            .into_iter()
            .map(|f| (f.severity.into(), f.message))
            .collect()
    }

    /// One tensor's bytes, read now into memory the view owns (read-only buffer protocol).
    /// Reading is by positional reads, never a mapping: a source truncated meanwhile raises
    /// `NormalizeError` (kind "source_changed"), it cannot kill the process.
    fn view(&self, py: Python<'_>, name: &str) -> PyResult<PyTensorView> {
        let entry = self.entry(name)?;
        let mut bytes = vec![0u8; entry.nbytes() as usize];
        py.detach(|| self.inner.read_tensor(entry, &mut bytes))
            .or_raise()?;
        Ok(PyTensorView {
            bytes,
            name: entry.name.clone(),
            dtype: entry.dtype.to_string(),
            shape: entry.shape.clone(),
            nbytes: entry.nbytes(),
        })
    }

    /// Reads one tensor's bytes into `buffer`, any writable C-contiguous buffer of exactly
    /// `nbytes` bytes (a reused `bytearray`, pinned memory seen as a numpy array), with no
    /// second copy. Checked like `view`.
    fn read_into(&self, py: Python<'_>, name: &str, buffer: PyBuffer<u8>) -> PyResult<()> {
        let entry = self.entry(name)?;
        if buffer.readonly() || !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "the buffer for '{name}' must be writable and C-contiguous"
            )));
        }
        if buffer.len_bytes() as u64 != entry.nbytes() {
            return Err(PyValueError::new_err(format!(
                "the buffer for '{name}' has {} bytes; the tensor has {}",
                buffer.len_bytes(),
                entry.nbytes()
            )));
        }
        let (address, len) = (buffer.buf_ptr() as usize, buffer.len_bytes());
        py.detach(|| {
            // SAFETY: `buffer` keeps the exporter's memory alive and unmoved (an exported
            // bytearray or array cannot be resized) until this method returns; it was checked
            // writable and `len` bytes long.
            let bytes = unsafe { std::slice::from_raw_parts_mut(address as *mut u8, len) };
            self.inner.read_tensor(entry, bytes)
        })
        .or_raise()
    }

    /// Asks the kernel to start reading the tensors `names` from disk in the background, for
    /// reads soon after (`quantize_fp8_tensor`, `dequantize_fp8_tensor`, `read_into`) that then
    /// find their bytes cached. Only a hint: it reads nothing itself and never fails on a file (a
    /// read that follows reports any problem). KeyError for a name the checkpoint lacks.
    fn prefetch(&self, py: Python<'_>, names: Vec<String>) -> PyResult<()> {
        let entries = names
            .iter()
            .map(|name| self.entry(name))
            .collect::<PyResult<Vec<_>>>()?;
        py.detach(|| {
            for entry in entries {
                self.inner.prefetch(entry);
            }
        });
        Ok(())
    }

    /// What holds for every value of each of the scale tensors `names` (F32 or BF16), in
    /// order: one `ScaleProperties` per name. Reads them all in one call with the GIL
    /// released, checked like `view`. KeyError for a name the checkpoint lacks, ValueError for
    /// a tensor of another dtype.
    fn scale_properties(
        &self,
        py: Python<'_>,
        names: Vec<String>,
    ) -> PyResult<Vec<PyScaleProperties>> {
        let scales = names
            .iter()
            .map(|name| {
                let entry = self.entry(name)?;
                let storage = ScaleStorage::of(entry.dtype).ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "'{name}' is {}; scale tensors are F32 or BF16",
                        entry.dtype
                    ))
                })?;
                Ok((entry, storage))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let properties = py
            .detach(|| read_scale_properties(&self.inner, &scales))
            .or_raise()?;
        Ok(properties
            .into_iter()
            .map(PyScaleProperties::from)
            .collect())
    }

    fn __repr__(&self) -> String {
        format!(
            "Checkpoint({:?}, layout={}, files={}, tensors={}, total_size={})",
            self.inner.dir,
            kinds::Layout::from(self.inner.layout),
            self.inner.files.len(),
            self.inner.tensors.len(),
            self.inner.total_size()
        )
    }
}

/// What holds for every value of one scale tensor (see `Checkpoint.scale_properties`).
#[pyclass(
    name = "ScaleProperties",
    module = "normalize_core._core",
    frozen,
    get_all
)]
pub struct PyScaleProperties {
    /// Every value is finite and greater than zero.
    pub finite_positive: bool,
    /// Every value is a positive power of two of the normal float range (no mantissa bits),
    /// which `scale_fmt: ue8m0` stores exactly.
    pub powers_of_two: bool,
}

impl From<ScaleProperties> for PyScaleProperties {
    fn from(found: ScaleProperties) -> Self {
        PyScaleProperties {
            finite_positive: found.finite_positive,
            powers_of_two: found.powers_of_two,
        }
    }
}

#[pymethods]
impl PyScaleProperties {
    fn __repr__(&self) -> String {
        let flag = |b: bool| if b { "True" } else { "False" };
        format!(
            "ScaleProperties(finite_positive={}, powers_of_two={})",
            flag(self.finite_positive),
            flag(self.powers_of_two)
        )
    }
}

/// Bytes of one tensor, read from its file into memory the view owns; exported read-only.
#[pyclass(name = "TensorView", module = "normalize_core._core", frozen)]
pub struct PyTensorView {
    bytes: Vec<u8>,
    #[pyo3(get)]
    name: String,
    #[pyo3(get)]
    dtype: String,
    #[pyo3(get)]
    shape: Vec<u64>,
    #[pyo3(get)]
    nbytes: u64,
}

#[pymethods]
impl PyTensorView {
    /// # Safety
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let bytes = &slf.get().bytes;
        let (ptr, len) = (bytes.as_ptr().cast_mut(), bytes.len() as ffi::Py_ssize_t);
        // SAFETY: `view` comes from CPython; the bytes live (never moved: the view is frozen) as
        // long as `slf`, which the view keeps a reference to; the buffer is exported read-only
        // (a request to write fails).
        let status =
            unsafe { ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr.cast(), len, 1, flags) };
        if status == -1 {
            return Err(PyErr::take(slf.py())
                .unwrap_or_else(|| PyBufferError::new_err("cannot export the tensor view")));
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.bytes.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "TensorView(name={:?}, dtype={}, shape={:?})",
            self.name, self.dtype, self.shape
        )
    }
}

/// A parsed, validated safetensors header.
#[pyclass(name = "ShardHeader", module = "normalize_core._core", frozen, get_all)]
pub struct PyShardHeader {
    pub path: PathBuf,
    pub file_len: u64,
    pub header_len: u64,
    pub data_start: u64,
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<PyTensorEntry>,
}

impl PyShardHeader {
    fn from_header(header: ShardHeader) -> Self {
        let name = header
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let data_start = header.data_start();
        let tensors = header
            .tensors
            .iter()
            .map(|t| PyTensorEntry {
                name: t.name.clone(),
                dtype: kinds::Dtype(t.dtype),
                shape: t.shape.clone(),
                file: name.clone(),
                data_offsets: t.data_offsets,
                file_offset: data_start + t.data_offsets.0,
                nbytes: t.nbytes(),
            })
            .collect();
        PyShardHeader {
            data_start,
            path: header.path,
            file_len: header.file_len,
            header_len: header.header_len,
            metadata: header.metadata.into_iter().collect(),
            tensors,
        }
    }
}

/// Reads and validates one safetensors file's header (tensors sorted by offset). Reads no
/// tensor data.
#[pyfunction]
pub fn read_header(py: Python<'_>, path: PathBuf) -> PyResult<PyShardHeader> {
    let header = py.detach(|| core_read_header(&path)).or_raise()?;
    Ok(PyShardHeader::from_header(header))
}
