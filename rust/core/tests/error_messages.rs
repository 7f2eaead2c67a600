//! Golden messages: every error variant formatted once, compared with the exact line a user sees,
//! with its kind, file and tensor. Adding a variant fails to compile `covered` until it is here.

use std::path::PathBuf;

use normalize_core::dtype::Dtype;
use normalize_core::Error;

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

/// Names every variant, so a new one cannot be left out of the golden list below.
fn covered(error: &Error) -> &'static str {
    use Error::*;
    match error {
        Io { .. } => "Io",
        NotARegularFile { .. } => "NotARegularFile",
        SourceChanged { .. } => "SourceChanged",
        FileTooLarge { .. } => "FileTooLarge",
        FileTooShort { .. } => "FileTooShort",
        HeaderTooLarge { .. } => "HeaderTooLarge",
        HeaderPastEof { .. } => "HeaderPastEof",
        HeaderNotJson { .. } => "HeaderNotJson",
        DuplicateInHeader { .. } => "DuplicateInHeader",
        UnknownDtype { .. } => "UnknownDtype",
        InvalidTensorEntry { .. } => "InvalidTensorEntry",
        SizeMismatch { .. } => "SizeMismatch",
        OverlappingTensors { .. } => "OverlappingTensors",
        GapBeforeTensor { .. } => "GapBeforeTensor",
        OffsetsOutOfRange { .. } => "OffsetsOutOfRange",
        TrailingBytes { .. } => "TrailingBytes",
        InvalidIndex { .. } => "InvalidIndex",
        UnsafeShardName { .. } => "UnsafeShardName",
        MissingShard { .. } => "MissingShard",
        DuplicateTensor { .. } => "DuplicateTensor",
        MissingFromShard { .. } => "MissingFromShard",
        NotInIndex { .. } => "NotInIndex",
        NoSafetensors { .. } => "NoSafetensors",
        EmptyCheckpoint { .. } => "EmptyCheckpoint",
        NotADirectory { .. } => "NotADirectory",
        OutputIsSource { .. } => "OutputIsSource",
        OutputInsideSource { .. } => "OutputInsideSource",
        SourceInsideOutput { .. } => "SourceInsideOutput",
        InvalidPlan { .. } => "InvalidPlan",
        WriteRejected { .. } => "WriteRejected",
        TensorNotWritten { .. } => "TensorNotWritten",
        InvalidQuantizeInput { .. } => "InvalidQuantizeInput",
        Cancelled => "Cancelled",
    }
}

/// An error, and the message, kind, file and tensor it must report.
type Golden = (
    Error,
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
);

/// One case for every variant.
fn golden() -> Vec<Golden> {
    let s = String::from;
    vec![
        (
            Error::io("/m/a.safetensors", std::io::Error::from_raw_os_error(13)),
            "/m/a.safetensors: Permission denied (os error 13)",
            "io",
            Some("/m/a.safetensors"),
            None,
        ),
        (
            Error::NotARegularFile { file: p("/m/tokenizer.json"), what: "a FIFO" },
            "/m/tokenizer.json: is a FIFO, not a regular file; only regular files (or symlinks to them) are read",
            "not_a_regular_file",
            Some("/m/tokenizer.json"),
            None,
        ),
        (
            Error::SourceChanged { file: p("/m/a.safetensors"), detail: s("it was 10 bytes, now 4") },
            "/m/a.safetensors: changed while being read (it was 10 bytes, now 4); rerun once nothing writes to it",
            "source_changed",
            Some("/m/a.safetensors"),
            None,
        ),
        (
            Error::FileTooLarge { file: p("/m/config.json"), size: 70_000_000, limit: 67_108_864 },
            "/m/config.json: is 70000000 bytes, over the 67108864-byte limit for this file; is it the right file?",
            "file_too_large",
            Some("/m/config.json"),
            None,
        ),
        (
            Error::FileTooShort { file: p("/m/a.safetensors"), len: 3 },
            "/m/a.safetensors: file is 3 bytes, too short to hold a safetensors header",
            "file_too_short",
            Some("/m/a.safetensors"),
            None,
        ),
        (
            Error::HeaderTooLarge { file: p("/m/a.safetensors"), header_len: 200_000_000 },
            "/m/a.safetensors: header length 200000000 exceeds the limit of 100000000 bytes",
            "header_too_large",
            Some("/m/a.safetensors"),
            None,
        ),
        (
            Error::HeaderPastEof { file: p("/m/a.safetensors"), header_len: 64, file_len: 10 },
            "/m/a.safetensors: header length 64 runs past the end of the file (10 bytes); the file is truncated or not safetensors",
            "header_past_eof",
            Some("/m/a.safetensors"),
            None,
        ),
        (
            Error::HeaderNotJson { file: p("/m/a.safetensors"), detail: s("EOF while parsing an object at line 1 column 5") },
            "/m/a.safetensors: header is not valid safetensors JSON: EOF while parsing an object at line 1 column 5",
            "header_not_json",
            Some("/m/a.safetensors"),
            None,
        ),
        (
            Error::DuplicateInHeader { file: p("/m/a.safetensors"), tensor: s("w") },
            "/m/a.safetensors: tensor 'w' appears twice in the header",
            "duplicate_in_header",
            Some("/m/a.safetensors"),
            Some("w"),
        ),
        (
            Error::UnknownDtype { file: p("/m/a.safetensors"), tensor: s("w"), dtype: s("Q7") },
            "/m/a.safetensors: tensor 'w': unknown dtype 'Q7'",
            "unknown_dtype",
            Some("/m/a.safetensors"),
            Some("w"),
        ),
        (
            Error::InvalidTensorEntry { file: p("/m/a.safetensors"), tensor: s("w"), detail: s("data_offsets [3, 1) begin after they end") },
            "/m/a.safetensors: tensor 'w': data_offsets [3, 1) begin after they end",
            "invalid_tensor_entry",
            Some("/m/a.safetensors"),
            Some("w"),
        ),
        (
            Error::SizeMismatch {
                file: p("/m/a.safetensors"),
                tensor: s("w"),
                dtype: Dtype::F32,
                shape: vec![2],
                begin: 0,
                end: 4,
                expected: 8,
            },
            "/m/a.safetensors: tensor 'w': data_offsets [0, 4) hold 4 bytes but shape [2] of F32 needs 8",
            "size_mismatch",
            Some("/m/a.safetensors"),
            Some("w"),
        ),
        (
            Error::OverlappingTensors { file: p("/m/a.safetensors"), tensor: s("b"), other: s("a"), begin: 2, end: 6 },
            "/m/a.safetensors: tensor 'b': data_offsets [2, 6) overlap tensor 'a'",
            "overlapping_tensors",
            Some("/m/a.safetensors"),
            Some("b"),
        ),
        (
            Error::GapBeforeTensor { file: p("/m/a.safetensors"), tensor: s("a"), gap: 2, begin: 2 },
            "/m/a.safetensors: tensor 'a': 2 unused bytes before its data_offsets begin at 2",
            "gap_before_tensor",
            Some("/m/a.safetensors"),
            Some("a"),
        ),
        (
            Error::OffsetsOutOfRange { file: p("/m/a.safetensors"), tensor: s("a"), begin: 0, end: 4, buffer_len: 3 },
            "/m/a.safetensors: tensor 'a': data_offsets [0, 4) run past the end of the data buffer (3 bytes); the file is truncated",
            "offsets_out_of_range",
            Some("/m/a.safetensors"),
            Some("a"),
        ),
        (
            Error::TrailingBytes { file: p("/m/a.safetensors"), trailing: 5 },
            "/m/a.safetensors: 5 bytes after the last tensor belong to no tensor",
            "trailing_bytes",
            Some("/m/a.safetensors"),
            None,
        ),
        (
            Error::InvalidIndex { file: p("/m/model.safetensors.index.json"), detail: s("tensor 't' is listed twice in weight_map") },
            "/m/model.safetensors.index.json: invalid index: tensor 't' is listed twice in weight_map",
            "invalid_index",
            Some("/m/model.safetensors.index.json"),
            None,
        ),
        (
            Error::UnsafeShardName { file: p("/m/model.safetensors.index.json"), tensor: s("t"), shard: s("../x.safetensors") },
            "/m/model.safetensors.index.json: tensor 't' maps to '../x.safetensors', which is not a plain file name inside the checkpoint directory",
            "unsafe_shard_name",
            Some("/m/model.safetensors.index.json"),
            Some("t"),
        ),
        (
            Error::MissingShard { file: p("/m/model.safetensors.index.json"), tensor: s("t"), shard: s("x.safetensors") },
            "/m/model.safetensors.index.json: tensor 't' maps to shard 'x.safetensors', which does not exist",
            "missing_shard",
            Some("/m/model.safetensors.index.json"),
            Some("t"),
        ),
        (
            Error::DuplicateTensor { tensor: s("t"), first: p("/m/a.safetensors"), second: p("/m/b.safetensors") },
            "tensor 't' is stored in both /m/a.safetensors and /m/b.safetensors",
            "duplicate_tensor",
            Some("/m/b.safetensors"),
            Some("t"),
        ),
        (
            Error::MissingFromShard { file: p("/m/a.safetensors"), tensor: s("t") },
            "/m/a.safetensors: tensor 't' is listed in the index but absent from this shard",
            "missing_from_shard",
            Some("/m/a.safetensors"),
            Some("t"),
        ),
        (
            Error::NotInIndex { file: p("/m/a.safetensors"), tensor: s("t") },
            "/m/a.safetensors: tensor 't' is in this shard but not in the index",
            "not_in_index",
            Some("/m/a.safetensors"),
            Some("t"),
        ),
        (
            Error::NoSafetensors { dir: p("/m") },
            "/m: no *.safetensors files and no model.safetensors.index.json found",
            "no_safetensors",
            Some("/m"),
            None,
        ),
        (
            Error::EmptyCheckpoint { dir: p("/m") },
            "/m: the checkpoint holds no tensors",
            "empty_checkpoint",
            Some("/m"),
            None,
        ),
        (
            Error::NotADirectory { path: p("/m/config.json") },
            "/m/config.json: not a directory",
            "not_a_directory",
            Some("/m/config.json"),
            None,
        ),
        (
            Error::OutputIsSource { output: p("/m") },
            "/m: output is the source directory; choose a separate output directory",
            "output_is_source",
            Some("/m"),
            None,
        ),
        (
            Error::OutputInsideSource { output: p("/m/out"), source_dir: p("/m") },
            "/m/out: output lies inside source /m; choose a directory outside it",
            "output_inside_source",
            Some("/m/out"),
            None,
        ),
        (
            Error::SourceInsideOutput { output: p("/"), source_dir: p("/m") },
            "/: source /m lies inside this output directory; choose another output",
            "source_inside_output",
            Some("/"),
            None,
        ),
        (
            Error::InvalidPlan { tensor: s("a"), detail: s("tensor is planned twice") },
            "tensor 'a': tensor is planned twice",
            "invalid_plan",
            None,
            Some("a"),
        ),
        (
            Error::WriteRejected { file: p("/out/model.safetensors"), tensor: s("w"), detail: s("written twice") },
            "/out/model.safetensors: tensor 'w': written twice",
            "write_rejected",
            Some("/out/model.safetensors"),
            Some("w"),
        ),
        (
            Error::TensorNotWritten { file: p("/out/model.safetensors"), tensor: s("w") },
            "/out/model.safetensors: tensor 'w' was planned but never written",
            "tensor_not_written",
            Some("/out/model.safetensors"),
            Some("w"),
        ),
        (
            Error::InvalidQuantizeInput { tensor: s("w"), detail: s("block size must be positive") },
            "tensor 'w': block size must be positive",
            "invalid_quantize_input",
            None,
            Some("w"),
        ),
        (Error::Cancelled, "cancelled", "cancelled", None, None),
    ]
}

#[test]
fn every_variant_formats_as_its_golden_line() {
    let cases = golden();
    let mut variants: Vec<&str> = cases.iter().map(|(e, ..)| covered(e)).collect();
    variants.sort_unstable();
    variants.dedup();
    assert_eq!(variants.len(), cases.len(), "one case per variant");
    for (error, message, kind, file, tensor) in &cases {
        assert_eq!(error.to_string(), *message);
        assert!(!message.contains('\n'), "one line: {message:?}");
        assert_eq!(error.kind(), *kind, "{message}");
        assert_eq!(
            error.file().map(|f| f.to_str().unwrap()),
            *file,
            "{message}"
        );
        assert_eq!(error.tensor(), *tensor, "{message}");
    }
    let mut kinds: Vec<&str> = cases.iter().map(|(e, ..)| e.kind()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(kinds.len(), cases.len(), "kinds are distinct");
}
