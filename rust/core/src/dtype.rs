//! Dtype names, element sizes and byte counts, on top of the `safetensors` crate's `Dtype`.

pub use safetensors::Dtype;

/// Every dtype the safetensors format defines, in the order of the format's documentation.
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

/// Parses a header dtype string such as `"BF16"`.
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    ALL_DTYPES.iter().copied().find(|d| d.to_string() == name)
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

    #[test]
    fn every_dtype_name_round_trips() {
        for dtype in ALL_DTYPES {
            assert_eq!(parse_dtype(&dtype.to_string()), Some(dtype));
        }
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
