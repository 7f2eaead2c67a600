//! Source files that must be regular files, opened without ever blocking, and the identity that
//! tells whether one changed since it was first seen.
//!
//! A FIFO, a device, a socket or a directory named like a shard (or an aux file) is an error that
//! says what it is; it is never opened in a way that could block (a FIFO without a writer) or read
//! forever (`/dev/zero`). A symlink to a regular file is fine: HF cache snapshots are symlinks.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// What identifies one version of a file: where it lives, its size and its change times. A
/// rewrite in place (even of the same size), a truncation or a replacement changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileIdentity {
    /// The identity `meta` (from `stat` or `fstat`) describes.
    pub fn of(meta: &Metadata) -> FileIdentity {
        let ns = |secs: i64, nanos: i64| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Checks that the open `file` and the file `path` names now are both still this version.
    pub fn verify(&self, path: &Path, file: &File) -> Result<()> {
        // The name first: replacing a file also changes the old one's ctime, and "replaced"
        // says more than "modified".
        match std::fs::metadata(path) {
            Ok(named) => self.compare(path, &FileIdentity::of(&named))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(changed(path, "it was removed or renamed".to_string()))
            }
            Err(e) => return Err(Error::io(path, e)),
        }
        let open = file.metadata().map_err(|e| Error::io(path, e))?;
        self.compare(path, &FileIdentity::of(&open))
    }

    fn compare(&self, path: &Path, now: &FileIdentity) -> Result<()> {
        let detail = if (now.dev, now.ino) != (self.dev, self.ino) {
            "it was replaced by another file".to_string()
        } else if now.size != self.size {
            format!("it was {} bytes, now {}", self.size, now.size)
        } else if (now.mtime_ns, now.ctime_ns) != (self.mtime_ns, self.ctime_ns) {
            "it was modified".to_string()
        } else {
            return Ok(());
        };
        Err(changed(path, detail))
    }
}

fn changed(path: &Path, detail: String) -> Error {
    Error::SourceChanged {
        file: path.into(),
        detail,
    }
}

/// Opens `path` for reading, requiring (a symlink to) a regular file. The type is checked before
/// opening and again on the open descriptor, and the open never blocks.
pub fn open_regular(path: &Path) -> Result<(File, FileIdentity)> {
    let named = regular_metadata(path)?;
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let opened = file.metadata().map_err(|e| Error::io(path, e))?;
    if !opened.file_type().is_file() {
        return Err(Error::NotARegularFile {
            file: path.into(),
            what: describe(&opened),
        });
    }
    let identity = FileIdentity::of(&opened);
    if (identity.dev, identity.ino) != (named.dev(), named.ino()) {
        return Err(changed(path, "it was replaced while being opened".into()));
    }
    Ok((file, identity))
}

/// `stat` of `path` (symlinks followed), required to be a regular file; a path that is
/// something else, or a symlink that leads nowhere, is an error saying what it is.
pub fn regular_metadata(path: &Path) -> Result<Metadata> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_file() => Ok(meta),
        Ok(meta) => Err(Error::NotARegularFile {
            file: path.into(),
            what: describe(&meta),
        }),
        Err(e) => match std::fs::symlink_metadata(path) {
            Ok(link) if link.file_type().is_symlink() => Err(Error::NotARegularFile {
                file: path.into(),
                what: if e.raw_os_error() == Some(libc::ELOOP) {
                    "a symlink loop"
                } else {
                    "a dangling symlink"
                },
            }),
            _ => Err(Error::io(path, e)),
        },
    }
}

/// What kind of file `meta` describes, as a phrase for error messages ("a FIFO").
pub fn describe(meta: &Metadata) -> &'static str {
    let kind = meta.file_type();
    if kind.is_file() {
        "a regular file"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symlink"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "an unknown kind of file"
    }
}

/// Fills `buf` from `file` at `offset`. Reaching the end of the file first means the file shrank
/// after it was opened (every range read was checked against its size then).
pub fn read_exact_at(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            shrank(path, offset + buf.len() as u64)
        } else {
            Error::io(path, e)
        }
    })
}

/// Reads smaller than twice this go through one thread; larger ones are split into pieces of
/// at least this size read at the same time (one core copies from the page cache at a fraction
/// of the memory bandwidth, and the quantizer that waits for the bytes uses every core).
const PARALLEL_READ_PIECE: usize = 16 << 20;

/// [`read_exact_at`], with large ranges read by several threads at once.
pub fn read_exact_at_parallel(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(buf.len() / PARALLEL_READ_PIECE);
    if threads <= 1 {
        return read_exact_at(file, path, offset, buf);
    }
    let piece = buf.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let readers: Vec<_> = buf
            .chunks_mut(piece)
            .enumerate()
            .map(|(i, chunk)| {
                scope.spawn(move || read_exact_at(file, path, offset + (i * piece) as u64, chunk))
            })
            .collect();
        readers
            .into_iter()
            .try_for_each(|r| r.join().expect("a reader thread panicked"))
    })
}

/// The error for a source that ends before byte `needed`.
pub fn shrank(path: &Path, needed: u64) -> Error {
    changed(
        path,
        format!("it shrank: it ends before byte {needed}, which it held when opened"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_and_symlinks_to_them_open() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("f", &link).unwrap();
        let (_, identity) = open_regular(&link).unwrap();
        assert_eq!(identity.size, 3);

        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).unwrap();
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink("nowhere", &dangling).unwrap();
        let looped = dir.path().join("loop");
        std::os::unix::fs::symlink("loop", &looped).unwrap();
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        for (path, what) in [
            (fifo, "a FIFO"),
            (dir.path().to_path_buf(), "a directory"),
            (dangling, "a dangling symlink"),
            (looped, "a symlink loop"),
            (zero, "a character device"),
        ] {
            let err = open_regular(&path).unwrap_err();
            assert_eq!(err.kind(), "not_a_regular_file", "{path:?}");
            assert_eq!(
                err.to_string(),
                format!(
                    "{}: is {what}, not a regular file; only regular files (or symlinks to them) are read",
                    path.display()
                )
            );
        }
        let missing = open_regular(&dir.path().join("missing")).unwrap_err();
        assert_eq!(missing.kind(), "io");
    }

    #[test]
    fn identity_notices_rewrites_truncation_and_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let (file, identity) = open_regular(&path).unwrap();
        identity.verify(&path, &file).unwrap();

        // Same size, new bytes, an mtime set back: the ctime still moves.
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let writer = File::options().write(true).open(&path).unwrap();
        writer.write_all_at(b"X", 3).unwrap();
        writer.set_modified(before).unwrap();
        let err = identity.verify(&path, &file).unwrap_err();
        assert_eq!(err.kind(), "source_changed");
        assert!(err.to_string().contains("it was modified"), "{err}");

        let (file, identity) = open_regular(&path).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4)
            .unwrap();
        let err = identity.verify(&path, &file).unwrap_err();
        assert!(err.to_string().contains("it was 10 bytes, now 4"), "{err}");
        let mut buf = [0u8; 6];
        let err = read_exact_at(&file, &path, 2, &mut buf).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: changed while being read (it shrank: it ends before byte 8, which it held when opened); rerun once nothing writes to it",
                path.display()
            )
        );

        let (file, identity) = open_regular(&path).unwrap();
        std::fs::write(dir.path().join("g"), b"0123").unwrap();
        std::fs::rename(dir.path().join("g"), &path).unwrap();
        let err = identity.verify(&path, &file).unwrap_err();
        assert!(
            err.to_string().contains("replaced by another file"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
        let err = identity.verify(&path, &file).unwrap_err();
        assert!(err.to_string().contains("removed or renamed"), "{err}");
    }
}
