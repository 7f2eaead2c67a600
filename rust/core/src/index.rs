//! `model.safetensors.index.json`: reading an untrusted one, and encoding a fresh one the way
//! transformers writes it (sorted keys, indent 2, trailing newline).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::json_object::OrderedObject;
use crate::regular_file::{open_regular, read_exact_at};

/// Kept at its first home for callers; it lives in [`crate::format`].
pub use crate::format::INDEX_FILE;

/// Indexes larger than this are refused before being read (a 150k-tensor index is ~15 MB).
const MAX_INDEX_LEN: u64 = 1 << 30;

/// A parsed index: `weight_map` in file order.
#[derive(Debug, Clone)]
pub struct ShardIndex {
    pub path: PathBuf,
    pub weight_map: Vec<(String, String)>,
    /// `metadata.total_size` when present and numeric.
    pub total_size: Option<u64>,
}

#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    metadata: Option<Value>,
    weight_map: OrderedObject<Value>,
}

/// Whether `name` is a plain file name that stays inside the checkpoint directory.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && !name.contains("..")
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

/// Reads and checks an index: every key once, every value a plain file name.
pub fn read_index(path: &Path) -> Result<ShardIndex> {
    let invalid = |detail: String| Error::InvalidIndex {
        file: path.into(),
        detail,
    };
    let (file, identity) = open_regular(path)?;
    let len = identity.size;
    if len > MAX_INDEX_LEN {
        return Err(invalid(format!(
            "{len} bytes is larger than any real index"
        )));
    }
    let mut bytes = vec![0u8; len as usize];
    read_exact_at(&file, path, 0, &mut bytes)?;
    let raw: RawIndex = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if let Some(tensor) = raw.weight_map.first_duplicate() {
        return Err(invalid(format!(
            "tensor '{tensor}' is listed twice in weight_map"
        )));
    }
    let mut weight_map = Vec::with_capacity(raw.weight_map.entries.len());
    for (tensor, value) in raw.weight_map.entries {
        let Value::String(shard) = value else {
            return Err(invalid(format!(
                "weight_map value of '{tensor}' is {value}, not a file name"
            )));
        };
        if !is_plain_file_name(&shard) {
            return Err(Error::UnsafeShardName {
                file: path.into(),
                tensor,
                shard,
            });
        }
        weight_map.push((tensor, shard));
    }
    let total_size = raw
        .metadata
        .as_ref()
        .and_then(|m| m.get("total_size"))
        .and_then(Value::as_u64);
    Ok(ShardIndex {
        path: path.into(),
        weight_map,
        total_size,
    })
}

#[derive(Serialize)]
struct IndexMetadata {
    total_parameters: u64,
    total_size: u64,
}

#[derive(Serialize)]
struct IndexDocument<'a> {
    metadata: IndexMetadata,
    weight_map: BTreeMap<&'a str, &'a str>,
}

/// Encodes an index with sorted keys, `total_size` and `total_parameters`, indent 2 and a
/// trailing newline.
pub fn encode_index<'a>(
    weight_map: impl IntoIterator<Item = (&'a str, &'a str)>,
    total_size: u64,
    total_parameters: u64,
) -> String {
    let document = IndexDocument {
        metadata: IndexMetadata {
            total_parameters,
            total_size,
        },
        weight_map: weight_map.into_iter().collect(),
    };
    let mut text = serde_json::to_string_pretty(&document).expect("an index always serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_with(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn keeps_file_order_and_total_size() {
        let f = index_with(
            r#"{"metadata":{"total_size":12},"weight_map":{"z":"b.safetensors","a":"a.safetensors"}}"#,
        );
        let idx = read_index(f.path()).unwrap();
        assert_eq!(idx.weight_map[0].0, "z");
        assert_eq!(idx.total_size, Some(12));
    }

    #[test]
    fn rejects_unsafe_and_duplicate_entries() {
        for shard in [
            "../x.safetensors",
            "/abs.safetensors",
            "sub/x.safetensors",
            "a\\\\b",
            "",
        ] {
            let f = index_with(&format!(r#"{{"weight_map":{{"t":"{shard}"}}}}"#));
            let e = read_index(f.path()).unwrap_err();
            assert_eq!(e.kind(), "unsafe_shard_name", "{shard}");
            assert_eq!(e.tensor(), Some("t"));
        }
        let f = index_with(r#"{"weight_map":{"t":"a","t":"b"}}"#);
        let e = read_index(f.path()).unwrap_err();
        assert!(e
            .to_string()
            .ends_with("invalid index: tensor 't' is listed twice in weight_map"));
        let f = index_with(r#"{"weight_map":{"t":3}}"#);
        assert_eq!(read_index(f.path()).unwrap_err().kind(), "invalid_index");
        let f = index_with(r#"{"metadata":{}}"#);
        assert_eq!(read_index(f.path()).unwrap_err().kind(), "invalid_index");
    }

    #[test]
    fn encodes_like_transformers() {
        let text = encode_index([("b", "s2"), ("a", "s1")], 10, 5);
        assert_eq!(
            text,
            "{\n  \"metadata\": {\n    \"total_parameters\": 5,\n    \"total_size\": 10\n  },\n  \"weight_map\": {\n    \"a\": \"s1\",\n    \"b\": \"s2\"\n  }\n}\n"
        );
    }
}
