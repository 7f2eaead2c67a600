//! Source files that must be regular files, opened without ever blocking, read whole or compared,
//! and the identity that tells whether one changed since it was first seen.
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

    /// Checks that `link`, the metadata of a new hard link to `source`, is still this version.
    /// Linking changes the inode's ctime, so that alone is not a change.
    pub fn verify_link(&self, source: &Path, link: &Metadata) -> Result<()> {
        let now = FileIdentity {
            ctime_ns: self.ctime_ns,
            ..FileIdentity::of(link)
        };
        self.compare(source, &now)
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

/// Reads all of `path`, (a symlink to) a regular file of at most `max_bytes` bytes, as
/// [`open_regular`] opens it (a FIFO or device is refused, never read); the file must not change
/// while it is read. For the small files read whole: `config.json`, an index.
pub fn read_regular_file(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let (file, identity) = open_regular(path)?;
    if identity.size > max_bytes {
        return Err(Error::FileTooLarge {
            file: path.into(),
            size: identity.size,
            limit: max_bytes,
        });
    }
    let mut bytes = vec![0u8; identity.size as usize];
    read_exact_at(&file, path, 0, &mut bytes)?;
    identity.verify(path, &file)?;
    Ok(bytes)
}

/// Pieces [`files_equal`] compares at a time: memory stays bounded whatever the files' size.
const COMPARE_PIECE: usize = 1 << 20;

/// Whether `first` and `second`, both (symlinks to) regular files opened as [`open_regular`]
/// opens them, hold the same bytes. Files of different sizes are not read; others are compared
/// piece by piece and must not change while they are.
pub fn files_equal(first: &Path, second: &Path) -> Result<bool> {
    let (first_file, first_identity) = open_regular(first)?;
    let (second_file, second_identity) = open_regular(second)?;
    if first_identity.size != second_identity.size {
        return Ok(false);
    }
    let piece = COMPARE_PIECE.min(first_identity.size as usize);
    let (mut first_piece, mut second_piece) = (vec![0u8; piece], vec![0u8; piece]);
    let mut offset = 0u64;
    while offset < first_identity.size {
        let len = piece.min((first_identity.size - offset) as usize);
        read_exact_at(&first_file, first, offset, &mut first_piece[..len])?;
        read_exact_at(&second_file, second, offset, &mut second_piece[..len])?;
        if first_piece[..len] != second_piece[..len] {
            return Ok(false);
        }
        offset += len as u64;
    }
    first_identity.verify(first, &first_file)?;
    second_identity.verify(second, &second_file)?;
    Ok(true)
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

/// Tells the kernel that bytes `offset..offset + len` of `file` will be read soon, so that it
/// starts reading them from disk in the background (`POSIX_FADV_WILLNEED`). Only a hint: cached
/// bytes cost next to nothing, and a refusal changes nothing but speed, so it is not reported.
pub fn advise_will_need(file: &File, offset: u64, len: u64) {
    if let Some(len) = std::num::NonZeroU64::new(len) {
        let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::WillNeed);
    }
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
    fn small_files_are_read_whole_within_their_limit() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(&config, b"{\"a\": 1}").unwrap();
        assert_eq!(read_regular_file(&config, 8).unwrap(), b"{\"a\": 1}");
        std::fs::write(&config, b"").unwrap();
        assert_eq!(read_regular_file(&config, 0).unwrap(), b"");

        std::fs::write(&config, [b' '; 9]).unwrap();
        let err = read_regular_file(&config, 8).unwrap_err();
        assert_eq!(err.kind(), "file_too_large");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: is 9 bytes, over the 8-byte limit for this file; is it the right file?",
                config.display()
            )
        );

        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).unwrap();
        for path in [fifo.as_path(), dir.path(), Path::new("/dev/zero")] {
            let err = read_regular_file(path, 1 << 20).unwrap_err();
            assert_eq!(err.kind(), "not_a_regular_file", "{path:?}");
        }
        let missing = read_regular_file(&dir.path().join("missing"), 8).unwrap_err();
        assert_eq!(missing.kind(), "io");
    }

    #[test]
    fn files_compare_by_their_bytes_and_only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let big: Vec<u8> = (0..COMPARE_PIECE * 2 + 7)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut late_change = big.clone();
        *late_change.last_mut().unwrap() ^= 1;
        std::fs::write(path("a"), &big).unwrap();
        std::fs::write(path("same"), &big).unwrap();
        std::fs::write(path("late"), &late_change).unwrap();
        std::fs::write(path("short"), &big[..10]).unwrap();
        std::fs::write(path("empty"), b"").unwrap();
        std::fs::write(path("empty2"), b"").unwrap();
        std::os::unix::fs::symlink("a", path("link")).unwrap();
        assert!(files_equal(&path("a"), &path("same")).unwrap());
        assert!(files_equal(&path("a"), &path("link")).unwrap());
        assert!(files_equal(&path("a"), &path("a")).unwrap());
        assert!(files_equal(&path("empty"), &path("empty2")).unwrap());
        assert!(!files_equal(&path("a"), &path("late")).unwrap());
        assert!(!files_equal(&path("a"), &path("short")).unwrap());

        let fifo = path("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).unwrap();
        for (first, second) in [(&fifo, &path("a")), (&path("a"), &fifo)] {
            let err = files_equal(first, second).unwrap_err();
            assert_eq!(err.kind(), "not_a_regular_file");
            assert_eq!(err.file(), Some(fifo.as_path()));
        }
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
