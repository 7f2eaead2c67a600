//! The safetensors header: reading and validating one from disk, and encoding one for a new shard.
//!
//! Layout: 8-byte little-endian length `N`, `N` bytes of JSON, then the data buffer. Every
//! offset in the JSON is untrusted until checked here: known dtype, `end - begin` equal to the
//! shape's byte size, tensors contiguous from 0 and covering the buffer exactly.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::dtype::{byte_size, parse_dtype, Dtype};
use crate::error::{Error, Result};
use crate::format::{HEADER_ALIGN, PAGE_SIZE};
use crate::json_object::OrderedObject;
use crate::regular_file::{open_regular, read_exact_at};

/// Kept at their first home for callers; they live in [`crate::format`].
pub use crate::format::{LEN_PREFIX, MAX_HEADER_LEN};

/// One tensor as a header describes it; offsets are relative to the data buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    /// Bytes of tensor data.
    pub fn nbytes(&self) -> u64 {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A parsed and validated shard header.
#[derive(Debug, Clone)]
pub struct ShardHeader {
    pub path: PathBuf,
    pub file_len: u64,
    /// `N`, the JSON length including padding.
    pub header_len: u64,
    /// `__metadata__`, in file order.
    pub metadata: Vec<(String, String)>,
    /// Tensors sorted by data offset.
    pub tensors: Vec<TensorInfo>,
}

impl ShardHeader {
    /// Absolute file offset where the data buffer starts.
    pub fn data_start(&self) -> u64 {
        LEN_PREFIX + self.header_len
    }

    /// Total tensor bytes (the data buffer length).
    pub fn data_len(&self) -> u64 {
        self.file_len - self.data_start()
    }
}

/// Reads and validates the header of the safetensors file at `path` (which must be, or link to,
/// a regular file). Reads no tensor data.
pub fn read_header(path: &Path) -> Result<ShardHeader> {
    let (file, identity) = open_regular(path)?;
    read_header_of(&file, path, identity.size)
}

/// Reads and validates the header of `file`, open at `path` and `file_len` bytes long.
pub fn read_header_of(file: &File, path: &Path, file_len: u64) -> Result<ShardHeader> {
    if file_len < LEN_PREFIX {
        return Err(Error::FileTooShort {
            file: path.into(),
            len: file_len,
        });
    }
    let mut prefix = [0u8; LEN_PREFIX as usize];
    read_exact_at(file, path, 0, &mut prefix)?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_LEN {
        return Err(Error::HeaderTooLarge {
            file: path.into(),
            header_len,
        });
    }
    if LEN_PREFIX + header_len > file_len {
        return Err(Error::HeaderPastEof {
            file: path.into(),
            header_len,
            file_len,
        });
    }
    let mut json = vec![0u8; header_len as usize];
    read_exact_at(file, path, LEN_PREFIX, &mut json)?;
    parse_header(path, &json, file_len)
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Parses and validates header JSON (without the length prefix) of a file of `file_len` bytes.
pub fn parse_header(path: &Path, json: &[u8], file_len: u64) -> Result<ShardHeader> {
    // Well-formed headers (nearly all) are read straight into typed entries; anything malformed
    // is read again member by member, to name the tensor at fault.
    let (metadata, raw_entries) = match serde_json::from_slice::<TypedMembers>(json) {
        Ok(TypedMembers(object)) => split_members(path, object)?,
        Err(_) => split_members(path, parse_loosely(path, json)?)?,
    };
    let mut tensors = Vec::with_capacity(raw_entries.len());
    for (name, raw) in raw_entries {
        tensors.push(check_entry(path, name, raw)?);
    }
    let header = ShardHeader {
        path: path.into(),
        file_len,
        header_len: json.len() as u64,
        metadata,
        tensors,
    };
    validate_layout(header)
}

/// One member of a header object: `__metadata__` or a tensor entry.
enum HeaderValue {
    Metadata(Value),
    Entry(RawEntry),
}

/// The fast path: members read straight into `RawEntry` (the key says which type to expect).
struct TypedMembers(OrderedObject<HeaderValue>);

impl<'de> Deserialize<'de> for TypedMembers {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> serde::de::Visitor<'de> for MembersVisitor {
            type Value = TypedMembers;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a safetensors header object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<TypedMembers, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(key) = map.next_key::<String>()? {
                    let member = if key == "__metadata__" {
                        HeaderValue::Metadata(map.next_value()?)
                    } else {
                        HeaderValue::Entry(map.next_value()?)
                    };
                    entries.push((key, member));
                }
                Ok(TypedMembers(OrderedObject { entries }))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// Every member as a `Value`, so a bad entry can be reported with its name.
fn parse_loosely(path: &Path, json: &[u8]) -> Result<OrderedObject<HeaderValue>> {
    let object: OrderedObject<Value> =
        serde_json::from_slice(json).map_err(|e| Error::HeaderNotJson {
            file: path.into(),
            detail: e.to_string(),
        })?;
    let mut entries = Vec::with_capacity(object.entries.len());
    for (name, value) in object.entries {
        let member = if name == "__metadata__" {
            HeaderValue::Metadata(value)
        } else {
            match RawEntry::deserialize(value) {
                Ok(raw) => HeaderValue::Entry(raw),
                Err(e) => {
                    return Err(Error::InvalidTensorEntry {
                        file: path.into(),
                        tensor: name,
                        detail: format!("malformed entry: {e}"),
                    })
                }
            }
        };
        entries.push((name, member));
    }
    Ok(OrderedObject { entries })
}

/// Separates `__metadata__` from the tensor entries; a repeated name is an error.
#[allow(clippy::type_complexity)]
fn split_members(
    path: &Path,
    object: OrderedObject<HeaderValue>,
) -> Result<(Vec<(String, String)>, Vec<(String, RawEntry)>)> {
    if let Some(tensor) = object.first_duplicate() {
        return Err(Error::DuplicateInHeader {
            file: path.into(),
            tensor: tensor.to_string(),
        });
    }
    let mut metadata = Vec::new();
    let mut entries = Vec::with_capacity(object.entries.len());
    for (name, member) in object.entries {
        match member {
            HeaderValue::Metadata(value) => {
                metadata = parse_metadata(value).map_err(|detail| Error::HeaderNotJson {
                    file: path.into(),
                    detail,
                })?;
            }
            HeaderValue::Entry(raw) => entries.push((name, raw)),
        }
    }
    Ok((metadata, entries))
}

fn parse_metadata(value: Value) -> std::result::Result<Vec<(String, String)>, String> {
    let Value::Object(map) = value else {
        return Err("__metadata__ must be an object of strings".into());
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            other => Err(format!(
                "__metadata__ value of '{k}' is {other}, not a string"
            )),
        })
        .collect()
}

fn check_entry(path: &Path, name: String, raw: RawEntry) -> Result<TensorInfo> {
    let Some(dtype) = parse_dtype(&raw.dtype) else {
        return Err(Error::UnknownDtype {
            file: path.into(),
            tensor: name,
            dtype: raw.dtype,
        });
    };
    let (begin, end) = raw.data_offsets;
    if begin > end {
        return Err(Error::InvalidTensorEntry {
            file: path.into(),
            tensor: name,
            detail: format!("data_offsets [{begin}, {end}) begin after they end"),
        });
    }
    let Some(expected) = byte_size(dtype, &raw.shape) else {
        return Err(Error::InvalidTensorEntry {
            file: path.into(),
            tensor: name,
            detail: format!("shape {:?} of {dtype} has no whole byte size", raw.shape),
        });
    };
    if end - begin != expected {
        return Err(Error::SizeMismatch {
            file: path.into(),
            tensor: name,
            dtype,
            shape: raw.shape,
            begin,
            end,
            expected,
        });
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape: raw.shape,
        data_offsets: (begin, end),
    })
}

/// Sorts tensors by offset and checks they tile the data buffer exactly.
fn validate_layout(mut header: ShardHeader) -> Result<ShardHeader> {
    let file: &Path = &header.path;
    let buffer_len = header.data_len();
    header.tensors.sort_by_key(|t| t.data_offsets);
    let mut covered = 0u64;
    let mut previous: Option<&TensorInfo> = None;
    for tensor in &header.tensors {
        let (begin, end) = tensor.data_offsets;
        if end > buffer_len {
            return Err(Error::OffsetsOutOfRange {
                file: file.into(),
                tensor: tensor.name.clone(),
                begin,
                end,
                buffer_len,
            });
        }
        if begin > covered {
            return Err(Error::GapBeforeTensor {
                file: file.into(),
                tensor: tensor.name.clone(),
                gap: begin - covered,
                begin,
            });
        }
        if begin < covered {
            return Err(Error::OverlappingTensors {
                file: file.into(),
                tensor: tensor.name.clone(),
                other: previous.map(|p| p.name.clone()).unwrap_or_default(),
                begin,
                end,
            });
        }
        covered = end;
        previous = Some(tensor);
    }
    if covered < buffer_len {
        return Err(Error::TrailingBytes {
            file: file.into(),
            trailing: buffer_len - covered,
        });
    }
    Ok(header)
}

/// One tensor entry of a header being written.
#[derive(Debug, Clone, Copy)]
pub struct HeaderEntry<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [u64],
    pub data_offsets: (u64, u64),
}

/// Encodes the length prefix and header JSON for entries already in data order.
///
/// The JSON is padded with spaces so the data buffer starts on a multiple of [`HEADER_ALIGN`];
/// with `data_start_residue = Some(r)` (a multiple of it below [`PAGE_SIZE`]), padding
/// continues until the data start is congruent to `r` modulo the page size, which lets the
/// kernel copy a run of source pages without shifting them.
pub fn encode_header(
    entries: &[HeaderEntry<'_>],
    metadata: &[(String, String)],
    data_start_residue: Option<u64>,
) -> Vec<u8> {
    let mut json = String::with_capacity(64 + entries.len() * 96);
    json.push('{');
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            push_json_string(&mut json, k);
            json.push(':');
            push_json_string(&mut json, v);
        }
        json.push('}');
    }
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 || !metadata.is_empty() {
            json.push(',');
        }
        push_entry(&mut json, entry);
    }
    json.push('}');

    let unpadded = LEN_PREFIX + json.len() as u64;
    let mut data_start = unpadded.next_multiple_of(HEADER_ALIGN);
    if let Some(residue) = data_start_residue {
        data_start += (residue + PAGE_SIZE - data_start % PAGE_SIZE) % PAGE_SIZE;
    }
    let header_len = data_start - LEN_PREFIX;
    let mut out = Vec::with_capacity(data_start as usize);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.resize(data_start as usize, b' ');
    out
}

/// An upper bound on the bytes one entry adds to a header, whatever its final offsets.
pub fn entry_size_bound(name: &str, dtype: Dtype, shape: &[u64]) -> u64 {
    let mut json = String::new();
    push_entry(
        &mut json,
        &HeaderEntry {
            name,
            dtype,
            shape,
            data_offsets: (u64::MAX, u64::MAX),
        },
    );
    json.len() as u64 + 1
}

fn push_entry(json: &mut String, entry: &HeaderEntry<'_>) {
    use std::fmt::Write;
    push_json_string(json, entry.name);
    let _ = write!(json, ":{{\"dtype\":\"{}\",\"shape\":[", entry.dtype);
    for (i, d) in entry.shape.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        let _ = write!(json, "{d}");
    }
    let (begin, end) = entry.data_offsets;
    let _ = write!(json, "],\"data_offsets\":[{begin},{end}]}}");
}

fn push_json_string(json: &mut String, s: &str) {
    json.push_str(&serde_json::to_string(s).expect("a string always serializes"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(json: &str, data_len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
        f.write_all(json.as_bytes()).unwrap();
        f.write_all(&vec![7u8; data_len]).unwrap();
        f
    }

    fn err_of(json: &str, data_len: usize) -> Error {
        let f = file_with(json, data_len);
        read_header(f.path()).unwrap_err()
    }

    #[test]
    fn reads_a_valid_header_sorted_by_offset() {
        let f = file_with(
            r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#,
            12,
        );
        let h = read_header(f.path()).unwrap();
        assert_eq!(h.metadata, vec![("format".to_string(), "pt".to_string())]);
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(h.data_len(), 12);
    }

    #[test]
    fn error_messages_name_file_and_tensor() {
        let cases: Vec<(&str, usize, &str, &str)> = vec![
            (r#"{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#, 1, "unknown_dtype", "tensor 'a': unknown dtype 'Q7'"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, 4, "size_mismatch", "tensor 'a': data_offsets [0, 4) hold 4 bytes but shape [2] of F32 needs 8"),
            (r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#, 6, "overlapping_tensors", "tensor 'b': data_offsets [2, 6) overlap tensor 'a'"),
            (r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#, 6, "gap_before_tensor", "tensor 'a': 2 unused bytes before its data_offsets begin at 2"),
            (r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#, 3, "offsets_out_of_range", "tensor 'a': data_offsets [0, 4) run past the end of the data buffer (3 bytes); the file is truncated"),
            (r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#, 9, "trailing_bytes", "5 bytes after the last tensor belong to no tensor"),
            (r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#, 2, "duplicate_in_header", "tensor 'a' appears twice in the header"),
            (r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[3,1]}}"#, 3, "invalid_tensor_entry", "tensor 'a': data_offsets [3, 1) begin after they end"),
            (r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#, 1, "invalid_tensor_entry", "tensor 'a': malformed entry"),
            (r#"{"a":{"dtype":"U8","shape":[18446744073709551615,2],"data_offsets":[0,1]}}"#, 1, "invalid_tensor_entry", "has no whole byte size"),
            (r#"{"a":"#, 0, "header_not_json", "header is not valid safetensors JSON"),
            (r#"[1,2]"#, 0, "header_not_json", "header is not valid safetensors JSON"),
            (r#"{"__metadata__":{"format":1}}"#, 0, "header_not_json", "__metadata__ value of 'format' is 1, not a string"),
        ];
        for (json, data_len, kind, needle) in cases {
            let err = err_of(json, data_len);
            assert_eq!(err.kind(), kind, "{json}");
            let msg = err.to_string();
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
            assert!(msg.starts_with(&err.file().unwrap().display().to_string()));
        }
    }

    #[test]
    fn rejects_bad_length_prefixes() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"abc").unwrap();
        assert_eq!(read_header(f.path()).unwrap_err().kind(), "file_too_short");

        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&200_000_000u64.to_le_bytes()).unwrap();
        let e = read_header(f.path()).unwrap_err();
        assert_eq!(e.kind(), "header_too_large");
        assert!(e
            .to_string()
            .ends_with("header length 200000000 exceeds the limit of 100000000 bytes"));

        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&64u64.to_le_bytes()).unwrap();
        f.write_all(b"{}").unwrap();
        let e = read_header(f.path()).unwrap_err();
        assert!(e.to_string().ends_with("header length 64 runs past the end of the file (10 bytes); the file is truncated or not safetensors"));
    }

    #[test]
    fn encoded_header_reads_back_and_honours_residue() {
        let shape = [3u64, 2];
        let entries = [
            HeaderEntry {
                name: "w\"eird",
                dtype: Dtype::F32,
                shape: &shape,
                data_offsets: (0, 24),
            },
            HeaderEntry {
                name: "b",
                dtype: Dtype::BF16,
                shape: &[2],
                data_offsets: (24, 28),
            },
        ];
        let meta = vec![("format".to_string(), "pt".to_string())];
        for residue in [None, Some(0), Some(8), Some(4088)] {
            let mut bytes = encode_header(&entries, &meta, residue);
            assert_eq!(bytes.len() as u64 % HEADER_ALIGN, 0);
            if let Some(r) = residue {
                assert_eq!(bytes.len() as u64 % PAGE_SIZE, r);
            }
            let n = bytes.len() as u64 - LEN_PREFIX;
            bytes.extend_from_slice(&[0u8; 28]);
            let h = parse_header(
                Path::new("x"),
                &bytes[LEN_PREFIX as usize..(LEN_PREFIX + n) as usize],
                bytes.len() as u64,
            )
            .unwrap();
            assert_eq!(h.tensors[0].name, "w\"eird");
            assert_eq!(h.tensors[1].shape, vec![2]);
            assert_eq!(h.metadata, meta);
        }
    }
}
