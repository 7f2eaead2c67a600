//! Writing planned shards: header first, copied tensors moved in the kernel, provided tensors
//! written at their planned offsets, then fsync and rename. The index is written last, so an
//! index never points at an incomplete shard.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::atomic_file::{sync_dir, temp_path_for, write_atomically, AtomicFile};
use crate::copy::{copy_range, preallocate, start_writeback, FileAt, Progress};
use crate::error::{Error, Result};
use crate::index::{encode_index, INDEX_FILE};
use crate::plan::{OutputPlan, ShardKind, TensorSource};
use crate::regular_file::{open_regular, FileIdentity};

/// One output shard being written.
///
/// Copies and provided writes may run concurrently from several threads (they write disjoint
/// ranges at explicit offsets); [`ShardWriter::finish`] then checks every planned tensor was
/// written before the file gets its final name. Every source file the shard copies from must
/// still be what it was when its checkpoint was opened: that is checked when the writer opens
/// it, after copying from it and again before the shard is committed (`source_changed`).
pub struct ShardWriter {
    plan: Arc<OutputPlan>,
    shard: usize,
    out: AtomicFile,
    sources: HashMap<usize, File>,
    written: Vec<AtomicBool>,
    provided_slots: HashMap<String, usize>,
}

impl ShardWriter {
    /// Creates the temporary file for shard `shard`, reserves its space and writes its header.
    pub fn create(plan: Arc<OutputPlan>, shard: usize, out_dir: &Path) -> Result<ShardWriter> {
        let spec = &plan.shards[shard];
        let out = AtomicFile::create(&out_dir.join(&spec.file_name))?;
        let at = FileAt {
            file: out.file(),
            path: out.dest(),
        };
        preallocate(at, spec.file_len)?;
        let mut sources = HashMap::new();
        let mut needed: Vec<usize> = spec
            .tensors
            .iter()
            .filter_map(|t| match t.tensor.source {
                TensorSource::Copy { file, .. } => Some(file),
                TensorSource::Provided => None,
            })
            .collect();
        match &spec.kind {
            ShardKind::Assembled { header } => {
                use std::os::unix::fs::FileExt;
                out.file()
                    .write_all_at(header, 0)
                    .map_err(|e| Error::io(out.dest(), e))?;
            }
            ShardKind::WholeFile { file } => needed.push(*file),
        }
        for file in needed {
            if let std::collections::hash_map::Entry::Vacant(slot) = sources.entry(file) {
                let path = &plan.sources[file];
                let (opened, _) = open_regular(path)?;
                plan.source_identities[file].verify(path, &opened)?;
                slot.insert(opened);
            }
        }
        let provided_slots = spec
            .tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| t.tensor.source == TensorSource::Provided)
            .map(|(i, t)| (t.tensor.name.clone(), i))
            .collect();
        let written = spec
            .tensors
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect();
        Ok(ShardWriter {
            plan,
            shard,
            out,
            sources,
            written,
            provided_slots,
        })
    }

    /// The final path of this shard.
    pub fn dest(&self) -> &Path {
        self.out.dest()
    }

    /// Names of the tensors the caller must provide, in data order.
    pub fn provided_tensors(&self) -> Vec<&str> {
        let spec = &self.plan.shards[self.shard];
        spec.tensors
            .iter()
            .filter(|t| t.tensor.source == TensorSource::Provided)
            .map(|t| t.tensor.name.as_str())
            .collect()
    }

    /// Copies every tensor that comes from a source file, merging runs that are contiguous in
    /// both source and shard into single kernel copies.
    pub fn copy_sources(&self, progress: Progress<'_>) -> Result<()> {
        let spec = &self.plan.shards[self.shard];
        let dst = FileAt {
            file: self.out.file(),
            path: self.out.dest(),
        };
        if let ShardKind::WholeFile { file } = spec.kind {
            copy_range(self.source_at(file), 0, dst, 0, spec.file_len, progress)?;
            self.verify_sources()?;
            self.written
                .iter()
                .for_each(|w| w.store(true, Ordering::Release));
            return Ok(());
        }
        let data_start = spec.data_start();
        let tensors = &spec.tensors;
        let mut i = 0;
        while i < tensors.len() {
            let TensorSource::Copy { file, offset } = tensors[i].tensor.source else {
                i += 1;
                continue;
            };
            let mut len = tensors[i].tensor.nbytes;
            let mut j = i + 1;
            while let Some(next) = tensors.get(j) {
                match next.tensor.source {
                    TensorSource::Copy { file: f, offset: o } if f == file && o == offset + len => {
                        len += next.tensor.nbytes;
                        j += 1;
                    }
                    _ => break,
                }
            }
            let dst_offset = data_start + tensors[i].data_offsets.0;
            copy_range(self.source_at(file), offset, dst, dst_offset, len, progress)?;
            for flag in &self.written[i..j] {
                flag.store(true, Ordering::Release);
            }
            i = j;
        }
        self.verify_sources()
    }

    /// Writes the bytes of a provided tensor at its planned offset.
    pub fn write_tensor(&self, name: &str, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let spec = &self.plan.shards[self.shard];
        let rejected = |detail: String| Error::WriteRejected {
            file: self.dest().into(),
            tensor: name.into(),
            detail,
        };
        let Some(&slot) = self.provided_slots.get(name) else {
            return Err(rejected(
                "this shard has no provided tensor of that name".into(),
            ));
        };
        let placed = &spec.tensors[slot];
        if bytes.len() as u64 != placed.tensor.nbytes {
            return Err(rejected(format!(
                "got {} bytes, planned {} ({} {:?})",
                bytes.len(),
                placed.tensor.nbytes,
                placed.tensor.dtype,
                placed.tensor.shape
            )));
        }
        if self.written[slot].swap(true, Ordering::AcqRel) {
            return Err(rejected("written twice".into()));
        }
        let offset = spec.data_start() + placed.data_offsets.0;
        self.out
            .file()
            .write_all_at(bytes, offset)
            .map_err(|e| Error::io(self.out.dest(), e))?;
        start_writeback(self.out.file(), offset, bytes.len() as u64);
        Ok(())
    }

    /// Checks every tensor was written and every source is unchanged, flushes, and renames the
    /// shard into place.
    pub fn finish(self) -> Result<PathBuf> {
        let spec = &self.plan.shards[self.shard];
        if let Some(missing) = self.written.iter().position(|w| !w.load(Ordering::Acquire)) {
            return Err(Error::TensorNotWritten {
                file: self.dest().into(),
                tensor: spec.tensors[missing].tensor.name.clone(),
            });
        }
        self.verify_sources()?;
        let dest = self.out.dest().to_path_buf();
        self.out.commit()?;
        Ok(dest)
    }

    /// Fails with `source_changed` when a source this shard reads from differs from what it was
    /// when its checkpoint was opened.
    fn verify_sources(&self) -> Result<()> {
        for (&file, opened) in &self.sources {
            self.plan.source_identities[file].verify(&self.plan.sources[file], opened)?;
        }
        Ok(())
    }

    fn source_at(&self, file: usize) -> FileAt<'_> {
        FileAt {
            file: &self.sources[&file],
            path: &self.plan.sources[file],
        }
    }
}

/// How [`execute_plan`] writes shards.
#[derive(Debug, Clone, Copy)]
pub struct ExecuteOptions {
    /// Shards written at the same time.
    pub jobs: usize,
    /// Hard-link whole-file shards instead of copying them (copy when linking fails).
    pub hardlink: bool,
}

/// What [`execute_plan`] did besides copying.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecuteReport {
    /// Whole-file shards that were hard-linked.
    pub linked: usize,
    /// Whole-file shards that were copied because linking was impossible (e.g. across file
    /// systems), with the reason.
    pub link_fallbacks: Vec<(String, String)>,
}

/// Writes shards `shards` (indices into `plan.shards`, each at most once) of a plan whose
/// tensors all come from source files, `jobs` shards at a time.
///
/// Each shard is fsynced, renamed into place and its directory synced before `on_done(shard)`
/// is called, so a caller that records it then never records a shard a crash could lose. On
/// failure the other jobs stop and the first real error is returned; the shards reported done
/// stay in place (whether to keep them for a resumed run is the caller's decision) and no
/// index is written. Panics on an index outside the plan.
pub fn execute_plan(
    plan: &Arc<OutputPlan>,
    out_dir: &Path,
    shards: &[usize],
    options: ExecuteOptions,
    progress: Progress<'_>,
    on_done: &(dyn Fn(usize) + Sync),
) -> Result<ExecuteReport> {
    refuse_provided_tensors(plan, shards)?;
    let jobs = Jobs::new(shards);
    let guarded = |n: u64| !jobs.stopped() && progress(n);
    let worker = || {
        while let Some(shard) = jobs.next() {
            match write_one_shard(plan, shard, out_dir, options.hardlink, &guarded) {
                Ok(link) => {
                    on_done(shard);
                    jobs.record(&plan.shards[shard].file_name, link);
                }
                Err(error) => return jobs.fail(error),
            }
        }
    };
    let threads = options.jobs.clamp(1, shards.len().max(1));
    std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(worker);
        }
        worker();
    });
    jobs.into_report()
}

/// Copy-only execution cannot write tensors whose bytes a caller computes.
fn refuse_provided_tensors(plan: &OutputPlan, shards: &[usize]) -> Result<()> {
    let provided = shards
        .iter()
        .flat_map(|&s| &plan.shards[s].tensors)
        .find(|t| t.tensor.source == TensorSource::Provided);
    match provided {
        Some(t) => Err(Error::InvalidPlan {
            tensor: t.tensor.name.clone(),
            detail: "its bytes must be provided by the caller; use ShardWriter".into(),
        }),
        None => Ok(()),
    }
}

/// The work queue and outcome shared by the workers of one [`execute_plan`] call.
struct Jobs<'a> {
    shards: &'a [usize],
    next: AtomicUsize,
    stop: AtomicBool,
    failure: Mutex<Option<Error>>,
    report: Mutex<ExecuteReport>,
}

impl<'a> Jobs<'a> {
    fn new(shards: &'a [usize]) -> Self {
        Jobs {
            shards,
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
            report: Mutex::new(ExecuteReport::default()),
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The next shard to write, unless the queue is empty or a job failed.
    fn next(&self) -> Option<usize> {
        let position = self.next.fetch_add(1, Ordering::Relaxed);
        match self.shards.get(position) {
            Some(&shard) if !self.stopped() => Some(shard),
            _ => None,
        }
    }

    fn record(&self, file_name: &str, link: LinkOutcome) {
        let mut report = self.report.lock().unwrap();
        match link {
            LinkOutcome::Linked => report.linked += 1,
            LinkOutcome::Copied(Some(reason)) => {
                report.link_fallbacks.push((file_name.to_string(), reason))
            }
            LinkOutcome::Copied(None) => {}
        }
    }

    fn fail(&self, error: Error) {
        self.stop.store(true, Ordering::Relaxed);
        let mut slot = self.failure.lock().unwrap();
        // A real failure explains more than the cancellations it caused elsewhere.
        if slot.as_ref().is_none_or(|f| matches!(f, Error::Cancelled)) {
            *slot = Some(error);
        }
    }

    fn into_report(self) -> Result<ExecuteReport> {
        match self.failure.into_inner().unwrap() {
            Some(error) => Err(error),
            None => Ok(self.report.into_inner().unwrap()),
        }
    }
}

enum LinkOutcome {
    Linked,
    /// Copied; with the reason when a link was asked for and failed.
    Copied(Option<String>),
}

/// Writes (or links) one shard and makes its new directory entry durable.
fn write_one_shard(
    plan: &Arc<OutputPlan>,
    shard: usize,
    out_dir: &Path,
    hardlink: bool,
    progress: Progress<'_>,
) -> Result<LinkOutcome> {
    let spec = &plan.shards[shard];
    let mut fallback = None;
    if let (true, ShardKind::WholeFile { file }) = (hardlink, &spec.kind) {
        let dest = out_dir.join(&spec.file_name);
        let (source, planned) = (&plan.sources[*file], &plan.source_identities[*file]);
        match link_into_place(source, planned, &dest)? {
            LinkAttempt::Linked => {
                progress(spec.file_len);
                sync_dir(out_dir)?;
                return Ok(LinkOutcome::Linked);
            }
            LinkAttempt::Impossible(e) => fallback = Some(e.to_string()),
        }
    }
    let writer = ShardWriter::create(Arc::clone(plan), shard, out_dir)?;
    writer.copy_sources(progress)?;
    writer.finish()?;
    sync_dir(out_dir)?;
    Ok(LinkOutcome::Copied(fallback))
}

/// The bytes shard `shard` of `plan` starts with: length prefix, header JSON and padding. For a
/// whole-file shard they are read from its source file (its header, as planned).
pub fn planned_header(plan: &OutputPlan, shard: usize) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let spec = &plan.shards[shard];
    match &spec.kind {
        ShardKind::Assembled { header } => Ok(header.clone()),
        ShardKind::WholeFile { file } => {
            let path = &plan.sources[*file];
            let mut header = vec![0u8; spec.data_start() as usize];
            File::open(path)
                .and_then(|f| f.read_exact_at(&mut header, 0))
                .map_err(|e| Error::io(path, e))?;
            Ok(header)
        }
    }
}

enum LinkAttempt {
    Linked,
    /// No link was made (another device, a file system without hard links): copy instead, which
    /// also reports a source that is gone.
    Impossible(std::io::Error),
}

/// Hard-links `source` as `dest` through a temporary name (so `dest` is replaced atomically),
/// provided it is still the version `planned` describes: the link shares the source's inode, so
/// the linked temporary is checked before it gets its name (`source_changed` otherwise).
fn link_into_place(source: &Path, planned: &FileIdentity, dest: &Path) -> Result<LinkAttempt> {
    let temp = temp_path_for(dest);
    let _ = std::fs::remove_file(&temp);
    if let Err(e) = std::fs::hard_link(source, &temp) {
        return Ok(LinkAttempt::Impossible(e));
    }
    let linked = std::fs::symlink_metadata(&temp)
        .map_err(|e| Error::io(&temp, e))
        .and_then(|meta| planned.verify_link(source, &meta))
        .and_then(|()| std::fs::rename(&temp, dest).map_err(|e| Error::io(dest, e)));
    if linked.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    linked.map(|()| LinkAttempt::Linked)
}

/// Writes `model.safetensors.index.json` for a completed plan, atomically, and syncs the
/// directory.
pub fn write_index(plan: &OutputPlan, out_dir: &Path) -> Result<PathBuf> {
    let text = encode_index(
        plan.weight_map(),
        plan.total_size(),
        plan.total_parameters(),
    );
    let path = out_dir.join(INDEX_FILE);
    write_atomically(&path, text.as_bytes())?;
    sync_dir(out_dir)?;
    Ok(path)
}
