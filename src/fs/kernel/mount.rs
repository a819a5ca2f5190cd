//! Mounting without fuser or fusermount3: `/dev/fuse` opened here and
//! handed to mount(2), which needs CAP_SYS_ADMIN. The kernel then sends
//! INIT on the descriptor; the transport answers it.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use fuser::MountOption;

/// What mount(2) is given for a list of options.
#[derive(Debug, PartialEq, Eq)]
pub struct MountData {
    pub flags: libc::c_ulong,
    /// Options for the FUSE file system itself, comma separated, without
    /// the `fd`, `rootmode`, `user_id` and `group_id` added at mount time.
    pub data: Vec<String>,
    pub fsname: String,
    pub fstype: String,
}

/// Splits the mount options into mount(2) flags and FUSE data; `None`
/// for an option only fusermount3 can carry out (`auto_unmount`).
pub fn mount_data(options: &[MountOption], allow_other: bool) -> Option<MountData> {
    let mut m = MountData {
        // What fusermount3 sets for every FUSE mount.
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Vec::new(),
        fsname: "asiffs".into(),
        fstype: "fuse".into(),
    };
    for o in options {
        match o {
            MountOption::RO => m.flags |= libc::MS_RDONLY,
            MountOption::RW => m.flags &= !libc::MS_RDONLY,
            MountOption::Dev => m.flags &= !libc::MS_NODEV,
            MountOption::NoDev => m.flags |= libc::MS_NODEV,
            MountOption::Suid => m.flags &= !libc::MS_NOSUID,
            MountOption::NoSuid => m.flags |= libc::MS_NOSUID,
            MountOption::Exec => m.flags &= !libc::MS_NOEXEC,
            MountOption::NoExec => m.flags |= libc::MS_NOEXEC,
            MountOption::Atime => m.flags &= !libc::MS_NOATIME,
            MountOption::NoAtime => m.flags |= libc::MS_NOATIME,
            MountOption::Sync => m.flags |= libc::MS_SYNCHRONOUS,
            MountOption::Async => m.flags &= !libc::MS_SYNCHRONOUS,
            MountOption::DirSync => m.flags |= libc::MS_DIRSYNC,
            MountOption::DefaultPermissions => m.data.push("default_permissions".into()),
            MountOption::FSName(n) => m.fsname = n.clone(),
            MountOption::Subtype(t) => m.fstype = format!("fuse.{t}"),
            MountOption::AutoUnmount => return None,
            MountOption::CUSTOM(x) => m.data.push(x.clone()),
        }
    }
    if allow_other {
        m.data.push("allow_other".into());
    }
    Some(m)
}

/// Opens `/dev/fuse` and mounts it on `mountpoint`, whose root is a
/// directory or (`root_is_file`) a regular file.
pub fn mount(mountpoint: &Path, m: &MountData, root_is_file: bool) -> io::Result<OwnedFd> {
    // SAFETY: a plain open of a NUL-terminated literal path.
    let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned here.
    let dev = unsafe { OwnedFd::from_raw_fd(fd) };
    let rootmode = if root_is_file {
        libc::S_IFREG
    } else {
        libc::S_IFDIR
    };
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = vec![
        format!("fd={fd}"),
        format!("rootmode={rootmode:o}"),
        format!("user_id={uid}"),
        format!("group_id={gid}"),
    ];
    data.extend(m.data.iter().cloned());
    let c = |s: &str| CString::new(s).map_err(io::Error::other);
    let target = CString::new(mountpoint.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let (source, fstype, data) = (c(&m.fsname)?, c(&m.fstype)?, c(&data.join(","))?);
    // SAFETY: every pointer is a NUL-terminated string alive across the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            m.flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_flags_and_data() {
        let m = mount_data(
            &[
                MountOption::RO,
                MountOption::NoExec,
                MountOption::Dev,
                MountOption::DefaultPermissions,
                MountOption::FSName("/src".into()),
                MountOption::Subtype("asiffs".into()),
                MountOption::CUSTOM("max_read=131072".into()),
            ],
            true,
        )
        .unwrap();
        assert_eq!(m.flags, libc::MS_NOSUID | libc::MS_RDONLY | libc::MS_NOEXEC);
        assert_eq!(
            m.data,
            ["default_permissions", "max_read=131072", "allow_other"]
        );
        assert_eq!(
            (m.fsname.as_str(), m.fstype.as_str()),
            ("/src", "fuse.asiffs")
        );
        assert_eq!(mount_data(&[MountOption::AutoUnmount], true), None);
    }
}
