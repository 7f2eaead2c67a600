//! Files that appear under their final name only once complete: written under a hidden
//! temporary name in the same directory, fsynced, then renamed. Dropping an uncommitted one
//! removes the temporary file, so a failed run leaves nothing half-written behind.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Marker in the names of temporary files, so leftovers of a killed run can be recognised.
pub const PARTIAL_MARKER: &str = ".partial-";

/// A file being written under a temporary name next to its destination.
pub struct AtomicFile {
    file: File,
    temp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl AtomicFile {
    /// Creates (or truncates) the temporary file for `dest`. Permissions follow the umask.
    pub fn create(dest: &Path) -> Result<AtomicFile> {
        let temp = temp_path_for(dest);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(|e| Error::io(dest, e))?;
        Ok(AtomicFile {
            file,
            temp,
            dest: dest.into(),
            committed: false,
        })
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
    pub fn commit(mut self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.dest, e))?;
        std::fs::rename(&self.temp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// The hidden temporary name used while `dest` is being written.
pub fn temp_path_for(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}{PARTIAL_MARKER}{}", std::process::id()))
}

/// Writes `bytes` to `dest` atomically.
pub fn write_atomically(dest: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let atomic = AtomicFile::create(dest)?;
    let mut file = atomic.file();
    file.write_all(bytes).map_err(|e| Error::io(dest, e))?;
    atomic.commit()
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
}
