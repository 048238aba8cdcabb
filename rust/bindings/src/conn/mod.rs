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

mod buffer;
mod stream;
mod transport;

use std::net::TcpStream;
use std::os::fd::{FromRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyStopIteration, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use self::stream::{is_stream_socket, Inner, Want};
use crate::context;
use crate::errors;
use crate::future::ShardFuture;
use crate::gil;
use crate::home::Home;

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
/// Reads are awaited; ``write`` queues, and what a turn of the loop wrote
/// is sent when the turn ends. It is used on its own shard only.
#[pyclass(module = "shardloop._shardloop")]
pub(crate) struct Connection {
    home: Home<Inner>,
}

#[pymethods]
impl Connection {
    #[new]
    #[pyo3(signature = (fd, /))]
    fn new(py: Python<'_>, fd: RawFd) -> PyResult<Self> {
        context::running_loop(py)?;
        if fd < 0 {
            return Err(PyValueError::new_err(format!("not a descriptor: {fd}")));
        }
        if !is_stream_socket(fd) {
            return Err(PyValueError::new_err(format!(
                "descriptor {fd} is not a stream socket (SOCK_STREAM)"
            )));
        }
        // SAFETY: the caller hands the descriptor over (documented above);
        // from here this stream alone closes it.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        stream.set_nonblocking(true)?;
        let _ = stream.set_nodelay(true);
        let shard = shardloop_core::shard_id().ok_or_else(errors::not_on_shard)?;
        let inner = Rc::new(Inner::new(stream, shard)?);
        Ok(Self {
            home: Home::new(inner, shard, close_on_release, A_CONNECTION),
        })
    }

    /// Reads exactly `n` bytes; raises ``asyncio.IncompleteReadError`` if the
    /// peer closes first.
    fn read_exactly(&self, n: i64) -> PyResult<Waiting> {
        self.waiting(Want::Exactly(size("n", n, 0)?))
    }

    /// Reads up to and including `separator`; raises
    /// ``asyncio.LimitOverrunError`` if it is not within `limit` bytes, and
    /// ``asyncio.IncompleteReadError`` if the peer closes first.
    #[pyo3(
        signature = (separator = None, limit = 65536),
        text_signature = "($self, /, separator=b'\\n', limit=65536)"
    )]
    fn read_until(&self, separator: Option<&Bound<'_, PyAny>>, limit: i64) -> PyResult<Waiting> {
        let separator: Vec<u8> = match separator {
            None => b"\n".to_vec(),
            Some(text) if text.is_instance_of::<pyo3::types::PyString>() => {
                return Err(PyTypeError::new_err(
                    "the separator must be bytes, not str (b'\\n', say)",
                ));
            }
            Some(separator) => separator.extract()?,
        };
        if separator.is_empty() {
            return Err(PyValueError::new_err("the separator must not be empty"));
        }
        let limit = size("limit", limit, 0)?;
        self.waiting(Want::Until { separator, limit })
    }

    /// Reads what arrived, at most `max` bytes and at least one; ``b""`` once
    /// the peer closed.
    #[pyo3(signature = (max = 65536))]
    fn read(&self, max: i64) -> PyResult<Waiting> {
        self.waiting(Want::UpTo(size("max", max, 1)?))
    }

    /// Queues `data` (bytes or any bytes-like object) to be sent.
    /// Everything written during a turn of the shard's loop goes out
    /// together when the turn ends, in one system
    /// call per connection and with the GIL released; what the socket does
    /// not take then is sent by a task of the shard. Raises the connection's
    /// error if an earlier send failed, ``ConnectionAbortedError`` after
    /// `close`.
    fn write(&self, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let inner = self.home.get()?;
        if inner.closed.get() {
            return Err(errors::closed_here());
        }
        if let Some(err) = inner.write_error.borrow_mut().take() {
            return Err(err.into());
        }
        if let Ok(bytes) = data.cast::<PyBytes>() {
            inner.write(bytes.as_bytes());
        } else if data.is_instance_of::<pyo3::types::PyString>() {
            return Err(PyTypeError::new_err(
                "write() takes bytes or another bytes-like object, not str (encode it first)",
            ));
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
            inner.write_with(buffer.len_bytes(), |spare| {
                buffer.copy_to_slice(data.py(), spare)
            })?;
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

/// `n` as a size, at least `least`: `ValueError` naming `what` otherwise.
fn size(what: &str, n: i64, least: i64) -> PyResult<usize> {
    if n < least {
        return Err(PyValueError::new_err(format!(
            "{what} must be at least {least}, not {n}"
        )));
    }
    usize::try_from(n).map_err(|_| PyValueError::new_err(format!("{what} is too large: {n}")))
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
        if answer.is_none()
            && !matches!(self.want, Want::Drained)
            && inner.io.is_readable()
            && gil::detached(py, inner.shard, || inner.fill())
        {
            answer = inner.take(py, &self.want)?;
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
        let event_loop = context::running_loop(py)?.unbind();
        let future = Py::new(py, ShardFuture::new(event_loop, None).yielded())?;
        inner.wait_on(future.clone_ref(py), &self.want);
        Ok(Some(future.into_any()))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Connection>()?;
    m.add_class::<Waiting>()?;
    transport::register(m)
}
