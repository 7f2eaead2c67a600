//! Everything in a checkpoint directory that is not a tensor shard or its index (configs,
//! tokenizer files, generation config, custom code, sub-folders) is copied through unchanged.

use std::fs::File;
use std::path::Path;

use crate::atomic_file::AtomicFile;
use crate::copy::{copy_range, FileAt, Progress};
use crate::error::{Error, Result};

/// Whether a directory entry is a tensor shard or a shard index (never copied as aux).
pub fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json")
}

/// Top-level aux entries of `dir`: not hidden, not weights. Sorted.
pub fn list_aux_files(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && !is_weight_file(&name) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Copies every aux entry of `source` into `output` (symlinks followed, hidden files skipped,
/// sub-folders recursively). Returns the top-level names copied.
pub fn copy_aux_files(source: &Path, output: &Path) -> Result<Vec<String>> {
    let names = list_aux_files(source)?;
    for name in &names {
        copy_entry(&source.join(name), &output.join(name))?;
    }
    Ok(names)
}

fn copy_entry(from: &Path, to: &Path) -> Result<()> {
    let meta = std::fs::metadata(from).map_err(|e| Error::io(from, e))?;
    if meta.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
        for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
            let entry = entry.map_err(|e| Error::io(from, e))?;
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with('.') {
                copy_entry(&entry.path(), &to.join(name))?;
            }
        }
        return Ok(());
    }
    copy_file(from, to, &|_| true)
}

/// Copies one whole file atomically, inside the kernel where possible.
pub fn copy_file(from: &Path, to: &Path, progress: Progress<'_>) -> Result<()> {
    let src = File::open(from).map_err(|e| Error::io(from, e))?;
    let len = src.metadata().map_err(|e| Error::io(from, e))?.len();
    let out = AtomicFile::create(to)?;
    copy_range(
        FileAt {
            file: &src,
            path: from,
        },
        0,
        FileAt {
            file: out.file(),
            path: out.dest(),
        },
        0,
        len,
        progress,
    )?;
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_configs_and_folders_but_not_weights_or_dotfiles() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let out = dir.path().join("out");
        std::fs::create_dir_all(src.join("sub/.cache")).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(src.join("config.json"), "{}").unwrap();
        std::fs::write(src.join("model.safetensors"), "x").unwrap();
        std::fs::write(src.join("model.safetensors.index.json"), "x").unwrap();
        std::fs::write(src.join(".hidden"), "x").unwrap();
        std::fs::write(src.join("sub/tok.model"), "tok").unwrap();
        std::fs::write(src.join("sub/.cache/x"), "x").unwrap();
        std::os::unix::fs::symlink(src.join("config.json"), src.join("link.json")).unwrap();
        let copied = copy_aux_files(&src, &out).unwrap();
        assert_eq!(copied, ["config.json", "link.json", "sub"]);
        assert_eq!(
            std::fs::read_to_string(out.join("sub/tok.model")).unwrap(),
            "tok"
        );
        assert!(!out.join("sub/.cache").exists());
        assert!(!std::fs::symlink_metadata(out.join("link.json"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(!out.join("model.safetensors").exists());
    }
}
