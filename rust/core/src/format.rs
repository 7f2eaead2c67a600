//! The constants and naming rules of the on-disk formats, in one leaf module that every other
//! module may use: the safetensors framing, the HF sharded layout's file names, and the marker of
//! this tool's temporary files.

/// Size of the little-endian header length prefix of a safetensors file.
pub const LEN_PREFIX: u64 = 8;

/// Writers pad the header JSON with spaces so that the data buffer starts on a multiple of this.
pub const HEADER_ALIGN: u64 = 8;

/// The reference reader refuses headers longer than this.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Page size that `copy_file_range` wants source and destination offsets congruent modulo.
pub const PAGE_SIZE: u64 = 4096;

/// The index file name of the HF sharded layout.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The file name of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Marker in the names of temporary files, so leftovers of a killed run can be recognised.
pub const PARTIAL_MARKER: &str = ".partial-";

/// HF's shard file name for shard `i` of `n` (1-based): `model-{i:05}-of-{n:05}.safetensors`.
pub fn standard_shard_name(i: usize, n: usize) -> String {
    format!("model-{i:05}-of-{n:05}.safetensors")
}

/// Whether `name` is a shard name this tool writes: [`SINGLE_FILE`] or a
/// [`standard_shard_name`].
pub fn is_tool_shard_name(name: &str) -> bool {
    if name == SINGLE_FILE {
        return true;
    }
    let Some(rest) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let bytes = rest.as_bytes();
    bytes.len() == 14
        && bytes[..5].iter().all(u8::is_ascii_digit)
        && &bytes[5..9] == b"-of-"
        && bytes[9..].iter().all(u8::is_ascii_digit)
}

/// Whether `name` is one of this tool's temporary files (`.<name>.partial-<pid>`).
pub fn is_temporary_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(PARTIAL_MARKER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_names_are_recognised_as_tool_shards() {
        assert_eq!(
            standard_shard_name(3, 12),
            "model-00003-of-00012.safetensors"
        );
        assert!(is_tool_shard_name(&standard_shard_name(1, 2)));
        assert!(is_tool_shard_name(SINGLE_FILE));
        assert!(!is_tool_shard_name("model-1-of-2.safetensors"));
        assert!(!is_tool_shard_name("model-00001-of-0000x.safetensors"));
        assert!(!is_tool_shard_name("weights.safetensors"));
    }

    #[test]
    fn temporary_names_are_hidden_and_marked() {
        assert!(is_temporary_name(".config.json.partial-12"));
        assert!(!is_temporary_name("config.json.partial-12"));
        assert!(!is_temporary_name(".gitattributes"));
    }
}
