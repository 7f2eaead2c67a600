//! `sha256_hex`: the digest the run record names headers and run identities by.

use normalize_core::digest;
use pyo3::prelude::*;

/// SHA-256 of `data`, as 64 lowercase hex digits (what `hashlib.sha256(data).hexdigest()` gives).
#[pyfunction]
pub fn sha256_hex(py: Python<'_>, data: &[u8]) -> String {
    py.detach(|| digest::sha256_hex(data))
}
