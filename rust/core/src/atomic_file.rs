//! Files that appear under their final name only once complete: written under a hidden
//! temporary name in the same directory, fsynced, then renamed. Dropping an uncommitted one
//! removes the temporary file, so a failed run leaves nothing half-written behind.
//!
//! Nothing is ever written through a symlink: the temporary file is created new
//! (`O_CREAT | O_EXCL | O_NOFOLLOW`, never an existing path truncated), and the rename that gives
//! it its final name replaces whatever that name was, a symlink included, never the link's
//! target. Every step is relative to one open descriptor of the destination's directory, so a
//! directory swapped for a link mid-way cannot redirect it.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, CWD};
use rustix::io::Errno;

use crate::error::{Error, Result};

/// Kept at its first home for callers; it lives in [`crate::format`].
pub use crate::format::PARTIAL_MARKER;

/// Permissions of new files before the umask, as `open(2)` callers usually ask.
const DEFAULT_MODE: u32 = 0o666;

/// A file being written under a temporary name next to its destination.
pub struct AtomicFile {
    file: File,
    dir: OwnedFd,
    temp_name: OsString,
    name: OsString,
    dest: PathBuf,
    committed: bool,
}

impl AtomicFile {
    /// Creates the temporary file for `dest`; permissions follow the umask.
    pub fn create(dest: &Path) -> Result<AtomicFile> {
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = open_dir(CWD, parent).map_err(|e| Error::io(dest, e))?;
        AtomicFile::create_in(dir, dest, None)
    }

    /// Creates the temporary file for `dest` inside `dir`, an open descriptor of `dest`'s
    /// directory. With `mode`, the file gets exactly those permission bits (not the umask's).
    pub fn create_in(dir: OwnedFd, dest: &Path, mode: Option<u32>) -> Result<AtomicFile> {
        let name = dest
            .file_name()
            .ok_or_else(|| Error::io(dest, io::Error::from(io::ErrorKind::InvalidInput)))?
            .to_os_string();
        let temp_name = temp_name_for(&name);
        let fd = create_new(&dir, &temp_name).map_err(|e| Error::io(dest, e))?;
        let file = File::from(fd);
        let out = AtomicFile {
            file,
            dir,
            temp_name,
            name,
            dest: dest.into(),
            committed: false,
        };
        if let Some(mode) = mode {
            rustix::fs::fchmod(&out.file, Mode::from_raw_mode(mode & 0o777))
                .map_err(|e| Error::io(dest, e.into()))?;
        }
        Ok(out)
    }

    /// The open temporary file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The final path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Flushes the data to disk and gives the file its final name.
    pub fn commit(self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.dest, e))?;
        self.rename()
    }

    /// Gives the file its final name without flushing it first: after a crash the name may be
    /// missing or hold an empty file, never another file's bytes. For files whose loss only
    /// costs redoing what they record.
    pub fn commit_unsynced(self) -> Result<()> {
        self.rename()
    }

    fn rename(mut self) -> Result<()> {
        rustix::fs::renameat(&self.dir, &self.temp_name, &self.dir, &self.name)
            .map_err(|e| Error::io(&self.dest, e.into()))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = rustix::fs::unlinkat(&self.dir, &self.temp_name, AtFlags::empty());
        }
    }
}

/// Creates `name` in `dir` as a new file, never following or truncating what is there. A file
/// of that name can only be a leftover of a killed process that had this one's id: it is
/// unlinked (the name, never a link's target) and the creation tried once more.
fn create_new(dir: &OwnedFd, name: &OsString) -> io::Result<OwnedFd> {
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mode = Mode::from_raw_mode(DEFAULT_MODE);
    match rustix::fs::openat(dir, name, flags, mode) {
        Err(Errno::EXIST) => {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            Ok(rustix::fs::openat(dir, name, flags, mode)?)
        }
        other => Ok(other?),
    }
}

/// Opens the directory `path` (relative to `dir`) for `*at` calls. Symlinks are followed: use
/// [`open_dir_nofollow`] for directories inside an output.
pub fn open_dir(dir: impl AsFd, path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(dir, path, flags, Mode::empty())?)
}

/// Opens the directory `name` inside `dir`, refusing a symlink (`ELOOP`) or a non-directory.
pub fn open_dir_nofollow(dir: impl AsFd, name: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(dir, name, flags, Mode::empty())?)
}

fn temp_name_for(name: &OsString) -> OsString {
    let mut temp = OsString::from(".");
    temp.push(name);
    temp.push(format!("{PARTIAL_MARKER}{}", std::process::id()));
    temp
}

/// The hidden temporary name used while `dest` is being written.
pub fn temp_path_for(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(OsString::from).unwrap_or_default();
    dest.with_file_name(temp_name_for(&name))
}

/// Writes `bytes` to `dest` atomically.
pub fn write_atomically(dest: &Path, bytes: &[u8]) -> Result<()> {
    written_temporary(dest, bytes)?.commit()
}

/// Writes `bytes` to `dest` as [`write_atomically`] does, but without an fsync (see
/// [`AtomicFile::commit_unsynced`]).
pub fn write_atomically_unsynced(dest: &Path, bytes: &[u8]) -> Result<()> {
    written_temporary(dest, bytes)?.commit_unsynced()
}

fn written_temporary(dest: &Path, bytes: &[u8]) -> Result<AtomicFile> {
    use std::io::Write;
    let atomic = AtomicFile::create(dest)?;
    let mut file = atomic.file();
    file.write_all(bytes).map_err(|e| Error::io(dest, e))?;
    Ok(atomic)
}

/// Makes renames inside `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn nothing_appears_until_commit_and_drop_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        let f = AtomicFile::create(&dest).unwrap();
        assert!(!dest.exists());
        let temp = temp_path_for(&dest);
        assert!(temp.exists());
        drop(f);
        assert!(!temp.exists());
        write_atomically(&dest, b"abc").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"abc");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn links_at_the_temporary_or_final_name_are_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let dest = out.join("config.json");
        std::os::unix::fs::symlink(&outside, &dest).unwrap();
        std::os::unix::fs::symlink(&outside, temp_path_for(&dest)).unwrap();

        write_atomically(&dest, b"new").unwrap();

        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&dest)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);

        // The same without the fsync.
        std::fs::remove_file(&dest).unwrap();
        std::os::unix::fs::symlink(&outside, &dest).unwrap();
        std::os::unix::fs::symlink(&outside, temp_path_for(&dest)).unwrap();
        write_atomically_unsynced(&dest, b"newer").unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        assert_eq!(std::fs::read(&dest).unwrap(), b"newer");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    }

    #[test]
    fn an_explicit_mode_is_kept_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("secret");
        let handle = open_dir(CWD, dir.path()).unwrap();
        AtomicFile::create_in(handle, &dest, Some(0o600))
            .unwrap()
            .commit()
            .unwrap();
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
