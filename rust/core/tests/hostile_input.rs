//! Untrusted bytes never panic the parsers: arbitrary and mutated headers and indexes give either
//! a validated result or an error, and a validated header always tiles its data buffer.

use std::path::Path;

use normalize_core::header::parse_header;
use normalize_core::index::read_index;
use proptest::prelude::*;

const VALID: &str = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}"#;

fn check_header(json: &[u8], data_len: u64) {
    let file_len = 8 + json.len() as u64 + data_len;
    if let Ok(header) = parse_header(Path::new("fuzz.safetensors"), json, file_len) {
        let mut covered = 0;
        for tensor in &header.tensors {
            assert_eq!(tensor.data_offsets.0, covered);
            covered = tensor.data_offsets.1;
        }
        assert_eq!(covered, data_len);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_header_bytes(json in proptest::collection::vec(any::<u8>(), 0..256), data_len in 0u64..64) {
        check_header(&json, data_len);
    }

    #[test]
    fn mutated_valid_headers(position in 0usize..VALID.len(), byte in any::<u8>(), data_len in 0u64..32) {
        let mut json = VALID.as_bytes().to_vec();
        json[position] = byte;
        check_header(&json, data_len);
    }

    #[test]
    fn truncated_valid_headers(cut in 0usize..VALID.len()) {
        check_header(&VALID.as_bytes()[..cut], 16);
    }

    #[test]
    fn arbitrary_indexes(text in "\\PC{0,200}") {
        check_index(text.as_bytes())?;
    }

    #[test]
    fn mutated_valid_indexes(position in 0usize..VALID_INDEX.len(), byte in any::<u8>()) {
        let mut text = VALID_INDEX.as_bytes().to_vec();
        text[position] = byte;
        check_index(&text)?;
    }
}

const VALID_INDEX: &str = r#"{"metadata":{"total_size":16},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#;

fn check_index(bytes: &[u8]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors.index.json");
    std::fs::write(&path, bytes).unwrap();
    if let Ok(index) = read_index(&path) {
        for (_, shard) in &index.weight_map {
            prop_assert!(normalize_core::index::is_plain_file_name(shard));
        }
    }
    Ok(())
}
