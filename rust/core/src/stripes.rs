//! What the two block-FP8 kernels share ([`crate::fp8`] quantizes, [`crate::dequantize`]
//! dequantizes): how a tensor is tiled, the stripes they work in, where a stripe's input bytes
//! come from, and the threads that share the stripes out.
//!
//! A stripe is `block_rows` rows of one matrix (fewer at a matrix's end): the rows one row of
//! tiles covers, which one row of scales describes. Stripes are independent. Worker threads take
//! them in order, one at a time, so the input is read front to back whatever the thread count,
//! and a thread slowed down (its core busy elsewhere) holds no other one up.
//!
//! Input comes from memory (a caller's buffer, used where it is) or straight from a checkpoint's
//! file: each stripe read with a checked `pread` into a small per-thread buffer that stays in
//! cache. There is no mapping (a file truncated meanwhile is an error, never a SIGBUS) and no copy
//! of the whole tensor.

use std::sync::Mutex;

use crate::checkpoint::OpenTensor;
use crate::error::{Error, Result};

/// Shape of one kernel call: `batch` independent `rows × cols` matrices (experts, or the halves of
/// a fused projection), each tiled in `block_rows × block_cols` tiles (edge tiles cover what is
/// left) with one scale per tile, scales laid out `[batch, tile_rows, tile_cols]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileLayout {
    pub batch: usize,
    pub rows: usize,
    pub cols: usize,
    pub block_rows: usize,
    pub block_cols: usize,
}

impl TileLayout {
    /// Square `block × block` tiles, as quantization uses.
    pub fn square(batch: usize, rows: usize, cols: usize, block: usize) -> TileLayout {
        TileLayout {
            batch,
            rows,
            cols,
            block_rows: block,
            block_cols: block,
        }
    }

    /// Tile rows per matrix: `ceil(rows / block_rows)`.
    pub fn tile_rows(&self) -> usize {
        self.rows.div_ceil(self.block_rows)
    }

    /// Tile columns per matrix: `ceil(cols / block_cols)`.
    pub fn tile_cols(&self) -> usize {
        self.cols.div_ceil(self.block_cols)
    }

    /// Elements of the tensor (also the bytes of its FP8 form).
    pub fn elements(&self) -> usize {
        self.batch * self.rows * self.cols
    }

    /// Number of scales.
    pub fn scales(&self) -> usize {
        self.batch * self.tile_rows() * self.tile_cols()
    }

    /// Number of stripes: one per row of tiles of every matrix.
    pub fn stripes(&self) -> usize {
        self.batch * self.tile_rows()
    }

    /// Rows in stripe `stripe`: `block_rows`, fewer in a matrix's last stripe.
    pub fn stripe_rows(&self, stripe: usize) -> usize {
        (self.rows - self.first_row_in_matrix(stripe)).min(self.block_rows)
    }

    /// The stripe's first row, counting the rows of every matrix before it (its first element is
    /// this times `cols`).
    pub fn stripe_start_row(&self, stripe: usize) -> usize {
        stripe / self.tile_rows() * self.rows + self.first_row_in_matrix(stripe)
    }

    /// Where stripe `stripe` is, for messages: `matrix 1, rows 128..256`.
    pub fn describe_stripe(&self, stripe: usize) -> String {
        let row = self.first_row_in_matrix(stripe);
        format!(
            "matrix {}, rows {row}..{}",
            stripe / self.tile_rows(),
            row + self.stripe_rows(stripe)
        )
    }

    /// Refuses a block size of zero (`tensor` names the tensor in the error).
    pub fn check_blocks(&self, tensor: &str) -> Result<()> {
        if self.block_rows == 0 || self.block_cols == 0 {
            return Err(invalid_input(tensor, "block size must be positive".into()));
        }
        Ok(())
    }

    fn first_row_in_matrix(&self, stripe: usize) -> usize {
        stripe % self.tile_rows() * self.block_rows
    }
}

/// The error for an input a kernel refuses: `detail` says why, `tensor` names it.
pub fn invalid_input(tensor: &str, detail: String) -> Error {
    Error::InvalidQuantizeInput {
        tensor: tensor.into(),
        detail,
    }
}

/// An element as the plain integer of its bits (the little-endian bytes as they lie in memory):
/// the kernels' loops read and write elements this way, so they vectorize. The methods here are
/// for elements at addresses not aligned for the integer (a caller's buffer).
pub trait RawBits: Copy + Default {
    /// The element whose bytes are `bytes` (exactly its size).
    fn read_unaligned(bytes: &[u8]) -> Self;
    /// Stores the element into `out` (exactly its size).
    fn write_unaligned(self, out: &mut [u8]);
}

impl RawBits for u16 {
    fn read_unaligned(bytes: &[u8]) -> u16 {
        u16::from_ne_bytes([bytes[0], bytes[1]])
    }
    fn write_unaligned(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_ne_bytes());
    }
}

impl RawBits for u32 {
    fn read_unaligned(bytes: &[u8]) -> u32 {
        u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
    fn write_unaligned(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_ne_bytes());
    }
}

/// Where a kernel's input bytes are.
#[derive(Debug)]
pub enum Input<'a> {
    /// In memory (a caller's buffer): stripes are used where they are.
    Memory(&'a [u8]),
    /// A checkpoint's tensor in its file: stripes are read as they are needed.
    File(OpenTensor<'a>),
}

impl Input<'_> {
    /// Bytes in all.
    pub fn len(&self) -> u64 {
        match self {
            Input::Memory(bytes) => bytes.len() as u64,
            Input::File(tensor) => tensor.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes `start..start + len`: where they are in memory, or read from the file into `buffer`.
    pub fn bytes<'b>(
        &'b self,
        start: usize,
        len: usize,
        buffer: &'b mut StripeBuffer,
    ) -> Result<&'b [u8]> {
        match self {
            Input::Memory(bytes) => Ok(&bytes[start..start + len]),
            Input::File(tensor) => {
                let bytes = buffer.get(len);
                tensor.read_at(start as u64, bytes)?;
                Ok(bytes)
            }
        }
    }

    /// Checks, once every stripe is read, that a file is still the version first read from.
    pub fn finish(&self) -> Result<()> {
        match self {
            Input::Memory(_) => Ok(()),
            Input::File(tensor) => tensor.verify(),
        }
    }
}

/// Alignment of a [`StripeBuffer`]'s bytes: enough for every element type the kernels read.
const STRIPE_ALIGN: usize = 8;

/// A worker's buffer for the stripe it reads from a file, reused from stripe to stripe (so it
/// stays in cache) and aligned, so elements are read in place.
#[derive(Debug, Default)]
pub struct StripeBuffer(Vec<u8>);

impl StripeBuffer {
    /// `len` bytes of it, grown when needed.
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.0.len() < len + STRIPE_ALIGN {
            self.0.resize(len + STRIPE_ALIGN, 0);
        }
        // An offset that cannot be computed would only leave the bytes unaligned, which the
        // kernels handle (more slowly).
        let start = self.0.as_ptr().align_offset(STRIPE_ALIGN).min(STRIPE_ALIGN);
        &mut self.0[start..start + len]
    }
}

/// One output of a striped kernel: its bytes, of which each stripe owns `per_row` for each of its
/// rows plus `per_stripe`, in stripe order.
#[derive(Debug)]
pub struct Output<'a> {
    pub bytes: &'a mut [u8],
    pub per_row: usize,
    pub per_stripe: usize,
}

/// Calls a worker for every stripe of `layout` with the stripe's part of each output, on up to
/// `threads` threads (the calling one included), each of which makes its own worker with
/// `new_worker` (for buffers of its own). The outputs must have exactly the bytes the stripes
/// own. The first error makes the other threads stop after their current stripe and is returned.
pub fn for_each_stripe<'o, const N: usize, W>(
    layout: TileLayout,
    threads: usize,
    outputs: [Output<'o>; N],
    new_worker: impl Fn() -> W + Sync,
) -> Result<()>
where
    W: FnMut(usize, [&'o mut [u8]; N]) -> Result<()>,
{
    let queue = Mutex::new(StripeQueue {
        layout,
        next: 0,
        outputs,
        failure: None,
    });
    let work = || {
        let mut worker = new_worker();
        loop {
            // A statement of its own: the lock is released before the stripe is worked on.
            let next = queue.lock().unwrap().take();
            let Some((stripe, parts)) = next else {
                return;
            };
            if let Err(e) = worker(stripe, parts) {
                queue.lock().unwrap().failure.get_or_insert(e);
                return;
            }
        }
    };
    let threads = threads.clamp(1, layout.stripes().max(1));
    std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(work);
        }
        work();
    });
    match queue.into_inner().unwrap().failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The stripes not yet taken, with the outputs they own.
struct StripeQueue<'a, const N: usize> {
    layout: TileLayout,
    next: usize,
    outputs: [Output<'a>; N],
    failure: Option<crate::Error>,
}

impl<'a, const N: usize> StripeQueue<'a, N> {
    /// The next stripe and its part of each output; none once all are taken or one failed.
    fn take(&mut self) -> Option<(usize, [&'a mut [u8]; N])> {
        if self.failure.is_some() || self.next == self.layout.stripes() {
            return None;
        }
        let stripe = self.next;
        self.next += 1;
        let rows = self.layout.stripe_rows(stripe);
        let parts = std::array::from_fn(|i| {
            let output = &mut self.outputs[i];
            let owned = rows * output.per_row + output.per_stripe;
            let (part, rest) = std::mem::take(&mut output.bytes).split_at_mut(owned);
            output.bytes = rest;
            part
        });
        Some((stripe, parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> TileLayout {
        TileLayout {
            batch: 2,
            rows: 5,
            cols: 3,
            block_rows: 2,
            block_cols: 2,
        }
    }

    #[test]
    fn stripes_cover_every_row_of_every_matrix_once() {
        let layout = layout();
        assert_eq!(layout.stripes(), 6);
        let rows: Vec<(usize, usize)> = (0..6)
            .map(|s| (layout.stripe_start_row(s), layout.stripe_rows(s)))
            .collect();
        assert_eq!(rows, [(0, 2), (2, 2), (4, 1), (5, 2), (7, 2), (9, 1)]);
        assert_eq!(layout.describe_stripe(5), "matrix 1, rows 4..5");
    }

    #[test]
    fn every_stripe_gets_its_own_part_of_each_output_on_any_thread_count() {
        let layout = layout();
        for threads in [1, 2, 4, 9] {
            let mut per_row = vec![0u8; layout.batch * layout.rows * 2];
            let mut per_stripe = vec![0u8; layout.stripes() * 3];
            let outputs = [
                Output {
                    bytes: &mut per_row,
                    per_row: 2,
                    per_stripe: 0,
                },
                Output {
                    bytes: &mut per_stripe,
                    per_row: 0,
                    per_stripe: 3,
                },
            ];
            for_each_stripe(layout, threads, outputs, || {
                |stripe, [rows, scales]: [&mut [u8]; 2]| {
                    assert_eq!(rows.len(), layout.stripe_rows(stripe) * 2);
                    rows.fill(stripe as u8 + 1);
                    scales.fill(stripe as u8 + 1);
                    Ok(())
                }
            })
            .unwrap();
            assert_eq!(
                per_row,
                [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6]
            );
            assert_eq!(
                per_stripe,
                [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6]
            );
        }
    }

    #[test]
    fn the_first_failure_stops_the_work_and_is_returned() {
        let layout = layout();
        let mut out = vec![0u8; layout.stripes()];
        let outputs = [Output {
            bytes: &mut out,
            per_row: 0,
            per_stripe: 1,
        }];
        let err = for_each_stripe(layout, 1, outputs, || {
            |stripe, [byte]: [&mut [u8]; 1]| {
                if stripe == 2 {
                    return Err(Error::Cancelled);
                }
                byte[0] = 1;
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(err.kind(), "cancelled");
        assert_eq!(out, [1, 1, 0, 0, 0, 0], "nothing after the failing stripe");
    }

    #[test]
    fn stripe_buffers_are_aligned_and_reused() {
        let mut buffer = StripeBuffer::default();
        for len in [3, 100, 17] {
            let bytes = buffer.get(len);
            assert_eq!(bytes.len(), len);
            assert_eq!(bytes.as_ptr() as usize % STRIPE_ALIGN, 0);
        }
        assert_eq!(buffer.0.len(), 100 + STRIPE_ALIGN);
    }
}
