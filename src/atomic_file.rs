//! New files that appear whole or not at all. The bytes are written under
//! a temporary name beside the target (the same directory, so the same
//! file system), synced, moved into place, and the directory synced: a
//! crash leaves either nothing under the name or the whole file, and at
//! most a stray temporary named after the process that died.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::asif::engine::{lock_file, LockMode};
use crate::error::{Error, Result};

/// The tag of the temporaries new images are written to.
pub(crate) const NEW_TAG: &str = "asiffs-new-";

/// The temporary beside `path` that [`write_new`] uses with `tag`:
/// `.{name}.{tag}{pid}`.
pub(crate) fn temp_path(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}{}", std::process::id()))
}

/// How the finished temporary takes the target's name.
pub(crate) enum Place {
    /// `rename`: replaces whatever has the name by then.
    Rename,
    /// `link` then `unlink`: fails if the name appeared meanwhile, so a
    /// file the caller did not vet is never clobbered.
    Link,
}

/// Why [`write_new`] failed: the step, in the words error messages use,
/// and its error.
pub(crate) struct Failed {
    pub step: &'static str,
    pub error: io::Error,
}

/// Writes a new file at `path` through the temporary named with `tag`:
/// `fill` writes it, then it is synced, placed and its directory synced.
/// The temporary is removed when a step after its creation fails.
pub(crate) fn write_new(
    path: &Path,
    tag: &str,
    place: Place,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> std::result::Result<(), Failed> {
    let at = |step| move |error| Failed { step, error };
    let tmp = temp_path(path, tag);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(at("creating a temporary file"))?;
    let done = fill(&mut file)
        .map_err(at("writing"))
        .and_then(|()| file.sync_all().map_err(at("syncing")))
        .and_then(|()| {
            match place {
                Place::Rename => std::fs::rename(&tmp, path),
                Place::Link => {
                    std::fs::hard_link(&tmp, path).and_then(|()| std::fs::remove_file(&tmp))
                }
            }
            .map_err(at("renaming into place"))
        });
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return done;
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(at("syncing the directory"))
}

/// Refuses `path` when it exists, unless `force` is set and it is a
/// regular file that no one holds open (an image in use is never
/// replaced).
pub(crate) fn check_replaceable(path: &Path, force: bool) -> Result<()> {
    let ctx = |e| Error::io(path.display().to_string(), e);
    match std::fs::symlink_metadata(path) {
        Ok(_) if !force => Err(Error::Invalid(format!(
            "{}: file exists (use --force to replace it)",
            path.display()
        ))),
        Ok(m) if !m.is_file() => Err(Error::Invalid(format!(
            "{}: not a regular file",
            path.display()
        ))),
        Ok(_) => {
            let f = File::open(path).map_err(ctx)?;
            lock_file(&f, LockMode::Exclusive, path)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ctx(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_new_file_appears_whole_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.img");
        for place in [Place::Link, Place::Rename] {
            let _ = std::fs::remove_file(&p);
            assert!(write_new(&p, "t-", place, |f| f.write_all(b"whole")).is_ok());
            assert_eq!(std::fs::read(&p).unwrap(), b"whole");
            assert_eq!(names(d.path()), ["a.img"]);
        }
    }

    #[test]
    fn link_never_clobbers_and_rename_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.img");
        std::fs::write(&p, b"precious").unwrap();
        let e = write_new(&p, "t-", Place::Link, |f| f.write_all(b"new")).unwrap_err();
        assert_eq!(
            (e.step, e.error.kind()),
            ("renaming into place", io::ErrorKind::AlreadyExists)
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        assert_eq!(names(d.path()), ["a.img"]);
        assert!(write_new(&p, "t-", Place::Rename, |f| f.write_all(b"new")).is_ok());
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn a_failed_fill_removes_the_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.img");
        let e = write_new(&p, "t-", Place::Rename, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(
            (e.step, e.error.to_string()),
            ("writing", "disk full".into())
        );
        assert_eq!(names(d.path()), Vec::<String>::new());
    }

    #[test]
    fn a_stray_temporary_is_not_ours_to_remove() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.img");
        let tmp = temp_path(&p, "t-");
        assert_eq!(
            tmp.file_name().unwrap().to_string_lossy(),
            format!(".a.img.t-{}", std::process::id())
        );
        std::fs::write(&tmp, b"other").unwrap();
        let e = write_new(&p, "t-", Place::Rename, |_| Ok(())).unwrap_err();
        assert_eq!(
            (e.step, e.error.kind()),
            ("creating a temporary file", io::ErrorKind::AlreadyExists)
        );
        assert_eq!(std::fs::read(&tmp).unwrap(), b"other");
        assert!(!p.exists());
    }

    #[test]
    fn replacing_needs_force_and_a_regular_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.img");
        assert!(check_replaceable(&p, false).is_ok());
        std::fs::write(&p, b"x").unwrap();
        assert_eq!(
            check_replaceable(&p, false).unwrap_err().to_string(),
            format!("{}: file exists (use --force to replace it)", p.display())
        );
        assert!(check_replaceable(&p, true).is_ok());
        assert_eq!(
            check_replaceable(d.path(), true).unwrap_err().to_string(),
            format!("{}: not a regular file", d.path().display())
        );
    }
}
