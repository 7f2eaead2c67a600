//! Checks on a checkpoint beyond what opening it already enforces: what a loader would trip
//! over or what suggests a stale or hand-edited directory.

use crate::checkpoint::{Checkpoint, Layout, SourceFile};
use crate::dtype::alignment;
use crate::format::{INDEX_FILE, SINGLE_FILE};

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
    let mut findings: Vec<Finding> = layout_finding(checkpoint).into_iter().collect();
    findings.extend(checkpoint.unreferenced_files.iter().map(|name| {
        Finding::error(format!(
            "{name} is not referenced by the index (stale shard?)"
        ))
    }));
    for file in &checkpoint.files {
        findings.extend(format_finding(file));
        findings.extend(alignment_finding(file));
    }
    findings
}

impl Finding {
    fn error(message: String) -> Finding {
        Finding {
            severity: Severity::Error,
            message,
        }
    }

    fn warning(message: String) -> Finding {
        Finding {
            severity: Severity::Warning,
            message,
        }
    }
}

/// What the way the tensors were found says: an index whose `total_size` is wrong or missing,
/// or shards without an index, which loaders will not find.
fn layout_finding(checkpoint: &Checkpoint) -> Option<Finding> {
    let actual = checkpoint.total_size();
    match (&checkpoint.layout, &checkpoint.index) {
        (Layout::Indexed, Some(index)) => match index.total_size {
            Some(declared) if declared != actual => Some(Finding::error(format!(
                "index metadata.total_size is {declared} but the shards hold {actual} tensor bytes"
            ))),
            None => Some(Finding::warning(
                "index has no numeric metadata.total_size".into(),
            )),
            _ => None,
        },
        (Layout::Unindexed, _) if checkpoint.files.len() > 1 => Some(Finding::error(format!(
            "{} shard files but no {INDEX_FILE}; loaders will not find them",
            checkpoint.files.len()
        ))),
        (Layout::Unindexed, _) => Some(Finding::warning(format!(
            "single shard named {} without an index; loaders look for {SINGLE_FILE}",
            checkpoint.files[0].name
        ))),
        _ => None,
    }
}

/// A `__metadata__["format"]` transformers refuses.
fn format_finding(file: &SourceFile) -> Option<Finding> {
    let (_, format) = file.header.metadata.iter().find(|(k, _)| k == "format")?;
    (!LOADABLE_FORMATS.contains(&format.as_str())).then(|| {
        Finding::error(format!(
            "{}: __metadata__ format '{format}' is refused by transformers",
            file.name
        ))
    })
}

/// The first tensor whose data does not start on a multiple of its element size.
fn alignment_finding(file: &SourceFile) -> Option<Finding> {
    let data_start = file.header.data_start();
    let t = file
        .header
        .tensors
        .iter()
        .find(|t| (data_start + t.data_offsets.0) % alignment(t.dtype) != 0)?;
    Some(Finding::warning(format!(
        "{}: tensor '{}' is not aligned to its {}-byte elements; loaders must copy it",
        file.name,
        t.name,
        alignment(t.dtype)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    use safetensors::tensor::TensorView;
    use safetensors::Dtype;

    /// Writes `file` in `dir` with the reference crate: one F32 tensor per name, and `format`.
    fn shard(dir: &Path, file: &str, names: &[&str], format: &str) {
        let data = [0u8; 8];
        let views: Vec<(&str, TensorView<'_>)> = names
            .iter()
            .map(|n| (*n, TensorView::new(Dtype::F32, vec![2], &data).unwrap()))
            .collect();
        let meta = HashMap::from([("format".to_string(), format.to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &dir.join(file)).unwrap();
    }

    fn index(dir: &Path, total_size: Option<u64>, map: &[(&str, &str)]) {
        let weight_map: serde_json::Map<String, serde_json::Value> = map
            .iter()
            .map(|(t, f)| (t.to_string(), serde_json::Value::from(*f)))
            .collect();
        let mut doc = serde_json::json!({ "weight_map": weight_map });
        if let Some(total) = total_size {
            doc["metadata"] = serde_json::json!({ "total_size": total });
        }
        std::fs::write(dir.join(crate::format::INDEX_FILE), doc.to_string()).unwrap();
    }

    fn findings(dir: &Path) -> Vec<(Severity, String)> {
        let checkpoint = Checkpoint::open(dir).unwrap();
        find_problems(&checkpoint)
            .into_iter()
            .map(|f| (f.severity, f.message))
            .collect()
    }

    #[test]
    fn a_clean_indexed_checkpoint_has_no_findings() {
        let dir = tempfile::tempdir().unwrap();
        shard(
            dir.path(),
            "model-00001-of-00001.safetensors",
            &["a", "b"],
            "pt",
        );
        index(
            dir.path(),
            Some(16),
            &[
                ("a", "model-00001-of-00001.safetensors"),
                ("b", "model-00001-of-00001.safetensors"),
            ],
        );
        assert_eq!(findings(dir.path()), []);
    }

    #[test]
    fn index_totals_stale_shards_and_formats_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        shard(dir.path(), "model-00001-of-00001.safetensors", &["a"], "np");
        shard(dir.path(), "old.safetensors", &["z"], "pt");
        index(
            dir.path(),
            Some(99),
            &[("a", "model-00001-of-00001.safetensors")],
        );
        assert_eq!(
            findings(dir.path()),
            [
                (
                    Severity::Error,
                    "index metadata.total_size is 99 but the shards hold 8 tensor bytes".into()
                ),
                (
                    Severity::Error,
                    "old.safetensors is not referenced by the index (stale shard?)".into()
                ),
                (
                    Severity::Error,
                    "model-00001-of-00001.safetensors: __metadata__ format 'np' is refused by transformers"
                        .into()
                ),
            ]
        );
        index(
            dir.path(),
            None,
            &[("a", "model-00001-of-00001.safetensors")],
        );
        assert!(findings(dir.path()).contains(&(
            Severity::Warning,
            "index has no numeric metadata.total_size".into()
        )));
    }

    #[test]
    fn unindexed_layouts_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        shard(dir.path(), "rank0.safetensors", &["a"], "pt");
        assert_eq!(
            findings(dir.path()),
            [(
                Severity::Warning,
                "single shard named rank0.safetensors without an index; loaders look for model.safetensors".into()
            )]
        );
        shard(dir.path(), "rank1.safetensors", &["b"], "pt");
        assert_eq!(
            findings(dir.path()),
            [(
                Severity::Error,
                "2 shard files but no model.safetensors.index.json; loaders will not find them"
                    .into()
            )]
        );
        let single = tempfile::tempdir().unwrap();
        shard(single.path(), "model.safetensors", &["a"], "pt");
        assert_eq!(findings(single.path()), []);
    }

    #[test]
    fn a_tensor_off_its_element_alignment_is_a_warning() {
        // Hand-made (the reference writer never does this): a U8 then an F32 at offset 1.
        let dir = tempfile::tempdir().unwrap();
        let json = br#"{"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"F32","shape":[1],"data_offsets":[1,5]}}"#;
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json);
        bytes.extend_from_slice(&[0u8; 5]);
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        let data_start = crate::format::LEN_PREFIX + json.len() as u64;
        assert_ne!(
            (data_start + 1) % 4,
            0,
            "the test needs a misaligned offset"
        );
        assert_eq!(
            findings(dir.path()),
            [(
                Severity::Warning,
                "model.safetensors: tensor 'w' is not aligned to its 4-byte elements; loaders must copy it"
                    .into()
            )]
        );
    }
}
