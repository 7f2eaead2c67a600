//! `plan_shards`, `PlanBuilder`, `OutputPlan` and `ShardPlan`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use normalize_core::plan::{plan_repack, TensorSource};
use normalize_core::writer::{execute_plan, planned_header, write_index, ExecuteOptions};
use normalize_core::{Checkpoint, OutputPlan, OutputTensor, PlanBuilder, TensorGroup};
use pyo3::exceptions::{PyIndexError, PyKeyError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::checkpoint::PyCheckpoint;
use crate::errors::{run_cancellable_with, OrRaise};
use crate::kinds;
use crate::writer::PyShardWriter;

/// The repack plan for a checkpoint: every tensor copied, in checkpoint order, greedily packed
/// into `model-{i:05d}-of-{n:05d}.safetensors` shards of at most `max_shard_bytes` bytes (a
/// tensor larger than that gets a shard of its own). Reads nothing but headers.
#[pyfunction]
pub fn plan_shards(
    py: Python<'_>,
    checkpoint: &PyCheckpoint,
    max_shard_bytes: u64,
) -> PyResult<PyOutputPlan> {
    let inner = Arc::clone(&checkpoint.inner);
    let plan = py
        .detach(|| plan_repack(&inner, max_shard_bytes))
        .or_raise()?;
    Ok(PyOutputPlan {
        inner: Arc::new(plan),
    })
}

/// One planned output tensor (made by `PlanBuilder.copied` or `PlanBuilder.provided`).
#[pyclass(name = "OutputTensor", module = "normalize_core._core", frozen)]
pub struct PyOutputTensor {
    inner: OutputTensor,
    home_file: Option<usize>,
}

#[pymethods]
impl PyOutputTensor {
    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }

    /// A `Dtype` member.
    #[getter]
    fn dtype(&self) -> kinds::Dtype {
        kinds::Dtype(self.inner.dtype)
    }

    #[getter]
    fn shape(&self) -> Vec<u64> {
        self.inner.shape.clone()
    }

    #[getter]
    fn nbytes(&self) -> u64 {
        self.inner.nbytes
    }

    /// Whether the caller provides the bytes (otherwise they are copied from a source file).
    #[getter]
    fn is_provided(&self) -> bool {
        self.inner.source == TensorSource::Provided
    }

    fn __repr__(&self) -> String {
        format!(
            "OutputTensor(name={:?}, dtype={}, shape={:?}, provided={})",
            self.inner.name,
            self.inner.dtype,
            self.inner.shape,
            self.is_provided()
        )
    }
}

/// Tensors that go into the same shard, with the source file they belong to.
#[pyclass(name = "TensorGroup", module = "normalize_core._core", frozen)]
pub struct PyTensorGroup {
    inner: TensorGroup,
}

/// Builds an `OutputPlan` over the files of one or more checkpoints.
///
/// Make tensors with `copied` (bytes copied from a checkpoint) and `provided` (bytes handed to
/// the `ShardWriter` later), bundle them with `group`, then lay groups out with `pack_greedy`
/// (bin-packing into size-limited shards) or `pack_by_source_file` (keep the source's shard
/// layout), add whole source files with `whole_file`, and call `finish`.
#[pyclass(name = "PlanBuilder", module = "normalize_core._core", frozen)]
pub struct PyPlanBuilder {
    checkpoints: Vec<Arc<Checkpoint>>,
    bases: Vec<usize>,
    builder: Mutex<Option<PlanBuilder>>,
}

impl PyPlanBuilder {
    fn checkpoint(&self, index: usize) -> PyResult<&Arc<Checkpoint>> {
        self.checkpoints
            .get(index)
            .ok_or_else(|| PyIndexError::new_err(format!("no checkpoint {index}")))
    }

    fn with_builder<T>(&self, f: impl FnOnce(&mut PlanBuilder) -> T) -> PyResult<T> {
        let mut guard = self.builder.lock().unwrap();
        let builder = guard
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("this PlanBuilder is already finished"))?;
        Ok(f(builder))
    }
}

#[pymethods]
impl PyPlanBuilder {
    #[new]
    fn new(checkpoints: Vec<PyRef<'_, PyCheckpoint>>) -> Self {
        let checkpoints: Vec<Arc<Checkpoint>> =
            checkpoints.iter().map(|c| Arc::clone(&c.inner)).collect();
        let refs: Vec<&Checkpoint> = checkpoints.iter().map(|c| c.as_ref()).collect();
        let (builder, bases) = PlanBuilder::new(&refs);
        PyPlanBuilder {
            checkpoints,
            bases,
            builder: Mutex::new(Some(builder)),
        }
    }

    /// Tensor `name` of checkpoint `checkpoint`, copied unchanged.
    #[pyo3(signature = (name, checkpoint = 0))]
    fn copied(&self, name: &str, checkpoint: usize) -> PyResult<PyOutputTensor> {
        let ckpt = self.checkpoint(checkpoint)?;
        let entry = ckpt
            .tensor(name)
            .ok_or_else(|| PyKeyError::new_err(name.to_string()))?;
        Ok(PyOutputTensor {
            inner: OutputTensor::copied(entry, self.bases[checkpoint]),
            home_file: Some(self.bases[checkpoint] + entry.file),
        })
    }

    /// A tensor of the given dtype (a `Dtype` member or its name: "F8_E4M3", "F32", ...) and
    /// shape whose bytes the caller writes with `ShardWriter.write`.
    fn provided(
        &self,
        name: String,
        dtype: kinds::Dtype,
        shape: Vec<u64>,
    ) -> PyResult<PyOutputTensor> {
        Ok(PyOutputTensor {
            inner: OutputTensor::provided(name, dtype.0, shape).or_raise()?,
            home_file: None,
        })
    }

    /// Bundles tensors into one shard. `home` names the source tensor whose file the group
    /// belongs to (for `pack_by_source_file`); by default the first copied tensor's file.
    #[pyo3(signature = (tensors, home = None, checkpoint = 0))]
    fn group(
        &self,
        tensors: Vec<PyRef<'_, PyOutputTensor>>,
        home: Option<&str>,
        checkpoint: usize,
    ) -> PyResult<PyTensorGroup> {
        let home_file = match home {
            Some(name) => {
                let ckpt = self.checkpoint(checkpoint)?;
                let entry = ckpt
                    .tensor(name)
                    .ok_or_else(|| PyKeyError::new_err(name.to_string()))?;
                self.bases[checkpoint] + entry.file
            }
            None => tensors.iter().find_map(|t| t.home_file).ok_or_else(|| {
                PyValueError::new_err(
                    "a group of provided tensors needs `home`, the source tensor it derives from",
                )
            })?,
        };
        Ok(PyTensorGroup {
            inner: TensorGroup {
                tensors: tensors.iter().map(|t| t.inner.clone()).collect(),
                home_file,
            },
        })
    }

    /// Packs groups in order into shards of at most `max_shard_bytes` (file size).
    fn pack_greedy(
        &self,
        groups: Vec<PyRef<'_, PyTensorGroup>>,
        max_shard_bytes: u64,
    ) -> PyResult<()> {
        let groups = groups.iter().map(|g| g.inner.clone()).collect();
        self.with_builder(|b| b.pack_greedy(groups, max_shard_bytes))
    }

    /// One shard per source file the groups belong to, in order of first appearance.
    fn pack_by_source_file(&self, groups: Vec<PyRef<'_, PyTensorGroup>>) -> PyResult<()> {
        let groups = groups.iter().map(|g| g.inner.clone()).collect();
        self.with_builder(|b| b.pack_by_source_file(groups))
    }

    /// Re-emits shard file `file_name` of checkpoint `checkpoint` byte for byte.
    #[pyo3(signature = (file_name, checkpoint = 0))]
    fn whole_file(&self, file_name: &str, checkpoint: usize) -> PyResult<()> {
        let ckpt = self.checkpoint(checkpoint)?;
        let position = ckpt
            .files
            .iter()
            .position(|f| f.name == file_name)
            .ok_or_else(|| PyKeyError::new_err(file_name.to_string()))?;
        let base = self.bases[checkpoint];
        let tensors: Vec<OutputTensor> = ckpt
            .tensors
            .iter()
            .filter(|t| t.file == position)
            .map(|t| OutputTensor::copied(t, base))
            .collect();
        self.with_builder(|b| b.whole_file(base + position, tensors))
    }

    /// Completes the plan. `naming` (a `Naming` member or its value): "standard" names shards
    /// `model-{i:05d}-of-{n:05d}`; "source" keeps each shard's source file name where it has one.
    #[pyo3(signature = (naming = kinds::Naming::Standard))]
    fn finish(&self, py: Python<'_>, naming: kinds::Naming) -> PyResult<PyOutputPlan> {
        let builder = self
            .builder
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this PlanBuilder is already finished"))?;
        let plan = py.detach(|| builder.finish(naming.into())).or_raise()?;
        Ok(PyOutputPlan {
            inner: Arc::new(plan),
        })
    }
}

/// One planned output shard.
#[pyclass(name = "ShardPlan", module = "normalize_core._core", frozen, get_all)]
pub struct PyShardPlan {
    /// Output file name.
    pub file_name: String,
    /// A `ShardKind` member: "assembled" (new header and tensors) or "whole_file" (a source
    /// file re-emitted as is).
    pub kind: kinds::ShardKind,
    /// Final file size in bytes.
    pub file_len: u64,
    /// Tensor bytes.
    pub data_len: u64,
    /// Tensor names in data order.
    pub tensor_names: Vec<String>,
    /// Names of tensors whose bytes the caller provides.
    pub provided: Vec<String>,
}

#[pymethods]
impl PyShardPlan {
    fn __repr__(&self) -> String {
        format!(
            "ShardPlan(file_name={:?}, tensors={}, file_len={})",
            self.file_name,
            self.tensor_names.len(),
            self.file_len
        )
    }
}

/// Every output shard, its header and every tensor offset, fixed before any byte moves.
#[pyclass(name = "OutputPlan", module = "normalize_core._core", frozen)]
pub struct PyOutputPlan {
    pub inner: Arc<OutputPlan>,
}

impl PyOutputPlan {
    fn check_index(&self, index: usize) -> PyResult<()> {
        let count = self.inner.shards.len();
        if index >= count {
            return Err(PyIndexError::new_err(format!(
                "no shard {index}: the plan has {count} shards"
            )));
        }
        Ok(())
    }

    /// The given shard indices (each at most once, all in the plan), or every shard.
    fn shard_selection(&self, shards: Option<Vec<usize>>) -> PyResult<Vec<usize>> {
        let Some(shards) = shards else {
            return Ok((0..self.inner.shards.len()).collect());
        };
        let mut seen = std::collections::HashSet::new();
        for &index in &shards {
            self.check_index(index)?;
            if !seen.insert(index) {
                return Err(PyValueError::new_err(format!("shard {index} given twice")));
            }
        }
        Ok(shards)
    }
}

#[pymethods]
impl PyOutputPlan {
    /// The shards, in order.
    #[getter]
    fn shards(&self) -> Vec<PyShardPlan> {
        self.inner
            .shards
            .iter()
            .map(|s| PyShardPlan {
                file_name: s.file_name.clone(),
                kind: (&s.kind).into(),
                file_len: s.file_len,
                data_len: s.data_len(),
                tensor_names: s.tensors.iter().map(|t| t.tensor.name.clone()).collect(),
                provided: s
                    .tensors
                    .iter()
                    .filter(|t| t.tensor.source == TensorSource::Provided)
                    .map(|t| t.tensor.name.clone())
                    .collect(),
            })
            .collect()
    }

    fn __len__(&self) -> usize {
        self.inner.shards.len()
    }

    /// Sum of tensor bytes (the index's `metadata.total_size`).
    #[getter]
    fn total_size(&self) -> u64 {
        self.inner.total_size()
    }

    /// Sum of element counts (the index's `metadata.total_parameters`).
    #[getter]
    fn total_parameters(&self) -> u64 {
        self.inner.total_parameters()
    }

    /// Sum of output file sizes, headers included.
    #[getter]
    fn total_file_bytes(&self) -> u64 {
        self.inner.shards.iter().map(|s| s.file_len).sum()
    }

    /// `{tensor: shard file}` for every output tensor.
    fn weight_map<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let map = PyDict::new(py);
        for (tensor, file) in self.inner.weight_map() {
            map.set_item(tensor, file)?;
        }
        Ok(map)
    }

    /// Writes shards `shards` (indices, each at most once; default: every shard) whose tensors
    /// all come from source files, `jobs` at a time, with the GIL released. `progress(n)` is
    /// called with bytes done since the last call, `on_shard_done(index)` (on this thread) once
    /// a shard is fsynced and renamed into place, for every such shard, even when the call
    /// fails. With `hardlink`, whole-file shards are hard-linked (copied where linking fails).
    /// On failure no shard is removed: the caller knows the finished ones from
    /// `on_shard_done`. Returns `{"linked": int, "link_fallbacks": [(file, reason)]}`. Does not
    /// write the index: call `write_index`.
    #[pyo3(signature = (output_dir, jobs = 1, hardlink = false, progress = None, shards = None, on_shard_done = None))]
    #[allow(clippy::too_many_arguments)]
    fn execute<'py>(
        &self,
        py: Python<'py>,
        output_dir: PathBuf,
        jobs: usize,
        hardlink: bool,
        progress: Option<Bound<'py, PyAny>>,
        shards: Option<Vec<usize>>,
        on_shard_done: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let plan = Arc::clone(&self.inner);
        let shards = self.shard_selection(shards)?;
        let options = ExecuteOptions { jobs, hardlink };
        let done: Mutex<Vec<usize>> = Mutex::new(Vec::new());
        let mut hand_over = || -> PyResult<()> {
            let finished = std::mem::take(&mut *done.lock().unwrap());
            match &on_shard_done {
                Some(callback) => finished
                    .into_iter()
                    .try_for_each(|i| callback.call1((i,)).map(drop)),
                None => Ok(()),
            }
        };
        let report = run_cancellable_with(py, progress.as_ref(), &mut hand_over, |tick| {
            execute_plan(&plan, &output_dir, &shards, options, tick, &|i| {
                done.lock().unwrap().push(i)
            })
        })?;
        let result = PyDict::new(py);
        result.set_item("linked", report.linked)?;
        result.set_item("link_fallbacks", report.link_fallbacks)?;
        Ok(result)
    }

    /// The bytes shard `index`'s file starts with: length prefix, header JSON and padding (a
    /// whole-file shard's are read from its source file).
    fn shard_header<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Bound<'py, PyBytes>> {
        self.check_index(index)?;
        let plan = Arc::clone(&self.inner);
        let header = py.detach(|| planned_header(&plan, index)).or_raise()?;
        Ok(PyBytes::new(py, &header))
    }

    /// Opens shard `index` for writing in `output_dir` (temporary file, header written).
    fn open_shard(
        &self,
        py: Python<'_>,
        index: usize,
        output_dir: PathBuf,
    ) -> PyResult<PyShardWriter> {
        self.check_index(index)?;
        let plan = Arc::clone(&self.inner);
        let writer = py
            .detach(|| normalize_core::ShardWriter::create(plan, index, &output_dir))
            .or_raise()?;
        Ok(PyShardWriter::new(writer))
    }

    /// Writes `model.safetensors.index.json` (sorted keys, total_size, total_parameters).
    /// Call it only after every shard is finished.
    fn write_index(&self, py: Python<'_>, output_dir: PathBuf) -> PyResult<PathBuf> {
        let plan = Arc::clone(&self.inner);
        py.detach(|| write_index(&plan, &output_dir)).or_raise()
    }

    fn __repr__(&self) -> String {
        format!(
            "OutputPlan(shards={}, total_size={})",
            self.inner.shards.len(),
            self.inner.total_size()
        )
    }
}
