//! I/O readiness on a shard's reactor: file descriptors registered with the
//! shard's `mio::Poll` (epoll, edge-triggered), and futures that wait until
//! a descriptor is readable or writable.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};

use crate::shard::{with_shard, Shard};

/// The token of the shard's own eventfd waker.
pub(crate) const WAKE_TOKEN: Token = Token(usize::MAX);

/// The token of descriptors watched for an external driver.
const WATCH_TOKEN: Token = Token(usize::MAX - 1);

#[derive(Default)]
struct Source {
    generation: u32,
    live: bool,
    readable: bool,
    /// The peer closed its side: reads find data or the end of the stream
    /// from now on, so this is not cleared with `readable`.
    read_closed: bool,
    writable: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

/// The epoll instance of one shard and the state of its registered sources.
pub(crate) struct Reactor {
    poll: RefCell<mio::Poll>,
    events: RefCell<Events>,
    sources: RefCell<Vec<Source>>,
    free: RefCell<Vec<usize>>,
    live: std::cell::Cell<usize>,
    /// Set when a watched descriptor became readable.
    watched: std::cell::Cell<bool>,
}

impl Reactor {
    pub(crate) fn new(poll: mio::Poll) -> Self {
        Self {
            poll: RefCell::new(poll),
            events: RefCell::new(Events::with_capacity(256)),
            sources: RefCell::default(),
            free: RefCell::default(),
            live: std::cell::Cell::new(0),
            watched: std::cell::Cell::new(false),
        }
    }

    /// Whether any descriptor is registered.
    pub(crate) fn has_sources(&self) -> bool {
        self.live.get() > 0
    }

    /// Waits for readiness (or the shard's waker) for at most `timeout`, then
    /// wakes the tasks whose descriptors became ready. Returns whether any did.
    pub(crate) fn poll(&self, timeout: Option<Duration>) -> bool {
        let mut events = self.events.borrow_mut();
        if let Err(err) = self.poll.borrow_mut().poll(&mut events, timeout) {
            if err.kind() != io::ErrorKind::Interrupted {
                panic!("epoll_wait failed on a shard: {err}");
            }
            return false;
        }
        let mut woke = false;
        let mut wakers = Vec::new();
        {
            let mut sources = self.sources.borrow_mut();
            for event in events.iter() {
                if event.token() == WAKE_TOKEN {
                    continue;
                }
                if event.token() == WATCH_TOKEN {
                    self.watched.set(true);
                    woke = true;
                    continue;
                }
                let Some(source) = sources.get_mut(event.token().0) else {
                    continue;
                };
                if !source.live {
                    continue;
                }
                if event.is_read_closed() {
                    source.read_closed = true;
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    source.readable = true;
                    wakers.extend(source.read_waker.take());
                }
                if event.is_writable() || event.is_write_closed() || event.is_error() {
                    source.writable = true;
                    wakers.extend(source.write_waker.take());
                }
            }
        }
        for waker in wakers {
            woke = true;
            waker.wake();
        }
        woke
    }

    /// Watches `fd` for readability on behalf of an external driver.
    pub(crate) fn watch(&self, fd: RawFd) -> io::Result<()> {
        self.poll.borrow().registry().register(
            &mut SourceFd(&fd),
            WATCH_TOKEN,
            Interest::READABLE,
        )?;
        self.live.set(self.live.get() + 1);
        Ok(())
    }

    /// Whether a watched descriptor became readable since the last
    /// [`take_watched`](Self::take_watched).
    pub(crate) fn watched(&self) -> bool {
        self.watched.get()
    }

    /// Like [`watched`](Self::watched), and clears it.
    pub(crate) fn take_watched(&self) -> bool {
        self.watched.replace(false)
    }

    fn register(&self, fd: RawFd) -> io::Result<(usize, u32)> {
        let mut sources = self.sources.borrow_mut();
        let index = self.free.borrow_mut().pop().unwrap_or_else(|| {
            sources.push(Source::default());
            sources.len() - 1
        });
        let source = &mut sources[index];
        source.live = true;
        source.readable = false;
        source.read_closed = false;
        source.writable = false;
        let registered = self.poll.borrow().registry().register(
            &mut SourceFd(&fd),
            Token(index),
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(err) = registered {
            source.live = false;
            self.free.borrow_mut().push(index);
            return Err(err);
        }
        self.live.set(self.live.get() + 1);
        Ok((index, source.generation))
    }

    fn deregister(&self, fd: RawFd, index: usize) {
        let _ = self.poll.borrow().registry().deregister(&mut SourceFd(&fd));
        let mut sources = self.sources.borrow_mut();
        let source = &mut sources[index];
        *source = Source {
            generation: source.generation.wrapping_add(1),
            ..Source::default()
        };
        self.free.borrow_mut().push(index);
        self.live.set(self.live.get() - 1);
    }

    fn poll_ready(&self, index: usize, write: bool, cx: &mut Context<'_>) -> Poll<()> {
        let mut sources = self.sources.borrow_mut();
        let source = &mut sources[index];
        let (ready, waker) = if write {
            (source.writable, &mut source.write_waker)
        } else {
            (
                source.readable || source.read_closed,
                &mut source.read_waker,
            )
        };
        if ready {
            return Poll::Ready(());
        }
        *waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn clear(&self, index: usize, write: bool) {
        let mut sources = self.sources.borrow_mut();
        if write {
            sources[index].writable = false;
        } else {
            sources[index].readable = false;
        }
    }
}

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
        let (index, _) = shard.reactor.register(io.as_raw_fd())?;
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
        std::future::poll_fn(|cx| self.shard.reactor.poll_ready(self.index, false, cx)).await
    }

    /// Waits until the descriptor may be writable.
    pub async fn writable(&self) {
        std::future::poll_fn(|cx| self.shard.reactor.poll_ready(self.index, true, cx)).await
    }

    /// Whether the reactor has seen the descriptor readable since the
    /// readiness was last cleared: a read may find data without waiting.
    pub fn is_readable(&self) -> bool {
        let sources = self.shard.reactor.sources.borrow();
        let source = &sources[self.index];
        source.readable || source.read_closed
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
