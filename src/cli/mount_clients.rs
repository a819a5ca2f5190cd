//! `asiffs umount` and `asiffs stats`: clients of a running mount, which
//! they reach only through the mountpoint (the server's xattrs
//! `user.asiffs.pid` and `user.asiffs.stats`, and umount2/fusermount3).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{error, warn};

use crate::error::{Error, Result};
use crate::fs::{unmount, XATTR_PID, XATTR_STATS};

#[derive(clap::Args, Debug)]
pub struct UmountArgs {
    /// The mountpoint of an asiffs mount.
    pub mountpoint: PathBuf,
    /// Detach now even if busy; the daemon ends once the last file is closed.
    #[arg(short, long)]
    pub lazy: bool,
    /// Seconds to wait for the daemon to flush and exit.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
}

#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// The mountpoint of an asiffs mount.
    pub mountpoint: PathBuf,
    /// One image (NAME or NAME.img); default: all of them.
    pub name: Option<String>,
    /// Indent the JSON.
    #[arg(long)]
    pub pretty: bool,
}

fn get_xattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let n = CString::new(name).map_err(io::Error::other)?;
    loop {
        // SAFETY: size query with a null buffer.
        let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; len as usize + 1];
        // SAFETY: buf is writable for buf.len() bytes.
        let got =
            unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue; // grew in between
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(buf);
    }
}

fn pid_alive(pid: i32) -> bool {
    // A zombie has exited already: only its parent has yet to reap it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// `asiffs umount MOUNTPOINT`: unmounts and waits until the server has flushed and exited.
pub fn cmd_umount(args: &UmountArgs) -> Result<i32> {
    let mp = std::path::absolute(&args.mountpoint)
        .map_err(|e| Error::io(args.mountpoint.display().to_string(), e))?;
    if mp.as_os_str().as_bytes().contains(&0) {
        return Err(Error::Invalid(format!("{}: NUL in path", mp.display())));
    }
    let pid = get_xattr(&mp, XATTR_PID)
        .ok()
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| s.trim().parse::<i32>().ok());
    if pid.is_none() {
        warn!(
            "{}: no asiffs server answers here; unmounting anyway",
            mp.display()
        );
    }
    unmount(&mp, args.lazy).map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EBUSY) {
            " (busy: try --lazy)"
        } else {
            ""
        };
        Error::io(format!("unmounting {}{hint}", mp.display()), e)
    })?;
    let Some(pid) = pid else { return Ok(0) };
    if args.lazy {
        return Ok(0);
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    while pid_alive(pid) {
        if Instant::now() > deadline {
            error!("server {pid} still running after {} s", args.timeout);
            return Ok(1);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(0)
}

/// `asiffs stats MOUNTPOINT [NAME]`: prints the engine counters as JSON.
pub fn cmd_stats(args: &StatsArgs) -> Result<i32> {
    let mut path = args.mountpoint.clone();
    if let Some(name) = &args.name {
        let direct = args.mountpoint.join(name);
        path = if direct.exists() || name.ends_with(".img") {
            direct
        } else {
            args.mountpoint.join(format!("{name}.img"))
        };
    }
    let raw = get_xattr(&path, XATTR_STATS).map_err(|e| {
        let what = if e.raw_os_error() == Some(libc::ENODATA)
            || e.raw_os_error() == Some(libc::EOPNOTSUPP)
        {
            io::Error::other("not an asiffs mount")
        } else {
            e
        };
        Error::io(path.display().to_string(), what)
    })?;
    let value: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| Error::Invalid(format!("{}: bad stats: {e}", path.display())))?;
    let text = if args.pretty {
        serde_json::to_string_pretty(&value)
    } else {
        serde_json::to_string(&value)
    }
    .map_err(|e| Error::Invalid(e.to_string()))?;
    println!("{text}");
    Ok(0)
}
