//! A connection's I/O on its shard: the reader task that fills the read
//! buffer until a waiting read can finish, the end-of-turn send of what was
//! written and the writer task that sends the rest, and the waiters (asyncio
//! futures) that wake the Python side.

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::RawFd;
use std::rc::Rc;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use shardloop_core::Async;

use super::buffer::{ReadBuffer, Until, WriteBuffer, READ_CHUNK};
use crate::context::{self, EndOfTurn};
use crate::errors;
use crate::future::ShardFuture;

/// `drain()` waits while more than this is buffered for sending.
const HIGH_WATER: usize = 64 * 1024;

/// What a waiting read needs before it can finish.
#[derive(Clone)]
pub(crate) enum Want {
    Exactly(usize),
    Until {
        separator: Vec<u8>,
        limit: usize,
    },
    /// What arrived, at most this many bytes and at least one.
    UpTo(usize),
    /// Not a read: the send buffer at or below `HIGH_WATER`.
    Drained,
}

/// One connection's state; lives on its shard's thread.
pub(crate) struct Inner {
    pub(crate) io: Async<TcpStream>,
    pub(crate) shard: usize,
    pub(crate) input: RefCell<ReadBuffer>,
    pub(crate) output: RefCell<WriteBuffer>,
    pub(crate) eof: Cell<bool>,
    read_error: RefCell<Option<io::Error>>,
    pub(crate) write_error: RefCell<Option<io::Error>>,
    pub(crate) closed: Cell<bool>,
    reading: Cell<bool>,
    /// The writer task is sending what the socket did not take at once.
    writing: Cell<bool>,
    /// Registered to be sent when the turn ends (see `context::end_turn`).
    queued: Cell<bool>,
    /// The asyncio future a waiting read sleeps on, and what it needs; and
    /// the one a waiting drain sleeps on. A connection is full duplex: one
    /// task may read while another writes and drains.
    read_waiter: RefCell<Option<(Py<ShardFuture>, Want)>>,
    drain_waiter: RefCell<Option<Py<ShardFuture>>>,
}

impl Inner {
    /// A connection of shard `shard` over `stream` (non-blocking already).
    pub(crate) fn new(stream: TcpStream, shard: usize) -> io::Result<Self> {
        Ok(Self {
            io: Async::new(stream)?,
            shard,
            input: RefCell::new(ReadBuffer::new()),
            output: RefCell::default(),
            eof: Cell::new(false),
            read_error: RefCell::new(None),
            write_error: RefCell::new(None),
            closed: Cell::new(false),
            reading: Cell::new(false),
            writing: Cell::new(false),
            queued: Cell::new(false),
            read_waiter: RefCell::new(None),
            drain_waiter: RefCell::new(None),
        })
    }

    /// Whether a waiter needing `want` can finish (with data or an error).
    fn satisfied(&self, want: &Want) -> bool {
        if self.closed.get() {
            return true;
        }
        if let Want::Drained = want {
            return self.output.borrow().pending() <= HIGH_WATER
                || self.write_error.borrow().is_some();
        }
        if self.eof.get() || self.read_error.borrow().is_some() {
            return true;
        }
        let mut input = self.input.borrow_mut();
        match want {
            Want::Exactly(n) => input.buffered().len() >= *n,
            Want::Until { separator, limit } => input.until(separator, *limit) != Until::NotYet,
            Want::UpTo(_) => !input.buffered().is_empty(),
            Want::Drained => unreachable!("handled above"),
        }
    }

    /// One non-blocking read into the buffer. Returns whether it made
    /// progress (data, end of stream or an error).
    pub(crate) fn fill(&self) -> bool {
        let mut input = self.input.borrow_mut();
        let spare = input.spare(READ_CHUNK);
        let offered = spare.len();
        match self.io.get_ref().read(spare) {
            Ok(0) => {
                self.eof.set(true);
                true
            }
            Ok(n) => {
                input.filled(n);
                if n < offered {
                    // A short read from a stream socket drained it.
                    self.io.clear_readable();
                }
                true
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                self.io.clear_readable();
                false
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => false,
            Err(err) => {
                *self.read_error.borrow_mut() = Some(err);
                true
            }
        }
    }

    /// Sends from the write buffer until it is empty or the socket is full.
    fn flush(&self) -> io::Result<()> {
        let mut socket = self.io.get_ref();
        self.output
            .borrow_mut()
            .send_with(|data| socket.write(data))
    }

    /// Resolves the waiters' futures if what they wait for is there.
    fn wake_waiter(&self) {
        let ready = match &*self.read_waiter.borrow() {
            Some((_, want)) => self.satisfied(want),
            None => false,
        };
        if ready {
            if let Some((future, _)) = self.read_waiter.borrow_mut().take() {
                wake(future);
            }
        }
        let drained = self.drain_waiter.borrow().is_some() && self.satisfied(&Want::Drained);
        if drained {
            if let Some(future) = self.drain_waiter.borrow_mut().take() {
                wake(future);
            }
        }
    }

    /// The slot of the waiter for `want`, and whether it holds a future
    /// that is still pending (another task waits).
    pub(crate) fn has_pending_waiter(&self, py: Python<'_>, want: &Want) -> PyResult<bool> {
        let future = match want {
            Want::Drained => self.drain_waiter.borrow().as_ref().map(|f| f.clone_ref(py)),
            _ => self
                .read_waiter
                .borrow()
                .as_ref()
                .map(|(f, _)| f.clone_ref(py)),
        };
        Ok(future.is_some_and(|future| !ShardFuture::is_done(future.bind(py))))
    }

    /// Starts the task that reads until the waiter can finish.
    fn start_reader(self: &Rc<Self>) {
        if self.reading.replace(true) {
            return;
        }
        let inner = self.clone();
        drop(shardloop_core::spawn_local(async move {
            loop {
                let done = match &*inner.read_waiter.borrow() {
                    Some((_, want)) => inner.satisfied(want),
                    None => true,
                };
                if done {
                    break;
                }
                inner.io.readable().await;
                inner.fill();
            }
            inner.reading.set(false);
            inner.wake_waiter();
        }));
    }

    /// Appends `data` to what is to be sent.
    pub(crate) fn write(self: &Rc<Self>, data: &[u8]) {
        if !data.is_empty() {
            let mut output = self.output.borrow_mut();
            output.compact();
            output.data.extend_from_slice(data);
            drop(output);
            self.send_at_end_of_turn();
        }
    }

    /// Appends `len` bytes that `fill` copies into the space given; if it
    /// fails, nothing is appended.
    pub(crate) fn write_with(
        self: &Rc<Self>,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> PyResult<()>,
    ) -> PyResult<()> {
        let mut output = self.output.borrow_mut();
        output.compact();
        let start = output.data.len();
        output.data.resize(start + len, 0);
        if let Err(err) = fill(&mut output.data[start..]) {
            output.data.truncate(start);
            return Err(err);
        }
        drop(output);
        if len > 0 {
            self.send_at_end_of_turn();
        }
        Ok(())
    }

    /// Makes `future` the waiter for `want` (replacing a finished one) and
    /// starts the task that reads, or sends, until it can be woken.
    pub(crate) fn wait_on(self: &Rc<Self>, future: Py<ShardFuture>, want: &Want) {
        if matches!(want, Want::Drained) {
            let replaced = self.drain_waiter.borrow_mut().replace(future);
            drop(replaced);
            self.start_writer();
        } else {
            let replaced = self
                .read_waiter
                .borrow_mut()
                .replace((future, want.clone()));
            drop(replaced);
            self.start_reader();
        }
    }

    /// Has what was written sent when the shard's turn ends.
    fn send_at_end_of_turn(self: &Rc<Self>) {
        if !self.writing.get() && !self.queued.replace(true) {
            context::at_end_of_turn(self.clone());
        }
    }

    /// Sends what was queued; leaves the rest to the writer task.
    fn send_queued(self: &Rc<Self>) {
        self.queued.set(false);
        if self.writing.get() {
            return;
        }
        match self.flush() {
            Ok(()) => {
                if self.closed.get() {
                    let _ = self.io.get_ref().shutdown(Shutdown::Both);
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return self.start_writer(),
            Err(err) => *self.write_error.borrow_mut() = Some(err),
        }
        self.wake_waiter();
    }

    /// Starts the task that sends what the socket did not take at once.
    fn start_writer(self: &Rc<Self>) {
        if self.writing.replace(true) {
            return;
        }
        let inner = self.clone();
        drop(shardloop_core::spawn_local(async move {
            let result = inner.io.write_with(|_| inner.flush()).await;
            if let Err(err) = result {
                *inner.write_error.borrow_mut() = Some(err);
            }
            inner.writing.set(false);
            if inner.closed.get() {
                let _ = inner.io.get_ref().shutdown(Shutdown::Both);
            }
            inner.wake_waiter();
        }));
    }

    /// Closes the connection: what `write` buffered is still sent (the
    /// writer task shuts the socket down after it), and a waiting read
    /// wakes to find it closed.
    pub(crate) fn close(&self) {
        if self.closed.replace(true) {
            return;
        }
        if !self.writing.get() && !self.queued.get() {
            let _ = self.io.get_ref().shutdown(Shutdown::Both);
        }
        self.wake_waiter();
    }

    /// Takes what `want` asks for from the buffer: `Ok(None)` if it is not
    /// there yet.
    pub(crate) fn take<'py>(
        &self,
        py: Python<'py>,
        want: &Want,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        if self.closed.get() {
            return Err(errors::closed_here());
        }
        if let Want::Drained = want {
            if let Some(err) = self.write_error.borrow_mut().take() {
                return Err(err.into());
            }
            return Ok(
                (self.output.borrow().pending() <= HIGH_WATER).then(|| py.None().into_bound(py))
            );
        }
        let mut input = self.input.borrow_mut();
        let line = match want {
            Want::Until { separator, limit } => input.until(separator, *limit),
            _ => Until::NotYet,
        };
        let buffered = input.buffered();
        let taken = match want {
            Want::Exactly(n) => (buffered.len() >= *n).then_some(*n),
            Want::Until { limit, .. } => match line {
                Until::Found(n) => Some(n),
                Until::Overrun => {
                    // Made with nothing borrowed: building an asyncio
                    // exception runs Python code, which may reach this
                    // connection (a `__del__` closing it).
                    drop(input);
                    return Err(errors::limit_overrun(py, *limit));
                }
                Until::NotYet => None,
            },
            Want::UpTo(max) => (!buffered.is_empty()).then(|| buffered.len().min(*max)),
            Want::Drained => unreachable!("handled above"),
        };
        if let Some(n) = taken {
            let bytes = PyBytes::new(py, &buffered[..n]).into_any();
            input.consume(n);
            return Ok(Some(bytes));
        }
        if let Some(err) = self.read_error.borrow_mut().take() {
            return Err(err.into());
        }
        if self.eof.get() {
            if let Want::UpTo(_) = want {
                return Ok(Some(PyBytes::new(py, b"").into_any()));
            }
            let partial = PyBytes::new(py, buffered);
            let len = buffered.len();
            input.consume(len);
            drop(input);
            let expected = match want {
                Want::Exactly(n) => Some(*n),
                _ => None,
            };
            return Err(errors::incomplete_read(py, partial, expected));
        }
        Ok(None)
    }
}

/// Whether `fd` is a socket of type `SOCK_STREAM` (not a pipe, a file, a
/// datagram socket).
pub(crate) fn is_stream_socket(fd: RawFd) -> bool {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `kind` and `len` are valid for writes of the sizes given;
    // getsockopt only reads the descriptor's state (a bad one fails).
    let read = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            std::ptr::from_mut(&mut kind).cast(),
            &mut len,
        )
    };
    read == 0 && kind == libc::SOCK_STREAM
}

impl EndOfTurn for Inner {
    /// Sends what was written during the turn that ends.
    fn end_turn(self: Rc<Self>) {
        self.send_queued();
    }
}

/// Resolves a waiter's future (a wake-up only: the awaitable then takes
/// its answer from the buffers) from the shard's loop, which resumes the
/// waiting task in the same pass.
fn wake(future: Py<ShardFuture>) {
    context::settle_later(
        future,
        Box::new(|py: Python<'_>| Ok(py.None())) as context::Produce,
    );
}
