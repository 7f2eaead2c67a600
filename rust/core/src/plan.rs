//! The output plan: every output shard, its header and every tensor's offset, fixed before any
//! byte moves. One planner serves repack (greedy bin-packing), to-fp8 and to-bf16 (tensors whose
//! bytes the caller computes; optionally keeping the source's shard layout) and merge (whole
//! source files re-emitted under new names, then packed extras).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::dtype::{alignment, byte_size, element_count, Dtype};
use crate::error::{Error, Result};
use crate::format::{standard_shard_name, HEADER_ALIGN, LEN_PREFIX};
use crate::header::{encode_header, entry_size_bound, HeaderEntry};
use crate::regular_file::FileIdentity;

/// Kept at its first home for callers; it lives in [`crate::format`].
pub use crate::format::PAGE_SIZE;

/// Runs shorter than this are not worth padding a header for.
const MIN_ALIGNED_RUN: u64 = 1 << 20;

/// Where an output tensor's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorSource {
    /// Copied verbatim from `sources[file]` starting at absolute offset `offset`.
    Copy { file: usize, offset: u64 },
    /// Handed to the shard writer by the caller (e.g. a freshly quantized tensor).
    Provided,
}

/// One tensor of the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub nbytes: u64,
    pub source: TensorSource,
}

impl OutputTensor {
    /// A tensor copied unchanged from a checkpoint whose files start at `file_base` in the
    /// plan's source list.
    pub fn copied(entry: &TensorEntry, file_base: usize) -> Self {
        OutputTensor {
            name: entry.name.clone(),
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            nbytes: entry.nbytes(),
            source: TensorSource::Copy {
                file: file_base + entry.file,
                offset: entry.file_offset,
            },
        }
    }

    /// A tensor whose bytes the caller provides while writing.
    pub fn provided(name: String, dtype: Dtype, shape: Vec<u64>) -> Result<Self> {
        let nbytes = byte_size(dtype, &shape).ok_or_else(|| Error::InvalidPlan {
            tensor: name.clone(),
            detail: format!("shape {shape:?} of {dtype} has no whole byte size"),
        })?;
        Ok(OutputTensor {
            name,
            dtype,
            shape,
            nbytes,
            source: TensorSource::Provided,
        })
    }

    fn header_bound(&self) -> u64 {
        self.nbytes + entry_size_bound(&self.name, self.dtype, &self.shape)
    }
}

/// Tensors that must land in the same shard (a weight and its scale), and the source file
/// they come from (used when the source's shard layout is kept).
#[derive(Debug, Clone)]
pub struct TensorGroup {
    pub tensors: Vec<OutputTensor>,
    pub home_file: usize,
}

/// A tensor at its place in an output shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedTensor {
    pub tensor: OutputTensor,
    /// Offsets relative to the shard's data buffer.
    pub data_offsets: (u64, u64),
}

/// How a shard's bytes are produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardKind {
    /// A new file: `header` (length prefix, JSON, padding) then the tensors in order.
    Assembled { header: Vec<u8> },
    /// `sources[file]` re-emitted byte for byte (copied or hard-linked).
    WholeFile { file: usize },
}

/// One output file.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    pub file_name: String,
    pub kind: ShardKind,
    /// Tensors in data order.
    pub tensors: Vec<PlacedTensor>,
    /// Final file length in bytes.
    pub file_len: u64,
}

impl ShardPlan {
    /// Absolute offset where the data buffer starts.
    pub fn data_start(&self) -> u64 {
        self.file_len - self.data_len()
    }

    /// Bytes of tensor data in the shard.
    pub fn data_len(&self) -> u64 {
        self.tensors.iter().map(|t| t.tensor.nbytes).sum()
    }
}

/// The whole output: source files, shards, and what the index will say.
#[derive(Debug, Clone)]
pub struct OutputPlan {
    pub sources: Vec<PathBuf>,
    /// What each of `sources` was when its checkpoint was opened; writers refuse to commit a
    /// shard once a source it read from no longer matches.
    pub source_identities: Vec<FileIdentity>,
    pub shards: Vec<ShardPlan>,
}

impl OutputPlan {
    /// Sum of tensor bytes across shards (`metadata.total_size`).
    pub fn total_size(&self) -> u64 {
        self.shards.iter().map(ShardPlan::data_len).sum()
    }

    /// Sum of element counts across shards (`metadata.total_parameters`).
    pub fn total_parameters(&self) -> u64 {
        self.shards
            .iter()
            .flat_map(|s| &s.tensors)
            .map(|t| element_count(&t.tensor.shape).unwrap_or(0))
            .sum()
    }

    /// `(tensor, shard file)` for every output tensor.
    pub fn weight_map(&self) -> impl Iterator<Item = (&str, &str)> {
        self.shards.iter().flat_map(|s| {
            s.tensors
                .iter()
                .map(move |t| (t.tensor.name.as_str(), s.file_name.as_str()))
        })
    }
}

/// The repack plan: every tensor of `checkpoint` copied, in checkpoint order, greedily packed
/// into standard-named shards of at most `max_shard_bytes`.
pub fn plan_repack(checkpoint: &Checkpoint, max_shard_bytes: u64) -> Result<OutputPlan> {
    let (mut builder, bases) = PlanBuilder::new(&[checkpoint]);
    let groups = checkpoint
        .tensors
        .iter()
        .map(|entry| TensorGroup {
            tensors: vec![OutputTensor::copied(entry, bases[0])],
            home_file: bases[0] + entry.file,
        })
        .collect();
    builder.pack_greedy(groups, max_shard_bytes);
    builder.finish(ShardNaming::Standard)
}

/// How output shards are named once the plan is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardNaming {
    /// `model-{i:05d}-of-{n:05d}.safetensors`.
    Standard,
    /// Each shard keeps the name of the source file it was built from (keep-layout runs).
    SourceNames,
}

struct PendingShard {
    tensors: Vec<OutputTensor>,
    whole_file: Option<usize>,
    source_name: Option<String>,
    max_bytes: Option<u64>,
}

/// Builds an [`OutputPlan`] from segments: whole files, greedy packs, one-shard-per-source-file.
pub struct PlanBuilder {
    sources: Vec<PathBuf>,
    source_identities: Vec<FileIdentity>,
    source_names: Vec<String>,
    metadata: Vec<(String, String)>,
    pending: Vec<PendingShard>,
}

impl PlanBuilder {
    /// A builder over the files of `checkpoints`, concatenated in order. Returns the builder and
    /// each checkpoint's offset into the combined source list.
    pub fn new(checkpoints: &[&Checkpoint]) -> (PlanBuilder, Vec<usize>) {
        let mut builder = PlanBuilder {
            sources: Vec::new(),
            source_identities: Vec::new(),
            source_names: Vec::new(),
            metadata: vec![("format".to_string(), "pt".to_string())],
            pending: Vec::new(),
        };
        let mut bases = Vec::with_capacity(checkpoints.len());
        for checkpoint in checkpoints {
            bases.push(builder.sources.len());
            for file in &checkpoint.files {
                builder.sources.push(file.path.clone());
                builder.source_identities.push(file.identity);
                builder.source_names.push(file.name.clone());
            }
        }
        (builder, bases)
    }

    /// Re-emits source file `file` as one shard, byte for byte; `tensors` are its contents.
    pub fn whole_file(&mut self, file: usize, tensors: Vec<OutputTensor>) {
        self.pending.push(PendingShard {
            tensors,
            whole_file: Some(file),
            source_name: Some(self.source_names[file].clone()),
            max_bytes: None,
        });
    }

    /// Packs groups greedily, in order, into shards whose files stay within `max_shard_bytes`;
    /// a group too large for any shard gets a shard of its own.
    pub fn pack_greedy(&mut self, groups: Vec<TensorGroup>, max_shard_bytes: u64) {
        let base = shard_overhead_bound(&self.metadata);
        let mut current: Vec<OutputTensor> = Vec::new();
        let mut used = base;
        for group in groups {
            let cost: u64 = group.tensors.iter().map(OutputTensor::header_bound).sum();
            if !current.is_empty() && used.saturating_add(cost) > max_shard_bytes {
                self.push_packed(std::mem::take(&mut current), max_shard_bytes);
                used = base;
            }
            used = used.saturating_add(cost);
            current.extend(group.tensors);
        }
        if !current.is_empty() {
            self.push_packed(current, max_shard_bytes);
        }
    }

    /// Puts each group in a shard of its own source file, one shard per source file, in the
    /// order the files first appear.
    pub fn pack_by_source_file(&mut self, groups: Vec<TensorGroup>) {
        let mut slot_of_file: HashMap<usize, usize> = HashMap::new();
        for group in groups {
            let slot = *slot_of_file.entry(group.home_file).or_insert_with(|| {
                self.pending.push(PendingShard {
                    tensors: Vec::new(),
                    whole_file: None,
                    source_name: Some(self.source_names[group.home_file].clone()),
                    max_bytes: None,
                });
                self.pending.len() - 1
            });
            self.pending[slot].tensors.extend(group.tensors);
        }
    }

    fn push_packed(&mut self, tensors: Vec<OutputTensor>, max_bytes: u64) {
        self.pending.push(PendingShard {
            tensors,
            whole_file: None,
            source_name: None,
            max_bytes: Some(max_bytes),
        });
    }

    /// Names the shards, lays out each one's tensors and header, and checks names are unique.
    pub fn finish(self, naming: ShardNaming) -> Result<OutputPlan> {
        let n = self.pending.len();
        let mut seen_tensors: HashSet<String> = HashSet::new();
        let mut seen_files: HashSet<String> = HashSet::new();
        let mut shards = Vec::with_capacity(n);
        for (i, pending) in self.pending.into_iter().enumerate() {
            let file_name = match (naming, &pending.source_name) {
                (ShardNaming::SourceNames, Some(name)) => name.clone(),
                _ => standard_shard_name(i + 1, n),
            };
            if !seen_files.insert(file_name.clone()) {
                return Err(Error::InvalidPlan {
                    tensor: pending
                        .tensors
                        .first()
                        .map(|t| t.name.clone())
                        .unwrap_or_default(),
                    detail: format!("two output shards would be named {file_name}"),
                });
            }
            for tensor in &pending.tensors {
                if !seen_tensors.insert(tensor.name.clone()) {
                    return Err(Error::InvalidPlan {
                        tensor: tensor.name.clone(),
                        detail: "tensor is planned twice".into(),
                    });
                }
            }
            shards.push(match pending.whole_file {
                Some(file) => whole_file_shard(
                    file_name,
                    file,
                    pending.tensors,
                    &self.source_identities[file],
                ),
                None => assembled_shard(
                    file_name,
                    pending.tensors,
                    &self.metadata,
                    pending.max_bytes,
                ),
            });
        }
        Ok(OutputPlan {
            sources: self.sources,
            source_identities: self.source_identities,
            shards,
        })
    }
}

/// Bytes a shard's header costs before any tensor entry: prefix, braces, metadata, padding.
fn shard_overhead_bound(metadata: &[(String, String)]) -> u64 {
    encode_header(&[], metadata, None).len() as u64 + HEADER_ALIGN
}

fn whole_file_shard(
    file_name: String,
    file: usize,
    tensors: Vec<OutputTensor>,
    identity: &FileIdentity,
) -> ShardPlan {
    let file_len = identity.size;
    let data_len: u64 = tensors.iter().map(|t| t.nbytes).sum();
    let data_start = file_len - data_len;
    let tensors = tensors
        .into_iter()
        .map(|tensor| {
            let begin = match tensor.source {
                TensorSource::Copy { offset, .. } => offset - data_start,
                TensorSource::Provided => 0,
            };
            let end = begin + tensor.nbytes;
            PlacedTensor {
                tensor,
                data_offsets: (begin, end),
            }
        })
        .collect();
    ShardPlan {
        file_name,
        kind: ShardKind::WholeFile { file },
        tensors,
        file_len,
    }
}

fn assembled_shard(
    file_name: String,
    mut tensors: Vec<OutputTensor>,
    metadata: &[(String, String)],
    max_bytes: Option<u64>,
) -> ShardPlan {
    // Larger elements first keeps every offset a multiple of its element size (the data
    // buffer starts on a multiple of 8); the sort is stable, so source order survives within
    // each element size and source-contiguous runs stay contiguous.
    tensors.sort_by_key(|t| std::cmp::Reverse(alignment(t.dtype)));
    let mut offset = 0u64;
    let placed: Vec<PlacedTensor> = tensors
        .into_iter()
        .map(|tensor| {
            let begin = offset;
            offset += tensor.nbytes;
            PlacedTensor {
                tensor,
                data_offsets: (begin, offset),
            }
        })
        .collect();
    let data_len = offset;
    let entries: Vec<HeaderEntry<'_>> = placed
        .iter()
        .map(|p| HeaderEntry {
            name: &p.tensor.name,
            dtype: p.tensor.dtype,
            shape: &p.tensor.shape,
            data_offsets: p.data_offsets,
        })
        .collect();
    let mut header = encode_header(&entries, metadata, None);
    if let Some(residue) = longest_run_residue(&placed) {
        let padded = encode_header(&entries, metadata, Some(residue));
        // Padding may not push a shard over its limit, unless it is an oversize singleton.
        let fits = match max_bytes {
            Some(max) => {
                padded.len() as u64 + data_len <= max || header.len() as u64 + data_len > max
            }
            None => true,
        };
        if fits {
            header = padded;
        }
    }
    let file_len = header.len() as u64 + data_len;
    debug_assert!(header.len() as u64 >= LEN_PREFIX);
    ShardPlan {
        file_name,
        kind: ShardKind::Assembled { header },
        tensors: placed,
        file_len,
    }
}

/// The data-start residue (mod [`PAGE_SIZE`]) that puts the shard's longest source-contiguous
/// run at the same page offset as in its source file, when one exists and is worth it.
fn longest_run_residue(placed: &[PlacedTensor]) -> Option<u64> {
    let mut best: Option<(u64, u64, u64)> = None; // (run bytes, source offset, shard offset)
    let mut i = 0;
    while i < placed.len() {
        let TensorSource::Copy { file, offset } = placed[i].tensor.source else {
            i += 1;
            continue;
        };
        let start = placed[i].data_offsets.0;
        let mut next_source = offset + placed[i].tensor.nbytes;
        let mut j = i + 1;
        while j < placed.len() {
            match placed[j].tensor.source {
                TensorSource::Copy { file: f, offset: o } if f == file && o == next_source => {
                    next_source += placed[j].tensor.nbytes;
                    j += 1;
                }
                _ => break,
            }
        }
        let bytes = next_source - offset;
        if best.is_none_or(|(b, _, _)| bytes > b) {
            best = Some((bytes, offset, start));
        }
        i = j;
    }
    let (bytes, source_offset, shard_offset) = best?;
    let residue = (source_offset + PAGE_SIZE - shard_offset % PAGE_SIZE) % PAGE_SIZE;
    (bytes >= MIN_ALIGNED_RUN && residue % HEADER_ALIGN == 0).then_some(residue)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copied(name: &str, dtype: Dtype, n: u64, file: usize, offset: u64) -> OutputTensor {
        let nbytes = byte_size(dtype, &[n]).unwrap();
        OutputTensor {
            name: name.into(),
            dtype,
            shape: vec![n],
            nbytes,
            source: TensorSource::Copy { file, offset },
        }
    }

    fn builder(files: usize) -> PlanBuilder {
        PlanBuilder {
            sources: (0..files).map(|i| PathBuf::from(format!("s{i}"))).collect(),
            source_identities: vec![
                FileIdentity {
                    dev: 0,
                    ino: 0,
                    size: 0,
                    mtime_ns: 0,
                    ctime_ns: 0
                };
                files
            ],
            source_names: (0..files).map(|i| format!("s{i}.safetensors")).collect(),
            metadata: vec![("format".into(), "pt".into())],
            pending: Vec::new(),
        }
    }

    fn single(t: OutputTensor, home_file: usize) -> TensorGroup {
        TensorGroup {
            tensors: vec![t],
            home_file,
        }
    }

    #[test]
    fn greedy_packing_respects_the_limit_and_isolates_oversize_tensors() {
        let mut b = builder(1);
        let groups = vec![
            single(copied("a", Dtype::U8, 400, 0, 100), 0),
            single(copied("b", Dtype::U8, 400, 0, 500), 0),
            single(copied("huge", Dtype::U8, 5000, 0, 900), 0),
            single(copied("c", Dtype::U8, 100, 0, 5900), 0),
        ];
        b.pack_greedy(groups, 1100);
        let plan = b.finish(ShardNaming::Standard).unwrap();
        let names: Vec<Vec<&str>> = plan
            .shards
            .iter()
            .map(|s| s.tensors.iter().map(|t| t.tensor.name.as_str()).collect())
            .collect();
        assert_eq!(names, vec![vec!["a", "b"], vec!["huge"], vec!["c"]]);
        for shard in &plan.shards {
            assert!(shard.file_len <= 1100 || shard.tensors.len() == 1);
        }
        assert_eq!(plan.shards[2].file_name, "model-00003-of-00003.safetensors");
        assert_eq!(plan.total_size(), 5900);
    }

    #[test]
    fn larger_elements_come_first_and_offsets_are_aligned() {
        let mut b = builder(1);
        b.pack_greedy(
            vec![
                single(copied("byte", Dtype::U8, 3, 0, 0), 0),
                single(copied("half", Dtype::BF16, 3, 0, 3), 0),
                single(copied("word", Dtype::F32, 1, 0, 9), 0),
                single(copied("dbl", Dtype::F64, 1, 0, 13), 0),
            ],
            1 << 30,
        );
        let plan = b.finish(ShardNaming::Standard).unwrap();
        let shard = &plan.shards[0];
        let order: Vec<&str> = shard
            .tensors
            .iter()
            .map(|t| t.tensor.name.as_str())
            .collect();
        assert_eq!(order, ["dbl", "word", "half", "byte"]);
        assert_eq!(shard.data_start() % HEADER_ALIGN, 0);
        for t in &shard.tensors {
            assert_eq!(t.data_offsets.0 % alignment(t.tensor.dtype), 0);
        }
    }

    #[test]
    fn header_is_padded_so_the_longest_run_keeps_its_page_offset() {
        let mut b = builder(1);
        let mb = 1 << 20;
        b.pack_greedy(
            vec![
                single(copied("x", Dtype::U8, mb, 0, 8 * 1000 + 24), 0),
                single(copied("y", Dtype::U8, mb, 0, 8 * 1000 + 24 + mb), 0),
            ],
            1 << 30,
        );
        let plan = b.finish(ShardNaming::Standard).unwrap();
        let shard = &plan.shards[0];
        assert_eq!(shard.data_start() % PAGE_SIZE, (8 * 1000 + 24) % PAGE_SIZE);
    }

    #[test]
    fn keep_layout_uses_source_names_and_groups_stay_together() {
        let mut b = builder(2);
        let groups = vec![
            TensorGroup {
                tensors: vec![
                    OutputTensor::provided("w".into(), Dtype::F8_E4M3, vec![2, 2]).unwrap(),
                    OutputTensor::provided("w_scale_inv".into(), Dtype::F32, vec![1, 1]).unwrap(),
                ],
                home_file: 1,
            },
            single(copied("n", Dtype::BF16, 2, 0, 8), 0),
        ];
        b.pack_by_source_file(groups);
        let plan = b.finish(ShardNaming::SourceNames).unwrap();
        assert_eq!(plan.shards[0].file_name, "s1.safetensors");
        assert_eq!(plan.shards[0].tensors[0].tensor.name, "w_scale_inv");
        assert_eq!(plan.shards[1].file_name, "s0.safetensors");
    }

    #[test]
    fn a_tensor_planned_twice_is_refused() {
        let mut b = builder(1);
        b.pack_greedy(
            vec![
                single(copied("a", Dtype::U8, 1, 0, 0), 0),
                single(copied("a", Dtype::U8, 1, 0, 1), 0),
            ],
            1 << 30,
        );
        let err = b.finish(ShardNaming::Standard).unwrap_err();
        assert_eq!(err.to_string(), "tensor 'a': tensor is planned twice");
    }
}
