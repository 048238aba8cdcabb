//! `Connection`: a TCP connection of one shard whose buffers live in Rust.
//!
//! The shard's reactor reads into the connection's buffer from a Rust task,
//! with the GIL released; a Python coroutine awaiting `read_exactly(n)`,
//! `read_until(sep)` or `read(max)` only wakes when its whole answer is
//! there, and then takes it from the buffer in one call. `write` queues: at
//! the end of the loop's turn the driver sends every connection's bytes (one
//! system call each, the GIL released), and a Rust task sends what the
//! socket did not take. The connection's state is touched only on
//! its shard's thread: its tasks run on the shard's executor, the Python
//! objects check the thread on every use, and one dropped elsewhere (a
//! traceback kept by a log handler, say) is sent home to be released there
//! (see `home.rs`).
//!
//! The awaitables follow asyncio's waiter pattern: while the answer is not
//! buffered they yield an asyncio future of the shard's loop that the Rust
//! side resolves as a wake-up only. The data stays in the buffer until the
//! awaiting coroutine takes it, so a cancelled read loses nothing.

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{FromRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyConnectionAbortedError, PyRuntimeError, PyStopIteration, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyTuple};
use shardloop_core::Async;

use crate::call::{self, Produce};
use crate::driver::{running_shard_loop, OnThisThread};
use crate::gil;
use crate::home::Home;

thread_local! {
    /// Connections written to during this turn of the shard's loop.
    static WRITTEN: RefCell<Vec<Rc<Inner>>> = const { RefCell::new(Vec::new()) };
}

/// Sends what the connections of this thread's shard were given during the
/// turn that ends: the driver calls it, with the GIL released, before it
/// looks for more work.
pub(crate) fn send_written() {
    // Most turns write nothing: look before taking the list (and its
    // allocation) out.
    if WRITTEN.with(|w| w.borrow().is_empty()) {
        return;
    }
    let mut written = WRITTEN.with(|w| std::mem::take(&mut *w.borrow_mut()));
    for inner in written.drain(..) {
        inner.send_queued();
    }
    // Keep the list's allocation for the next turn.
    WRITTEN.with(|w| {
        let mut w = w.borrow_mut();
        if w.is_empty() {
            *w = written;
        }
    });
}

/// How much a read asks the socket for at least.
const READ_CHUNK: usize = 16 * 1024;

/// `drain()` waits while more than this is buffered for sending.
const HIGH_WATER: usize = 64 * 1024;

/// An emptied read buffer larger than this goes back to `READ_CHUNK`.
const SHRINK_ABOVE: usize = 4 * READ_CHUNK;

/// What a waiting read needs before it can finish.
#[derive(Clone)]
enum Want {
    Exactly(usize),
    Until {
        separator: Vec<u8>,
        limit: usize,
    },
    Some(usize),
    /// Not a read: the send buffer at or below `HIGH_WATER`.
    Drained,
}

/// Received bytes not yet taken: `data[start..end]`, with `data` kept
/// initialised so that reads need no zeroing.
struct ReadBuffer {
    data: Vec<u8>,
    start: usize,
    end: usize,
    /// How many buffered bytes are known not to hold `searched_for`: a line
    /// that arrives in many reads is searched once, not once per read.
    searched: usize,
    searched_for: Vec<u8>,
}

impl ReadBuffer {
    fn new() -> Self {
        Self {
            data: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            searched: 0,
            searched_for: Vec::new(),
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Where `separator` starts in the buffered bytes, searching only what
    /// arrived since the last search for it (`separator` is not empty).
    fn find(&mut self, separator: &[u8]) -> Option<usize> {
        if self.searched_for != separator {
            self.searched_for = separator.to_vec();
            self.searched = 0;
        }
        // Back up by all but one byte: a separator may straddle the boundary.
        let from = self.searched.saturating_sub(separator.len() - 1);
        let found = find(&self.buffered()[from..], separator).map(|at| from + at);
        self.searched = if found.is_some() {
            0
        } else {
            self.end - self.start
        };
        found
    }

    fn consume(&mut self, n: usize) {
        self.searched = 0;
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.data.len() > SHRINK_ABOVE {
                // One large message must not hold its buffer for the rest
                // of the connection's life.
                self.data = vec![0; READ_CHUNK];
            }
        }
    }

    /// Free space after `end` of at least `at_least` bytes.
    fn spare(&mut self, at_least: usize) -> &mut [u8] {
        if self.data.len() - self.end < at_least && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.data.len() - self.end < at_least {
            let size = (self.end + at_least).next_power_of_two();
            self.data.resize(size, 0);
        }
        &mut self.data[self.end..]
    }
}

/// Bytes accepted by `write` that the socket has not taken yet.
#[derive(Default)]
struct WriteBuffer {
    data: Vec<u8>,
    sent: usize,
}

impl WriteBuffer {
    fn pending(&self) -> usize {
        self.data.len() - self.sent
    }
}

struct Inner {
    io: Async<TcpStream>,
    shard: usize,
    input: RefCell<ReadBuffer>,
    output: RefCell<WriteBuffer>,
    eof: Cell<bool>,
    read_error: RefCell<Option<io::Error>>,
    write_error: RefCell<Option<io::Error>>,
    closed: Cell<bool>,
    reading: Cell<bool>,
    /// The writer task is sending what the socket did not take at once.
    writing: Cell<bool>,
    /// In this thread's `WRITTEN` list, to be sent when the turn ends.
    queued: Cell<bool>,
    /// The asyncio future a waiting read sleeps on, and what it needs; and
    /// the one a waiting drain sleeps on. A connection is full duplex: one
    /// task may read while another writes and drains.
    read_waiter: RefCell<Option<(Py<PyAny>, Want)>>,
    drain_waiter: RefCell<Option<Py<PyAny>>>,
}

impl Inner {
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
            Want::Until { separator, limit } => {
                input.find(separator).is_some() || input.buffered().len() > *limit
            }
            Want::Some(_) => !input.buffered().is_empty(),
            Want::Drained => unreachable!("handled above"),
        }
    }

    /// One non-blocking read into the buffer. Returns whether it made
    /// progress (data, end of stream or an error).
    fn fill(&self) -> bool {
        let mut input = self.input.borrow_mut();
        let spare = input.spare(READ_CHUNK);
        let offered = spare.len();
        match self.io.get_ref().read(spare) {
            Ok(0) => {
                self.eof.set(true);
                true
            }
            Ok(n) => {
                input.end += n;
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
        let mut output = self.output.borrow_mut();
        while output.pending() > 0 {
            let sent = output.sent;
            match self.io.get_ref().write(&output.data[sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => output.sent += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        output.data.clear();
        output.sent = 0;
        Ok(())
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
    fn has_pending_waiter(&self, py: Python<'_>, want: &Want) -> PyResult<bool> {
        let future = match want {
            Want::Drained => self.drain_waiter.borrow().as_ref().map(|f| f.clone_ref(py)),
            _ => self
                .read_waiter
                .borrow()
                .as_ref()
                .map(|(f, _)| f.clone_ref(py)),
        };
        match future {
            Some(future) => Ok(!future
                .bind(py)
                .call_method0(intern!(py, "done"))?
                .is_truthy()?),
            None => Ok(false),
        }
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

    /// Puts the connection in this thread's list of connections to send
    /// for at the end of the turn.
    fn queue(self: &Rc<Self>) {
        if !self.writing.get() && !self.queued.replace(true) {
            WRITTEN.with(|written| written.borrow_mut().push(self.clone()));
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
    fn close(&self) {
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
    fn take<'py>(&self, py: Python<'py>, want: &Want) -> PyResult<Option<Bound<'py, PyAny>>> {
        if self.closed.get() {
            return Err(closed_here());
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
        let found = match want {
            Want::Until { separator, .. } => input.find(separator),
            _ => None,
        };
        let buffered = input.buffered();
        let taken = match want {
            Want::Exactly(n) => (buffered.len() >= *n).then_some(*n),
            Want::Until { separator, limit } => match found {
                Some(at) if at <= *limit => Some(at + separator.len()),
                Some(_) => return Err(limit_overrun(py, *limit)),
                None if buffered.len() > *limit => return Err(limit_overrun(py, *limit)),
                None => None,
            },
            Want::Some(max) => (!buffered.is_empty()).then(|| buffered.len().min(*max)),
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
            if let Want::Some(_) = want {
                return Ok(Some(PyBytes::new(py, b"").into_any()));
            }
            let partial = PyBytes::new(py, buffered);
            let len = buffered.len();
            input.consume(len);
            let expected = match want {
                Want::Exactly(n) => Some(*n),
                _ => None,
            };
            return Err(incomplete_read(py, partial, expected));
        }
        Ok(None)
    }
}

/// Whether `fd` is a socket of type `SOCK_STREAM` (not a pipe, a file, a
/// datagram socket).
fn is_stream_socket(fd: RawFd) -> bool {
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

/// Resolves a waiter's future (a wake-up only: the awaitable then takes
/// its answer from the buffers) from the shard's loop.
fn wake(future: Py<PyAny>) {
    call::resolve_later(future, Box::new(|py: Python<'_>| Ok(py.None())) as Produce);
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    match needle {
        [byte] => haystack.iter().position(|b| b == byte),
        _ => haystack.windows(needle.len()).position(|w| w == needle),
    }
}

fn asyncio_error(py: Python<'_>, name: &'static str, args: Bound<'_, PyTuple>) -> PyErr {
    static ASYNCIO: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    let made = ASYNCIO
        .get_or_try_init(py, || py.import("asyncio").map(Bound::unbind))
        .and_then(|asyncio| asyncio.bind(py).getattr(name))
        .and_then(|class| class.call1(args));
    match made {
        Ok(err) => PyErr::from_value(err),
        Err(err) => err,
    }
}

fn incomplete_read(py: Python<'_>, partial: Bound<'_, PyBytes>, expected: Option<usize>) -> PyErr {
    match (partial, expected).into_pyobject(py) {
        Ok(args) => asyncio_error(py, "IncompleteReadError", args),
        Err(err) => err,
    }
}

fn limit_overrun(py: Python<'_>, limit: usize) -> PyErr {
    let message = format!("the separator was not found within {limit} bytes");
    match (message, limit).into_pyobject(py) {
        Ok(args) => asyncio_error(py, "LimitOverrunError", args),
        Err(err) => err,
    }
}

/// What a `Connection` object does when it goes: closes the connection.
fn close_on_release(inner: Rc<Inner>) {
    inner.close();
}

const A_CONNECTION: &str = "a Connection";

/// Connection(fd, /)
/// --
///
/// A TCP connection of this shard, made from a connected socket's
/// descriptor (it takes ownership, as ``socket.detach()`` hands it over).
/// Reads are awaited; ``write`` sends at once and buffers the rest. It is
/// used on its own shard only.
#[pyclass(module = "shardloop._shardloop")]
pub(crate) struct Connection {
    home: Home<Inner>,
}

#[pymethods]
impl Connection {
    #[new]
    #[pyo3(signature = (fd, /))]
    fn new(py: Python<'_>, fd: RawFd) -> PyResult<Self> {
        running_shard_loop(py)?;
        if fd < 0 {
            return Err(PyValueError::new_err(format!("not a descriptor: {fd}")));
        }
        if !is_stream_socket(fd) {
            return Err(PyValueError::new_err(format!(
                "descriptor {fd} is not a connected stream socket"
            )));
        }
        // SAFETY: the caller hands the descriptor over (documented above);
        // from here this stream alone closes it.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        stream.set_nonblocking(true)?;
        let _ = stream.set_nodelay(true);
        let shard = shardloop_core::shard_id().ok_or_else(crate::errors::not_on_shard)?;
        let inner = Rc::new(Inner {
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
        });
        Ok(Self {
            home: Home::new(inner, shard, close_on_release, A_CONNECTION),
        })
    }

    /// Reads exactly `n` bytes; raises ``asyncio.IncompleteReadError`` if the
    /// peer closes first.
    fn read_exactly(&self, n: usize) -> PyResult<Waiting> {
        self.waiting(Want::Exactly(n))
    }

    /// Reads up to and including `separator`; raises
    /// ``asyncio.LimitOverrunError`` if it is not within `limit` bytes, and
    /// ``asyncio.IncompleteReadError`` if the peer closes first.
    #[pyo3(
        signature = (separator = b"\n".to_vec(), limit = 65536),
        text_signature = "($self, /, separator=b'\\n', limit=65536)"
    )]
    fn read_until(&self, separator: Vec<u8>, limit: usize) -> PyResult<Waiting> {
        if separator.is_empty() {
            return Err(PyValueError::new_err("the separator must not be empty"));
        }
        self.waiting(Want::Until { separator, limit })
    }

    /// Reads what arrived, at most `max` bytes and at least one; ``b""`` once
    /// the peer closed.
    #[pyo3(signature = (max = 65536))]
    fn read(&self, max: usize) -> PyResult<Waiting> {
        if max == 0 {
            return Err(PyValueError::new_err("max must be at least 1"));
        }
        self.waiting(Want::Some(max))
    }

    /// Queues `data` (bytes or any bytes-like object) to be sent. Everything written during a turn of the
    /// shard's loop goes out together when the turn ends, in one system
    /// call per connection and with the GIL released; what the socket does
    /// not take then is sent by a task of the shard. Raises the connection's
    /// error if an earlier send failed, ``ConnectionAbortedError`` after
    /// `close`.
    fn write(&self, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let inner = self.home.get()?;
        if inner.closed.get() {
            return Err(closed_here());
        }
        if let Some(err) = inner.write_error.borrow_mut().take() {
            return Err(err.into());
        }
        let before = inner.output.borrow().data.len();
        if let Ok(bytes) = data.cast::<PyBytes>() {
            inner
                .output
                .borrow_mut()
                .data
                .extend_from_slice(bytes.as_bytes());
        } else {
            // Any other bytes-like object (bytearray, memoryview, array),
            // seen as bytes whatever its item type (as socket.send sees it).
            let buffer = match PyBuffer::<u8>::get(data) {
                Ok(buffer) => buffer,
                Err(_) => {
                    let bytes = data
                        .py()
                        .import(intern!(data.py(), "builtins"))?
                        .getattr(intern!(data.py(), "memoryview"))?
                        .call1((data,))?
                        .call_method1(intern!(data.py(), "cast"), ("B",))?;
                    PyBuffer::<u8>::get(&bytes)?
                }
            };
            let mut output = inner.output.borrow_mut();
            let start = output.data.len();
            output.data.resize(start + buffer.len_bytes(), 0);
            if let Err(err) = buffer.copy_to_slice(data.py(), &mut output.data[start..]) {
                output.data.truncate(start);
                return Err(err);
            }
        }
        if inner.output.borrow().data.len() > before {
            inner.queue();
        }
        Ok(())
    }

    /// Waits until the send buffer is at most 64 KiB (at once if it is).
    fn drain(&self) -> PyResult<Waiting> {
        self.waiting(Want::Drained)
    }

    /// Bytes accepted by `write` that the socket has not taken yet.
    #[getter]
    fn pending(&self) -> PyResult<usize> {
        Ok(self.home.get()?.output.borrow().pending())
    }

    /// Whether the peer closed its side and every byte has been read.
    fn at_eof(&self) -> PyResult<bool> {
        let inner = self.home.get()?;
        Ok(inner.eof.get() && inner.input.borrow().buffered().is_empty())
    }

    /// The peer's address, as ``socket.getpeername`` gives it.
    #[getter]
    fn peername(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let addr = self.home.get()?.io.get_ref().peer_addr()?;
        Ok((addr.ip().to_string(), addr.port())
            .into_pyobject(py)?
            .into_any()
            .unbind())
    }

    /// Closes the connection: what `write` buffered is still sent, then the
    /// socket is shut down. A waiting read raises ``ConnectionAbortedError``.
    fn close(&self) -> PyResult<()> {
        self.home.local()?.close();
        Ok(())
    }

    #[getter]
    fn closed(&self) -> PyResult<bool> {
        Ok(self.home.local()?.closed.get())
    }

    fn __repr__(&self) -> String {
        let Ok(inner) = self.home.local() else {
            return format!("<Connection of shard {}>", self.home.shard());
        };
        let peer = inner
            .io
            .get_ref()
            .peer_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string());
        let state = if inner.closed.get() { "closed" } else { "open" };
        format!("<Connection {peer} shard {} {state}>", inner.shard)
    }
}

impl Connection {
    fn waiting(&self, want: Want) -> PyResult<Waiting> {
        Ok(Waiting {
            home: Home::new(
                self.home.get()?.clone(),
                self.home.shard(),
                drop, // an awaitable of a connection leaves it open
                A_CONNECTION,
            ),
            want,
            finished: AtomicBool::new(false),
        })
    }
}

fn closed_here() -> PyErr {
    PyConnectionAbortedError::new_err("the connection was closed on this side")
}

/// The awaitable of a read or a drain: its iterator returns the answer
/// once it is buffered, and until then yields an asyncio future that the
/// shard resolves when it may be.
#[pyclass(module = "shardloop._shardloop")]
pub(crate) struct Waiting {
    home: Home<Inner>,
    want: Want,
    /// Set once it gave its answer: awaiting it again is a mistake (it
    /// would read further), as awaiting a coroutine twice is.
    finished: AtomicBool,
}

#[pymethods]
impl Waiting {
    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// `Ok(None)` ends the iteration with `None` without raising
    /// `StopIteration` (a finished drain costs no exception); an answer is
    /// returned through `StopIteration(answer)`.
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let inner = self.home.get()?;
        if self.finished.load(Ordering::Relaxed) {
            return Err(PyRuntimeError::new_err(
                "this read or drain was awaited already; call the method again",
            ));
        }
        let mut answer = inner.take(py, &self.want)?;
        if answer.is_none() && !matches!(self.want, Want::Drained) && inner.io.is_readable() {
            let reader = OnThisThread(&**inner);
            if gil::detached(py, inner.shard, move || reader.into_inner().fill()) {
                answer = inner.take(py, &self.want)?;
            }
        }
        if let Some(answer) = answer {
            self.finished.store(true, Ordering::Relaxed);
            if answer.is_none() {
                return Ok(None);
            }
            return Err(PyStopIteration::new_err((answer.unbind(),)));
        }
        if inner.has_pending_waiter(py, &self.want)? {
            let what = if matches!(self.want, Want::Drained) {
                "drain"
            } else {
                "read"
            };
            return Err(PyRuntimeError::new_err(format!(
                "another task is already waiting to {what} on this connection"
            )));
        }
        let future = running_shard_loop(py)?.call_method0(intern!(py, "create_future"))?;
        future.setattr(intern!(py, "_asyncio_future_blocking"), true)?;
        let waiter = future.clone().unbind();
        if matches!(self.want, Want::Drained) {
            let replaced = inner.drain_waiter.borrow_mut().replace(waiter);
            drop(replaced);
            inner.start_writer();
        } else {
            let replaced = inner
                .read_waiter
                .borrow_mut()
                .replace((waiter, self.want.clone()));
            drop(replaced);
            inner.start_reader();
        }
        Ok(Some(future.unbind()))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Connection>()?;
    m.add_class::<Waiting>()
}

#[cfg(test)]
mod tests {
    use super::{ReadBuffer, READ_CHUNK, SHRINK_ABOVE};

    fn fill(buffer: &mut ReadBuffer, bytes: &[u8]) {
        let spare = buffer.spare(bytes.len());
        spare[..bytes.len()].copy_from_slice(bytes);
        buffer.end += bytes.len();
    }

    #[test]
    fn a_large_message_does_not_keep_its_buffer() {
        let mut buffer = ReadBuffer::new();
        let large = vec![7u8; 1 << 20];
        fill(&mut buffer, &large);
        assert!(buffer.data.len() >= 1 << 20);
        buffer.consume(large.len() - 1);
        assert!(buffer.data.len() > SHRINK_ABOVE, "kept while bytes remain");
        buffer.consume(1);
        assert_eq!(buffer.data.len(), READ_CHUNK);
        fill(&mut buffer, b"next");
        assert_eq!(buffer.buffered(), b"next");
    }

    #[test]
    fn a_separator_split_over_two_reads_is_found() {
        let mut buffer = ReadBuffer::new();
        fill(&mut buffer, b"abc\r");
        assert_eq!(buffer.find(b"\r\n"), None);
        fill(&mut buffer, b"\ndef");
        assert_eq!(buffer.find(b"\r\n"), Some(3));
    }
}
