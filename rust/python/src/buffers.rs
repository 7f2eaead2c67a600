//! Python buffers handed to the kernels: checked while the GIL is held, then seen as byte
//! slices once it is released.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// The memory of a checked, C-contiguous Python buffer, as an address (so it can cross into
/// `py.detach`) and a length.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    address: usize,
    len: usize,
}

impl Region {
    /// `buffer`'s memory, which must be C-contiguous (`what` names it in errors).
    pub fn input(buffer: &PyBuffer<u8>, what: &str) -> PyResult<Region> {
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "{what} buffer must be C-contiguous"
            )));
        }
        Ok(Region {
            address: buffer.buf_ptr() as usize,
            len: buffer.len_bytes(),
        })
    }

    /// `buffer`'s memory, which must be writable and C-contiguous.
    pub fn output(buffer: &PyBuffer<u8>, what: &str) -> PyResult<Region> {
        if buffer.readonly() {
            return Err(PyValueError::new_err(format!("{what} buffer is read-only")));
        }
        Region::input(buffer, what)
    }

    fn overlaps(self, other: Region) -> bool {
        self.len > 0
            && other.len > 0
            && self.address < other.address + other.len
            && other.address < self.address + self.len
    }

    /// The region's bytes.
    ///
    /// # Safety
    /// The `PyBuffer` it came from must be alive (it keeps the exporter's memory in place) for
    /// as long as the slice is used, and nothing may write to the memory meanwhile.
    pub unsafe fn bytes<'a>(self) -> &'a [u8] {
        // SAFETY: the caller keeps the buffer alive; it was checked to be `len` contiguous bytes.
        unsafe { std::slice::from_raw_parts(self.address as *const u8, self.len) }
    }

    /// The region's bytes, to write.
    ///
    /// # Safety
    /// As [`Region::bytes`], and the region must come from [`Region::output`] and be apart from
    /// every other region in use (see [`outputs_apart`]).
    pub unsafe fn bytes_mut<'a>(self) -> &'a mut [u8] {
        // SAFETY: as above; the buffer is writable and no other slice sees this memory.
        unsafe { std::slice::from_raw_parts_mut(self.address as *mut u8, self.len) }
    }
}

/// The regions of `outputs` (buffer and name), each writable and C-contiguous, apart from each
/// other and from every one of `inputs` (inputs may share memory: they are only read).
pub fn outputs_apart<const N: usize>(
    outputs: [(&PyBuffer<u8>, &str); N],
    inputs: &[Region],
) -> PyResult<[Region; N]> {
    let mut regions = [Region { address: 0, len: 0 }; N];
    for (region, (buffer, what)) in regions.iter_mut().zip(outputs) {
        *region = Region::output(buffer, what)?;
    }
    for (i, output) in regions.iter().enumerate() {
        if inputs
            .iter()
            .chain(&regions[i + 1..])
            .any(|other| output.overlaps(*other))
        {
            return Err(PyValueError::new_err("input and output buffers overlap"));
        }
    }
    Ok(regions)
}
