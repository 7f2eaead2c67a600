//! Per-block FP8 (`float8_e4m3fn`) quantization on the CPU, bit-exact with the reference
//! arithmetic (vLLM/DeepGEMM `per_block_cast_to_fp8`) in one read of the input:
//!
//! for each `block × block` tile (edge tiles cover what is left): `amax = max|x|` in f32,
//! `amax = max(amax, 1e-4)`, `s = amax / 448`, for ue8m0 `s = 2^ceil(log2 s)`, for bfloat16
//! scales `s` rounded up to the next bfloat16, then `q = e4m3fn_rne(clamp(x * (1/s), ±448))`;
//! `s` is stored as the `_scale_inv` (dequantization is `x ≈ q * s`).

use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::stripes::{
    for_each_stripe, invalid_input, Input, Output, RawBits, StripeBuffer, TileLayout,
};

/// Largest finite `float8_e4m3fn` value.
pub const E4M3_MAX: f32 = 448.0;

/// Floor for a tile's `amax`, so all-zero tiles get a finite scale and quantize to zeros.
const AMAX_FLOOR: f32 = 1e-4;

/// Floating dtypes that can be quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFloat {
    BF16,
    F16,
    F32,
}

impl SourceFloat {
    /// The kind of `dtype`, when it is one that can be quantized.
    pub fn of(dtype: Dtype) -> Option<SourceFloat> {
        match dtype {
            Dtype::BF16 => Some(SourceFloat::BF16),
            Dtype::F16 => Some(SourceFloat::F16),
            Dtype::F32 => Some(SourceFloat::F32),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            SourceFloat::BF16 | SourceFloat::F16 => 2,
            SourceFloat::F32 => 4,
        }
    }
}

/// How one source element is stored, for the monomorphized stripe kernel. Elements are read
/// as native integers (`Raw`), which lets the loops below vectorize.
trait Element {
    type Raw: RawBits;
    /// Bits of the smallest non-finite magnitude; magnitude bits at or above it are Inf/NaN.
    const INFINITY_BITS: u32;
    /// The largest magnitude in `values`, as bits: for IEEE formats the bits of magnitudes
    /// (sign cleared) order like the magnitudes, so this is an integer maximum.
    fn max_magnitude_bits(values: &[Self::Raw]) -> u32;
    /// Converts magnitude bits back to a value.
    fn magnitude_value(bits: u32) -> f32;
    fn value(raw: Self::Raw) -> f32;
}

struct Bf16;
struct Half;
struct Single;

impl Element for Bf16 {
    type Raw = u16;
    const INFINITY_BITS: u32 = 0x7f80;
    #[inline(always)]
    fn max_magnitude_bits(values: &[u16]) -> u32 {
        u32::from(
            values
                .iter()
                .fold(0u16, |m, &x| m.max(u16::from_le(x) & 0x7fff)),
        )
    }
    #[inline(always)]
    fn magnitude_value(bits: u32) -> f32 {
        f32::from_bits(bits << 16)
    }
    #[inline(always)]
    fn value(raw: u16) -> f32 {
        f32::from_bits(u32::from(u16::from_le(raw)) << 16)
    }
}

impl Element for Half {
    type Raw = u16;
    const INFINITY_BITS: u32 = 0x7c00;
    #[inline(always)]
    fn max_magnitude_bits(values: &[u16]) -> u32 {
        Bf16::max_magnitude_bits(values)
    }
    #[inline(always)]
    fn magnitude_value(bits: u32) -> f32 {
        f16_to_f32(bits as u16)
    }
    #[inline(always)]
    fn value(raw: u16) -> f32 {
        f16_to_f32(u16::from_le(raw))
    }
}

impl Element for Single {
    type Raw = u32;
    const INFINITY_BITS: u32 = 0x7f80_0000;
    #[inline(always)]
    fn max_magnitude_bits(values: &[u32]) -> u32 {
        values
            .iter()
            .fold(0u32, |m, &x| m.max(u32::from_le(x) & 0x7fff_ffff))
    }
    #[inline(always)]
    fn magnitude_value(bits: u32) -> f32 {
        f32::from_bits(bits)
    }
    #[inline(always)]
    fn value(raw: u32) -> f32 {
        f32::from_bits(u32::from_le(raw))
    }
}

/// How scales are rounded and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleFormat {
    /// Round every scale up to a power of two (`scale_fmt: "ue8m0"`).
    pub ue8m0: bool,
    /// Store scales as bfloat16 (rounded up) instead of float32.
    pub bf16: bool,
}

impl ScaleFormat {
    /// Bytes per stored scale.
    pub fn size(self) -> usize {
        if self.bf16 {
            2
        } else {
            4
        }
    }

    /// The scale for a tile whose largest magnitude is `amax`.
    #[inline]
    pub fn scale_for(self, amax: f32) -> f32 {
        let mut s = amax.max(AMAX_FLOOR) / E4M3_MAX;
        if self.ue8m0 {
            s = round_up_to_power_of_two(s);
        }
        if self.bf16 {
            s = round_up_to_bf16(s);
        }
        s
    }
}

/// The tensor to quantize: little-endian `source` elements laid out as `layout`.
#[derive(Debug)]
pub struct BlockInput<'a> {
    /// Name for error messages.
    pub tensor: &'a str,
    pub bytes: Input<'a>,
    pub source: SourceFloat,
    pub layout: TileLayout,
}

/// Where results go: one FP8 byte per element and `[batch, tile_rows, tile_cols]` scales.
#[derive(Debug)]
pub struct BlockOutput<'a> {
    pub fp8: &'a mut [u8],
    pub scales: &'a mut [u8],
}

/// Quantizes tensor `entry` of `checkpoint`, seen as `layout`, into `output`, reading it from its
/// file stripe by stripe (see [`crate::stripes`]) on up to `threads` threads.
pub fn quantize_tensor(
    checkpoint: &Checkpoint,
    entry: &TensorEntry,
    layout: TileLayout,
    format: ScaleFormat,
    output: BlockOutput<'_>,
    threads: usize,
) -> Result<()> {
    let source = SourceFloat::of(entry.dtype).ok_or_else(|| {
        let detail = format!("is {}; only BF16, F16 and F32 are quantized", entry.dtype);
        invalid_input(&entry.name, detail)
    })?;
    let input = BlockInput {
        tensor: &entry.name,
        bytes: Input::File(checkpoint.open_tensor(entry)?),
        source,
        layout,
    };
    quantize_blocks(input, format, output, threads)
}

/// Quantizes `input` into `output` using up to `threads` threads. Non-finite inputs are
/// refused: they have no meaningful FP8 value.
pub fn quantize_blocks(
    input: BlockInput<'_>,
    format: ScaleFormat,
    output: BlockOutput<'_>,
    threads: usize,
) -> Result<()> {
    check_sizes(&input, format, &output)?;
    if input.layout.elements() > 0 {
        quantize_stripes(&input, format, output, threads)?;
    }
    input.bytes.finish()
}

/// Checks the block size and that input and outputs have exactly the bytes `layout` needs.
fn check_sizes(
    input: &BlockInput<'_>,
    format: ScaleFormat,
    output: &BlockOutput<'_>,
) -> Result<()> {
    let BlockInput {
        tensor,
        bytes,
        source,
        layout,
    } = input;
    layout.check_blocks(tensor)?;
    let invalid = |detail: String| Err(invalid_input(tensor, detail));
    let input_bytes = layout.elements() * source.size();
    if bytes.len() != input_bytes as u64 {
        return invalid(format!(
            "input has {} bytes, {layout:?} of {source:?} needs {input_bytes}",
            bytes.len(),
        ));
    }
    if output.fp8.len() != layout.elements() {
        return invalid(format!(
            "fp8 output has {} bytes, needs {}",
            output.fp8.len(),
            layout.elements()
        ));
    }
    let scale_bytes = layout.scales() * format.size();
    if output.scales.len() != scale_bytes {
        return invalid(format!(
            "scale output has {} bytes, needs {scale_bytes}",
            output.scales.len(),
        ));
    }
    Ok(())
}

/// Quantizes every stripe of `input` into its part of `output`.
fn quantize_stripes(
    input: &BlockInput<'_>,
    format: ScaleFormat,
    output: BlockOutput<'_>,
    threads: usize,
) -> Result<()> {
    let BlockInput {
        tensor,
        ref bytes,
        source,
        layout,
    } = *input;
    let outputs = [
        Output {
            bytes: output.fp8,
            per_row: layout.cols,
            per_stripe: 0,
        },
        Output {
            bytes: output.scales,
            per_row: 0,
            per_stripe: layout.tile_cols() * format.size(),
        },
    ];
    let row_bytes = layout.cols * source.size();
    for_each_stripe(layout, threads, outputs, || {
        let mut buffer = StripeBuffer::default();
        move |stripe, [q, scales]| {
            let rows = layout.stripe_rows(stripe);
            let start = layout.stripe_start_row(stripe) * row_bytes;
            let work = Stripe {
                src: bytes.bytes(start, rows * row_bytes, &mut buffer)?,
                rows,
                cols: layout.cols,
                block_cols: layout.block_cols,
                q,
                scales,
            };
            if quantize_stripe(source, work, format) {
                return Ok(());
            }
            let at = layout.describe_stripe(stripe);
            Err(invalid_input(
                tensor,
                format!("contains NaN or Inf ({at}); refusing to quantize it"),
            ))
        }
    })
}

/// One stripe of `rows × cols` elements and its outputs.
struct Stripe<'a> {
    src: &'a [u8],
    rows: usize,
    cols: usize,
    block_cols: usize,
    q: &'a mut [u8],
    scales: &'a mut [u8],
}

/// Quantizes one stripe, using AVX2 when the processor has it (same arithmetic, wider
/// registers: the result is bit-identical). Returns `false` on a non-finite input.
fn quantize_stripe(source: SourceFloat, stripe: Stripe<'_>, format: ScaleFormat) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the processor supports AVX2, checked just above.
        return unsafe { quantize_stripe_avx2(source, stripe, format) };
    }
    quantize_stripe_portable(source, stripe, format)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_stripe_avx2(
    source: SourceFloat,
    stripe: Stripe<'_>,
    format: ScaleFormat,
) -> bool {
    quantize_stripe_portable(source, stripe, format)
}

#[inline(always)]
fn quantize_stripe_portable(source: SourceFloat, stripe: Stripe<'_>, format: ScaleFormat) -> bool {
    match source {
        SourceFloat::BF16 => quantize_stripe_of::<Bf16>(stripe, format),
        SourceFloat::F16 => quantize_stripe_of::<Half>(stripe, format),
        SourceFloat::F32 => quantize_stripe_of::<Single>(stripe, format),
    }
}

#[inline(always)]
fn quantize_stripe_of<E: Element>(stripe: Stripe<'_>, format: ScaleFormat) -> bool {
    let Stripe {
        src,
        rows,
        cols,
        block_cols,
        q,
        scales,
    } = stripe;
    // SAFETY: `Raw` is a plain integer type: every bit pattern is valid.
    let (head, aligned, _) = unsafe { src.align_to::<E::Raw>() };
    let copied: Vec<E::Raw>;
    let values: &[E::Raw] = if head.is_empty() {
        aligned
    } else {
        // The tensor starts at an odd address (a hand-made file): decode a copy.
        let size = std::mem::size_of::<E::Raw>();
        copied = src.chunks_exact(size).map(E::Raw::read_unaligned).collect();
        &copied
    };
    let tiles = cols.div_ceil(block_cols);

    // Pass 1: each tile's largest magnitude.
    let mut amax_bits = vec![0u32; tiles];
    for row in values.chunks_exact(cols).take(rows) {
        for (slot, segment) in amax_bits.iter_mut().zip(row.chunks(block_cols)) {
            *slot = (*slot).max(E::max_magnitude_bits(segment));
        }
    }
    if amax_bits.iter().any(|&m| m >= E::INFINITY_BITS) {
        return false;
    }

    let mut inverse = vec![0f32; tiles];
    for (b, (&m, inv)) in amax_bits.iter().zip(inverse.iter_mut()).enumerate() {
        let s = format.scale_for(E::magnitude_value(m));
        *inv = 1.0 / s;
        if format.bf16 {
            let bits = (s.to_bits() >> 16) as u16;
            scales[2 * b..2 * b + 2].copy_from_slice(&bits.to_le_bytes());
        } else {
            scales[4 * b..4 * b + 4].copy_from_slice(&s.to_le_bytes());
        }
    }

    // Pass 2: scale, clamp and round every element (the stripe is still in cache).
    for (row, q_row) in values.chunks_exact(cols).zip(q.chunks_exact_mut(cols)) {
        for ((segment, q_segment), &inv) in row
            .chunks(block_cols)
            .zip(q_row.chunks_mut(block_cols))
            .zip(&inverse)
        {
            for (&raw, out) in segment.iter().zip(q_segment.iter_mut()) {
                *out = f32_to_e4m3fn((E::value(raw) * inv).clamp(-E4M3_MAX, E4M3_MAX));
            }
        }
    }
    true
}

/// Rounds a finite `f32` within ±448 to `float8_e4m3fn`, round-to-nearest-even. (Callers
/// clamp first, so the NaN encoding is never produced.) Branch-free so it vectorizes.
#[inline(always)]
pub fn f32_to_e4m3fn(x: f32) -> u8 {
    const MIN_NORMAL_BITS: u32 = 121 << 23; // 2^-6, the smallest normal e4m3fn
    let bits = x.to_bits();
    let sign = (bits >> 24) & 0x80;
    let magnitude = bits & 0x7fff_ffff;
    // Normal: rebias the exponent (127 → 7) and round the 23-bit mantissa to 3 bits, ties to
    // even (add 0x7ffff plus the lowest kept bit, then truncate).
    let odd = (magnitude >> 20) & 1;
    let normal = magnitude
        .wrapping_sub((127 - 7) << 23)
        .wrapping_add(0x7ffff + odd)
        >> 20;
    // Subnormal: the code is the magnitude in units of 2^-9, rounded to an integer; adding 2^23
    // makes the FPU round it (ties to even) into the low mantissa bits.
    let subnormal = (f32::from_bits(magnitude) * 512.0 + 8_388_608.0).to_bits() - 0x4b00_0000;
    let code = if magnitude < MIN_NORMAL_BITS {
        subnormal
    } else {
        normal
    };
    (code | sign) as u8
}

/// `2^ceil(log2 s)` for positive normal `s`, computed on the bits (exact, unlike `log2`).
#[inline]
pub fn round_up_to_power_of_two(s: f32) -> f32 {
    let bits = s.to_bits();
    let exponent = bits >> 23;
    let mantissa = bits & 0x7f_ffff;
    f32::from_bits((exponent + u32::from(mantissa != 0)) << 23)
}

/// The smallest bfloat16 value not below positive finite `s`, as `f32`.
#[inline]
pub fn round_up_to_bf16(s: f32) -> f32 {
    f32::from_bits((s.to_bits() + 0xffff) & 0xffff_0000)
}

/// Exact IEEE half → single conversion.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exponent = ((h >> 10) & 0x1f) as u32;
    let mantissa = (h & 0x3ff) as u32;
    let bits = match (exponent, mantissa) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal half: value = m · 2^-24, exactly representable in f32.
            return f32::from_bits(sign)
                + if sign != 0 { -(m as f32) } else { m as f32 } * 2f32.powi(-24);
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    // The dequantization kernel's decoder, itself checked code by code against the format's
    // definition in its own tests.
    use crate::dequantize::e4m3fn_to_f32;

    #[test]
    fn every_finite_code_round_trips_and_midpoints_tie_to_even() {
        let codes: Vec<u8> = (0u8..=0x7e).collect();
        for &c in &codes {
            let v = e4m3fn_to_f32(c);
            assert_eq!(f32_to_e4m3fn(v), c, "code {c:#x}");
            assert_eq!(f32_to_e4m3fn(-v), c | 0x80, "code -{c:#x}");
        }
        for w in codes.windows(2) {
            let (lo, hi) = (e4m3fn_to_f32(w[0]), e4m3fn_to_f32(w[1]));
            let even = if w[0] % 2 == 0 { w[0] } else { w[1] };
            assert_eq!(
                f32_to_e4m3fn((lo + hi) / 2.0),
                even,
                "tie between {lo} and {hi}"
            );
            assert_eq!(f32_to_e4m3fn(lo + (hi - lo) * 0.26), w[0]);
            assert_eq!(f32_to_e4m3fn(lo + (hi - lo) * 0.74), w[1]);
        }
        assert_eq!(f32_to_e4m3fn(448.0), 0x7e);
    }

    #[test]
    fn scales_round_as_specified() {
        let f = ScaleFormat {
            ue8m0: false,
            bf16: false,
        };
        assert_eq!(f.scale_for(0.0), 1e-4 / 448.0);
        assert_eq!(f.scale_for(448.0), 1.0);
        let p = ScaleFormat {
            ue8m0: true,
            bf16: false,
        };
        assert_eq!(p.scale_for(448.0), 1.0);
        assert_eq!(p.scale_for(449.0), 2.0);
        assert_eq!(p.scale_for(300.0), 1.0);
        let b = ScaleFormat {
            ue8m0: false,
            bf16: true,
        };
        let s = b.scale_for(3.0);
        assert!(s >= 3.0 / 448.0 && s.to_bits() & 0xffff == 0);
    }

    #[test]
    fn half_conversion_is_exact() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8001), -(2f32.powi(-24)));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn quantizes_tiles_independently_with_edges_and_batches() {
        let layout = TileLayout::square(2, 3, 5, 2);
        let values: Vec<f32> = (0..layout.elements()).map(|i| i as f32 - 7.0).collect();
        let input: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let format = ScaleFormat {
            ue8m0: false,
            bf16: false,
        };
        let mut q = vec![0u8; layout.elements()];
        let mut s = vec![0u8; layout.scales() * 4];
        quantize_blocks(
            BlockInput {
                tensor: "t",
                bytes: Input::Memory(&input),
                source: SourceFloat::F32,
                layout,
            },
            format,
            BlockOutput {
                fp8: &mut q,
                scales: &mut s,
            },
            3,
        )
        .unwrap();
        let scales: Vec<f32> = s
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        for m in 0..2 {
            for r in 0..3 {
                for c in 0..5 {
                    let i = (m * 3 + r) * 5 + c;
                    let scale = scales[(m * 2 + r / 2) * 3 + c / 2];
                    let deq = e4m3fn_to_f32(q[i]) * scale;
                    assert!(
                        (deq - values[i]).abs() <= values[i].abs() / 16.0 + 1e-6,
                        "{i}"
                    );
                }
            }
        }
        // The first tile of matrix 1 holds 8, 9 (row 0) and 13, 14 (row 1).
        assert_eq!(scales[6], 14.0 / 448.0);
    }

    #[test]
    fn zero_tiles_give_zeros_and_non_finite_inputs_are_refused() {
        let layout = TileLayout::square(1, 4, 4, 2);
        let input = vec![0u8; 32];
        let format = ScaleFormat {
            ue8m0: true,
            bf16: true,
        };
        let mut q = vec![9u8; 16];
        let mut s = vec![0u8; 8];
        quantize_blocks(
            BlockInput {
                tensor: "z",
                bytes: Input::Memory(&input),
                source: SourceFloat::BF16,
                layout,
            },
            format,
            BlockOutput {
                fp8: &mut q,
                scales: &mut s,
            },
            2,
        )
        .unwrap();
        assert!(q.iter().all(|&b| b == 0));
        let mut bad = input.clone();
        bad[10] = 0x80;
        bad[11] = 0x7f; // bf16 +inf at element 5 (row 1)
        let err = quantize_blocks(
            BlockInput {
                tensor: "w",
                bytes: Input::Memory(&bad),
                source: SourceFloat::BF16,
                layout,
            },
            format,
            BlockOutput {
                fp8: &mut q,
                scales: &mut s,
            },
            2,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor 'w': contains NaN or Inf (matrix 0, rows 0..2); refusing to quantize it"
        );
    }

    /// Bytes of a tensor quantized by `run` (into outputs for `layout`).
    fn quantized(
        run: impl FnOnce(BlockOutput<'_>) -> Result<()>,
        layout: TileLayout,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let (mut q, mut s) = (vec![0u8; layout.elements()], vec![0u8; layout.scales() * 4]);
        run(BlockOutput {
            fp8: &mut q,
            scales: &mut s,
        })?;
        Ok((q, s))
    }

    const FLOAT_SCALES: ScaleFormat = ScaleFormat {
        ue8m0: false,
        bf16: false,
    };
    /// Two matrices of 150 rows: stripes of 128 and 22 rows.
    const TWO_MATRICES: TileLayout = TileLayout {
        batch: 2,
        rows: 150,
        cols: 130,
        block_rows: 128,
        block_cols: 128,
    };

    /// `dir/model.safetensors` holding bf16 `w` ([`TWO_MATRICES`]) and a U8 `ids`, and `w`'s bytes.
    fn bf16_checkpoint(dir: &std::path::Path) -> (Checkpoint, Vec<u8>) {
        use safetensors::Dtype as Stored;
        let values: Vec<u8> = (0..TWO_MATRICES.elements())
            .flat_map(|i| {
                let x = ((i * 7919) % 2000) as f32 / 100.0 - 10.0;
                ((x.to_bits() >> 16) as u16).to_le_bytes()
            })
            .collect();
        let tensors: [(&str, Stored, &[usize], &[u8]); 2] = [
            ("w", Stored::BF16, &[2, 150, 130], &values),
            ("ids", Stored::U8, &[3], &[1, 2, 3]),
        ];
        let checkpoint = crate::checkpoint::testing::single_file_checkpoint(dir, &tensors);
        (checkpoint, values)
    }

    fn bf16_input(bytes: Input<'_>) -> BlockInput<'_> {
        BlockInput {
            tensor: "w",
            bytes,
            source: SourceFloat::BF16,
            layout: TWO_MATRICES,
        }
    }

    #[test]
    fn a_checkpoint_tensor_quantizes_as_its_bytes_in_memory_do() {
        let dir = tempfile::tempdir().unwrap();
        let (checkpoint, values) = bf16_checkpoint(dir.path());
        let layout = TWO_MATRICES;
        let in_memory = |out: BlockOutput<'_>| {
            quantize_blocks(bf16_input(Input::Memory(&values)), FLOAT_SCALES, out, 1)
        };
        let expected = quantized(in_memory, layout).unwrap();
        let entry = checkpoint.tensor("w").unwrap();
        for threads in [1, 2, 3] {
            let run = |out: BlockOutput<'_>| {
                quantize_tensor(&checkpoint, entry, layout, FLOAT_SCALES, out, threads)
            };
            assert_eq!(quantized(run, layout).unwrap(), expected, "{threads}");
        }

        let ids = checkpoint.tensor("ids").unwrap();
        let run =
            |out: BlockOutput<'_>| quantize_tensor(&checkpoint, ids, layout, FLOAT_SCALES, out, 1);
        let err = quantized(run, layout).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor 'ids': is U8; only BF16, F16 and F32 are quantized"
        );
        let one = TileLayout { batch: 1, ..layout };
        let run =
            |out: BlockOutput<'_>| quantize_tensor(&checkpoint, entry, one, FLOAT_SCALES, out, 1);
        let err = quantized(run, one).unwrap_err();
        assert!(err.to_string().contains("input has 78000 bytes"), "{err}");
    }

    #[test]
    fn a_checkpoint_tensor_that_shrinks_or_is_rewritten_while_being_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::format::SINGLE_FILE);
        // Shrunk after the identity check, in the middle of the tensor: a stripe's read comes up
        // short.
        let (checkpoint, _) = bf16_checkpoint(dir.path());
        let entry = checkpoint.tensor("w").unwrap();
        let from_file = bf16_input(Input::File(checkpoint.open_tensor(entry).unwrap()));
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(entry.file_offset + 50_000).unwrap();
        let run = |out: BlockOutput<'_>| quantize_blocks(from_file, FLOAT_SCALES, out, 2);
        let err = quantized(run, TWO_MATRICES).unwrap_err();
        assert_eq!(err.kind(), "source_changed");
        assert!(err.to_string().contains("it shrank"), "{err}");

        // Rewritten in place: every read succeeds, but the bytes may mix two versions.
        let (checkpoint, _) = bf16_checkpoint(dir.path());
        let entry = checkpoint.tensor("w").unwrap();
        let from_file = bf16_input(Input::File(checkpoint.open_tensor(entry).unwrap()));
        crate::checkpoint::testing::rewrite_in_place(&path, entry.file_offset + 70_000);
        let run = |out: BlockOutput<'_>| quantize_blocks(from_file, FLOAT_SCALES, out, 2);
        let err = quantized(run, TWO_MATRICES).unwrap_err();
        assert_eq!(err.kind(), "source_changed");
        assert!(err.to_string().contains("it was modified"), "{err}");
    }
}
