//! [`Async`]: a descriptor registered with the current shard's reactor,
//! and the futures that wait until it is readable or writable.

use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::task::{Context, Poll};

use crate::context::with_shard;
use crate::shard::Shard;

/// A non-blocking descriptor registered with the current shard's reactor.
/// It belongs to that shard (it is `!Send`).
pub struct Async<T: AsRawFd> {
    io: Option<T>,
    index: usize,
    shard: Rc<Shard>,
}

impl<T: AsRawFd> Async<T> {
    /// Registers `io` (already in non-blocking mode) with the current shard.
    pub fn new(io: T) -> io::Result<Self> {
        let shard = with_shard(Rc::clone).map_err(io::Error::other)?;
        let index = shard.reactor.register(io.as_raw_fd())?;
        Ok(Self {
            io: Some(io),
            index,
            shard,
        })
    }

    /// The wrapped descriptor.
    pub fn get_ref(&self) -> &T {
        self.io.as_ref().expect("present until drop")
    }

    /// Waits until the descriptor may be readable.
    pub async fn readable(&self) {
        std::future::poll_fn(|cx| self.poll_readable(cx)).await
    }

    /// Waits until the descriptor may be writable.
    pub async fn writable(&self) {
        std::future::poll_fn(|cx| self.poll_writable(cx)).await
    }

    /// Whether the reactor has seen the descriptor readable since the
    /// readiness was last cleared: a read may find data without waiting.
    pub fn is_readable(&self) -> bool {
        self.shard.reactor.is_readable(self.index)
    }

    /// Like [`readable`](Self::readable), for a hand-written future:
    /// `Ready` if the descriptor may be readable, or `Pending` with the
    /// task's waker kept until it may be.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.shard.reactor.poll_ready(self.index, false, cx)
    }

    /// Like [`poll_readable`](Self::poll_readable), for writing.
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.shard.reactor.poll_ready(self.index, true, cx)
    }

    /// Forgets the write readiness, so that
    /// [`poll_writable`](Self::poll_writable) waits for the reactor's next
    /// event. Call it only right after a write that failed with
    /// `WouldBlock`, with no await in between.
    pub fn clear_writable(&self) {
        self.shard.reactor.clear(self.index, true);
    }

    /// Forgets the read readiness, so [`readable`](Self::readable) waits for
    /// the reactor's next event. Call it only right after a read that
    /// drained the descriptor (it failed with `WouldBlock`, or a stream
    /// socket returned less than it was offered), with no await in between:
    /// epoll reports data that arrives later as a new event. A peer's close
    /// that epoll already reported is kept: the next read finds it.
    pub fn clear_readable(&self) {
        self.shard.reactor.clear(self.index, false);
    }

    /// Runs the non-blocking operation `op` until it does not fail with
    /// `WouldBlock`, waiting for readability in between.
    pub async fn read_with<R>(&self, mut op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        self.retry(false, &mut op).await
    }

    /// Like [`read_with`](Self::read_with), waiting for writability.
    pub async fn write_with<R>(&self, mut op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        self.retry(true, &mut op).await
    }

    async fn retry<R>(
        &self,
        write: bool,
        op: &mut impl FnMut(&T) -> io::Result<R>,
    ) -> io::Result<R> {
        loop {
            match op(self.get_ref()) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    // No await between the failed attempt and clearing the
                    // flag, so no readiness event can slip in between.
                    self.shard.reactor.clear(self.index, write);
                    if write {
                        self.writable().await;
                    } else {
                        self.readable().await;
                    }
                }
                result => return result,
            }
        }
    }
}

impl<T: AsRawFd> Drop for Async<T> {
    fn drop(&mut self) {
        if let Some(io) = self.io.take() {
            self.shard.reactor.deregister(io.as_raw_fd(), self.index);
        }
    }
}
