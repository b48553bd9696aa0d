//! Locks that outlive a panic, and file locks that outlive an unlink.
//!
//! vessel's mutexes guard bookkeeping (which vessels are open, a lease's
//! state, a file gate's users) whose every update is a single assignment
//! or a whole-value swap: a panic in another holder cannot leave it half
//! written, so a poisoned lock is taken as it is instead of spreading the
//! panic to every later caller (as `parking_lot`'s locks, which do not
//! poison).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// [`Mutex::lock`] and [`Condvar::wait`] without poisoning.
pub trait Locked<T> {
    /// Locks, taking the value as it is after another holder panicked.
    fn locked(&self) -> MutexGuard<'_, T>;

    /// The value, through a unique borrow (no locking), the same way.
    fn locked_mut(&mut self) -> &mut T;
}

impl<T> Locked<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn locked_mut(&mut self) -> &mut T {
        self.get_mut().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Waits on `cv` with `guard`, as [`Locked::locked`] locks.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// Whether `file`, just flocked, is still the file at `path`. Whoever
/// removes a lock file does so while holding it; a process that opened the
/// path before that and locks after it holds a lock on an unlinked inode,
/// which locks nothing: it must open the path again.
pub fn still_linked(path: &Path, file: &File) -> bool {
    std::fs::metadata(path).is_ok_and(|m| file.metadata().is_ok_and(|f| f.ino() == m.ino() && f.dev() == m.dev()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_on_an_unlinked_or_replaced_file_is_not_current() {
        let p = std::env::temp_dir().join(format!("vessel-core-lock-{}", std::process::id()));
        let f = File::create(&p).unwrap();
        assert!(still_linked(&p, &f));
        std::fs::remove_file(&p).unwrap();
        assert!(!still_linked(&p, &f), "unlinked");
        let _other = File::create(&p).unwrap();
        assert!(!still_linked(&p, &f), "another file at the path");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_poisoned_lock_is_taken_as_it_is() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let mut g = m2.lock().unwrap();
            *g = 2;
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*m.locked(), 2);
    }
}
