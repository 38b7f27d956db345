//! Whether the guest runs, as QEMU's RunState tracks it (`info status`, `stop`, `cont`, and the
//! states a migration moves a machine through), and the VMM's hooks that actually pause and
//! resume its vCPUs: hostmem owns the state, the VMM owns the vCPUs.

use std::sync::Arc;

use crate::error::Result;

/// QEMU's RunState values a hostmem machine passes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Built with `-S`, never started.
    Prelaunch,
    Running,
    /// Stopped by `stop`.
    Paused,
    /// Waiting for or loading an incoming migration.
    InMigrate,
    /// Paused for the switchover of an outgoing migration.
    FinishMigrate,
    /// An outgoing migration completed: the guest runs on the destination now.
    PostMigrate,
}

impl RunState {
    /// QEMU's RunState name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Prelaunch => "prelaunch",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::InMigrate => "inmigrate",
            Self::FinishMigrate => "finish-migrate",
            Self::PostMigrate => "postmigrate",
        }
    }

    pub fn is_running(self) -> bool {
        self == Self::Running
    }

    /// `info status`, as QEMU prints it.
    pub fn info(self) -> String {
        match self {
            Self::Running => "VM status: running\n".to_string(),
            Self::Paused => "VM status: paused\n".to_string(),
            other => format!("VM status: paused ({})\n", other.name()),
        }
    }
}

/// What a VMM gives hostmem so that `stop`, `cont` and a migration's switchover reach its
/// vCPUs. Called with no hostmem lock held, so the hooks may call hostmem.
pub trait GuestControl: Send + Sync {
    /// Stops every vCPU; returns once none runs guest code.
    fn stop(&self) -> Result<()>;
    /// Lets the vCPUs run again.
    fn resume(&self) -> Result<()>;
}

/// A machine without a VMM's hooks: nothing runs, so there is nothing to stop.
pub struct NoGuest;

impl GuestControl for NoGuest {
    fn stop(&self) -> Result<()> {
        Ok(())
    }
    fn resume(&self) -> Result<()> {
        Ok(())
    }
}

/// The run state of a machine and its VMM's hooks.
pub struct Run {
    pub state: RunState,
    pub control: Arc<dyn GuestControl>,
    /// Start the guest once an incoming migration completes (QEMU's autostart: no `-S`).
    pub autostart: bool,
}

impl Default for Run {
    fn default() -> Self {
        Run {
            state: RunState::Running,
            control: Arc::new(NoGuest),
            autostart: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_status_reads_like_qemu() {
        assert_eq!(RunState::Running.info(), "VM status: running\n");
        assert_eq!(RunState::Paused.info(), "VM status: paused\n");
        assert_eq!(
            RunState::Prelaunch.info(),
            "VM status: paused (prelaunch)\n"
        );
        assert_eq!(
            RunState::PostMigrate.info(),
            "VM status: paused (postmigrate)\n"
        );
        assert_eq!(
            RunState::InMigrate.info(),
            "VM status: paused (inmigrate)\n"
        );
    }
}
