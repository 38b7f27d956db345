//! The migration half of HMP's text: `info migrate` as QEMU 10 prints it, from the machine's
//! migration state and the latest migration's progress.

use std::fmt::Write;

use crate::migration::state::{MigrationState, MigrationStatus, ProgressSnapshot};

/// `info migrate`: the migration object's globals, then the latest migration (outgoing if
/// there was one, else incoming), in QEMU's lines and units.
pub fn info_migrate(state: &MigrationState) -> String {
    let mut out = String::new();
    out.push_str("globals:\n");
    out.push_str("store-global-state: on\n");
    out.push_str("only-migratable: off\n");
    out.push_str("send-configuration: on\n");
    out.push_str("send-section-footer: on\n");
    let _ = writeln!(
        out,
        "send-switchover-start: {}",
        if state.send_switchover_start {
            "on"
        } else {
            "off"
        }
    );
    out.push_str("clear-bitmap-shift: 18\n");
    let latest = state.outgoing.as_ref().or(state.incoming.as_ref());
    if let Some(p) = latest {
        let p = p.snapshot();
        progress_lines(&mut out, &p);
        if !p.socket_addresses.is_empty() {
            out.push_str("socket address: [\n");
            for a in &p.socket_addresses {
                let _ = writeln!(out, "\t{a}");
            }
            out.push_str("]\n");
        }
    }
    out
}

fn progress_lines(out: &mut String, p: &ProgressSnapshot) {
    let _ = write!(out, "Migration status: {}", p.status.name());
    match (&p.error, p.status) {
        (Some(e), MigrationStatus::Failed) => {
            let _ = writeln!(out, " ({e})");
        }
        _ => out.push('\n'),
    }
    if p.incoming {
        // A QEMU destination keeps no statistics of what it received.
        out.push_str("total time: 0 ms\n");
        return;
    }
    let _ = writeln!(out, "total time: {} ms", p.total_time_ms);
    if let Some(ms) = p.expected_downtime_ms {
        let _ = writeln!(out, "expected downtime: {ms} ms");
    }
    if let Some(ms) = p.downtime_ms {
        let _ = writeln!(out, "downtime: {ms} ms");
    }
    // QEMU reports RAM statistics only for a migration that got going.
    let ram = matches!(
        p.status,
        MigrationStatus::Active | MigrationStatus::Completed
    ) || p.stats.transferred > 0
        && !matches!(
            p.status,
            MigrationStatus::Cancelled | MigrationStatus::Failed
        );
    if let Some(ms) = p.setup_time_ms.filter(|_| ram) {
        let _ = writeln!(out, "setup: {ms} ms");
    }
    if !ram {
        return;
    }
    let s = &p.stats;
    let _ = writeln!(out, "transferred ram: {} kbytes", s.transferred >> 10);
    let _ = writeln!(out, "throughput: {:.2} mbps", s.mbps);
    let _ = writeln!(out, "remaining ram: {} kbytes", s.remaining >> 10);
    let _ = writeln!(out, "total ram: {} kbytes", s.total >> 10);
    let _ = writeln!(out, "duplicate: {} pages", s.duplicate);
    let _ = writeln!(out, "normal: {} pages", s.normal);
    let _ = writeln!(out, "normal bytes: {} kbytes", s.normal_bytes >> 10);
    let _ = writeln!(out, "dirty sync count: {}", s.dirty_sync_count);
    out.push_str("page size: 4 kbytes\n");
    out.push_str("multifd bytes: 0 kbytes\n");
    let _ = writeln!(out, "pages-per-second: {}", s.pages_per_second);
    if s.dirty_pages_rate != 0 {
        let _ = writeln!(out, "dirty pages rate: {} pages", s.dirty_pages_rate);
    }
    if s.precopy_bytes != 0 {
        let _ = writeln!(out, "precopy ram: {} kbytes", s.precopy_bytes >> 10);
    }
    if s.downtime_bytes != 0 {
        let _ = writeln!(out, "downtime ram: {} kbytes", s.downtime_bytes >> 10);
    }
    if s.skipped_unpopulated != 0 {
        // hostmem's own line: what x-skip-unpopulated left out.
        let _ = writeln!(out, "unpopulated skipped: {} pages", s.skipped_unpopulated);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::state::{Progress, Stats};
    use std::sync::Arc;

    const GLOBALS: &str = "globals:\nstore-global-state: on\nonly-migratable: off\n\
send-configuration: on\nsend-section-footer: on\nsend-switchover-start: on\n\
clear-bitmap-shift: 18\n";

    #[test]
    fn before_any_migration_only_the_globals_show() {
        let mut st = MigrationState::default();
        st.send_switchover_start = true;
        assert_eq!(info_migrate(&st), GLOBALS);
    }

    #[test]
    fn a_destination_shows_its_status_as_qemu_10_does() {
        let p = Arc::new(Progress::new(true));
        p.set_status(MigrationStatus::Completed);
        let mut st = MigrationState::default();
        st.send_switchover_start = true;
        st.incoming = Some(p);
        assert_eq!(
            info_migrate(&st),
            format!("{GLOBALS}Migration status: completed\ntotal time: 0 ms\n")
        );
    }

    #[test]
    fn a_listening_destination_lists_its_socket_addresses_last() {
        let p = Arc::new(Progress::new(true));
        p.set_socket_addresses(vec!["tcp::::4444".into(), "tcp:0.0.0.0:4444".into()]);
        let mut st = MigrationState::default();
        st.send_switchover_start = true;
        st.incoming = Some(p);
        assert_eq!(
            info_migrate(&st),
            format!(
                "{GLOBALS}Migration status: setup\ntotal time: 0 ms\nsocket address: [\n\
                 \ttcp::::4444\n\ttcp:0.0.0.0:4444\n]\n"
            )
        );
    }

    #[test]
    fn a_failed_migration_shows_why_and_no_ram_lines() {
        let p = Arc::new(Progress::new(false));
        p.fail(&crate::Error::generic(
            "Failed to connect to '127.0.0.1:1': Connection refused",
        ));
        let mut st = MigrationState::default();
        st.send_switchover_start = true;
        st.outgoing = Some(p);
        let text = info_migrate(&st);
        let rest = text.strip_prefix(GLOBALS).unwrap();
        let lines: Vec<&str> = rest.lines().collect();
        assert_eq!(
            lines[0],
            "Migration status: failed (Failed to connect to '127.0.0.1:1': Connection refused)"
        );
        assert!(lines[1].starts_with("total time: ") && lines[1].ends_with(" ms"));
        assert_eq!(lines.len(), 2);
    }

    #[test]
    fn a_completed_migration_has_qemus_ram_lines_in_qemus_order() {
        let snap = ProgressSnapshot {
            status: MigrationStatus::Completed,
            error: None,
            total_time_ms: 242,
            setup_time_ms: Some(0),
            expected_downtime_ms: None,
            downtime_ms: Some(0),
            stats: Stats {
                transferred: 577 << 10,
                mbps: 19.54,
                total: 262144 << 10,
                duplicate: 65536,
                dirty_sync_count: 3,
                pages_per_second: 245057,
                precopy_bytes: 576 << 10,
                ..Default::default()
            },
            incoming: false,
            socket_addresses: Vec::new(),
        };
        let mut out = String::new();
        progress_lines(&mut out, &snap);
        // QEMU 10's own lines for such a migration (-M none -m 256M, recorded).
        assert_eq!(
            out,
            "Migration status: completed\ntotal time: 242 ms\ndowntime: 0 ms\nsetup: 0 ms\n\
transferred ram: 577 kbytes\nthroughput: 19.54 mbps\nremaining ram: 0 kbytes\n\
total ram: 262144 kbytes\nduplicate: 65536 pages\nnormal: 0 pages\nnormal bytes: 0 kbytes\n\
dirty sync count: 3\npage size: 4 kbytes\nmultifd bytes: 0 kbytes\n\
pages-per-second: 245057\nprecopy ram: 576 kbytes\n"
        );
    }
}
