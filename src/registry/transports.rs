//! The transports the HMP commands and `-incoming` open: QEMU's migration URIs turned into
//! the channels a migration thread reads or writes.

use std::io::BufWriter;

use super::hmp::{PendingIncoming, Transports};
use super::migrate::{IncomingChannel, OutgoingChannel};
use crate::error::{Error, Result};

/// QEMU's URI schemes, over the host's files, sockets and processes.
pub struct HostTransports;

fn io_error(what: String, e: std::io::Error) -> Error {
    Error::host(what, e.raw_os_error().unwrap_or(libc::EIO))
}

impl Transports for HostTransports {
    fn outgoing(&self, uri: &str) -> Result<OutgoingChannel> {
        if let Some(path) = uri.strip_prefix("file:") {
            let f = std::fs::File::create(path)
                .map_err(|e| io_error(format!("Could not open '{path}'"), e))?;
            return Ok(OutgoingChannel {
                writer: Box::new(BufWriter::with_capacity(1 << 20, f)),
                interrupt: Box::new(|| {}),
                finish: Box::new(|| Ok(())),
            });
        }
        Err(Error::invalid(format!("unknown migration protocol: {uri}")))
    }

    fn incoming(&self, uri: &str) -> Result<PendingIncoming> {
        if let Some(path) = uri.strip_prefix("file:") {
            let f = std::fs::File::open(path)
                .map_err(|e| io_error(format!("Could not open '{path}'"), e))?;
            return Ok(PendingIncoming {
                accept: Box::new(move || Ok(IncomingChannel::File(f))),
            });
        }
        Err(Error::invalid(format!("unknown migration protocol: {uri}")))
    }
}
