//! The values of block-FP8 scale tensors (`*_scale_inv`, F32 or BF16): whether every one is a
//! usable scale, and whether every one survives `scale_fmt: ue8m0` (a bare 8-bit exponent)
//! unchanged.
//!
//! Values are classified by their bits, which is exact for every value and lets the loops
//! vectorize: a checkpoint of 150k tensors holds millions of scales.

use std::collections::HashMap;
use std::fs::File;

use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::regular_file::{open_regular, read_exact_at};

/// How a scale tensor stores its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleStorage {
    /// IEEE float32, little-endian.
    F32,
    /// bfloat16 (the top half of a float32), little-endian.
    BF16,
}

impl ScaleStorage {
    /// The storage of a tensor of `dtype`; None for dtypes engines do not accept as scales.
    pub fn of(dtype: Dtype) -> Option<ScaleStorage> {
        match dtype {
            Dtype::F32 => Some(ScaleStorage::F32),
            Dtype::BF16 => Some(ScaleStorage::BF16),
            _ => None,
        }
    }
}

/// What holds for every value of one scale tensor (an empty tensor has both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleProperties {
    /// Every value is finite and greater than zero (subnormals included). A zero, negative,
    /// NaN or infinite scale turns its whole block into zeros, NaNs or sign-flipped weights.
    pub finite_positive: bool,
    /// Every value is a positive power of two of the normal range: no mantissa bits, what an
    /// exponent-only format such as ue8m0 holds exactly (others are rounded on load).
    /// Subnormals count as not: their exponent bits do not say their value. Real scales are
    /// never that small (the quantizer's floor is about 2^-22).
    pub powers_of_two: bool,
}

/// Bits of float32 +infinity; every finite positive float32 lies in `1..INFINITY_BITS`.
const INFINITY_BITS: u32 = 0x7F80_0000;

/// Mantissa bits of a float32.
const MANTISSA_BITS: u32 = 0x007F_FFFF;

/// Classifies the scales in `bytes` (little-endian values stored as `storage`; a trailing
/// partial value is ignored, as no valid tensor has one).
pub fn scale_properties(storage: ScaleStorage, bytes: &[u8]) -> ScaleProperties {
    match storage {
        ScaleStorage::F32 => classify(
            bytes
                .chunks_exact(4)
                .map(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]])),
        ),
        ScaleStorage::BF16 => classify(
            bytes
                .chunks_exact(2)
                .map(|v| u32::from(u16::from_le_bytes([v[0], v[1]])) << 16),
        ),
    }
}

/// Folds float32 bit patterns without stopping early (so the loop vectorizes).
fn classify(values: impl Iterator<Item = u32>) -> ScaleProperties {
    let (finite_positive, powers_of_two) =
        values.fold((true, true), |(finite_positive, powers_of_two), bits| {
            // Positive zero is 0; negatives have the sign bit and so exceed +inf's bits.
            let usable = bits.wrapping_sub(1) < INFINITY_BITS - 1;
            (
                finite_positive & usable,
                powers_of_two & usable & (bits & MANTISSA_BITS == 0),
            )
        });
    ScaleProperties {
        finite_positive,
        powers_of_two,
    }
}

/// [`scale_properties`] of each of `scales` (tensors of `checkpoint` with their storage), in
/// order. Reads as [`Checkpoint::read_tensor`] does (positional reads, never a mapping; each
/// file still the one the checkpoint was opened on), but opens each file once for all its
/// scales and checks it unchanged once they are read, as verify reads tens of thousands.
pub fn read_scale_properties(
    checkpoint: &Checkpoint,
    scales: &[(&TensorEntry, ScaleStorage)],
) -> Result<Vec<ScaleProperties>> {
    let mut open: HashMap<usize, File> = HashMap::new();
    let mut buffer = Vec::new();
    let mut properties = Vec::with_capacity(scales.len());
    for &(entry, storage) in scales {
        let source = &checkpoint.files[entry.file];
        let file = match open.entry(entry.file) {
            std::collections::hash_map::Entry::Occupied(found) => found.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let (file, _) = open_regular(&source.path)?;
                source.identity.verify(&source.path, &file)?;
                slot.insert(file)
            }
        };
        buffer.resize(entry.nbytes() as usize, 0);
        read_exact_at(file, &source.path, entry.file_offset, &mut buffer)?;
        properties.push(scale_properties(storage, &buffer));
    }
    for (index, file) in &open {
        let source = &checkpoint.files[*index];
        source.identity.verify(&source.path, file)?;
    }
    Ok(properties)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// bfloat16 values as their top halves; every value used here is exact in bfloat16.
    fn bf16_bytes(values: &[f32]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect()
    }

    fn properties(finite_positive: bool, powers_of_two: bool) -> ScaleProperties {
        ScaleProperties {
            finite_positive,
            powers_of_two,
        }
    }

    /// Each case: values, then what holds for them (in both storages: every value is exact
    /// in bfloat16).
    const CASES: [(&[f32], bool, bool); 14] = [
        (&[], true, true),
        (&[1.0, 0.5, 2.0, 0.0078125, 1024.0], true, true),
        // The smallest normal and the largest power of two, 2^-126 and 2^127.
        (&[f32::MIN_POSITIVE, 1.7014118e38], true, true),
        (&[1.0, 0.75], true, false),
        (&[1.0, 3.0], true, false),
        (&[1.0, f32::MAX], true, false),
        (&[1.0, 0.0], false, false),
        (&[1.0, -0.0], false, false),
        (&[1.0, -2.0], false, false),
        (&[1.0, -0.75], false, false),
        (&[1.0, f32::NAN], false, false),
        (&[1.0, f32::INFINITY], false, false),
        (&[1.0, f32::NEG_INFINITY], false, false),
        (&[f32::MIN_POSITIVE / 2.0, 1.0], true, false),
    ];

    #[test]
    fn every_kind_of_value_is_classified_in_f32_and_bf16() {
        for (values, finite_positive, powers_of_two) in CASES {
            let expected = properties(finite_positive, powers_of_two);
            let f32_found = scale_properties(ScaleStorage::F32, &f32_bytes(values));
            assert_eq!(f32_found, expected, "F32 {values:?}");
            let bf16_found = scale_properties(ScaleStorage::BF16, &bf16_bytes(values));
            assert_eq!(bf16_found, expected, "BF16 {values:?}");
        }
    }

    #[test]
    fn nan_payloads_and_subnormals_below_bfloat16_halves_are_caught() {
        // A NaN with only low mantissa bits, a negative NaN, the smallest subnormal.
        for bits in [0x7F80_0001u32, 0xFFC0_0000, 0x0000_0001] {
            let bytes = f32_bytes(&[1.0, f32::from_bits(bits)]);
            let found = scale_properties(ScaleStorage::F32, &bytes);
            assert!(!found.powers_of_two, "{bits:#x}");
            assert_eq!(found.finite_positive, bits == 1, "{bits:#x}");
        }
        // bfloat16 beside a 1.0 (0x3F80): a NaN, the smallest subnormal, a negative power of two.
        for (bits, finite_positive) in [(0x7FC1u16, false), (0x0001, true), (0xC000, false)] {
            let bytes = [0x3F80u16.to_le_bytes(), bits.to_le_bytes()].concat();
            let found = scale_properties(ScaleStorage::BF16, &bytes);
            assert_eq!(found.finite_positive, finite_positive, "{bits:#x}");
            assert!(!found.powers_of_two, "{bits:#x}");
        }
    }

    #[test]
    fn scales_are_read_from_every_shard_in_the_order_asked() {
        let dir = tempfile::tempdir().unwrap();
        let good = f32_bytes(&[1.0, 2.0]);
        let rounded = bf16_bytes(&[0.75, 1.0]);
        let zero = f32_bytes(&[0.0, 1.0]);
        fn tensor(dtype: Dtype, bytes: &[u8]) -> TensorView<'_> {
            let n = bytes.len() * 8 / dtype.bitsize();
            TensorView::new(dtype, vec![n], bytes).unwrap()
        }
        safetensors::serialize_to_file(
            [
                ("a", tensor(Dtype::F32, &good)),
                ("b", tensor(Dtype::BF16, &rounded)),
            ],
            None,
            &dir.path().join("rank0.safetensors"),
        )
        .unwrap();
        safetensors::serialize_to_file(
            [("c", tensor(Dtype::F32, &zero))],
            None,
            &dir.path().join("rank1.safetensors"),
        )
        .unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let entry = |name| checkpoint.tensor(name).unwrap();
        let found = read_scale_properties(
            &checkpoint,
            &[
                (entry("c"), ScaleStorage::F32),
                (entry("a"), ScaleStorage::F32),
                (entry("b"), ScaleStorage::BF16),
                (entry("a"), ScaleStorage::F32),
            ],
        )
        .unwrap();
        assert_eq!(
            found,
            [
                properties(false, false),
                properties(true, true),
                properties(true, false),
                properties(true, true),
            ]
        );
        assert_eq!(read_scale_properties(&checkpoint, &[]).unwrap(), []);
    }

    #[test]
    fn a_shard_changed_since_opening_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let ones = f32_bytes(&[1.0; 4]);
        let view = TensorView::new(Dtype::F32, vec![4], &ones).unwrap();
        safetensors::serialize_to_file([("s", view)], None, &path).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let scale = (checkpoint.tensor("s").unwrap(), ScaleStorage::F32);
        let err = read_scale_properties(&checkpoint, &[scale]).unwrap_err();
        assert_eq!(err.kind(), "source_changed", "{err}");
    }
}
