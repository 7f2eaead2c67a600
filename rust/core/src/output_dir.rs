//! Guarding the output directory: never the source, never nested with it; recognising (and
//! removing) the shards an earlier run left there.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

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

/// Whether `name` is a shard name this tool writes.
pub fn is_tool_shard_name(name: &str) -> bool {
    if name == "model.safetensors" {
        return true;
    }
    let Some(rest) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let bytes = rest.as_bytes();
    bytes.len() == 14
        && bytes[..5].iter().all(u8::is_ascii_digit)
        && &bytes[5..9] == b"-of-"
        && bytes[9..].iter().all(u8::is_ascii_digit)
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
    fn recognises_tool_shard_names() {
        assert!(is_tool_shard_name("model-00001-of-00002.safetensors"));
        assert!(is_tool_shard_name("model.safetensors"));
        assert!(!is_tool_shard_name("model-1-of-2.safetensors"));
        assert!(!is_tool_shard_name("weights.safetensors"));
    }
}
