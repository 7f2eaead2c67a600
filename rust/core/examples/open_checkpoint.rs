//! Times opening a checkpoint (index + every header): `cargo run --release --example open_checkpoint DIR`.

use std::time::Instant;

fn main() {
    let dir = std::env::args().nth(1).expect("usage: open_checkpoint DIR");
    for _ in 0..3 {
        let started = Instant::now();
        let checkpoint = normalize_core::Checkpoint::open(dir.as_ref()).expect("checkpoint opens");
        println!(
            "{} tensors in {} files: {:.3} s",
            checkpoint.tensors.len(),
            checkpoint.files.len(),
            started.elapsed().as_secs_f64()
        );
    }
}
