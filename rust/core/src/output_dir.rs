//! Guarding the output directory: never the source, never nested with it; recognising (and
//! removing) the shards an earlier run left there.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::is_temporary_name;

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

/// Removes this tool's temporary files (`.<name>.partial-<pid>`) anywhere below `output`, left by
/// killed runs, without following symlinks. Returns their paths relative to `output`, sorted.
pub fn remove_temporaries(output: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut pending = vec![output.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let kind = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
            let path = entry.path();
            if kind.is_dir() {
                pending.push(path);
            } else if is_temporary_name(&entry.file_name().to_string_lossy()) {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                let relative = path.strip_prefix(output).unwrap_or(&path);
                removed.push(relative.to_string_lossy().into_owned());
            }
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
    fn removes_temporaries_at_any_depth_but_not_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(out.join("assets/deeper")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        for path in [
            out.join(".model-00001-of-00002.safetensors.partial-12"),
            out.join("assets/deeper/.vocab.txt.partial-7"),
            outside.join(".x.partial-1"),
            out.join("notes.partial-1"),
        ] {
            std::fs::write(path, "x").unwrap();
        }
        std::os::unix::fs::symlink(&outside, out.join("linked")).unwrap();
        let removed = remove_temporaries(&out).unwrap();
        assert_eq!(
            removed,
            [
                ".model-00001-of-00002.safetensors.partial-12",
                "assets/deeper/.vocab.txt.partial-7"
            ]
        );
        assert!(outside.join(".x.partial-1").exists());
        assert!(out.join("notes.partial-1").exists());
    }
}
