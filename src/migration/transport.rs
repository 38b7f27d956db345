//! QEMU's migration URIs as byte channels: `tcp:`, `unix:`, `exec:`, `fd:` and `file:`, both
//! ways, with QEMU 10's syntax and QEMU 10's words for every failure it has words for.
//!
//! | piece | what it is | QEMU counterpart |
//! |---|---|---|
//! | [`MigrationUri`], [`IncomingUri`], [`InetAddress`] | a parsed URI; `Display` prints it back | `migrate_uri_parse`, `socket_parse`, `inet_parse`, `file_parse_offset` |
//! | [`OutgoingChannel`] | a connected, buffered [`Write`] with a byte counter | `*_start_outgoing_migration`, `QEMUFile` |
//! | [`Incoming`], [`IncomingChannel`] | a listener set up at once, an accept; a [`BufRead`] (and [`Seek`] for `file:`) | `*_start_incoming_migration` |
//! | [`Cancel`] | wakes whatever a transfer is blocked in, from any thread | `migration_cancel` → `qemu_file_shutdown` |
//! | [`TransportError`] | every failure, `Display` in QEMU's words | the `error_setg`s of `io/` and `util/qemu-sockets.c` |
//!
//! Semantics carried over from QEMU 10.0.2 (each checked against the real binary):
//! * `tcp:HOST:PORT` resolves with `getaddrinfo`; an outgoing connection tries every address and
//!   reports the last failure ("Failed to connect to '127.0.0.1:1': Connection refused"). An
//!   incoming one listens on **every** address the host resolves to, passively: `tcp::PORT`
//!   binds `0.0.0.0` and then `::` (dual-stack, or IPv6-only when the first took the IPv4
//!   port; with port 0 each gets a port of its own), `tcp:0:PORT` binds `0.0.0.0` only. It
//!   succeeds if one listener does and otherwise reports the first failure; the addresses are
//!   listed last-bound first, as QEMU's `socket-address` list has them. Options `to=` (a port
//!   range to try when listening), `ipv4`, `ipv6`, `keep-alive` (outgoing only; ignored when
//!   listening, as QEMU ignores it) and `mptcp` are found anywhere after the port, unknown
//!   ones are ignored, exactly as QEMU's `strstr` parser does.
//! * `unix:PATH` listening replaces whatever is at PATH (QEMU unlinks first) and removes the
//!   socket when the listener goes.
//! * `exec:CMD` runs `/bin/sh -c CMD`: outgoing, the stream is its stdin and its stdout is
//!   `/dev/null`; incoming, the stream is its stdout and its stdin is `/dev/null`; stderr is
//!   the VMM's. The child inherits no other descriptor (glib's spawn closes them; here they are
//!   marked close-on-exec in the child).
//! * `file:PATH[,offset=N]`: N is a QEMU size (`4k`, `0x1000`, `1.5M`). Outgoing, the file is
//!   created with mode 0600 if missing, **truncated to N** (so bytes before N survive and
//!   everything after goes) and written from N. hostmem leaves the same file but gets there
//!   by writing over the old bytes and cutting where the stream ends (see
//!   `open_outgoing_file`), so a save onto an existing file reuses its page cache. Incoming, it is read from N. Mapped-ram offsets
//!   in the stream are absolute file offsets, as QEMU writes them.
//! * `defer` is accepted only by `-incoming` ([`IncomingUri`]); `migrate` and
//!   `migrate_incoming` call it an unknown protocol, as QEMU does.
//!
//! Where hostmem differs, on purpose:
//! * `fd:N` takes a descriptor **number** (QEMU's outgoing `fd:` takes a `getfd` name; its
//!   incoming one takes either). The channel takes the descriptor over and closes it when it
//!   goes, as QEMU closes a descriptor handed to it; an fd that is not open is refused at once
//!   (QEMU 10 waits on it forever). A regular file gives QEMU's deprecation warning, see
//!   [`OutgoingChannel::warnings`].
//! * `exec:` outgoing: QEMU ignores the command's exit status (the migration "completes" even
//!   when `gzip > /full/disk` failed). [`OutgoingChannel::finish`] reports a non-zero status as
//!   [`TransportError::CommandFailed`]; the status is in the error for a caller that wants
//!   QEMU's leniency. Incoming, the status is only reported ([`Finished::exit_status`]): the
//!   stream loaded, which is what counts. An incoming command that writes nothing ends the
//!   stream at once (QEMU 10 hangs in `setup` forever).
//! * `-incoming` channel specifications (JSON or `key=value`, QEMU 10's alternative to a URI)
//!   are not parsed; the common mistakes get QEMU's messages ("Parameter 'channel-type' does
//!   not accept value 'bogus'"), anything else a message that says URIs are what is taken.
//! * `rdma:` and `vsock:` are recognised and refused as unsupported.
//! * [`Cancel`] also wakes a transfer blocked in an `exec:` pipe, a pipe given with `fd:`, a
//!   `connect` or an `accept`; QEMU's cancel can only shut sockets down.
//!
//! Everything blocking polls the descriptor together with the [`Cancel`]'s eventfd, so a
//! cancel is seen at once whatever the peer does. Sockets are written with `MSG_NOSIGNAL` and
//! pipes with SIGPIPE blocked for the call, so a peer that goes away gives EPIPE ("Unable to
//! write to command: Broken pipe"), never a signal that kills the VMM (QEMU ignores SIGPIPE
//! process-wide; a library cannot).
//!
// The module's docs join the outer `cbindgen:ignore` doc and are resolved in `migration`'s
// scope, hence the full paths.
//! [`BufRead`]: std::io::BufRead
//! [`Cancel`]: crate::migration::transport::Cancel
//! [`Finished::exit_status`]: crate::migration::transport::Finished::exit_status
//! [`Incoming`]: crate::migration::transport::Incoming
//! [`IncomingChannel`]: crate::migration::transport::IncomingChannel
//! [`IncomingUri`]: crate::migration::transport::IncomingUri
//! [`InetAddress`]: crate::migration::transport::InetAddress
//! [`MigrationUri`]: crate::migration::transport::MigrationUri
//! [`OutgoingChannel`]: crate::migration::transport::OutgoingChannel
//! [`OutgoingChannel::finish`]: crate::migration::transport::OutgoingChannel::finish
//! [`OutgoingChannel::warnings`]: crate::migration::transport::OutgoingChannel::warnings
//! [`Seek`]: std::io::Seek
//! [`TransportError`]: crate::migration::transport::TransportError
//! [`TransportError::CommandFailed`]: crate::migration::transport::TransportError::CommandFailed
//! [`Write`]: std::io::Write

use std::ffi::{CStr, CString};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::direct_file::{reopen_direct, DirectFile, DirectStats};
use crate::error::{strerror, Error, HmErrorClass};
use crate::options::values::{strtosz, SizeFault};

/// QEMU's `IO_BUF_SIZE`: what an outgoing channel gathers before it writes.
const OUT_BUF: usize = 32 * 1024;
/// What an incoming channel reads at a time (the codec's own reader asks for more, and then
/// reads straight into its buffer).
const IN_BUF: usize = 64 * 1024;
/// The shell QEMU runs `exec:` commands with.
const SHELL: &str = "/bin/sh";
/// `sizeof(struct sockaddr_un.sun_path)` on Linux.
const SUN_PATH_LEN: usize = 108;

// ================================================================ URIs

/// A migration URI, as `migrate`, `migrate_incoming` and `-incoming` take it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MigrationUri {
    /// `tcp:HOST:PORT[,options]`.
    Tcp(InetAddress),
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `exec:COMMAND`, run by `/bin/sh -c`.
    Exec(String),
    /// `fd:N`: an open descriptor the channel takes over.
    Fd(RawFd),
    /// `file:PATH[,offset=N]`.
    File { path: PathBuf, offset: u64 },
}

/// What `-incoming` takes: a URI, or `defer` (the URI comes later, with `migrate_incoming`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IncomingUri {
    Defer,
    Uri(MigrationUri),
}

/// A `tcp:` address: QEMU's `InetSocketAddress`. Host and port are kept as written (a port
/// may be a service name); a host with a `:` is an IPv6 address, written in brackets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct InetAddress {
    /// Empty means "any address" when listening (QEMU's `tcp::PORT`).
    pub host: String,
    pub port: String,
    /// `to=PORT`: when listening, try each port from `port` to this one.
    pub to: Option<i32>,
    pub ipv4: Option<bool>,
    pub ipv6: Option<bool>,
    /// `keep-alive`: SO_KEEPALIVE on an outgoing connection.
    pub keep_alive: Option<bool>,
    /// `mptcp`: Multipath TCP.
    pub mptcp: Option<bool>,
}

impl MigrationUri {
    /// Parses a URI as `migrate` and `migrate_incoming` do (QEMU's `migrate_uri_parse`).
    pub fn parse(uri: &str) -> Result<MigrationUri, TransportError> {
        if let Some(cmd) = uri.strip_prefix("exec:") {
            return Ok(MigrationUri::Exec(cmd.to_string()));
        }
        if let Some(rest) = uri.strip_prefix("rdma:") {
            parse_inet(rest)?;
            return Err(TransportError::Unsupported { scheme: "rdma" });
        }
        if let Some(path) = uri.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(TransportError::UnixEmpty);
            }
            return Ok(MigrationUri::Unix(PathBuf::from(path)));
        }
        if let Some(n) = uri.strip_prefix("fd:") {
            if n.is_empty() {
                return Err(TransportError::FdEmpty);
            }
            return match parse_fd_number(n) {
                Some(fd) => Ok(MigrationUri::Fd(fd)),
                None => Err(TransportError::FdNumber {
                    input: n.to_string(),
                }),
            };
        }
        if uri.starts_with("vsock:") {
            return Err(TransportError::Unsupported { scheme: "vsock" });
        }
        if let Some(rest) = uri.strip_prefix("tcp:") {
            return parse_inet(rest).map(MigrationUri::Tcp);
        }
        if let Some(spec) = uri.strip_prefix("file:") {
            // QEMU cuts at the first ",offset=" and reads everything after it as the size.
            return match spec.find(",offset=") {
                None => Ok(MigrationUri::File {
                    path: PathBuf::from(spec),
                    offset: 0,
                }),
                Some(i) => {
                    let text = &spec[i + ",offset=".len()..];
                    let offset =
                        parse_offset(text).map_err(|errno| TransportError::FileOffset {
                            offset: text.to_string(),
                            errno,
                        })?;
                    Ok(MigrationUri::File {
                        path: PathBuf::from(&spec[..i]),
                        offset,
                    })
                }
            };
        }
        Err(TransportError::UnknownProtocol {
            uri: uri.to_string(),
        })
    }

    /// The scheme, as the URI starts: `"tcp"`, `"unix"`, `"exec"`, `"fd"`, `"file"`.
    pub fn scheme(&self) -> &'static str {
        match self {
            MigrationUri::Tcp(_) => "tcp",
            MigrationUri::Unix(_) => "unix",
            MigrationUri::Exec(_) => "exec",
            MigrationUri::Fd(_) => "fd",
            MigrationUri::File { .. } => "file",
        }
    }
}

impl std::str::FromStr for MigrationUri {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MigrationUri::parse(s)
    }
}

impl IncomingUri {
    /// Parses `-incoming`'s argument as QEMU 10's command line does: `defer`, a URI (a run of
    /// letters and a `:`), or else what QEMU would read as a channel specification.
    pub fn parse(arg: &str) -> Result<IncomingUri, TransportError> {
        if arg == "defer" {
            return Ok(IncomingUri::Defer);
        }
        let scheme_len = arg
            .bytes()
            .position(|b| !b.is_ascii_alphabetic())
            .unwrap_or(arg.len());
        if arg.as_bytes().get(scheme_len) == Some(&b':') {
            return MigrationUri::parse(arg).map(IncomingUri::Uri);
        }
        // QEMU reads anything else as a channel specification: JSON, or key=value with the
        // implied key `channel-type` (whose only value is "main").
        let first = arg.split(',').next().unwrap_or("");
        let spec = || TransportError::ChannelSpec {
            spec: arg.to_string(),
        };
        if arg.is_empty() {
            Err(TransportError::ChannelTypeMissing)
        } else if arg.starts_with('{') || first.contains('=') {
            if arg.contains("channel-type") {
                Err(spec())
            } else {
                Err(TransportError::ChannelTypeMissing)
            }
        } else if arg.contains(',') || first == "main" {
            Err(spec())
        } else {
            Err(TransportError::ChannelType {
                value: arg.to_string(),
            })
        }
    }
}

impl std::str::FromStr for IncomingUri {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        IncomingUri::parse(s)
    }
}

impl fmt::Display for MigrationUri {
    /// The URI in the syntax it was parsed from, normalised: IPv6 hosts in brackets, options
    /// spelled out (`ipv4=on`) in QEMU's order, `offset=` in bytes and only when not 0.
    /// Parsing the text gives the same value back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::Tcp(a) => write!(f, "tcp:{a}"),
            MigrationUri::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationUri::Exec(c) => write!(f, "exec:{c}"),
            MigrationUri::Fd(n) => write!(f, "fd:{n}"),
            MigrationUri::File { path, offset: 0 } => write!(f, "file:{}", path.display()),
            MigrationUri::File { path, offset } => {
                write!(f, "file:{},offset={offset}", path.display())
            }
        }
    }
}

impl fmt::Display for IncomingUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IncomingUri::Defer => f.write_str("defer"),
            IncomingUri::Uri(u) => u.fmt(f),
        }
    }
}

impl fmt::Display for InetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{}:{}", self.host, self.port)?;
        }
        if let Some(to) = self.to {
            write!(f, ",to={to}")?;
        }
        let on = |b: bool| if b { "on" } else { "off" };
        for (name, v) in [
            ("ipv4", self.ipv4),
            ("ipv6", self.ipv6),
            ("keep-alive", self.keep_alive),
            ("mptcp", self.mptcp),
        ] {
            if let Some(v) = v {
                write!(f, ",{name}={}", on(v))?;
            }
        }
        Ok(())
    }
}

/// How many leading bytes of `s` a `scanf` `%MAX[^stop]` conversion takes (kept on a char
/// boundary).
fn scan_set(s: &str, max: usize, stop: u8) -> usize {
    let mut n = s.bytes().take(max).take_while(|&b| b != stop).count();
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    n
}

/// QEMU's `inet_parse`: `HOST:PORT`, `:PORT` or `[V6]:PORT`, a host of at most 64 bytes and a
/// port of at most 32 (what is left of a longer port is read as options), then the options.
fn parse_inet(s: &str) -> Result<InetAddress, TransportError> {
    let (host, port, opts) = if let Some(rest) = s.strip_prefix(':') {
        let p = scan_set(rest, 32, b',');
        if p == 0 {
            return Err(TransportError::InetPort {
                input: s.to_string(),
            });
        }
        ("", &rest[..p], &rest[p..])
    } else if let Some(rest) = s.strip_prefix('[') {
        let h = scan_set(rest, 64, b']');
        let bad = || TransportError::InetIpv6 {
            input: s.to_string(),
        };
        let after = rest[h..].strip_prefix("]:").ok_or_else(bad)?;
        let p = scan_set(after, 32, b',');
        if h == 0 || p == 0 {
            return Err(bad());
        }
        (&rest[..h], &after[..p], &after[p..])
    } else {
        let h = scan_set(s, 64, b':');
        let bad = || TransportError::InetAddress {
            input: s.to_string(),
        };
        let after = s[h..].strip_prefix(':').ok_or_else(bad)?;
        let p = scan_set(after, 32, b',');
        if h == 0 || p == 0 {
            return Err(bad());
        }
        (&s[..h], &after[..p], &after[p..])
    };
    let mut a = InetAddress {
        host: host.to_string(),
        port: port.to_string(),
        ..InetAddress::default()
    };
    if let Some(i) = opts.find(",to=") {
        let v = &opts[i + 4..];
        match scan_c_int(v) {
            Some((to, used)) if matches!(v.as_bytes().get(used), None | Some(b',')) => {
                a.to = Some(to)
            }
            _ => return Err(TransportError::InetTo),
        }
    }
    let flags: [(&'static str, &mut Option<bool>); 4] = [
        ("ipv4", &mut a.ipv4),
        ("ipv6", &mut a.ipv6),
        ("keep-alive", &mut a.keep_alive),
        ("mptcp", &mut a.mptcp),
    ];
    for (name, slot) in flags {
        if let Some(i) = opts.find(&format!(",{name}")) {
            *slot = Some(parse_inet_flag(name, &opts[i + 1 + name.len()..])?);
        }
    }
    Ok(a)
}

/// QEMU's `inet_parse_flag`: what follows the flag's name up to the next comma must be
/// nothing, `=on` or `=off`; the message quotes everything after the name.
fn parse_inet_flag(name: &'static str, rest: &str) -> Result<bool, TransportError> {
    let bad = || TransportError::InetFlag {
        flag: name,
        value: rest.to_string(),
    };
    let value = match rest.find(',') {
        Some(e) if rest[e + 1..].starts_with(',') => return Err(bad()),
        Some(e) => &rest[..e],
        None => rest,
    };
    match value {
        "" | "=on" => Ok(true),
        "=off" => Ok(false),
        _ => Err(bad()),
    }
}

/// `scanf("%d%n")`: blanks, a sign, digits. Returns the value and the bytes used; `None` when
/// there are no digits or the value does not fit in an int.
fn scan_c_int(s: &str) -> Option<(i32, usize)> {
    let b = s.as_bytes();
    let mut i = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    let neg = match b.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let v: i64 = s[i..i + digits].parse().ok()?;
    let v = if neg { -v } else { v };
    Some((i32::try_from(v).ok()?, i + digits))
}

/// QEMU's `qemu_parse_fd`: `strtol` in base 10 over the whole string, 0..=INT_MAX.
fn parse_fd_number(s: &str) -> Option<RawFd> {
    let (v, used) = scan_c_int(s)?;
    (used == s.len() && v >= 0).then_some(v)
}

/// QEMU's `qemu_strtosz` for `offset=`: errno on failure (EINVAL, or ERANGE for a negative or
/// too large value).
fn parse_offset(s: &str) -> Result<u64, i32> {
    if s.trim_start().starts_with('-') {
        return Err(libc::ERANGE);
    }
    strtosz(s).map_err(|f| match f {
        SizeFault::Invalid => libc::EINVAL,
        SizeFault::Range => libc::ERANGE,
    })
}

// ================================================================ errors

/// Which way an I/O call went, and over what (for "Unable to write to socket").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
}

/// Every failure of a transport. `Display` is QEMU 10's message where QEMU has one.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    // --- parsing
    #[error("unknown migration protocol: {uri}")]
    UnknownProtocol { uri: String },
    #[error("the {scheme} migration transport is not supported by hostmem")]
    Unsupported { scheme: &'static str },
    #[error("error parsing address '{input}'")]
    InetAddress { input: String },
    #[error("error parsing port in address '{input}'")]
    InetPort { input: String },
    #[error("error parsing IPv6 address '{input}'")]
    InetIpv6 { input: String },
    #[error("error parsing to= argument")]
    InetTo,
    #[error("error parsing '{flag}' flag '{value}'")]
    InetFlag { flag: &'static str, value: String },
    #[error("invalid Unix socket address")]
    UnixEmpty,
    #[error("invalid file descriptor address")]
    FdEmpty,
    #[error("Invalid file descriptor number '{input}'")]
    FdNumber { input: String },
    #[error("file URI has bad offset {offset}: {}", strerror(*.errno))]
    FileOffset { offset: String, errno: i32 },
    #[error("Parameter 'channel-type' does not accept value '{value}'")]
    ChannelType { value: String },
    #[error("Parameter 'channel-type' is missing")]
    ChannelTypeMissing,
    /// QEMU 10 would parse this as a JSON or key=value channel; hostmem takes URIs only.
    #[error("'{spec}' is not a migration URI; hostmem's -incoming takes a URI or 'defer'")]
    ChannelSpec { spec: String },

    // --- setting up
    #[error("Cannot disable IPv4 and IPv6 at same time")]
    NoAddressFamily,
    #[error("address resolution failed for {host}:{port}: {reason}")]
    Resolve {
        host: String,
        port: String,
        reason: String,
    },
    /// `target` is `host:port` as written (no brackets) or the socket path.
    #[error("Failed to connect to '{target}': {}", strerror(*.errno))]
    Connect { target: String, errno: i32 },
    /// Every port of the range was taken (QEMU says this for a plain EADDRINUSE too).
    #[error("Failed to find an available port: {}", strerror(*.errno))]
    NoFreePort { errno: i32 },
    #[error("Failed to bind socket: {}", strerror(*.errno))]
    Bind { errno: i32 },
    #[error("Failed to bind socket to {}: {}", .path.display(), strerror(*.errno))]
    BindUnix { path: PathBuf, errno: i32 },
    #[error("Failed to listen on socket: {}", strerror(*.errno))]
    Listen { errno: i32 },
    /// Too long for `sun_path`; QEMU's hint: "Path must be less than 108 bytes".
    #[error("UNIX socket path '{}' is too long", .path.display())]
    UnixPathTooLong { path: PathBuf },
    #[error("Could not create '{}': {}", .path.display(), strerror(*.errno))]
    FileCreate { path: PathBuf, errno: i32 },
    #[error("Could not open '{}': {}", .path.display(), strerror(*.errno))]
    FileOpen { path: PathBuf, errno: i32 },
    #[error("failed to truncate migration file to offset {offset:x}: {}", strerror(*.errno))]
    Truncate { offset: u64, errno: i32 },
    /// glib's wording, which QEMU passes on.
    #[error("Failed to execute child process \u{201c}/bin/sh\u{201d} ({})", strerror(*.errno))]
    Spawn { errno: i32 },
    /// `fd:N` names a descriptor that is not open (hostmem's check; QEMU has none).
    #[error("file descriptor {fd} is not open: {}", strerror(*.errno))]
    FdNotOpen { fd: RawFd, errno: i32 },
    /// A host call failed; `context` is QEMU's words for it ("Unable to accept connection").
    #[error("{context}: {}", strerror(*.errno))]
    Os { context: String, errno: i32 },

    // --- transferring
    /// "Unable to write to socket: Broken pipe", "Unable to read from command: ...".
    #[error("Unable to {} {}: {}", io_verb(*.op), .noun, strerror(*.errno))]
    Io {
        op: IoOp,
        noun: &'static str,
        errno: i32,
    },
    /// [`Cancel::cancel`] was called. QEMU reports only the status `cancelled`.
    #[error("migration cancelled")]
    Cancelled,
    /// The `exec:` command failed after the stream (glib's wording for the status).
    #[error("exec: {command}: {}", describe_status(.status))]
    CommandFailed {
        command: String,
        status: ExitStatus,
        bytes: u64,
    },
    #[error("the {scheme}: migration channel is not seekable")]
    NotSeekable { scheme: &'static str },
    /// The codec writes mapped-ram offsets counted from where its stream starts; QEMU's are
    /// absolute, so with an offset they would disagree.
    #[error(
        "mapped-ram into file:{},offset={offset} is not supported: the saver writes file offsets \
         from 0",
        .path.display()
    )]
    MappedRamOffset { path: PathBuf, offset: u64 },
    #[error("{0}")]
    Usage(String),
}

fn io_verb(op: IoOp) -> &'static str {
    match op {
        IoOp::Read => "read from",
        IoOp::Write => "write to",
    }
}

/// The transport error an I/O error of a channel carries (or one that says what failed).
fn io_to_transport(e: io::Error) -> TransportError {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    match e.into_inner().map(|b| b.downcast::<TransportError>()) {
        Some(Ok(t)) => *t,
        Some(Err(other)) => TransportError::os(other.to_string(), libc::EIO),
        None => TransportError::os("I/O error", errno),
    }
}

/// glib's `g_spawn_check_wait_status` wording.
fn describe_status(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("Child process exited with code {code}"),
        (None, Some(sig)) => format!("Child process killed by signal {sig}"),
        _ => format!("Child process ended: {status}"),
    }
}

impl TransportError {
    /// The errno behind the failure, when there is one.
    pub fn errno(&self) -> Option<i32> {
        use TransportError::*;
        match self {
            FileOffset { errno, .. }
            | Connect { errno, .. }
            | NoFreePort { errno }
            | Bind { errno }
            | BindUnix { errno, .. }
            | Listen { errno }
            | FileCreate { errno, .. }
            | FileOpen { errno, .. }
            | Truncate { errno, .. }
            | Spawn { errno }
            | FdNotOpen { errno, .. }
            | Os { errno, .. }
            | Io { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// QEMU's hint line, where it prints one.
    pub fn hint(&self) -> Option<String> {
        match self {
            TransportError::UnixPathTooLong { .. } => {
                Some(format!("Path must be less than {SUN_PATH_LEN} bytes\n"))
            }
            _ => None,
        }
    }

    pub fn class(&self) -> HmErrorClass {
        use TransportError::*;
        match self {
            UnknownProtocol { .. }
            | InetAddress { .. }
            | InetPort { .. }
            | InetIpv6 { .. }
            | InetTo
            | InetFlag { .. }
            | UnixEmpty
            | FdEmpty
            | FdNumber { .. }
            | FileOffset { .. }
            | ChannelType { .. }
            | ChannelTypeMissing
            | ChannelSpec { .. }
            | NoAddressFamily
            | UnixPathTooLong { .. }
            | FdNotOpen { .. } => HmErrorClass::InvalidParameter,
            Unsupported { .. } | NotSeekable { .. } | MappedRamOffset { .. } => {
                HmErrorClass::Unsupported
            }
            FileOpen { errno, .. } if *errno == libc::ENOENT => HmErrorClass::NotFound,
            Cancelled | CommandFailed { .. } | Usage(_) | Resolve { .. } => HmErrorClass::Generic,
            _ => HmErrorClass::Host,
        }
    }

    /// Whether this is a cancellation.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, TransportError::Cancelled)
    }

    /// The transport error inside an I/O error a channel returned (the codec hands those back
    /// in [`super::MigrationError::Io`]).
    pub fn from_io(e: &io::Error) -> Option<&TransportError> {
        e.get_ref()?.downcast_ref::<TransportError>()
    }

    /// The transport error inside a codec error, if the codec failed because its channel did.
    pub fn from_migration(e: &super::MigrationError) -> Option<&TransportError> {
        match e {
            super::MigrationError::Io(io) => Self::from_io(io),
            _ => None,
        }
    }

    fn io_kind(&self) -> io::ErrorKind {
        match self {
            // Not Interrupted: std's write_all and read_exact retry those.
            TransportError::Cancelled => io::ErrorKind::Other,
            TransportError::NotSeekable { .. } | TransportError::MappedRamOffset { .. } => {
                io::ErrorKind::Unsupported
            }
            e => match e.errno() {
                Some(n) => io::Error::from_raw_os_error(n).kind(),
                None => io::ErrorKind::Other,
            },
        }
    }

    fn os(context: impl Into<String>, errno: i32) -> TransportError {
        TransportError::Os {
            context: context.into(),
            errno,
        }
    }
}

impl From<TransportError> for io::Error {
    fn from(e: TransportError) -> io::Error {
        io::Error::new(e.io_kind(), e)
    }
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Error {
        let mut out = Error::new(e.class(), e.to_string());
        if let Some(n) = e.errno() {
            out = out.with_errno(n);
        }
        if let Some(h) = e.hint() {
            out = out.with_hint(h);
        }
        out
    }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn cancelled() -> io::Error {
    TransportError::Cancelled.into()
}

// ================================================================ cancellation

/// Cancels a transfer from any thread: the [`OutgoingChannel`], [`Incoming::accept`] and
/// [`IncomingChannel`] it was given to, and any [`Cancel::sleep`] (the rate limiter's), return
/// [`TransportError::Cancelled`] at once. Sockets are shut down (the peer sees the connection
/// end, as with QEMU's `migrate_cancel`) and `exec:` commands get SIGTERM. Clones share one
/// state; a cancel is final.
#[derive(Clone)]
pub struct Cancel(Arc<CancelInner>);

struct CancelInner {
    cancelled: AtomicBool,
    /// An eventfd made readable by the cancel; every wait polls it. `None` if it could not be
    /// created, and then waits wake every 20 ms to look at `cancelled`.
    wake: Option<OwnedFd>,
    /// What to shut down or signal; weak, so a finished channel's descriptor closes at once.
    hooks: Mutex<Vec<Hook>>,
}

enum Hook {
    Socket(Weak<OwnedFd>),
    Child(Weak<ChildSlot>),
}

impl Hook {
    fn fire(&self) {
        match self {
            Hook::Socket(w) => {
                if let Some(fd) = w.upgrade() {
                    // SAFETY: `fd` is an open socket kept open by the Arc for the call;
                    // shutdown touches no memory of ours.
                    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
                }
            }
            Hook::Child(w) => {
                if let Some(c) = w.upgrade() {
                    c.signal(libc::SIGTERM);
                }
            }
        }
    }

    fn alive(&self) -> bool {
        match self {
            Hook::Socket(w) => w.strong_count() > 0,
            Hook::Child(w) => w.strong_count() > 0,
        }
    }
}

impl Cancel {
    pub fn new() -> Cancel {
        // SAFETY: eventfd takes two integers and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        // SAFETY: a non-negative return is a fresh descriptor nothing else owns.
        let wake = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
        Cancel(Arc::new(CancelInner {
            cancelled: AtomicBool::new(false),
            wake,
            hooks: Mutex::new(Vec::new()),
        }))
    }

    /// Cancels: wakes every wait, shuts sockets down, sends SIGTERM to commands.
    pub fn cancel(&self) {
        if self.0.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(w) = &self.0.wake {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            unsafe { libc::write(w.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
        for h in self.0.hooks.lock().unwrap().iter() {
            h.fire();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    fn register(&self, hook: Hook) {
        let mut hooks = self.0.hooks.lock().unwrap();
        hooks.retain(Hook::alive);
        if self.is_cancelled() {
            hook.fire();
        }
        hooks.push(hook);
    }

    fn check(&self) -> io::Result<()> {
        if self.is_cancelled() {
            Err(cancelled())
        } else {
            Ok(())
        }
    }

    /// Sleeps for `d`, or less if cancelled (then `Err(Cancelled)`).
    pub fn sleep(&self, d: Duration) -> io::Result<()> {
        match wait_fds(&[], Some(self), Some(d))? {
            None => Ok(()),
            Some(_) => unreachable!("no descriptors to be ready"),
        }
    }
}

impl Default for Cancel {
    fn default() -> Self {
        Cancel::new()
    }
}

impl fmt::Debug for Cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cancel")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

/// Waits until one of `fds` (descriptor, poll events) is ready (its index), `timeout` passes
/// (`None`) or `cancel` fires (`Err(Cancelled)`).
fn wait_fds(
    fds: &[(RawFd, libc::c_short)],
    cancel: Option<&Cancel>,
    timeout: Option<Duration>,
) -> io::Result<Option<usize>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    let wake = cancel.and_then(|c| c.0.wake.as_ref().map(|w| w.as_raw_fd()));
    if let Some(w) = wake {
        pfds.push(libc::pollfd {
            fd: w,
            events: libc::POLLIN,
            revents: 0,
        });
    }
    loop {
        if let Some(c) = cancel {
            c.check()?;
        }
        let mut ms: i32 = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                // Round up, so a wait never returns early.
                left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
            }
        };
        if cancel.is_some() && wake.is_none() && !(0..=20).contains(&ms) {
            ms = 20;
        }
        // SAFETY: `pfds` is a live, writable array of `pfds.len()` pollfd structs.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(io::Error::from_raw_os_error(e));
        }
        if let Some(c) = cancel {
            c.check()?;
        }
        if let Some(i) = pfds[..fds.len()].iter().position(|p| p.revents != 0) {
            return Ok(Some(i));
        }
    }
}

// ================================================================ descriptors

fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<libc::c_int> {
    // SAFETY: fcntl F_GETFL/F_SETFL on a descriptor we hold; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let new = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        if new != flags && libc::fcntl(fd, libc::F_SETFL, new) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(flags)
    }
}

fn is_socket(fd: RawFd) -> bool {
    int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE).is_ok()
}

fn is_fifo(fd: RawFd) -> bool {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, writable stat.
    unsafe { libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFIFO }
}

/// `writev(2)` to a pipe with SIGPIPE blocked for the call, and a SIGPIPE it raised consumed,
/// so a reader that went away gives EPIPE and never kills the process.
fn writev_pipe(fd: RawFd, iov: &[libc::iovec]) -> isize {
    // SAFETY: `iov` is valid for `iov.len()` entries; the caller vouches for what they point
    // at ([`RawIo::writev`]).
    without_sigpipe(|| unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) })
}

/// Runs `write` (one write call to a pipe) with SIGPIPE blocked, consuming a SIGPIPE it raised;
/// errno is `write`'s afterwards.
fn without_sigpipe(write: impl FnOnce() -> isize) -> isize {
    // SAFETY: every pointer is to a live local; the signal calls only change this thread's
    // mask and pending set.
    unsafe {
        let mut pipe_set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut pipe_set);
        libc::sigaddset(&mut pipe_set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &pipe_set, &mut old);
        libc::sigpending(&mut pending);
        let was_pending = libc::sigismember(&pending, libc::SIGPIPE) == 1;
        let n = write();
        let e = *libc::__errno_location();
        if n < 0 && e == libc::EPIPE && !was_pending {
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            while libc::sigtimedwait(&pipe_set, std::ptr::null_mut(), &zero) < 0
                && *libc::__errno_location() == libc::EINTR
            {}
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        *libc::__errno_location() = e;
        n
    }
}

/// What a channel's descriptor is, which decides the calls it is read and written with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FdKind {
    /// `send`/`recv` with MSG_DONTWAIT (and MSG_NOSIGNAL), polled.
    Socket,
    /// O_NONBLOCK `read`/`write`, polled; writes with SIGPIPE blocked.
    Pipe,
    /// Plain blocking `read`/`write` (regular files never block for long).
    File,
}

/// One descriptor of a channel, with the noun QEMU's messages use for it.
struct RawIo {
    fd: Arc<OwnedFd>,
    kind: FdKind,
    noun: &'static str,
    cancel: Option<Cancel>,
    /// The file status flags to put back (a descriptor handed over with `fd:` that was made
    /// non-blocking here).
    restore_flags: Option<libc::c_int>,
}

impl RawIo {
    fn new(fd: OwnedFd, kind: FdKind, noun: &'static str) -> RawIo {
        RawIo {
            fd: Arc::new(fd),
            kind,
            noun,
            cancel: None,
            restore_flags: None,
        }
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Gives the channel its canceller; a socket is then shut down by a cancel.
    fn attach(&mut self, cancel: &Cancel) {
        if self.kind == FdKind::Socket {
            cancel.register(Hook::Socket(Arc::downgrade(&self.fd)));
        }
        self.cancel = Some(cancel.clone());
    }

    fn fail(&self, op: IoOp, errno: i32) -> io::Error {
        // A socket we shut down ourselves fails with EPIPE or reads EOF; say why.
        if self.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
            return cancelled();
        }
        TransportError::Io {
            op,
            noun: self.noun,
            errno,
        }
        .into()
    }

    fn wait(&self, events: libc::c_short) -> io::Result<()> {
        wait_fds(&[(self.raw(), events)], self.cancel.as_ref(), None).map(|_| ())
    }

    fn check(&self) -> io::Result<()> {
        match &self.cancel {
            Some(c) => c.check(),
            None => Ok(()),
        }
    }

    /// One write of `buf`: a gathering write of one piece.
    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            self.check()?;
            return Ok(0);
        }
        let iov = [libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }];
        // SAFETY: the one entry points at `buf`, readable for its length during the call.
        unsafe { self.writev(&iov) }
    }

    fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.write(buf)?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// One gathering write of `iov` (at most `IOV_MAX` entries), as [`Self::write`]: waits
    /// while a socket or pipe is full, fails on a cancel. Returns the bytes written.
    ///
    /// # Safety
    /// Every entry must point at `iov_len` readable bytes for the call.
    unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        loop {
            self.check()?;
            let n = match self.kind {
                FdKind::Socket => {
                    // SAFETY: an all-zero msghdr is a valid empty one.
                    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
                    msg.msg_iovlen = iov.len();
                    // SAFETY: `msg` names only `iov`, whose entries the caller vouches for.
                    unsafe {
                        libc::sendmsg(self.raw(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                    }
                }
                FdKind::Pipe => writev_pipe(self.raw(), iov),
                // SAFETY: as for the socket.
                FdKind::File => unsafe {
                    libc::writev(self.raw(), iov.as_ptr(), iov.len() as libc::c_int)
                },
            };
            if n > 0 {
                return Ok(n as usize);
            }
            let e = if n == 0 { libc::EIO } else { errno() };
            match e {
                libc::EINTR => continue,
                libc::EAGAIN => self.wait(libc::POLLOUT)?,
                e => return Err(self.fail(IoOp::Write, e)),
            }
        }
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.check()?;
            let n = match self.kind {
                // SAFETY: `buf` is valid and writable for `buf.len()` bytes for the call.
                FdKind::Socket => unsafe {
                    libc::recv(
                        self.raw(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                },
                // SAFETY: as above.
                FdKind::Pipe | FdKind::File => unsafe {
                    libc::read(self.raw(), buf.as_mut_ptr().cast(), buf.len())
                },
            };
            if n >= 0 {
                if n == 0 && !buf.is_empty() {
                    // EOF: a cancel that shut the socket down is the reason.
                    self.check()?;
                }
                return Ok(n as usize);
            }
            match errno() {
                libc::EINTR => continue,
                libc::EAGAIN => self.wait(libc::POLLIN)?,
                e => return Err(self.fail(IoOp::Read, e)),
            }
        }
    }

    fn seek(&self, pos: SeekFrom) -> io::Result<u64> {
        let (off, whence) = match pos {
            SeekFrom::Start(n) => (n as i64, libc::SEEK_SET),
            SeekFrom::Current(n) => (n, libc::SEEK_CUR),
            SeekFrom::End(n) => (n, libc::SEEK_END),
        };
        // SAFETY: lseek on a descriptor we hold; no memory is passed.
        let r = unsafe { libc::lseek(self.raw(), off, whence) };
        if r < 0 {
            let e = errno();
            return Err(TransportError::os(
                format!("Unable to seek to offset {off} whence {whence} in file"),
                e,
            )
            .into());
        }
        Ok(r as u64)
    }
}

impl Drop for RawIo {
    fn drop(&mut self) {
        if let Some(flags) = self.restore_flags {
            // SAFETY: F_SETFL on a descriptor we still hold, with the flags it had.
            unsafe { libc::fcntl(self.raw(), libc::F_SETFL, flags) };
        }
    }
}

/// The reading half of an incoming channel, counting bytes.
struct Reader {
    io: RawIo,
    bytes: u64,
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.io.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

impl Seek for Reader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.io.seek(pos)
    }
}

/// Takes over descriptor `fd` of an `fd:` URI.
fn adopt_fd(fd: RawFd) -> Result<(RawIo, Vec<String>), TransportError> {
    // SAFETY: F_GETFD only reads the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(TransportError::FdNotOpen { fd, errno: errno() });
    }
    // SAFETY: `fd` is open (just checked), and the fd: URI is the caller handing it over:
    // from here on the channel owns it and closes it, as QEMU does with a descriptor it is
    // given for migration.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: FD_CLOEXEC on a descriptor we now own; no memory is passed.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if is_socket(fd) {
        return Ok((RawIo::new(owned, FdKind::Socket, "socket"), Vec::new()));
    }
    if is_fifo(fd) {
        let flags = set_nonblocking(fd, true).map_err(|e| {
            TransportError::os(
                "Failed to set FD nonblocking",
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        })?;
        let mut io = RawIo::new(owned, FdKind::Pipe, "file");
        io.restore_flags = Some(flags);
        return Ok((io, Vec::new()));
    }
    Ok((
        RawIo::new(owned, FdKind::File, "file"),
        vec!["warning: fd: migration to a file is deprecated. Use file: instead.".to_string()],
    ))
}

// ================================================================ sockets

/// An address a socket is bound or connected to, printed as QEMU's `socket_uri` prints the
/// `socket address` lines of `info migrate` (`tcp:0.0.0.0:4444`, `tcp::::4444` for `::`,
/// without brackets, as QEMU writes it; `unix:/path`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SocketAddress {
    Inet { host: String, port: u16 },
    Unix(PathBuf),
}

impl SocketAddress {
    pub fn port(&self) -> Option<u16> {
        match self {
            SocketAddress::Inet { port, .. } => Some(*port),
            SocketAddress::Unix(_) => None,
        }
    }

    /// A `tcp:`/`unix:` URI that connects to this address (IPv6 in brackets; an unspecified
    /// host becomes loopback of the same family).
    pub fn connect_uri(&self) -> MigrationUri {
        match self {
            SocketAddress::Inet { host, port } => {
                let host = match host.as_str() {
                    "0.0.0.0" => "127.0.0.1",
                    "::" => "::1",
                    h => h,
                };
                MigrationUri::Tcp(InetAddress {
                    host: host.to_string(),
                    port: port.to_string(),
                    ..InetAddress::default()
                })
            }
            SocketAddress::Unix(p) => MigrationUri::Unix(p.clone()),
        }
    }
}

impl fmt::Display for SocketAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketAddress::Inet { host, port } => write!(f, "tcp:{host}:{port}"),
            SocketAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A socket address as the kernel takes it.
#[derive(Clone, Copy)]
struct SockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl SockAddr {
    fn family(&self) -> libc::c_int {
        self.storage.ss_family as libc::c_int
    }

    fn ptr(&self) -> *const libc::sockaddr {
        (&self.storage as *const libc::sockaddr_storage).cast()
    }

    fn port(&self) -> u16 {
        let p = self.ptr();
        // SAFETY: the family says which sockaddr type the storage holds; sockaddr_storage is
        // large and aligned enough for either.
        unsafe {
            match self.family() {
                libc::AF_INET => u16::from_be((*p.cast::<libc::sockaddr_in>()).sin_port),
                libc::AF_INET6 => u16::from_be((*p.cast::<libc::sockaddr_in6>()).sin6_port),
                _ => 0,
            }
        }
    }

    fn set_port(&mut self, port: u16) {
        let p = (&mut self.storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
        // SAFETY: as in `port`, writing the port field of the type the family names.
        unsafe {
            match self.family() {
                libc::AF_INET => (*p.cast::<libc::sockaddr_in>()).sin_port = port.to_be(),
                libc::AF_INET6 => (*p.cast::<libc::sockaddr_in6>()).sin6_port = port.to_be(),
                _ => {}
            }
        }
    }

    /// The numeric host, as `getnameinfo(NI_NUMERICHOST)` gives it.
    fn host(&self) -> String {
        let mut host = [0 as libc::c_char; 64];
        // SAFETY: `host` is a live buffer of the length passed; the service buffer is absent.
        let rc = unsafe {
            libc::getnameinfo(
                self.ptr(),
                self.len,
                host.as_mut_ptr(),
                host.len() as libc::socklen_t,
                std::ptr::null_mut(),
                0,
                libc::NI_NUMERICHOST,
            )
        };
        if rc != 0 {
            return String::new();
        }
        // SAFETY: getnameinfo wrote a NUL-terminated string into `host`.
        unsafe { CStr::from_ptr(host.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    fn of_socket(fd: RawFd, peer: bool) -> Option<SockAddr> {
        // SAFETY: an all-zero sockaddr_storage is valid.
        let mut a: SockAddr = unsafe { std::mem::zeroed() };
        a.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let p = (&mut a.storage as *mut libc::sockaddr_storage).cast();
        // SAFETY: `p` and `a.len` describe our live storage.
        let rc = unsafe {
            if peer {
                libc::getpeername(fd, p, &mut a.len)
            } else {
                libc::getsockname(fd, p, &mut a.len)
            }
        };
        (rc == 0).then_some(a)
    }

    fn to_socket_address(self) -> SocketAddress {
        if self.family() == libc::AF_UNIX {
            let p = self.ptr().cast::<libc::sockaddr_un>();
            // SAFETY: the family is AF_UNIX, so the storage holds a sockaddr_un.
            let path = unsafe { &(*p).sun_path };
            let n = (self.len as usize)
                .saturating_sub(std::mem::size_of::<libc::sa_family_t>())
                .min(path.len());
            let bytes: Vec<u8> = path[..n]
                .iter()
                .map(|&c| c as u8)
                .take_while(|&c| c != 0)
                .collect();
            return SocketAddress::Unix(PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)));
        }
        SocketAddress::Inet {
            host: self.host(),
            port: self.port(),
        }
    }
}

/// A `getaddrinfo` result list.
struct AddrInfo(*mut libc::addrinfo);

impl AddrInfo {
    /// `getaddrinfo`; an empty host or port is passed as NULL (QEMU's passive lookups).
    fn lookup(
        host: &str,
        port: &str,
        flags: libc::c_int,
        family: libc::c_int,
        empty_is_null: bool,
    ) -> Result<AddrInfo, TransportError> {
        let resolve_err = |reason: String| TransportError::Resolve {
            host: host.to_string(),
            port: port.to_string(),
            reason,
        };
        let c = |s: &str| CString::new(s).map_err(|_| resolve_err("invalid name".into()));
        let (h, p) = (c(host)?, c(port)?);
        // SAFETY: an all-zero addrinfo is the documented way to start hints.
        let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
        hints.ai_flags = flags;
        hints.ai_family = family;
        hints.ai_socktype = libc::SOCK_STREAM;
        let ptr = |s: &CString| {
            if empty_is_null && s.as_bytes().is_empty() {
                std::ptr::null()
            } else {
                s.as_ptr()
            }
        };
        let mut res = std::ptr::null_mut();
        // SAFETY: the strings and hints live across the call; `res` receives a list we free.
        let rc = unsafe { libc::getaddrinfo(ptr(&h), ptr(&p), &hints, &mut res) };
        if rc != 0 {
            // SAFETY: gai_strerror returns a static NUL-terminated string.
            let reason = unsafe { CStr::from_ptr(libc::gai_strerror(rc)) };
            return Err(resolve_err(reason.to_string_lossy().into_owned()));
        }
        Ok(AddrInfo(res))
    }

    /// (family, protocol, address) of each result, in order.
    fn entries(&self) -> Vec<(libc::c_int, libc::c_int, SockAddr)> {
        let mut out = Vec::new();
        let mut e = self.0;
        while !e.is_null() {
            // SAFETY: `e` walks the list getaddrinfo returned, which lives until drop; each
            // ai_addr holds ai_addrlen bytes, at most a sockaddr_storage.
            unsafe {
                let ai = &*e;
                // SAFETY (zeroed): an all-zero sockaddr_storage is valid.
                let mut a: SockAddr = std::mem::zeroed();
                let len =
                    (ai.ai_addrlen as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
                std::ptr::copy_nonoverlapping(
                    ai.ai_addr.cast::<u8>(),
                    (&mut a.storage as *mut libc::sockaddr_storage).cast::<u8>(),
                    len,
                );
                a.len = len as libc::socklen_t;
                out.push((ai.ai_family, ai.ai_protocol, a));
                e = ai.ai_next;
            }
        }
        out
    }
}

impl Drop for AddrInfo {
    fn drop(&mut self) {
        // SAFETY: the list came from getaddrinfo and is freed once.
        unsafe { libc::freeaddrinfo(self.0) };
    }
}

/// QEMU's `inet_ai_family_from_address`.
fn inet_family(a: &InetAddress) -> Result<libc::c_int, TransportError> {
    match (a.ipv4, a.ipv6) {
        (Some(false), Some(false)) => Err(TransportError::NoAddressFamily),
        (Some(true), Some(true)) if a.host.is_empty() => Ok(libc::AF_INET6),
        (Some(true), Some(true)) => Ok(libc::AF_UNSPEC),
        (_, Some(true)) | (Some(false), _) => Ok(libc::AF_INET6),
        (Some(true), _) | (_, Some(false)) => Ok(libc::AF_INET),
        (None, None) => Ok(libc::AF_UNSPEC),
    }
}

fn new_socket(family: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket takes integers and returns a new descriptor or -1.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An integer socket option; the errno of a failure.
fn int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int) -> Result<libc::c_int, i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are live locals of the sizes getsockopt is told.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(errno())
    }
}

fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> i32 {
    // SAFETY: `v` is a live c_int and its size is passed.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    }
}

/// A non-blocking connect, waited for with the canceller; the errno of a failure.
fn connect_fd(fd: RawFd, addr: &SockAddr, cancel: &Cancel) -> Result<(), i32> {
    loop {
        // SAFETY: `addr` holds `addr.len` valid bytes of a sockaddr.
        let rc = unsafe { libc::connect(fd, addr.ptr(), addr.len) };
        if rc == 0 {
            return Ok(());
        }
        match errno() {
            libc::EINTR => continue,
            libc::EINPROGRESS => break,
            e => return Err(e),
        }
    }
    match wait_fds(&[(fd, libc::POLLOUT)], Some(cancel), None) {
        Ok(_) => {}
        Err(_) => return Err(libc::ECANCELED),
    }
    match int_opt(fd, libc::SOL_SOCKET, libc::SO_ERROR) {
        Ok(0) => Ok(()),
        Ok(e) => Err(e),
        Err(e) => Err(e),
    }
}

/// QEMU's `inet_connect_saddr`: every address in turn; the last failure is reported.
fn inet_connect(a: &InetAddress, cancel: &Cancel) -> Result<OwnedFd, TransportError> {
    let family = inet_family(a)?;
    let flags = libc::AI_CANONNAME | libc::AI_ADDRCONFIG | libc::AI_V4MAPPED;
    let list = AddrInfo::lookup(&a.host, &a.port, flags, family, false)?;
    let protocol = |p| {
        if a.mptcp == Some(true) {
            libc::IPPROTO_MPTCP
        } else {
            p
        }
    };
    let mut last = TransportError::Resolve {
        host: a.host.clone(),
        port: a.port.clone(),
        reason: "no address".into(),
    };
    for (fam, proto, addr) in list.entries() {
        let fd = match new_socket(fam, protocol(proto)) {
            Ok(fd) => fd,
            Err(e) => {
                last = TransportError::os(
                    format!("Failed to create socket family {fam}"),
                    e.raw_os_error().unwrap_or(libc::EIO),
                );
                continue;
            }
        };
        match connect_fd(fd.as_raw_fd(), &addr, cancel) {
            Ok(()) => {
                if a.keep_alive == Some(true)
                    && set_int_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1) < 0
                {
                    return Err(TransportError::os("Unable to set KEEPALIVE", errno()));
                }
                return Ok(fd);
            }
            Err(libc::ECANCELED) if cancel.is_cancelled() => return Err(TransportError::Cancelled),
            Err(errno) => {
                last = TransportError::Connect {
                    target: format!("{}:{}", a.host, a.port),
                    errno,
                }
            }
        }
    }
    Err(last)
}

/// A `sockaddr_un` for `path`, as QEMU fills it (all of `sun_path` may be used).
fn unix_addr(path: &Path) -> Result<SockAddr, TransportError> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() > SUN_PATH_LEN {
        return Err(TransportError::UnixPathTooLong {
            path: path.to_path_buf(),
        });
    }
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut a: SockAddr = unsafe { std::mem::zeroed() };
    let un = (&mut a.storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_un>();
    // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_un, and `bytes`
    // fits in sun_path (checked above).
    unsafe {
        (*un).sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, &s) in (*un).sun_path.iter_mut().zip(bytes) {
            *d = s as libc::c_char;
        }
    }
    a.len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    Ok(a)
}

/// The send buffer asked for on an outgoing unix socket. The default (about 208 KiB) fills
/// in well under a millisecond of a save, and every time it does the migration thread sleeps
/// until the reader has drained it; with the reader on the same two cores as the sender's two
/// threads that hand-over cost a 4 GiB save over a unix socket a quarter of its time (0.73 s
/// against 0.55 s, medians of 5 in two runs back to back). TCP keeps the kernel's
/// auto-tuning, which a fixed size would switch off.
const UNIX_SEND_BUFFER: libc::c_int = 4 << 20;

fn unix_connect(path: &Path, cancel: &Cancel) -> Result<OwnedFd, TransportError> {
    let fd = new_socket(libc::AF_UNIX, 0).map_err(|e| {
        TransportError::os(
            "Failed to create socket",
            e.raw_os_error().unwrap_or(libc::EIO),
        )
    })?;
    let addr = unix_addr(path)?;
    // Best effort, a smaller buffer only costs speed: a privileged VMM gets the size whatever
    // net.core.wmem_max says (often 208 KiB), another one at most that.
    let raw = fd.as_raw_fd();
    if set_int_opt(
        raw,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        UNIX_SEND_BUFFER,
    ) < 0
    {
        set_int_opt(raw, libc::SOL_SOCKET, libc::SO_SNDBUF, UNIX_SEND_BUFFER);
    }
    match connect_fd(fd.as_raw_fd(), &addr, cancel) {
        Ok(()) => Ok(fd),
        Err(libc::ECANCELED) if cancel.is_cancelled() => Err(TransportError::Cancelled),
        Err(errno) => Err(TransportError::Connect {
            target: path.display().to_string(),
            errno,
        }),
    }
}

/// QEMU's `inet_listen_saddr` for one resolved address: each port of the range, SO_REUSEADDR,
/// IPv6 sockets dual-stack unless a family was asked for (retried v6-only when the IPv4 port
/// is taken), a backlog of 1.
fn inet_listen_one(
    a: &InetAddress,
    family: libc::c_int,
    protocol: libc::c_int,
    mut addr: SockAddr,
) -> Result<OwnedFd, TransportError> {
    let port_min = i32::from(addr.port());
    // QEMU would go on past 65535 (its ports wrap); there is nothing there to find.
    let port_max = a.to.unwrap_or(port_min).min(65535);
    let v6only = match (a.ipv4, a.ipv6) {
        (None, None) | (Some(true), Some(true)) => 0,
        _ => 1,
    };
    let mut socket_created = false;
    let mut last_errno = libc::EADDRINUSE;
    for p in port_min..=port_max {
        addr.set_port(p as u16);
        let fd = match new_socket(family, protocol) {
            Ok(fd) => fd,
            Err(e) if p == port_min => {
                last_errno = e.raw_os_error().unwrap_or(libc::EIO);
                continue;
            }
            Err(e) => {
                return Err(TransportError::os(
                    "Failed to recreate failed listening socket",
                    e.raw_os_error().unwrap_or(libc::EIO),
                ))
            }
        };
        socket_created = true;
        let raw = fd.as_raw_fd();
        set_int_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        let bind = |v6only| {
            if family == libc::AF_INET6 {
                set_int_opt(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v6only);
            }
            // SAFETY: `addr` holds `addr.len` valid bytes of a sockaddr.
            if unsafe { libc::bind(raw, addr.ptr(), addr.len) } == 0 {
                0
            } else {
                errno()
            }
        };
        let mut e = bind(v6only);
        if e == libc::EADDRINUSE && family == libc::AF_INET6 && v6only == 0 {
            e = bind(1);
        }
        if e == 0 {
            // SAFETY: listen on our socket; no memory is passed.
            if unsafe { libc::listen(raw, 1) } == 0 {
                return Ok(fd);
            }
            e = errno();
            if e != libc::EADDRINUSE {
                return Err(TransportError::Listen { errno: e });
            }
        } else if e != libc::EADDRINUSE {
            return Err(TransportError::Bind { errno: e });
        }
        last_errno = e;
    }
    Err(if socket_created {
        TransportError::NoFreePort { errno: last_errno }
    } else {
        TransportError::os("Failed to create a socket", last_errno)
    })
}

/// QEMU's `qio_net_listener_open_sync` over `tcp:`: a listener on every address the host
/// resolves to (passively); it fails only if all fail, with the first failure.
fn inet_listen(a: &InetAddress) -> Result<Vec<OwnedFd>, TransportError> {
    let family = inet_family(a)?;
    let list = AddrInfo::lookup(&a.host, &a.port, libc::AI_PASSIVE, family, true)?;
    let protocol = |p| {
        if a.mptcp == Some(true) {
            libc::IPPROTO_MPTCP
        } else {
            p
        }
    };
    let mut socks = Vec::new();
    let mut first_err = None;
    for (fam, proto, addr) in list.entries() {
        match inet_listen_one(a, fam, protocol(proto), addr) {
            Ok(fd) => socks.push(fd),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if socks.is_empty() {
        return Err(first_err.unwrap_or(TransportError::os(
            "Failed to create a socket",
            libc::EADDRNOTAVAIL,
        )));
    }
    Ok(socks)
}

/// QEMU's `unix_listen_saddr`: whatever is at `path` is unlinked first, then bind and listen.
fn unix_listen(path: &Path) -> Result<OwnedFd, TransportError> {
    let fd = new_socket(libc::AF_UNIX, 0).map_err(|e| {
        TransportError::os(
            "Failed to create Unix socket",
            e.raw_os_error().unwrap_or(libc::EIO),
        )
    })?;
    let addr = unix_addr(path)?;
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            return Err(TransportError::os(
                format!("Failed to unlink socket {}", path.display()),
                e.raw_os_error().unwrap_or(libc::EIO),
            ));
        }
    }
    // SAFETY: `addr` holds `addr.len` valid bytes of a sockaddr_un.
    if unsafe { libc::bind(fd.as_raw_fd(), addr.ptr(), addr.len) } < 0 {
        return Err(TransportError::BindUnix {
            path: path.to_path_buf(),
            errno: errno(),
        });
    }
    // SAFETY: listen on our socket; no memory is passed.
    if unsafe { libc::listen(fd.as_raw_fd(), 1) } < 0 {
        return Err(TransportError::Listen { errno: errno() });
    }
    Ok(fd)
}

// ================================================================ exec: children

/// An `exec:` child. The cancel hook and the channel share it; reaping happens under the lock,
/// so a signal never reaches a recycled pid.
struct ChildSlot {
    state: Mutex<ChildState>,
}

enum ChildState {
    Running(Child),
    Exited(ExitStatus),
}

impl ChildSlot {
    fn signal(&self, sig: libc::c_int) {
        if let ChildState::Running(c) = &*self.state.lock().unwrap() {
            // SAFETY: the child is not reaped (we hold the lock that reaping takes), so its
            // pid is still ours.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }

    fn try_reap(&self) -> io::Result<Option<ExitStatus>> {
        let mut st = self.state.lock().unwrap();
        match &mut *st {
            ChildState::Exited(s) => Ok(Some(*s)),
            ChildState::Running(c) => match c.try_wait()? {
                Some(s) => {
                    *st = ChildState::Exited(s);
                    Ok(Some(s))
                }
                None => Ok(None),
            },
        }
    }

    /// Waits for the child; a cancel sends it away (QEMU's abort) and returns `Cancelled`.
    fn wait(&self, cancel: Option<&Cancel>) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.try_reap()? {
                return Ok(s);
            }
            let slept = match cancel {
                Some(c) => c.sleep(Duration::from_millis(5)),
                None => {
                    std::thread::sleep(Duration::from_millis(5));
                    Ok(())
                }
            };
            if slept.is_err() {
                self.abort();
                return Err(cancelled());
            }
        }
    }

    /// QEMU's `qio_channel_command_abort`: SIGTERM, a moment, SIGKILL, then reap.
    fn abort(&self) {
        for sig in [libc::SIGTERM, libc::SIGKILL] {
            for _ in 0..10 {
                if !matches!(self.try_reap(), Ok(None)) {
                    return;
                }
                if sig == libc::SIGTERM {
                    self.signal(sig);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if sig == libc::SIGKILL {
                self.signal(sig);
            }
        }
        let mut st = self.state.lock().unwrap();
        if let ChildState::Running(c) = &mut *st {
            if let Ok(s) = c.wait() {
                *st = ChildState::Exited(s);
            }
        }
    }
}

/// `/bin/sh -c CMD` with the stream on its stdin (`outgoing`) or its stdout.
fn spawn_shell(command: &str, outgoing: bool) -> Result<(Arc<ChildSlot>, RawIo), TransportError> {
    let mut cmd = Command::new(SHELL);
    cmd.arg("-c").arg(command).stderr(Stdio::inherit());
    if outgoing {
        cmd.stdin(Stdio::piped()).stdout(Stdio::null());
    } else {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    }
    // SAFETY: the hook runs in the child between fork and exec and only makes one raw
    // syscall, which is async-signal-safe; it marks the descriptors the VMM may have left
    // inheritable close-on-exec (glib's spawn closes them), stdio stays.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| TransportError::Spawn {
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    })?;
    let fd: OwnedFd = if outgoing {
        child.stdin.take().expect("piped stdin").into()
    } else {
        child.stdout.take().expect("piped stdout").into()
    };
    let slot = Arc::new(ChildSlot {
        state: Mutex::new(ChildState::Running(child)),
    });
    if let Err(e) = set_nonblocking(fd.as_raw_fd(), true) {
        slot.abort();
        return Err(TransportError::os(
            "Failed to set FD nonblocking",
            e.raw_os_error().unwrap_or(libc::EIO),
        ));
    }
    Ok((slot, RawIo::new(fd, FdKind::Pipe, "command")))
}

// ================================================================ outgoing

/// How a channel ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finished {
    /// Bytes that went through the channel.
    pub bytes: u64,
    /// The `exec:` command's status.
    pub exit_status: Option<ExitStatus>,
}

/// How an outgoing channel writes: what the migration parameters say about it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelOptions {
    /// `direct-io`: a `file:` channel writes whole pages with O_DIRECT through a
    /// [`DirectFile`], on any filesystem that takes it (others silently get the page cache).
    /// QEMU 10 honours it only with multifd and mapped-ram; hostmem for every `file:` stream.
    /// The other schemes ignore it, as QEMU does.
    pub direct_io: bool,
}

/// The sending end of a migration: connected (or opened, or spawned) per its URI, buffered
/// like QEMU's `QEMUFile` (32 KiB), counting bytes. Dropping it abandons the stream: nothing
/// buffered is written, an `exec:` command is terminated. [`Self::finish`] ends it cleanly.
pub struct OutgoingChannel {
    uri: MigrationUri,
    io: Option<RawIo>,
    /// `direct-io` on a `file:`: every byte goes through this instead of `buf` and `io`'s own
    /// writes (which would land at the descriptor's position, not the stream's).
    direct: Option<DirectFile>,
    buf: Vec<u8>,
    /// What the next write sends, in order, once bytes the channel does not own are queued
    /// ([`StreamWrite::write_unowned`]): ranges of `buf` and those bytes. Empty while only
    /// `buf` is queued.
    queue: Vec<Queued>,
    bytes: u64,
    child: Option<Arc<ChildSlot>>,
    warnings: Vec<String>,
    /// A `file:` stream written over the file's old bytes (see [`open_outgoing_file`]): the
    /// file is cut where the stream's bytes end once that is known — when the stream finishes,
    /// is abandoned, or first seeks (mapped-ram, whose holes must read as zero).
    cut_at_end: bool,
}

/// One piece of a gathering write.
#[derive(Clone, Copy, Debug)]
enum Queued {
    /// `buf[start..start + len]`.
    Owned { start: usize, len: usize },
    /// Bytes at an address the writer promised stay mapped until the next flush (an address,
    /// not a pointer, so that the channel stays `Send`).
    Unowned { addr: usize, len: usize },
}

/// Pieces per gathering write: Linux's `IOV_MAX`.
const MAX_IOV: usize = 1024;

impl OutgoingChannel {
    /// Connects to a `tcp:`/`unix:` destination, spawns an `exec:` command, creates a `file:`
    /// or takes over an `fd:`. `cancel` also interrupts the connect.
    pub fn connect(uri: &MigrationUri, cancel: &Cancel) -> Result<OutgoingChannel, TransportError> {
        Self::connect_with(uri, cancel, &ChannelOptions::default())
    }

    /// [`Self::connect`], writing as `options` say.
    pub fn connect_with(
        uri: &MigrationUri,
        cancel: &Cancel,
        options: &ChannelOptions,
    ) -> Result<OutgoingChannel, TransportError> {
        if cancel.is_cancelled() {
            return Err(TransportError::Cancelled);
        }
        let mut child = None;
        let mut warnings = Vec::new();
        let mut direct = None;
        let mut cut_at_end = false;
        let mut io = match uri {
            MigrationUri::Tcp(a) => RawIo::new(inet_connect(a, cancel)?, FdKind::Socket, "socket"),
            MigrationUri::Unix(p) => RawIo::new(unix_connect(p, cancel)?, FdKind::Socket, "socket"),
            MigrationUri::Exec(c) => {
                let (slot, io) = spawn_shell(c, true)?;
                cancel.register(Hook::Child(Arc::downgrade(&slot)));
                child = Some(slot);
                io
            }
            MigrationUri::Fd(n) => {
                let (io, w) = adopt_fd(*n)?;
                warnings = w;
                io
            }
            MigrationUri::File { path, offset } => {
                // The direct-io writer stages bytes the descriptor's position does not see,
                // so its file is cut up front, as QEMU cuts every one.
                let (io, over) = open_outgoing_file(path, *offset, !options.direct_io)?;
                cut_at_end = over;
                if options.direct_io {
                    direct = Some(open_direct_writer(&io, path, *offset)?);
                }
                io
            }
        };
        io.attach(cancel);
        Ok(OutgoingChannel {
            uri: uri.clone(),
            io: Some(io),
            direct,
            buf: Vec::with_capacity(OUT_BUF),
            queue: Vec::new(),
            bytes: 0,
            child,
            warnings,
            cut_at_end,
        })
    }

    pub fn uri(&self) -> &MigrationUri {
        &self.uri
    }

    /// Bytes accepted so far (QEMU's `transferred`), buffered ones included.
    pub fn transferred(&self) -> u64 {
        self.bytes
    }

    /// Lines QEMU prints as warnings for this channel (`fd:` of a regular file).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The local address of a socket channel.
    pub fn local_address(&self) -> Option<SocketAddress> {
        let io = self.io.as_ref()?;
        (io.kind == FdKind::Socket)
            .then(|| SockAddr::of_socket(io.raw(), false))
            .flatten()
            .map(SockAddr::to_socket_address)
    }

    /// The peer of a socket channel.
    pub fn peer_address(&self) -> Option<SocketAddress> {
        let io = self.io.as_ref()?;
        (io.kind == FdKind::Socket)
            .then(|| SockAddr::of_socket(io.raw(), true))
            .flatten()
            .map(SockAddr::to_socket_address)
    }

    fn io(&self) -> io::Result<&RawIo> {
        self.io.as_ref().ok_or_else(|| {
            TransportError::Usage("migration channel already finished".into()).into()
        })
    }

    /// What the `direct-io` writer sent each way, if this channel has one.
    pub fn direct_stats(&self) -> Option<DirectStats> {
        self.direct.as_ref().map(DirectFile::stats)
    }

    /// A write error of the `direct-io` writer, in the words of the buffered path's.
    fn direct_failed(&self, e: io::Error) -> io::Error {
        match (self.io.as_ref(), e.raw_os_error()) {
            (Some(io), Some(errno)) => io.fail(IoOp::Write, errno),
            _ => e,
        }
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        if let Some(d) = self.direct.as_mut() {
            let r = d.flush();
            return r.map_err(|e| self.direct_failed(e));
        }
        if !self.queue.is_empty() {
            return self.flush_queue();
        }
        if !self.buf.is_empty() {
            self.io()?.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes the queue with gathering writes, resuming a partial write mid-piece.
    fn flush_queue(&mut self) -> io::Result<()> {
        let base = self.buf.as_ptr() as usize;
        let mut iov: Vec<libc::iovec> = self
            .queue
            .iter()
            .map(|q| {
                let (addr, len) = match *q {
                    Queued::Owned { start, len } => (base + start, len),
                    Queued::Unowned { addr, len } => (addr, len),
                };
                libc::iovec {
                    iov_base: addr as *mut libc::c_void,
                    iov_len: len,
                }
            })
            .collect();
        let io = self.io.as_ref().ok_or_else(|| -> io::Error {
            TransportError::Usage("migration channel already finished".into()).into()
        })?;
        let mut first = 0;
        while first < iov.len() {
            let end = iov.len().min(first + MAX_IOV);
            // SAFETY: owned pieces are ranges of `buf`, which is neither changed nor moved
            // until the queue is written; unowned ones are mapped until this flush returns
            // (`write_unowned`'s contract).
            let mut n = unsafe { io.writev(&iov[first..end])? };
            while n > 0 {
                let piece = &mut iov[first];
                if n >= piece.iov_len {
                    n -= piece.iov_len;
                    first += 1;
                } else {
                    piece.iov_base = (piece.iov_base as usize + n) as *mut libc::c_void;
                    piece.iov_len -= n;
                    n = 0;
                }
            }
            while first < iov.len() && iov[first].iov_len == 0 {
                first += 1;
            }
        }
        self.queue.clear();
        self.buf.clear();
        Ok(())
    }

    /// Cuts a file written over ([`Self::cut_at_end`]) where the stream's bytes that reached it
    /// end: the descriptor's position, which every write of a buffered channel advances.
    fn cut_where_written(&mut self) -> Result<(), TransportError> {
        if !std::mem::take(&mut self.cut_at_end) {
            return Ok(());
        }
        let Some(io) = self.io.as_ref() else {
            return Ok(());
        };
        let end = io.seek(SeekFrom::Current(0)).map_err(io_to_transport)?;
        // SAFETY: ftruncate on a descriptor we hold; no memory is passed.
        if unsafe { libc::ftruncate(io.raw(), end as libc::off_t) } != 0 {
            return Err(TransportError::Truncate {
                offset: end,
                errno: errno(),
            });
        }
        Ok(())
    }

    /// Ends the stream: writes what is buffered, shuts a socket's sending side down (the peer
    /// reads EOF), closes the descriptor, and for `exec:` closes the command's stdin and waits
    /// for it; a non-zero status is [`TransportError::CommandFailed`]. A cancel interrupts the
    /// wait.
    pub fn finish(mut self) -> Result<Finished, TransportError> {
        self.flush_buf().map_err(io_to_transport)?;
        self.cut_where_written()?;
        self.direct = None;
        let io = self.io.take().expect("a channel is finished once");
        if io.kind == FdKind::Socket {
            // SAFETY: shutdown on our socket; no memory is passed.
            unsafe { libc::shutdown(io.raw(), libc::SHUT_WR) };
        }
        let cancel = io.cancel.clone();
        drop(io);
        let mut exit_status = None;
        if let Some(child) = self.child.take() {
            let status = child.wait(cancel.as_ref()).map_err(io_to_transport)?;
            if !status.success() {
                return Err(TransportError::CommandFailed {
                    command: match &self.uri {
                        MigrationUri::Exec(c) => c.clone(),
                        u => u.to_string(),
                    },
                    status,
                    bytes: self.bytes,
                });
            }
            exit_status = Some(status);
        }
        Ok(Finished {
            bytes: self.bytes,
            exit_status,
        })
    }
}

/// Opens a `file:` stream's file at `offset`. The file ends up as QEMU leaves it: the bytes
/// before `offset` kept (zeros where the file was shorter), the stream after them, nothing
/// after the stream. QEMU cuts the file at `offset` first, so every page the stream then
/// writes is a new page-cache page (a host fault on a guest whose host reclaims freed memory).
/// With `overwrite`, a regular file at least `offset` long is instead written over and cut
/// where the stream ends (returned `true`: the channel owes that cut); anything else is cut
/// first, which also refuses what cannot be cut (a character device), as QEMU does.
fn open_outgoing_file(
    path: &Path,
    offset: u64,
    overwrite: bool,
) -> Result<(RawIo, bool), TransportError> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| TransportError::FileCreate {
            path: path.to_path_buf(),
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        })?;
    let over = overwrite
        && f.metadata()
            .is_ok_and(|m| m.file_type().is_file() && m.len() >= offset);
    if !over {
        f.set_len(offset).map_err(|e| TransportError::Truncate {
            offset,
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        })?;
    }
    let io = RawIo::new(OwnedFd::from(f), FdKind::File, "file");
    if offset != 0 {
        io.seek(SeekFrom::Start(offset)).map_err(io_to_transport)?;
    }
    Ok((io, over))
}

/// The `direct-io` writer of a `file:` channel: a second, O_DIRECT descriptor of the file
/// beside the buffered one (refused by the filesystem: buffered alone, silently).
fn open_direct_writer(io: &RawIo, path: &Path, offset: u64) -> Result<DirectFile, TransportError> {
    use std::os::fd::AsFd;
    let errno_of = |e: io::Error| e.raw_os_error().unwrap_or(libc::EIO);
    let direct = reopen_direct(io.fd.as_fd(), path).map_err(|e| TransportError::FileOpen {
        path: path.to_path_buf(),
        errno: errno_of(e),
    })?;
    let buffered = io.fd.try_clone().map_err(|e| TransportError::FileOpen {
        path: path.to_path_buf(),
        errno: errno_of(e),
    })?;
    DirectFile::new(buffered, direct, offset)
        .map_err(|e| TransportError::os("Unable to start the direct-io writer", errno_of(e)))
}

impl Write for OutgoingChannel {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(d) = self.direct.as_mut() {
            self.io.as_ref().map_or(Ok(()), RawIo::check)?;
            if let Err(e) = d.write(data) {
                return Err(self.direct_failed(e));
            }
            self.bytes += data.len() as u64;
            return Ok(data.len());
        }
        if self.buf.len() + data.len() > OUT_BUF || self.queue.len() >= MAX_IOV {
            self.flush_buf()?;
        }
        if data.len() >= OUT_BUF {
            self.io()?.write_all(data)?;
        } else {
            let start = self.buf.len();
            self.buf.extend_from_slice(data);
            match self.queue.last_mut() {
                None => {}
                Some(Queued::Owned { start: s, len }) if *s + *len == start => *len += data.len(),
                Some(_) => self.queue.push(Queued::Owned {
                    start,
                    len: data.len(),
                }),
            }
        }
        self.bytes += data.len() as u64;
        Ok(data.len())
    }

    /// Hands what is buffered to the kernel (no fsync, as QEMU).
    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf()
    }
}

impl OutgoingChannel {
    /// Whether [`Self::write_unowned`] may be used: not with direct-io, whose writer stages
    /// every byte in its aligned buffers.
    pub fn takes_unowned(&self) -> bool {
        self.direct.is_none()
    }

    /// Queues `len` bytes at `ptr` after what was written before; they go out in the next
    /// gathering write (at the latest when the channel is flushed): bytes of guest RAM, sent
    /// without a copy of them being made first.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped and readable until the next [`Write::flush`] (or
    /// [`Self::finish`]) returns; dropping the channel abandons them unread.
    pub unsafe fn write_unowned(&mut self, ptr: *const u8, len: usize) -> io::Result<()> {
        if !self.takes_unowned() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a direct-io channel stages every byte it sends",
            ));
        }
        if self.queue.len() >= MAX_IOV {
            self.flush_buf()?;
        }
        if self.queue.is_empty() && !self.buf.is_empty() {
            self.queue.push(Queued::Owned {
                start: 0,
                len: self.buf.len(),
            });
        }
        self.queue.push(Queued::Unowned {
            addr: ptr as usize,
            len,
        });
        self.bytes += len as u64;
        Ok(())
    }
}

impl Seek for OutgoingChannel {
    /// Only a `file:` channel without an offset seeks (mapped-ram); see
    /// [`TransportError::MappedRamOffset`].
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        match &self.uri {
            MigrationUri::File { offset: 0, .. } if self.direct.is_some() => {
                let d = self.direct.as_mut().expect("checked");
                let to = match pos {
                    SeekFrom::Start(n) => Some(n),
                    SeekFrom::Current(n) => d.position().checked_add_signed(n),
                    SeekFrom::End(n) => match d.file_len() {
                        Ok(len) => len.checked_add_signed(n),
                        Err(e) => return Err(self.direct_failed(e)),
                    },
                };
                let Some(to) = to else {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                };
                match d.seek(to) {
                    Ok(()) => Ok(to),
                    Err(e) => Err(self.direct_failed(e)),
                }
            }
            MigrationUri::File { offset: 0, .. } => {
                self.flush_buf()?;
                // What a seek skips must read as zero, not as the file's old bytes.
                self.cut_where_written()?;
                self.io()?.seek(pos)
            }
            MigrationUri::File { path, offset } => Err(TransportError::MappedRamOffset {
                path: path.clone(),
                offset: *offset,
            }
            .into()),
            u => Err(TransportError::NotSeekable { scheme: u.scheme() }.into()),
        }
    }
}

impl Drop for OutgoingChannel {
    fn drop(&mut self) {
        // An abandoned stream written over a file leaves what QEMU's leaves: the bytes that
        // reached the file and nothing of the old ones after them. Best effort: there is no
        // one to tell.
        let _ = self.cut_where_written();
        self.io = None;
        if let Some(child) = self.child.take() {
            child.abort();
        }
    }
}

impl fmt::Debug for OutgoingChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingChannel")
            .field("uri", &self.uri)
            .field("bytes", &self.bytes)
            .finish()
    }
}

// ================================================================ incoming

/// The receiving end before the stream starts: for `tcp:`/`unix:` the listening sockets,
/// bound when [`Incoming::open`] returns (so a port can be asked for and queried, and a
/// failure to bind is reported before the VMM goes on); for the others the opened file, the
/// spawned command or the adopted descriptor. [`Incoming::accept`] gives the channel.
pub struct Incoming {
    uri: MigrationUri,
    listeners: Vec<OwnedFd>,
    addresses: Vec<SocketAddress>,
    /// The `unix:` socket to remove when the listener goes.
    unix_path: Option<PathBuf>,
    ready: Option<IncomingChannel>,
}

impl Incoming {
    /// Sets up the receiving side of `uri`, as `-incoming` or `migrate_incoming` does.
    pub fn open(uri: &MigrationUri) -> Result<Incoming, TransportError> {
        let mut inc = Incoming {
            uri: uri.clone(),
            listeners: Vec::new(),
            addresses: Vec::new(),
            unix_path: None,
            ready: None,
        };
        match uri {
            MigrationUri::Tcp(a) => inc.listeners = inet_listen(a)?,
            MigrationUri::Unix(p) => {
                inc.listeners = vec![unix_listen(p)?];
                inc.unix_path = Some(p.clone());
            }
            MigrationUri::Exec(c) => {
                let (slot, io) = spawn_shell(c, false)?;
                inc.ready = Some(IncomingChannel::new(uri, io, Some(slot), Vec::new()));
            }
            MigrationUri::Fd(n) => {
                let (io, warnings) = adopt_fd(*n)?;
                inc.ready = Some(IncomingChannel::new(uri, io, None, warnings));
            }
            MigrationUri::File { path, offset } => {
                let f = File::open(path).map_err(|e| TransportError::FileOpen {
                    path: path.clone(),
                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                })?;
                let io = RawIo::new(OwnedFd::from(f), FdKind::File, "file");
                if *offset != 0 {
                    io.seek(SeekFrom::Start(*offset)).map_err(io_to_transport)?;
                }
                let mut ch = IncomingChannel::new(uri, io, None, Vec::new());
                ch.seekable = true;
                inc.ready = Some(ch);
            }
        }
        // QEMU prepends each listener to its list, so the last one bound comes first.
        inc.addresses = inc
            .listeners
            .iter()
            .rev()
            .filter_map(|fd| SockAddr::of_socket(fd.as_raw_fd(), false))
            .map(SockAddr::to_socket_address)
            .collect();
        Ok(inc)
    }

    pub fn uri(&self) -> &MigrationUri {
        &self.uri
    }

    /// The listening addresses, in the order of QEMU's `socket-address` list (`query-migrate`,
    /// `info migrate`), which is the reverse of the binding order; empty for non-socket URIs.
    pub fn addresses(&self) -> &[SocketAddress] {
        &self.addresses
    }

    /// The first connection (sockets), or the prepared channel (the others, once). Blocks
    /// until a peer connects; `cancel` interrupts it, and later reads from the channel.
    pub fn accept(&mut self, cancel: &Cancel) -> Result<IncomingChannel, TransportError> {
        if let Some(mut ch) = self.ready.take() {
            ch.attach(cancel);
            return Ok(ch);
        }
        if self.listeners.is_empty() {
            return Err(TransportError::Usage(format!(
                "the incoming channel of {} was already accepted",
                self.uri
            )));
        }
        let fds: Vec<(RawFd, libc::c_short)> = self
            .listeners
            .iter()
            .map(|l| (l.as_raw_fd(), libc::POLLIN))
            .collect();
        loop {
            let i = match wait_fds(&fds, Some(cancel), None) {
                Ok(Some(i)) => i,
                Ok(None) => continue,
                Err(_) if cancel.is_cancelled() => return Err(TransportError::Cancelled),
                Err(e) => return Err(io_to_transport(e)),
            };
            // SAFETY: accept4 with no address buffers; returns a new descriptor or -1.
            let fd = unsafe {
                libc::accept4(
                    fds[i].0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if fd < 0 {
                match errno() {
                    libc::EINTR | libc::EAGAIN | libc::ECONNABORTED => continue,
                    e => return Err(TransportError::os("Unable to accept connection", e)),
                }
            }
            // SAFETY: a fresh descriptor nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut ch = IncomingChannel::new(
                &self.uri,
                RawIo::new(fd, FdKind::Socket, "socket"),
                None,
                Vec::new(),
            );
            ch.attach(cancel);
            return Ok(ch);
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.listeners.clear();
        if let Some(p) = &self.unix_path {
            // QEMU's socket_listen_cleanup.
            let _ = std::fs::remove_file(p);
        }
    }
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("uri", &self.uri)
            .field("addresses", &self.addresses)
            .finish()
    }
}

/// The receiving end of a migration: a [`BufRead`] for [`super::load`], and for `file:` also
/// [`Seek`] (absolute file offsets, as mapped-ram's are) for [`super::load_file`].
pub struct IncomingChannel {
    uri: MigrationUri,
    r: BufReader<Reader>,
    child: Option<Arc<ChildSlot>>,
    seekable: bool,
    warnings: Vec<String>,
}

impl IncomingChannel {
    fn new(
        uri: &MigrationUri,
        io: RawIo,
        child: Option<Arc<ChildSlot>>,
        warnings: Vec<String>,
    ) -> IncomingChannel {
        IncomingChannel {
            uri: uri.clone(),
            r: BufReader::with_capacity(IN_BUF, Reader { io, bytes: 0 }),
            child,
            seekable: false,
            warnings,
        }
    }

    fn attach(&mut self, cancel: &Cancel) {
        if let Some(c) = &self.child {
            cancel.register(Hook::Child(Arc::downgrade(c)));
        }
        self.r.get_mut().io.attach(cancel);
    }

    pub fn uri(&self) -> &MigrationUri {
        &self.uri
    }

    /// Bytes read from the descriptor so far (read-ahead included).
    pub fn transferred(&self) -> u64 {
        self.r.get_ref().bytes
    }

    /// Whether [`Seek`] works (a `file:` channel).
    pub fn is_seekable(&self) -> bool {
        self.seekable
    }

    /// A second reader of a `file:` channel's stream from its start (the URI's offset), with
    /// a file position of its own: the very file this channel reads, opened again through
    /// `/proc/self/fd` (a path renamed or replaced meanwhile does not matter). `None` for
    /// other channels, or if it cannot be opened.
    pub fn read_ahead(&self) -> Option<std::fs::File> {
        let MigrationUri::File { offset, .. } = self.uri else {
            return None;
        };
        if !self.seekable {
            return None;
        }
        let fd = self.r.get_ref().io.fd.as_raw_fd();
        let mut f = std::fs::File::open(format!("/proc/self/fd/{fd}")).ok()?;
        f.seek(SeekFrom::Start(offset)).ok()?;
        Some(f)
    }

    /// Lines QEMU prints as warnings for this channel (`fd:` of a regular file).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The peer of a socket channel.
    pub fn peer_address(&self) -> Option<SocketAddress> {
        let io = &self.r.get_ref().io;
        (io.kind == FdKind::Socket)
            .then(|| SockAddr::of_socket(io.raw(), true))
            .flatten()
            .map(SockAddr::to_socket_address)
    }

    /// The local address of a socket channel.
    pub fn local_address(&self) -> Option<SocketAddress> {
        let io = &self.r.get_ref().io;
        (io.kind == FdKind::Socket)
            .then(|| SockAddr::of_socket(io.raw(), false))
            .flatten()
            .map(SockAddr::to_socket_address)
    }

    /// Closes the channel; for `exec:` waits for the command and gives its status (not an
    /// error: the stream was read, as QEMU sees it).
    pub fn finish(mut self) -> Result<Finished, TransportError> {
        let bytes = self.transferred();
        let cancel = self.r.get_ref().io.cancel.clone();
        let child = self.child.take();
        drop(self);
        let mut exit_status = None;
        if let Some(c) = child {
            exit_status = Some(
                c.wait(cancel.as_ref())
                    .map_err(|_| TransportError::Cancelled)?,
            );
        }
        Ok(Finished { bytes, exit_status })
    }
}

impl Read for IncomingChannel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.r.read(buf)
    }
}

impl BufRead for IncomingChannel {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.r.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        self.r.consume(amt)
    }
}

impl Seek for IncomingChannel {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        if !self.seekable {
            return Err(TransportError::NotSeekable {
                scheme: self.uri.scheme(),
            }
            .into());
        }
        self.r.seek(pos)
    }
}

impl Drop for IncomingChannel {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            c.abort();
        }
    }
}

impl fmt::Debug for IncomingChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingChannel")
            .field("uri", &self.uri)
            .field("bytes", &self.transferred())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(uri: &str) -> String {
        MigrationUri::parse(uri).unwrap_err().to_string()
    }

    fn inet(host: &str, port: &str) -> InetAddress {
        InetAddress {
            host: host.into(),
            port: port.into(),
            ..InetAddress::default()
        }
    }

    #[test]
    fn each_scheme_parses_to_its_variant() {
        assert_eq!(
            MigrationUri::parse("tcp:10.0.0.1:4444").unwrap(),
            MigrationUri::Tcp(inet("10.0.0.1", "4444"))
        );
        assert_eq!(
            MigrationUri::parse("tcp:[fe80::1]:4444").unwrap(),
            MigrationUri::Tcp(inet("fe80::1", "4444"))
        );
        assert_eq!(
            MigrationUri::parse("tcp::4444").unwrap(),
            MigrationUri::Tcp(inet("", "4444"))
        );
        assert_eq!(
            MigrationUri::parse("tcp:dst.example:http").unwrap(),
            MigrationUri::Tcp(inet("dst.example", "http"))
        );
        assert_eq!(
            MigrationUri::parse("unix:/run/m.sock").unwrap(),
            MigrationUri::Unix("/run/m.sock".into())
        );
        assert_eq!(
            MigrationUri::parse("exec:gzip -c > /tmp/x.gz").unwrap(),
            MigrationUri::Exec("gzip -c > /tmp/x.gz".into())
        );
        assert_eq!(MigrationUri::parse("fd:7").unwrap(), MigrationUri::Fd(7));
        assert_eq!(
            MigrationUri::parse("file:/tmp/m,offset=4k").unwrap(),
            MigrationUri::File {
                path: "/tmp/m".into(),
                offset: 4096
            }
        );
        assert_eq!(
            MigrationUri::parse("file:/tmp/m").unwrap(),
            MigrationUri::File {
                path: "/tmp/m".into(),
                offset: 0
            }
        );
        assert_eq!(IncomingUri::parse("defer").unwrap(), IncomingUri::Defer);
        assert_eq!(
            IncomingUri::parse("tcp:0:4444").unwrap(),
            IncomingUri::Uri(MigrationUri::Tcp(inet("0", "4444")))
        );
    }

    #[test]
    fn bad_uris_get_qemu10s_messages() {
        // Each checked with QEMU 10.0.2's HMP `migrate` (tests/migration_transport.rs asks
        // the real binary again).
        assert_eq!(err("foo:bar"), "unknown migration protocol: foo:bar");
        assert_eq!(err("defer"), "unknown migration protocol: defer");
        assert_eq!(err("Tcp:0:1"), "unknown migration protocol: Tcp:0:1");
        assert_eq!(err("tcp:nohost"), "error parsing address 'nohost'");
        assert_eq!(err("tcp:"), "error parsing address ''");
        assert_eq!(err("tcp:host:"), "error parsing address 'host:'");
        assert_eq!(err("tcp::"), "error parsing port in address ':'");
        assert_eq!(err("tcp:[::1"), "error parsing IPv6 address '[::1'");
        assert_eq!(err("tcp:[::1]"), "error parsing IPv6 address '[::1]'");
        assert_eq!(err("tcp:[]:1"), "error parsing IPv6 address '[]:1'");
        assert_eq!(err("tcp:h:1,to=x"), "error parsing to= argument");
        assert_eq!(err("tcp:h:1,to=5x"), "error parsing to= argument");
        assert_eq!(
            err("tcp:h:1,ipv4=yes,to=5"),
            "error parsing 'ipv4' flag '=yes,to=5'"
        );
        assert_eq!(
            err("tcp:h:1,ipv6=on,,x"),
            "error parsing 'ipv6' flag '=on,,x'"
        );
        assert_eq!(err("unix:"), "invalid Unix socket address");
        assert_eq!(err("fd:"), "invalid file descriptor address");
        assert_eq!(err("fd:abc"), "Invalid file descriptor number 'abc'");
        assert_eq!(err("fd:-1"), "Invalid file descriptor number '-1'");
        assert_eq!(
            err("file:/x,offset=abc"),
            "file URI has bad offset abc: Invalid argument"
        );
        assert_eq!(
            err("file:/x,offset=-1"),
            "file URI has bad offset -1: Numerical result out of range"
        );
        assert_eq!(
            err("file:/x,offset=1k,foo"),
            "file URI has bad offset 1k,foo: Invalid argument"
        );
        assert_eq!(
            err("file:/x,offset=0x10k"),
            "file URI has bad offset 0x10k: Invalid argument"
        );
    }

    #[test]
    fn incoming_non_uris_get_qemu10s_channel_messages() {
        let e = |s: &str| IncomingUri::parse(s).unwrap_err().to_string();
        assert_eq!(
            e("bogus"),
            "Parameter 'channel-type' does not accept value 'bogus'"
        );
        assert_eq!(
            e("tcp1:0:0"),
            "Parameter 'channel-type' does not accept value 'tcp1:0:0'"
        );
        assert_eq!(e(""), "Parameter 'channel-type' is missing");
        assert_eq!(e("a=b"), "Parameter 'channel-type' is missing");
        assert_eq!(e("{\"x\":1}"), "Parameter 'channel-type' is missing");
        assert!(matches!(
            IncomingUri::parse("main"),
            Err(TransportError::ChannelSpec { .. })
        ));
        assert_eq!(e("foo:bar"), "unknown migration protocol: foo:bar");
    }

    #[test]
    fn tcp_options_are_found_anywhere_after_the_port_as_qemu_finds_them() {
        let MigrationUri::Tcp(a) =
            MigrationUri::parse("tcp:h:1,junk,keep-alive,ipv6=off,to=9,ipv4=on").unwrap()
        else {
            panic!()
        };
        assert_eq!(a.to, Some(9));
        assert_eq!(
            (a.ipv4, a.ipv6, a.keep_alive),
            (Some(true), Some(false), Some(true))
        );
        assert_eq!(a.mptcp, None);
        // A port longer than 32 bytes: the rest is read as options, as sscanf leaves it.
        let long = format!("tcp:h:{}", "9".repeat(40));
        let MigrationUri::Tcp(a) = MigrationUri::parse(&long).unwrap() else {
            panic!()
        };
        assert_eq!(a.port.len(), 32);
        // A host longer than 64 bytes does not parse.
        assert!(MigrationUri::parse(&format!("tcp:{}:1", "h".repeat(65))).is_err());
        assert!(MigrationUri::parse(&format!("tcp:{}:1", "h".repeat(64))).is_ok());
    }

    #[test]
    fn offsets_take_qemu_sizes() {
        let off = |s: &str| match MigrationUri::parse(&format!("file:/f,offset={s}")).unwrap() {
            MigrationUri::File { offset, .. } => offset,
            _ => unreachable!(),
        };
        assert_eq!(off("0"), 0);
        assert_eq!(off("4096"), 4096);
        assert_eq!(off("0x1000"), 4096);
        assert_eq!(off("1.5k"), 1536);
        assert_eq!(off("2M"), 2 << 20);
        // Only the first ",offset=" counts.
        assert!(MigrationUri::parse("file:/f,offset=1,offset=2").is_err());
    }

    #[test]
    fn display_prints_a_uri_that_parses_back_to_the_same_value() {
        for uri in [
            "tcp:10.0.0.1:4444",
            "tcp:[::1]:4444,to=4450,ipv4=off,ipv6=on,keep-alive=on,mptcp=off",
            "tcp::0",
            "unix:/tmp/a b",
            "exec:cat > /dev/null",
            "fd:3",
            "file:/tmp/x",
            "file:/tmp/x,offset=8192",
        ] {
            let u = MigrationUri::parse(uri).unwrap();
            assert_eq!(u.to_string(), uri);
            assert_eq!(MigrationUri::parse(&u.to_string()).unwrap(), u);
        }
        assert_eq!(
            MigrationUri::parse("tcp:h:1,ipv4").unwrap().to_string(),
            "tcp:h:1,ipv4=on"
        );
        assert_eq!(
            MigrationUri::parse("file:/x,offset=4k")
                .unwrap()
                .to_string(),
            "file:/x,offset=4096"
        );
        assert_eq!(IncomingUri::Defer.to_string(), "defer");
    }

    #[test]
    fn an_outgoing_unix_socket_asks_for_a_send_buffer_of_4_mib() {
        let dir = std::env::temp_dir().join(format!("hm-sndbuf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let fd = unix_connect(&path, &Cancel::new()).unwrap();
        let got = int_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap();
        let cap = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .unwrap()
            .trim()
            .parse::<libc::c_int>()
            .unwrap();
        // Whether this process may exceed wmem_max (CAP_NET_ADMIN), asked of a scratch socket.
        let (scratch, _) = std::os::unix::net::UnixStream::pair().unwrap();
        let privileged = set_int_opt(
            scratch.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            1 << 20,
        ) == 0;
        let granted = if privileged {
            UNIX_SEND_BUFFER
        } else {
            UNIX_SEND_BUFFER.min(cap)
        };
        // The kernel doubles what it grants, for its bookkeeping.
        assert_eq!(got, 2 * granted, "wmem_max {cap}, privileged {privileged}");
        drop((fd, listener));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn socket_addresses_print_as_qemus_info_migrate_does() {
        let v6 = SocketAddress::Inet {
            host: "::".into(),
            port: 4444,
        };
        assert_eq!(v6.to_string(), "tcp::::4444");
        assert_eq!(v6.connect_uri().to_string(), "tcp:[::1]:4444");
        assert_eq!(
            SocketAddress::Unix("/tmp/s".into()).to_string(),
            "unix:/tmp/s"
        );
    }

    #[test]
    fn errors_convert_with_class_errno_and_hint() {
        let e: Error = TransportError::Connect {
            target: "127.0.0.1:1".into(),
            errno: libc::ECONNREFUSED,
        }
        .into();
        assert_eq!(
            e.message(),
            "Failed to connect to '127.0.0.1:1': Connection refused"
        );
        assert_eq!(e.class(), HmErrorClass::Host);
        assert_eq!(e.errno(), Some(libc::ECONNREFUSED));
        let e: Error = TransportError::UnixPathTooLong { path: "/x".into() }.into();
        assert_eq!(e.hint(), Some("Path must be less than 108 bytes\n"));
        let io: io::Error = TransportError::Cancelled.into();
        assert!(TransportError::from_io(&io).unwrap().is_cancelled());
        assert_eq!(io.to_string(), "migration cancelled");
    }
}
