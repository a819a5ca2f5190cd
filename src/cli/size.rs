//! Size arguments: bytes, or a number with a unit. K/M/G/T/P (and KiB...)
//! are powers of 1024 as in qemu-img; KB/MB/GB/TB/PB are powers of 1000 as
//! in diskutil.

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "invalid size {s:?}: expected a number with an optional unit (e.g. 64G, 100GB)"
        ));
    }
    let unit = unit.trim();
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KIB" => 1 << 10,
        "M" | "MIB" => 1 << 20,
        "G" | "GIB" => 1 << 30,
        "T" | "TIB" => 1 << 40,
        "P" | "PIB" => 1 << 50,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "PB" => 1_000_000_000_000_000,
        _ => return Err(format!("invalid size {s:?}: unknown unit {unit:?}")),
    };
    let too_big = || format!("invalid size {s:?}: too large");
    if let Some((whole, frac)) = num.split_once('.') {
        // 1.5G and the like: exact in integers, as long as it lands on a byte.
        let digits = frac.len() as u32;
        let scale = 10u64.checked_pow(digits).ok_or_else(too_big)?;
        let int: u64 = format!("{whole}{frac}")
            .parse()
            .map_err(|_| format!("invalid size {s:?}"))?;
        let bytes = (int as u128) * (mult as u128);
        if bytes % scale as u128 != 0 {
            return Err(format!("invalid size {s:?}: not a whole number of bytes"));
        }
        return u64::try_from(bytes / scale as u128).map_err(|_| too_big());
    }
    let n: u64 = num.parse().map_err(|_| too_big())?;
    n.checked_mul(mult).ok_or_else(too_big)
}

/// `1.5 GiB (1610612736 bytes)`, for human output.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{:.3} {}", v, UNITS[u]).replace(".000", "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64G"), Ok(64 << 30));
        assert_eq!(parse_size("64g"), Ok(64 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("1.5M"), Ok(1572864));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("4P"), Ok(4 << 50));
    }

    #[test]
    fn errors() {
        assert!(parse_size("").unwrap_err().contains("expected a number"));
        assert!(parse_size("G").unwrap_err().contains("expected a number"));
        assert!(parse_size("12X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("99999999999P")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("0.3B").unwrap_err().contains("whole number"));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(1536 << 20), "1.500 GiB");
    }
}
