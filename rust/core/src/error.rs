//! One error type for the whole core. Every variant names the file (and the tensor, where there is
//! one) so the binding layer can turn it into a single readable line.

use std::path::{Path, PathBuf};

use safetensors::Dtype;

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

    /// The file cannot even hold the 8-byte header length.
    #[error("{}: file is {len} bytes, too short to hold a safetensors header", file.display())]
    FileTooShort { file: PathBuf, len: u64 },

    /// The declared header length is above the reference reader's cap.
    #[error("{}: header length {header_len} exceeds the limit of 100000000 bytes", file.display())]
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
        match self {
            Error::Io { .. } => "io",
            Error::FileTooShort { .. } => "file_too_short",
            Error::HeaderTooLarge { .. } => "header_too_large",
            Error::HeaderPastEof { .. } => "header_past_eof",
            Error::HeaderNotJson { .. } => "header_not_json",
            Error::DuplicateInHeader { .. } => "duplicate_in_header",
            Error::UnknownDtype { .. } => "unknown_dtype",
            Error::InvalidTensorEntry { .. } => "invalid_tensor_entry",
            Error::SizeMismatch { .. } => "size_mismatch",
            Error::OverlappingTensors { .. } => "overlapping_tensors",
            Error::GapBeforeTensor { .. } => "gap_before_tensor",
            Error::OffsetsOutOfRange { .. } => "offsets_out_of_range",
            Error::TrailingBytes { .. } => "trailing_bytes",
            Error::InvalidIndex { .. } => "invalid_index",
            Error::UnsafeShardName { .. } => "unsafe_shard_name",
            Error::MissingShard { .. } => "missing_shard",
            Error::DuplicateTensor { .. } => "duplicate_tensor",
            Error::MissingFromShard { .. } => "missing_from_shard",
            Error::NotInIndex { .. } => "not_in_index",
            Error::NoSafetensors { .. } => "no_safetensors",
            Error::EmptyCheckpoint { .. } => "empty_checkpoint",
            Error::NotADirectory { .. } => "not_a_directory",
            Error::OutputIsSource { .. } => "output_is_source",
            Error::OutputInsideSource { .. } => "output_inside_source",
            Error::SourceInsideOutput { .. } => "source_inside_output",
            Error::InvalidPlan { .. } => "invalid_plan",
            Error::WriteRejected { .. } => "write_rejected",
            Error::TensorNotWritten { .. } => "tensor_not_written",
            Error::InvalidQuantizeInput { .. } => "invalid_quantize_input",
            Error::Cancelled => "cancelled",
        }
    }

    /// The file the error is about, when there is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. } | Error::NotADirectory { path } => Some(path),
            Error::FileTooShort { file, .. }
            | Error::HeaderTooLarge { file, .. }
            | Error::HeaderPastEof { file, .. }
            | Error::HeaderNotJson { file, .. }
            | Error::DuplicateInHeader { file, .. }
            | Error::UnknownDtype { file, .. }
            | Error::InvalidTensorEntry { file, .. }
            | Error::SizeMismatch { file, .. }
            | Error::OverlappingTensors { file, .. }
            | Error::GapBeforeTensor { file, .. }
            | Error::OffsetsOutOfRange { file, .. }
            | Error::TrailingBytes { file, .. }
            | Error::InvalidIndex { file, .. }
            | Error::UnsafeShardName { file, .. }
            | Error::MissingShard { file, .. }
            | Error::MissingFromShard { file, .. }
            | Error::NotInIndex { file, .. }
            | Error::WriteRejected { file, .. }
            | Error::TensorNotWritten { file, .. } => Some(file),
            Error::DuplicateTensor { second, .. } => Some(second),
            Error::NoSafetensors { dir } | Error::EmptyCheckpoint { dir } => Some(dir),
            Error::OutputIsSource { output }
            | Error::OutputInsideSource { output, .. }
            | Error::SourceInsideOutput { output, .. } => Some(output),
            Error::InvalidPlan { .. } | Error::InvalidQuantizeInput { .. } | Error::Cancelled => {
                None
            }
        }
    }

    /// The tensor the error is about, when there is one.
    pub fn tensor(&self) -> Option<&str> {
        match self {
            Error::DuplicateInHeader { tensor, .. }
            | Error::UnknownDtype { tensor, .. }
            | Error::InvalidTensorEntry { tensor, .. }
            | Error::SizeMismatch { tensor, .. }
            | Error::OverlappingTensors { tensor, .. }
            | Error::GapBeforeTensor { tensor, .. }
            | Error::OffsetsOutOfRange { tensor, .. }
            | Error::UnsafeShardName { tensor, .. }
            | Error::MissingShard { tensor, .. }
            | Error::DuplicateTensor { tensor, .. }
            | Error::MissingFromShard { tensor, .. }
            | Error::NotInIndex { tensor, .. }
            | Error::InvalidPlan { tensor, .. }
            | Error::WriteRejected { tensor, .. }
            | Error::TensorNotWritten { tensor, .. }
            | Error::InvalidQuantizeInput { tensor, .. } => Some(tensor),
            _ => None,
        }
    }
}
