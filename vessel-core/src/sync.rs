//! Locks that outlive a panic.
//!
//! vessel's mutexes guard bookkeeping (which vessels are open, a lease's
//! state, a file gate's users) whose every update is a single assignment
//! or a whole-value swap: a panic in another holder cannot leave it half
//! written, so a poisoned lock is taken as it is instead of spreading the
//! panic to every later caller (as `parking_lot`'s locks, which do not
//! poison).

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

#[cfg(test)]
mod tests {
    use super::*;

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
