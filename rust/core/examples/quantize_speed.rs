//! Times the CPU FP8 kernel on a 4096×4096 bf16 matrix:
//! `cargo run --release --example quantize_speed [threads]`.

use std::time::Instant;

use normalize_core::fp8::{quantize_blocks, BlockInput, BlockOutput, ScaleFormat, SourceFloat};
use normalize_core::stripes::{Input, TileLayout};

fn main() {
    let threads = std::env::args()
        .nth(1)
        .map_or(1, |t| t.parse().expect("a thread count"));
    let layout = TileLayout::square(1, 4096, 4096, 128);
    let input: Vec<u8> = (0..layout.elements())
        .flat_map(|i| {
            let x = ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0;
            ((x.to_bits() >> 16) as u16).to_le_bytes()
        })
        .collect();
    let mut fp8 = vec![0u8; layout.elements()];
    let mut scales = vec![0u8; layout.scales() * 4];
    let format = ScaleFormat {
        ue8m0: false,
        bf16: false,
    };
    for _ in 0..40 {
        let started = Instant::now();
        let input = BlockInput {
            tensor: "w",
            bytes: Input::Memory(&input),
            source: SourceFloat::BF16,
            layout,
        };
        quantize_blocks(
            input,
            format,
            BlockOutput {
                fp8: &mut fp8,
                scales: &mut scales,
            },
            threads,
        )
        .unwrap();
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{:.1} ms, {:.2} GB/s of bf16 input",
            seconds * 1e3,
            layout.elements() as f64 * 2.0 / seconds / 1e9
        );
    }
}
