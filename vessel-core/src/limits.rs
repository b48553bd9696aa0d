//! Resource limits of a vessel's commands.

use crate::CoreError;

/// Resource limits of a command; `None` means unlimited (or, in an exec's
/// options, "the vessel's").
///
/// Every container a vessel runs gets them (each command separately: two
/// commands at once may each use them in full). Values are checked by
/// [`Limits::validate`]: zero, negative and absurd ones are refused before
/// anything starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory in bytes (swap included); exceeding it gets the process
    /// OOM-killed (exit 137, `ExecResult::oom_killed`).
    pub memory_bytes: Option<i64>,
    /// CPU time per 100 ms period, in microseconds (100_000 = one core).
    pub cpu_quota_us: Option<i64>,
    /// Maximum number of processes and threads.
    pub pids: Option<i64>,
}

/// The smallest memory limit runc and youki accept.
const MIN_MEMORY: i64 = 6 << 20;
/// 16 TiB: more is a typo, not a limit.
const MAX_MEMORY: i64 = 16 << 40;
/// CFS refuses a quota under 1 ms a period.
const MIN_CPU_QUOTA_US: i64 = 1_000;
/// 1024 cores.
const MAX_CPU_QUOTA_US: i64 = 1024 * 100_000;
/// The kernel's largest `pid_max`.
const MAX_PIDS: i64 = 1 << 22;

impl Limits {
    /// The defaults of [`Limits::sandbox`]: 1 GiB, one core, 1024 processes.
    /// A 2-core, 24 GB host stays responsive with 100 vessels: a runaway
    /// command gets at most one core of two, cannot fork-bomb the pid
    /// space, and is OOM-killed in its own cgroup at 1 GiB.
    pub const fn sandbox() -> Self {
        Self { memory_bytes: Some(1 << 30), cpu_quota_us: Some(100_000), pids: Some(1024) }
    }

    /// No limit at all.
    pub const fn unlimited() -> Self {
        Self { memory_bytes: None, cpu_quota_us: None, pids: None }
    }

    /// Refuses zero, negative and absurd values.
    pub fn validate(&self) -> Result<(), CoreError> {
        let check = |what: &'static str, v: Option<i64>, min: i64, max: i64| match v {
            Some(v) if v < min || v > max => Err(CoreError::InvalidLimit { what, value: v, min, max }),
            _ => Ok(()),
        };
        check("memory", self.memory_bytes, MIN_MEMORY, MAX_MEMORY)?;
        check("cpu quota", self.cpu_quota_us, MIN_CPU_QUOTA_US, MAX_CPU_QUOTA_US)?;
        check("pids", self.pids, 1, MAX_PIDS)
    }

    /// The limits of one exec under these (a vessel's): each of `narrower`'s
    /// values applies if it is within this one's; a wider one is refused
    /// (an exec cannot lift its vessel's limits); `None` keeps this one's.
    pub fn narrowed_by(&self, narrower: &Limits) -> Result<Limits, CoreError> {
        narrower.validate()?;
        let pick = |what: &'static str, outer: Option<i64>, inner: Option<i64>| match (outer, inner) {
            (Some(o), Some(i)) if i > o => Err(CoreError::LimitAboveVessel { what, value: i, vessel: o }),
            (o, i) => Ok(i.or(o)),
        };
        Ok(Limits {
            memory_bytes: pick("memory", self.memory_bytes, narrower.memory_bytes)?,
            cpu_quota_us: pick("cpu quota", self.cpu_quota_us, narrower.cpu_quota_us)?,
            pids: pick("pids", self.pids, narrower.pids)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_refused() {
        assert!(Limits::sandbox().validate().is_ok());
        assert!(Limits::unlimited().validate().is_ok());
        for bad in [
            Limits { memory_bytes: Some(0), ..Limits::unlimited() },
            Limits { memory_bytes: Some(-1), ..Limits::unlimited() },
            Limits { memory_bytes: Some(1 << 20), ..Limits::unlimited() },
            Limits { memory_bytes: Some(i64::MAX), ..Limits::unlimited() },
            Limits { cpu_quota_us: Some(0), ..Limits::unlimited() },
            Limits { cpu_quota_us: Some(999), ..Limits::unlimited() },
            Limits { pids: Some(0), ..Limits::unlimited() },
            Limits { pids: Some(-5), ..Limits::unlimited() },
            Limits { pids: Some(i64::MAX), ..Limits::unlimited() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_exec_narrows_but_never_widens() {
        let vessel = Limits::sandbox();
        let narrow = Limits { memory_bytes: Some(64 << 20), ..Limits::unlimited() };
        let got = vessel.narrowed_by(&narrow).unwrap();
        assert_eq!(got, Limits { memory_bytes: Some(64 << 20), ..Limits::sandbox() });
        let wide = Limits { pids: Some(4096), ..Limits::unlimited() };
        assert!(matches!(vessel.narrowed_by(&wide), Err(CoreError::LimitAboveVessel { what: "pids", .. })));
        let free = Limits::unlimited();
        assert_eq!(free.narrowed_by(&wide).unwrap().pids, Some(4096), "an unlimited vessel takes any limit");
    }
}
