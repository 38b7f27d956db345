//! HMP commands that act on a machine — migration (`migrate`, `migrate_incoming`,
//! `migrate_cancel`, `migrate_set_parameter`, `migrate_set_capability`), `stop`, `cont` and
//! `pmemsave` — `help`, and the dispatch of everything else to the monitor's read-only text. A
//! command that waits (`migrate` without `-d`) waits with the machine unlocked.

use std::io::Write;

use super::migrate::{self, Transports};
use super::{with, MachineId};
use crate::error::{Error, HmErrorClass, Result};
use crate::machine::RunState;
use crate::migration::state::MigrationStatus;
use crate::monitor::args;

fn cmd_and_rest(line: &str) -> (&str, &str) {
    let line = line.trim_start();
    let end = line
        .find(|c: char| c.is_ascii_whitespace())
        .unwrap_or(line.len());
    (&line[..end], &line[end..])
}

/// QEMU 10's `help` lines for the commands a hostmem VMM answers, in QEMU's (alphabetical)
/// order: those [`hmp`] runs, and `quit`, which the VMM itself handles (it ends the VMM's
/// monitor loop). Each entry: the names the command answers to, then its line.
const COMMANDS: &[(&[&str], &str)] = &[
    (&["cont", "c"], "cont|c  -- resume emulation"),
    (&["help", "?"], "help|? [cmd] -- show the help"),
    (
        &["info"],
        "info [subcommand] -- show various information about the system state",
    ),
    (
        &["migrate"],
        "migrate [-d] [-r] uri -- migrate to URI (using -d to not wait for completion)",
    ),
    (
        &["migrate_cancel"],
        "migrate_cancel  -- cancel the current VM migration",
    ),
    (
        &["migrate_incoming"],
        "migrate_incoming uri -- Continue an incoming migration from an -incoming defer",
    ),
    (
        &["migrate_set_capability"],
        "migrate_set_capability capability state -- Enable/Disable the usage of a capability for migration",
    ),
    (
        &["migrate_set_parameter"],
        "migrate_set_parameter parameter value -- Set the parameter for migration",
    ),
    (
        &["pmemsave"],
        "pmemsave addr size file -- save to disk physical memory dump starting at 'addr' of size 'size'",
    ),
    (&["quit", "q"], "quit|q  -- quit the emulator"),
    (&["stop", "s"], "stop|s  -- stop emulation"),
];

/// `help [CMD]` / `? [CMD]` as QEMU's monitor answers it: every command's line; the line of
/// CMD; for `help info [SUB]` the info lines (all, or SUB's). Words after the one looked up
/// are ignored, as QEMU ignores them. An unknown name is QEMU's "unknown command".
fn help(rest: &str) -> Result<String> {
    let words: Vec<&str> = rest.split_whitespace().collect();
    let unknown =
        |name: String| Error::new(HmErrorClass::NotFound, format!("unknown command: '{name}'"));
    let lines = |it: &mut dyn Iterator<Item = &str>| it.map(|l| format!("{l}\n")).collect();
    match words.as_slice() {
        [] => Ok(lines(&mut COMMANDS.iter().map(|(_, line)| *line))),
        ["info"] => Ok(crate::monitor::INFO_HELP.to_string()),
        ["info", sub, ..] => crate::monitor::INFO_HELP
            .lines()
            .find(|l| l.strip_prefix("info ").and_then(|l| l.split(' ').next()) == Some(sub))
            .map(|l| format!("{l}\n"))
            .ok_or_else(|| unknown(format!("info {sub}"))),
        [name, ..] => COMMANDS
            .iter()
            .find(|(names, _)| names.contains(name))
            .map(|(_, line)| format!("{line}\n"))
            .ok_or_else(|| unknown(name.to_string())),
    }
}

/// Runs one HMP command line on machine `id`.
pub fn hmp(id: MachineId, line: &str, transports: &dyn Transports) -> Result<String> {
    let (cmd, rest) = cmd_and_rest(line);
    match cmd {
        "help" | "?" => help(rest),
        "migrate" => {
            let a = args::parse(cmd, "detach:-d,resume:-r,uri:s", rest)?;
            let uri = a.str("uri").unwrap_or_default();
            if a.flag("resume") {
                return Err(Error::new(
                    HmErrorClass::Unsupported,
                    "hostmem has no postcopy, so no migration to resume",
                ));
            }
            migrate::check_outgoing(id)?;
            let options = with(id, |m| {
                Ok(migrate::ChannelOptions {
                    direct_io: m.migration().parameters().direct_io(),
                })
            })?;
            let channel = transports.outgoing(uri, &options)?;
            let mut out = String::new();
            for w in &channel.warnings {
                out.push_str(&format!("warning: {w}\n"));
            }
            let progress = migrate::start_outgoing(id, channel, 0)?;
            if !a.flag("detach") {
                // QEMU's HMP waits here, monitor busy, the machine free for the migration.
                // A failure is reported where the command was typed (QEMU's goes to stderr,
                // from the timer that polls the status).
                let done = progress.wait();
                if done.status == MigrationStatus::Failed {
                    return Err(Error::generic(done.error.unwrap_or_default()));
                }
            }
            Ok(out)
        }
        "migrate_incoming" => {
            let a = args::parse(cmd, "uri:s", rest)?;
            incoming(id, a.str("uri").unwrap_or_default(), transports)?;
            Ok(String::new())
        }
        "migrate_cancel" => {
            args::parse(cmd, "", rest)?;
            migrate::cancel(id)?;
            Ok(String::new())
        }
        "migrate_set_parameter" => {
            let a = args::parse(cmd, "parameter:s,value:s", rest)?;
            with(id, |m| {
                m.migration_mut().set_parameter(
                    a.str("parameter").unwrap_or_default(),
                    a.str("value").unwrap_or_default(),
                )
            })?;
            Ok(String::new())
        }
        "migrate_set_capability" => {
            let a = args::parse(cmd, "capability:s,state:b", rest)?;
            with(id, |m| {
                if m.migration()
                    .outgoing
                    .as_ref()
                    .is_some_and(|p| !p.status().is_finished())
                {
                    return Err(Error::new(
                        HmErrorClass::InUse,
                        "There's a migration process in progress",
                    ));
                }
                m.migration_mut().capabilities.set(
                    a.str("capability").unwrap_or_default(),
                    if a.flag("state") { "on" } else { "off" },
                )
            })?;
            Ok(String::new())
        }
        "stop" | "s" => {
            args::parse("stop", "", rest)?;
            stop(id)?;
            Ok(String::new())
        }
        "cont" | "c" => {
            args::parse("cont", "", rest)?;
            cont(id)?;
            Ok(String::new())
        }
        "pmemsave" => {
            let a = args::parse(cmd, "val:l,size:i,filename:s", rest)?;
            pmemsave(
                id,
                a.int("val").unwrap_or(0) as u64,
                a.int("size").unwrap_or(0) as u64,
                a.str("filename").unwrap_or_default(),
            )?;
            Ok(String::new())
        }
        _ => with(id, |m| crate::monitor::hmp(m, line)),
    }
}

/// `migrate_incoming URI` (and `-incoming URI`): listen now, load on a thread once the peer
/// connects. Only for a machine waiting for one (`-incoming`); the machine's state is checked
/// before anything listens.
pub fn incoming(id: MachineId, uri: &str, transports: &dyn Transports) -> Result<()> {
    migrate::check_incoming(id)?;
    migrate::listen_incoming(id, transports.incoming(uri)?)?;
    Ok(())
}

/// `stop`: the VMM's vCPUs stop, the machine is paused.
pub fn stop(id: MachineId) -> Result<()> {
    let (state, control) = with(id, |m| Ok((m.run().state, m.run().control.clone())))?;
    if state.is_running() {
        control.stop()?;
        with(id, |m| {
            m.run_mut().state = RunState::Paused;
            Ok(())
        })?;
    }
    Ok(())
}

/// `cont`: the guest runs again. During an incoming migration it only asks for the guest to
/// start once the migration has completed, as QEMU does.
pub fn cont(id: MachineId) -> Result<()> {
    let (state, control) = with(id, |m| Ok((m.run().state, m.run().control.clone())))?;
    match state {
        RunState::Running => Ok(()),
        RunState::InMigrate => with(id, |m| {
            m.run_mut().autostart = true;
            Ok(())
        }),
        _ => {
            control.resume()?;
            with(id, |m| {
                m.run_mut().state = RunState::Running;
                Ok(())
            })
        }
    }
}

/// `pmemsave ADDR SIZE FILE`: guest-physical memory to a file, through the flat view of
/// "memory". Addresses without RAM read as zeros (QEMU's unassigned reads are not data
/// either). The copy goes a bounded buffer at a time, whatever SIZE is, and a page the host
/// cannot back is an error naming its RAMBlock and offset (the guest goes on).
pub fn pmemsave(id: MachineId, addr: u64, size: u64, file: &str) -> Result<()> {
    const BUF: u64 = 1 << 20;
    let mut out = std::fs::File::create(file).map_err(|e| {
        Error::host(
            format!("could not open '{file}'"),
            e.raw_os_error().unwrap_or(0),
        )
    })?;
    let chunks = with(id, |m| {
        Ok(crate::memory::ram_chunks(m.memory(), addr, size))
    })?;
    let guard = crate::guarded::Guard::acquire().map_err(|e| Error::generic(e.to_string()))?;
    let mut buf = vec![0u8; BUF as usize];
    for chunk in chunks {
        let mut done = 0;
        while done < chunk.len {
            let piece = &mut buf[..(chunk.len - done).min(BUF) as usize];
            chunk
                .read(&guard, done, piece)
                .map_err(|e| e.prepend("pmemsave: "))?;
            out.write_all(piece).map_err(|e| {
                Error::host(
                    format!("could not write '{file}'"),
                    e.raw_os_error().unwrap_or(0),
                )
            })?;
            done += piece.len() as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lists_every_command_in_qemus_order_and_looks_names_up() {
        let all = help("").unwrap();
        assert!(all.starts_with("cont|c  -- resume emulation\n"));
        assert!(all.ends_with("stop|s  -- stop emulation\n"));
        let names: Vec<&str> = all
            .lines()
            .map(|l| l.split([' ', '|']).next().unwrap())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "QEMU lists its commands sorted");
        assert_eq!(help("q").unwrap(), "quit|q  -- quit the emulator\n");
        assert_eq!(
            help("quit extra").unwrap(),
            "quit|q  -- quit the emulator\n"
        );
        assert_eq!(help("info").unwrap(), crate::monitor::INFO_HELP);
        assert!(help("info mtree")
            .unwrap()
            .starts_with("info mtree [-f][-d][-o][-D] -- show memory tree"));
        assert_eq!(help("foo").unwrap_err().message(), "unknown command: 'foo'");
        assert_eq!(
            help("info foo").unwrap_err().message(),
            "unknown command: 'info foo'"
        );
    }
}
