//! The names the mount shows: one flat file per image in SOURCE.
//!
//! `NAME.asif`, `NAME.dmg`, `NAME.sparseimage` and the directory
//! `NAME.sparsebundle` each appear as `NAME.img`. When several share a
//! stem, none is `NAME.img`: each appears under its full name plus `.img`
//! (`disk.asif.img`, `disk.dmg.img`), so no name ever depends on which was
//! seen first.
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

use crate::disk::{Disk, Format};
use crate::registry::IMAGE_EXTENSIONS;
use crate::{CreateOptions, Error, Image, LockMode, OpenOptions};

pub(crate) const ROOT_INO: u64 = 1;
pub(crate) const IMAGE_EXT: &str = "asif";
pub(crate) const SHOWN_EXT: &str = "img";

pub(crate) struct Node {
    pub ino: u64,
    /// Shown name and container path; both change on rename.
    loc: Mutex<(OsString, PathBuf)>,
    pub disk: Arc<dyn Disk>,
    /// Identity of the container when it was opened, to notice replacement.
    dev_ino: (u64, u64),
    /// Open file handles.
    pub open: AtomicU32,
    /// No longer reachable by name (deleted or replaced in SOURCE).
    pub detached: AtomicBool,
    /// Serialises size changes so that "grow if smaller" cannot race into a shrink.
    pub resize_lock: Mutex<()>,
    /// The container's stat when last seen, for a node no longer reachable
    /// by name (its path is gone, or names another file).
    pub last_md: Mutex<std::fs::Metadata>,
}

impl Node {
    pub fn name(&self) -> OsString {
        self.loc.lock().0.clone()
    }
    pub fn path(&self) -> PathBuf {
        self.loc.lock().1.clone()
    }
    /// Whether `md` is this node's container (not one that replaced it).
    pub fn is_container(&self, md: &std::fs::Metadata) -> bool {
        (md.dev(), md.ino()) == self.dev_ino
    }
}

pub(crate) enum Source {
    /// A directory of images (`NAME.asif`, `.dmg`, `.sparseimage`, `.sparsebundle`).
    Dir(PathBuf),
    /// One image; `root_is_file` when the mountpoint itself is the image.
    File { path: PathBuf, root_is_file: bool },
}

pub(crate) struct Namespace {
    pub source: Source,
    pub writable: bool,
    cache_groups: usize,
    cache: crate::CacheMode,
    /// Unlocks the source's encrypted images; without it they are skipped.
    password: Option<crate::password::Password>,
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

/// What must change before a failed container is tried again. A bundle's
/// directory stays the same when its Info.plist is repaired in place, so
/// the plist's own stat stands in for it.
fn container_fingerprint(path: &Path, md: &std::fs::Metadata) -> Fingerprint {
    if md.is_dir() {
        if let Ok(plist) = std::fs::metadata(path.join(crate::udsb::INFO)) {
            return (
                md.dev(),
                md.ino() ^ plist.ino(),
                plist.mtime(),
                plist.mtime_nsec(),
                plist.len(),
            );
        }
    }
    fingerprint(md)
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

/// `NAME.EXT` -> (`NAME`, `EXT`) for the container extensions.
fn stem_of_container(name: &OsStr) -> Option<(&OsStr, &'static str)> {
    let b = name.as_bytes();
    IMAGE_EXTENSIONS.iter().find_map(|ext| {
        let n = b.len().checked_sub(ext.len() + 1)?;
        (n > 0 && b[n] == b'.' && &b[n + 1..] == ext.as_bytes())
            .then(|| (OsStr::from_bytes(&b[..n]), *ext))
    })
}

/// What a directory entry must be to be served: a file, or a directory
/// for bundles.
fn is_container(ext: &str, md: &std::fs::Metadata) -> bool {
    if ext == "sparsebundle" {
        md.is_dir()
    } else {
        md.is_file()
    }
}

/// Why an entry named as a container is not one.
fn wrong_kind(ext: &str, md: &std::fs::Metadata) -> String {
    let is = crate::registry::file_kind(md);
    let want = if ext == "sparsebundle" {
        "a directory"
    } else {
        "a regular file"
    };
    format!("{is}, not {want}")
}

/// The shown name of each container among `names` (file names in SOURCE).
fn shown_names(names: &[OsString]) -> HashMap<OsString, OsString> {
    let mut by_stem: HashMap<&OsStr, Vec<&OsString>> = HashMap::new();
    for n in names {
        if let Some((stem, _)) = stem_of_container(n) {
            by_stem.entry(stem).or_default().push(n);
        }
    }
    let mut shown = HashMap::new();
    for (stem, containers) in by_stem {
        if let [only] = containers[..] {
            shown.insert(with_ext(stem, SHOWN_EXT), only.clone());
        } else {
            for c in containers {
                shown.insert(with_ext(c, SHOWN_EXT), c.clone());
            }
        }
    }
    shown
}

/// Opens a container as whatever format it holds.
fn open_disk(path: &Path, opts: &OpenOptions) -> Result<Arc<dyn Disk>, Error> {
    // Unrecognised content is opened as the format its extension names, so
    // the skip reason says what is wrong rather than only "not a disk
    // image" (the probe itself explains a `.dmg` that is neither UDIF nor
    // whole sectors).
    let by_ext = || match path.extension().and_then(OsStr::to_str) {
        Some("asif") => Some(Format::Asif),
        Some("sparsebundle") => Some(Format::Udsb),
        _ => None,
    };
    let format = crate::registry::probe(path)?.or_else(by_ext);
    Ok(Arc::from(crate::registry::open(path, format, opts)?))
}

/// Logs why an image is served read-only in a writable mount (a large
/// image's scan, still running, logs it itself when it finishes).
fn note_refusal(path: &Path, disk: &dyn Disk) {
    let why = disk.refusal_now();
    if let Some(why) = why.or_else(|| crate::registry::encryption_refusal(path, disk)) {
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
            password: None,
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

    /// Unlocks the encrypted images of the source.
    pub fn with_password(mut self, password: Option<crate::password::Password>) -> Namespace {
        self.password = password;
        self
    }

    fn open_options(&self) -> OpenOptions {
        OpenOptions {
            password: self.password.clone(),
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
        let disk = open_disk(path, &self.open_options())?;
        note_refusal(path, &*disk);
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
            disk,
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

    /// Where a new image shown as `STEM.img` is created.
    fn container_path(&self, stem: &OsStr) -> Option<PathBuf> {
        match &self.source {
            Source::Dir(dir) => Some(dir.join(with_ext(stem, IMAGE_EXT))),
            Source::File { .. } => None,
        }
    }

    /// The container in SOURCE shown as `name` now, with its stat.
    fn resolve(&self, name: &OsStr) -> Option<(PathBuf, std::fs::Metadata)> {
        let Source::Dir(dir) = &self.source else {
            return None;
        };
        let stem = stem_of_shown(name)?;
        // Only containers sharing `stem`, or the stem of `stem`, decide it.
        let mut candidates: Vec<OsString> =
            IMAGE_EXTENSIONS.iter().map(|e| with_ext(stem, e)).collect();
        if let Some((inner, _)) = stem_of_container(stem) {
            candidates.extend(IMAGE_EXTENSIONS.iter().map(|e| with_ext(inner, e)));
        }
        let present: Vec<OsString> = candidates
            .into_iter()
            .filter(|c| {
                let md = std::fs::metadata(dir.join(c));
                md.is_ok_and(|md| stem_of_container(c).is_some_and(|(_, e)| is_container(e, &md)))
            })
            .collect();
        let container = shown_names(&present).remove(name)?;
        let path = dir.join(container);
        let md = std::fs::metadata(&path).ok()?;
        Some((path, md))
    }

    /// Finds `name` (a shown `NAME.img`), checking SOURCE so that images
    /// added, removed or replaced since the last look are noticed.
    pub fn lookup(&self, name: &OsStr) -> Option<Arc<Node>> {
        if let Source::File { .. } = self.source {
            return self.node_named(name);
        }
        let _scan = self.scan_lock.lock();
        match self.resolve(name) {
            Some((path, md)) => self.refresh(name, &path, Some(md)),
            None => self.forget_name(name),
        }
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
        let mut present = Vec::new();
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                for e in entries.flatten() {
                    let fname = e.file_name();
                    let Some((_, ext)) = stem_of_container(&fname) else {
                        continue;
                    };
                    // Follows symlinks: a link to an image is an image.
                    match std::fs::metadata(e.path()) {
                        Ok(md) if is_container(ext, &md) => present.push(fname),
                        // Logged once per file, as failed opens are.
                        Ok(md) => {
                            let path = e.path();
                            let fp = fingerprint(&md);
                            let mut inner = self.inner.write();
                            if inner.failed.get(&path).map(|f| f.0) != Some(fp) {
                                warn!("{}: skipped: {}", path.display(), wrong_kind(ext, &md));
                                inner.failed.insert(path, (fp, false));
                            }
                        }
                        Err(_) => {}
                    }
                }
            }
            Err(e) => {
                warn!("cannot read {}: {e}", dir.display());
                return;
            }
        }
        let mut seen: HashMap<OsString, (PathBuf, std::fs::Metadata)> = HashMap::new();
        for (shown, container) in shown_names(&present) {
            let path = dir.join(container);
            if let Ok(md) = std::fs::metadata(&path) {
                seen.insert(shown, (path, md));
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
            Some(md) if md.is_file() || md.is_dir() => md,
            _ => {
                self.forget_name(name);
                return;
            }
        };
        let existing = self.node_named(name);
        if let Some(node) = existing {
            if node.dev_ino == (md.dev(), md.ino()) && node.path() == path {
                return;
            }
            info!("{}: container replaced; reopening", path.display());
            self.forget_name(name);
        }
        let fp = container_fingerprint(path, &md);
        if let Some((old, locked)) = self.inner.read().failed.get(path) {
            // A corrupt file is retried only once it changes; a locked one every time.
            if *old == fp && !*locked {
                return;
            }
        }
        match open_disk(path, &self.open_options()) {
            Ok(image) => {
                note_refusal(path, &*image);
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
        let image = Image::create(&path, &CreateOptions::default())
            .map(Arc::new)
            .map_err(|e| {
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

    /// Removes the container shown as `name` (a bundle as a whole
    /// directory), like unlink in a real directory.
    pub fn unlink(&self, name: &OsStr) -> Result<(), i32> {
        if !self.writable {
            return Err(libc::EROFS);
        }
        if !matches!(self.source, Source::Dir(_)) {
            return Err(libc::EPERM);
        }
        let node = self.lookup(name).ok_or(libc::ENOENT)?;
        let _scan = self.scan_lock.lock();
        let path = node.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        info!("removed {}", node.path().display());
        drop(_scan);
        self.forget_name(name);
        Ok(())
    }

    /// Renames the container shown as `old` to `new`'s stem, keeping its
    /// extension (`OLD.dmg` -> `NEW.dmg`).
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
        // The container keeps its extension: a rename never converts.
        let ext = node
            .path()
            .file_name()
            .and_then(|n| stem_of_container(n).map(|(_, e)| e))
            .unwrap_or(IMAGE_EXT);
        let Source::Dir(dir) = &self.source else {
            return Err(libc::EPERM);
        };
        let new_path = dir.join(with_ext(new_stem, ext));
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
    fn new(
        ino: u64,
        name: OsString,
        path: PathBuf,
        disk: Arc<dyn Disk>,
        md: &std::fs::Metadata,
    ) -> Node {
        Node {
            ino,
            loc: Mutex::new((name, path)),
            disk,
            dev_ino: (md.dev(), md.ino()),
            open: AtomicU32::new(0),
            detached: AtomicBool::new(false),
            resize_lock: Mutex::new(()),
            last_md: Mutex::new(md.clone()),
        }
    }
}

pub(crate) fn flush_logged(node: &Node) {
    if node.disk.is_writable() {
        if let Err(e) = node.disk.flush() {
            warn!("{}: flush failed: {e}", node.path().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_and_container_suffixes() {
        assert_eq!(stem_of_shown(OsStr::new("a.img")), Some(OsStr::new("a")));
        assert_eq!(stem_of_shown(OsStr::new(".img")), None);
        assert_eq!(stem_of_shown(OsStr::new("a.raw")), None);
        assert_eq!(
            stem_of_container(OsStr::new("disk.v2.asif")),
            Some((OsStr::new("disk.v2"), "asif"))
        );
        assert_eq!(
            stem_of_container(OsStr::new("b.sparsebundle")),
            Some((OsStr::new("b"), "sparsebundle"))
        );
        assert_eq!(stem_of_container(OsStr::new("x.asif.gz")), None);
        assert_eq!(stem_of_container(OsStr::new(".dmg")), None);
    }

    #[test]
    fn stems_shared_by_two_containers_show_full_names() {
        let names: Vec<OsString> = [
            "disk.asif",
            "disk.dmg",
            "solo.sparseimage",
            "b.sparsebundle",
            "notes.txt",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let mut shown: Vec<(String, String)> = shown_names(&names)
            .into_iter()
            .map(|(k, v)| (k.to_string_lossy().into(), v.to_string_lossy().into()))
            .collect();
        shown.sort();
        let want = [
            ("b.img", "b.sparsebundle"),
            ("disk.asif.img", "disk.asif"),
            ("disk.dmg.img", "disk.dmg"),
            ("solo.img", "solo.sparseimage"),
        ];
        assert_eq!(shown, want.map(|(a, b)| (a.to_string(), b.to_string())));
    }

    #[test]
    fn unrecognised_containers_fail_as_their_extension_says() {
        let dir = tempfile::tempdir().unwrap();
        let why = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, vec![0u8; 1000]).unwrap();
            match open_disk(&p, &OpenOptions::default()) {
                Ok(_) => panic!("{name} opened"),
                Err(e) => e.to_string(),
            }
        };
        let dmg = why("cut.dmg");
        assert!(
            dmg.ends_with(
                "cut.dmg: neither a UDIF image (no koly trailer in the last 512 bytes) nor a raw UDRW disk (1000 bytes is not whole 512-byte sectors)"
            ),
            "{dmg}"
        );
        assert_eq!(
            why("z.asif"),
            "not an ASIF image (magic 0x00000000, expected \"shdw\")"
        );
    }
}
