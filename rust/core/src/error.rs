//! One error type for the whole core. Every variant names the file (and the tensor, where there is
//! one) so the binding layer can turn it into a single readable line.

use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::format::MAX_HEADER_LEN;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading, planning or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call on `path` failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A path that must be a regular file (a shard, an index, an aux file) is something else:
    /// a directory, a FIFO, a device, a socket, or a symlink that leads nowhere.
    #[error("{}: is {what}, not a regular file; only regular files (or symlinks to them) are read", file.display())]
    NotARegularFile { file: PathBuf, what: &'static str },

    /// A source file differs from what it was when the checkpoint was opened (rewritten,
    /// truncated or replaced while this run read it).
    #[error("{}: changed while being read ({detail}); rerun once nothing writes to it", file.display())]
    SourceChanged { file: PathBuf, detail: String },

    /// A file read whole (`config.json`) is larger than any real one of its kind.
    #[error("{}: is {size} bytes, over the {limit}-byte limit for this file; is it the right file?", file.display())]
    FileTooLarge {
        file: PathBuf,
        size: u64,
        limit: u64,
    },

    /// The file cannot even hold the 8-byte header length.
    #[error("{}: file is {len} bytes, too short to hold a safetensors header", file.display())]
    FileTooShort { file: PathBuf, len: u64 },

    /// The declared header length is above the reference reader's cap.
    #[error("{}: header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes", file.display())]
    HeaderTooLarge { file: PathBuf, header_len: u64 },

    /// The declared header length points past the end of the file (truncated file).
    #[error("{}: header length {header_len} runs past the end of the file ({file_len} bytes); the file is truncated or not safetensors", file.display())]
    HeaderPastEof {
        file: PathBuf,
        header_len: u64,
        file_len: u64,
    },

    /// The header bytes are not a JSON object of the expected form.
    #[error("{}: header is not valid safetensors JSON: {detail}", file.display())]
    HeaderNotJson { file: PathBuf, detail: String },

    /// A key appears twice in one header.
    #[error("{}: tensor '{tensor}' appears twice in the header", file.display())]
    DuplicateInHeader { file: PathBuf, tensor: String },

    /// An entry's dtype is not one of the safetensors dtypes.
    #[error("{}: tensor '{tensor}': unknown dtype '{dtype}'", file.display())]
    UnknownDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },

    /// An entry is malformed (missing field, wrong type, begin after end, overflowing shape).
    #[error("{}: tensor '{tensor}': {detail}", file.display())]
    InvalidTensorEntry {
        file: PathBuf,
        tensor: String,
        detail: String,
    },

    /// `end - begin` disagrees with `prod(shape) * itemsize`.
    #[error("{}: tensor '{tensor}': data_offsets [{begin}, {end}) hold {} bytes but shape {shape:?} of {dtype} needs {expected}", file.display(), end - begin)]
    SizeMismatch {
        file: PathBuf,
        tensor: String,
        dtype: Dtype,
        shape: Vec<u64>,
        begin: u64,
        end: u64,
        expected: u64,
    },

    /// Two tensors share bytes.
    #[error("{}: tensor '{tensor}': data_offsets [{begin}, {end}) overlap tensor '{other}'", file.display())]
    OverlappingTensors {
        file: PathBuf,
        tensor: String,
        other: String,
        begin: u64,
        end: u64,
    },

    /// Bytes between two tensors belong to none.
    #[error("{}: tensor '{tensor}': {gap} unused bytes before its data_offsets begin at {begin}", file.display())]
    GapBeforeTensor {
        file: PathBuf,
        tensor: String,
        gap: u64,
        begin: u64,
    },

    /// A tensor's range ends beyond the data buffer.
    #[error("{}: tensor '{tensor}': data_offsets [{begin}, {end}) run past the end of the data buffer ({buffer_len} bytes); the file is truncated", file.display())]
    OffsetsOutOfRange {
        file: PathBuf,
        tensor: String,
        begin: u64,
        end: u64,
        buffer_len: u64,
    },

    /// The data buffer holds bytes after the last tensor.
    #[error("{}: {trailing} bytes after the last tensor belong to no tensor", file.display())]
    TrailingBytes { file: PathBuf, trailing: u64 },

    /// `model.safetensors.index.json` is not of the expected form.
    #[error("{}: invalid index: {detail}", file.display())]
    InvalidIndex { file: PathBuf, detail: String },

    /// A weight_map value is absolute, has `..` or a path separator.
    #[error("{}: tensor '{tensor}' maps to '{shard}', which is not a plain file name inside the checkpoint directory", file.display())]
    UnsafeShardName {
        file: PathBuf,
        tensor: String,
        shard: String,
    },

    /// A weight_map value names a file that does not exist.
    #[error("{}: tensor '{tensor}' maps to shard '{shard}', which does not exist", file.display())]
    MissingShard {
        file: PathBuf,
        tensor: String,
        shard: String,
    },

    /// The same tensor name is stored in two files.
    #[error("tensor '{tensor}' is stored in both {} and {}", first.display(), second.display())]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },

    /// The index maps a tensor to a shard whose header lacks it.
    #[error("{}: tensor '{tensor}' is listed in the index but absent from this shard", file.display())]
    MissingFromShard { file: PathBuf, tensor: String },

    /// A shard referenced by the index holds a tensor the index does not list.
    #[error("{}: tensor '{tensor}' is in this shard but not in the index", file.display())]
    NotInIndex { file: PathBuf, tensor: String },

    /// The directory holds no safetensors file at all.
    #[error("{}: no *.safetensors files and no model.safetensors.index.json found", dir.display())]
    NoSafetensors { dir: PathBuf },

    /// The checkpoint's files hold no tensor at all (likely the wrong directory).
    #[error("{}: the checkpoint holds no tensors", dir.display())]
    EmptyCheckpoint { dir: PathBuf },

    /// A checkpoint path is not a directory.
    #[error("{}: not a directory", path.display())]
    NotADirectory { path: PathBuf },

    /// The output directory is the source directory.
    #[error("{}: output is the source directory; choose a separate output directory", output.display())]
    OutputIsSource { output: PathBuf },

    /// The output directory lies inside a source directory.
    #[error("{}: output lies inside source {}; choose a directory outside it", output.display(), source_dir.display())]
    OutputInsideSource {
        output: PathBuf,
        source_dir: PathBuf,
    },

    /// A source directory lies inside the output directory.
    #[error("{}: source {} lies inside this output directory; choose another output", output.display(), source_dir.display())]
    SourceInsideOutput {
        output: PathBuf,
        source_dir: PathBuf,
    },

    /// A requested output tensor is inconsistent (unknown source, bad size, duplicate name).
    #[error("tensor '{tensor}': {detail}")]
    InvalidPlan { tensor: String, detail: String },

    /// Bytes handed to a shard writer do not fit the planned tensor.
    #[error("{}: tensor '{tensor}': {detail}", file.display())]
    WriteRejected {
        file: PathBuf,
        tensor: String,
        detail: String,
    },

    /// A shard was finished while a planned tensor had not been written.
    #[error("{}: tensor '{tensor}' was planned but never written", file.display())]
    TensorNotWritten { file: PathBuf, tensor: String },

    /// Quantization input does not match its declared dtype and shape.
    #[error("tensor '{tensor}': {detail}")]
    InvalidQuantizeInput { tensor: String, detail: String },

    /// The caller asked to stop (Ctrl-C, or a progress callback that failed).
    #[error("cancelled")]
    Cancelled,
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A short stable identifier of the variant, for scripts and tests.
    pub fn kind(&self) -> &'static str {
        self.subject().kind
    }

    /// The file the error is about, when there is one.
    pub fn file(&self) -> Option<&Path> {
        self.subject().file
    }

    /// The tensor the error is about, when there is one.
    pub fn tensor(&self) -> Option<&str> {
        self.subject().tensor
    }

    /// Kind, file and tensor of every variant, in one exhaustive match: a new variant does not
    /// compile until it says all three.
    pub fn subject(&self) -> Subject<'_> {
        use Error::*;
        let (kind, file, tensor): (_, Option<&PathBuf>, Option<&String>) = match self {
            Io { path, .. } => ("io", Some(path), None),
            NotARegularFile { file, .. } => ("not_a_regular_file", Some(file), None),
            SourceChanged { file, .. } => ("source_changed", Some(file), None),
            FileTooLarge { file, .. } => ("file_too_large", Some(file), None),
            FileTooShort { file, .. } => ("file_too_short", Some(file), None),
            HeaderTooLarge { file, .. } => ("header_too_large", Some(file), None),
            HeaderPastEof { file, .. } => ("header_past_eof", Some(file), None),
            HeaderNotJson { file, .. } => ("header_not_json", Some(file), None),
            DuplicateInHeader { file, tensor } => ("duplicate_in_header", Some(file), Some(tensor)),
            UnknownDtype { file, tensor, .. } => ("unknown_dtype", Some(file), Some(tensor)),
            InvalidTensorEntry { file, tensor, .. } => {
                ("invalid_tensor_entry", Some(file), Some(tensor))
            }
            SizeMismatch { file, tensor, .. } => ("size_mismatch", Some(file), Some(tensor)),
            OverlappingTensors { file, tensor, .. } => {
                ("overlapping_tensors", Some(file), Some(tensor))
            }
            GapBeforeTensor { file, tensor, .. } => ("gap_before_tensor", Some(file), Some(tensor)),
            OffsetsOutOfRange { file, tensor, .. } => {
                ("offsets_out_of_range", Some(file), Some(tensor))
            }
            TrailingBytes { file, .. } => ("trailing_bytes", Some(file), None),
            InvalidIndex { file, .. } => ("invalid_index", Some(file), None),
            UnsafeShardName { file, tensor, .. } => ("unsafe_shard_name", Some(file), Some(tensor)),
            MissingShard { file, tensor, .. } => ("missing_shard", Some(file), Some(tensor)),
            DuplicateTensor { tensor, second, .. } => {
                ("duplicate_tensor", Some(second), Some(tensor))
            }
            MissingFromShard { file, tensor } => ("missing_from_shard", Some(file), Some(tensor)),
            NotInIndex { file, tensor } => ("not_in_index", Some(file), Some(tensor)),
            NoSafetensors { dir } => ("no_safetensors", Some(dir), None),
            EmptyCheckpoint { dir } => ("empty_checkpoint", Some(dir), None),
            NotADirectory { path } => ("not_a_directory", Some(path), None),
            OutputIsSource { output } => ("output_is_source", Some(output), None),
            OutputInsideSource { output, .. } => ("output_inside_source", Some(output), None),
            SourceInsideOutput { output, .. } => ("source_inside_output", Some(output), None),
            InvalidPlan { tensor, .. } => ("invalid_plan", None, Some(tensor)),
            WriteRejected { file, tensor, .. } => ("write_rejected", Some(file), Some(tensor)),
            TensorNotWritten { file, tensor } => ("tensor_not_written", Some(file), Some(tensor)),
            InvalidQuantizeInput { tensor, .. } => ("invalid_quantize_input", None, Some(tensor)),
            Cancelled => ("cancelled", None, None),
        };
        Subject {
            kind,
            file: file.map(PathBuf::as_path),
            tensor: tensor.map(String::as_str),
        }
    }
}

/// What an [`Error`] is about: a stable kind, and the file and tensor it names (where it names
/// one). The binding turns these into `NormalizeError.kind`, `.file` and `.tensor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject<'a> {
    pub kind: &'static str,
    pub file: Option<&'a Path>,
    pub tensor: Option<&'a str>,
}
