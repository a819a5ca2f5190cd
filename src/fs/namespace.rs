//! The names the mount shows: one flat file `NAME.img` per `SOURCE/NAME.asif`.
//!
//! Images are opened when first seen and stay open (and locked) until they
//! vanish from SOURCE and no handle is left. Inode numbers are never reused
//! within one mount, so a stale kernel reference can only miss, never alias.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tracing::{debug, info, warn};

use crate::{CreateOptions, Error, Image, LockMode, OpenOptions};

pub(crate) const ROOT_INO: u64 = 1;
pub(crate) const IMAGE_EXT: &str = "asif";
pub(crate) const SHOWN_EXT: &str = "img";

pub(crate) struct Node {
    pub ino: u64,
    /// Shown name and container path; both change on rename.
    loc: Mutex<(OsString, PathBuf)>,
    pub image: Arc<Image>,
    /// Identity of the container when it was opened, to notice replacement.
    dev_ino: (u64, u64),
    /// Open file handles.
    pub open: AtomicU32,
    /// No longer reachable by name (deleted or replaced in SOURCE).
    pub detached: AtomicBool,
    /// Serialises size changes so that "grow if smaller" cannot race into a shrink.
    pub resize_lock: Mutex<()>,
}

impl Node {
    pub fn name(&self) -> OsString {
        self.loc.lock().0.clone()
    }
    pub fn path(&self) -> PathBuf {
        self.loc.lock().1.clone()
    }
}

pub(crate) enum Source {
    /// A directory of `NAME.asif`.
    Dir(PathBuf),
    /// One image; `root_is_file` when the mountpoint itself is the image.
    File { path: PathBuf, root_is_file: bool },
}

pub(crate) struct Namespace {
    pub source: Source,
    pub writable: bool,
    cache_groups: usize,
    cache: crate::CacheMode,
    inner: RwLock<Inner>,
    /// One scan / create / unlink / rename at a time: opening an image twice
    /// from this process would trip over our own exclusive lock.
    scan_lock: Mutex<()>,
}

#[derive(Default)]
struct Inner {
    by_ino: HashMap<u64, Arc<Node>>,
    by_name: HashMap<OsString, u64>,
    next_ino: u64,
    /// Containers that failed to open, by fingerprint, so each failure is logged once.
    failed: HashMap<PathBuf, (Fingerprint, bool)>,
}

type Fingerprint = (u64, u64, i64, i64, u64);

fn fingerprint(md: &std::fs::Metadata) -> Fingerprint {
    (md.dev(), md.ino(), md.mtime(), md.mtime_nsec(), md.len())
}

/// `NAME.img` -> `NAME`, for names the mount can show.
pub(crate) fn stem_of_shown(name: &OsStr) -> Option<&OsStr> {
    let b = name.as_bytes();
    let suffix = b".img";
    if b.len() > suffix.len() && b.ends_with(suffix) && !b.contains(&b'/') {
        Some(OsStr::from_bytes(&b[..b.len() - suffix.len()]))
    } else {
        None
    }
}

fn stem_of_container(name: &OsStr) -> Option<&OsStr> {
    let b = name.as_bytes();
    let suffix = b".asif";
    if b.len() > suffix.len() && b.ends_with(suffix) {
        Some(OsStr::from_bytes(&b[..b.len() - suffix.len()]))
    } else {
        None
    }
}

/// Logs why an image is served read-only in a writable mount (a large
/// image's scan, still running, logs it itself when it finishes).
fn note_refusal(path: &Path, image: &Image) {
    if let Some(why) = image.refusal_now() {
        warn!("{}: serving read-only: {why}", path.display());
    }
}

fn with_ext(stem: &OsStr, ext: &str) -> OsString {
    let mut s = stem.to_os_string();
    s.push(".");
    s.push(ext);
    s
}

impl Namespace {
    pub fn new(
        source: Source,
        writable: bool,
        cache_groups: usize,
        cache: crate::CacheMode,
    ) -> Namespace {
        Namespace {
            source,
            writable,
            cache_groups,
            cache,
            inner: RwLock::new(Inner {
                next_ino: ROOT_INO + 1,
                ..Default::default()
            }),
            scan_lock: Mutex::new(()),
        }
    }

    pub fn root_is_file(&self) -> bool {
        matches!(
            self.source,
            Source::File {
                root_is_file: true,
                ..
            }
        )
    }

    fn open_options(&self) -> OpenOptions {
        OpenOptions {
            writable: self.writable,
            cache: self.cache,
            cache_groups: self.cache_groups,
            lock: if self.writable {
                LockMode::Exclusive
            } else {
                LockMode::Shared
            },
            ..OpenOptions::default()
        }
    }

    /// Opens the single image of a file source; its errors are fatal for the mount.
    pub fn load_single(&self) -> Result<(), Error> {
        let Source::File { path, root_is_file } = &self.source else {
            return Ok(());
        };
        let image = Image::open(path, &self.open_options())?;
        note_refusal(path, &image);
        let md = std::fs::metadata(path).map_err(|e| Error::io(path.display().to_string(), e))?;
        let stem = path.file_stem().unwrap_or(OsStr::new("image"));
        let mut inner = self.inner.write();
        let ino = if *root_is_file {
            ROOT_INO
        } else {
            inner.alloc_ino()
        };
        inner.insert(Node::new(
            ino,
            with_ext(stem, SHOWN_EXT),
            path.clone(),
            image,
            &md,
        ));
        Ok(())
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.inner.read().by_ino.get(&ino).cloned()
    }

    /// Every node, reachable by name or not (for flushing at the end).
    pub fn all(&self) -> Vec<Arc<Node>> {
        self.inner.read().by_ino.values().cloned().collect()
    }

    /// The nodes reachable by name, sorted by name.
    pub fn listing(&self) -> Vec<Arc<Node>> {
        let inner = self.inner.read();
        let mut v: Vec<Arc<Node>> = inner
            .by_name
            .values()
            .filter_map(|i| inner.by_ino.get(i).cloned())
            .collect();
        v.sort_by_key(|n| n.name());
        v
    }

    fn container_path(&self, stem: &OsStr) -> Option<PathBuf> {
        match &self.source {
            Source::Dir(dir) => Some(dir.join(with_ext(stem, IMAGE_EXT))),
            Source::File { .. } => None,
        }
    }

    /// Finds `name` (a shown `NAME.img`), checking SOURCE so that images
    /// added, removed or replaced since the last look are noticed.
    pub fn lookup(&self, name: &OsStr) -> Option<Arc<Node>> {
        if let Source::File { .. } = self.source {
            return self.node_named(name);
        }
        let stem = stem_of_shown(name)?;
        let path = self.container_path(stem)?;
        let _scan = self.scan_lock.lock();
        self.refresh(name, &path, std::fs::metadata(&path).ok());
        self.node_named(name)
    }

    /// The node shown as `name`, if any.
    fn node_named(&self, name: &OsStr) -> Option<Arc<Node>> {
        let inner = self.inner.read();
        inner
            .by_name
            .get(name)
            .and_then(|i| inner.by_ino.get(i))
            .cloned()
    }

    /// Re-reads SOURCE: opens new images, drops vanished ones.
    pub fn rescan(&self) {
        let Source::Dir(dir) = &self.source else {
            return;
        };
        let _scan = self.scan_lock.lock();
        let mut seen: HashMap<OsString, (PathBuf, std::fs::Metadata)> = HashMap::new();
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                for e in entries.flatten() {
                    let fname = e.file_name();
                    let Some(stem) = stem_of_container(&fname) else {
                        continue;
                    };
                    let path = e.path();
                    // Follows symlinks: a link to an image is an image.
                    let Ok(md) = std::fs::metadata(&path) else {
                        continue;
                    };
                    if md.is_file() {
                        seen.insert(with_ext(stem, SHOWN_EXT), (path, md));
                    }
                }
            }
            Err(e) => {
                warn!("cannot read {}: {e}", dir.display());
                return;
            }
        }
        let known: Vec<OsString> = self.inner.read().by_name.keys().cloned().collect();
        for name in known {
            if !seen.contains_key(&name) {
                self.forget_name(&name);
            }
        }
        for (name, (path, md)) in seen {
            self.refresh(&name, &path, Some(md));
        }
    }

    /// Brings one name in line with what SOURCE holds at `path` (`md` = its stat).
    fn refresh(&self, name: &OsStr, path: &Path, md: Option<std::fs::Metadata>) {
        let md = match md {
            Some(md) if md.is_file() => md,
            _ => {
                self.forget_name(name);
                return;
            }
        };
        let existing = self.node_named(name);
        if let Some(node) = existing {
            if node.dev_ino == (md.dev(), md.ino()) {
                return;
            }
            info!("{}: container replaced; reopening", path.display());
            self.forget_name(name);
        }
        let fp = fingerprint(&md);
        if let Some((old, locked)) = self.inner.read().failed.get(path) {
            // A corrupt file is retried only once it changes; a locked one every time.
            if *old == fp && !*locked {
                return;
            }
        }
        match Image::open(path, &self.open_options()) {
            Ok(image) => {
                note_refusal(path, &image);
                let mut inner = self.inner.write();
                inner.failed.remove(path);
                let ino = inner.alloc_ino();
                debug!("{}: opened as {:?} (ino {ino})", path.display(), name);
                inner.insert(Node::new(
                    ino,
                    name.to_os_string(),
                    path.to_path_buf(),
                    image,
                    &md,
                ));
            }
            Err(e) => {
                let locked = matches!(e, Error::Locked { .. });
                let mut inner = self.inner.write();
                let again = inner.failed.get(path).is_some_and(|(old, _)| *old == fp);
                if !again {
                    if locked {
                        warn!(
                            "{}: skipped: locked by another process (another asiffs mount or \
                             a program writing it); it appears once the lock is released",
                            path.display()
                        );
                    } else {
                        warn!("{}: skipped: {e}", path.display());
                    }
                }
                inner.failed.insert(path.to_path_buf(), (fp, locked));
            }
        }
    }

    /// Makes `name` unreachable; the node itself goes once no handle is open.
    fn forget_name(&self, name: &OsStr) {
        let removed = {
            let mut inner = self.inner.write();
            let Some(ino) = inner.by_name.remove(name) else {
                return;
            };
            let node = inner.by_ino.get(&ino).cloned();
            if let Some(n) = &node {
                n.detached.store(true, Ordering::SeqCst);
                if n.open.load(Ordering::SeqCst) == 0 {
                    inner.by_ino.remove(&ino);
                }
            }
            node
        };
        if let Some(n) = removed {
            debug!("{:?} vanished from SOURCE", name);
            if n.open.load(Ordering::SeqCst) == 0 {
                flush_logged(&n);
            }
        }
    }

    /// A handle on `node` was released.
    pub fn release(&self, node: &Arc<Node>) {
        let left = node.open.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        if left == 0 && node.detached.load(Ordering::SeqCst) {
            let mut inner = self.inner.write();
            if node.open.load(Ordering::SeqCst) == 0 {
                inner.by_ino.remove(&node.ino);
            }
        }
    }

    /// Creates `SOURCE/NAME.asif` for a new `NAME.img` (empty: size is set by setattr).
    pub fn create(&self, name: &OsStr) -> Result<Arc<Node>, i32> {
        if !self.writable {
            return Err(libc::EROFS);
        }
        let stem = stem_of_shown(name).ok_or(libc::EINVAL)?;
        let path = self.container_path(stem).ok_or(libc::EPERM)?;
        let _scan = self.scan_lock.lock();
        if path.symlink_metadata().is_ok() {
            return Err(libc::EEXIST);
        }
        let image = Image::create(&path, &CreateOptions::default()).map_err(|e| {
            warn!("{}: create failed: {e}", path.display());
            e.errno()
        })?;
        let md = std::fs::metadata(&path).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        info!("created {}", path.display());
        let node = Node::new(0, name.to_os_string(), path, image, &md);
        let mut inner = self.inner.write();
        let ino = inner.alloc_ino();
        let node = Arc::new(Node { ino, ..node });
        inner.by_name.insert(name.to_os_string(), ino);
        inner.by_ino.insert(ino, node.clone());
        Ok(node)
    }

    /// Removes `SOURCE/NAME.asif`, like unlink in a real directory.
    pub fn unlink(&self, name: &OsStr) -> Result<(), i32> {
        if !self.writable {
            return Err(libc::EROFS);
        }
        if !matches!(self.source, Source::Dir(_)) {
            return Err(libc::EPERM);
        }
        let node = self.lookup(name).ok_or(libc::ENOENT)?;
        let _scan = self.scan_lock.lock();
        std::fs::remove_file(node.path()).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        info!("removed {}", node.path().display());
        drop(_scan);
        self.forget_name(name);
        Ok(())
    }

    /// Renames `SOURCE/OLD.asif` to `SOURCE/NEW.asif`.
    pub fn rename(&self, old: &OsStr, new: &OsStr, noreplace: bool) -> Result<(), i32> {
        if !self.writable {
            return Err(libc::EROFS);
        }
        if !matches!(self.source, Source::Dir(_)) {
            return Err(libc::EPERM);
        }
        let new_stem = stem_of_shown(new).ok_or(libc::EINVAL)?;
        let node = self.lookup(old).ok_or(libc::ENOENT)?;
        let target = self.lookup(new);
        let new_path = self.container_path(new_stem).ok_or(libc::EPERM)?;
        if noreplace && (target.is_some() || new_path.symlink_metadata().is_ok()) {
            return Err(libc::EEXIST);
        }
        let _scan = self.scan_lock.lock();
        std::fs::rename(node.path(), &new_path)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        drop(_scan);
        if target.is_some() {
            self.forget_name(new);
        }
        let mut inner = self.inner.write();
        inner.by_name.remove(old);
        inner.by_name.insert(new.to_os_string(), node.ino);
        *node.loc.lock() = (new.to_os_string(), new_path);
        Ok(())
    }
}

impl Inner {
    fn alloc_ino(&mut self) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    fn insert(&mut self, node: Node) {
        let name = node.name();
        let ino = node.ino;
        self.by_name.insert(name, ino);
        self.by_ino.insert(ino, Arc::new(node));
    }
}

impl Node {
    fn new(ino: u64, name: OsString, path: PathBuf, image: Image, md: &std::fs::Metadata) -> Node {
        Node {
            ino,
            loc: Mutex::new((name, path)),
            image: Arc::new(image),
            dev_ino: (md.dev(), md.ino()),
            open: AtomicU32::new(0),
            detached: AtomicBool::new(false),
            resize_lock: Mutex::new(()),
        }
    }
}

pub(crate) fn flush_logged(node: &Node) {
    if node.image.is_writable() {
        if let Err(e) = node.image.flush() {
            warn!("{}: flush failed: {e}", node.path().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_names() {
        assert_eq!(stem_of_shown(OsStr::new("a.img")), Some(OsStr::new("a")));
        assert_eq!(stem_of_shown(OsStr::new(".img")), None);
        assert_eq!(stem_of_shown(OsStr::new("a.raw")), None);
        assert_eq!(
            stem_of_container(OsStr::new("disk.v2.asif")),
            Some(OsStr::new("disk.v2"))
        );
        assert_eq!(stem_of_container(OsStr::new("x.asif.gz")), None);
    }
}
