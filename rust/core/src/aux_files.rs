//! Everything in a checkpoint directory that is not a tensor shard or its index (configs,
//! tokenizer files, generation config, custom code, sub-folders) is copied through unchanged.
//!
//! The whole tree is planned before any byte is written, so a FIFO, socket or device among the
//! entries is an error that leaves the output untouched. Symlinks are never followed out of the
//! source: one that resolves inside it is copied as a symlink (with a relative target); one into
//! the `blobs/` of the HF cache repository holding a `snapshots/<rev>` source has its file copied
//! (a link would dangle in the output); any other (outside, dangling, a loop) is skipped and
//! reported. Copies keep the source file's permission bits. In the output, nothing is written
//! through a symlink: a link where a directory is needed is replaced by the directory.

use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, CWD};
use rustix::io::Errno;

use crate::atomic_file::{open_dir, open_dir_nofollow, AtomicFile};
use crate::copy::{copy_range, FileAt, Progress};
use crate::error::{Error, Result};
use crate::regular_file::{describe, open_regular};

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

/// An aux entry that was not copied, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEntry {
    /// Path relative to the source directory.
    pub path: String,
    pub reason: String,
}

/// What [`copy_aux_files`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuxCopy {
    /// Top-level names copied (files, folders, symlinks), sorted.
    pub copied: Vec<String>,
    /// Entries left out (symlinks leading outside the source, dangling or looping), in order.
    pub skipped: Vec<SkippedEntry>,
}

/// One entry to reproduce in the output, at `path` relative to the output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AuxItem {
    Dir { path: PathBuf, mode: u32 },
    File { path: PathBuf, from: PathBuf },
    Symlink { path: PathBuf, target: PathBuf },
}

/// The planned copy: entries in creation order (a folder before its contents).
struct AuxPlan {
    items: Vec<AuxItem>,
    copied: Vec<String>,
    skipped: Vec<SkippedEntry>,
}

/// Copies every aux entry of `source` into `output` (hidden files skipped, sub-folders
/// recursively, symlinks as the module documentation says).
pub fn copy_aux_files(source: &Path, output: &Path) -> Result<AuxCopy> {
    let plan = plan_aux_copy(source)?;
    let out_dir = open_dir(CWD, output).map_err(|e| Error::io(output, e))?;
    let mut dirs: Vec<(PathBuf, OwnedFd)> = Vec::new();
    for item in &plan.items {
        let path = match item {
            AuxItem::Dir { path, .. }
            | AuxItem::File { path, .. }
            | AuxItem::Symlink { path, .. } => path,
        };
        let parent_rel = path.parent().unwrap_or(Path::new(""));
        let parent = dirs
            .iter()
            .rev()
            .find(|(rel, _)| rel == parent_rel)
            .map_or(out_dir.as_fd(), |(_, fd)| fd.as_fd());
        let dest = output.join(path);
        let name = path.file_name().expect("planned paths end in a name");
        match item {
            AuxItem::Dir { mode, .. } => {
                let fd = real_dir(parent, name, *mode).map_err(|e| Error::io(&dest, e))?;
                dirs.push((path.clone(), fd));
            }
            AuxItem::File { from, .. } => {
                let owned = parent
                    .try_clone_to_owned()
                    .map_err(|e| Error::io(&dest, e))?;
                copy_file_into(from, owned, &dest, &|_| true)?;
            }
            AuxItem::Symlink { target, .. } => {
                replace_with_symlink(parent, name, target).map_err(|e| Error::io(&dest, e))?;
            }
        }
    }
    Ok(AuxCopy {
        copied: plan.copied,
        skipped: plan.skipped,
    })
}

/// Copies one whole regular file atomically, inside the kernel where possible, keeping its
/// permission bits.
pub fn copy_file(from: &Path, to: &Path, progress: Progress<'_>) -> Result<()> {
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = open_dir(CWD, parent).map_err(|e| Error::io(to, e))?;
    copy_file_into(from, dir, to, progress)
}

fn copy_file_into(from: &Path, dir: OwnedFd, to: &Path, progress: Progress<'_>) -> Result<()> {
    let (src, identity) = open_regular(from)?;
    let mode = src.metadata().map_err(|e| Error::io(from, e))?.mode();
    let out = AtomicFile::create_in(dir, to, Some(mode))?;
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
        identity.size,
        progress,
    )?;
    identity.verify(from, &src)?;
    out.commit()
}

fn plan_aux_copy(source: &Path) -> Result<AuxPlan> {
    let root = source.canonicalize().map_err(|e| Error::io(source, e))?;
    let walk = Walk {
        blobs: hf_cache_blobs(&root),
        root,
        shown: source.into(),
    };
    let mut plan = AuxPlan {
        items: Vec::new(),
        copied: Vec::new(),
        skipped: Vec::new(),
    };
    for name in list_aux_files(&walk.root)? {
        let before = plan.items.len();
        walk.visit(Path::new(&name), &mut plan)?;
        if plan.items.len() > before {
            plan.copied.push(name);
        }
    }
    Ok(plan)
}

/// The source tree being planned: `root` canonical (for telling inside from outside), `shown`
/// as the caller named it (for messages), `blobs` the HF cache's blob folder when the source is
/// a snapshot.
struct Walk {
    root: PathBuf,
    shown: PathBuf,
    blobs: Option<PathBuf>,
}

impl Walk {
    fn visit(&self, rel: &Path, plan: &mut AuxPlan) -> Result<()> {
        let path = self.root.join(rel);
        let shown = self.shown.join(rel);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&shown, e))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            plan.items.push(AuxItem::Dir {
                path: rel.into(),
                mode: meta.permissions().mode(),
            });
            let mut names: Vec<_> = std::fs::read_dir(&path)
                .map_err(|e| Error::io(&shown, e))?
                .map(|entry| entry.map(|e| e.file_name()))
                .collect::<std::io::Result<_>>()
                .map_err(|e| Error::io(&shown, e))?;
            names.sort();
            for name in names
                .iter()
                .filter(|n| !n.to_string_lossy().starts_with('.'))
            {
                self.visit(&rel.join(name), plan)?;
            }
        } else if kind.is_file() {
            plan.items.push(AuxItem::File {
                path: rel.into(),
                from: shown,
            });
        } else if kind.is_symlink() {
            self.visit_symlink(rel, &path, plan)?;
        } else {
            return Err(not_regular(&shown, &meta));
        }
        Ok(())
    }

    fn visit_symlink(&self, rel: &Path, path: &Path, plan: &mut AuxPlan) -> Result<()> {
        let skip = |plan: &mut AuxPlan, reason: String| {
            plan.skipped.push(SkippedEntry {
                path: rel.to_string_lossy().into_owned(),
                reason,
            })
        };
        let resolved = match path.canonicalize() {
            Ok(resolved) => resolved,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                skip(plan, "symlink loop".into());
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                skip(plan, "dangling symlink".into());
                return Ok(());
            }
            Err(e) => return Err(Error::io(self.shown.join(rel), e)),
        };
        if resolved.starts_with(&self.root) {
            // `rel`'s folders were walked without following links, so this is canonical.
            let link_dir = self.root.join(rel.parent().unwrap_or(Path::new("")));
            plan.items.push(AuxItem::Symlink {
                path: rel.into(),
                target: relative_path(&resolved, &link_dir),
            });
        } else if self.blobs.as_ref().is_some_and(|b| resolved.starts_with(b)) {
            let meta = std::fs::metadata(&resolved).map_err(|e| Error::io(&resolved, e))?;
            if !meta.file_type().is_file() {
                return Err(not_regular(&resolved, &meta));
            }
            plan.items.push(AuxItem::File {
                path: rel.into(),
                from: resolved,
            });
        } else {
            skip(
                plan,
                format!(
                    "symlink to {}, outside the source directory",
                    resolved.display()
                ),
            );
        }
        Ok(())
    }
}

fn not_regular(path: &Path, meta: &Metadata) -> Error {
    Error::NotARegularFile {
        file: path.into(),
        what: describe(meta),
    }
}

/// `<repo>/blobs` when `root` is `<repo>/snapshots/<rev>` of the HF cache and the folder exists.
fn hf_cache_blobs(root: &Path) -> Option<PathBuf> {
    let snapshots = root.parent()?;
    if snapshots.file_name() != Some(OsStr::new("snapshots")) {
        return None;
    }
    snapshots.parent()?.join("blobs").canonicalize().ok()
}

/// `target` relative to the directory `base` (both canonical).
fn relative_path(target: &Path, base: &Path) -> PathBuf {
    let target: Vec<Component<'_>> = target.components().collect();
    let base: Vec<Component<'_>> = base.components().collect();
    let common = target.iter().zip(&base).take_while(|(a, b)| a == b).count();
    let mut relative = PathBuf::new();
    for _ in common..base.len() {
        relative.push("..");
    }
    for component in &target[common..] {
        relative.push(component);
    }
    if relative.as_os_str().is_empty() {
        relative.push(".");
    }
    relative
}

/// The real directory `name` inside `parent`, created when missing. A symlink of that name is
/// replaced (the link, never its target); anything else that is not a directory is an error.
fn real_dir(parent: impl AsFd + Copy, name: &OsStr, source_mode: u32) -> std::io::Result<OwnedFd> {
    // The source's bits, plus the owner's, so the copy can be filled; the umask applies.
    let mode = Mode::from_raw_mode((source_mode | 0o700) & 0o777);
    match rustix::fs::mkdirat(parent, name, mode) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    match open_dir_nofollow(parent, Path::new(name)) {
        Err(e)
            if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            let existing = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
            if rustix::fs::FileType::from_raw_mode(existing.st_mode)
                != rustix::fs::FileType::Symlink
            {
                return Err(e);
            }
            rustix::fs::unlinkat(parent, name, AtFlags::empty())?;
            rustix::fs::mkdirat(parent, name, mode)?;
            open_dir_nofollow(parent, Path::new(name))
        }
        other => other,
    }
}

/// Makes `name` inside `parent` a symlink to `target`, atomically replacing what was there (a
/// file or a link; never following it).
fn replace_with_symlink(
    parent: impl AsFd + Copy,
    name: &OsStr,
    target: &Path,
) -> std::io::Result<()> {
    let temp = crate::atomic_file::temp_path_for(Path::new(name));
    match rustix::fs::symlinkat(target, parent, &temp) {
        Err(Errno::EXIST) => {
            rustix::fs::unlinkat(parent, &temp, AtFlags::empty())?;
            rustix::fs::symlinkat(target, parent, &temp)?;
        }
        other => other?,
    }
    rustix::fs::renameat(parent, &temp, parent, name).inspect_err(|_| {
        let _ = rustix::fs::unlinkat(parent, &temp, AtFlags::empty());
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn is_link(path: &Path) -> bool {
        std::fs::symlink_metadata(path)
            .unwrap()
            .file_type()
            .is_symlink()
    }

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
        symlink(src.join("config.json"), src.join("link.json")).unwrap();
        symlink("../config.json", src.join("sub/up.json")).unwrap();
        let copied = copy_aux_files(&src, &out).unwrap();
        assert_eq!(copied.copied, ["config.json", "link.json", "sub"]);
        assert!(copied.skipped.is_empty());
        assert_eq!(
            std::fs::read_to_string(out.join("sub/tok.model")).unwrap(),
            "tok"
        );
        assert!(!out.join("sub/.cache").exists());
        assert!(!out.join("model.safetensors").exists());
        // Links inside the source stay links, made relative so they resolve inside the output.
        assert!(is_link(&out.join("link.json")));
        assert_eq!(
            std::fs::read_link(out.join("link.json")).unwrap(),
            Path::new("config.json")
        );
        assert_eq!(
            std::fs::read_link(out.join("sub/up.json")).unwrap(),
            Path::new("../config.json")
        );
    }

    #[test]
    fn links_out_of_the_source_are_skipped_and_modes_kept() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let out = dir.path().join("out");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        std::fs::write(src.join("private.txt"), "p").unwrap();
        std::fs::set_permissions(src.join("private.txt"), PermissionsExt::from_mode(0o600))
            .unwrap();
        symlink(&secret, src.join("shadow")).unwrap();
        symlink(dir.path(), src.join("assets")).unwrap();
        symlink("nowhere", src.join("dangling")).unwrap();
        symlink("loop", src.join("loop")).unwrap();

        let copied = copy_aux_files(&src, &out).unwrap();

        assert_eq!(copied.copied, ["private.txt"]);
        let reasons: Vec<(&str, &str)> = copied
            .skipped
            .iter()
            .map(|s| (s.path.as_str(), s.reason.as_str()))
            .collect();
        let outside = |p: &Path| {
            format!(
                "symlink to {}, outside the source directory",
                p.canonicalize().unwrap().display()
            )
        };
        assert_eq!(
            reasons,
            [
                ("assets", outside(dir.path()).as_str()),
                ("dangling", "dangling symlink"),
                ("loop", "symlink loop"),
                ("shadow", outside(&secret).as_str()),
            ]
        );
        let names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["private.txt"]);
        let mode = std::fs::metadata(out.join("private.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn hf_cache_snapshot_links_into_blobs_are_copied_as_files() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("models--org--name");
        let snapshot = repo.join("snapshots/abc123");
        std::fs::create_dir_all(snapshot.join("nested")).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::write(repo.join("blobs/1111"), "{\"a\": 1}").unwrap();
        symlink("../../blobs/1111", snapshot.join("config.json")).unwrap();
        symlink("../../../blobs/1111", snapshot.join("nested/config.json")).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();

        let copied = copy_aux_files(&snapshot, &out).unwrap();

        assert_eq!(copied.copied, ["config.json", "nested"]);
        for path in [out.join("config.json"), out.join("nested/config.json")] {
            assert!(!is_link(&path));
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\": 1}");
        }
    }

    #[test]
    fn special_files_fail_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("z")).unwrap();
        std::fs::write(src.join("a.json"), "{}").unwrap();
        let fifo = src.join("z/tokenizer.json");
        rustix::fs::mkfifoat(CWD, &fifo, Mode::RUSR | Mode::WUSR).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();

        let err = copy_aux_files(&src, &out).unwrap_err();

        assert_eq!(err.kind(), "not_a_regular_file");
        assert_eq!(err.file(), Some(fifo.as_path()));
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }

    #[test]
    fn output_links_are_replaced_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("assets")).unwrap();
        std::fs::write(src.join("assets/vocab.txt"), "v").unwrap();
        std::fs::write(src.join("config.json"), "{}").unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("keep"), "k").unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        symlink(&elsewhere, out.join("assets")).unwrap();
        symlink(elsewhere.join("keep"), out.join("config.json")).unwrap();

        copy_aux_files(&src, &out).unwrap();

        let names: Vec<_> = std::fs::read_dir(&elsewhere)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["keep"]);
        assert_eq!(
            std::fs::read_to_string(elsewhere.join("keep")).unwrap(),
            "k"
        );
        assert!(!is_link(&out.join("assets")));
        assert!(!is_link(&out.join("config.json")));
        assert_eq!(
            std::fs::read_to_string(out.join("assets/vocab.txt")).unwrap(),
            "v"
        );
    }

    #[test]
    fn relative_paths_climb_to_the_common_folder() {
        assert_eq!(
            relative_path(Path::new("/a/b/c"), Path::new("/a/d")),
            Path::new("../b/c")
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/b")),
            Path::new(".")
        );
        assert_eq!(
            relative_path(Path::new("/a/b/c"), Path::new("/a")),
            Path::new("b/c")
        );
    }
}
