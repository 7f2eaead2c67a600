//! Moving byte ranges between files inside the kernel.
//!
//! `copy_file_range` at explicit offsets, looping on short copies; when the kernel or the file
//! systems cannot do it (cross-device, unsupported, or a 0-byte return), the rest of the range
//! goes through one bounded buffer with positional reads and writes. A source that ends early
//! (it shrank after it was opened: `copy_file_range` returns 0, then the read hits the end) is a
//! `source_changed` error naming it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::regular_file::read_exact_at;

/// Bytes moved per system call, each followed by a request to start writing them back: small
/// enough that the disk writes one chunk while the next is copied (with 64 MiB chunks, a 64 MiB
/// shard's whole flush waited for its fsync: a 0.25 GiB merge's writing took 0.15 s, 0.12 s
/// with 8 MiB, 0.115 s with 4 MiB, the time `sync` alone takes), large enough that the calls
/// cost nothing. Also the granularity of progress reports.
const COPY_CHUNK: u64 = 4 << 20;

/// Size of the buffer used when the kernel cannot copy.
const FALLBACK_BUFFER: u64 = 8 << 20;

/// Receives the number of bytes just copied; returns `false` to stop the copy.
pub type Progress<'a> = &'a (dyn Fn(u64) -> bool + Sync);

/// A file with the path to name in errors.
#[derive(Clone, Copy)]
pub struct FileAt<'a> {
    pub file: &'a File,
    pub path: &'a Path,
}

/// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset`.
pub fn copy_range(
    src: FileAt<'_>,
    mut src_offset: u64,
    dst: FileAt<'_>,
    mut dst_offset: u64,
    len: u64,
    progress: Progress<'_>,
) -> Result<()> {
    let mut remaining = len;
    let mut in_kernel = true;
    let mut buffer: Vec<u8> = Vec::new();
    while remaining > 0 {
        let chunk = remaining.min(COPY_CHUNK);
        let copied = if in_kernel {
            match kernel_copy(src.file, src_offset, dst.file, dst_offset, chunk) {
                Ok(0) => {
                    in_kernel = false;
                    continue;
                }
                Ok(n) => n,
                Err(e) if kernel_cannot_copy(e) => {
                    in_kernel = false;
                    continue;
                }
                Err(e) => return Err(Error::io(dst.path, e.into())),
            }
        } else {
            if buffer.is_empty() {
                buffer = vec![0u8; remaining.min(FALLBACK_BUFFER) as usize];
            }
            buffered_copy(src, src_offset, dst, dst_offset, chunk, &mut buffer)?
        };
        start_writeback(dst.file, dst_offset, copied);
        src_offset += copied;
        dst_offset += copied;
        remaining -= copied;
        if !progress(copied) {
            return Err(Error::Cancelled);
        }
    }
    Ok(())
}

fn kernel_copy(
    src: &File,
    src_offset: u64,
    dst: &File,
    dst_offset: u64,
    len: u64,
) -> rustix::io::Result<u64> {
    let (mut off_in, mut off_out) = (src_offset, dst_offset);
    loop {
        match rustix::fs::copy_file_range(
            src,
            Some(&mut off_in),
            dst,
            Some(&mut off_out),
            len as usize,
        ) {
            Err(Errno::INTR) => continue,
            other => return other.map(|n| n as u64),
        }
    }
}

fn kernel_cannot_copy(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::XDEV | Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL | Errno::PERM
    )
}

fn buffered_copy(
    src: FileAt<'_>,
    src_offset: u64,
    dst: FileAt<'_>,
    dst_offset: u64,
    len: u64,
    buffer: &mut [u8],
) -> Result<u64> {
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(buffer.len() as u64) as usize;
        let piece = &mut buffer[..want];
        read_exact_at(src.file, src.path, src_offset + done, piece)?;
        dst.file
            .write_all_at(piece, dst_offset + done)
            .map_err(|e| Error::io(dst.path, e))?;
        done += want as u64;
    }
    Ok(done)
}

/// Asks the kernel to start writing `len` bytes at `offset` of `file` to disk now, without
/// waiting. Shards are large: left to the end, all their dirty pages would be flushed by one
/// long fsync after the work; started early, the flush overlaps the copying and quantizing.
/// Purely an optimization, so a file system that cannot do it is simply not asked.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor and plain integer arguments; the call only schedules I/O.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Reserves `len` bytes for `file` so that a full disk shows up before any data is written.
/// File systems that cannot preallocate are left to fail (or not) on write.
pub fn preallocate(file: FileAt<'_>, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file.file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => Ok(()),
        Err(e) => Err(Error::io(file.path, io::Error::from(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A source file holding `data` and an empty destination, in a directory of their own.
    struct Files {
        _dir: tempfile::TempDir,
        src: File,
        src_path: PathBuf,
        dst: File,
        dst_path: PathBuf,
    }

    impl Files {
        fn new(data: &[u8]) -> Files {
            let dir = tempfile::tempdir().unwrap();
            let (src_path, dst_path) = (dir.path().join("src"), dir.path().join("dst"));
            std::fs::write(&src_path, data).unwrap();
            Files {
                src: File::open(&src_path).unwrap(),
                dst: File::create(&dst_path).unwrap(),
                _dir: dir,
                src_path,
                dst_path,
            }
        }

        fn src(&self) -> FileAt<'_> {
            FileAt {
                file: &self.src,
                path: &self.src_path,
            }
        }

        fn dst(&self) -> FileAt<'_> {
            FileAt {
                file: &self.dst,
                path: &self.dst_path,
            }
        }

        fn written(&self) -> Vec<u8> {
            std::fs::read(&self.dst_path).unwrap()
        }
    }

    #[test]
    fn copies_unaligned_ranges_and_reports_progress() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let files = Files::new(&data);
        files.dst.write_all_at(b"HEAD", 0).unwrap();
        let seen = AtomicU64::new(0);
        copy_range(files.src(), 1234, files.dst(), 4, 200_001, &|n| {
            seen.fetch_add(n, Ordering::Relaxed);
            true
        })
        .unwrap();
        let out = files.written();
        assert_eq!(&out[..4], b"HEAD");
        assert_eq!(&out[4..], &data[1234..1234 + 200_001]);
        assert_eq!(seen.load(Ordering::Relaxed), 200_001);
    }

    #[test]
    fn buffered_path_matches_and_short_sources_fail() {
        let files = Files::new(b"0123456789");
        let mut buffer = vec![0u8; 3];
        assert_eq!(
            buffered_copy(files.src(), 2, files.dst(), 0, 7, &mut buffer).unwrap(),
            7
        );
        assert_eq!(files.written(), b"2345678");
        let err = copy_range(files.src(), 5, files.dst(), 0, 20, &|_| true).unwrap_err();
        assert_eq!(err.kind(), "source_changed");
        assert_eq!(err.file(), Some(files.src_path.as_path()));
    }

    #[test]
    fn a_false_progress_cancels() {
        let files = Files::new(&[1u8; 100]);
        let err = copy_range(files.src(), 0, files.dst(), 0, 100, &|_| false).unwrap_err();
        assert_eq!(err.kind(), "cancelled");
    }
}
