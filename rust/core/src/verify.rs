//! Checks on a checkpoint beyond what opening it already enforces: what a loader would trip
//! over or what suggests a stale or hand-edited directory.

use crate::checkpoint::{Checkpoint, Layout};
use crate::dtype::alignment;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Loaders fail or load the wrong data.
    Error,
    /// Loads, but is not what a clean checkpoint looks like.
    Warning,
}

/// One problem found in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub message: String,
}

/// Formats the `__metadata__["format"]` values transformers accepts.
const LOADABLE_FORMATS: [&str; 4] = ["pt", "tf", "flax", "mlx"];

/// Everything suspicious about an (already validated) checkpoint.
pub fn find_problems(checkpoint: &Checkpoint) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut add = |severity, message: String| findings.push(Finding { severity, message });
    let actual = checkpoint.total_size();
    match (&checkpoint.layout, &checkpoint.index) {
        (Layout::Indexed, Some(index)) => match index.total_size {
            Some(declared) if declared != actual => add(
                Severity::Error,
                format!("index metadata.total_size is {declared} but the shards hold {actual} tensor bytes"),
            ),
            None => add(Severity::Warning, "index has no numeric metadata.total_size".into()),
            _ => {}
        },
        (Layout::Unindexed, _) if checkpoint.files.len() > 1 => add(
            Severity::Error,
            format!(
                "{} shard files but no model.safetensors.index.json; loaders will not find them",
                checkpoint.files.len()
            ),
        ),
        (Layout::Unindexed, _) => add(
            Severity::Warning,
            format!("single shard named {} without an index; loaders look for model.safetensors", checkpoint.files[0].name),
        ),
        _ => {}
    }
    for name in &checkpoint.unreferenced_files {
        add(
            Severity::Error,
            format!("{name} is not referenced by the index (stale shard?)"),
        );
    }
    for file in &checkpoint.files {
        if let Some((_, format)) = file.header.metadata.iter().find(|(k, _)| k == "format") {
            if !LOADABLE_FORMATS.contains(&format.as_str()) {
                add(
                    Severity::Error,
                    format!(
                        "{}: __metadata__ format '{format}' is refused by transformers",
                        file.name
                    ),
                );
            }
        }
        let data_start = file.header.data_start();
        if let Some(t) = file
            .header
            .tensors
            .iter()
            .find(|t| (data_start + t.data_offsets.0) % alignment(t.dtype) != 0)
        {
            add(
                Severity::Warning,
                format!(
                    "{}: tensor '{}' is not aligned to its {}-byte elements; loaders must copy it",
                    file.name,
                    t.name,
                    alignment(t.dtype)
                ),
            );
        }
    }
    findings
}
