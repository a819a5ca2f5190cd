//! The volume over a real SOURCE directory of every format, without FUSE:
//! the answers the kernel would get, errno for errno.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::fs::namespace::{Namespace, Source, ROOT_INO};
use crate::{CacheMode, CreateOptions, Image};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;
const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;

/// Makes `SOURCE/name` as the format its extension names, `size` bytes.
fn make(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    match p.extension().and_then(OsStr::to_str) {
        Some("asif") => {
            let opts = CreateOptions {
                size,
                ..CreateOptions::default()
            };
            Image::create(&p, &opts).unwrap();
        }
        Some("dmg") => crate::udif::create_udrw(&p, size).unwrap(),
        Some("sparseimage") => crate::udsp::create(&p, size, MIB).unwrap(),
        Some("sparsebundle") => crate::udsb::SparseBundle::create(&p, size, MIB)
            .unwrap()
            .close()
            .unwrap(),
        _ => panic!("{name}: no format"),
    }
    p
}

/// One image of each format: a.asif, b.dmg (UDRW), c.sparseimage, d.sparsebundle.
fn four(dir: &Path) {
    for n in ["a.asif", "b.dmg", "c.sparseimage", "d.sparsebundle"] {
        make(dir, n, SIZE);
    }
}

fn volume_with(dir: &Path, writable: bool, ring: Option<Arc<Ring>>) -> Volume {
    let ns = Namespace::new(
        Source::Dir(dir.to_path_buf()),
        writable,
        64,
        CacheMode::Writeback,
    );
    ns.rescan();
    let md = std::fs::metadata(dir).unwrap();
    Volume::new(Arc::new(ns), ring, DirectIo::Auto, md)
}

fn volume(dir: &Path) -> Volume {
    volume_with(dir, true, None)
}

fn ino(v: &Volume, name: &str) -> u64 {
    v.lookup(ROOT_INO, OsStr::new(name))
        .unwrap_or_else(|e| panic!("lookup {name}: errno {e}"))
        .ino
}

fn read_at(v: &Volume, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
    let node = v.node(ino)?;
    v.read(&node, offset, size, |r| r.map(<[u8]>::to_vec))
}

fn write(v: &Volume, ino: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
    v.write(&*v.node(ino)?, offset, data)
}

fn fallocate(v: &Volume, ino: u64, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
    v.fallocate(&*v.node(ino)?, offset, len, mode)
}

fn lseek(v: &Volume, ino: u64, offset: i64, whence: i32) -> Result<i64, Errno> {
    v.lseek(&*v.node(ino)?, offset, whence)
}

fn truncate(v: &Volume, ino: u64, size: u64) -> Result<Attr, Errno> {
    let set = SetAttr {
        size: Some(size),
        ..SetAttr::default()
    };
    v.setattr(ino, &set)
}

/// The names readdir serves, in order.
fn names(v: &Volume) -> Vec<String> {
    let fh = v.opendir(ROOT_INO).unwrap();
    let list = v.readdir(fh).unwrap();
    v.releasedir(fh);
    list.iter()
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect()
}

/// 512-byte blocks the container takes on the host, summed over a bundle's files.
fn du_blocks(p: &Path) -> u64 {
    let md = std::fs::symlink_metadata(p).unwrap();
    if !md.is_dir() {
        return md.blocks();
    }
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| du_blocks(&e.unwrap().path()))
        .sum()
}

/// A byte pattern no two nearby offsets share.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

const FORMATS: [(&str, &str); 4] = [
    ("a.img", "a.asif"),
    ("b.img", "b.dmg"),
    ("c.img", "c.sparseimage"),
    ("d.img", "d.sparsebundle"),
];

#[test]
fn readdir_shows_every_format_and_full_names_for_shared_stems() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    make(d.path(), "disk.asif", MIB);
    make(d.path(), "disk.sparseimage", MIB);
    std::fs::write(d.path().join("notes.txt"), b"not an image").unwrap();
    let v = volume(d.path());
    assert_eq!(
        names(&v),
        [
            ".",
            "..",
            "a.img",
            "b.img",
            "c.img",
            "d.img",
            "disk.asif.img",
            "disk.sparseimage.img"
        ]
    );
    let fh = v.opendir(ROOT_INO).unwrap();
    let list = v.readdir(fh).unwrap();
    assert_eq!((list[0].ino, list[0].kind), (ROOT_INO, Kind::Directory));
    assert_eq!(list[2].kind, Kind::File);
    assert_eq!(list[2].ino, ino(&v, "a.img"));
    v.releasedir(fh);
    assert_eq!(v.readdir(fh).unwrap_err(), libc::EBADF);

    // Neither shares the plain name; the full names find each container.
    assert_eq!(
        v.lookup(ROOT_INO, OsStr::new("disk.img")),
        Err(libc::ENOENT)
    );
    let a = ino(&v, "disk.asif.img");
    let s = ino(&v, "disk.sparseimage.img");
    assert_ne!(a, s);
    assert_eq!(v.node(a).unwrap().disk.format(), crate::disk::Format::Asif);
    assert_eq!(v.node(s).unwrap().disk.format(), crate::disk::Format::Udsp);
    assert_eq!(
        v.lookup(ROOT_INO, OsStr::new("notes.img")),
        Err(libc::ENOENT)
    );
    assert_eq!(v.lookup(a, OsStr::new("a.img")), Err(libc::ENOENT));
    assert_eq!(v.opendir(a), Err(libc::ENOTDIR));

    // Once one of the pair goes, the other takes the plain name.
    std::fs::remove_file(d.path().join("disk.sparseimage")).unwrap();
    assert_eq!(
        v.lookup(ROOT_INO, OsStr::new("disk.asif.img")),
        Err(libc::ENOENT)
    );
    assert_eq!(
        v.node(ino(&v, "disk.img")).unwrap().path(),
        d.path().join("disk.asif")
    );
}

#[test]
fn getattr_gives_sizes_and_the_containers_blocks() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    let v = volume(d.path());
    let root = v.getattr(ROOT_INO).unwrap();
    assert_eq!(
        (root.kind, root.size, root.blocks, root.nlink),
        (Kind::Directory, 4096, 8, 2)
    );
    for (shown, container) in FORMATS {
        let i = ino(&v, shown);
        let path = d.path().join(container);
        write(&v, i, 3 * MIB, &vec![0x5a; MIB as usize]).unwrap();
        let a = v.getattr(i).unwrap();
        assert_eq!(
            (a.ino, a.kind, a.size, a.nlink),
            (i, Kind::File, SIZE, 1),
            "{shown}"
        );
        assert_eq!(a.blocks, du_blocks(&path), "{shown}");
        // The megabyte just written is on the host.
        assert!(a.blocks >= 2048, "{shown}: {} blocks", a.blocks);
        // A bundle's search bits do not show as execute bits.
        assert_eq!(a.perm & 0o111, 0, "{shown}");
    }
    assert_eq!(v.getattr(999), Err(libc::ENOENT));
}

#[test]
fn reads_and_unaligned_writes_round_trip_in_every_format() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    let v = volume(d.path());
    for (shown, _) in FORMATS {
        let i = ino(&v, shown);
        // Straddles a band and chunk boundary at 1 MiB, starting mid-sector.
        let data = pattern(300_001, 7);
        let at = MIB - 12_345;
        assert_eq!(write(&v, i, at, &data), Ok(300_001), "{shown}");
        assert_eq!(read_at(&v, i, at, 300_001).unwrap(), data, "{shown}");
        // Around it, still zeros.
        assert_eq!(read_at(&v, i, at - 3, 3).unwrap(), [0, 0, 0], "{shown}");
        let after = at + data.len() as u64;
        assert_eq!(read_at(&v, i, after, 5).unwrap(), [0; 5], "{shown}");
        // Overwrite a few bytes inside.
        write(&v, i, at + 10, b"xyz").unwrap();
        let mut want = data.clone();
        want[10..13].copy_from_slice(b"xyz");
        assert_eq!(read_at(&v, i, at, 300_001).unwrap(), want, "{shown}");
        // Reads stop at the end of the disk.
        assert_eq!(
            read_at(&v, i, SIZE - 100, 4096).unwrap().len(),
            100,
            "{shown}"
        );
        assert_eq!(read_at(&v, i, SIZE, 4096).unwrap(), b"", "{shown}");
        // And survive a flush and a fresh volume.
        v.fsync(&v.node(i).unwrap()).unwrap();
    }
    v.flush_all_logged();
    drop(v);
    let v = volume(d.path());
    for (shown, _) in FORMATS {
        let i = ino(&v, shown);
        let got = read_at(&v, i, MIB - 12_345, 13).unwrap();
        let mut want = pattern(13, 7);
        want[10..13].copy_from_slice(b"xyz");
        assert_eq!(got, want, "{shown}");
    }
}

#[test]
fn punch_hole_and_zero_range_read_zeros_and_free_space() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    let v = volume(d.path());
    for (shown, container) in FORMATS {
        let i = ino(&v, shown);
        let path = d.path().join(container);
        let data = pattern(4 * MIB as usize, 3);
        write(&v, i, 0, &data).unwrap();
        v.fsync(&v.node(i).unwrap()).unwrap();
        let full = v.getattr(i).unwrap().blocks;

        // Punch the second megabyte: it reads as zeros, the rest is intact.
        fallocate(&v, i, MIB, MIB, PUNCH | KEEP).unwrap();
        assert_eq!(
            read_at(&v, i, MIB, MIB as u32).unwrap(),
            vec![0; MIB as usize]
        );
        assert_eq!(
            read_at(&v, i, 0, MIB as u32).unwrap(),
            &data[..MIB as usize],
            "{shown}"
        );
        assert_eq!(
            read_at(&v, i, 2 * MIB, 1).unwrap(),
            [data[2 * MIB as usize]],
            "{shown}"
        );
        let punched = v.getattr(i).unwrap().blocks;
        assert!(
            punched <= full - 2048,
            "{shown}: {full} blocks, {punched} after punching 1 MiB"
        );
        assert_eq!(punched, du_blocks(&path), "{shown}");

        // Zero-range the third megabyte, unaligned at both ends.
        fallocate(&v, i, 2 * MIB + 100, MIB - 200, ZERO | KEEP).unwrap();
        let back = read_at(&v, i, 2 * MIB, MIB as u32).unwrap();
        assert_eq!(&back[..100], &data[2 * MIB as usize..][..100], "{shown}");
        assert_eq!(back[100..MIB as usize - 100], vec![0; MIB as usize - 200]);
        assert_eq!(
            &back[MIB as usize - 100..],
            &data[3 * MIB as usize - 100..3 * MIB as usize],
            "{shown}"
        );
        assert_eq!(v.getattr(i).unwrap().size, SIZE, "{shown}");

        // A punch past the end is clamped, not refused.
        assert_eq!(fallocate(&v, i, SIZE - 512, 4096, PUNCH | KEEP), Ok(()));
        assert_eq!(fallocate(&v, i, SIZE + 512, 4096, PUNCH | KEEP), Ok(()));
    }
}

#[test]
fn unsupported_fallocate_modes_are_eopnotsupp_never_enosys() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    let v = volume(d.path());
    let i = ino(&v, "a.img");
    for mode in [
        // A punch must keep the size.
        PUNCH,
        libc::FALLOC_FL_COLLAPSE_RANGE,
        libc::FALLOC_FL_INSERT_RANGE,
        libc::FALLOC_FL_UNSHARE_RANGE,
        PUNCH | ZERO | KEEP,
    ] {
        assert_eq!(
            fallocate(&v, i, 0, MIB, mode),
            Err(libc::EOPNOTSUPP),
            "mode {mode:#x}"
        );
    }
    assert_eq!(fallocate(&v, i, u64::MAX, 2, 0), Err(libc::EFBIG));
    // Reservation inside the disk is accepted by every format.
    for (shown, _) in FORMATS {
        assert_eq!(
            fallocate(&v, ino(&v, shown), 0, MIB, KEEP),
            Ok(()),
            "{shown}"
        );
    }
}

#[test]
fn lseek_finds_data_and_holes_and_enxio_past_the_end() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    let v = volume(d.path());
    // ASIF chunks, UDSP and UDSB bands are all 1 MiB here.
    for shown in ["a.img", "c.img", "d.img"] {
        let i = ino(&v, shown);
        assert_eq!(
            lseek(&v, i, 0, libc::SEEK_DATA),
            Err(libc::ENXIO),
            "{shown}"
        );
        assert_eq!(lseek(&v, i, 0, libc::SEEK_HOLE), Ok(0), "{shown}");
        write(&v, i, 3 * MIB + 7, b"data").unwrap();
        write(&v, i, 5 * MIB, &vec![1; MIB as usize]).unwrap();
        let at = |o: u64, w| lseek(&v, i, o as i64, w);
        assert_eq!(at(0, libc::SEEK_DATA), Ok(3 * MIB as i64), "{shown}");
        assert_eq!(at(3 * MIB + 9, libc::SEEK_DATA), Ok(3 * MIB as i64 + 9));
        // A bundle's band file ends where its last write did.
        let hole = if shown == "d.img" {
            3 * MIB + 11
        } else {
            4 * MIB
        };
        assert_eq!(at(3 * MIB, libc::SEEK_HOLE), Ok(hole as i64), "{shown}");
        assert_eq!(at(4 * MIB, libc::SEEK_DATA), Ok(5 * MIB as i64), "{shown}");
        assert_eq!(at(5 * MIB, libc::SEEK_HOLE), Ok(6 * MIB as i64), "{shown}");
        assert_eq!(at(6 * MIB, libc::SEEK_DATA), Err(libc::ENXIO), "{shown}");
        assert_eq!(at(SIZE - 1, libc::SEEK_HOLE), Ok(SIZE as i64 - 1));
        assert_eq!(at(SIZE, libc::SEEK_DATA), Err(libc::ENXIO), "{shown}");
        assert_eq!(at(SIZE, libc::SEEK_HOLE), Err(libc::ENXIO), "{shown}");
        assert_eq!(lseek(&v, i, -1, libc::SEEK_HOLE), Err(libc::ENXIO));
        // Other kinds are the kernel's: EINVAL, never ENOSYS.
        assert_eq!(at(0, libc::SEEK_SET), Err(libc::EINVAL), "{shown}");
    }
    // A fresh UDRW image is all data as far as the host file says.
    let b = ino(&v, "b.img");
    assert_eq!(lseek(&v, b, SIZE as i64, libc::SEEK_DATA), Err(libc::ENXIO));
}

#[test]
fn truncate_grows_where_the_format_can_and_refuses_where_it_cannot() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    let v = volume(d.path());
    for shown in ["a.img", "b.img", "c.img", "d.img"] {
        let i = ino(&v, shown);
        assert_eq!(truncate(&v, i, 12 * MIB).unwrap().size, 12 * MIB, "{shown}");
        assert_eq!(v.getattr(i).unwrap().size, 12 * MIB, "{shown}");
        write(&v, i, 12 * MIB - 4, b"last").unwrap();
        assert_eq!(read_at(&v, i, 12 * MIB - 5, 5).unwrap(), b"\0last");
        // And shrinks.
        assert_eq!(truncate(&v, i, 4 * MIB).unwrap().size, 4 * MIB, "{shown}");
        assert_eq!(read_at(&v, i, 12 * MIB - 4, 4).unwrap(), b"", "{shown}");
    }
    // Writes and fallocate past the end grow them too.
    for shown in ["a.img", "b.img", "c.img", "d.img"] {
        let i = ino(&v, shown);
        // To the next sector.
        assert_eq!(write(&v, i, 20 * MIB + 1, b"tail"), Ok(4), "{shown}");
        assert_eq!(v.getattr(i).unwrap().size, 20 * MIB + 512, "{shown}");
        assert_eq!(read_at(&v, i, 20 * MIB, 6).unwrap(), b"\0tail\0", "{shown}");
        // fallocate without KEEP_SIZE grows too; with it, not.
        fallocate(&v, i, 21 * MIB, MIB, KEEP).unwrap();
        assert_eq!(v.getattr(i).unwrap().size, 20 * MIB + 512, "{shown}");
        fallocate(&v, i, 21 * MIB, MIB, ZERO).unwrap();
        assert_eq!(v.getattr(i).unwrap().size, 22 * MIB, "{shown}");
        fallocate(&v, i, 22 * MIB, MIB, 0).unwrap();
        assert_eq!(v.getattr(i).unwrap().size, 23 * MIB, "{shown}");
    }
    // Not past what the format takes (UDIF: 1 TiB).
    let b = ino(&v, "b.img");
    let tib = 1u64 << 40;
    assert_eq!(write(&v, b, tib, b"x"), Err(libc::EFBIG));
    assert_eq!(fallocate(&v, b, tib, MIB, 0), Err(libc::EFBIG));
    assert_eq!(truncate(&v, b, tib + 512), Err(libc::EFBIG));
    assert_eq!(v.getattr(b).unwrap().size, 23 * MIB);
    // No write reaches past the largest offset.
    let a = ino(&v, "a.img");
    assert_eq!(write(&v, a, u64::MAX - 1, b"xy"), Err(libc::EFBIG));
}

#[test]
fn a_read_only_mount_refuses_every_change_with_erofs() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    {
        let v = volume(d.path());
        write(&v, ino(&v, "a.img"), 0, b"kept").unwrap();
        v.flush_all_logged();
    }
    let v = volume_with(d.path(), false, None);
    for (shown, _) in FORMATS {
        let i = ino(&v, shown);
        assert_eq!(write(&v, i, 0, b"no"), Err(libc::EROFS), "{shown}");
        assert_eq!(truncate(&v, i, SIZE), Err(libc::EROFS), "{shown}");
        assert_eq!(fallocate(&v, i, 0, 512, PUNCH | KEEP), Err(libc::EROFS));
        // Even a mode that is never supported: the image cannot change at all.
        assert_eq!(fallocate(&v, i, 0, 512, PUNCH), Err(libc::EROFS));
        assert_eq!(v.open(i, libc::O_RDWR), Err(libc::EROFS), "{shown}");
        assert_eq!(v.open(i, libc::O_WRONLY), Err(libc::EROFS), "{shown}");
        let o = v.open(i, libc::O_RDONLY).unwrap();
        assert_eq!(o.fh, 0);
        assert_eq!(v.flush(&v.node(i).unwrap(), FH_WRITE), Ok(()), "{shown}");
        assert_eq!(v.fsync(&v.node(i).unwrap()), Ok(()), "{shown}");
        v.release(i);
    }
    assert_eq!(read_at(&v, ino(&v, "a.img"), 0, 4).unwrap(), b"kept");
    let name = OsStr::new("new.img");
    assert_eq!(
        v.create(ROOT_INO, name, libc::O_RDWR).unwrap_err(),
        libc::EROFS
    );
    assert_eq!(v.unlink(ROOT_INO, OsStr::new("a.img")), Err(libc::EROFS));
    assert_eq!(
        v.rename(ROOT_INO, OsStr::new("a.img"), ROOT_INO, name, 0),
        Err(libc::EROFS)
    );
    assert!(d.path().join("a.asif").is_file());
    assert!(!d.path().join("new.asif").exists());
}

#[test]
fn create_unlink_and_rename_act_on_the_containers() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    let v = volume(d.path());
    let n = OsStr::new;

    let (attr, opened) = v
        .create(ROOT_INO, n("new.img"), libc::O_RDWR | libc::O_EXCL)
        .unwrap();
    assert_eq!((attr.size, attr.kind), (0, Kind::File));
    assert_eq!(
        opened,
        Opened {
            fh: FH_WRITE,
            direct_io: false
        }
    );
    assert_eq!(
        crate::registry::probe(&d.path().join("new.asif")).unwrap(),
        Some(crate::disk::Format::Asif)
    );
    assert_eq!(ino(&v, "new.img"), attr.ino);
    // A new image is sized by truncate, then written.
    assert_eq!(truncate(&v, attr.ino, MIB).unwrap().size, MIB);
    write(&v, attr.ino, 0, b"fresh").unwrap();
    v.release(attr.ino);

    assert_eq!(
        v.create(ROOT_INO, n("new.img"), libc::O_RDWR | libc::O_EXCL)
            .unwrap_err(),
        libc::EEXIST
    );
    let (again, _) = v.create(ROOT_INO, n("new.img"), libc::O_RDWR).unwrap();
    assert_eq!(again.ino, attr.ino);
    v.release(attr.ino);
    assert_eq!(
        v.create(ROOT_INO, n("noext"), libc::O_RDWR).unwrap_err(),
        libc::EINVAL
    );
    assert_eq!(
        v.create(attr.ino, n("x.img"), libc::O_RDWR).unwrap_err(),
        libc::EPERM
    );
    assert_eq!(
        v.mknod(ROOT_INO, n("fifo.img"), libc::S_IFIFO | 0o644),
        Err(libc::EPERM)
    );
    let made = v
        .mknod(ROOT_INO, n("node.img"), libc::S_IFREG | 0o644)
        .unwrap();
    assert_eq!(made.size, 0);
    assert!(d.path().join("node.asif").is_file());

    // Rename moves the container and keeps its extension and inode.
    v.rename(ROOT_INO, n("new.img"), ROOT_INO, n("renamed.img"), 0)
        .unwrap();
    assert!(!d.path().join("new.asif").exists());
    assert!(d.path().join("renamed.asif").is_file());
    assert_eq!(ino(&v, "renamed.img"), attr.ino);
    assert_eq!(read_at(&v, attr.ino, 0, 5).unwrap(), b"fresh");
    assert_eq!(v.lookup(ROOT_INO, n("new.img")), Err(libc::ENOENT));
    v.rename(ROOT_INO, n("b.img"), ROOT_INO, n("bee.img"), 0)
        .unwrap();
    assert!(d.path().join("bee.dmg").is_file());
    assert_eq!(
        v.rename(
            ROOT_INO,
            n("bee.img"),
            ROOT_INO,
            n("a.img"),
            libc::RENAME_NOREPLACE
        ),
        Err(libc::EEXIST)
    );
    assert_eq!(
        v.rename(
            ROOT_INO,
            n("bee.img"),
            ROOT_INO,
            n("z.img"),
            libc::RENAME_EXCHANGE
        ),
        Err(libc::EINVAL)
    );
    assert_eq!(
        v.rename(ROOT_INO, n("bee.img"), attr.ino, n("z.img"), 0),
        Err(libc::EXDEV)
    );
    assert_eq!(
        v.rename(ROOT_INO, n("gone.img"), ROOT_INO, n("z.img"), 0),
        Err(libc::ENOENT)
    );
    // Renaming over another image replaces it, as in a directory.
    let a = ino(&v, "a.img");
    v.rename(ROOT_INO, n("node.img"), ROOT_INO, n("a.img"), 0)
        .unwrap();
    assert_eq!(ino(&v, "a.img"), made.ino);
    assert_eq!(v.getattr(made.ino).unwrap().size, 0);
    assert_eq!(v.getattr(a), Err(libc::ENOENT));
    assert!(!d.path().join("node.asif").exists());

    // Unlink removes the container; a bundle goes as a whole directory.
    v.unlink(ROOT_INO, n("renamed.img")).unwrap();
    assert!(!d.path().join("renamed.asif").exists());
    v.unlink(ROOT_INO, n("d.img")).unwrap();
    assert!(!d.path().join("d.sparsebundle").exists());
    assert_eq!(v.unlink(ROOT_INO, n("d.img")), Err(libc::ENOENT));
    assert_eq!(v.unlink(attr.ino, n("a.img")), Err(libc::ENOENT));
    assert_eq!(names(&v), [".", "..", "a.img", "bee.img", "c.img"]);
    // A rename onto another format's stem makes both show full names.
    v.rename(ROOT_INO, n("a.img"), ROOT_INO, n("c.img"), 0)
        .unwrap();
    assert!(d.path().join("c.asif").is_file());
    assert_eq!(
        names(&v),
        [".", "..", "bee.img", "c.asif.img", "c.sparseimage.img"]
    );
}

#[test]
fn an_open_image_outlives_its_name_and_new_images_appear() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    let v = volume(d.path());
    let a = ino(&v, "a.img");
    v.open(a, libc::O_RDWR).unwrap();
    write(&v, a, 0, b"still here").unwrap();
    let before = v.getattr(a).unwrap();
    assert_eq!(before.nlink, 1);
    std::fs::remove_file(d.path().join("a.asif")).unwrap();
    // fstat of the open file still answers, with no link left, before and
    // after the namespace notices.
    let after = v.getattr(a).unwrap();
    assert_eq!(
        (after.size, after.nlink, after.perm),
        (before.size, 0, before.perm)
    );
    assert_eq!(v.lookup(ROOT_INO, OsStr::new("a.img")), Err(libc::ENOENT));
    assert_eq!(v.getattr(a).unwrap().nlink, 0);
    // The open handle keeps working until it is released.
    assert_eq!(read_at(&v, a, 0, 10).unwrap(), b"still here");
    assert_eq!(write(&v, a, 10, b"!"), Ok(1));
    v.release(a);
    assert_eq!(v.node(a).err(), Some(libc::ENOENT));

    make(d.path(), "late.sparseimage", MIB);
    let late = ino(&v, "late.img");
    assert_eq!(v.getattr(late).unwrap().size, MIB);
    assert_eq!(
        names(&v),
        [".", "..", "b.img", "c.img", "d.img", "late.img"]
    );
}

#[test]
fn a_bad_image_is_skipped_while_the_others_are_served() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    std::fs::write(d.path().join("broken.asif"), vec![0u8; 1000]).unwrap();
    std::fs::write(d.path().join("cut.dmg"), b"too short").unwrap();
    std::fs::create_dir(d.path().join("empty.sparsebundle")).unwrap();
    let v = volume(d.path());
    assert_eq!(names(&v), [".", "..", "a.img", "b.img", "c.img", "d.img"]);
    for bad in ["broken.img", "cut.img", "empty.img"] {
        assert_eq!(
            v.lookup(ROOT_INO, OsStr::new(bad)),
            Err(libc::ENOENT),
            "{bad}"
        );
    }
    let a = ino(&v, "a.img");
    write(&v, a, 0, b"served").unwrap();
    assert_eq!(read_at(&v, a, 0, 6).unwrap(), b"served");
    // Once repaired in place, it is served.
    std::fs::remove_file(d.path().join("broken.asif")).unwrap();
    make(d.path(), "broken.asif", MIB);
    assert_eq!(v.getattr(ino(&v, "broken.img")).unwrap().size, MIB);
}

#[test]
fn stats_and_pid_xattrs() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    let v = volume(d.path());
    let x = OsStr::new;
    let all: serde_json::Value =
        serde_json::from_slice(&v.getxattr(ROOT_INO, x(XATTR_STATS)).unwrap()).unwrap();
    let obj = all.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["a.img", "b.img", "c.img", "d.img"]);
    for (shown, format) in [
        ("a.img", "asif"),
        ("b.img", "udif"),
        ("c.img", "udsp"),
        ("d.img", "udsb"),
    ] {
        assert_eq!(obj[shown]["format"], format, "{shown}");
        assert_eq!(obj[shown]["io"], "blocking", "{shown}");
        let one: serde_json::Value =
            serde_json::from_slice(&v.getxattr(ino(&v, shown), x(XATTR_STATS)).unwrap()).unwrap();
        assert_eq!(one["format"], format, "{shown}");
    }
    // The ASIF counters are the image's own, read at each call.
    let a = ino(&v, "a.img");
    let stats = |v: &Volume| -> serde_json::Value {
        serde_json::from_slice(&v.getxattr(a, x(XATTR_STATS)).unwrap()).unwrap()
    };
    let before = stats(&v);
    assert_eq!(before["cache"], "writeback");
    write(&v, a, 0, &[1; 4096]).unwrap();
    let after = stats(&v);
    assert_eq!(after["writes"], before["writes"].as_u64().unwrap() + 1);
    assert_eq!(
        after["bytes_written"],
        before["bytes_written"].as_u64().unwrap() + 4096
    );

    assert_eq!(
        v.getxattr(ROOT_INO, x(XATTR_PID)).unwrap(),
        std::process::id().to_string().into_bytes()
    );
    assert_eq!(v.getxattr(a, x(XATTR_PID)), Err(libc::ENODATA));
    assert_eq!(v.getxattr(a, x("user.other")), Err(libc::ENODATA));
    assert_eq!(v.getxattr(999, x(XATTR_STATS)), Err(libc::ENOENT));
    assert_eq!(
        v.listxattr(ROOT_INO),
        b"user.asiffs.stats\0user.asiffs.pid\0"
    );
    assert_eq!(v.listxattr(a), b"user.asiffs.stats\0");
}

#[test]
fn open_asks_for_direct_io_as_the_policy_says() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    let v = volume(d.path());
    let a = ino(&v, "a.img");
    let o = v.open(a, libc::O_RDWR | libc::O_DIRECT).unwrap();
    assert_eq!(
        o,
        Opened {
            fh: FH_WRITE,
            direct_io: true
        }
    );
    assert!(Volume::flushes(o.fh));
    let o = v.open(a, libc::O_RDONLY).unwrap();
    assert_eq!(
        o,
        Opened {
            fh: 0,
            direct_io: false
        }
    );
    assert!(!Volume::flushes(o.fh));
    assert_eq!(v.open(999, libc::O_RDONLY), Err(libc::ENOENT));
    assert_eq!(v.open(a, libc::O_ACCMODE).unwrap().fh, 0);
    assert_eq!(v.open(a, libc::O_WRONLY).unwrap().fh, FH_WRITE);
    // The images stay locked by `v` until it goes.
    drop(v);
    let md = std::fs::metadata(d.path()).unwrap();
    for (policy, want) in [(DirectIo::Always, true), (DirectIo::Never, false)] {
        let ns = Arc::new(Namespace::new(
            Source::Dir(d.path().into()),
            false,
            64,
            CacheMode::Writeback,
        ));
        let w = Volume::new(ns, None, policy, md.clone());
        let i = ino(&w, "c.img");
        assert_eq!(w.open(i, libc::O_RDONLY).unwrap().direct_io, want);
        assert_eq!(w.open(i, libc::O_DIRECT).unwrap().direct_io, want);
    }
}

#[test]
fn a_single_image_source_is_the_root_when_the_mountpoint_is_a_file() {
    let d = tempfile::tempdir().unwrap();
    let p = make(d.path(), "one.sparseimage", SIZE);
    let ns = Namespace::new(
        Source::File {
            path: p,
            root_is_file: true,
        },
        true,
        64,
        CacheMode::Writeback,
    );
    ns.load_single().unwrap();
    let v = Volume::new(
        Arc::new(ns),
        None,
        DirectIo::Auto,
        std::fs::metadata(d.path()).unwrap(),
    );
    let root = v.getattr(ROOT_INO).unwrap();
    assert_eq!((root.kind, root.size), (Kind::File, SIZE));
    write(&v, ROOT_INO, 4096, b"root").unwrap();
    assert_eq!(read_at(&v, ROOT_INO, 4096, 4).unwrap(), b"root");
    assert_eq!(v.opendir(ROOT_INO), Err(libc::ENOTDIR));
    assert_eq!(v.lookup(ROOT_INO, OsStr::new("one.img")), Err(libc::ENOENT));
    assert_eq!(
        v.create(ROOT_INO, OsStr::new("x.img"), 0).unwrap_err(),
        libc::EPERM
    );
    assert_eq!(v.unlink(ROOT_INO, OsStr::new("one.img")), Err(libc::ENOENT));
    let s: serde_json::Value =
        serde_json::from_slice(&v.getxattr(ROOT_INO, OsStr::new(XATTR_STATS)).unwrap()).unwrap();
    assert_eq!(s["format"], "udsp");
}

/// The io_uring path answers through the closure, from the ring's thread,
/// with the same bytes and errnos as the blocking one.
#[test]
fn the_ring_path_round_trips_through_completion_closures() {
    let d = tempfile::tempdir().unwrap();
    four(d.path());
    let ring = Arc::new(Ring::new().unwrap());
    let v = volume_with(d.path(), true, Some(ring));
    let a = v.node(ino(&v, "a.img")).unwrap();
    // Every unencrypted format goes through the ring, a bundle's band
    // files too.
    for n in ["a.img", "b.img", "c.img", "d.img"] {
        assert!(v.is_async(&v.node(ino(&v, n)).unwrap()), "{n}");
    }
    let s: serde_json::Value =
        serde_json::from_slice(&v.getxattr(a.ino, OsStr::new(XATTR_STATS)).unwrap()).unwrap();
    assert_eq!(s["io"], "io_uring");

    let (wtx, wrx) = std::sync::mpsc::channel();
    let (rtx, rrx) = std::sync::mpsc::channel();
    let write = |at: u64, data: &[u8]| {
        let t = wtx.clone();
        v.write_async(&a, at, data, move |r| t.send(r).unwrap());
        wrx.recv().unwrap()
    };
    let read = |at: u64, size: u32| {
        let t = rtx.clone();
        v.read_async(&a, at, size, move |r| {
            t.send(r.map(<[u8]>::to_vec)).unwrap()
        });
        rrx.recv().unwrap()
    };
    let data = pattern(3 * MIB as usize, 9);
    // Twice: first the chunks are allocated, then they are mapped and
    // the ring carries the I/O.
    assert_eq!(write(MIB / 2 + 1, &data), Ok(3 * MIB as u32));
    assert_eq!(write(MIB / 2 + 1, &data), Ok(3 * MIB as u32));
    assert_eq!(read(MIB / 2 + 1, 3 * MIB as u32).unwrap(), data);
    assert_eq!(read(MIB / 2 - 2, 3).unwrap(), [0, 0, 0]);
    assert_eq!(read(SIZE - 3, 4096).unwrap(), [0, 0, 0]);
    assert_eq!(read(SIZE, 4096), Ok(vec![]));
    // Growth and refusals are decided before anything is submitted.
    assert_eq!(write(u64::MAX - 1, b"xy"), Err(libc::EFBIG));
    assert_eq!(write(SIZE, b"grow"), Ok(4));
    assert_eq!(v.getattr(a.ino).unwrap().size, SIZE + 512);
    // The blocking path reads what the ring wrote.
    assert_eq!(read_at(&v, a.ino, SIZE, 4).unwrap(), b"grow");
}

#[test]
fn statfs_reports_sources_file_system_in_4k_blocks() {
    let d = tempfile::tempdir().unwrap();
    let v = volume(d.path());
    let s = v.statfs().unwrap();
    let st = rustix::fs::statvfs(d.path()).unwrap();
    assert_eq!((s.bsize, s.frsize, s.namelen), (4096, 4096, 255));
    assert_eq!(s.blocks, st.f_blocks * st.f_frsize / 4096);
    assert_eq!(s.files, st.f_files);
    assert!(s.bavail <= s.bfree && s.bfree <= s.blocks);
}
