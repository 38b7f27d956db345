//! HMP arguments as QEMU's monitor parses them, driven by the same argument-type strings QEMU's
//! command table declares ("val:l,size:i,filename:s", "detach:-d,uri:s", "state:b"): strings
//! (bare or double-quoted with escapes), integer expressions (`l` 64-bit, `i` 32-bit) with
//! QEMU's operators, `on`/`off` booleans, and `-x` flags. The errors are QEMU's monitor text,
//! with the "Try \"help CMD\"" line as the hint.

use std::collections::HashMap;

use crate::error::{Error, HmErrorClass, Result};

/// A parsed argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arg {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// The arguments of one command line, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Args(HashMap<String, Arg>);

impl Args {
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.0.get(key) {
            Some(Arg::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        match self.0.get(key) {
            Some(Arg::Int(v)) => Some(*v),
            _ => None,
        }
    }

    /// A flag or boolean; absent flags are false.
    pub fn flag(&self, key: &str) -> bool {
        matches!(self.0.get(key), Some(Arg::Bool(true)))
    }
}

/// A parse failure: QEMU prints `message`, then "Try \"help CMD\" for more information".
fn failure(cmd: &str, message: String) -> Error {
    Error::new(HmErrorClass::InvalidParameter, message)
        .with_hint(format!("Try \"help {cmd}\" for more information\n"))
}

fn skip_space(p: &mut &str) {
    *p = p.trim_start_matches(|c: char| c.is_ascii_whitespace());
}

/// QEMU's `get_str`: a word up to the next blank, or a double-quoted string with `\n`, `\r`,
/// `\\`, `\'`, `\"` escapes. `None` when there is nothing (or a bad quoted string: `Err`).
fn get_str(p: &mut &str) -> std::result::Result<Option<String>, String> {
    skip_space(p);
    if p.is_empty() {
        return Ok(None);
    }
    let mut out = String::new();
    if let Some(rest) = p.strip_prefix('"') {
        let mut chars = rest.char_indices();
        loop {
            match chars.next() {
                None => return Err("unterminated string".to_string()),
                Some((i, '"')) => {
                    *p = &rest[i + 1..];
                    return Ok(Some(out));
                }
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 'r')) => out.push('\r'),
                    Some((_, c @ ('\\' | '\'' | '"'))) => out.push(c),
                    Some((_, c)) => return Err(format!("unsupported escape code: '\\{c}'")),
                    None => return Err("unterminated string".to_string()),
                },
                Some((_, c)) => out.push(c),
            }
        }
    }
    let end = p.find(|c: char| c.is_ascii_whitespace()).unwrap_or(p.len());
    out.push_str(&p[..end]);
    *p = &p[end..];
    Ok(Some(out))
}

/// QEMU's monitor expressions: `+ - ~ ( )`, character constants, numbers in C's notation
/// (decimal, `0x` hex, `0` octal), `* / %`, `& | ^`, `+ -`, in QEMU's precedence (logic binds
/// tighter than sum). Registers (`$pc`) are refused: hostmem has no CPU state to read.
struct Expr<'a> {
    s: &'a [u8],
    i: usize,
}

impl Expr<'_> {
    fn peek(&self) -> u8 {
        self.s.get(self.i).copied().unwrap_or(0)
    }

    fn blanks(&mut self) {
        while self.peek().is_ascii_whitespace() {
            self.i += 1;
        }
    }

    /// QEMU's `next()`: step over one character and the blanks after it.
    fn next(&mut self) {
        if self.peek() != 0 {
            self.i += 1;
            self.blanks();
        }
    }

    fn unary(&mut self) -> std::result::Result<i64, String> {
        match self.peek() {
            b'+' => {
                self.next();
                self.unary()
            }
            b'-' => {
                self.next();
                Ok(self.unary()?.wrapping_neg())
            }
            b'~' => {
                self.next();
                Ok(!self.unary()?)
            }
            b'(' => {
                self.next();
                let n = self.sum()?;
                if self.peek() != b')' {
                    return Err("')' expected".to_string());
                }
                self.next();
                Ok(n)
            }
            b'\'' => {
                self.i += 1;
                let c = self.peek();
                if c == 0 {
                    return Err("character constant expected".to_string());
                }
                self.i += 1;
                if self.peek() != b'\'' {
                    return Err("missing terminating ' character".to_string());
                }
                self.next();
                Ok(i64::from(c))
            }
            b'$' => Err("unknown register".to_string()),
            0 => Err("unexpected end of expression".to_string()),
            _ => {
                let (v, len) = strtoull(&self.s[self.i..])?;
                if len == 0 {
                    return Err(format!(
                        "invalid char '{}' in expression",
                        self.peek() as char
                    ));
                }
                self.i += len;
                self.blanks();
                Ok(v as i64)
            }
        }
    }

    fn prod(&mut self) -> std::result::Result<i64, String> {
        let mut v = self.unary()?;
        loop {
            let op = self.peek();
            if !matches!(op, b'*' | b'/' | b'%') {
                return Ok(v);
            }
            self.next();
            let w = self.unary()?;
            v = match op {
                b'*' => v.wrapping_mul(w),
                _ if w == 0 => return Err("division by zero".to_string()),
                b'/' => v.wrapping_div(w),
                _ => v.wrapping_rem(w),
            };
        }
    }

    fn logic(&mut self) -> std::result::Result<i64, String> {
        let mut v = self.prod()?;
        loop {
            let op = self.peek();
            if !matches!(op, b'&' | b'|' | b'^') {
                return Ok(v);
            }
            self.next();
            let w = self.prod()?;
            v = match op {
                b'&' => v & w,
                b'|' => v | w,
                _ => v ^ w,
            };
        }
    }

    fn sum(&mut self) -> std::result::Result<i64, String> {
        let mut v = self.logic()?;
        loop {
            let op = self.peek();
            if !matches!(op, b'+' | b'-') {
                return Ok(v);
            }
            self.next();
            let w = self.logic()?;
            v = if op == b'+' {
                v.wrapping_add(w)
            } else {
                v.wrapping_sub(w)
            };
        }
    }
}

/// C's `strtoull(s, &end, 0)` on an unsigned number: the value and how many bytes it used
/// (0 when there is no number). "number too large" when it does not fit 64 bits.
fn strtoull(s: &[u8]) -> std::result::Result<(u64, usize), String> {
    let (radix, start) =
        if s.len() > 2 && s[0] == b'0' && (s[1] | 0x20) == b'x' && s[2].is_ascii_hexdigit() {
            (16, 2)
        } else if s.first() == Some(&b'0') {
            (8, 0)
        } else {
            (10, 0)
        };
    let digits = s[start..]
        .iter()
        .take_while(|c| (**c as char).is_digit(radix))
        .count();
    if digits == 0 {
        return Ok((0, 0));
    }
    let text = std::str::from_utf8(&s[start..start + digits]).unwrap_or("0");
    let v = u64::from_str_radix(text, radix).map_err(|_| "number too large".to_string())?;
    Ok((v, start + digits))
}

/// Parses `rest` (the command line after the command name) against QEMU's `args_type` for
/// command `cmd`.
pub fn parse(cmd: &str, args_type: &str, rest: &str) -> Result<Args> {
    let mut p = rest;
    let mut args = Args::default();
    let specs: Vec<&str> = args_type.split(',').filter(|s| !s.is_empty()).collect();
    for (n, spec) in specs.iter().enumerate() {
        let (key, ty) = spec.split_once(':').unwrap_or((spec, "s"));
        let optional = ty.ends_with('?');
        let ty = ty.trim_end_matches('?');
        match ty {
            "s" => {
                skip_space(&mut p);
                if optional && p.is_empty() {
                    continue;
                }
                match get_str(&mut p) {
                    Ok(Some(s)) => {
                        args.0.insert(key.to_string(), Arg::Str(s));
                    }
                    Ok(None) => return Err(failure(cmd, format!("{cmd}: string expected"))),
                    // QEMU prints the reason, then the generic line.
                    Err(msg) => return Err(failure(cmd, format!("{msg}\n{cmd}: string expected"))),
                }
            }
            "i" | "l" => {
                skip_space(&mut p);
                if optional && p.is_empty() {
                    continue;
                }
                let mut e = Expr {
                    s: p.as_bytes(),
                    i: 0,
                };
                let v = e.sum().map_err(|m| failure(cmd, m))?;
                p = &p[e.i..];
                if ty == "i" && (v >> 32) & 0xffff_ffff != 0 {
                    return Err(failure(
                        cmd,
                        format!("'{cmd}' has failed: integer is for 32-bit values"),
                    ));
                }
                args.0.insert(key.to_string(), Arg::Int(v));
            }
            "b" => {
                skip_space(&mut p);
                let end = p.find(|c: char| !c.is_ascii_graphic()).unwrap_or(p.len());
                let v = match &p[..end] {
                    "on" => true,
                    "off" => false,
                    _ => return Err(failure(cmd, "Expected 'on' or 'off'".to_string())),
                };
                p = &p[end..];
                args.0.insert(key.to_string(), Arg::Bool(v));
            }
            flag if flag.starts_with('-') && flag.len() == 2 => {
                let c = flag.as_bytes()[1];
                let before = p;
                skip_space(&mut p);
                if let Some(after) = p.strip_prefix('-') {
                    let given = after.as_bytes().first().copied().unwrap_or(0);
                    if given == c {
                        p = &after[1..];
                        args.0.insert(key.to_string(), Arg::Bool(true));
                        continue;
                    }
                    // Another declared flag comes later: leave it for its own spec.
                    let later = specs[n + 1..]
                        .iter()
                        .any(|s| s.ends_with(&format!(":-{}", given as char)));
                    if !later {
                        return Err(failure(
                            cmd,
                            format!("{cmd}: unsupported option -{}", given as char),
                        ));
                    }
                }
                p = before;
            }
            other => {
                return Err(failure(cmd, format!("{cmd}: unknown type '{other}'")));
            }
        }
    }
    skip_space(&mut p);
    if !p.is_empty() {
        return Err(failure(
            cmd,
            format!("{cmd}: extraneous characters at the end of line"),
        ));
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(cmd: &str, ty: &str, rest: &str) -> (String, String) {
        let e = parse(cmd, ty, rest).unwrap_err();
        (e.message().to_string(), e.hint().unwrap().to_string())
    }

    #[test]
    fn pmemsave_arguments_parse_as_qemus_monitor_does() {
        let a = parse("pmemsave", "val:l,size:i,filename:s", " 0x1000 4096 pm.bin").unwrap();
        assert_eq!(
            (a.int("val"), a.int("size"), a.str("filename")),
            (Some(0x1000), Some(4096), Some("pm.bin"))
        );
        // A path starting with '/' divides the size, as in QEMU; quoting it is the way out.
        assert_eq!(
            err("pmemsave", "val:l,size:i,filename:s", " 0 4096 /tmp/pm.bin"),
            (
                "invalid char 't' in expression".to_string(),
                "Try \"help pmemsave\" for more information\n".to_string()
            )
        );
        let a = parse(
            "pmemsave",
            "val:l,size:i,filename:s",
            "0 4096 \"/tmp/p m.bin\"",
        )
        .unwrap();
        assert_eq!(a.str("filename"), Some("/tmp/p m.bin"));
        assert_eq!(
            err("pmemsave", "val:l,size:i,filename:s", "").0,
            "unexpected end of expression"
        );
        assert_eq!(
            err("pmemsave", "val:l,size:i,filename:s", "0 0x100000000 f").0,
            "'pmemsave' has failed: integer is for 32-bit values"
        );
        assert_eq!(
            err("pmemsave", "val:l,size:i,filename:s", "0 4096").0,
            "pmemsave: string expected"
        );
    }

    #[test]
    fn expressions_follow_qemus_precedence() {
        let v = |s: &str| parse("x", "v:l", s).unwrap().int("v").unwrap();
        assert_eq!(v("1+2*3"), 7);
        assert_eq!(v("(1+2)*3"), 9);
        // & | ^ bind tighter than + -, unlike C.
        assert_eq!(v("1+3&2"), 3);
        assert_eq!(v("0x10 - 010"), 8);
        assert_eq!(v("-1"), -1);
        assert_eq!(v("~0"), -1);
        assert_eq!(v("'A'"), 65);
        assert_eq!(err("x", "v:l", "1/0").0, "division by zero");
        assert_eq!(err("x", "v:l", "(1").0, "')' expected");
        assert_eq!(err("x", "v:l", "$pc").0, "unknown register");
        assert_eq!(
            err("x", "v:l", "99999999999999999999").0,
            "number too large"
        );
    }

    #[test]
    fn flags_strings_and_booleans() {
        let ty = "detach:-d,resume:-r,uri:s";
        let a = parse("migrate", ty, " -d tcp:1.2.3.4:5").unwrap();
        assert!(a.flag("detach") && !a.flag("resume"));
        assert_eq!(a.str("uri"), Some("tcp:1.2.3.4:5"));
        let a = parse("migrate", ty, "-r exec:cat").unwrap();
        assert!(a.flag("resume") && !a.flag("detach"));
        assert_eq!(
            err("migrate", ty, "-x uri").0,
            "migrate: unsupported option -x"
        );
        assert_eq!(err("migrate", ty, "").0, "migrate: string expected");
        assert_eq!(
            err("migrate", ty, "a b").0,
            "migrate: extraneous characters at the end of line"
        );
        let b = parse(
            "migrate_set_capability",
            "capability:s,state:b",
            "events on",
        )
        .unwrap();
        assert_eq!(
            (b.str("capability"), b.flag("state")),
            (Some("events"), true)
        );
        assert_eq!(
            err(
                "migrate_set_capability",
                "capability:s,state:b",
                "events maybe"
            )
            .0,
            "Expected 'on' or 'off'"
        );
        assert_eq!(
            err("x", "s:s", "\"abc").0,
            "unterminated string\nx: string expected"
        );
    }
}
