//! A checkpoint directory seen through its headers: which files hold which tensors, where.
//!
//! Tensors are found through `model.safetensors.index.json` when there is one (index order),
//! otherwise by scanning `*.safetensors` in natural order (`rank2` before `rank10`) and each
//! header in offset order. No tensor data is read.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::dtype::{element_count, Dtype};
use crate::error::{Error, Result};
use crate::format::{INDEX_FILE, SINGLE_FILE};
use crate::header::{read_header_of, ShardHeader};
use crate::index::{read_index, ShardIndex};
use crate::regular_file::{
    advise_will_need, open_regular, read_exact_at, read_exact_at_parallel, regular_metadata,
    FileIdentity,
};

/// Kept at its first home for callers; it lives in [`crate::format`].
pub use crate::format::standard_shard_name;

/// How the checkpoint's tensors were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Through `model.safetensors.index.json`.
    Indexed,
    /// A lone `model.safetensors`, no index.
    SingleFile,
    /// One or more `*.safetensors` without an index (engine-named shards).
    Unindexed,
}

/// One `*.safetensors` file of the checkpoint.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// File name inside the checkpoint directory.
    pub name: String,
    pub path: PathBuf,
    pub header: ShardHeader,
    /// The file as it was when its header was read.
    pub identity: FileIdentity,
}

/// One tensor of the checkpoint and where its bytes are.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Offsets relative to the file's data buffer, as in the header.
    pub data_offsets: (u64, u64),
    /// Absolute offset of the first byte in the file.
    pub file_offset: u64,
}

impl TensorEntry {
    /// Bytes of tensor data.
    pub fn nbytes(&self) -> u64 {
        self.data_offsets.1 - self.data_offsets.0
    }

    /// Number of elements (1 for a 0-d tensor).
    pub fn numel(&self) -> u64 {
        element_count(&self.shape).unwrap_or(0)
    }
}

/// One tensor's file, open for checked positional reads of the tensor's bytes (see
/// [`Checkpoint::open_tensor`]): never a mapping, so a source truncated meanwhile is an error,
/// not a SIGBUS.
#[derive(Debug)]
pub struct OpenTensor<'a> {
    source: &'a SourceFile,
    name: &'a str,
    file: File,
    /// Absolute offset of the tensor's first byte in the file.
    offset: u64,
    len: u64,
}

impl OpenTensor<'_> {
    /// Bytes of the tensor.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the tensor has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills `buf` with the tensor's bytes from byte `start` of the tensor on. A range beyond
    /// the tensor is refused (never a read of the next one); a file that ends early changed
    /// since it was opened, an error saying so.
    pub fn read_at(&self, start: u64, buf: &mut [u8]) -> Result<()> {
        if start
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            let detail = format!(
                "bytes {start}..{} of tensor '{}', which has {}",
                start.saturating_add(buf.len() as u64),
                self.name,
                self.len
            );
            let invalid = std::io::Error::new(std::io::ErrorKind::InvalidInput, detail);
            return Err(Error::io(&self.source.path, invalid));
        }
        read_exact_at(&self.file, &self.source.path, self.offset + start, buf)
    }

    /// Checks that the file is still the version the checkpoint opened (after the reads: with
    /// the check [`Checkpoint::open_tensor`] made, the bytes read are that version's).
    pub fn verify(&self) -> Result<()> {
        self.source.identity.verify(&self.source.path, &self.file)
    }
}

/// A validated checkpoint directory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub layout: Layout,
    pub files: Vec<SourceFile>,
    /// Tensors in checkpoint order.
    pub tensors: Vec<TensorEntry>,
    /// The index, when the layout is [`Layout::Indexed`].
    pub index: Option<ShardIndex>,
    /// `*.safetensors` files in the directory that the index does not reference.
    pub unreferenced_files: Vec<String>,
    by_name: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens `dir`, reading and cross-checking every header (and the index, if present). Every
    /// shard must be (a symlink to) a regular file; anything else named `*.safetensors` is an
    /// error, never silently skipped.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        if !meta.is_dir() {
            return Err(Error::NotADirectory { path: dir.into() });
        }
        let scanned = scan_safetensors(dir)?;
        let index_path = dir.join(INDEX_FILE);
        // Present in any form (a dangling link too): an index that cannot be read is an error,
        // not a reason to fall back to scanning.
        if std::fs::symlink_metadata(&index_path).is_ok() {
            let index = read_index(&index_path)?;
            return open_indexed(dir, index, scanned);
        }
        if scanned.is_empty() {
            return Err(Error::NoSafetensors { dir: dir.into() });
        }
        let layout = if scanned.len() == 1 && scanned[0] == SINGLE_FILE {
            Layout::SingleFile
        } else {
            Layout::Unindexed
        };
        let files = load_files(dir, scanned)?;
        let mut checkpoint = Checkpoint {
            dir: dir.into(),
            layout,
            files,
            tensors: Vec::new(),
            index: None,
            unreferenced_files: Vec::new(),
            by_name: HashMap::new(),
        };
        let order: Vec<(usize, usize)> = checkpoint
            .files
            .iter()
            .enumerate()
            .flat_map(|(f, file)| (0..file.header.tensors.len()).map(move |t| (f, t)))
            .collect();
        checkpoint.fill_tensors(order)?;
        Ok(checkpoint)
    }

    /// Looks a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Opens tensor `entry`'s file for [`OpenTensor::read_at`], checking that it is still the
    /// file it was when the checkpoint was opened.
    pub fn open_tensor<'a>(&'a self, entry: &'a TensorEntry) -> Result<OpenTensor<'a>> {
        let source = &self.files[entry.file];
        let (file, _) = open_regular(&source.path)?;
        source.identity.verify(&source.path, &file)?;
        Ok(OpenTensor {
            source,
            name: &entry.name,
            file,
            offset: entry.file_offset,
            len: entry.nbytes(),
        })
    }

    /// Asks the kernel to start reading tensor `entry`'s bytes from disk in the background, for
    /// a read soon after: the reads then find them cached. Only a hint, so it never fails: a file
    /// that cannot be opened is reported by the read that follows.
    pub fn prefetch(&self, entry: &TensorEntry) {
        if let Ok((file, _)) = open_regular(&self.files[entry.file].path) {
            advise_will_need(&file, entry.file_offset, entry.nbytes());
        }
    }

    /// Reads tensor `entry`'s bytes into `buf` (exactly `entry.nbytes()` long) with positional
    /// reads, never a mapping: a source truncated meanwhile is an error, not a SIGBUS. The file
    /// must still be what it was when the checkpoint was opened, before and after the read.
    pub fn read_tensor(&self, entry: &TensorEntry, buf: &mut [u8]) -> Result<()> {
        if buf.len() as u64 != entry.nbytes() {
            let detail = format!(
                "a buffer of {} bytes for tensor '{}' of {} bytes",
                buf.len(),
                entry.name,
                entry.nbytes()
            );
            let invalid = std::io::Error::new(std::io::ErrorKind::InvalidInput, detail);
            return Err(Error::io(&self.files[entry.file].path, invalid));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let tensor = self.open_tensor(entry)?;
        read_exact_at_parallel(&tensor.file, &tensor.source.path, tensor.offset, buf)?;
        tensor.verify()
    }

    /// Sum of tensor bytes (what `metadata.total_size` should say).
    pub fn total_size(&self) -> u64 {
        self.tensors.iter().map(TensorEntry::nbytes).sum()
    }

    /// Sum of element counts.
    pub fn total_parameters(&self) -> u64 {
        self.tensors.iter().map(TensorEntry::numel).sum()
    }

    /// Whether the shard files are exactly HF's `model-{i:05d}-of-{n:05d}.safetensors`, i in
    /// 1..=n, with an index.
    pub fn has_standard_names(&self) -> bool {
        let n = self.files.len();
        let mut names: Vec<&str> = self.files.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        self.layout == Layout::Indexed
            && n > 0
            && names
                .iter()
                .enumerate()
                .all(|(i, name)| *name == standard_shard_name(i + 1, n))
    }

    /// Adds tensors in the given (file, position-in-header) order and checks names are unique
    /// and that there is at least one.
    fn fill_tensors(&mut self, order: Vec<(usize, usize)>) -> Result<()> {
        if order.is_empty() {
            return Err(Error::EmptyCheckpoint {
                dir: self.dir.clone(),
            });
        }
        self.tensors.reserve(order.len());
        for (f, t) in order {
            let file = &self.files[f];
            let info = &file.header.tensors[t];
            if let Some(&other) = self.by_name.get(&info.name) {
                return Err(Error::DuplicateTensor {
                    tensor: info.name.clone(),
                    first: self.files[self.tensors[other].file].path.clone(),
                    second: file.path.clone(),
                });
            }
            self.by_name.insert(info.name.clone(), self.tensors.len());
            self.tensors.push(TensorEntry {
                name: info.name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                file: f,
                data_offsets: info.data_offsets,
                file_offset: file.header.data_start() + info.data_offsets.0,
            });
        }
        Ok(())
    }
}

fn open_indexed(dir: &Path, index: ShardIndex, scanned: Vec<String>) -> Result<Checkpoint> {
    let (file_of_name, file_names) = indexed_files(dir, &index)?;
    let files = load_files(dir, file_names)?;
    let located = locate_tensors(&files)?;
    let mut order = Vec::with_capacity(index.weight_map.len());
    for (tensor, shard) in &index.weight_map {
        let listed_in = file_of_name[shard.as_str()];
        match located.get(tensor.as_str()) {
            Some(&(f, t)) if f == listed_in => order.push((f, t)),
            _ => {
                return Err(Error::MissingFromShard {
                    file: files[listed_in].path.clone(),
                    tensor: tensor.clone(),
                })
            }
        }
    }
    if order.len() != located.len() {
        return Err(first_unindexed(&index, &files));
    }
    let unreferenced_files = scanned
        .into_iter()
        .filter(|name| !file_of_name.contains_key(name.as_str()))
        .collect();
    let mut checkpoint = Checkpoint {
        dir: dir.into(),
        layout: Layout::Indexed,
        files,
        tensors: Vec::new(),
        index: Some(index),
        unreferenced_files,
        by_name: HashMap::new(),
    };
    checkpoint.fill_tensors(order)?;
    Ok(checkpoint)
}

/// The shard files the index names, in order of first mention, and each one's position. A
/// shard that is absent is `MissingShard`; one that is not a regular file says what it is.
fn indexed_files(dir: &Path, index: &ShardIndex) -> Result<(HashMap<String, usize>, Vec<String>)> {
    let mut file_of_name: HashMap<String, usize> = HashMap::new();
    let mut file_names: Vec<String> = Vec::new();
    for (tensor, shard) in &index.weight_map {
        if file_of_name.contains_key(shard) {
            continue;
        }
        let path = dir.join(shard);
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(Error::MissingShard {
                file: index.path.clone(),
                tensor: tensor.clone(),
                shard: shard.clone(),
            });
        }
        regular_metadata(&path)?;
        file_of_name.insert(shard.clone(), file_names.len());
        file_names.push(shard.clone());
    }
    Ok((file_of_name, file_names))
}

/// Where each header says each tensor is, as (file, position in header); a name in two headers
/// is an error.
fn locate_tensors(files: &[SourceFile]) -> Result<HashMap<&str, (usize, usize)>> {
    let mut located: HashMap<&str, (usize, usize)> = HashMap::new();
    for (f, file) in files.iter().enumerate() {
        for (t, info) in file.header.tensors.iter().enumerate() {
            if let Some(&(first, _)) = located.get(info.name.as_str()) {
                return Err(Error::DuplicateTensor {
                    tensor: info.name.clone(),
                    first: files[first].path.clone(),
                    second: file.path.clone(),
                });
            }
            located.insert(&info.name, (f, t));
        }
    }
    Ok(located)
}

/// The error for the first tensor (in file order) that a shard holds but the index does not list.
fn first_unindexed(index: &ShardIndex, files: &[SourceFile]) -> Error {
    let listed: HashSet<&str> = index.weight_map.iter().map(|(t, _)| t.as_str()).collect();
    files
        .iter()
        .find_map(|file| {
            let info = file
                .header
                .tensors
                .iter()
                .find(|t| !listed.contains(t.name.as_str()))?;
            Some(Error::NotInIndex {
                file: file.path.clone(),
                tensor: info.name.clone(),
            })
        })
        .expect("more tensors located than listed means one is unlisted")
}

/// Reads the headers of `names` (in `dir`) on all cores; the first failing file, in `names`
/// order, is the error reported.
fn load_files(dir: &Path, names: Vec<String>) -> Result<Vec<SourceFile>> {
    let load = |name: String| -> Result<SourceFile> {
        let path = dir.join(&name);
        let (file, identity) = open_regular(&path)?;
        let header = read_header_of(&file, &path, identity.size)?;
        Ok(SourceFile {
            name,
            path,
            header,
            identity,
        })
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(names.len());
    if threads <= 1 {
        return names.into_iter().map(load).collect();
    }
    let per_thread = names.len().div_ceil(threads);
    let mut chunks: Vec<Vec<String>> = Vec::new();
    let mut names = names.into_iter().peekable();
    while names.peek().is_some() {
        chunks.push(names.by_ref().take(per_thread).collect());
    }
    let loaded: Vec<Vec<Result<SourceFile>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| scope.spawn(move || chunk.into_iter().map(load).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("header reader panicked"))
            .collect()
    });
    loaded.into_iter().flatten().collect()
}

/// Names of the `*.safetensors` files directly in `dir`, dotfiles skipped, in natural order.
/// Each must be (a symlink to) a regular file: a FIFO, a directory, a device or a dangling
/// symlink of that name is an error naming it.
fn scan_safetensors(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') || !name.ends_with(".safetensors") {
            continue;
        }
        regular_metadata(&entry.path())?;
        names.push(name);
    }
    names.sort_by(|a, b| natural_cmp(a, b));
    Ok(names)
}

/// Orders strings with digit runs compared as numbers: `rank2` < `rank10`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    while !x.is_empty() && !y.is_empty() {
        let (cx, cy) = (x[0], y[0]);
        if cx.is_ascii_digit() && cy.is_ascii_digit() {
            let run_x = x.iter().take_while(|c| c.is_ascii_digit()).count();
            let run_y = y.iter().take_while(|c| c.is_ascii_digit()).count();
            let trim = |s: &[u8]| -> usize { s.iter().take_while(|&&c| c == b'0').count() };
            let (dx, dy) = (&x[trim(&x[..run_x])..run_x], &y[trim(&y[..run_y])..run_y]);
            let by_value = dx.len().cmp(&dy.len()).then_with(|| dx.cmp(dy));
            if by_value != Ordering::Equal {
                return by_value;
            }
            x = &x[run_x..];
            y = &y[run_y..];
        } else {
            if cx != cy {
                return cx.cmp(&cy);
            }
            x = &x[1..];
            y = &y[1..];
        }
    }
    x.len().cmp(&y.len()).then_with(|| a.cmp(b))
}

/// Checkpoints made for the kernels' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// `dir/model.safetensors` holding `tensors` (name, dtype, shape, little-endian bytes),
    /// opened.
    pub fn single_file_checkpoint(
        dir: &Path,
        tensors: &[(&str, safetensors::Dtype, &[usize], &[u8])],
    ) -> Checkpoint {
        let views = tensors.iter().map(|&(name, dtype, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(dtype, shape.to_vec(), bytes).unwrap();
            (name, view)
        });
        let file = safetensors::tensor::serialize(views, None).unwrap();
        std::fs::write(dir.join(SINGLE_FILE), file).unwrap();
        Checkpoint::open(dir).unwrap()
    }

    /// Rewrites byte `offset` of `path` in place (same size, a new ctime), after a pause long
    /// enough for the file system's clock to move on.
    pub fn rewrite_in_place(path: &Path, offset: u64) {
        use std::os::unix::fs::FileExt;
        std::thread::sleep(std::time::Duration::from_millis(20));
        let file = File::options().read(true).write(true).open(path).unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, offset).unwrap();
        file.write_all_at(&[byte[0] ^ 1], offset).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_that_is_not_a_regular_file_is_an_error_not_a_reason_to_scan() {
        let dir = tempfile::tempdir().unwrap();
        let header = br#"{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.push(7);
        std::fs::write(dir.path().join("a.safetensors"), &file).unwrap();
        let index = dir.path().join(INDEX_FILE);
        std::os::unix::fs::symlink("gone.json", &index).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err();
        assert_eq!(err.kind(), "not_a_regular_file");
        assert!(err.to_string().contains("is a dangling symlink"), "{err}");

        std::fs::remove_file(&index).unwrap();
        rustix::fs::mkfifoat(rustix::fs::CWD, &index, rustix::fs::Mode::RUSR).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("is a FIFO"), "{err}");

        std::fs::remove_file(&index).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let mut byte = [0u8];
        checkpoint
            .read_tensor(&checkpoint.tensors[0], &mut byte)
            .unwrap();
        assert_eq!(byte, [7]);
    }

    #[test]
    fn an_open_tensor_reads_only_its_own_bytes_and_notices_a_shrunk_file() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..100).collect();
        let checkpoint = testing::single_file_checkpoint(
            dir.path(),
            &[
                ("a", safetensors::Dtype::U8, &[40], &bytes[..40]),
                ("b", safetensors::Dtype::U8, &[60], &bytes[40..]),
            ],
        );
        let entry = checkpoint.tensor("b").unwrap();
        let tensor = checkpoint.open_tensor(entry).unwrap();
        assert_eq!(tensor.len(), 60);
        let mut part = [0u8; 5];
        tensor.read_at(55, &mut part).unwrap();
        assert_eq!(part, [95, 96, 97, 98, 99]);
        let path = dir.path().join(SINGLE_FILE);
        let err = tensor.read_at(56, &mut part).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: bytes 56..61 of tensor 'b', which has 60",
                path.display()
            )
        );
        tensor.verify().unwrap();

        let end = entry.file_offset + 60;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(end - 10)
            .unwrap();
        let err = tensor.read_at(40, &mut [0u8; 20]).unwrap_err();
        assert_eq!(err.kind(), "source_changed");
        assert!(
            err.to_string()
                .contains(&format!("it shrank: it ends before byte {end}")),
            "{err}"
        );
        assert!(tensor
            .verify()
            .unwrap_err()
            .to_string()
            .contains("bytes, now"));
        let err = checkpoint.open_tensor(entry).unwrap_err();
        assert_eq!(err.kind(), "source_changed");
        checkpoint.prefetch(entry);
    }

    #[test]
    fn natural_order_compares_numbers() {
        let mut names = vec![
            "model-rank10.safetensors",
            "model-rank2.safetensors",
            "model-rank1.safetensors",
            "a.safetensors",
            "model-rank02.safetensors",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            [
                "a.safetensors",
                "model-rank1.safetensors",
                "model-rank02.safetensors",
                "model-rank2.safetensors",
                "model-rank10.safetensors"
            ]
        );
    }
}
