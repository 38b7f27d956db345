//! Values in QEMU's syntax: sizes, booleans, unsigned numbers, node lists, and
//! `key=value,...` option strings.
//!
//! The `*_param` forms produce QEMU 10's option-parser wording ("Parameter 'size' expects a size
//! value"), which needs the parameter's name; the bare forms are for callers that word their
//! own errors.

use super::error::OptionError;

/// What the value parsers return.
pub type Result<T> = std::result::Result<T, OptionError>;

/// Multiplier of a size suffix letter in units of `unit` (1024, or 1000 for QEMU's metric
/// sizes); `None` if the character is not a suffix.
fn suffix_mul(c: u8, unit: u64) -> Option<u64> {
    let power = match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 1,
        b'M' => 2,
        b'G' => 3,
        b'T' => 4,
        b'P' => 5,
        b'E' => 6,
        _ => return None,
    };
    Some(unit.pow(power))
}

/// Why a size did not parse; callers word the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeFault {
    Invalid,
    Range,
}

/// QEMU's size grammar (util/cutils.c do_strtosz, re-derived from its documented behaviour):
/// leading blanks; a decimal integer, or `0x` hex with neither fraction nor suffix; an optional
/// decimal fraction that requires a suffix other than B ("1.5" alone is refused, "1.5k" is 1536,
/// "1.k" is 1024); an optional single-letter suffix B/K/M/G/T/P/E in either case (`e` is the
/// exabyte suffix, never an exponent); the result rounds half up and must fit in 64 bits.
pub fn strtosz(s: &str) -> std::result::Result<u64, SizeFault> {
    strtosz_unit(s, 1024)
}

/// [`strtosz`] with metric suffixes (k = 1000), as QEMU reads frequencies.
pub fn strtosz_metric(s: &str) -> std::result::Result<u64, SizeFault> {
    strtosz_unit(s, 1000)
}

fn strtosz_unit(s: &str, unit: u64) -> std::result::Result<u64, SizeFault> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() && (b[i] == b' ' || (b'\t'..=b'\r').contains(&b[i])) {
        i += 1;
    }
    if i < b.len() && b[i] == b'+' {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = &s[int_start..i];
    // Hex: "0x..." with no fraction and no suffix.
    if int_digits == "0" && i < b.len() && (b[i] == b'x' || b[i] == b'X') {
        let hex = &s[i + 1..];
        if hex.is_empty() || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(SizeFault::Invalid);
        }
        return u64::from_str_radix(hex, 16).map_err(|_| SizeFault::Range);
    }
    let mut int: u64 = 0;
    for c in int_digits.bytes() {
        int = int
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(c - b'0')))
            .ok_or(SizeFault::Range)?;
    }
    // The fraction as 64.64 fixed point, as QEMU keeps it (a double scaled by 2^64).
    let mut frac: u64 = 0;
    if i < b.len() && b[i] == b'.' {
        let f_start = i;
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if int_digits.is_empty() && i == f_start + 1 {
            return Err(SizeFault::Invalid);
        }
        let text = format!("0{}", &s[f_start..i]);
        let value: f64 = if text == "0." {
            0.0
        } else {
            text.parse().map_err(|_| SizeFault::Invalid)?
        };
        if value >= 1.0 {
            int = int.checked_add(1).ok_or(SizeFault::Range)?;
        } else {
            frac = (value * 18_446_744_073_709_551_616.0) as u64;
            if frac == 0 && value > 0.0 {
                frac = 1;
            }
        }
    } else if int_digits.is_empty() {
        return Err(SizeFault::Invalid);
    }
    let mut mul = 1u64;
    if i < b.len() {
        match suffix_mul(b[i], unit) {
            Some(m) if i + 1 == b.len() => mul = m,
            _ => return Err(SizeFault::Invalid),
        }
    }
    if mul == 1 {
        // A fraction of a byte is meaningless; QEMU insists on a larger scale ("1.0" passes).
        if frac != 0 {
            return Err(SizeFault::Invalid);
        }
        return Ok(int);
    }
    let whole = u128::from(int) * u128::from(mul);
    let part = u128::from(frac) * u128::from(mul);
    // 128.64 fixed point: integer bits above 64 of `part`, rounding bit is bit 63.
    let total = whole + (part >> 64) + ((part >> 63) & 1);
    u64::try_from(total).map_err(|_| SizeFault::Range)
}

/// "1G", "512M", "1.5k", "4096" (bytes when bare), "0x1000", as QEMU's size visitor reads them.
pub fn parse_size(s: &str) -> Result<u64> {
    strtosz(s).map_err(|f| match f {
        SizeFault::Invalid => OptionError::NotASize(s.to_string()),
        SizeFault::Range => OptionError::SizeOverflow(s.to_string()),
    })
}

/// A size property of an `-object`: QEMU 10 answers "Parameter 'NAME' expects a size value".
pub fn parse_size_param(name: &str, s: &str) -> Result<u64> {
    strtosz(s).map_err(|_| expects(name, "a size value"))
}

/// on/off/yes/no/true/false, exactly (QEMU refuses "ON").
pub fn parse_bool(s: &str) -> Result<bool> {
    match s {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(OptionError::NotABoolean(s.to_string())),
    }
}

/// A boolean property: "Parameter 'NAME' expects 'on' or 'off'".
pub fn parse_bool_param(name: &str, s: &str) -> Result<bool> {
    parse_bool(s).map_err(|_| expects(name, "'on' or 'off'"))
}

/// How QEMU prints booleans in option syntax.
pub fn bool_to_str(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// "Parameter 'NAME' expects WHAT", the option parser's words for a value of the wrong type.
pub fn expects(name: &str, expected: &'static str) -> OptionError {
    OptionError::Expects {
        name: name.to_string(),
        expected,
    }
}

/// A signed number as QEMU's visitors read one: decimal, `0x` hex or `0` octal, with a sign.
pub fn parse_i64_any(s: &str) -> Option<i64> {
    let t = s.trim_start();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, t),
    };
    let v = parse_u64_any(digits)?;
    if neg {
        0i64.checked_sub_unsigned(v)
    } else {
        i64::try_from(v).ok()
    }
}

/// An unsigned number as QEMU's keyval visitor reads it: decimal, `0x` hex or `0` octal.
pub fn parse_u64_any(s: &str) -> Option<u64> {
    let t = s.trim_start();
    if t.starts_with('-') || t.is_empty() {
        return None;
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()
    } else {
        t.parse().ok()
    }
}

/// A number option as QemuOpts reads it (`qemu_strtou64`, strtoull's rules): a leading '-'
/// negates modulo 2^64, so "-1" is 2^64 - 1. "Parameter 'NAME' expects a number" otherwise.
pub fn parse_opts_number(name: &str, s: &str) -> Result<u64> {
    let t = s.trim_start();
    let (negative, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let v = parse_u64_any(digits).ok_or_else(|| expects(name, "a number"))?;
    Ok(if negative { v.wrapping_neg() } else { v })
}

/// A uint32 property: "Parameter 'NAME' expects a uint64 value" for non-numbers and
/// "Parameter 'NAME' expects uint32_t" for numbers that do not fit, as QEMU 10 words them.
pub fn parse_u32_param(name: &str, s: &str) -> Result<u32> {
    let v = parse_u64_any(s).ok_or_else(|| expects(name, "a uint64 value"))?;
    u32::try_from(v).map_err(|_| expects(name, "uint32_t"))
}

/// Longest range QEMU's string visitor expands ("0-70000" is refused).
const MAX_RANGE_ELEMENTS: u64 = 65536;

/// A uint16 list in QEMU's string-visitor syntax: "0-1,3". Errors use QEMU 10's wording for
/// parameter `name` ("expects a uint64 value or range", "expects uint16_t").
pub fn parse_u16_list(name: &str, s: &str) -> Result<Vec<u16>> {
    let bad = || expects(name, "a uint64 value or range");
    let mut out = Vec::new();
    for item in s.split(',') {
        let (lo, hi) = match item.split_once('-') {
            Some((a, b)) => {
                let lo = parse_u64_any(a).ok_or_else(bad)?;
                let hi = parse_u64_any(b).ok_or_else(bad)?;
                if hi < lo || hi - lo >= MAX_RANGE_ELEMENTS {
                    return Err(bad());
                }
                (lo, hi)
            }
            None => {
                let v = parse_u64_any(item).ok_or_else(bad)?;
                (v, v)
            }
        };
        for v in lo..=hi {
            out.push(u16::try_from(v).map_err(|_| expects(name, "uint16_t"))?);
        }
    }
    Ok(out)
}

/// A sorted set of numbers as ranges: [0, 1, 3] -> "0-1,3"; empty -> "".
pub fn format_ranges(values: impl IntoIterator<Item = u32>) -> String {
    let mut v: Vec<u32> = values.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let start = v[i];
        let mut end = start;
        while i + 1 < v.len() && v[i + 1] == end + 1 {
            i += 1;
            end = v[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// C's "%.3g": three significant digits, trailing zeros dropped, exponent form outside
/// [1e-4, 1e3).
fn format_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let sci = format!("{v:.2e}");
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("exponent is a number");
    if !(-4..3).contains(&exp) {
        let mant = trim_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let decimals = (2 - exp) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// QEMU's size_to_str: the binary unit that keeps the number below 1000, printed with "%.3g":
/// 4096 -> "4 KiB", 1.5 GiB -> "1.5 GiB", 1000 -> "0.977 KiB".
pub fn size_to_str(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // The unit switches one step early (at 1000 of the smaller unit) so that the number printed
    // stays below 1000: unit i is floor(log2(bytes * 1024 / 1000)) / 10.
    let mut log2 = 0usize;
    while log2 < 127 && (1000u128 << (log2 + 1)) <= u128::from(bytes) * 1024 {
        log2 += 1;
    }
    let i = if u128::from(bytes) * 1024 < 1000 {
        0
    } else {
        (log2 / 10).min(UNITS.len() - 1)
    };
    let div = (1u128 << (i * 10)) as f64;
    format!("{} {}B", format_g3(bytes as f64 / div), UNITS[i])
}

/// An option string "first,key=value,key2=value2" split in QEMU's way: ",," stands for a comma
/// inside a value; a leading element without '=' is the value of `implied_key`; a later element
/// without '=' is QEMU's (deprecated) short-form boolean "key" = "on"; an empty trailing element
/// is ignored.
pub fn parse_keyval(s: &str, implied_key: Option<&str>) -> Result<Vec<(String, String)>> {
    split_options(s, implied_key, Flags::On)
}

/// [`parse_keyval`] for the options QEMU reads with QemuOpts (`-m`, `-numa`, `-accel`): a
/// short-form boolean is accepted with QEMU's deprecation warning, whose text (without the
/// location and "warning: " prefix; its second line included) is appended to `warnings`.
pub fn parse_qemu_opts(
    s: &str,
    implied_key: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, String)>> {
    split_options(s, implied_key, Flags::OnWithWarning(warnings))
}

/// [`parse_keyval`] as QEMU's keyval parser reads `-machine` and `-smp`: an element without
/// '=' other than the implied first one is refused ("Expected '=' after parameter 'x'").
pub fn parse_keyval_strict(s: &str, implied_key: Option<&str>) -> Result<Vec<(String, String)>> {
    split_options(s, implied_key, Flags::Refused)
}

/// What a later element without '=' means.
enum Flags<'a> {
    /// "key" = "on", silently.
    On,
    /// "key" = "on", with QEMU's deprecation warning.
    OnWithWarning(&'a mut Vec<String>),
    /// An error.
    Refused,
}

fn split_options(
    s: &str,
    implied_key: Option<&str>,
    mut flags: Flags,
) -> Result<Vec<(String, String)>> {
    // Split on single commas, turning ",," into a literal comma.
    let mut elements = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                elements.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    elements.push(cur);
    if elements.last().is_some_and(String::is_empty) && elements.len() > 1 {
        elements.pop();
    }
    let mut out = Vec::new();
    for (n, el) in elements.into_iter().enumerate() {
        match el.split_once('=') {
            Some((k, v)) => {
                if k.is_empty() {
                    return Err(OptionError::InvalidParameter(String::new()));
                }
                out.push((k.to_string(), v.to_string()));
            }
            None if n == 0 => match implied_key {
                Some(key) => {
                    if el.is_empty() && s.is_empty() {
                        return Ok(out);
                    }
                    out.push((key.to_string(), el));
                }
                None if el.is_empty() => return Ok(out),
                None => return Err(OptionError::ExpectedEquals(el)),
            },
            None => {
                if el.is_empty() {
                    return Err(OptionError::InvalidParameter(String::new()));
                }
                match &mut flags {
                    Flags::Refused => return Err(OptionError::ExpectedEquals(el)),
                    Flags::OnWithWarning(w) => w.push(format!(
                        "short-form boolean option '{el}' deprecated\nPlease use {el}=on instead"
                    )),
                    Flags::On => {}
                }
                out.push((el, "on".to_string()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn opts_numbers_follow_strtoull() {
        assert_eq!(parse_opts_number("slots", "16").unwrap(), 16);
        assert_eq!(parse_opts_number("slots", "0x10").unwrap(), 16);
        assert_eq!(parse_opts_number("slots", "-1").unwrap(), u64::MAX);
        assert_eq!(
            parse_opts_number("slots", "x").unwrap_err().to_string(),
            "Parameter 'slots' expects a number"
        );
        assert!(parse_opts_number("slots", "--1").is_err());
    }

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert_eq!(parse_size("1K").unwrap(), 1024);
        assert_eq!(parse_size("2M").unwrap(), 2 << 20);
        assert_eq!(parse_size("1m").unwrap(), 1 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("1P").unwrap(), 1 << 50);
        assert_eq!(parse_size("1E").unwrap(), 1 << 60);
        assert_eq!(parse_size("1b").unwrap(), 1);
        assert_eq!(parse_size("7B").unwrap(), 7);
        assert_eq!(parse_size(" 1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("0x1000").unwrap(), 4096);
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
    }

    #[test]
    fn sizes_with_fractions_follow_qemu() {
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        // 1.1 KiB = 1126.4 bytes, rounded half up to 1126.
        assert_eq!(parse_size("1.1k").unwrap(), 1126);
        assert_eq!(parse_size("1.k").unwrap(), 1024);
        assert_eq!(parse_size(".5k").unwrap(), 512);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.5B").ok(), None);
        assert_eq!(parse_size("1.0000000001G").unwrap(), 1073741824);
        // A zero fraction needs no scale; a non-zero one does.
        assert_eq!(parse_size("1.0").unwrap(), 1);
        assert_eq!(parse_size("1.").unwrap(), 1);
        assert_eq!(parse_size("1.5e").unwrap(), 3 << 59);
        // A fraction of bytes is refused, as is e-notation ("e" is the exabyte suffix).
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("1.5e3").is_err());
    }

    #[test]
    fn sizes_refused() {
        for bad in [
            "",
            "abc",
            "-1",
            "16E",
            "18446744073709551616",
            "1MB",
            "1 M",
            "0x1k",
            "0x1.5",
            "k",
            ".",
            "1M,",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(
            parse_size_param("size", "abc").unwrap_err().to_string(),
            "Parameter 'size' expects a size value"
        );
    }

    #[test]
    fn booleans() {
        for t in ["on", "yes", "true"] {
            assert!(parse_bool(t).unwrap());
        }
        for f in ["off", "no", "false"] {
            assert!(!parse_bool(f).unwrap());
        }
        assert!(parse_bool("ON").is_err());
        assert_eq!(
            parse_bool_param("merge", "maybe").unwrap_err().to_string(),
            "Parameter 'merge' expects 'on' or 'off'"
        );
    }

    #[test]
    fn u32_params() {
        assert_eq!(parse_u32_param("prealloc-threads", "4").unwrap(), 4);
        assert_eq!(parse_u32_param("prealloc-threads", "0x10").unwrap(), 16);
        assert_eq!(
            parse_u32_param("prealloc-threads", "abc")
                .unwrap_err()
                .to_string(),
            "Parameter 'prealloc-threads' expects a uint64 value"
        );
        assert_eq!(
            parse_u32_param("prealloc-threads", "-1")
                .unwrap_err()
                .to_string(),
            "Parameter 'prealloc-threads' expects a uint64 value"
        );
        assert_eq!(
            parse_u32_param("prealloc-threads", "4294967296")
                .unwrap_err()
                .to_string(),
            "Parameter 'prealloc-threads' expects uint32_t"
        );
    }

    #[test]
    fn node_lists_and_ranges() {
        assert_eq!(parse_u16_list("host-nodes", "0-1,3").unwrap(), [0, 1, 3]);
        assert_eq!(parse_u16_list("host-nodes", "5").unwrap(), [5]);
        let range = "Parameter 'host-nodes' expects a uint64 value or range";
        for bad in ["3-1", "a", "", "0-70000", "1,,2"] {
            assert_eq!(
                parse_u16_list("host-nodes", bad).unwrap_err().to_string(),
                range,
                "{bad}"
            );
        }
        assert_eq!(
            parse_u16_list("host-nodes", "70000")
                .unwrap_err()
                .to_string(),
            "Parameter 'host-nodes' expects uint16_t"
        );
        assert_eq!(format_ranges([3, 0, 1]), "0-1,3");
        assert_eq!(format_ranges([]), "");
        assert_eq!(format_ranges([0, 2, 4, 5, 6]), "0,2,4-6");
    }

    #[test]
    fn size_to_str_matches_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(2 << 20), "2 MiB");
        assert_eq!(size_to_str(32 << 20), "32 MiB");
        assert_eq!(size_to_str(3 << 29), "1.5 GiB");
        assert_eq!(size_to_str(1 << 40), "1 TiB");
        assert_eq!(size_to_str(1023 * 1024), "0.999 MiB");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1000 << 10), "0.977 MiB");
    }

    #[test]
    fn keyval_splitting() {
        let kv = parse_keyval("memory-backend-ram,id=m,size=1G", Some("qom-type")).unwrap();
        assert_eq!(
            kv,
            [
                ("qom-type".to_string(), "memory-backend-ram".to_string()),
                ("id".to_string(), "m".to_string()),
                ("size".to_string(), "1G".to_string())
            ]
        );
        let kv = parse_keyval("id=a,mem-path=/tmp/x,,y,size=1", None).unwrap();
        assert_eq!(kv[1], ("mem-path".to_string(), "/tmp/x,y".to_string()));
        let kv = parse_keyval("a,,b,merge", Some("t")).unwrap();
        assert_eq!(kv[0], ("t".to_string(), "a,b".to_string()));
        assert_eq!(kv[1], ("merge".to_string(), "on".to_string()));
        assert!(parse_keyval("", None).unwrap().is_empty());
        assert!(parse_keyval("x", None).is_err());
        assert!(parse_keyval("=1", None).is_err());
        assert_eq!(parse_keyval("a=1,", None).unwrap().len(), 1);
    }

    #[test]
    fn short_form_booleans_per_parser() {
        let mut warnings = Vec::new();
        let kv = parse_qemu_opts("1G,foo", Some("size"), &mut warnings).unwrap();
        assert_eq!(kv[1], ("foo".to_string(), "on".to_string()));
        assert_eq!(
            warnings,
            ["short-form boolean option 'foo' deprecated\nPlease use foo=on instead"]
        );
        assert_eq!(
            parse_keyval_strict("pc,foo", Some("type")).unwrap_err(),
            OptionError::ExpectedEquals("foo".into())
        );
        assert_eq!(parse_keyval_strict("pc", Some("type")).unwrap().len(), 1);
    }

    proptest! {
        #[test]
        fn size_to_str_round_trips_within_precision(bytes in 1u64..u64::MAX / 2) {
            let text = size_to_str(bytes);
            let (num, unit) = text.split_once(' ').unwrap();
            if num.contains('e') {
                return Ok(());
            }
            let letter = unit.chars().next().unwrap();
            let back = parse_size(&format!("{num}{}", if letter == 'B' { 'B' } else { letter }));
            if num.contains('.') && letter == 'B' {
                return Ok(());
            }
            let back = back.unwrap() as f64;
            // Three significant digits: within 0.5% (plus rounding at the edge).
            prop_assert!((back - bytes as f64).abs() <= bytes as f64 * 0.006 + 1.0);
        }

        #[test]
        fn exact_sizes_round_trip(n in 0u64..1024, shift in 0u32..5) {
            let suffix = ["", "K", "M", "G", "T"][shift as usize];
            prop_assert_eq!(parse_size(&format!("{n}{suffix}")).unwrap(), n << (10 * shift));
        }

        #[test]
        fn ranges_round_trip(nodes in proptest::collection::btree_set(0u16..128, 0..20)) {
            let text = format_ranges(nodes.iter().map(|&n| u32::from(n)));
            let back: std::collections::BTreeSet<u16> = if text.is_empty() {
                Default::default()
            } else {
                parse_u16_list("host-nodes", &text).unwrap().into_iter().collect()
            };
            prop_assert_eq!(back, nodes);
        }

        #[test]
        fn keyval_escape_round_trips(v in "[a-z,/=]{0,12}") {
            let escaped = v.replace(',', ",,");
            let kv = parse_keyval(&format!("k={escaped},z=1"), None).unwrap();
            prop_assert_eq!(&kv[0].1, &v);
            prop_assert_eq!(&kv[1], &("z".to_string(), "1".to_string()));
        }
    }
}
