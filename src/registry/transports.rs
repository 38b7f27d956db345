//! The host's transports for the HMP commands and `-incoming`: QEMU's migration URIs, parsed
//! and opened by [`crate::migration::transport`], as the channels a migration thread writes
//! or reads.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use super::migrate::{
    ChannelOptions, IncomingChannel, OutgoingChannel, PendingIncoming, PendingOutgoing, Transports,
};
use crate::error::{Error, Result};
use crate::migration::qemu_file::StreamWrite;
use crate::migration::transport::{self, Cancel, Incoming, MigrationUri};

/// QEMU's URI schemes, over the host's files, sockets and processes.
pub struct HostTransports;

/// The transport's channel, shared by the writer the precopy loop owns and the `finish` that
/// runs after it: the loop drops its writer before the stream is finished.
type SharedChannel = Arc<Mutex<Option<transport::OutgoingChannel>>>;

fn lock(c: &SharedChannel) -> MutexGuard<'_, Option<transport::OutgoingChannel>> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

struct ChannelWriter(SharedChannel);

impl ChannelWriter {
    fn with<R>(
        &self,
        f: impl FnOnce(&mut transport::OutgoingChannel) -> io::Result<R>,
    ) -> io::Result<R> {
        match lock(&self.0).as_mut() {
            Some(c) => f(c),
            None => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the migration channel is closed",
            )),
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.with(|c| c.write(buf))
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.with(|c| c.write_all(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.with(|c| c.flush())
    }
}

impl StreamWrite for ChannelWriter {
    fn takes_unowned(&self) -> bool {
        self.with(|c| Ok(c.takes_unowned())).unwrap_or(false)
    }

    unsafe fn write_unowned(&mut self, ptr: *const u8, len: usize) -> io::Result<()> {
        // SAFETY: the caller's promise (mapped until the next flush), passed on unchanged.
        self.with(|c| unsafe { c.write_unowned(ptr, len) })
    }
}

/// A channel to a descriptor sends guest pages with gathering writes.
impl StreamWrite for transport::OutgoingChannel {
    fn takes_unowned(&self) -> bool {
        transport::OutgoingChannel::takes_unowned(self)
    }

    unsafe fn write_unowned(&mut self, ptr: *const u8, len: usize) -> io::Result<()> {
        // SAFETY: the caller's promise (mapped until the next flush), passed on unchanged.
        unsafe { transport::OutgoingChannel::write_unowned(self, ptr, len) }
    }
}

fn connected(channel: transport::OutgoingChannel) -> OutgoingChannel {
    let shared: SharedChannel = Arc::new(Mutex::new(Some(channel)));
    OutgoingChannel {
        writer: Box::new(ChannelWriter(shared.clone())),
        finish: Box::new(move || match lock(&shared).take() {
            Some(c) => c.finish().map(drop).map_err(Error::from),
            None => Ok(()),
        }),
    }
}

fn interrupt(cancel: &Cancel) -> Box<dyn Fn() + Send> {
    let cancel = cancel.clone();
    Box::new(move || cancel.cancel())
}

impl Transports for HostTransports {
    fn outgoing(&self, uri: &str, options: &ChannelOptions) -> Result<PendingOutgoing> {
        let uri = MigrationUri::parse(uri)?;
        let cancel = Cancel::new();
        if let MigrationUri::Tcp(_) | MigrationUri::Unix(_) = uri {
            let c = cancel.clone();
            return Ok(PendingOutgoing {
                connect: Box::new(move || {
                    Ok(connected(transport::OutgoingChannel::connect(&uri, &c)?))
                }),
                interrupt: interrupt(&cancel),
                warnings: Vec::new(),
            });
        }
        let channel = transport::OutgoingChannel::connect_with(&uri, &cancel, options)?;
        let warnings = channel.warnings().to_vec();
        Ok(PendingOutgoing {
            warnings,
            ..PendingOutgoing::connected(connected(channel), interrupt(&cancel))
        })
    }

    fn incoming(&self, uri: &str) -> Result<PendingIncoming> {
        let uri = MigrationUri::parse(uri)?;
        let mut listener = Incoming::open(&uri)?;
        let addresses = listener.addresses().iter().map(|a| a.to_string()).collect();
        let cancel = Cancel::new();
        let c = cancel.clone();
        Ok(PendingIncoming {
            accept: Box::new(move || {
                let channel = listener.accept(&c)?;
                Ok(if channel.is_seekable() {
                    IncomingChannel::Seekable(Box::new(channel))
                } else {
                    IncomingChannel::Stream(Box::new(channel))
                })
            }),
            interrupt: interrupt(&cancel),
            addresses,
        })
    }
}
