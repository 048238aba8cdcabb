//! The synchronisation primitives used by the lock-free parts ([`crate::ring`]
//! and [`crate::wake`]), switched to `loom`'s model-checked versions when the
//! crate is built with `RUSTFLAGS="--cfg loom"`.
//!
//! Only those two modules go through this facade; the rest of the crate uses
//! `std` directly, so a loom build can still link the runtime around them.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;

/// An `UnsafeCell` with loom's closure-based API, so that loom can track every
/// access to the cell and report unsynchronised ones.
#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;

#[cfg(not(loom))]
#[derive(Debug)]
#[repr(transparent)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }

    /// Gives `f` a mutable pointer to the contents; the caller of `f`'s result
    /// upholds the same aliasing rules as for `std::cell::UnsafeCell::get`.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
