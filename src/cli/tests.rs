//! The CLI's format-generic paths, driven by a disk that is not ASIF: what
//! a format added to [`crate::registry::open`] gets from info, map, check and
//! convert without CLI changes.

use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use super::*;
use crate::asif::engine::Extent;

/// An in-memory disk of another format: the first MiB holds data (its
/// bytes are their offsets mod 251), the rest reads as zeros.
pub(super) struct PlainDisk {
    path: PathBuf,
    data: Mutex<Vec<u8>>,
}

pub(super) const PLAIN_SIZE: u64 = 3 << 20;
const PLAIN_DATA: u64 = 1 << 20;

impl PlainDisk {
    pub(super) fn new() -> PlainDisk {
        let mut data = vec![0u8; PLAIN_SIZE as usize];
        for (i, b) in data[..PLAIN_DATA as usize].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        PlainDisk {
            path: PathBuf::from("/images/plain.img"),
            data: Mutex::new(data),
        }
    }

    pub(super) fn bytes(&self) -> Vec<u8> {
        self.data.lock().clone()
    }
}

impl Disk for PlainDisk {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn size(&self) -> u64 {
        PLAIN_SIZE
    }
    fn is_writable(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let at = offset as usize;
        buf.copy_from_slice(&self.data.lock()[at..at + buf.len()]);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn discard(&self, _: u64, _: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn write_zeroes(&self, _: u64, _: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn resize(&self, _: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        Ok((offset < PLAIN_DATA).then_some(offset))
    }
    fn seek_hole(&self, offset: u64) -> Result<u64> {
        Ok(offset.max(PLAIN_DATA))
    }
    fn extents(&self) -> Result<Vec<Extent>> {
        Ok(vec![
            Extent {
                start: 0,
                length: PLAIN_DATA,
                data: true,
                offset: None,
            },
            Extent {
                start: PLAIN_DATA,
                length: PLAIN_SIZE - PLAIN_DATA,
                data: false,
                offset: None,
            },
        ])
    }
    fn allocated_bytes(&self) -> Result<u64> {
        Ok(PLAIN_DATA + 4096)
    }
    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

#[test]
fn info_of_another_format() {
    let d = PlainDisk::new();
    assert_eq!(
        info_text(&d, None, false).unwrap(),
        "image: /images/plain.img\nfile format: raw\nvirtual size: 3 MiB (3145728 bytes)\n\
         disk size: 1.004 MiB\n"
    );
    assert_eq!(
        info_text(&d, None, true).unwrap(),
        "{\n  \"format\": \"raw\",\n  \"path\": \"/images/plain.img\",\n  \
         \"virtual_size\": 3145728,\n  \"actual_size\": 1052672\n}\n"
    );
}

#[test]
fn info_of_asif_starts_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("a.asif");
    let opts = CreateOptions {
        size: PLAIN_SIZE,
        ..Default::default()
    };
    Image::create(&p, &opts).unwrap().close().unwrap();
    let d = crate::registry::open(&p, None, &OpenOptions::default()).unwrap();
    let text = info_text(&*d, None, false).unwrap();
    let head = format!(
        "image: {}\nfile format: asif\nvirtual size: 3 MiB (3145728 bytes)\n",
        p.display()
    );
    assert!(text.starts_with(&head), "{text}");
    assert!(text.contains("\nchunk size: 1048576\n"), "{text}");
    let json = info_text(&*d, None, true).unwrap();
    assert!(
        json.starts_with(&format!(
            "{{\n  \"format\": \"asif\",\n  \"path\": \"{}\",\n  \"virtual_size\": 3145728,\n",
            p.display()
        )),
        "{json}"
    );
    assert!(checkable(&p, &*d).is_ok());
}

#[test]
fn map_of_another_format() {
    let d = PlainDisk::new();
    let file = Path::new("plain.img");
    assert_eq!(
        map_text(&d, file, false).unwrap(),
        format!(
            "{:<20}{:<20}{:<20}File\n{:<20}{:<20}{:<20}plain.img\n",
            "Offset", "Length", "Mapped to", "0x0", "0x100000", "0x0"
        )
    );
    let v: serde_json::Value = serde_json::from_str(&map_text(&d, file, true).unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!([
            {"start": 0, "length": 1048576, "data": true, "zero": false, "offset": null},
            {"start": 1048576, "length": 2097152, "data": false, "zero": true, "offset": null},
        ])
    );
}

#[test]
fn check_refuses_another_format() {
    let d = PlainDisk::new();
    let e = checkable(Path::new("plain.img"), &d).err().unwrap();
    assert_eq!(
        e.to_string(),
        "plain.img: asiffs checks ASIF images only, not raw"
    );
}
