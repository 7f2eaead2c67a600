//! Dtype names, element sizes and byte counts, on top of the `safetensors` crate's `Dtype`.

pub use safetensors::Dtype;

/// Every dtype the safetensors format defines, in the order of the format's documentation (for
/// tests and tools that enumerate dtypes; parsing goes through the `safetensors` crate itself).
pub const ALL_DTYPES: [Dtype; 22] = [
    Dtype::BOOL,
    Dtype::U8,
    Dtype::I8,
    Dtype::I16,
    Dtype::U16,
    Dtype::F16,
    Dtype::BF16,
    Dtype::I32,
    Dtype::U32,
    Dtype::F32,
    Dtype::F64,
    Dtype::I64,
    Dtype::U64,
    Dtype::F8_E4M3,
    Dtype::F8_E5M2,
    Dtype::F8_E8M0,
    Dtype::F8_E4M3FNUZ,
    Dtype::F8_E5M2FNUZ,
    Dtype::C64,
    Dtype::F4,
    Dtype::F6_E2M3,
    Dtype::F6_E3M2,
];

/// Parses a header dtype string such as `"BF16"`, exactly as the `safetensors` crate reads it.
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    use serde::de::{value::Error, Deserialize, IntoDeserializer};
    Dtype::deserialize(IntoDeserializer::<Error>::into_deserializer(name)).ok()
}

/// Number of elements of `shape`, or `None` on overflow. A 0-d tensor has one element.
pub fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// Bytes that a tensor of this dtype and shape occupies, or `None` when the count overflows or
/// sub-byte elements do not fill whole bytes.
pub fn byte_size(dtype: Dtype, shape: &[u64]) -> Option<u64> {
    let bits = element_count(shape)?.checked_mul(dtype.bitsize() as u64)?;
    (bits % 8 == 0).then_some(bits / 8)
}

/// Byte alignment a tensor of this dtype wants inside the data buffer: its element size,
/// rounded up to one byte for the sub-byte formats.
pub fn alignment(dtype: Dtype) -> u64 {
    (dtype.bitsize() as u64).div_ceil(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes one tensor of `dtype` with the `safetensors` crate and reads the file back with
    /// [`crate::header::read_header`]: the dtype and byte count must be the crate's.
    fn round_trip_through_the_reference_writer(dtype: Dtype) {
        let shape = vec![2usize, 4];
        let nbytes = 8 * dtype.bitsize() / 8;
        let data = vec![0u8; nbytes];
        let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), &data).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        safetensors::serialize_to_file([("t", view)], None, &path).unwrap();
        let header = crate::header::read_header(&path).unwrap();
        assert_eq!(header.tensors[0].dtype, dtype);
        assert_eq!(header.tensors[0].nbytes(), nbytes as u64, "{dtype}");
        assert_eq!(byte_size(dtype, &[2, 4]), Some(nbytes as u64));
    }

    #[test]
    fn every_dtype_of_the_format_is_read_as_the_reference_crate_writes_it() {
        // The names of the format's documentation, not derived from ALL_DTYPES.
        let documented = [
            "BOOL",
            "U8",
            "I8",
            "I16",
            "U16",
            "F16",
            "BF16",
            "I32",
            "U32",
            "F32",
            "F64",
            "I64",
            "U64",
            "F8_E4M3",
            "F8_E5M2",
            "F8_E8M0",
            "F8_E4M3FNUZ",
            "F8_E5M2FNUZ",
            "C64",
            "F4",
            "F6_E2M3",
            "F6_E3M2",
        ];
        for name in documented {
            let dtype = parse_dtype(name).unwrap_or_else(|| panic!("{name} not parsed"));
            assert_eq!(dtype.to_string(), name);
            assert!(
                ALL_DTYPES.contains(&dtype),
                "{name} missing from ALL_DTYPES"
            );
            round_trip_through_the_reference_writer(dtype);
        }
        assert_eq!(ALL_DTYPES.len(), documented.len());
        assert_eq!(parse_dtype("bf16"), None);
        assert_eq!(parse_dtype("F128"), None);
    }

    #[test]
    fn byte_sizes_follow_bit_widths() {
        assert_eq!(byte_size(Dtype::BF16, &[3, 5]), Some(30));
        assert_eq!(byte_size(Dtype::F32, &[]), Some(4));
        assert_eq!(byte_size(Dtype::F64, &[0, 7]), Some(0));
        assert_eq!(byte_size(Dtype::F4, &[2, 3]), Some(3));
        assert_eq!(byte_size(Dtype::F4, &[3]), None);
        assert_eq!(byte_size(Dtype::F6_E2M3, &[4]), Some(3));
        assert_eq!(byte_size(Dtype::U8, &[u64::MAX, 2]), None);
        assert_eq!(alignment(Dtype::F4), 1);
        assert_eq!(alignment(Dtype::C64), 8);
    }
}
