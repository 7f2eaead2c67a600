//! Per-block FP8 (`float8_e4m3fn`) dequantization on the CPU, the inverse of [`crate::fp8`]:
//!
//! `y = out(f32(q) · f32(s))` for every element, `s` the scale of the element's
//! `block_rows × block_cols` tile (edge tiles cover what is left), narrowing to bfloat16 or
//! float16 with round-to-nearest-even. That is the arithmetic of the DeepSeek reference kernel and
//! of transformers' CPU dequantization. Scales are stored as float32, bfloat16, float16 or
//! float8_e8m0 (powers of two); each is exact in float32.
//!
//! A non-finite result is refused: e4m3fn has no infinity, so one comes only from a NaN code in
//! the weight, a non-finite scale, or a product beyond the output type's range — corrupt input
//! either way, never something to hand to training.

use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::fp8::f16_to_f32;
use crate::stripes::{
    for_each_stripe, invalid_input, Input, Output, RawBits, StripeBuffer, TileLayout,
};

/// How scales are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleFloat {
    F32,
    BF16,
    F16,
    /// `float8_e8m0fnu`: a biased exponent, `2^(e - 127)`; 255 is NaN.
    E8M0,
}

impl ScaleFloat {
    /// How scales of `dtype` are stored, when the kernel reads that dtype.
    pub fn of(dtype: Dtype) -> Option<ScaleFloat> {
        match dtype {
            Dtype::F32 => Some(ScaleFloat::F32),
            Dtype::BF16 => Some(ScaleFloat::BF16),
            Dtype::F16 => Some(ScaleFloat::F16),
            Dtype::F8_E8M0 => Some(ScaleFloat::E8M0),
            _ => None,
        }
    }

    /// Bytes per stored scale.
    pub fn size(self) -> usize {
        match self {
            ScaleFloat::F32 => 4,
            ScaleFloat::BF16 | ScaleFloat::F16 => 2,
            ScaleFloat::E8M0 => 1,
        }
    }

    /// The value of one little-endian stored scale (`bytes` holds exactly one).
    pub fn value(self, bytes: &[u8]) -> f32 {
        match self {
            ScaleFloat::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            ScaleFloat::BF16 => {
                f32::from_bits(u32::from(u16::from_le_bytes([bytes[0], bytes[1]])) << 16)
            }
            ScaleFloat::F16 => f16_to_f32(u16::from_le_bytes([bytes[0], bytes[1]])),
            ScaleFloat::E8M0 => match bytes[0] {
                255 => f32::NAN,
                // 2^-127 is a float32 subnormal: the one mantissa bit just below the exponent.
                0 => f32::from_bits(0x0040_0000),
                e => f32::from_bits(u32::from(e) << 23),
            },
        }
    }
}

/// The floating type dequantized values are written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetFloat {
    BF16,
    F16,
    F32,
}

impl TargetFloat {
    /// The output type for `dtype`, when the kernel writes that dtype.
    pub fn of(dtype: Dtype) -> Option<TargetFloat> {
        match dtype {
            Dtype::BF16 => Some(TargetFloat::BF16),
            Dtype::F16 => Some(TargetFloat::F16),
            Dtype::F32 => Some(TargetFloat::F32),
            _ => None,
        }
    }

    /// Bytes per output element.
    pub fn size(self) -> usize {
        match self {
            TargetFloat::BF16 | TargetFloat::F16 => 2,
            TargetFloat::F32 => 4,
        }
    }
}

/// The tensor to dequantize: one e4m3fn byte per element and its per-tile scales.
#[derive(Debug)]
pub struct Fp8Input<'a> {
    /// Name for error messages.
    pub tensor: &'a str,
    pub fp8: Input<'a>,
    pub scales: Input<'a>,
    pub scale: ScaleFloat,
    pub layout: TileLayout,
}

/// Dequantizes FP8 tensor `weight` of `checkpoint` with its scale tensor `scale`, seen as
/// `layout`, into `out` (little-endian `target` elements), reading both from their files stripe
/// by stripe (see [`crate::stripes`]) on up to `threads` threads.
pub fn dequantize_tensor(
    checkpoint: &Checkpoint,
    weight: &TensorEntry,
    scale: &TensorEntry,
    layout: TileLayout,
    target: TargetFloat,
    out: &mut [u8],
    threads: usize,
) -> Result<()> {
    let invalid = |detail: String| invalid_input(&weight.name, detail);
    if weight.dtype != Dtype::F8_E4M3 {
        return Err(invalid(format!(
            "is {}; only F8_E4M3 weights are dequantized",
            weight.dtype
        )));
    }
    let stored = ScaleFloat::of(scale.dtype).ok_or_else(|| {
        invalid(format!(
            "its scale '{}' is {}; scales are F32, BF16, F16 or F8_E8M0",
            scale.name, scale.dtype
        ))
    })?;
    let input = Fp8Input {
        tensor: &weight.name,
        fp8: Input::File(checkpoint.open_tensor(weight)?),
        scales: Input::File(checkpoint.open_tensor(scale)?),
        scale: stored,
        layout,
    };
    dequantize_blocks(input, target, out, threads)
}

/// Dequantizes `input` into `out` (little-endian `target` elements, the weight's layout) using
/// up to `threads` threads.
pub fn dequantize_blocks(
    input: Fp8Input<'_>,
    target: TargetFloat,
    out: &mut [u8],
    threads: usize,
) -> Result<()> {
    check_sizes(&input, target, out)?;
    if input.layout.elements() > 0 {
        dequantize_stripes(&input, target, out, threads)?;
    }
    input.fp8.finish()?;
    input.scales.finish()
}

/// Checks the block size and that inputs and output have exactly the bytes `layout` needs.
fn check_sizes(input: &Fp8Input<'_>, target: TargetFloat, out: &[u8]) -> Result<()> {
    let Fp8Input {
        tensor,
        fp8,
        scales,
        scale,
        layout,
    } = input;
    layout.check_blocks(tensor)?;
    let invalid = |detail: String| Err(invalid_input(tensor, detail));
    if fp8.len() != layout.elements() as u64 {
        return invalid(format!(
            "fp8 input has {} bytes, {layout:?} needs {}",
            fp8.len(),
            layout.elements()
        ));
    }
    if scales.len() != (layout.scales() * scale.size()) as u64 {
        return invalid(format!(
            "scales have {} bytes, {} scales of {scale:?} need {}",
            scales.len(),
            layout.scales(),
            layout.scales() * scale.size()
        ));
    }
    if out.len() != layout.elements() * target.size() {
        return invalid(format!(
            "output has {} bytes, {} elements of {target:?} need {}",
            out.len(),
            layout.elements(),
            layout.elements() * target.size()
        ));
    }
    Ok(())
}

/// Dequantizes every stripe of `input` into its part of `out`.
fn dequantize_stripes(
    input: &Fp8Input<'_>,
    target: TargetFloat,
    out: &mut [u8],
    threads: usize,
) -> Result<()> {
    let Fp8Input {
        tensor,
        ref fp8,
        ref scales,
        scale,
        layout,
    } = *input;
    let outputs = [Output {
        bytes: out,
        per_row: layout.cols * target.size(),
        per_stripe: 0,
    }];
    let scale_row = layout.tile_cols() * scale.size();
    for_each_stripe(layout, threads, outputs, || {
        let (mut fp8_buffer, mut scale_buffer) = (StripeBuffer::default(), StripeBuffer::default());
        let mut decoded = vec![0f32; layout.tile_cols()];
        move |stripe, [y]| {
            let stored = scales.bytes(stripe * scale_row, scale_row, &mut scale_buffer)?;
            for (value, stored) in decoded.iter_mut().zip(stored.chunks_exact(scale.size())) {
                *value = scale.value(stored);
            }
            let n = layout.stripe_rows(stripe) * layout.cols;
            let start = layout.stripe_start_row(stripe) * layout.cols;
            let work = Stripe {
                q: fp8.bytes(start, n, &mut fp8_buffer)?,
                scales: &decoded,
                cols: layout.cols,
                block_cols: layout.block_cols,
                out: y,
            };
            if dequantize_stripe(target, work) {
                return Ok(());
            }
            let at = layout.describe_stripe(stripe);
            Err(invalid_input(
                tensor,
                format!(
                    "dequantizes to NaN or Inf ({at}): the weight holds an FP8 NaN code, a scale \
                     is not finite, or a value exceeds the range of {target:?}"
                ),
            ))
        }
    })
}

/// One stripe: whole rows of FP8 codes, one decoded scale per tile column, and its output bytes.
struct Stripe<'a> {
    q: &'a [u8],
    scales: &'a [f32],
    cols: usize,
    block_cols: usize,
    out: &'a mut [u8],
}

/// Dequantizes one stripe, using AVX2 when the processor has it (same arithmetic, wider
/// registers: bit-identical results). Returns `false` when a result is not finite.
fn dequantize_stripe(target: TargetFloat, stripe: Stripe<'_>) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the processor supports AVX2, checked just above.
        return unsafe { dequantize_stripe_avx2(target, stripe) };
    }
    dequantize_stripe_portable(target, stripe)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequantize_stripe_avx2(target: TargetFloat, stripe: Stripe<'_>) -> bool {
    dequantize_stripe_portable(target, stripe)
}

#[inline(always)]
fn dequantize_stripe_portable(target: TargetFloat, stripe: Stripe<'_>) -> bool {
    match target {
        TargetFloat::BF16 => dequantize_stripe_of::<Bf16>(stripe),
        TargetFloat::F16 => dequantize_stripe_of::<Half>(stripe),
        TargetFloat::F32 => dequantize_stripe_of::<Single>(stripe),
    }
}

/// How one output element is stored, for the monomorphized stripe loop. Results are written as
/// native integers (`Raw`), which lets the loop vectorize.
trait Target {
    type Raw: RawBits;
    /// `x` rounded to this type (nearest, ties to even), as little-endian bits.
    fn narrow(x: f32) -> Self::Raw;
    /// 1 when `raw` is an infinity or a NaN, else 0 (an integer, so the loop stays branch-free).
    fn non_finite(raw: Self::Raw) -> u32;
}

struct Bf16;
struct Half;
struct Single;

impl Target for Bf16 {
    type Raw = u16;
    #[inline(always)]
    fn narrow(x: f32) -> u16 {
        f32_to_bf16(x).to_le()
    }
    #[inline(always)]
    fn non_finite(raw: u16) -> u32 {
        u32::from(u16::from_le(raw) & 0x7f80 == 0x7f80)
    }
}

impl Target for Half {
    type Raw = u16;
    #[inline(always)]
    fn narrow(x: f32) -> u16 {
        f32_to_f16(x).to_le()
    }
    #[inline(always)]
    fn non_finite(raw: u16) -> u32 {
        u32::from(u16::from_le(raw) & 0x7c00 == 0x7c00)
    }
}

impl Target for Single {
    type Raw = u32;
    #[inline(always)]
    fn narrow(x: f32) -> u32 {
        x.to_bits().to_le()
    }
    #[inline(always)]
    fn non_finite(raw: u32) -> u32 {
        u32::from(u32::from_le(raw) & 0x7f80_0000 == 0x7f80_0000)
    }
}

#[inline(always)]
fn dequantize_stripe_of<T: Target>(stripe: Stripe<'_>) -> bool {
    let Stripe {
        q,
        scales,
        cols,
        block_cols,
        out,
    } = stripe;
    let size = std::mem::size_of::<T::Raw>();
    // SAFETY: `Raw` is a plain integer type: every bit pattern is valid.
    let (head, aligned, _) = unsafe { out.align_to_mut::<T::Raw>() };
    if head.is_empty() {
        return dequantize_rows::<T>(q, scales, cols, block_cols, aligned);
    }
    // The output starts at an odd address (a caller's buffer): compute, then copy bytes.
    let mut computed = vec![T::Raw::default(); q.len()];
    let finite = dequantize_rows::<T>(q, scales, cols, block_cols, &mut computed);
    for (&raw, bytes) in computed.iter().zip(out.chunks_exact_mut(size)) {
        raw.write_unaligned(bytes);
    }
    finite
}

#[inline(always)]
fn dequantize_rows<T: Target>(
    q: &[u8],
    scales: &[f32],
    cols: usize,
    block_cols: usize,
    out: &mut [T::Raw],
) -> bool {
    let mut non_finite = 0u32;
    for (q_row, out_row) in q.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        for ((q_tile, out_tile), &s) in q_row
            .chunks(block_cols)
            .zip(out_row.chunks_mut(block_cols))
            .zip(scales)
        {
            let mut tile_flags = 0u32;
            for (&code, y) in q_tile.iter().zip(out_tile.iter_mut()) {
                let raw = T::narrow(e4m3fn_to_f32(code) * s);
                tile_flags |= T::non_finite(raw);
                *y = raw;
            }
            non_finite |= tile_flags;
        }
    }
    non_finite == 0
}

/// The exact value of a `float8_e4m3fn` code (0x7f and 0xff are NaN; there is no infinity).
/// Branch-free so it vectorizes.
#[inline(always)]
pub fn e4m3fn_to_f32(code: u8) -> f32 {
    let code = u32::from(code);
    let sign = (code & 0x80) << 24;
    let magnitude = code & 0x7f;
    // Normal: exponent rebiased 7 → 127, the 3 mantissa bits moved to the top of 23.
    let normal = (magnitude << 20) + ((127 - 7) << 23);
    // Subnormal (exponent field 0): the mantissa in units of 2^-9, exact in float32.
    let subnormal = (magnitude as f32 * (1.0 / 512.0)).to_bits();
    let bits = if magnitude < 8 { subnormal } else { normal };
    let bits = if magnitude == 0x7f { 0x7fc0_0000 } else { bits };
    f32::from_bits(bits | sign)
}

/// Rounds `x` to bfloat16 bits, to nearest, ties to even (NaN stays NaN).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        (bits >> 16) as u16 | 0x0040
    } else {
        rounded
    }
}

/// Rounds `x` to IEEE half bits, to nearest, ties to even: overflow gives ±infinity, tiny values
/// become half subnormals or zero, NaN stays NaN. Branch-free so it vectorizes.
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    const INFINITY: u32 = 0xff << 23;
    // 2^16: at or above it (65520 and up round there) a half overflows.
    const OVERFLOW: u32 = (127 + 16) << 23;
    // 2^-14, the smallest normal half.
    const MIN_NORMAL: u32 = 113 << 23;
    // 0.5: adding it puts a value below 2^-14 into the low mantissa bits, in units of 2^-24,
    // rounded by the FPU (ties to even).
    const SUBNORMAL_MAGIC: u32 = 126 << 23;
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let magnitude = bits & 0x7fff_ffff;
    let overflowed = if magnitude > INFINITY { 0x7e00 } else { 0x7c00 };
    let subnormal = (f32::from_bits(magnitude) + f32::from_bits(SUBNORMAL_MAGIC))
        .to_bits()
        .wrapping_sub(SUBNORMAL_MAGIC);
    // Normal: rebias the exponent (127 → 15) and round 23 mantissa bits to 10, ties to even.
    let odd = (magnitude >> 13) & 1;
    let normal = magnitude
        .wrapping_sub((127 - 15) << 23)
        .wrapping_add(0xfff + odd)
        >> 13;
    let code = if magnitude >= OVERFLOW {
        overflowed
    } else if magnitude < MIN_NORMAL {
        subnormal
    } else {
        normal
    };
    code as u16 | sign
}

#[cfg(test)]
mod tests {
    use super::*;

    /// e4m3fn decoded from its definition (for checking the branch-free decoder).
    fn e4m3fn_by_definition(code: u8) -> f32 {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = i32::from((code >> 3) & 0xf);
        let m = f32::from(code & 7);
        if code & 0x7f == 0x7f {
            f32::NAN
        } else if e == 0 {
            sign * m * 2f32.powi(-9)
        } else {
            sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
        }
    }

    fn half_by_definition(h: u16) -> f64 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let e = i32::from((h >> 10) & 0x1f);
        let m = f64::from(h & 0x3ff);
        if e == 0 {
            sign * m * 2f64.powi(-24)
        } else {
            sign * (1.0 + m / 1024.0) * 2f64.powi(e - 15)
        }
    }

    #[test]
    fn every_e4m3fn_code_decodes_to_its_value() {
        for code in 0..=255u8 {
            let (got, want) = (e4m3fn_to_f32(code), e4m3fn_by_definition(code));
            if want.is_nan() {
                assert!(got.is_nan(), "code {code:#x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "code {code:#x}");
            }
        }
        assert_eq!(e4m3fn_to_f32(0x7e), 448.0);
        assert_eq!(e4m3fn_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3fn_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and the next bfloat16: ties to the even 1.
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // (1 + 2^-7) + 2^-8 is halfway between an odd and an even code: up to the even one.
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-7) + 2f32.powi(-8)), 0x3f82);
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3f81);
        assert_eq!(f32_to_bf16(-2.5), 0xc020);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80);
        assert!(f32_to_bf16(f32::NAN) & 0x7f80 == 0x7f80 && f32_to_bf16(f32::NAN) & 0x7f != 0);
    }

    #[test]
    fn every_half_round_trips_and_midpoints_tie_to_even() {
        for h in 0..0x7c00u16 {
            let v = half_by_definition(h) as f32;
            assert_eq!(f32_to_f16(v), h, "half {h:#x}");
            assert_eq!(f32_to_f16(-v), h | 0x8000, "half -{h:#x}");
            let next = half_by_definition(h + 1);
            let mid = ((f64::from(v) + next) / 2.0) as f32;
            let even = if h % 2 == 0 { h } else { h + 1 };
            assert_eq!(f32_to_f16(mid), even, "tie above {h:#x}");
            let below = ((f64::from(v) * 3.0 + next) / 4.0) as f32;
            assert_eq!(f32_to_f16(below), h, "just above {h:#x}");
        }
        assert_eq!(f32_to_f16(65504.0), 0x7bff);
        assert_eq!(f32_to_f16(65519.99), 0x7bff);
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        assert_eq!(f32_to_f16(-1e10), 0xfc00);
        assert_eq!(f32_to_f16(f32::INFINITY), 0x7c00);
        assert_eq!(f32_to_f16(f32::NAN) & 0x7e00, 0x7e00);
        assert_eq!(f32_to_f16(2f32.powi(-26)), 0);
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.5), 1);
    }

    #[test]
    fn scales_decode_from_every_storage() {
        assert_eq!(ScaleFloat::F32.value(&0.375f32.to_le_bytes()), 0.375);
        assert_eq!(ScaleFloat::BF16.value(&0x3ec0u16.to_le_bytes()), 0.375);
        assert_eq!(ScaleFloat::F16.value(&0x3600u16.to_le_bytes()), 0.375);
        assert_eq!(ScaleFloat::E8M0.value(&[127]), 1.0);
        assert_eq!(ScaleFloat::E8M0.value(&[120]), 2f32.powi(-7));
        assert_eq!(ScaleFloat::E8M0.value(&[0]), 2f32.powi(-127));
        assert!(ScaleFloat::E8M0.value(&[255]).is_nan());
    }

    /// The kernel's result computed one element at a time from the definition.
    fn reference(
        q: &[u8],
        scales: &[f32],
        layout: TileLayout,
        narrow: impl Fn(f32) -> Vec<u8>,
    ) -> Vec<u8> {
        let (tr, tc) = (layout.tile_rows(), layout.tile_cols());
        let mut out = Vec::new();
        for m in 0..layout.batch {
            for r in 0..layout.rows {
                for c in 0..layout.cols {
                    let code = q[(m * layout.rows + r) * layout.cols + c];
                    let s = scales[(m * tr + r / layout.block_rows) * tc + c / layout.block_cols];
                    out.extend(narrow(e4m3fn_by_definition(code) * s));
                }
            }
        }
        out
    }

    fn pseudo_random_codes(n: usize, seed: u32) -> Vec<u8> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let code = (state >> 24) as u8;
                // No NaN codes: they are refused.
                if code & 0x7f == 0x7f {
                    code & 0xfe
                } else {
                    code
                }
            })
            .collect()
    }

    #[test]
    fn tiles_edges_batches_and_thread_counts_give_the_reference_bytes() {
        for (layout, scale) in [
            (
                TileLayout {
                    batch: 2,
                    rows: 5,
                    cols: 7,
                    block_rows: 2,
                    block_cols: 3,
                },
                ScaleFloat::F32,
            ),
            (
                TileLayout {
                    batch: 3,
                    rows: 130,
                    cols: 129,
                    block_rows: 128,
                    block_cols: 128,
                },
                ScaleFloat::BF16,
            ),
            (
                TileLayout {
                    batch: 1,
                    rows: 4,
                    cols: 300,
                    block_rows: 1,
                    block_cols: 64,
                },
                ScaleFloat::E8M0,
            ),
        ] {
            let q = pseudo_random_codes(layout.elements(), layout.cols as u32);
            let stored: Vec<u8> = match scale {
                ScaleFloat::F32 => (0..layout.scales())
                    .flat_map(|i| (0.01f32 + i as f32 * 0.37).to_le_bytes())
                    .collect(),
                ScaleFloat::BF16 => (0..layout.scales())
                    .flat_map(|i| (0x3c00u16 + 7 * i as u16).to_le_bytes())
                    .collect(),
                _ => (0..layout.scales()).map(|i| 110 + (i % 20) as u8).collect(),
            };
            let values: Vec<f32> = stored
                .chunks(scale.size())
                .map(|b| scale.value(b))
                .collect();
            for (target, narrow) in [
                (
                    TargetFloat::BF16,
                    Box::new(|y: f32| f32_to_bf16(y).to_le_bytes().to_vec())
                        as Box<dyn Fn(f32) -> Vec<u8>>,
                ),
                (
                    TargetFloat::F16,
                    Box::new(|y: f32| f32_to_f16(y).to_le_bytes().to_vec()),
                ),
                (
                    TargetFloat::F32,
                    Box::new(|y: f32| y.to_le_bytes().to_vec()),
                ),
            ] {
                if target == TargetFloat::F16 && scale == ScaleFloat::F32 {
                    // Scales up to ~25 times codes up to 448 exceed half's range: refused below.
                    continue;
                }
                let want = reference(&q, &values, layout, narrow);
                for threads in [1, 2, 5] {
                    // One byte of slack in front: also run on an output at an odd address.
                    let mut buffer = vec![0u8; want.len() + 1];
                    for offset in [0, 1] {
                        let out = &mut buffer[offset..offset + want.len()];
                        let input = Fp8Input {
                            tensor: "w",
                            fp8: Input::Memory(&q),
                            scales: Input::Memory(&stored),
                            scale,
                            layout,
                        };
                        dequantize_blocks(input, target, out, threads).unwrap();
                        assert_eq!(out, &want[..], "{layout:?} {target:?} {threads} {offset}");
                    }
                }
            }
        }
    }

    #[test]
    fn non_finite_results_are_refused_naming_where() {
        let layout = TileLayout {
            batch: 2,
            rows: 4,
            cols: 4,
            block_rows: 2,
            block_cols: 2,
        };
        let scales: Vec<u8> = (0..layout.scales())
            .flat_map(|_| 1f32.to_le_bytes())
            .collect();
        let run = |q: &[u8], scales: &[u8], target: TargetFloat| {
            let mut out = vec![0u8; layout.elements() * target.size()];
            let input = Fp8Input {
                tensor: "w",
                fp8: Input::Memory(q),
                scales: Input::Memory(scales),
                scale: ScaleFloat::F32,
                layout,
            };
            dequantize_blocks(input, target, &mut out, 3)
        };
        let mut q = vec![0x38u8; layout.elements()]; // 1.0 everywhere
        assert!(run(&q, &scales, TargetFloat::BF16).is_ok());
        q[16 + 9] = 0xff; // NaN in matrix 1, row 2
        let err = run(&q, &scales, TargetFloat::BF16).unwrap_err();
        assert_eq!(err.kind(), "invalid_quantize_input");
        assert_eq!(
            err.to_string(),
            "tensor 'w': dequantizes to NaN or Inf (matrix 1, rows 2..4): the weight holds an FP8 \
             NaN code, a scale is not finite, or a value exceeds the range of BF16"
        );
        q[16 + 9] = 0x7e; // 448
        let mut big = scales.clone();
        // Element 9 of matrix 1 (row 2, column 1) is in tile (1, 0) of that matrix: scale 4 + 2.
        big[4 * 6..4 * 7].copy_from_slice(&200f32.to_le_bytes());
        assert!(run(&q, &big, TargetFloat::BF16).is_ok());
        assert!(
            run(&q, &big, TargetFloat::F16).is_err(),
            "448 * 200 > 65504"
        );
        let mut infinite = scales.clone();
        infinite[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert!(
            run(&[0u8; 32], &infinite, TargetFloat::F32).is_err(),
            "0 * inf"
        );
    }

    #[test]
    fn mismatched_buffers_are_refused() {
        let layout = TileLayout {
            batch: 1,
            rows: 3,
            cols: 3,
            block_rows: 2,
            block_cols: 2,
        };
        let q = [0u8; 9];
        let scales = [0u8; 8]; // 4 bf16 scales
        let mut out = [0u8; 18];
        let input = |fp8, scales, layout| Fp8Input {
            tensor: "t",
            fp8: Input::Memory(fp8),
            scales: Input::Memory(scales),
            scale: ScaleFloat::BF16,
            layout,
        };
        assert!(
            dequantize_blocks(input(&q, &scales, layout), TargetFloat::BF16, &mut out, 1).is_ok()
        );
        let messages = [
            dequantize_blocks(
                input(&q[..8], &scales, layout),
                TargetFloat::BF16,
                &mut out,
                1,
            ),
            dequantize_blocks(
                input(&q, &scales[..6], layout),
                TargetFloat::BF16,
                &mut out,
                1,
            ),
            dequantize_blocks(input(&q, &scales, layout), TargetFloat::F32, &mut out, 1),
            dequantize_blocks(
                input(
                    &q,
                    &scales,
                    TileLayout {
                        block_rows: 0,
                        ..layout
                    },
                ),
                TargetFloat::BF16,
                &mut out,
                1,
            ),
        ]
        .map(|r| r.unwrap_err().to_string());
        assert_eq!(
            messages,
            [
                "tensor 't': fp8 input has 8 bytes, TileLayout { batch: 1, rows: 3, cols: 3, \
                 block_rows: 2, block_cols: 2 } needs 9",
                "tensor 't': scales have 6 bytes, 4 scales of BF16 need 8",
                "tensor 't': output has 18 bytes, 9 elements of F32 need 36",
                "tensor 't': block size must be positive",
            ]
        );
    }

    /// Two matrices of 150 rows: stripes of 128 and 22 rows.
    const TWO_MATRICES: TileLayout = TileLayout {
        batch: 2,
        rows: 150,
        cols: 200,
        block_rows: 128,
        block_cols: 128,
    };

    /// `dir/model.safetensors` holding FP8 `w` ([`TWO_MATRICES`]) and its F32 `w_scale_inv`, and
    /// their bytes.
    fn fp8_checkpoint(dir: &std::path::Path) -> (Checkpoint, Vec<u8>, Vec<u8>) {
        use safetensors::Dtype as Stored;
        let q = pseudo_random_codes(TWO_MATRICES.elements(), 5);
        let scales: Vec<u8> = (0..TWO_MATRICES.scales())
            .flat_map(|i| (0.01f32 + i as f32 * 0.37).to_le_bytes())
            .collect();
        let tensors: [(&str, Stored, &[usize], &[u8]); 2] = [
            ("w", Stored::F8_E4M3, &[2, 150, 200], &q),
            ("w_scale_inv", Stored::F32, &[2, 2, 2], &scales),
        ];
        let checkpoint = crate::checkpoint::testing::single_file_checkpoint(dir, &tensors);
        (checkpoint, q, scales)
    }

    fn f32_scaled<'a>(fp8: Input<'a>, scales: Input<'a>) -> Fp8Input<'a> {
        Fp8Input {
            tensor: "w",
            fp8,
            scales,
            scale: ScaleFloat::F32,
            layout: TWO_MATRICES,
        }
    }

    fn to_bf16(input: Fp8Input<'_>, threads: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; TWO_MATRICES.elements() * 2];
        dequantize_blocks(input, TargetFloat::BF16, &mut out, threads).map(|()| out)
    }

    /// Both tensors of [`fp8_checkpoint`], opened for reading.
    fn from_file(checkpoint: &Checkpoint) -> Fp8Input<'_> {
        let open = |name| {
            Input::File(
                checkpoint
                    .open_tensor(checkpoint.tensor(name).unwrap())
                    .unwrap(),
            )
        };
        f32_scaled(open("w"), open("w_scale_inv"))
    }

    #[test]
    fn checkpoint_tensors_dequantize_as_their_bytes_in_memory_do() {
        let dir = tempfile::tempdir().unwrap();
        let (checkpoint, q, scales) = fp8_checkpoint(dir.path());
        let expected = to_bf16(f32_scaled(Input::Memory(&q), Input::Memory(&scales)), 1).unwrap();
        let weight = checkpoint.tensor("w").unwrap();
        let scale = checkpoint.tensor("w_scale_inv").unwrap();
        let (layout, target) = (TWO_MATRICES, TargetFloat::BF16);
        let mut out = vec![0u8; layout.elements() * 2];
        for threads in [1, 2, 3] {
            dequantize_tensor(
                &checkpoint,
                weight,
                scale,
                layout,
                target,
                &mut out,
                threads,
            )
            .unwrap();
            assert_eq!(out, expected, "{threads}");
        }
        let refusals = [(scale, weight), (weight, weight)].map(|(w, s)| {
            dequantize_tensor(&checkpoint, w, s, layout, target, &mut out, 1)
                .unwrap_err()
                .to_string()
        });
        assert_eq!(
            refusals,
            [
                "tensor 'w_scale_inv': is F32; only F8_E4M3 weights are dequantized",
                "tensor 'w': its scale 'w' is F8_E4M3; scales are F32, BF16, F16 or F8_E8M0",
            ]
        );
    }

    #[test]
    fn checkpoint_tensors_that_shrink_or_are_rewritten_while_being_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::format::SINGLE_FILE);
        // Shrunk after the identity checks, in the middle of the weight: a stripe's read comes
        // up short.
        let (checkpoint, _, _) = fp8_checkpoint(dir.path());
        let input = from_file(&checkpoint);
        let weight = checkpoint.tensor("w").unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(weight.file_offset + 20_000).unwrap();
        let err = to_bf16(input, 2).unwrap_err();
        assert_eq!(err.kind(), "source_changed");
        assert!(err.to_string().contains("it shrank"), "{err}");

        // Rewritten in place (a scale): every read succeeds, but the bytes may mix two versions.
        let (checkpoint, _, _) = fp8_checkpoint(dir.path());
        let input = from_file(&checkpoint);
        let scale = checkpoint.tensor("w_scale_inv").unwrap();
        crate::checkpoint::testing::rewrite_in_place(&path, scale.file_offset + 3);
        let err = to_bf16(input, 2).unwrap_err();
        assert_eq!(err.kind(), "source_changed");
        assert!(err.to_string().contains("it was modified"), "{err}");
    }
}
