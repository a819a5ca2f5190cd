//! A small driver for `integration/mount_formats.sh` until the CLI creates
//! sparse bundles:
//!
//!   udsb_tool create SIZE BAND_SIZE OUT.sparsebundle   an empty bundle

use std::path::Path;
use std::process::ExitCode;

use asiffs::udsb::SparseBundle;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["create", size, band, out] => match (size.parse::<u64>(), band.parse::<u64>()) {
            (Ok(size), Ok(band)) => SparseBundle::create(Path::new(out), size, band)
                .and_then(|b| b.close())
                .map_err(|e| e.to_string()),
            _ => Err(format!(
                "size {size:?} and band size {band:?} must be numbers"
            )),
        },
        _ => Err("usage: udsb_tool create SIZE BAND_SIZE OUT.sparsebundle".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udsb_tool: {e}");
            ExitCode::FAILURE
        }
    }
}
