//! Who created a container: every container vessel makes carries an owner
//! label naming the creating process by boot id, pid and start time (a pid
//! alone is reused). A new connection removes the containers whose owner is
//! gone, and never one of a live process or one without the label.

use std::fs;

/// The label marking vessel's containers; its value is [`current`].
pub(crate) const OWNER_LABEL: &str = "dev.vessel.owner";

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// The start time of `pid` in clock ticks since boot (its stat's
/// `starttime`, read by procfs); `None` when it is gone or a zombie (dead,
/// not yet reaped).
fn start_time(pid: u32) -> Option<u64> {
    let stat = procfs::process::Process::new(i32::try_from(pid).ok()?).ok()?.stat().ok()?;
    (!matches!(stat.state, 'Z' | 'X')).then_some(stat.starttime)
}

/// This process's owner label value.
pub(crate) fn current() -> String {
    let pid = std::process::id();
    format!("{}/{pid}/{}", boot_id(), start_time(pid).unwrap_or(0))
}

/// Whether the process named by an owner label value still runs.
pub(crate) fn is_alive(owner: &str) -> bool {
    let mut parts = owner.split('/');
    let (Some(boot), Some(pid), Some(start)) = (parts.next(), parts.next(), parts.next()) else {
        // Not ours to judge: keep it.
        return true;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return true;
    };
    boot == boot_id() && start_time(pid) == Some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_follows_the_process() {
        assert!(is_alive(&current()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let label = format!("{}/{pid}/{}", boot_id(), start_time(pid).unwrap_or(1));
        child.wait().unwrap();
        assert!(!is_alive(&label), "a reaped process is dead");
        assert!(!is_alive(&format!("other-boot/{}/{}", std::process::id(), start_time(std::process::id()).unwrap())));
        assert!(!is_alive(&format!("{}/{}/1", boot_id(), std::process::id())), "same pid, other start time");
        assert!(is_alive("garbage"), "labels we cannot read are left alone");
    }
}
