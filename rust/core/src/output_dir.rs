//! Guarding the output directory: never the source, never nested with it, never silently
//! mixed with an earlier run's files.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::{is_temporary_name, INDEX_FILE};

/// Kept at its first home for callers; it lives in [`crate::format`].
pub use crate::format::is_tool_shard_name;

/// Refuses an output that is a source, lies inside one, or contains one.
pub fn check_separate(sources: &[&Path], output: &Path) -> Result<()> {
    let out = resolve(output).map_err(|e| Error::io(output, e))?;
    for source in sources {
        let src = resolve(source).map_err(|e| Error::io(*source, e))?;
        if out == src {
            return Err(Error::OutputIsSource {
                output: output.into(),
            });
        }
        if out.starts_with(&src) {
            return Err(Error::OutputInsideSource {
                output: output.into(),
                source_dir: source.to_path_buf(),
            });
        }
        if src.starts_with(&out) {
            return Err(Error::SourceInsideOutput {
                output: output.into(),
                source_dir: source.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Creates the output directory, or checks an existing one is empty. With `overwrite`, an
/// existing directory is accepted: its index is removed first (so it never points at shards
/// being replaced) and temporary files left by a killed run are cleared.
pub fn prepare_output_dir(output: &Path, overwrite: bool) -> Result<()> {
    if output.exists() && !output.is_dir() {
        return Err(Error::NotADirectory {
            path: output.into(),
        });
    }
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    let mut entries = std::fs::read_dir(output).map_err(|e| Error::io(output, e))?;
    if entries.next().is_none() {
        return Ok(());
    }
    if !overwrite {
        return Err(Error::OutputNotEmpty {
            output: output.into(),
        });
    }
    let index = output.join(INDEX_FILE);
    if std::fs::symlink_metadata(&index).is_ok() {
        std::fs::remove_file(&index).map_err(|e| Error::io(&index, e))?;
    }
    for entry in std::fs::read_dir(output).map_err(|e| Error::io(output, e))? {
        let entry = entry.map_err(|e| Error::io(output, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_temporary_name(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Removes shard files of this tool's naming that the new index does not reference (left by an
/// earlier run into the same directory). Returns their names.
pub fn remove_stale_shards(output: &Path, keep: &HashSet<&str>) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(output).map_err(|e| Error::io(output, e))? {
        let entry = entry.map_err(|e| Error::io(output, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_tool_shard_name(&name) && !keep.contains(name.as_str()) {
            std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

/// An absolute path with symlinks resolved as far as the path exists.
fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    let mut existing = absolute.as_path();
    let mut rest: Vec<Component<'_>> = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(mut resolved) => {
                for component in rest.iter().rev() {
                    match component {
                        Component::ParentDir => {
                            resolved.pop();
                        }
                        Component::CurDir => {}
                        other => resolved.push(other),
                    }
                }
                return Ok(resolved);
            }
            Err(_) => {
                let Some(parent) = existing.parent() else {
                    return Ok(absolute);
                };
                if let Some(last) = existing.components().next_back() {
                    rest.push(last);
                }
                existing = parent;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_same_and_nested_directories() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let kind = |out: &Path| check_separate(&[&src], out).map_err(|e| e.kind());
        assert_eq!(kind(&src), Err("output_is_source"));
        assert_eq!(kind(&src.join("./")), Err("output_is_source"));
        assert_eq!(kind(&src.join("new/deeper")), Err("output_inside_source"));
        assert_eq!(kind(dir.path()), Err("source_inside_output"));
        assert_eq!(kind(&dir.path().join("out")), Ok(()));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&src, &link).unwrap();
        assert_eq!(kind(&link), Err("output_is_source"));
        assert_eq!(kind(&link.join("x/../y")), Err("output_inside_source"));
    }

    #[test]
    fn non_empty_output_needs_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        prepare_output_dir(&out, false).unwrap();
        std::fs::write(out.join("note.txt"), "x").unwrap();
        std::fs::write(out.join(INDEX_FILE), "{}").unwrap();
        assert_eq!(
            prepare_output_dir(&out, false).unwrap_err().kind(),
            "output_not_empty"
        );
        prepare_output_dir(&out, true).unwrap();
        assert!(!out.join(INDEX_FILE).exists());
        assert!(out.join("note.txt").exists());
    }
}
