//! The locks and atomics of the engine's concurrency core (the group cache
//! and the allocator). A normal build re-exports parking_lot and std as
//! they are, so this costs nothing. A test build with `--cfg shuttle` swaps
//! in the model checker's types, so that every lock, wait and atomic access
//! is a point where it can switch threads (see `model_check.rs`).

#[cfg(not(all(test, shuttle)))]
pub use parking_lot::{Condvar, Mutex, MutexGuard};
#[cfg(not(all(test, shuttle)))]
pub use std::sync::atomic;

#[cfg(all(test, shuttle))]
pub use model::{Condvar, Mutex, MutexGuard};
#[cfg(all(test, shuttle))]
pub use shuttle::sync::atomic;

/// shuttle's std-like locks behind parking_lot's API: `lock()` gives the
/// guard itself (no poisoning) and `wait` takes the guard by reference.
#[cfg(all(test, shuttle))]
mod model {
    use std::ops::{Deref, DerefMut};
    use std::sync::PoisonError;

    #[derive(Default)]
    pub struct Mutex<T>(shuttle::sync::Mutex<T>);

    /// `None` only inside [`Condvar::wait`], which puts the guard back.
    pub struct MutexGuard<'a, T>(Option<shuttle::sync::MutexGuard<'a, T>>);

    impl<T> Mutex<T> {
        pub fn new(value: T) -> Mutex<T> {
            Mutex(shuttle::sync::Mutex::new(value))
        }

        pub fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().unwrap_or_else(PoisonError::into_inner)))
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.0.as_ref().expect("guard held")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0.as_mut().expect("guard held")
        }
    }

    #[derive(Default)]
    pub struct Condvar(shuttle::sync::Condvar);

    impl Condvar {
        pub fn new() -> Condvar {
            Condvar(shuttle::sync::Condvar::new())
        }

        pub fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let g = guard.0.take().expect("guard held");
            guard.0 = Some(self.0.wait(g).unwrap_or_else(PoisonError::into_inner));
        }

        pub fn notify_all(&self) {
            self.0.notify_all();
        }
    }
}
