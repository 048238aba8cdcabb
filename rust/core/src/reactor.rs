//! A shard's reactor: the descriptors registered with its `mio::Poll`
//! (epoll, edge-triggered) and their readiness, and the wait of its one
//! sleep point. [`crate::Async`] is the handle tasks use.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};

/// The token of the shard's own eventfd waker.
pub(crate) const WAKE_TOKEN: Token = Token(usize::MAX);

/// The token of descriptors watched for an external driver.
const WATCH_TOKEN: Token = Token(usize::MAX - 1);

#[derive(Default)]
struct Source {
    /// Counts the registrations of this slot; part of the epoll token, so
    /// that an event queued for a descriptor deregistered meanwhile does not
    /// mark the slot's next descriptor ready.
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
                let (index, generation) = split_token(event.token());
                let Some(source) = sources.get_mut(index) else {
                    continue;
                };
                if !source.live || source.generation != generation {
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

    /// Registers `fd` for reading and writing; returns its slot.
    pub(crate) fn register(&self, fd: RawFd) -> io::Result<usize> {
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
            token(index, source.generation),
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(err) = registered {
            source.live = false;
            self.free.borrow_mut().push(index);
            return Err(err);
        }
        self.live.set(self.live.get() + 1);
        Ok(index)
    }

    /// Forgets the descriptor of slot `index`; the slot's next
    /// registration gets a new generation.
    pub(crate) fn deregister(&self, fd: RawFd, index: usize) {
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

    /// Whether slot `index` is ready for writing (`write`) or reading,
    /// keeping the task's waker until it is if not.
    pub(crate) fn poll_ready(&self, index: usize, write: bool, cx: &mut Context<'_>) -> Poll<()> {
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

    /// Whether slot `index` was seen readable (or closed by its peer).
    pub(crate) fn is_readable(&self, index: usize) -> bool {
        let sources = self.sources.borrow();
        let source = &sources[index];
        source.readable || source.read_closed
    }

    /// Forgets the write or read readiness of slot `index`.
    pub(crate) fn clear(&self, index: usize, write: bool) {
        let mut sources = self.sources.borrow_mut();
        if write {
            sources[index].writable = false;
        } else {
            sources[index].readable = false;
        }
    }
}

/// The epoll token of slot `index` in its `generation`.
fn token(index: usize, generation: u32) -> Token {
    Token(((generation as usize) << 32) | (index & 0xffff_ffff))
}

/// The slot and generation of a token made by [`token`].
fn split_token(token: Token) -> (usize, u32) {
    (token.0 & 0xffff_ffff, (token.0 >> 32) as u32)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn a_token_carries_its_slot_and_generation_and_never_meets_the_reserved_ones() {
        for (index, generation) in [(0, 0), (7, 1), (0xffff_fffe, u32::MAX - 1)] {
            let t = token(index, generation);
            assert_eq!(split_token(t), (index, generation));
            assert_ne!(t, WAKE_TOKEN);
            assert_ne!(t, WATCH_TOKEN);
        }
    }

    #[test]
    fn an_event_of_a_deregistered_descriptor_does_not_reach_the_slot_s_next_one() {
        let reactor = Reactor::new(mio::Poll::new().unwrap());
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let first = reactor.register(a.as_raw_fd()).unwrap();
        std::io::Write::write_all(&mut &b, b"x").unwrap();
        // The readiness of `a` is queued in epoll; the slot is then reused
        // by another descriptor before the reactor looks.
        reactor.deregister(a.as_raw_fd(), first);
        let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
        let second = reactor.register(c.as_raw_fd()).unwrap();
        assert_eq!(first, second, "the slot is reused");
        reactor.poll(Some(Duration::ZERO));
        assert!(!reactor.is_readable(second), "c has nothing to read");
    }
}
