//! A small driver for `integration/udif_interop.sh` until the CLI serves
//! UDIF: every step goes through `asiffs::disk::open`.
//!
//!   udif_tool create SIZE OUT.dmg       a fresh UDRW image of SIZE bytes
//!   udif_tool create-from RAW OUT.dmg   a UDRW image holding RAW's bytes
//!                                       (all-zero 4 KiB blocks discarded)
//!   udif_tool cat IMAGE OUT.raw         the virtual disk of any UDIF image
//!   udif_tool check IMAGE               the check report; exit 2 if corrupt

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use asiffs::disk::Format;
use asiffs::registry;
use asiffs::{udif, OpenOptions};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["create", size, out] => match size.parse::<u64>() {
            Ok(n) => udif::create_udrw(Path::new(out), n).map_err(|e| e.to_string()),
            Err(e) => Err(format!("size {size:?}: {e}")),
        },
        ["create-from", raw, out] => create_from(Path::new(raw), Path::new(out)),
        ["cat", image, out] => cat(Path::new(image), Path::new(out)),
        ["check", image] => match udif::check(Path::new(image)) {
            Ok(report) => {
                for l in report.lines() {
                    println!("{l}");
                }
                return if report.is_clean() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(2)
                };
            }
            Err(e) => Err(e.to_string()),
        },
        _ => {
            Err("usage: udif_tool create SIZE OUT.dmg | create-from RAW OUT.dmg | cat IMAGE OUT.raw | check IMAGE".into())
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udif_tool: {e}");
            ExitCode::FAILURE
        }
    }
}

const BLOCK: usize = 4096;

fn create_from(raw: &Path, out: &Path) -> Result<(), String> {
    let mut src = std::fs::File::open(raw).map_err(|e| e.to_string())?;
    let size = src.metadata().map_err(|e| e.to_string())?.len();
    udif::create_udrw(out, size).map_err(|e| e.to_string())?;
    let d = registry::open(out, Some(Format::Udif), &OpenOptions::writable())
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; BLOCK];
    let mut at = 0u64;
    while at < size {
        let n = BLOCK.min((size - at) as usize);
        src.read_exact(&mut buf[..n]).map_err(|e| e.to_string())?;
        if buf[..n].iter().all(|&b| b == 0) {
            d.discard(at, n as u64).map_err(|e| e.to_string())?;
        } else {
            d.write_at(&buf[..n], at).map_err(|e| e.to_string())?;
        }
        at += n as u64;
    }
    d.flush().map_err(|e| e.to_string())
}

fn cat(image: &Path, out: &Path) -> Result<(), String> {
    let d = registry::open(image, None, &OpenOptions::default()).map_err(|e| e.to_string())?;
    let mut f = std::fs::File::create(out).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < d.size() {
        let n = buf.len().min((d.size() - at) as usize);
        d.read_at(&mut buf[..n], at).map_err(|e| e.to_string())?;
        f.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        at += n as u64;
    }
    Ok(())
}
